"""``POST``/``PUT``/``PATCH /v1/sessions/{id}/audio``: the request body streams into the session;
``HEAD`` says how many bytes were received (``Upload-Offset``).

Works with HTTP/1.1 chunked (``curl -X POST -T -``), a sized body (``curl -T file``, a PUT) and
HTTP/2 DATA frames. Bytes are handed on as they arrive; the response comes after the pipeline has
drained and summarises the session.

A resumable session (``"resumable": true``) whose upload is cut waits for the rest: an upload
with ``Upload-Offset: N`` (N = the bytes received, as ``HEAD`` tells) continues the same byte
stream, into the same decoder (docs/resume.md).
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
from service.session.session import EndReason, InputClosed, Session, Upload

OFFSET_HEADER = "Upload-Offset"


def _offset(request: Request) -> int | None:
    raw = request.headers.get(OFFSET_HEADER)
    if raw is None:
        return None
    if not raw.isdigit():  # RFC 8941 / tus: a non-negative integer, nothing else
        raise StreamerError(
            ErrorCode.INVALID_MESSAGE, f"{OFFSET_HEADER} must be a non-negative integer"
        )
    return int(raw)


async def upload_audio(request: Request) -> Response:
    registry = registry_of(request)
    session_id = request.path_params["session_id"]
    registry.local(session_id)  # a malformed id is a 404 before any other complaint
    fmt = parse_query_format(request.query_params)
    offset = _offset(request)
    # With a shared store this claims the session for this worker, atomically.
    try:
        if offset is None:
            session = await registry.start(session_id, fmt)
        else:
            session = await registry.resume(session_id, offset, fmt)
    except StreamerError as exc:
        # Refused before reading the body: on HTTP/1.1 that body is still on its way on this
        # connection, so close it after the answer, or a client reusing it for its next
        # request finds it closed under it (a 421 retry must come on a new connection
        # anyway, RFC 9110). HTTP/2 has no Connection header: it ends just this stream.
        # Raised on, so that the app's handler answers and counts it like any other error.
        if _http1(request) and (exc.code is ErrorCode.SESSION_ELSEWHERE or _has_body(request)):
            exc.close_connection = True
        raise
    upload = session.upload  # read before any await: this request's turn at the input
    assert upload is not None
    complete = await pump(request, session, upload)
    if session.awaiting_resume or upload is not session.upload:
        # Cut (or replaced by a newer upload) and the session waits for the rest: nobody is
        # likely to read this, and the session's end belongs to the upload that finishes it.
        body = {"id": session.id, **session.status(), **links(request, session.id)}
        response: Response = JSONResponse(body, status_code=202)
    else:
        with anyio.CancelScope(shield=True):
            await session.done.wait()
        body = {"id": session.id, **session.status(), **links(request, session.id)}
        error = session.error
        if session.end_reason is EndReason.HANDED_OFF:
            # Not an end: the session goes on in another worker, from its kept audio.
            error = StreamerError(
                ErrorCode.SHUTTING_DOWN,
                "this worker is shutting down; the session goes on in another one: resume the "
                "upload there (HEAD for its Upload-Offset)",
            )
        response = error_response(error, session=body) if error else JSONResponse(body)
    response.headers[OFFSET_HEADER] = str(session.counters.bytes_in)
    if not complete and _http1(request):
        # Answered before the body ended: on HTTP/1.1 the rest of the body would still arrive on
        # this connection and wedge the next request behind it, so close it after the answer.
        # (HTTP/2 ends just this stream.)
        response.headers["Connection"] = "close"
    return response


def _has_body(request: Request) -> bool:
    headers = request.headers
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


def _http1(request: Request) -> bool:
    return str(request.scope.get("http_version", "1.1")).startswith("1")


async def upload_offset(request: Request) -> Response:
    """``HEAD``: where an upload continues (tus's offset), and the session's state."""
    status = await registry_of(request).status(request.path_params["session_id"])
    state = "awaiting_resume" if status.get("awaiting_resume") else status["state"]
    headers = {
        OFFSET_HEADER: str(status.get("upload_offset", 0)),
        "Session-State": state,
        "Cache-Control": "no-store",
    }
    return Response(status_code=200, headers=headers)


async def pump(request: Request, session: Session, upload: Upload | None = None) -> bool:
    """Read the body into the session until it ends, the client leaves, the client sends nothing
    for the idle timeout, or the upload stops (then at once: a client that declared more body
    than it sends must not keep the answer waiting). Returns whether the whole body was read."""
    upload = upload or session.upload
    reader = _BodyReader(request, session, upload)
    try:
        async with anyio.create_task_group() as tg:

            async def stop_when_input_closes() -> None:
                if upload is None:
                    await session.input_closed.wait()
                else:
                    await upload.stopped.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when_input_closes)
            tg.start_soon(reader.watch_idle, tg.cancel_scope)
            await reader.read()
            tg.cancel_scope.cancel()
        if reader.idle and not session.config.resumable:
            idle = session.runtime.settings.idle_timeout_seconds
            await session.fail_input(
                StreamerError(
                    ErrorCode.IDLE_TIMEOUT, f"no audio received for {idle:g} s; upload closed"
                ),
                EndReason.IDLE_TIMEOUT,
            )
    finally:
        # Whatever happened (including cancellation), the session must not wait for this
        # upload's input: it ends, or (resumable) waits for an upload that continues it. A
        # resumable session's silent client counts as cut, for the same reason.
        session.detach_input(upload)
    return reader.complete


class _BodyReader:
    """Reads ``receive`` directly. The idle timeout is one watchdog task per upload that checks
    the time of the last message, not a cancel scope around each read: a scope (and its timer)
    per chunk is a measurable share of the event loop at hundreds of live streams. The clock is
    ``time.monotonic`` (asyncio's own), read directly: ``anyio.current_time`` looks up the
    running backend on every call."""

    def __init__(self, request: Request, session: Session, upload: Upload | None) -> None:
        self.request = request
        self.session = session
        self.upload = upload
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
        session, upload = self.session, self.upload
        try:
            while True:
                message = await receive()
                self.last = time.monotonic()
                if message["type"] == "http.disconnect":
                    session.detach_input(upload)
                    self.complete = True  # nothing more will arrive on this connection
                    return
                body: bytes = message.get("body", b"")
                if body:
                    await session.write(body, upload)
                if not message.get("more_body", False):
                    if upload is not None and upload is not session.upload:
                        return  # superseded: its end is not the stream's
                    session.close_input(EndReason.COMPLETED)
                    self.complete = True
                    return
        except InputClosed:
            return
