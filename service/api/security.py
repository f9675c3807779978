"""Optional API key for the API routes.

``Authorization: Bearer <key>`` for clients that can set headers; ``?token=<key>`` for those that
cannot (a browser's ``EventSource`` and ``WebSocket``). Compared in constant time. Health checks,
metrics and the static page stay open: the page must load before a person can type a key.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ErrorCode
from service.events.encode import to_json

PROTECTED_PREFIXES = ("/v1/", "/api/v1/")


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.key is None
            or scope["type"] not in ("http", "websocket")
            or not scope["path"].startswith(PROTECTED_PREFIXES)
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
        ):
            await self.app(scope, receive, send)
            return
        if self._authorised(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        body = to_json(
            {
                "error": {
                    "code": ErrorCode.UNAUTHORIZED.value,
                    "message": "missing or wrong API key (Authorization: Bearer <key>, or ?token=)",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="streamer"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: Scope) -> bool:
        assert self.key is not None
        presented = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
                break
        if not presented:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            presented = (query.get("token") or [""])[0].encode("latin-1")
        return hmac.compare_digest(presented, self.key)
