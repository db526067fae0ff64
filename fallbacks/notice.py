"""``notice``: no safe fallback, so say so in a way a patient app can show."""

from __future__ import annotations

from aiohttp import web

from resilgate.fallback import Fallback, FallbackRequest, degraded


class Notice(Fallback):
    """``503`` with ``Retry-After`` and a bilingual, machine-readable notice."""

    name = "notice"

    async def serve(self, request: FallbackRequest) -> web.StreamResponse:
        options = self.services.config.fallbacks.notice
        body = {
            "error": "service_degraded",
            "notice": {
                "code": "functions_under_repair",
                "zh": options.message_zh,
                "en": options.message_en,
            },
            "route": request.route.name,
            "retry_after_s": options.retry_after_s,
            "request_id": request.request_id,
        }
        headers = {"Retry-After": str(options.retry_after_s)}
        return degraded(self.name, 503, body, request.request_id, headers)
