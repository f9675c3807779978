"""Liveness and readiness."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    registry = getattr(request.app.state, "registry", None)
    if registry is None or not registry.accepting:
        return JSONResponse({"status": "not ready"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "sessions": registry.live})
