"""``POST``/``PUT /v1/sessions/{id}/audio``: the request body streams into the session.

Works with HTTP/1.1 chunked (``curl -X POST -T -``), a sized body (``curl -T file``, a PUT) and
HTTP/2 DATA frames. Bytes are handed on as they arrive; the response comes after the pipeline has
drained and summarises the session.
"""

from __future__ import annotations

import time

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.api.responses import error_response
from service.api.sessions import links, registry_of
from service.config import parse_query_format
from service.errors import ErrorCode, StreamerError
from service.session.session import EndReason, InputClosed, Session


async def upload_audio(request: Request) -> Response:
    registry = registry_of(request)
    session_id = request.path_params["session_id"]
    registry.local(session_id)  # a malformed id is a 404 before any other complaint
    fmt = parse_query_format(request.query_params)
    # With a shared store this claims the session for this worker, atomically.
    session = await registry.start(session_id, fmt)
    complete = await pump(request, session)
    with anyio.CancelScope(shield=True):
        await session.done.wait()
    body = {"id": session.id, **session.status(), **links(request, session.id)}
    response = error_response(session.error, session=body) if session.error else JSONResponse(body)
    if not complete and request.scope.get("http_version", "1.1").startswith("1"):
        # Answered before the body ended: on HTTP/1.1 the rest of the body would still arrive on
        # this connection and wedge the next request behind it, so close it after the answer.
        # (HTTP/2 ends just this stream.)
        response.headers["Connection"] = "close"
    return response


async def pump(request: Request, session: Session) -> bool:
    """Read the body into the session until it ends, the client leaves, the client sends nothing
    for the idle timeout, or the session stops taking input (then at once: a client that
    declared more body than it sends must not keep the answer waiting). Returns whether the
    whole body was read."""
    reader = _BodyReader(request, session)
    try:
        async with anyio.create_task_group() as tg:

            async def stop_when_input_closes() -> None:
                await session.input_closed.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when_input_closes)
            tg.start_soon(reader.watch_idle, tg.cancel_scope)
            await reader.read()
            tg.cancel_scope.cancel()
        if reader.idle:
            idle = session.runtime.settings.idle_timeout_seconds
            await session.fail_input(
                StreamerError(
                    ErrorCode.IDLE_TIMEOUT, f"no audio received for {idle:g} s; upload closed"
                ),
                EndReason.IDLE_TIMEOUT,
            )
    finally:
        # Whatever happened (including cancellation), the session must not wait for more input.
        session.close_input(EndReason.CLIENT_DISCONNECTED)
    return reader.complete


class _BodyReader:
    """Reads ``receive`` directly. The idle timeout is one watchdog task per upload that checks
    the time of the last message, not a cancel scope around each read: a scope (and its timer)
    per chunk is a measurable share of the event loop at hundreds of live streams. The clock is
    ``time.monotonic`` (asyncio's own), read directly: ``anyio.current_time`` looks up the
    running backend on every call."""

    def __init__(self, request: Request, session: Session) -> None:
        self.request = request
        self.session = session
        self.complete = False
        self.idle = False
        self.last = time.monotonic()

    async def watch_idle(self, scope: anyio.CancelScope) -> None:
        timeout = self.session.runtime.settings.idle_timeout_seconds
        while True:
            remaining = self.last + timeout - time.monotonic()
            if remaining <= 0:
                self.idle = True
                scope.cancel()
                return
            await anyio.sleep(remaining)

    async def read(self) -> None:
        receive = self.request.receive
        session = self.session
        try:
            while True:
                message = await receive()
                self.last = time.monotonic()
                if message["type"] == "http.disconnect":
                    session.close_input(EndReason.CLIENT_DISCONNECTED)
                    self.complete = True  # nothing more will arrive on this connection
                    return
                body: bytes = message.get("body", b"")
                if body:
                    await session.write(body)
                if not message.get("more_body", False):
                    session.close_input(EndReason.COMPLETED)
                    self.complete = True
                    return
        except InputClosed:
            return
