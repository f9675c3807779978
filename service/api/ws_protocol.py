"""The WebSocket protocol without I/O: one client message in, one typed command out.

Two dialects share it. The seed's routes (``/api/v1/segmented``, ``/api/v1/simple``) speak the
Rust streamer-template's protocol exactly: a start message declaring raw PCM, binary PCM frames,
a stop message. ``/v1/ws`` extends it with containers (``format`` omitted or ``"auto"``), the
whole session config, and Deepgram's control messages (``KeepAlive``, ``Finalize``,
``CloseStream``). Every failure is a :class:`StreamerError` with a stable code, never a silently
dropped message as in the seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.config import Mode, PcmFormat, SessionConfig, parse_session_config
from service.errors import ErrorCode, StreamerError

# What the seed's own events are; on its routes nothing else is sent (no `started`, no `end`).
SEED_EVENT_TYPES = frozenset({"segment", "active", "inactive", "error"})
_SEED_START_FIELDS = frozenset({"request", "format", "interim_results", "trace_id"})
_STOP_FIELDS = frozenset({"request", "disconnect"})
_RESUME_FIELDS = frozenset({"request", "id", "offset", "last_event_id"})
CONTROL_TYPES = ("KeepAlive", "Finalize", "CloseStream")


@dataclass(frozen=True, slots=True)
class Dialect:
    """What a route speaks. ``mode`` is forced by the seed's routes (``None``: the config says);
    ``extended`` is ``/v1/ws``: containers, full config, control messages, ``started``/``end``."""

    path: str
    mode: Mode | None
    extended: bool

    def forwards(self, event_type: str) -> bool:
        return self.extended or event_type in SEED_EVENT_TYPES


SEED_SEGMENTED = Dialect("/api/v1/segmented", "segmented", extended=False)
SEED_SIMPLE = Dialect("/api/v1/simple", "simple", extended=False)
V1 = Dialect("/v1/ws", None, extended=True)


@dataclass(frozen=True, slots=True)
class Start:
    """Flush the current session (if any) and start a new one with this config."""

    config: SessionConfig


@dataclass(frozen=True, slots=True)
class Resume:
    """``/v1/ws`` only: continue a resumable session whose upload was cut, at byte ``offset``
    of its audio (the bytes received); its events follow from after ``last_event_id``."""

    session_id: str
    offset: int
    last_event_id: int = 0


@dataclass(frozen=True, slots=True)
class Stop:
    """Flush the current session; with ``disconnect``, close after its results are sent.
    Without, audio that follows starts a new session with the same config (as the seed does)."""

    disconnect: bool


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Nothing to do but reset the idle timeout."""


@dataclass(frozen=True, slots=True)
class Finalize:
    """Flush: deliver every result of the audio so far; the next audio starts a new session."""


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Deepgram's name for a stop with disconnect."""


Command = Start | Resume | Stop | KeepAlive | Finalize | CloseStream


def _invalid(message: str) -> StreamerError:
    return StreamerError(ErrorCode.INVALID_MESSAGE, message)


def parse_text(text: str, dialect: Dialect, *, limit: int = 64 * 1024) -> Command:
    """Parse one text frame. Raises :class:`StreamerError` (the connection decides whether the
    code is fatal; see ``service/api/websocket.py``)."""
    if len(text) > limit:
        raise StreamerError(ErrorCode.CONFIG_TOO_LARGE, f"text message exceeds {limit} bytes")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StreamerError(ErrorCode.INVALID_JSON, f"message is not valid JSON: {exc}") from None
    return parse_message(obj, dialect)


