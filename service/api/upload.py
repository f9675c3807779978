"""``POST``/``PUT /v1/sessions/{id}/audio``: the request body streams into the session.

Works with HTTP/1.1 chunked (``curl -X POST -T -``), a sized body (``curl -T file``, a PUT) and
HTTP/2 DATA frames. Bytes are handed on as they arrive; the response comes after the pipeline has
drained and summarises the session.
"""

from __future__ import annotations

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
    """Read the body into the session until it ends, the client leaves, or the session stops
    taking input (then at once: a client that declared more body than it sends must not keep
    the answer waiting). Reads ``receive`` directly so each wait can carry the idle timeout.
    Returns whether the whole body was read."""
    complete = False
    try:
        async with anyio.create_task_group() as tg:

            async def stop_when_input_closes() -> None:
                await session.input_closed.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when_input_closes)
            complete = await _read_body(request, session)
            tg.cancel_scope.cancel()
    finally:
        # Whatever happened (including cancellation), the session must not wait for more input.
        session.close_input(EndReason.CLIENT_DISCONNECTED)
    return complete


async def _read_body(request: Request, session: Session) -> bool:
    idle = session.runtime.settings.idle_timeout_seconds
    receive = request.receive
    try:
        while True:
            with anyio.move_on_after(idle) as scope:
                message = await receive()
            if scope.cancelled_caught:
                await session.fail_input(
                    StreamerError(
                        ErrorCode.IDLE_TIMEOUT, f"no audio received for {idle:g} s; upload closed"
                    ),
                    EndReason.IDLE_TIMEOUT,
                )
                return False
            if message["type"] == "http.disconnect":
                session.close_input(EndReason.CLIENT_DISCONNECTED)
                return True  # nothing more will arrive on this connection
            body: bytes = message.get("body", b"")
            if body:
                await session.write(body)
            if not message.get("more_body", False):
                session.close_input(EndReason.COMPLETED)
                return True
    except InputClosed:
        return False
