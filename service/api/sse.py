"""``GET /v1/sessions/{id}/events``: the session's event log as Server-Sent Events.

A late subscriber gets the whole log, ``Last-Event-ID`` (header, or ``?last_event_id=`` for
clients that cannot set headers) resumes after that id, and the stream ends after ``end``.
sse-starlette writes the stream, pings idle connections and times out a reader that stops
reading; the resume logic is ours because sse-starlette has none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from service.api.sessions import registry_of
from service.errors import ErrorCode, StoreUnavailable, StreamerError
from service.events.encode import to_json
from service.events.log import EventLog
from service.events.types import Error

RETRY_MS = 1000


def resume_after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise StreamerError(
            ErrorCode.INVALID_MESSAGE,
            f"Last-Event-ID must be an event id from this stream, got {raw!r}",
        ) from None
    return max(0, value)


async def stream_events(request: Request) -> Response:
    registry = registry_of(request)
    log = await registry.events(request.path_params["session_id"])
    after = resume_after(request)
    settings = registry.runtime.settings
    events = registry.runtime.observer.subscriber(_events(log, after))
    return EventSourceResponse(
        events,
        ping=settings.sse_ping_seconds,
        # A reader that stops reading is dropped after this; the log never waits for it.
        send_timeout=settings.sse_send_timeout_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        shutdown_event=request.app.state.shutdown_event,
        shutdown_grace_period=settings.shutdown_grace_seconds,
    )


async def _events(log: EventLog, after: int) -> AsyncIterator[bytes]:
    first = True
    try:
        async for event in log.follow(after):
            yield sse_frame(to_json(event.data), event.type, event.id, RETRY_MS if first else None)
            first = False
    except StoreUnavailable as exc:
        # The shared store failed (after bounded retries): say so and close rather than hang.
        # No id: it is not an event of the log, so a client that reconnects with its
        # Last-Event-ID resumes exactly where it was once the store is back.
        yield sse_frame(to_json(Error(exc.code.value, exc.message).to_dict()), "error")


def sse_frame(
    data: str, event: str, event_id: int | None = None, retry_ms: int | None = None
) -> bytes:
    """One event, byte for byte as sse-starlette's ``ServerSentEvent(..., sep="\\n")`` writes
    it (LF reads cleanly in ``curl -N``; CRLF and LF are both valid SSE), in ~0.2 us rather
    than ~5 (an object, then a regex per field), once per event per subscriber. ``data`` is
    compact JSON, so it holds no CR or LF (``json.dumps`` escapes them) and is one line."""
    head = "" if event_id is None else f"id: {event_id}\n"
    tail = "" if retry_ms is None else f"retry: {retry_ms}\n"
    return f"{head}event: {event}\ndata: {data}\n{tail}\n".encode()
