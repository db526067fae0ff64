"""The Helm chart, rendered by Helm for every value set: valid manifests, a config the gateway
accepts, and the properties a rolling update without a dropped request depends on."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from resilgate.config import Config, StateConfig, load_config
from resilgate.workers import stop_deadline_s
from tests.deploy.chart import (
    CHART_DIR,
    KUBE_VERSION,
    NAMESPACE,
    REPO,
    VALUE_SETS,
    Manifest,
    Rendered,
    container,
    container_port,
    mounted_files,
    pod_spec,
    render,
)

SECRET_VARIABLES = {
    "RESILGATE_CACHE_KEYS": "cacheKeys",
    "RESILGATE_WEBHOOK_SECRET": "webhookSecret",
    "RESILGATE_REDIS_PASSWORD": "redisPassword",
    "RESILGATE_SENTINEL_PASSWORD": "sentinelPassword",
}


def _load(rendered: Rendered, tmp_path: Path) -> Config:
    return load_config(mounted_files(rendered, tmp_path))


def _is_subset(labels: dict[str, str], of: dict[str, str]) -> bool:
    return all(of.get(key) == value for key, value in labels.items())


# ---------------------------------------------------------------------------------------------
# Valid for Helm and for the Kubernetes API


def test_every_manifest_validates_against_the_kubernetes_api(rendered: Rendered) -> None:
    expected = {
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }
    assert expected <= rendered.kinds
    for manifest in rendered.manifests:
        if manifest["kind"] == "ServiceMonitor":
            continue  # a CRD: no API schema; checked structurally below
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(
                f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {exc.message}"
            )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_finds_no_error_or_warning(name: str) -> None:
    report = helm_python.lint(
        CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert not serious, serious
    assert not report["errors"]


def test_chart_route_tables_are_the_repository_ones() -> None:
    chart_routes = sorted(p.name for p in (CHART_DIR / "files" / "routes").glob("*.yaml"))
    repo_routes = sorted(p.name for p in (REPO / "routes").glob("*.yaml"))
    assert chart_routes == repo_routes
    for name in repo_routes:
        copy = (CHART_DIR / "files" / "routes" / name).read_bytes()
        assert copy == (REPO / "routes" / name).read_bytes(), (
            f"helm/resilgate/files/routes/{name} differs from routes/{name}: copy it again"
        )


def test_values_split_the_gateway_config_with_the_chart(chart: helm_python.Chart) -> None:
    # Every top-level key of the gateway's config is either written by the chart or allowed
    # under `config:`; a key the gateway gains must be placed in one or the other.
    schema = chart.schema
    assert schema is not None
    by_values = set(schema["properties"]["config"]["properties"])
    by_chart = {
        "listeners",
        "workers",
        "drain_deadline_s",
        "drain_notice_s",
        "state",
        "admin",
        "include_routes",
        "routes",
    }
    assert by_values | by_chart == set(Config.model_fields)
    assert not by_values & by_chart
    options = set(schema["properties"]["state"]["properties"]["options"]["properties"])
    assert options <= set(StateConfig.model_fields)


# ---------------------------------------------------------------------------------------------
# The config the pods read


def test_rendered_config_loads_in_the_gateway(rendered: Rendered, tmp_path: Path) -> None:
    config = _load(rendered, tmp_path)
    values = rendered.values

    routes = {p.name for p in (CHART_DIR / "files" / "routes").glob("*.yaml")}
    assert {p.name for p in (tmp_path / "routes").iterdir()} == routes
    assert len(config.routes) >= len(routes)
    assert config.workers == values["workers"]
    assert config.drain_notice_s == values["shutdown"]["drainNoticeSeconds"]
    assert config.drain_deadline_s == values["shutdown"]["drainDeadlineSeconds"]
    written = yaml.safe_load(rendered.one("ConfigMap")["data"]["resilgate.yaml"])
    for key, value in values["config"].items():
        assert written[key] == value, f"config.{key} changed on its way to the ConfigMap"

    state = config.state
    assert state.backend == values["state"]["backend"]
    data_dir = next(m for m in container(rendered)["volumeMounts"] if m["name"] == "data")
    if state.backend == "redis":
        assert state.spool_path.parent == Path(data_dir["mountPath"])
        sentinel = values["state"].get("redisSentinel")
        if sentinel:
            assert state.redis_url is None
            assert state.redis_sentinel is not None
            assert state.redis_sentinel.hosts == sentinel["hosts"]
            assert state.redis_sentinel.master == sentinel["master"]
        else:
            assert state.redis_url == values["state"]["redisUrl"]
        for key, value in values["state"]["options"].items():
            assert getattr(state, key) == value
    else:
        assert state.path.parent == Path(data_dir["mountPath"])


def test_listeners_match_container_ports_probes_and_services(
    rendered: Rendered, tmp_path: Path
) -> None:
    config = _load(rendered, tmp_path)
    public, admin = config.listeners.public, config.listeners.admin
    assert public.host == admin.host == "0.0.0.0"
    assert public.port != admin.port
    assert container_port(rendered, "public") == public.port
    assert container_port(rendered, "admin") == admin.port

    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = container(rendered)[probe]["httpGet"]["port"]
        assert container_port(rendered, port) == admin.port, probe

    public_service = rendered.one("Service", "public")["spec"]
    admin_service = rendered.one("Service", "admin")["spec"]
    assert [container_port(rendered, p["targetPort"]) for p in public_service["ports"]] == [
        public.port
    ]
    assert [container_port(rendered, p["targetPort"]) for p in admin_service["ports"]] == [
        admin.port
    ]
    assert admin_service["type"] == "ClusterIP"
    assert public_service["type"] == rendered.values["service"]["type"]


def test_admin_tokens_file_is_the_mounted_secret(rendered: Rendered, tmp_path: Path) -> None:
    config = _load(rendered, tmp_path)
    ref = rendered.values["secrets"]["adminTokens"]
    volume = next(v for v in pod_spec(rendered)["volumes"] if v["name"] == "config")
    secrets = [s["secret"] for s in volume["projected"]["sources"] if "secret" in s]
    if not ref["name"]:
        assert config.admin.tokens_file is None
        assert secrets == []
        return
    mount = next(m for m in container(rendered)["volumeMounts"] if m["name"] == "config")
    assert config.admin.tokens_file is not None
    (secret,) = secrets
    assert secret["name"] == ref["name"]
    assert "optional" not in secret  # a missing Secret stops the pod instead of no tokens
    (item,) = secret["items"]
    assert item["key"] == ref["key"]
    assert Path(mount["mountPath"]) / item["path"] == config.admin.tokens_file


def test_values_replace_add_and_drop_route_tables(chart: helm_python.Chart, tmp_path: Path) -> None:
    his = (REPO / "routes" / "his.yaml").read_text().replace("his-capability", "his-metadata")
    extra = yaml.safe_dump(
        {
            "routes": [
                {
                    "name": "his-downtime-forms",
                    "upstream": "his",
                    "match": {"path_prefix": "/forms/"},
                }
            ]
        }
    )
    values = {"routes": {"his.yaml": his, "registration.yaml": "", "zz-forms.yaml": extra}}
    rendered = render(chart, values)
    config = _load(rendered, tmp_path)
    names = [route.name for route in config.routes]
    assert "his-metadata" in names and "his-capability" not in names
    assert not any(name.startswith("registration-") for name in names)
    assert names[-1] == "his-downtime-forms"
    assert sorted(p.name for p in (tmp_path / "routes").iterdir()) == [
        "his.yaml",
        "insurance.yaml",
        "zz-forms.yaml",
    ]


# ---------------------------------------------------------------------------------------------
# Rolling updates drop nothing


def test_grace_period_covers_prestop_notice_and_drain(rendered: Rendered, tmp_path: Path) -> None:
    config = _load(rendered, tmp_path)
    pre_stop = container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    assert sleep_s >= 5, "endpoints need a few seconds to be removed everywhere"
    margin = rendered.values["shutdown"]["marginSeconds"]
    grace = pod_spec(rendered)["terminationGracePeriodSeconds"]
    assert grace == sleep_s + config.drain_notice_s + config.drain_deadline_s + margin
    # The gateway's supervisor kills workers still alive after its own stop deadline; the
    # kubelet must not kill the pod before (2 s of slack for the signal's way and exit).
    assert grace >= sleep_s + stop_deadline_s(config) + 2


def test_rolling_update_keeps_every_replica_serving(rendered: Rendered) -> None:
    deployment = rendered.one("Deployment")["spec"]
    if rendered.values["state"]["backend"] == "sqlite":
        assert deployment["strategy"] == {"type": "Recreate"}  # one writer of the SQLite file
        assert deployment["replicas"] == 1
        return
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    if rendered.values["autoscaling"]["enabled"]:
        assert "replicas" not in deployment  # the HPA owns the count
    else:
        assert deployment["replicas"] == rendered.values["replicaCount"] > 1


def test_probes_ask_the_admin_listener(rendered: Rendered) -> None:
    main = container(rendered)
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_config_checksum_rolls_the_pods(chart: helm_python.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        rendered = render(chart, values)
        annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        value = annotations["checksum/config"]
        assert isinstance(value, str)
        return value

    base = checksum({})
    config_map = render(chart, {}).texts["resilgate/templates/configmap.yaml"]
    assert base == hashlib.sha256(config_map.encode()).hexdigest()
    assert checksum({"replicaCount": 5}) == base
    assert checksum({"shutdown": {"drainDeadlineSeconds": 20}}) != base
    his = (REPO / "routes" / "his.yaml").read_text() + "\n# changed\n"
    assert checksum({"routes": {"his.yaml": his}}) != base


# ---------------------------------------------------------------------------------------------
# Placement, scaling, disruption


def test_pods_spread_across_nodes_and_zones(rendered: Rendered) -> None:
    spec = pod_spec(rendered)
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    keys = {}
    for constraint in spec["topologySpreadConstraints"]:
        assert _is_subset(constraint["labelSelector"]["matchLabels"], pod_labels)
        keys[constraint["topologyKey"]] = constraint["whenUnsatisfiable"]
    assert keys == {
        "kubernetes.io/hostname": "DoNotSchedule",
        "topology.kubernetes.io/zone": "ScheduleAnyway",
    }
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _is_subset(term["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)


def test_pdb_and_hpa_target_the_deployment(rendered: Rendered) -> None:
    deployment = rendered.one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert _is_subset(pdb["selector"]["matchLabels"], pod_labels)
    assert pdb["maxUnavailable"] == 1
    if not rendered.values["autoscaling"]["enabled"]:
        assert "HorizontalPodAutoscaler" not in rendered.kinds
        return
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 < hpa["minReplicas"] <= hpa["maxReplicas"]


def test_services_select_the_pods(rendered: Rendered) -> None:
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in rendered.all("Service"):
        assert _is_subset(service["spec"]["selector"], pod_labels)
    ingresses = rendered.all("Ingress")
    assert len(ingresses) == int(rendered.values["ingress"]["enabled"])
    public = rendered.one("Service", "public")
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == public["metadata"]["name"]
                assert backend["port"]["name"] in {p["name"] for p in public["spec"]["ports"]}


# ---------------------------------------------------------------------------------------------
# Security


def test_pod_runs_unprivileged_on_a_read_only_root(rendered: Rendered) -> None:
    spec = pod_spec(rendered)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    main = container(rendered)["securityContext"]
    assert main["runAsNonRoot"] is True
    assert main["readOnlyRootFilesystem"] is True
    assert main["allowPrivilegeEscalation"] is False
    assert main["capabilities"] == {"drop": ["ALL"]}
    assert main["seccompProfile"] == {"type": "RuntimeDefault"}

    # what the gateway writes lies on volumes, not on the read-only root
    mounts = {m["mountPath"] for m in container(rendered)["volumeMounts"] if not m.get("readOnly")}
    env = {e["name"]: e.get("value") for e in container(rendered)["env"]}
    assert {"/tmp", "/var/lib/resilgate", env["PROMETHEUS_MULTIPROC_DIR"]} <= mounts
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_no_secret_value_is_rendered(rendered: Rendered) -> None:
    assert "Secret" not in rendered.kinds
    secrets, state = rendered.values["secrets"], rendered.values["state"]
    expected = {variable for variable, key in SECRET_VARIABLES.items() if secrets[key]["name"]}
    if state["backend"] == "sqlite":
        expected -= {"RESILGATE_REDIS_PASSWORD", "RESILGATE_SENTINEL_PASSWORD"}
    if not state.get("redisSentinel"):
        expected.discard("RESILGATE_SENTINEL_PASSWORD")
    env = {e["name"]: e for e in container(rendered)["env"]}
    assert set(env) & set(SECRET_VARIABLES) == expected
    for variable in expected:
        ref = secrets[SECRET_VARIABLES[variable]]
        assert "value" not in env[variable], variable
        assert env[variable]["valueFrom"] == {
            "secretKeyRef": {"name": ref["name"], "key": ref["key"]}
        }
    literal = {name for name, e in env.items() if "value" in e}
    assert literal == {"PROMETHEUS_MULTIPROC_DIR", "PYTHONDONTWRITEBYTECODE"}


def test_network_policy_opens_only_the_public_port_to_all(rendered: Rendered) -> None:
    policy = rendered.one("NetworkPolicy")["spec"]
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _is_subset(policy["podSelector"]["matchLabels"], pod_labels)
    assert policy["policyTypes"] == ["Ingress"]
    namespaces = rendered.values["networkPolicy"]["adminNamespaces"]
    by_port: dict[str, list[Manifest]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule)
    assert set(by_port) == {"public", "admin"}
    (public,) = by_port["public"]
    assert "from" not in public  # anyone
    (admin,) = by_port["admin"]
    (peer,) = admin["from"]
    assert set(peer) == {"namespaceSelector"}
    (expression,) = peer["namespaceSelector"]["matchExpressions"]
    assert expression == {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": namespaces,
    }


def test_service_monitor_scrapes_the_admin_service_with_a_token(rendered: Rendered) -> None:
    monitors = rendered.all("ServiceMonitor")
    settings = rendered.values["serviceMonitor"]
    if not settings["enabled"]:
        assert monitors == []
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert _is_subset(settings["labels"], monitor["metadata"]["labels"])
    spec = monitor["spec"]
    selector = spec["selector"]["matchLabels"]
    admin = rendered.one("Service", "admin")
    public = rendered.one("Service", "public")
    assert _is_subset(selector, admin["metadata"]["labels"])
    assert not _is_subset(selector, public["metadata"]["labels"])
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in admin["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": dict(settings["tokenSecret"]),
    }
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout", "authorization"}


def test_default_values_are_the_hospital_example_to_replace(chart: helm_python.Chart) -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    upstreams = chart.values["config"]["upstreams"]
    assert set(upstreams) == {"his", "registration", "insurance"}
    for upstream in upstreams.values():
        for endpoint in upstream["endpoints"]:
            assert ".svc:" in endpoint["url"]
    assert "replace every URL" in text
    # one worker per CPU of the limit (the gateway's `workers: 0` would count the node's)
    assert chart.values["workers"] == int(chart.values["resources"]["limits"]["cpu"])
    # values.yaml names Secrets and their keys, nothing else
    for ref in chart.values["secrets"].values():
        assert set(ref) == {"name", "key"}
