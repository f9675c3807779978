"""JSON error bodies: ``{"error": {"code": ..., "message": ...}}``, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.errors import ErrorCode, OffsetMismatch, StreamerError

log = logging.getLogger(__name__)


def error_response(error: StreamerError, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "5"} if error.status == 503 else {}
    if error.close_connection:
        headers["Connection"] = "close"
    body: dict[str, Any] = error.to_dict()
    if isinstance(error, OffsetMismatch):
        # Where to continue, as tus says it (the header) and in the typed body.
        headers["Upload-Offset"] = str(error.offset)
        body["offset"] = error.offset
    return JSONResponse({"error": body, **extra}, status_code=error.status, headers=headers)


async def streamer_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StreamerError)
    return error_response(exc)


_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_MESSAGE)
    body = {"error": {"code": code.value, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = {"error": {"code": ErrorCode.INTERNAL.value, "message": "internal server error"}}
    return JSONResponse(body, status_code=500)
