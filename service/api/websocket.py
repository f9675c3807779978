"""WebSocket ingest and output: ``/v1/ws`` and the seed's ``/api/v1/segmented`` and
``/api/v1/simple`` (protocol: ``ws_protocol.py``; for users: ``docs/websocket.md``).

One connection is one task group: the receiver turns client messages into commands and feeds the
current session; the sender follows the connection's sessions' event logs, in order, and writes
them out. Sessions are the HTTP ones (same registry, pipeline, limits and log), so the log sits
between receiver and sender: a slow reader never stalls receiving or the pipeline, and the
results of every byte received outlive a client that leaves (readable on SSE by session id).

How a connection ends:
- the client closes or vanishes: the current session's input ends (``client_disconnected``), its
  pipeline drains into the log; nothing more can be sent. A resumable session instead waits for
  a ``resume`` (here or over HTTP) for the grace period.
- stop with ``disconnect`` / ``CloseStream``: the input ends, every result is sent, close 1000.
- a fatal error (unsupported format, capacity, a session that failed decoding, idle timeout,
  shutdown): an ``error`` event, the results so far, then the error's close code.
- the client stops reading (a send blocked past the send timeout): dropped like a client that
  left; a close 1008 ``not_reading`` is queued for it, and what it still sends is discarded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.api.ws_protocol import (
    SEED_SEGMENTED,
    SEED_SIMPLE,
    V1,
    CloseStream,
    Command,
    Dialect,
    Finalize,
    KeepAlive,
    Resume,
    Start,
    Stop,
    parse_text,
    partial_sample_error,
)
from service.config import SessionConfig, config_to_dict
from service.errors import ErrorCode, OffsetMismatch, StoreUnavailable, StreamerError
from service.events.encode import to_json
from service.events.types import Error
from service.session.registry import Registry
from service.session.session import EndReason, InputClosed, Session, Upload
from service.settings import Settings

log = logging.getLogger(__name__)

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008

# Errors after which the connection cannot usefully go on; every other error is reported and
# the connection stays usable (the client may send a corrected message).
_FATAL = frozenset(
    {
        ErrorCode.UNSUPPORTED_FORMAT,
        ErrorCode.TOO_MANY_SESSIONS,
        ErrorCode.SERVER_OVERLOADED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.SESSION_NOT_FOUND,
        ErrorCode.SESSION_BUSY,
        ErrorCode.SESSION_ENDED,
        ErrorCode.SESSION_ELSEWHERE,
        ErrorCode.NOT_RESUMABLE,
        ErrorCode.IDLE_TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.STORE_UNAVAILABLE,
    }
)
# A session that ends with one of these did not fail: a start or stop with no audio in between.
_HARMLESS_SESSION_ERRORS = frozenset({ErrorCode.EMPTY_AUDIO})
# Bounds what a client that never reads can make us hold besides the logs: one entry per
# session or per error frame. Filling it is a protocol violation (close 1008).
OUTBOX_SIZE = 256
# How long to wait for the client's close frame after ours (RFC 6455 closing handshake).
CLOSE_TIMEOUT_S = 5.0


async def close_dropped(ws: WebSocket, idle_s: float) -> None:
    """After dropping a client that stopped reading: queue a close frame (it gets it if it
    ever reads again), and discard what it still sends until it leaves or stays silent for
    ``idle_s``. Returning at once would leave the server's reader of this socket waiting, with
    the client's next messages, for an application that is gone: the connection would outlive
    the client until the server stops. (``/v1/ws`` and Deepgram's ``/v1/listen`` alike.)"""
    async with anyio.create_task_group() as tg:
        # Blocks while the client does not read; cancelled once it has left.
        tg.start_soon(ws.close, POLICY_VIOLATION, "not_reading")
        while True:
            with anyio.move_on_after(idle_s) as scope:
                message = await ws.receive()
            if scope.cancelled_caught or message["type"] == "websocket.disconnect":
                break
        tg.cancel_scope.cancel()


class ClientSocket:
    """What ``/v1/ws`` and Deepgram's ``/v1/listen`` do alike with their client: send it JSON,
    drop it once it stops reading (like an SSE reader: the logs keep everything for it), and
    stop the connection's task group once nothing can reach it any more."""

    kind = "websocket"  # for the log

    def __init__(self, websocket: WebSocket, settings: Settings) -> None:
        self.ws = websocket
        self.settings = settings
        self.gone = False  # the client left: nothing can be sent any more
        self.dropped = False  # ... because a send to it blocked past the send timeout
        self._tg: TaskGroup | None = None

    def _client_gone(self) -> None:
        """Nothing can reach the client any more; sessions drain into their logs regardless
        (their input is ended where the connection's ``run`` ends)."""
        self.gone = True
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _send(self, data: Mapping[str, Any]) -> None:
        if self.gone:
            return
        with anyio.move_on_after(self.settings.sse_send_timeout_seconds) as scope:
            try:
                await self.ws.send_text(to_json(data))
            except WebSocketDisconnect:
                self._client_gone()
        if scope.cancelled_caught:
            log.warning("%s client stopped reading; dropping the connection", self.kind)
            self.dropped = True
            self._client_gone()

    async def _close_if_dropped(self) -> None:
        if self.dropped:
            await close_dropped(self.ws, self.settings.idle_timeout_seconds)


@dataclass(frozen=True, slots=True)
class _Frame:
    """A message of the connection itself (not from a session log)."""

    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Follow:
    """Send this session's log, to its end (after event ``after``: a resumed session)."""

    session: Session
    after: int = 0
    # This connection's upload into it (a resumable session: followed only while it lasts).
    upload: Upload | None = None


_Outgoing = _Frame | _Follow


def _http_base(websocket: WebSocket) -> str:
    # ws://host -> http://host, wss://host -> https://host
    return str(websocket.base_url).rstrip("/").replace("ws", "http", 1)


class Connection(ClientSocket):
    def __init__(self, websocket: WebSocket, registry: Registry, dialect: Dialect) -> None:
        super().__init__(websocket, registry.runtime.settings)
        self.registry = registry
        self.dialect = dialect
        self.config: SessionConfig | None = None  # from the last start; reused after a flush
        self.current: Session | None = None  # the session taking audio now
        self.upload: Upload | None = None  # this connection's turn at the current session
        self.closing = False
        self._close: tuple[int, str] = (NORMAL_CLOSURE, "")
        self._outbox, self._outbox_out = anyio.create_memory_object_stream[_Outgoing](OUTBOX_SIZE)

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._send_loop)
                tg.start_soon(self._watch_shutdown)
                session_id = self.ws.query_params.get("session")
                if self.dialect.extended and session_id is not None:
                    await self._attach(session_id)
                await self._receive_loop()
        finally:
            # However the connection ends (even cancelled by the server), no session may be
            # left waiting for input that will never come.
            self._flush(EndReason.CLIENT_DISCONNECTED)
        await self._close_if_dropped()

    # -- receiving -----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        idle = self.settings.idle_timeout_seconds
        while True:
            # While closing we only wait for the sender to finish (or the client to leave).
            with anyio.move_on_after(None if self.closing else idle) as scope:
                message = await self.ws.receive()
            if scope.cancelled_caught:
                await self._idle_timeout(idle)
                continue
            if message["type"] == "websocket.disconnect":
                self.dropped = False  # it left: nothing more to wait for
                self._client_gone()
                return
            if self.gone:
                # Dropped by the sender (it stopped reading): take nothing more in. A message
                # already queued is returned without a checkpoint, so the cancellation would
                # come too late: it could open a session the client is never told about.
                return
            if self.closing:
                continue  # nothing the client says now changes what it gets
            data: bytes | None = message.get("bytes")
            if data is not None:
                await self._audio(data)
                continue
            try:
                command = parse_text(
                    message.get("text") or "", self.dialect, limit=self.settings.max_config_bytes
                )
            except StreamerError as exc:
                await self._error(exc)
                continue
            await self._command(command)

    async def _command(self, command: Command) -> None:
        if isinstance(command, Start):
            self._flush()
            self.config = command.config
            if self.dialect.extended:
                await self._open()  # now, so that `started` can name the session
            # The seed's routes open it with the first audio frame: a start that is replaced
            # before any audio leaves no empty session (and no `empty_audio` error) behind.
        elif isinstance(command, Resume):
            self._flush()
            await self._resume(command)
        elif isinstance(command, Stop):
            self._flush()
            if command.disconnect:
                self._begin_close(NORMAL_CLOSURE, "stop")
        elif isinstance(command, Finalize):
            self._flush()
        elif isinstance(command, CloseStream):
            self._begin_close(NORMAL_CLOSURE, "CloseStream")
        else:
            assert isinstance(command, KeepAlive)  # the receive itself reset the idle timer

    async def _audio(self, data: bytes) -> None:
        if self.config is None:
            await self._error(
                StreamerError(
                    ErrorCode.AUDIO_BEFORE_START,
                    'audio before the start message: send {"request": "start", ...} first; '
                    "the frame was dropped",
                )
            )
            return
        if not data:
            return
        partial = partial_sample_error(len(data), self.config.format)
        if partial is not None:
            await self._error(partial)
            return
        if self.current is None:
            # After a stop without disconnect or a Finalize: a fresh session, same config.
            await self._open()
            if self.current is None:
                return
        # InputClosed: the session stopped taking audio by itself (bad data, a limit, DELETE,
        # shutdown). The sender closes the connection once it has delivered its results.
        # A write that waits for room is delivered even if the sender cancels this task
        # meanwhile (dropping a client that stopped reading): Session.write sees to that.
        with contextlib.suppress(InputClosed):
            await self.current.write(data, self.upload)

    async def _open(self) -> None:
        assert self.config is not None
        try:
            session = await self.registry.start(await self.registry.create(self.config))
        except StreamerError as exc:
            await self._error(exc)
            return
        self._adopt(session)

    async def _attach(self, session_id: str) -> None:
        """``/v1/ws?session=ID``: stream into a session created by ``POST /v1/sessions``."""
        try:
            session = await self.registry.start(session_id)
        except StreamerError as exc:
            await self._error(exc)
            return
        self.config = session.config
        self._adopt(session)

    async def _resume(self, command: Resume) -> None:
        """Continue a resumable session whose upload was cut (here or over HTTP). A wrong offset
        is answered with the right one (``offset_mismatch``, not fatal: resume again there)."""
        try:
            session = await self.registry.resume(command.session_id, command.offset)
        except OffsetMismatch as exc:
            frame = Error(exc.code.value, exc.message).to_dict()
            self._enqueue(_Frame({**frame, "offset": exc.offset}))
            return
        except StreamerError as exc:
            await self._error(exc)
            return
        self.config = session.config
        self._adopt(session, resumed=command)

    def _adopt(self, session: Session, resumed: Resume | None = None) -> None:
        if self.closing:
            if resumed is None:
                session.close_input(EndReason.COMPLETED)
            else:
                session.detach_input(session.upload)  # it waits for another resume
            return
        self.current = session
        self.upload = session.upload
        if self.dialect.extended:
            base = _http_base(self.ws)
            started: dict[str, Any] = {
                "type": "started",
                "session_id": session.id,
                "events_url": f"{base}/v1/sessions/{session.id}/events",
                "config": config_to_dict(session.config),
                "channel": None,
            }
            if resumed is not None:
                started |= {"resumed": True, "offset": session.counters.bytes_in}
            self._enqueue(_Frame(started))
        self._enqueue(_Follow(session, resumed.last_event_id if resumed else 0, self.upload))

    def _flush(self, reason: EndReason = EndReason.COMPLETED) -> None:
        """End the current session's input: its pipeline drains every byte into its log. A
        client gone leaves a resumable session waiting for a resume instead."""
        if self.current is not None:
            if reason is EndReason.CLIENT_DISCONNECTED:
                self.current.detach_input(self.upload)
            else:
                self.current.close_input(reason)
            self.current = None
            self.upload = None

    async def _error(self, error: StreamerError) -> None:
        await self._report(error)
        if error.code in _FATAL:
            self._begin_close(error.ws_close, error.code.value)

    async def _report(self, error: StreamerError) -> None:
        # Into the running session's log when there is one, so it arrives in order with that
        # session's events (and stays readable on SSE); otherwise as a frame of its own.
        session = self.current
        if session is not None and not session.log.closed:
            await session.emit(Error(error.code.value, error.message))
        else:
            self._enqueue(_Frame(Error(error.code.value, error.message).to_dict()))

    async def _idle_timeout(self, idle: float) -> None:
        error = StreamerError(
            ErrorCode.IDLE_TIMEOUT,
            f"nothing received for {idle:g} s (send KeepAlive to hold an idle connection open)",
        )
        if self.current is not None and self.current.config.resumable:
            # Silent as if cut: the session waits for a resume; the error is the connection's.
            self._flush(EndReason.CLIENT_DISCONNECTED)
            self._enqueue(_Frame(Error(error.code.value, error.message).to_dict()))
        elif self.current is not None:
            await self.current.fail_input(error, EndReason.IDLE_TIMEOUT)
        else:
            await self._report(error)
        self._begin_close(error.ws_close, error.code.value)

    async def _watch_shutdown(self) -> None:
        await self.ws.app.state.shutdown_event.wait()
        self._begin_close(GOING_AWAY, ErrorCode.SHUTTING_DOWN.value)

    # -- closing -------------------------------------------------------------------------------

    def _begin_close(self, code: int, reason: str) -> None:
        """Take no more input; the sender sends everything queued, then closes with ``code``."""
        if self.closing:
            # An error found while draining outranks the normal close the client asked for.
            if self._close[0] == NORMAL_CLOSURE and code != NORMAL_CLOSURE:
                self._close = (code, reason)
            return
        self.closing = True
        self._close = (code, reason)
        self._flush()
        self._outbox.close()

    def _enqueue(self, item: _Outgoing) -> None:
        if self.closing:
            return
        try:
            self._outbox.send_nowait(item)
        except anyio.WouldBlock:
            log.warning("websocket client does not read its messages; closing")
            self._begin_close(POLICY_VIOLATION, "not_reading")

    # -- sending -------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        async with self._outbox_out:
            async for item in self._outbox_out:
                if isinstance(item, _Frame):
                    await self._send(item.data)
                    continue
                try:
                    if await self._follow(item):
                        continue  # it goes on without this connection: nothing ended
                except StoreUnavailable as exc:
                    # The shared store failed (bounded retries): say so, close with 1013.
                    await self._send(Error(exc.code.value, exc.message).to_dict())
                    self._begin_close(exc.ws_close, exc.code.value)
                self._session_ended(item.session)
        code, reason = self._close
        if not self.gone:
            await self.ws.close(code, reason)
            log.info("websocket closed", extra={"code": code, "reason": reason})
            # The closing handshake: returning now would make hypercorn drop the TCP connection
            # at once, and a client still sending would get a reset instead of our close frame.
            # The receiver ends the connection when the client's close arrives.
            await anyio.sleep(CLOSE_TIMEOUT_S)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _follow(self, item: _Follow) -> bool:
        """Send the session's log to its end. A resumable session is followed only while this
        connection feeds it: once cut here (idle) or resumed elsewhere, its results go to the
        upload that continues it; returns True then."""
        session, upload = item.session, item.upload
        left = False
        async with anyio.create_task_group() as tg:

            async def stop_when_left() -> None:
                nonlocal left
                assert upload is not None
                await upload.stopped.wait()
                if session.awaiting_resume or session.upload is not upload:
                    left = True
                    tg.cancel_scope.cancel()

            if upload is not None and session.config.resumable:
                tg.start_soon(stop_when_left)
            async for event in session.log.follow(item.after):
                if self.dialect.forwards(event.type):
                    await self._send(event.data)
            tg.cancel_scope.cancel()
        if left and session is self.current:
            # Resumed on another connection while this one still fed it.
            self.current, self.upload = None, None
            error = StreamerError(
                ErrorCode.SESSION_BUSY, "another connection resumed this session; closing"
            )
            await self._send(Error(error.code.value, error.message).to_dict())
            self._begin_close(POLICY_VIOLATION, "superseded")
        return left

    def _session_ended(self, session: Session) -> None:
        error = session.error
        if error is not None and error.code not in _HARMLESS_SESSION_ERRORS:
            # Undecodable audio, a limit, an internal failure: its error event is sent; the
            # stream it belonged to cannot go on.
            self._begin_close(error.ws_close, error.code.value)
        elif session is self.current:
            # It ended without being flushed by us: cancelled (DELETE) or the server stops.
            self.current = None
            shutdown = session.end_reason is EndReason.SHUTDOWN
            reason = session.end_reason.value if session.end_reason else ""
            self._begin_close(GOING_AWAY if shutdown else NORMAL_CLOSURE, reason)


def endpoint(dialect: Dialect) -> Callable[[WebSocket], Awaitable[None]]:
    async def serve(websocket: WebSocket) -> None:
        await websocket.accept()
        registry: Registry = websocket.app.state.registry
        await Connection(websocket, registry, dialect).run()

    serve.__name__ = f"websocket_{dialect.path.rsplit('/', 1)[-1]}"
    return serve


v1_ws = endpoint(V1)
seed_segmented = endpoint(SEED_SEGMENTED)
seed_simple = endpoint(SEED_SIMPLE)
