"""The pure parts of ``/v1/listen``: query parameters, raw encodings, and the translation of a
session's events into Deepgram's messages."""

from __future__ import annotations

import warnings
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from service.api.deepgram_audio import ALAW, MULAW, RawConverter
from service.api.deepgram_messages import Translator, alternative
from service.api.deepgram_params import ListenOptions, RawAudio, parse_listen_params
from service.config import PcmFormat, VadParams
from service.errors import ErrorCode, StreamerError
from service.events.types import seconds


def test_no_encoding_is_a_container_and_defaults_keep_our_vad() -> None:
    options = parse_listen_params({"model": "nova-3", "sample_rate": "8000"})
    assert options.raw is None and options.config.format is None
    assert options.config.vad == VadParams() and options.config.mode == "segmented"
    assert not (options.interim_results or options.vad_events or options.utterance_end)
    assert options.endpointing and not options.multichannel


def test_raw_encodings_and_channels() -> None:
    options = parse_listen_params(
        {"encoding": "linear16", "sample_rate": "8000", "channels": "2", "multichannel": "true"}
    )
    assert options.raw == RawAudio("linear16", 8000, 2, mixdown=False)
    assert options.config.format == PcmFormat(2, 8000, 16, False)
    mixed = parse_listen_params({"encoding": "mulaw", "sample_rate": "8000", "channels": "2"})
    assert mixed.raw is not None and mixed.raw.mixdown
    assert mixed.config.format == PcmFormat(1, 8000, 16, False)
    wide = parse_listen_params({"encoding": "linear32", "sample_rate": "48000"})
    assert wide.config.format == PcmFormat(1, 48000, 32, True)
    assert parse_listen_params({"encoding": "ogg-opus"}).raw is None  # sniffed


def test_endpointing_interim_and_events() -> None:
    options = parse_listen_params(
        {
            "endpointing": "300",
            "interim_results": "true",
            "utterance_end_ms": "1000",
            "vad_events": "true",
        }
    )
    assert options.config.vad.redemption_ms == 300
    assert options.config.interim_results and options.interim_results
    assert options.utterance_end and options.vad_events
    off = parse_listen_params({"endpointing": "false"})
    assert not off.endpointing and off.config.vad == VadParams()


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"encoding": "g729", "sample_rate": "8000"}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"encoding": "pcm_s24le", "sample_rate": "8000"}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"encoding": "linear16"}, ErrorCode.INVALID_CONFIG),
        ({"encoding": "linear16", "sample_rate": "100"}, ErrorCode.INVALID_CONFIG),
        (
            {"encoding": "linear16", "sample_rate": "16000", "channels": "0"},
            ErrorCode.INVALID_CONFIG,
        ),
        ({"multichannel": "yes"}, ErrorCode.INVALID_CONFIG),
        ({"endpointing": "10.5"}, ErrorCode.INVALID_CONFIG),
        ({"utterance_end_ms": "soon"}, ErrorCode.INVALID_CONFIG),
    ],
)
def test_values_it_cannot_honour(params: dict[str, str], code: ErrorCode) -> None:
    with pytest.raises(StreamerError) as refused:
        parse_listen_params(params)
    assert refused.value.code is code


def test_g711_tables_match_the_standard_expansions() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

        every = bytes(range(256))
        assert MULAW.tobytes() == audioop.ulaw2lin(every, 2)
        assert ALAW.tobytes() == audioop.alaw2lin(every, 2)


def test_conversion_and_mixdown() -> None:
    stereo = np.array([[1000, -3000], [7, 8], [-32768, 32767]], dtype="<i2")
    mixed = RawConverter(RawAudio("linear16", 16000, 2, mixdown=True)).convert(stereo.tobytes())
    assert np.frombuffer(mixed, "<i2").tolist() == [-1000, 8, 0]  # rounded half to even
    kept = RawConverter(RawAudio("linear16", 16000, 2, mixdown=False))
    assert kept.convert(stereo.tobytes()) == stereo.tobytes()
    ints = np.array([2**30, -(2**31)], dtype="<i4")
    floats = RawConverter(RawAudio("linear32", 16000, 1, False)).convert(ints.tobytes())
    assert np.frombuffer(floats, "<f4").tolist() == [0.5, -1.0]
    with pytest.raises(StreamerError) as partial:
        kept.convert(b"\x00" * 6)
    assert partial.value.code is ErrorCode.PARTIAL_SAMPLE


def options(**kwargs: Any) -> ListenOptions:
    return replace(parse_listen_params({}), **kwargs)


def segment(start: float, end: float, final: bool, channel: int = 0, **out: Any) -> dict[str, Any]:
    return {
        "type": "segment",
        "start_time": start,
        "end_time": end,
        "is_final": final,
        **out,
        "channel": channel,
    }


