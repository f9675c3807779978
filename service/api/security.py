"""Optional API key for the API routes.

``Authorization: Bearer <key>`` (or ``Token <key>``, as Deepgram's clients send it) for clients
that can set headers; ``?token=<key>`` or the WebSocket subprotocols ``token, <key>`` (Deepgram's
browser clients) for those that cannot. Compared in constant time. Health checks, metrics and
the static page stay open: the page must load before a person can type a key.

A refused WebSocket handshake is answered 403 (closed before accept), except on Deepgram's
``/v1/listen``, which answers 401 as Deepgram does: its clients report exactly that.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ErrorCode
from service.events.encode import to_json

PROTECTED_PREFIXES = ("/v1/", "/api/v1/")
# WebSocket routes whose refused handshake is an HTTP 401 (the denial response extension).
HTTP_401_WEBSOCKETS = ("/v1/listen",)
_SCHEMES = (b"bearer ", b"token ")


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
        if scope["type"] == "websocket" and not (
            scope["path"] in HTTP_401_WEBSOCKETS
            and "websocket.http.response" in scope.get("extensions", {})
        ):
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        prefix = "websocket." if scope["type"] == "websocket" else ""
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
                "type": f"{prefix}http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="streamer"'),
                ],
            }
        )
        await send({"type": f"{prefix}http.response.body", "body": body})

    def _authorised(self, scope: Scope) -> bool:
        assert self.key is not None
        presented = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() + b" " in _SCHEMES:
                    presented = credentials.strip()
                    break
        subprotocols = scope.get("subprotocols") or []
        if not presented and len(subprotocols) == 2 and subprotocols[0] == "token":
            presented = subprotocols[1].encode()
        if not presented:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            presented = (query.get("token") or [""])[0].encode("latin-1")
        return hmac.compare_digest(presented, self.key)
