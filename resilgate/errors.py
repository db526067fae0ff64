"""Errors the gateway answers with, named by what the caller can do about them.

Upstream failures are split by phase of the exchange: ``UpstreamUnreachable`` means the
upstream never saw the request (safe to try elsewhere); ``UpstreamTimeout`` and
``UpstreamBroken`` mean it may have acted on it (the outcome is unknown).
"""

from __future__ import annotations


class StartupError(Exception):
    """The gateway cannot start; the message says what to fix."""


class GatewayError(Exception):
    """An error answered to the client as JSON with the request id."""

    status = 500
    code = "internal_error"
    retry_after_s: int | None = None  # sent as ``Retry-After`` when set

    def __init__(self, message: str, **details: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self, request_id: str) -> dict[str, str | int]:
        return {
            "error": self.code,
            "message": self.message,
            **self.details,
            "request_id": request_id,
        }


class NoRoute(GatewayError):
    status = 404
    code = "no_route"


class RequestBodyTooLarge(GatewayError):
    status = 413
    code = "request_body_too_large"


class ClientTooSlow(GatewayError):
    """The client did not send its body in time."""

    status = 408
    code = "request_body_timeout"


class ClientGone(GatewayError):
    """The client went away mid-exchange; nobody is left to answer (logged as 499)."""

    status = 499
    code = "client_gone"


class UpstreamError(GatewayError):
    """The upstream call failed; ``endpoint`` names the one tried."""


class UpstreamUnreachable(UpstreamError):
    """Connecting failed: the upstream never saw the request."""

    status = 502
    code = "upstream_unreachable"


class UpstreamConnectTimeout(UpstreamUnreachable):
    status = 504
    code = "upstream_connect_timeout"


class UpstreamTimeout(UpstreamError):
    """Sent, but no answer in time: the outcome is unknown."""

    status = 504
    code = "upstream_timeout"


class UpstreamBroken(UpstreamError):
    """The connection broke after sending: the outcome is unknown."""

    status = 502
    code = "upstream_broken"


class NoEndpoint(GatewayError):
    """No endpoint of the upstream may take the request now: all down, fenced or full."""

    status = 503
    code = "no_endpoint_available"
    retry_after_s = 10


class UpstreamInMaintenance(GatewayError):
    """Ops took the upstream or route out of service (mode ``maintenance`` or ``fallback``)."""

    status = 503
    code = "upstream_in_maintenance"
    retry_after_s = 60


class NoTicket(GatewayError):
    status = 404
    code = "no_such_ticket"


class StoreDown(GatewayError):
    status = 503
    code = "state_store_unreachable"
    retry_after_s = 5
