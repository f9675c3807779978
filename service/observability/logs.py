"""Structured logs: one JSON object per line, each with the session id and trace id.

``python -m service`` calls :func:`configure_logging` with ``STREAMER_LOG_LEVEL`` and
``STREAMER_LOG_FORMAT`` (``json``, the default, or ``text`` for people reading a terminal).

The ids come from context, not from every call site: :class:`LogContextObserver` sets the
session id for each pipeline stage's task (threads started from there inherit it, as anyio
copies the context into worker threads), and the trace id is the current OpenTelemetry span's
(the request's server span, a stage's span, a model call's span). An ``extra={"session_id": ...}``
given at the call site wins.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any

from opentelemetry import trace

from service.session.observer import SessionObserver

if TYPE_CHECKING:
    from service.session.session import Session

session_id_var: ContextVar[str | None] = ContextVar("streamer_session_id", default=None)
# The session's trace id when no span is current (tracing disabled, or outside any span).
trace_id_var: ContextVar[str | None] = ContextVar("streamer_trace_id", default=None)

FORMATS = ("json", "text")

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "session_id",
    "trace_id",
    "span_id",
    "taskName",
}


class ContextFilter(logging.Filter):
    """Puts ``session_id``, ``trace_id`` and ``span_id`` on every record (None when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = session_id_var.get()
        span = trace.get_current_span().get_span_context()
        current = trace.format_trace_id(span.trace_id) if span.is_valid else None
        trace_id = getattr(record, "trace_id", None)
        if trace_id is None:
            trace_id = record.trace_id = current or trace_id_var.get()
        if getattr(record, "span_id", None) is None:
            # Only a span of the record's own trace (a call site may name another trace).
            same = span.is_valid and trace_id == current
            record.span_id = trace.format_span_id(span.span_id) if same else None
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "session_id", "trace_id", "span_id", ...extras}``;
    exceptions as one ``exception`` string, so a record is always one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": getattr(record, "session_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{k}={v}"
            for k in ("session_id", "trace_id")
            if (v := getattr(record, k, None)) is not None
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def _timestamp(created: float) -> str:
    # RFC 3339 in UTC with milliseconds: sortable, and what log pipelines parse without help.
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def configure_logging(level: str, fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one that writes ``fmt`` lines to ``stream``
    (stderr by default)."""
    if fmt not in FORMATS:
        raise ValueError(f"STREAMER_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


class LogContextObserver(SessionObserver):
    """Sets the log context for each stage of a session, and logs a line when one ends."""

    def __init__(self, trace_id: Callable[[Session], str | None] | None = None) -> None:
        self._trace_id = trace_id or _config_trace_id
        self.log = logging.getLogger("service.session")

    def stage(self, session: Session, name: str) -> AbstractContextManager[Any]:
        return self._stage(session)

    @contextmanager
    def _stage(self, session: Session) -> Iterator[None]:
        s_token = session_id_var.set(session.id)
        t_token = trace_id_var.set(self._trace_id(session))
        try:
            yield
        finally:
            trace_id_var.reset(t_token)
            session_id_var.reset(s_token)

    def session_ended(self, session: Session) -> None:
        summary = session.summary()
        began = session.started_at if session.started_at is not None else session.created_at
        self.log.info(
            "session ended",
            extra={
                "session_id": session.id,
                "trace_id": self._trace_id(session),
                "reason": session.end_reason.value if session.end_reason else None,
                "error_code": session.error.code.value if session.error else None,
                "duration_s": round((session.ended_at or time.time()) - began, 3),
                "audio_seconds": summary["audio_seconds"],
                "bytes": summary["bytes"],
                "segments": summary["segments"],
                "errors": summary["errors"],
            },
        )


def _config_trace_id(session: Session) -> str | None:
    """The trace id of the session's ``trace_id`` config (a traceparent), without tracing."""
    parts = (session.config.trace_id or "").strip().split("-")
    if len(parts) >= 3 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1].lower()
    return None
