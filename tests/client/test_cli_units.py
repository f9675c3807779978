"""The client's parts without a server: pacing, chunking, rendering, exit codes, arguments."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pytest

from service.client.cli import parse_args
from service.client.options import Outcome, RawFormat
from service.client.pacing import (
    Pacer,
    chunks,
    container_duration,
    parse_wav_header,
    probe_timing,
    raw_timing,
    wav_timing,
)
from service.client.render import ProgressBar, format_event
from service.client.retry import retry_after_seconds
from service.client.source import Source
from tests.conftest import DATA

pytestmark = pytest.mark.anyio


def test_wav_header() -> None:
    header = parse_wav_header((DATA / "speech.wav").read_bytes()[:4096])
    assert header is not None
    assert (header.byte_rate, header.block_align, header.data_offset) == (32000, 2, 44)


def test_streamed_wav_header_without_a_size_uses_the_file_size() -> None:
    data = bytearray((DATA / "speech.wav").read_bytes())
    data[40:44] = struct.pack("<I", 0xFFFFFFFF)
    header = parse_wav_header(bytes(data[:64]))
    assert header is not None and header.data_size is None
    timing = wav_timing(header, len(data))
    assert timing.duration == pytest.approx((len(data) - 44) / 32000)


def test_not_a_wav() -> None:
    assert parse_wav_header((DATA / "speech.webm").read_bytes()[:4096]) is None
    assert parse_wav_header(b"RIFF") is None


async def test_probe_timing_per_kind() -> None:
    for name, basis, seconds in [
        ("speech.wav", "wav header", 7.52),
        ("speech.webm", "container duration", 7.53),
        ("speech.mp3", "container duration", 7.52),
    ]:
        source = await Source.open(str(DATA / name))
        timing = await probe_timing(source, None)
        await source.aclose()
        assert timing is not None and timing.basis == basis
        assert timing.duration == pytest.approx(seconds, abs=0.02)


def test_container_duration_of_a_live_recording() -> None:
    """No duration in the header: found by demuxing to the last packet."""
    import av
    import numpy as np

    out = io.BytesIO()
    with av.open(out, mode="w", format="webm", options={"live": "1"}) as c:
        stream = c.add_stream("libopus", rate=48000, layout="mono")
        for i in range(0, 48000, 960):
            f = av.AudioFrame.from_ndarray(
                np.zeros((1, 960), np.int16), format="s16", layout="mono"
            )
            f.sample_rate, f.pts = 48000, i
            for p in stream.encode(f):
                c.mux(p)
        for p in stream.encode(None):
            c.mux(p)
    duration = container_duration(io.BytesIO(out.getvalue()))
    assert duration == pytest.approx(1.0, abs=0.05)


def test_garbage_has_no_duration() -> None:
    assert container_duration(io.BytesIO(b"\x00\x01garbage" * 100)) is None


async def test_chunks_hold_whole_frames_and_every_byte() -> None:
    source = await Source.open(str(DATA / "speech_s16le_8k_stereo.raw"))
    sizes = [len(c) async for c in chunks(source, 4099, None, None, frame_bytes=4)]
    await source.aclose()
    assert all(n % 4 == 0 for n in sizes)
    assert sum(sizes) == (DATA / "speech_s16le_8k_stereo.raw").stat().st_size


async def test_pacing_sends_at_real_time(tmp_path: Path) -> None:
    fmt = RawFormat("s16le", 16000, 1)
    path = tmp_path / "half-second.raw"
    path.write_bytes(bytes(16000))  # 0.5 s
    source = await Source.open(str(path))
    timing = raw_timing(fmt, source.size)
    started = time.monotonic()
    sent = [len(c) async for c in chunks(source, timing.chunk_bytes(50), Pacer(timing))]
    elapsed = time.monotonic() - started
    await source.aclose()
    assert sent == [1600] * 10
    assert 0.45 <= elapsed < 2.0


def test_readable_lines() -> None:
    seg = {
        "type": "segment",
        "start_time": 0.372,
        "end_time": 1.824,
        "is_final": True,
        "count": 23232,
        "channel": 0,
    }
    assert format_event(seg) == "  0.37s- 1.82s  ch0  final  count=23232"
    assert format_event({**seg, "is_final": False}).endswith("ch0  interim  count=23232")
    assert format_event({"type": "active", "time": 0.372, "channel": 0}) == "active 0.37s ch0"
    assert format_event({"type": "inactive", "time": 1.824, "channel": 1}) == "inactive 1.82s ch1"
    err = {"type": "error", "code": "unsupported_format", "message": "no", "channel": None}
    assert format_event(err) == "error unsupported_format: no"
    end = {"type": "end", "reason": "completed", "audio_seconds": 7.52, "segments": 3, "errors": 0}
    assert format_event(end) == "end completed  7.52s audio  3 segments  0 errors"
    assert format_event({"type": "novel", "x": 1}).startswith("novel {")
    late = {"type": "lagging", "seconds": 2.26, "channel": None}
    assert format_event(late) == "lagging 2.3s: results are late (the model is behind)"
    assert format_event({**late, "seconds": 0}) == "lagging 0s: results on time again"


def test_a_segment_with_text_prints_the_text() -> None:
    seg = {
        "type": "segment",
        "start_time": 5.26,
        "end_time": 7.52,
        "is_final": True,
        "text": "Please call me tomorrow.",
        "words": [{"word": "Please", "start": 5.26, "end": 5.86, "probability": 0.78}],
        "language": "en",
        "channel": 0,
    }
    assert format_event(seg) == "  5.26s- 7.52s  ch0  final  Please call me tomorrow."
    # Other fields a model returns alongside its text stay visible; an empty text says so.
    assert format_event({**seg, "text": "", "words": [], "speaker": 2}) == (
        "  5.26s- 7.52s  ch0  final  (no words)  speaker=2"
    )


def test_progress_line() -> None:
    bar = ProgressBar(io.StringIO(), 1000, None)
    bar.update(500)
    assert " 50%" in bar.line(60)
    assert ProgressBar(io.StringIO(), None, None).line(60).startswith("sent")


def test_exit_codes() -> None:
    ok = Outcome(end={"type": "end", "reason": "completed"})
    assert ok.exit_code == 0
    assert Outcome(end={"type": "end", "reason": "idle_timeout"}).exit_code == 1
    marred = Outcome(end={"type": "end", "reason": "completed"}, errors=[{"type": "error"}])
    assert marred.exit_code == 1
    assert Outcome().exit_code == 2


def test_arguments_build_the_config() -> None:
    opts = parse_args(
        ["--interim", "--mode", "simple", "--raw", "f32le", "--sample-rate", "48000", "a.raw"]
    )
    assert opts.config == {
        "mode": "simple",
        "interim_results": True,
        "format": {"channels": 1, "sample_rate": 48000, "bit_depth": 32, "is_float": True},
    }
    assert opts.raw == RawFormat("f32le", 48000, 1)
    merged = parse_args(["--config", '{"vad": {"redemption_ms": 300}}', "--http2", "a.wav"])
    assert merged.config == {"vad": {"redemption_ms": 300}} and merged.transport == "http2"
    declared = parse_args(["--config", '{"format": {"sample_rate": 8000, "channels": 2}}', "-"])
    assert declared.raw == RawFormat("s16le", 8000, 2)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), ("0", 0.0), ("1.5", 1.5), (None, 5.0), ("soon", 5.0), ("3600", 60.0)],
)
def test_retry_after_is_read_in_seconds_and_bounded(header: str | None, seconds: float) -> None:
    assert retry_after_seconds(header) == seconds


def test_the_retry_options_parse() -> None:
    opts = parse_args(["--retry", "3", "--retry-delay", "0.5", "a.wav"])
    assert (opts.retries, opts.retry_delay_s) == (3, 0.5)
    assert (parse_args(["a.wav"]).retries, parse_args(["a.wav"]).retry_delay_s) == (0, None)
    with pytest.raises(SystemExit):
        parse_args(["--retry", "-1", "a.wav"])