def test_alternative_from_a_model_with_text_and_from_one_without() -> None:
    alt = alternative(
        {
            "text": "  Hello,  world! ",
            "words": [
                {"word": " Hello,", "start": 0.5, "end": 0.9, "probability": 0.5},
                {"word": " world!", "start": 1.0, "end": 1.4, "probability": 1.0},
                {"no": "word"},
            ],
        }
    )
    assert alt["transcript"] == "Hello, world!"
    assert alt["confidence"] == 0.75
    assert alt["words"][0] == {
        "word": "hello",
        "start": 0.5,
        "end": 0.9,
        "confidence": 0.5,
        "punctuated_word": "Hello,",
    }
    assert len(alt["words"]) == 2
    assert alternative({"text": "ok", "confidence": 0.3})["confidence"] == 0.3
    assert alternative({"count": 123}) == {"transcript": "", "confidence": 0.0, "words": []}


def test_an_utterance_from_start_to_end() -> None:
    t = Translator("sid", options(vad_events=True, utterance_end=True), "m:f", "1")
    assert t.translate({"type": "active", "time": 0.5, "channel": 0}, 1) == [
        {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 0.5}
    ]
    [interim] = t.translate(segment(0.5, 1.0, False, text="he"), 1)
    assert (interim["is_final"], interim["speech_final"], interim["from_finalize"]) == (
        False,
        False,
        False,
    )
    assert t.translate({"type": "inactive", "time": 2.0, "channel": 0}, 1) == []
    final, end = t.translate(segment(0.5, 2.0, True, text="hello"), 1)
    assert final["type"] == "Results" and final["is_final"] and final["speech_final"]
    assert final["start"] == 0.5 and final["duration"] == 1.5
    assert final["metadata"]["request_id"] == "sid"
    assert final["metadata"]["model_info"] == {"name": "m:f", "version": "1", "arch": "streamer"}
    assert end == {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 2.0}


def test_a_cut_at_the_maximum_length_is_not_an_end() -> None:
    t = Translator("sid", options(vad_events=True, utterance_end=True), "m", "1")
    t.translate({"type": "active", "time": 0.0, "channel": 1}, 2)
    t.translate({"type": "inactive", "time": 30.0, "channel": 1}, 2)
    assert t.translate({"type": "active", "time": 30.0, "channel": 1}, 2) == []  # goes on
    [final] = t.translate(segment(0.0, 30.0, True, channel=1), 2)
    assert final["channel_index"] == [1, 2] and not final["speech_final"]


def test_finalize_marks_the_utterance_it_ended() -> None:
    t = Translator("sid", options(utterance_end=True), "m", "1")
    t.finalized((16000, None))
    t.translate({"type": "inactive", "time": seconds(16000), "channel": 0}, 2)
    final, end = t.translate(segment(0.25, 1.0, True), 2)
    assert final["from_finalize"] and not final["speech_final"]
    assert end["type"] == "UtteranceEnd"
    # Only that one: the next utterance ending at a different time is an ordinary end.
    t.translate({"type": "inactive", "time": 3.0, "channel": 0}, 2)
    nxt, _ = t.translate(segment(2.0, 3.0, True), 2)
    assert not nxt["from_finalize"] and nxt["speech_final"]


def test_without_endpointing_nothing_is_speech_final_and_events_are_opt_in() -> None:
    t = Translator("sid", options(endpointing=False), "m", "1")
    assert t.translate({"type": "active", "time": 0.0, "channel": 0}, 1) == []
    t.translate({"type": "inactive", "time": 1.0, "channel": 0}, 1)
    [final] = t.translate(segment(0.0, 1.0, True), 1)  # no UtteranceEnd either
    assert final["is_final"] and not final["speech_final"]


def test_errors_and_metadata() -> None:
    t = Translator("sid", options(), "m", "1")
    assert t.translate({"type": "error", "code": "model_failed", "message": "boom"}, 1) == [
        {"type": "Error", "variant": "model_failed", "description": "boom"}
    ]
    assert t.translate({"type": "end", "reason": "completed"}, 1) == []
    created = datetime(2026, 12, 3, 13, 0, 0, 123456, tzinfo=UTC)
    meta = t.metadata({"audio_seconds": 7.5}, "ab" * 32, created, 2)
    assert meta["type"] == "Metadata" and meta["request_id"] == "sid"
    assert meta["created"] == "2026-12-03T13:00:00.123Z"
    assert (meta["duration"], meta["channels"], meta["sha256"]) == (7.5, 2, "ab" * 32)
    assert meta["models"] == [t.model_uuid] and meta["model_info"][t.model_uuid]["name"] == "m"
