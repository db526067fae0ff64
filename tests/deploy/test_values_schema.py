"""Bad values are refused at install time by values.schema.json, the message naming the field."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import pytest

from tests.deploy.chart import VALUE_SETS, render

SENTINEL = {"hosts": ["sentinel-0.sentinel.redis.svc:26379"], "master": "mymaster"}

# values -> what the message must say (the field, and why where the schema can say it)
REFUSED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "negative replica count": ({"replicaCount": -1}, ["'/replicaCount'", "minimum"]),
    "unknown state backend": (
        {"state": {"backend": "etcd"}},
        ["'/state/backend'", "'redis', 'sqlite'"],
    ),
    "password in the Redis URL": (
        {"state": {"redisUrl": "redis://:hunter2@redis-master.redis.svc:6379/0"}},
        ["'/state/redisUrl'", "without a password", "secrets.redisPassword"],
    ),
    "user and password in the Redis URL": (
        {"state": {"redisUrl": "rediss://gateway:hunter2@redis.redis.svc:6380/0"}},
        ["'/state/redisUrl'", "without a password"],
    ),
    "password as a URL parameter": (
        {"state": {"redisUrl": "redis://redis.redis.svc:6379/0?password=hunter2"}},
        ["'/state/redisUrl'", "without a password"],
    ),
    "not a Redis URL": ({"state": {"redisUrl": "http://redis:6379"}}, ["'/state/redisUrl'"]),
    "sqlite with several replicas": (
        {
            "state": {"backend": "sqlite"},
            "replicaCount": 3,
            "autoscaling": {"enabled": False},
            "persistence": {"existingClaim": "resilgate-data"},
        },
        ["'/replicaCount'", "maximum: got 3, want 1"],
    ),
    "sqlite with autoscaling": (
        {
            "state": {"backend": "sqlite"},
            "replicaCount": 1,
            "persistence": {"existingClaim": "resilgate-data"},
        },
        ["'/autoscaling/enabled'", "false"],
    ),
    "sqlite on an emptyDir": (
        {"state": {"backend": "sqlite"}, "replicaCount": 1, "autoscaling": {"enabled": False}},
        ["'/persistence/existingClaim'"],
    ),
    "redis without URL or Sentinel": (
        {"state": {"redisUrl": ""}},
        ["'/state/redisUrl'", "missing property 'redisSentinel'"],
    ),
    "both URL and Sentinel": (
        {"state": {"redisSentinel": SENTINEL}},
        ["'/state/redisUrl'", "when redisSentinel is given"],
    ),
    "Sentinel without its master": (
        {"state": {"redisUrl": "", "redisSentinel": {"hosts": ["sentinel-0:26379"]}}},
        ["'/state/redisSentinel'", "missing property 'master'"],
    ),
    "a misspelt chart key": (
        {"shutdown": {"drainDeadlineSecond": 60}},
        ["'/shutdown'", "'drainDeadlineSecond' not allowed"],
    ),
    "a misspelt top-level key": ({"replicas": 3}, ["additional properties 'replicas'"]),
    "a misspelt gateway key": (
        {"config": {"upstream": {}}},
        ["'/config'", "'upstream' not allowed"],
    ),
    "a state option the chart owns": (
        {"state": {"options": {"spool_path": "/tmp/spool.db"}}},
        ["'/state/options'", "'spool_path' not allowed"],
    ),
    "a secret value instead of a reference": (
        {"secrets": {"cacheKeys": {"name": "", "key": "keys", "value": "k1:AAAA"}}},
        ["'/secrets/cacheKeys'", "'value' not allowed"],
    ),
    "a privileged port": ({"ports": {"public": 80}}, ["'/ports/public'", "minimum"]),
    "workers left to the node's cores": ({"workers": 0}, ["'/workers'", "minimum"]),
    "a fractional drain deadline": (
        {"shutdown": {"drainDeadlineSeconds": 12.5}},
        ["'/shutdown/drainDeadlineSeconds'", "want integer"],
    ),
    "a ServiceMonitor without a token": (
        {"serviceMonitor": {"enabled": True}},
        ["'/serviceMonitor/tokenSecret/name'"],
    ),
    "an Ingress without hosts": ({"ingress": {"enabled": True}}, ["'/ingress/hosts'", "minItems"]),
    "one volume claim for three replicas": (
        {"persistence": {"existingClaim": "resilgate-data"}, "autoscaling": {"enabled": False}},
        ["'/replicaCount'", "maximum: got 3, want 1"],
    ),
    "a shutdown margin shorter than the gateway's clean-up": (
        {"shutdown": {"marginSeconds": 5}},
        ["'/shutdown/marginSeconds'", "minimum"],
    ),
    "a Sentinel without a port": (
        {"state": {"redisUrl": "", "redisSentinel": {"hosts": ["sentinel-0"], "master": "m"}}},
        ["'/state/redisSentinel/hosts/0'"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_schema_refuses_with_a_message_naming_the_field(
    chart: helm_python.Chart, case: str
) -> None:
    values, expected = REFUSED[case]
    with pytest.raises(helm_python.HelmValuesError) as refused:
        chart.validate_schema(values)
    message = str(refused.value)
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"
    assert "hunter2" not in message  # a refused password is not echoed to the terminal or CI


def test_install_refuses_what_the_schema_refuses(chart: helm_python.Chart) -> None:
    values, _ = REFUSED["sqlite with several replicas"]
    with pytest.raises(helm_python.HelmValuesError, match="'/replicaCount'"):
        render(chart, values)


def test_schema_accepts_an_ipv6_sentinel(chart: helm_python.Chart) -> None:
    sentinel = {"hosts": ["[fd00::1]:26379"], "master": "mymaster"}
    chart.validate_schema({"state": {"redisUrl": "", "redisSentinel": sentinel}})


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_schema_accepts_every_value_set(chart: helm_python.Chart, name: str) -> None:
    chart.validate_schema(VALUE_SETS[name])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"ports": {"public": 9090, "admin": 9090}}, "the admin API needs its own port"),
        (
            {"autoscaling": {"minReplicas": 6, "maxReplicas": 4}},
            "autoscaling.maxReplicas (4) is below autoscaling.minReplicas (6)",
        ),
        (
            {"routes": {name: "" for name in ("his.yaml", "insurance.yaml", "registration.yaml")}},
            "no route table left",
        ),
    ],
)
def test_rules_across_fields_fail_the_render(
    chart: helm_python.Chart, values: dict[str, Any], expected: str
) -> None:
    # JSON Schema cannot compare two values; the templates refuse these with `fail`.
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(expected)):
        render(chart, values)
