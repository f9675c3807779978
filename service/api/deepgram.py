"""Deepgram's live endpoint, ``/v1/listen``: a transport over an ordinary session.

The query parameters become the session config (``deepgram_params.py``); binary frames are the
session's audio (raw encodings converted by ``deepgram_audio.py``, containers sniffed); the
session's events, followed in its log, go out as Deepgram's messages
(``deepgram_messages.py``). The session is created through the registry like any other, so
it has the same limits, metrics and traces, and is readable on SSE by its id, which is the
``request_id`` of every message. For users: ``docs/deepgram.md``.

How a connection ends:
- ``CloseStream`` (or an empty binary frame, Deepgram's older way): the input ends, every
  result is sent, then ``Metadata``, then close 1000.
- the session fails (audio that does not decode, a limit, no audio for the idle timeout): an
  ``Error`` message, the results so far, ``Metadata``, then Deepgram's close code (1008
  ``DATA-0000`` for bad audio, 1011 ``NET-0001`` for the idle timeout).
- the client closes or vanishes: the session's input ends (``client_disconnected``) and its
  results stay readable on SSE.
- the server shuts down: the session drains, ``Metadata``, close 1001.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from service.api.deepgram_audio import RawConverter
from service.api.deepgram_messages import Translator
from service.api.deepgram_params import ListenOptions, parse_listen_params
from service.api.websocket import CLOSE_TIMEOUT_S, ClientSocket
from service.errors import ErrorCode, StoreUnavailable, StreamerError
from service.events.types import Error
from service.session.registry import Registry
from service.session.session import EndReason, InputClosed, Session
from service.settings import Settings

log = logging.getLogger(__name__)

LISTEN_PATH = "/v1/listen"
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
# A close frame's reason is at most 123 bytes.
MAX_REASON_BYTES = 123
# Audio the decoder cannot take: Deepgram closes with 1008 and DATA-0000.
_BAD_AUDIO = frozenset(
    {
        ErrorCode.DECODE_FAILED,
        ErrorCode.UNSUPPORTED_FORMAT,
        ErrorCode.NO_AUDIO_STREAM,
        ErrorCode.PARTIAL_SAMPLE,
    }
)
# Refusals of a new stream that the client should retry later: Deepgram answers 429.
_TRY_LATER = frozenset({ErrorCode.TOO_MANY_SESSIONS, ErrorCode.SERVER_OVERLOADED})


def _version() -> str:
    try:
        return importlib.metadata.version("streamer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _reason(text: str) -> str:
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


def close_for(error: StreamerError | None, reason: EndReason | None) -> tuple[int, str]:
    """The close code and reason for a session that ended so, as Deepgram would close."""
    if error is None or error.code is ErrorCode.EMPTY_AUDIO:
        if reason is EndReason.SHUTDOWN:
            return GOING_AWAY, "shutdown"
        return NORMAL_CLOSURE, ""
    if error.code in _BAD_AUDIO:
        return POLICY_VIOLATION, _reason(f"DATA-0000: {error.message}")
    if error.code is ErrorCode.IDLE_TIMEOUT:
        return INTERNAL_ERROR, _reason(f"NET-0001: {error.message}")
    return error.ws_close, _reason(error.code.value)


async def _refuse(websocket: WebSocket, error: StreamerError) -> None:
    """Refuse the handshake with an HTTP status, as Deepgram does (its clients report the
    status); a server without the WebSocket denial extension closes before accepting (403)."""
    if error.code in _TRY_LATER:
        status = 429
    elif error.status >= 500:
        status = error.status
    else:
        status = 400
    if "websocket.http.response" not in websocket.scope.get("extensions", {}):
        await websocket.close(error.ws_close, _reason(error.code.value))
        return
    body = {"err_code": error.code.value, "err_msg": error.message}
    headers = {"dg-error": _reason(error.message)}
    if status in (429, 503):
        headers["retry-after"] = "1"
    await websocket.send_denial_response(JSONResponse(body, status, headers=headers))


def _is_channel(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Listener(ClientSocket):
    """One ``/v1/listen`` connection: a receiver feeding the session and a sender following its
    log, in one task group."""

    kind = "deepgram"

    def __init__(
        self, websocket: WebSocket, session: Session, options: ListenOptions, settings: Settings
    ) -> None:
        super().__init__(websocket, settings)
        self.session = session
        self.options = options
        self.translator = Translator(session.id, options, settings.model, _version())
        self.converter = RawConverter(options.raw) if options.raw is not None else None
        self.created = datetime.now(UTC)
        self._sha256 = hashlib.sha256()
        self.closing = False  # the input has ended: what the client sends now is ignored

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._send_loop)
                await self._receive_loop()
        finally:
            # However the connection ends, the session may not wait for input that will never
            # come; after CloseStream this changes nothing.
            self.session.close_input(EndReason.CLIENT_DISCONNECTED)
        await self._close_if_dropped()

    @property
    def channels(self) -> int:
        """``channel_index[1]``: what the client declared (one after a mixdown), else what the
        decoder found."""
        raw = self.options.raw
        if raw is not None:
            return 1 if raw.mixdown else raw.channels
        return max(self.session.counters.channels, 1)

    # -- receiving -----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        idle = self.settings.idle_timeout_seconds
        while True:
            with anyio.move_on_after(None if self.closing else idle) as scope:
                message = await self.ws.receive()
            if scope.cancelled_caught:
                self.closing = True
                await self.session.fail_input(
                    StreamerError(
                        ErrorCode.IDLE_TIMEOUT,
                        f"no audio or message received for {idle:g} s (send KeepAlive to hold "
                        "an idle stream open)",
                    ),
                    EndReason.IDLE_TIMEOUT,
                )
                continue
            if message["type"] == "websocket.disconnect":
                self.dropped = False  # it left: nothing more to wait for
                self._client_gone()
                return
            if self.gone:
                return  # dropped by the sender: take nothing more in
            if self.closing:
                continue
            data: bytes | None = message.get("bytes")
            if data is not None:
                if data:
                    await self._audio(data)
                else:
                    self._close_stream()  # an empty frame: Deepgram's older CloseStream
                continue
            await self._text(message.get("text") or "")

    async def _audio(self, data: bytes) -> None:
        self._sha256.update(data)
        if self.converter is not None:
            try:
                data = self.converter.convert(data)
            except StreamerError as exc:
                await self.session.emit(Error(exc.code.value, exc.message))
                return
        # InputClosed: the session stopped taking audio by itself (bad data, a limit, DELETE,
        # shutdown); the sender closes the connection once its results are out.
        with contextlib.suppress(InputClosed):
            await self.session.write(data)

    async def _text(self, text: str) -> None:
        try:
            message = json.loads(text) if len(text) <= self.settings.max_config_bytes else None
        except json.JSONDecodeError:
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "KeepAlive":
            return  # the receive itself reset the idle timer
        channel = message.get("channel") if isinstance(message, dict) else None
        if kind == "Finalize" and (channel is None or _is_channel(channel)):
            self.session.finalize(self.translator.finalized, channel)
            return
        if kind == "CloseStream":
            self._close_stream()
            return
        await self.session.emit(
            Error(
                ErrorCode.INVALID_MESSAGE.value,
                'a text message must be {"type": "KeepAlive" | "Finalize" | "CloseStream"} '
                '(Finalize may name a "channel": 0, 1, ...); '
                f"got {text[:200]!r}",
            )
        )

    def _close_stream(self) -> None:
        self.closing = True
        self.session.close_input(EndReason.COMPLETED)

    # -- sending -------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        try:
            async for event in self.session.log.follow():
                data = event.data
                if event.type == "end":
                    digest = self._sha256.hexdigest()
                    await self._send(
                        self.translator.metadata(data, digest, self.created, self.channels)
                    )
                    break
                if event.type == "error" and data.get("code") == ErrorCode.EMPTY_AUDIO.value:
                    continue  # a stream closed before any audio: Deepgram sees no error there
                for message in self.translator.translate(data, self.channels):
                    await self._send(message)
            code, reason = close_for(self.session.error, self.session.end_reason)
        except StoreUnavailable as exc:
            await self._send(Error(exc.code.value, exc.message).to_dict())
            code, reason = exc.ws_close, exc.code.value
        if not self.gone:
            await self.ws.close(code, reason)
            log.info("deepgram stream closed", extra={"code": code, "reason": reason})
            # The closing handshake: the receiver ends the connection when the client's close
            # arrives (returning now would drop the TCP connection under a client still sending).
            await anyio.sleep(CLOSE_TIMEOUT_S)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()


async def listen(websocket: WebSocket) -> None:
    registry: Registry = websocket.app.state.registry
    try:
        options = parse_listen_params(websocket.query_params)
        session = await registry.start(await registry.create(options.config))
    except StreamerError as exc:
        await _refuse(websocket, exc)
        return
    listener = Listener(websocket, session, options, registry.runtime.settings)
    try:
        # Browsers authenticate with the subprotocols ["token", KEY]; the server must then
        # choose "token" (security.py checked the key).
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="token" if offered[:1] == ["token"] else None)
    except BaseException:
        session.close_input(EndReason.CLIENT_DISCONNECTED)
        raise
    await listener.run()
