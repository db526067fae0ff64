"""Route matching: pure, synchronous, in the order the route tables are written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resilgate.config import Route


@dataclass(frozen=True, slots=True)
class _Compiled:
    route: Route
    host: str | None
    path: str | None
    prefix: str | None
    methods: frozenset[str] | None
    body_field: str | None
    body_values: frozenset[str]

    def matches_request_line(self, method: str, host: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.host is not None and host != self.host:
            return False
        if self.path is not None:
            return path == self.path
        return self.prefix is not None and path.startswith(self.prefix)

    def matches_body(self, body: Mapping[str, Any]) -> bool:
        value = body.get(self.body_field) if self.body_field else None
        if isinstance(value, bool) or not isinstance(value, str | int):
            return False
        return str(value) in self.body_values


def _compile(route: Route) -> _Compiled:
    match = route.match
    body = match.body
    return _Compiled(
        route=route,
        host=match.host.lower() if match.host else None,
        path=match.path,
        prefix=match.path_prefix,
        methods=frozenset(match.methods) if match.methods else None,
        body_field=body.field if body else None,
        body_values=frozenset(body.values) if body else frozenset(),
    )


def host_without_port(host: str) -> str:
    """``Host`` header value lower-cased without its port (IPv6 literals kept whole)."""
    host = host.lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


class RouteTable:
    """Finds the first route, in written order, that takes a request."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(_compile(route) for route in routes)

    def __repr__(self) -> str:
        return f"<RouteTable {len(self._routes)} routes>"

    def body_route(self, method: str, host: str, path: str) -> Route | None:
        """The body-matching route whose body cap applies, or None when no body is needed.

        The body is needed when a body-matching route comes before the first route that
        matches on the request line alone; of several, the one reading most decides the cap.
        """
        widest: Route | None = None
        for compiled in self._routes:
            if not compiled.matches_request_line(method, host, path):
                continue
            if compiled.body_field is None:
                break
            if widest is None or compiled.route.body_read_cap_bytes > widest.body_read_cap_bytes:
                widest = compiled.route
        return widest

    def match(
        self, method: str, host: str, path: str, body: Mapping[str, Any] | None = None
    ) -> Route | None:
        """The first route that takes the request; ``body`` is the parsed JSON object, if read."""
        for compiled in self._routes:
            if not compiled.matches_request_line(method, host, path):
                continue
            if compiled.body_field is None:
                return compiled.route
            if body is not None and compiled.matches_body(body):
                return compiled.route
        return None
