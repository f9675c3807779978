"""Session resources: create, read, cancel."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.config import config_to_dict, parse_session_config
from service.errors import ErrorCode, StreamerError
from service.session.registry import Registry


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def read_json_body(request: Request, limit: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise StreamerError(ErrorCode.CONFIG_TOO_LARGE, f"config body exceeds {limit} bytes")
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StreamerError(ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None


def links(request: Request, session_id: str) -> dict[str, str]:
    base = str(request.base_url).rstrip("/")
    ws = base.replace("http", "ws", 1)
    return {
        "url": f"{base}/v1/sessions/{session_id}",
        "audio_url": f"{base}/v1/sessions/{session_id}/audio",
        "events_url": f"{base}/v1/sessions/{session_id}/events",
        "ws_url": f"{ws}/v1/ws?session={session_id}",
    }


async def create_session(request: Request) -> Response:
    registry = registry_of(request)
    raw = await read_json_body(request, registry.runtime.settings.max_config_bytes)
    config = parse_session_config(raw)
    session_id = await registry.create(config)
    urls = links(request, session_id)
    body = {"id": session_id, **urls, "config": config_to_dict(config)}
    return JSONResponse(body, status_code=201, headers={"Location": urls["url"]})


async def get_session(request: Request) -> Response:
    session_id = request.path_params["session_id"]
    status = await registry_of(request).status(session_id)
    return JSONResponse({**status, **links(request, session_id)})


async def delete_session(request: Request) -> Response:
    status = await registry_of(request).cancel(request.path_params["session_id"])
    return JSONResponse(status, status_code=202)
