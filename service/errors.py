"""Typed errors with stable machine codes.

Every failure a client can see is a :class:`StreamerError`: the ``code`` is part of the API
contract (clients switch on it), the ``message`` is for humans, ``status`` is the HTTP status used
when the error can still be the response, and ``ws_close`` the WebSocket close code (RFC 6455).
Once a response has started, errors travel as ``error`` events instead.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # request / config
    INVALID_JSON = "invalid_json"
    INVALID_CONFIG = "invalid_config"
    UNKNOWN_FIELD = "unknown_field"
    CONFIG_TOO_LARGE = "config_too_large"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_BUSY = "session_busy"
    SESSION_ENDED = "session_ended"
    # resumable uploads: the Upload-Offset sent is not the number of bytes received; another
    # worker runs the session (retry: a new connection may reach it)
    OFFSET_MISMATCH = "offset_mismatch"
    SESSION_ELSEWHERE = "session_elsewhere"
    NOT_RESUMABLE = "not_resumable"
    TOO_MANY_SESSIONS = "too_many_sessions"
    SERVER_OVERLOADED = "server_overloaded"
    SHUTTING_DOWN = "shutting_down"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # audio
    EMPTY_AUDIO = "empty_audio"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECODE_FAILED = "decode_failed"
    PARTIAL_SAMPLE = "partial_sample"
    NO_AUDIO_STREAM = "no_audio_stream"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # protocol (WebSocket)
    INVALID_MESSAGE = "invalid_message"
    AUDIO_BEFORE_START = "audio_before_start"
    # limits
    IDLE_TIMEOUT = "idle_timeout"
    DURATION_EXCEEDED = "duration_exceeded"
    # model
    MODEL_FAILED = "model_failed"
    MODEL_PANIC = "model_panic"
    # the model is behind and its queue is full: an utterance was not run (its times say which)
    MODEL_OVERLOADED = "model_overloaded"
    INTERNAL = "internal_error"
    # the shared session store (Redis) cannot be reached, or lost the session's state
    STORE_UNAVAILABLE = "store_unavailable"


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_CONFIG: 422,
    ErrorCode.UNKNOWN_FIELD: 422,
    ErrorCode.CONFIG_TOO_LARGE: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.SESSION_BUSY: 409,
    ErrorCode.SESSION_ENDED: 409,
    ErrorCode.OFFSET_MISMATCH: 409,
    ErrorCode.SESSION_ELSEWHERE: 421,  # RFC 9110 15.5.20 Misdirected Request
    ErrorCode.NOT_RESUMABLE: 409,
    ErrorCode.TOO_MANY_SESSIONS: 503,
    ErrorCode.SERVER_OVERLOADED: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.EMPTY_AUDIO: 400,
    ErrorCode.UNSUPPORTED_FORMAT: 415,
    ErrorCode.DECODE_FAILED: 422,
    ErrorCode.PARTIAL_SAMPLE: 422,
    ErrorCode.NO_AUDIO_STREAM: 415,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.AUDIO_BEFORE_START: 400,
    ErrorCode.IDLE_TIMEOUT: 408,
    ErrorCode.DURATION_EXCEEDED: 413,
    ErrorCode.MODEL_FAILED: 500,
    ErrorCode.MODEL_PANIC: 500,
    ErrorCode.MODEL_OVERLOADED: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.STORE_UNAVAILABLE: 503,
}

# RFC 6455 section 7.4.1: 1003 data it cannot accept, 1007 inconsistent data, 1008 policy,
# 1009 too big, 1011 server error, 1013 try again later.
_WS_CLOSE: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 1007,
    ErrorCode.INVALID_CONFIG: 1007,
    ErrorCode.UNKNOWN_FIELD: 1007,
    ErrorCode.CONFIG_TOO_LARGE: 1009,
    ErrorCode.UNAUTHORIZED: 1008,
    ErrorCode.TOO_MANY_SESSIONS: 1013,
    ErrorCode.SERVER_OVERLOADED: 1013,
    ErrorCode.SHUTTING_DOWN: 1001,
    ErrorCode.UNSUPPORTED_FORMAT: 1003,
    ErrorCode.NO_AUDIO_STREAM: 1003,
    ErrorCode.DECODE_FAILED: 1007,
    ErrorCode.PARTIAL_SAMPLE: 1007,
    ErrorCode.PAYLOAD_TOO_LARGE: 1009,
    ErrorCode.DURATION_EXCEEDED: 1009,
    ErrorCode.IDLE_TIMEOUT: 1008,
    ErrorCode.INTERNAL: 1011,
    ErrorCode.STORE_UNAVAILABLE: 1013,
    ErrorCode.SESSION_ELSEWHERE: 1013,
}


class StreamerError(Exception):
    """An error a client is told about, with a stable code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Answer with ``Connection: close`` (HTTP/1.1): the request's body was not read.
        self.close_connection = False

    @property
    def status(self) -> int:
        return _STATUS.get(self.code, 400)

    @property
    def ws_close(self) -> int:
        return _WS_CLOSE.get(self.code, 1008)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}

    def __repr__(self) -> str:
        return f"StreamerError({self.code.value!r}, {self.message!r})"


class StoreUnavailable(StreamerError):
    """The shared session store (Redis) failed: unreachable after bounded retries, or it no
    longer holds the session (restarted without persistence, or the lease was lost). A
    transient condition for the client: 503 with ``Retry-After``."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.STORE_UNAVAILABLE, message)


class OffsetMismatch(StreamerError):
    """A resumed upload that does not start where the received bytes end (tus's 409): it says
    where to continue, as the ``Upload-Offset`` header and the error body's ``offset``."""

    def __init__(self, offset: int, sent: int) -> None:
        super().__init__(
            ErrorCode.OFFSET_MISMATCH,
            f"Upload-Offset {sent} is not the {offset} bytes received; continue at {offset}",
        )
        self.offset = offset