def parse_message(obj: Any, dialect: Dialect) -> Command:
    if not isinstance(obj, Mapping):
        raise _invalid("a text message must be a JSON object")
    if "request" in obj:
        request = obj["request"]
        if request == "start":
            return Start(parse_start(obj, dialect))
        if request == "stop":
            return _parse_stop(obj)
        if request == "resume" and dialect.extended:
            return _parse_resume(obj)
        requests = '"start", "stop" or "resume"' if dialect.extended else '"start" or "stop"'
        raise _invalid(f'"request" must be {requests}, got {request!r}')
    # KeepAlive is harmless on the seed's routes too, and lets a seed-era client that pauses
    # longer than the idle timeout keep its connection.
    if "type" in obj and (dialect.extended or obj["type"] == "KeepAlive"):
        return _parse_control(obj)
    expected = (
        '{"request": "start"|"stop", ...} or {"type": "KeepAlive"|"Finalize"|"CloseStream"}'
        if dialect.extended
        else '{"request": "start"|"stop", ...}'
    )
    raise _invalid(f"unknown message; expected {expected}")


def parse_start(obj: Mapping[str, Any], dialect: Dialect) -> SessionConfig:
    extra = frozenset({"request"})
    if dialect.extended:
        return parse_session_config(obj, extra_allowed=extra)
    # The seed's start message: raw PCM only, and the route decides the mode.
    unknown = sorted(set(obj) - _SEED_START_FIELDS)
    if unknown:
        raise StreamerError(
            ErrorCode.UNKNOWN_FIELD,
            f"unknown field{'s' if len(unknown) > 1 else ''} in start: {', '.join(unknown)} "
            f"(this route takes format, interim_results, trace_id; /v1/ws takes the whole config)",
        )
    if not isinstance(obj.get("format"), Mapping):
        raise StreamerError(
            ErrorCode.INVALID_CONFIG,
            "start.format is required on this route: "
            '{"channels", "sample_rate", "bit_depth", "is_float"} (containers: use /v1/ws)',
        )
    assert dialect.mode is not None
    return parse_session_config({**obj, "mode": dialect.mode}, extra_allowed=extra)


def _parse_stop(obj: Mapping[str, Any]) -> Stop:
    unknown = sorted(set(obj) - _STOP_FIELDS)
    if unknown:
        raise StreamerError(ErrorCode.UNKNOWN_FIELD, f"unknown field in stop: {', '.join(unknown)}")
    # The seed requires the flag; a missing one reads as the gentler "keep the connection".
    disconnect = obj.get("disconnect", False)
    if not isinstance(disconnect, bool):
        raise _invalid("stop.disconnect must be true or false")
    return Stop(disconnect)


def _parse_resume(obj: Mapping[str, Any]) -> Resume:
    unknown = sorted(set(obj) - _RESUME_FIELDS)
    if unknown:
        raise StreamerError(
            ErrorCode.UNKNOWN_FIELD, f"unknown field in resume: {', '.join(unknown)}"
        )
    session_id = obj.get("id")
    if not isinstance(session_id, str):
        raise _invalid("resume.id must be the session id (a string)")
    numbers = []
    for key, required in (("offset", True), ("last_event_id", False)):
        value = obj.get(key, None if required else 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _invalid(f"resume.{key} must be a non-negative integer")
        numbers.append(value)
    return Resume(session_id, numbers[0], numbers[1])


def _parse_control(obj: Mapping[str, Any]) -> Command:
    kind = obj["type"]
    if set(obj) != {"type"}:
        extra = ", ".join(sorted(set(obj) - {"type"}))
        raise StreamerError(ErrorCode.UNKNOWN_FIELD, f"unknown field in {kind}: {extra}")
    if kind == "KeepAlive":
        return KeepAlive()
    if kind == "Finalize":
        return Finalize()
    if kind == "CloseStream":
        return CloseStream()
    raise _invalid(f'"type" must be one of {", ".join(CONTROL_TYPES)}, got {kind!r}')


def partial_sample_error(size: int, fmt: PcmFormat | None) -> StreamerError | None:
    """Raw PCM frames must hold whole sample frames (every channel's sample), or the channels of
    everything after would be shifted. Containers are byte streams: any split is fine."""
    if fmt is None or size % fmt.frame_bytes == 0:
        return None
    return StreamerError(
        ErrorCode.PARTIAL_SAMPLE,
        f"a binary frame of {size} bytes is not a whole number of {fmt.frame_bytes}-byte sample "
        f"frames ({fmt.channels} channel(s) x {fmt.sample_bytes} bytes); the frame was dropped",
    )
