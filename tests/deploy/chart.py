"""The chart rendered by Helm's own library, as parsed manifests, and the value sets to render."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "resilgate"
RELEASE = "resilgate"
NAMESPACE = "hospital"
KUBE_VERSION = "1.30"

Manifest = dict[str, Any]

# Each set is a values file an operator could write; "default" is values.yaml alone.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "sentinel": {
        "state": {
            "redisUrl": "",
            "redisSentinel": {
                "hosts": [
                    "sentinel-0.sentinel.redis.svc:26379",
                    "sentinel-1.sentinel.redis.svc:26379",
                    "sentinel-2.sentinel.redis.svc:26379",
                ],
                "master": "mymaster",
                "db": 2,
            },
            "options": {"op_timeout_s": 0.25},
        },
        "secrets": {
            "redisPassword": {"name": "redis-auth", "key": "password"},
            "sentinelPassword": {"name": "redis-auth", "key": "sentinel-password"},
        },
    },
    "ingress": {
        "service": {"type": "ClusterIP"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "10m"},
            "hosts": [
                {"host": "gateway.hospital.example", "paths": [{"path": "/", "pathType": "Prefix"}]}
            ],
            "tls": [{"secretName": "gateway-tls", "hosts": ["gateway.hospital.example"]}],
        },
    },
    "fixed-replicas": {
        "autoscaling": {"enabled": False},
        "replicaCount": 4,
        "networkPolicy": {"adminNamespaces": ["monitoring", "hospital-ops"]},
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "tokenSecret": {"name": "resilgate-metrics-token", "key": "token"},
        },
        "secrets": {"webhookSecret": {"name": "resilgate-webhook", "key": "secret"}},
        "config": {"alerts": {"webhooks": ["https://duty-phone.hospital.example/hook"]}},
        "shutdown": {"preStopSleepSeconds": 7, "drainNoticeSeconds": 3, "drainDeadlineSeconds": 45},
    },
    "sqlite": {
        "state": {"backend": "sqlite"},
        "replicaCount": 1,
        "autoscaling": {"enabled": False},
        "persistence": {"existingClaim": "resilgate-data"},
        "secrets": {"adminTokens": {"name": "", "key": "tokens.yaml"}},
    },
}


@dataclass(frozen=True)
class Rendered:
    """The manifests of one render, with the values Helm used."""

    values: dict[str, Any]
    texts: dict[str, str]  # template path -> rendered text
    manifests: list[Manifest]

    def all(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> Manifest:
        found = [
            m
            for m in self.all(kind)
            if component is None
            or m["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"{len(found)} {kind} manifests (component {component})"
        return found[0]

    @property
    def kinds(self) -> set[str]:
        return {m["kind"] for m in self.manifests}

    def __repr__(self) -> str:
        return f"<Rendered {sorted(self.kinds)}>"


def render(chart: helm_python.Chart, values: dict[str, Any]) -> Rendered:
    texts = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests = [
        doc
        for path, text in sorted(texts.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Rendered(chart.merge_values(values), texts, manifests)


def pod_spec(rendered: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = rendered.one("Deployment")["spec"]["template"]["spec"]
    return spec


def container(rendered: Rendered) -> dict[str, Any]:
    (only,) = pod_spec(rendered)["containers"]
    assert isinstance(only, dict)
    return only


def container_port(rendered: Rendered, port: int | str) -> int:
    """A container port by number or name, as a Service or probe refers to it."""
    ports = {p["name"]: p["containerPort"] for p in container(rendered)["ports"]}
    if isinstance(port, int):
        assert port in ports.values(), f"no container port {port}"
        return port
    return int(ports[port])


def mounted_files(rendered: Rendered, root: Path) -> Path:
    """Write the ConfigMap's items where the pod's projected volume puts them; the main file.

    Secrets are not rendered; their items are left out.
    """
    spec = pod_spec(rendered)
    mount = next(m for m in container(rendered)["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    data = rendered.one("ConfigMap")["data"]
    for source in volume["projected"]["sources"]:
        for item in source.get("configMap", {}).get("items", []):
            path = root / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]], encoding="utf-8")
    args = container(rendered)["args"]
    config_path = Path(args[args.index("--config") + 1])
    return root / config_path.relative_to(mount["mountPath"])
