"""Structured log lines: one JSON object per record, with the session id and trace id taken from
context (the stage's task, the current span) unless the call site names them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from service.observability.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    session_id_var,
    trace_id_var,
)


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.observability.json")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, buf
    log.removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_ids_come_from_context(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, buf = logger
    tracer = TracerProvider().get_tracer("test")
    token = session_id_var.set("S1")
    try:
        with tracer.start_as_current_span("stage") as span:
            log.info("decoded %d samples", 512, extra={"channel": 1})
    finally:
        session_id_var.reset(token)
    log.warning("outside")
    inside, outside = lines(buf)
    ctx = span.get_span_context()
    assert inside["message"] == "decoded 512 samples"
    assert (inside["level"], inside["logger"]) == ("INFO", "tests.observability.json")
    assert inside["session_id"] == "S1"
    assert inside["trace_id"] == trace.format_trace_id(ctx.trace_id)
    assert inside["span_id"] == trace.format_span_id(ctx.span_id)
    assert inside["channel"] == 1
    assert str(inside["ts"]).endswith("Z")
    assert (outside["session_id"], outside["trace_id"], outside["span_id"]) == (None, None, None)


def test_call_site_ids_win_and_a_foreign_span_is_not_named(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, buf = logger
    tracer = TracerProvider().get_tracer("test")
    token = session_id_var.set("from-context")
    try:
        with tracer.start_as_current_span("request"):
            log.info("ended", extra={"session_id": "S2", "trace_id": "ab" * 16})
    finally:
        session_id_var.reset(token)
    (record,) = lines(buf)
    assert (record["session_id"], record["trace_id"], record["span_id"]) == ("S2", "ab" * 16, None)


def test_trace_id_without_a_span_comes_from_the_session(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, buf = logger
    token = trace_id_var.set("cd" * 16)
    try:
        log.info("no tracing")
    finally:
        trace_id_var.reset(token)
    assert lines(buf)[0]["trace_id"] == "cd" * 16


def test_an_exception_stays_on_one_line(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, buf = logger
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("failed")
    assert len(buf.getvalue().splitlines()) == 1
    (record,) = lines(buf)
    assert "ValueError: bad" in str(record["exception"])


def test_text_format_appends_the_ids() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.session_id, record.trace_id = "S3", None
    assert TextFormatter().format(record).endswith("hello [session_id=S3]")


def test_configure_logging_replaces_root_handlers_and_checks_the_format() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        buf = io.StringIO()
        configure_logging("warning", "json", stream=buf)
        logging.getLogger("tests.observability.root").warning("to root")
        logging.getLogger("tests.observability.root").info("filtered")
        (record,) = lines(buf)
        assert record["message"] == "to root"
        with pytest.raises(ValueError, match="STREAMER_LOG_FORMAT"):
            configure_logging("INFO", "yaml")
    finally:
        root.handlers = handlers
        root.setLevel(level)
