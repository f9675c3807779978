"""Session config parsing: strict, typed, with stable error codes."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import (
    PcmFormat,
    SessionConfig,
    VadParams,
    parse_query_format,
    parse_session_config,
)
from service.errors import ErrorCode, StreamerError


def test_defaults_are_the_seeds() -> None:
    c = parse_session_config(None)
    assert c == SessionConfig()
    assert c.vad == VadParams(0.5, 0.35, 600, 600, 90, 30_000)
    assert c.format is None and c.mode == "segmented" and not c.interim_results


def test_seed_start_message_parses() -> None:
    c = parse_session_config(
        {
            "request": "start",
            "format": {"channels": 2, "sample_rate": 8000, "bit_depth": 16, "is_float": False},
            "interim_results": True,
            "trace_id": None,
        },
        extra_allowed=frozenset({"request"}),
    )
    assert c.format == PcmFormat(2, 8000, 16, False)
    assert c.interim_results


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"mode": "fast"}, ErrorCode.INVALID_CONFIG),
        ({"bogus": 1}, ErrorCode.UNKNOWN_FIELD),
        ({"vad": {"positive_threshold": 2}}, ErrorCode.INVALID_CONFIG),
        ({"vad": {"positive_threshold": 0.3, "negative_threshold": 0.4}}, ErrorCode.INVALID_CONFIG),
        ({"vad": {"threshold": 0.3}}, ErrorCode.UNKNOWN_FIELD),
        ({"vad": {"redemption_ms": "600"}}, ErrorCode.INVALID_CONFIG),
        ({"format": {"channels": 0}}, ErrorCode.INVALID_CONFIG),
        ({"format": {"channels": 1000}}, ErrorCode.INVALID_CONFIG),
        ({"format": {"sample_rate": 10}}, ErrorCode.INVALID_CONFIG),
        ({"format": {"sample_rate": 10**9}}, ErrorCode.INVALID_CONFIG),
        ({"format": {"bit_depth": 24}}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"format": {"bit_depth": 16, "is_float": True}}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"format": "mp3"}, ErrorCode.INVALID_CONFIG),
        ({"interim_results": "yes"}, ErrorCode.INVALID_CONFIG),
        ({"interim_interval_ms": 10}, ErrorCode.INVALID_CONFIG),
        ({"trace_id": 5}, ErrorCode.INVALID_CONFIG),
        ([1, 2], ErrorCode.INVALID_CONFIG),
    ],
)
def test_bad_config_has_a_stable_code(body: Any, code: ErrorCode) -> None:
    with pytest.raises(StreamerError) as info:
        parse_session_config(body)
    assert info.value.code is code
    assert info.value.message


def test_query_format_deepgram_style() -> None:
    assert parse_query_format({"encoding": "s16le", "sample_rate": "8000", "channels": "2"}) == (
        PcmFormat(2, 8000, 16, False)
    )
    assert parse_query_format({"encoding": "f32le"}) == PcmFormat(1, 16000, 32, True)
    assert parse_query_format({}) is None
    assert parse_query_format({"encoding": "auto"}) is None
    with pytest.raises(StreamerError) as info:
        parse_query_format({"encoding": "mulaw"})
    assert info.value.code is ErrorCode.UNSUPPORTED_FORMAT
    with pytest.raises(StreamerError):
        parse_query_format({"sample_rate": "8000"})
    with pytest.raises(StreamerError):
        parse_query_format({"encoding": "s16le", "channels": "two"})
