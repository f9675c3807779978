"""The WebSocket message parser (no I/O): the seed's messages, /v1/ws extensions, every error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.api.ws_protocol import (
    SEED_SEGMENTED,
    SEED_SIMPLE,
    V1,
    CloseStream,
    Finalize,
    KeepAlive,
    Start,
    Stop,
    parse_text,
    partial_sample_error,
)
from service.config import PcmFormat
from service.errors import ErrorCode, StreamerError

SEED_FORMAT = {"channels": 2, "sample_rate": 8000, "bit_depth": 16, "is_float": False}


def text(obj: Any) -> str:
    return json.dumps(obj)


def code_of(raw: str, dialect: Any = V1) -> ErrorCode:
    with pytest.raises(StreamerError) as info:
        parse_text(raw, dialect)
    return info.value.code


def test_seed_start_exactly_as_the_rust_client_sends_it() -> None:
    # serde's output for StartMessage: trace_id first, null when unset.
    raw = text(
        {"request": "start", "trace_id": None, "format": SEED_FORMAT, "interim_results": True}
    )
    command = parse_text(raw, SEED_SEGMENTED)
    assert isinstance(command, Start)
    config = command.config
    assert config.mode == "segmented"
    assert config.format == PcmFormat(2, 8000, 16, False)
    assert config.interim_results is True
    assert config.trace_id is None


def test_seed_routes_force_their_mode() -> None:
    raw = text({"request": "start", "format": SEED_FORMAT, "interim_results": False})
    simple = parse_text(raw, SEED_SIMPLE)
    assert isinstance(simple, Start) and simple.config.mode == "simple"


def test_seed_start_needs_raw_pcm_format() -> None:
    assert code_of(text({"request": "start"}), SEED_SEGMENTED) is ErrorCode.INVALID_CONFIG
    auto = text({"request": "start", "format": "auto"})
    assert code_of(auto, SEED_SEGMENTED) is ErrorCode.INVALID_CONFIG


def test_seed_start_rejects_extended_fields() -> None:
    for extra in ({"mode": "simple"}, {"vad": {}}, {"colour": 1}):
        raw = text({"request": "start", "format": SEED_FORMAT, **extra})
        assert code_of(raw, SEED_SEGMENTED) is ErrorCode.UNKNOWN_FIELD


def test_v1_start_takes_the_whole_config_and_containers() -> None:
    raw = text(
        {
            "request": "start",
            "mode": "simple",
            "format": "auto",
            "interim_results": True,
            "interim_interval_ms": 750,
            "vad": {"positive_threshold": 0.6},
            "trace_id": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
    )
    command = parse_text(raw, V1)
    assert isinstance(command, Start)
    assert command.config.mode == "simple"
    assert command.config.format is None
    assert command.config.interim_interval_ms == 750
    assert command.config.vad.positive_threshold == 0.6
    bare = parse_text(text({"request": "start"}), V1)
    assert isinstance(bare, Start) and bare.config.format is None


@pytest.mark.parametrize("dialect", [SEED_SEGMENTED, V1])
def test_unsupported_formats(dialect: Any) -> None:
    for fmt in (
        {**SEED_FORMAT, "bit_depth": 24},
        {**SEED_FORMAT, "bit_depth": 16, "is_float": True},
        {**SEED_FORMAT, "bit_depth": 8},
    ):
        raw = text({"request": "start", "format": fmt})
        assert code_of(raw, dialect) is ErrorCode.UNSUPPORTED_FORMAT


def test_bad_config_values() -> None:
    bad = {"request": "start", "format": {**SEED_FORMAT, "channels": 0}}
    assert code_of(text(bad), SEED_SEGMENTED) is ErrorCode.INVALID_CONFIG
    assert code_of(text({"request": "start", "mode": "fast"})) is ErrorCode.INVALID_CONFIG
    assert code_of(text({"request": "start", "speed": 2})) is ErrorCode.UNKNOWN_FIELD


@pytest.mark.parametrize("dialect", [SEED_SEGMENTED, SEED_SIMPLE, V1])
def test_stop(dialect: Any) -> None:
    assert parse_text('{"request":"stop","disconnect":true}', dialect) == Stop(True)
    assert parse_text('{"request":"stop","disconnect":false}', dialect) == Stop(False)
    assert parse_text('{"request":"stop"}', dialect) == Stop(False)
    assert code_of('{"request":"stop","disconnect":"yes"}', dialect) is ErrorCode.INVALID_MESSAGE
    assert code_of('{"request":"stop","now":true}', dialect) is ErrorCode.UNKNOWN_FIELD


def test_deepgram_control_messages_on_v1() -> None:
    assert parse_text('{"type":"KeepAlive"}', V1) == KeepAlive()
    assert parse_text('{"type":"Finalize"}', V1) == Finalize()
    assert parse_text('{"type":"CloseStream"}', V1) == CloseStream()
    assert code_of('{"type":"Pause"}') is ErrorCode.INVALID_MESSAGE
    assert code_of('{"type":"Finalize","channel":0}') is ErrorCode.UNKNOWN_FIELD


def test_seed_routes_take_keepalive_but_no_other_control_message() -> None:
    # A seed-era client that pauses past the idle timeout can keep its connection.
    assert parse_text('{"type":"KeepAlive"}', SEED_SEGMENTED) == KeepAlive()
    assert code_of('{"type":"Finalize"}', SEED_SEGMENTED) is ErrorCode.INVALID_MESSAGE
    assert code_of('{"type":"CloseStream"}', SEED_SEGMENTED) is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        ('{"request": "start"', ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE),
        ('"start"', ErrorCode.INVALID_MESSAGE),
        ("{}", ErrorCode.INVALID_MESSAGE),
        ('{"request": "pause"}', ErrorCode.INVALID_MESSAGE),
        ('{"request": null}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_malformed_messages(raw: str, code: ErrorCode) -> None:
    assert code_of(raw) is code
    assert code_of(raw, SEED_SEGMENTED) is code


def test_oversized_text_message() -> None:
    raw = text({"request": "start", "trace_id": "x" * 100})
    with pytest.raises(StreamerError) as info:
        parse_text(raw, V1, limit=50)
    assert info.value.code is ErrorCode.CONFIG_TOO_LARGE


def test_partial_sample_frames() -> None:
    stereo16 = PcmFormat(2, 8000, 16, False)
    assert partial_sample_error(4, stereo16) is None
    assert partial_sample_error(4096, stereo16) is None
    for size in (1, 2, 3, 4095):
        error = partial_sample_error(size, stereo16)
        assert error is not None and error.code is ErrorCode.PARTIAL_SAMPLE
    mono_f32 = PcmFormat(1, 16000, 32, True)
    assert partial_sample_error(8, mono_f32) is None
    assert partial_sample_error(6, mono_f32) is not None
    # Containers are byte streams: any split is fine.
    assert partial_sample_error(7, None) is None


def test_route_event_filter() -> None:
    for kind in ("segment", "active", "inactive", "error"):
        assert SEED_SEGMENTED.forwards(kind) and V1.forwards(kind)
    assert not SEED_SIMPLE.forwards("end") and not SEED_SEGMENTED.forwards("started")
    assert V1.forwards("end")
