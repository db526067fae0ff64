"""The guard around fallbacks: one that declines or fails leaves the answer to the notice."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from fallbacks import REGISTRY
from resilgate.config import Config
from resilgate.fallback import (
    Fallback,
    FallbackRequest,
    FallbackRunner,
    FallbackServices,
    UpstreamClient,
    degraded,
)
from resilgate.metrics import Metrics


class Broken(Fallback):
    name = "journal"

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        raise RuntimeError("disk full")


class Declines(Fallback):
    name = "self-pay"


class Serves(Fallback):
    name = "stale-cache"

    async def serve(self, request: FallbackRequest) -> web.StreamResponse | None:
        return degraded(self.name, 200, {"ok": True}, request.request_id)


def config() -> Config:
    route: dict[str, Any] = {"upstream": "his", "match": {"path_prefix": "/"}}
    return Config.model_validate(
        {
            "upstreams": {
                "his": {"endpoints": [{"name": "p", "url": "http://127.0.0.1:1", "priority": 0}]}
            },
            "routes": [
                {**route, "name": "broken", "fallback": "journal"},
                {**route, "name": "declines", "fallback": "self-pay"},
                {**route, "name": "serves", "fallback": "stale-cache"},
            ],
        }
    )


def runner() -> FallbackRunner:
    services = FallbackServices(config(), Metrics(), "test/1", UpstreamClient(), lambda: None)
    registry = {**REGISTRY, "journal": Broken, "self-pay": Declines, "stale-cache": Serves}
    return FallbackRunner(services, registry)


def request(route: str, run: FallbackRunner) -> FallbackRequest:
    routes = {r.name: r for r in run.services.config.routes}
    return FallbackRequest(
        routes[route], "GET", "/x", {}, "/x", CIMultiDictProxy(CIMultiDict()), None, "rid-1", "test"
    )


def outcomes(run: FallbackRunner) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["route"], s.labels["fallback"], s.labels["outcome"]): s.value
        for metric in run.services.metrics.fallbacks.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


@pytest.mark.parametrize(
    ("route", "fallback", "outcome"),
    [("broken", "journal", "failed"), ("declines", "self-pay", "declined")],
)
async def test_the_notice_answers_for_a_fallback_that_fails_or_declines(
    route: str, fallback: str, outcome: str
) -> None:
    run = runner()
    answer = await run.answer(request(route, run))
    assert answer.status == 503
    assert answer.headers["X-Resilgate-Degraded"] == "notice"
    assert isinstance(answer, web.Response) and answer.body is not None
    assert orjson.loads(answer.body)["request_id"] == "rid-1"
    counted = outcomes(run)
    assert counted[(route, fallback, outcome)] == 1
    assert counted[(route, "notice", "served")] == 1


async def test_a_fallback_that_serves_is_counted_under_its_name() -> None:
    run = runner()
    answer = await run.answer(request("serves", run))
    assert answer.status == 200 and answer.headers["X-Resilgate-Degraded"] == "stale-cache"
    assert outcomes(run) == {("serves", "stale-cache", "served"): 1}


def test_a_route_naming_a_fallback_nobody_implements_stops_the_start() -> None:
    services = FallbackServices(config(), Metrics(), "test/1", UpstreamClient(), lambda: None)
    with pytest.raises(ValueError, match="no fallback implementation named self-pay"):
        FallbackRunner(services, {k: v for k, v in REGISTRY.items() if k != "self-pay"})
