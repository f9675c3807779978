"""Requests whose target is in absolute form (``GET http://host/healthz HTTP/1.1``).

RFC 9112 section 3.2.2: a server must accept the absolute form in any request, and then use
the target's authority in place of the ``Host`` header. Hypercorn passes such a target through
as the ASGI ``path`` (``"http://host/healthz"``), which no route matches: a 404. This middleware,
the outermost, puts the origin form back into the scope (so every route, and the API key check,
sees ``/healthz``) and the authority into ``host``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

_SCHEMES = ("http://", "https://", "ws://", "wss://")


class AbsoluteFormMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].lower().startswith(_SCHEMES):
            scope = origin_form(scope)
        await self.app(scope, receive, send)


def origin_form(scope: Scope) -> Scope:
    """``scope`` with an absolute-form target rewritten to the origin form."""
    target = urlsplit(scope["path"])
    path = target.path or "/"
    raw = scope.get("raw_path")
    raw_path = path.encode() if raw is None else (urlsplit(bytes(raw)).path or b"/")
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"host"]
    if target.netloc:
        headers.insert(0, (b"host", target.netloc.encode("latin-1")))
    query = scope.get("query_string") or target.query.encode()
    return {**scope, "path": path, "raw_path": raw_path, "headers": headers, "query_string": query}
