"""The segmentation state machine on scripted probabilities, with exact sample positions.

The audio of frame i is position-coded (sample p has the value p / 2**24, exact in float32), so
an utterance's audio can be checked against the positions it claims.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import VadParams
from service.vad.segmenter import Segmenter
from service.vad.silero import FRAME
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput
from tests.vad.vad_helpers import check_protocol

SCALE = float(2**24)
DEFAULT = VadParams()  # pad 9600, redemption 9600, min speech 1440 samples
S, N, M = 0.9, 0.1, 0.4  # speech, silence, in between (neither threshold)


def coded(start: int, end: int) -> np.ndarray:
    return (np.arange(start, end, dtype=np.float64) / SCALE).astype(np.float32)


def feed(
    probs: Sequence[float],
    params: VadParams = DEFAULT,
    *,
    last_valid: int | None = None,
    finish: bool = True,
    channel: int = 0,
) -> tuple[list[tuple[int, VadOutput]], Segmenter]:
    """Push one frame per probability; return (frame index, output) pairs (index len(probs)
    for the outputs of finish())."""
    seg = Segmenter(params, channel)
    out: list[tuple[int, VadOutput]] = []
    for i, p in enumerate(probs):
        valid = last_valid if i == len(probs) - 1 else None
        frame = coded(i * FRAME, (i + 1) * FRAME)
        if valid is not None:
            frame[valid:] = 0.0  # the zero padding the stage adds
        out += [(i, o) for o in seg.push(frame, p, float(i), valid=valid)]
    if finish:
        out += [(len(probs), o) for o in seg.finish(float(len(probs)))]
    return out, seg


def summary(out: list[tuple[int, VadOutput]]) -> list[tuple[object, ...]]:
    """(frame, kind, utterance, position) with the audio checked against its positions."""
    rows: list[tuple[object, ...]] = []
    for i, o in out:
        if isinstance(o, SpeechStarted):
            rows.append((i, "start", o.utterance, o.start))
        elif isinstance(o, SpeechEnded):
            rows.append((i, "end", o.utterance, o.end))
        else:
            np.testing.assert_array_equal(o.audio, coded(o.start, o.end))
            rows.append((i, "final" if o.is_final else "interim", o.utterance, o.start, o.end))
    return rows


def test_start_confirm_and_redemption() -> None:
    probs = [N] * 30 + [S] * 30 + [N] * 25
    out, _ = feed(probs)
    # Frame 30 opens the candidate at 30*512 - 9600; speech time exceeds 90 ms (1440 samples)
    # on the third frame after it (3*512 = 1536). The silent run from frame 60 exceeds 600 ms
    # (9600 samples) on its 19th frame (9728); the end is the end of the last speech frame.
    assert summary(out) == [
        (33, "start", 0, 30 * FRAME - 9600),
        (78, "end", 0, 60 * FRAME),
        (78, "final", 0, 30 * FRAME - 9600, 60 * FRAME),
    ]
    check_protocol([o for _, o in out])


def test_blip_shorter_than_min_speech_gives_nothing() -> None:
    out, seg = feed([N] * 10 + [S, S, N] + [N] * 40)
    assert out == []
    assert seg.utterances == 0
    # As in silero-rs, every frame after the trigger counts as speech time before the silence
    # check, so a silent frame that takes it past min speech still confirms.
    out, _ = feed([N] * 10 + [S, S, S, N] + [N] * 40)
    assert summary(out)[0] == (13, "start", 0, 0)


def test_min_speech_is_strictly_exceeded() -> None:
    # A min speech of exactly 3 frames (1536 samples) is not exceeded by the third frame after
    # the trigger (frame 13), only by the fourth; 1520 samples are exceeded by the third.
    out, _ = feed([N] * 10 + [S] * 6 + [N] * 30, replace(DEFAULT, min_speech_ms=96))
    assert summary(out)[0] == (14, "start", 0, 0)
    out, _ = feed([N] * 10 + [S] * 6 + [N] * 30, replace(DEFAULT, min_speech_ms=95))
    assert summary(out)[0] == (13, "start", 0, 0)
    out, _ = feed([N] * 10 + [S] * 3 + [N] * 30, replace(DEFAULT, min_speech_ms=96))
    assert out == []


def test_frames_between_thresholds_keep_speech_and_reset_the_silent_run() -> None:
    probs = [N] * 30 + [S] * 10 + [N] * 10 + [M] + [N] * 18 + [N] * 5
    out, _ = feed(probs)
    rows = summary(out)
    # The middle frame (>= negative) resets the run: the end is after it, not at frame 40.
    assert rows[1] == (51 + 18, "end", 0, 51 * FRAME)
    # A candidate that sees middle frames before confirmation is not dropped.
    out, _ = feed([N] * 30 + [S, M, M, M] + [N] * 30)
    assert summary(out)[0] == (33, "start", 0, 30 * FRAME - 9600)


def test_negative_frame_before_confirmation_drops_the_candidate() -> None:
    out, _ = feed([N] * 30 + [S, S, N] + [S] * 2 + [N] * 30)
    assert out == []


def test_pre_speech_pad_is_clamped_to_zero_and_to_the_previous_end() -> None:
    params = replace(DEFAULT, redemption_ms=100)  # 1600 samples: ends after 4 silent frames
    probs = [N] * 5 + [S] * 20 + [N] * 6 + [S] * 10 + [N] * 10
    rows = summary(feed(probs, params)[0])
    assert rows[0] == (8, "start", 0, 0)  # 5*512 - 9600 < 0
    assert rows[1] == (28, "end", 0, 25 * FRAME)
    # The next candidate at frame 31 would start at 31*512 - 9600 = 6272, before the end.
    assert rows[3] == (34, "start", 1, 25 * FRAME)
    assert rows[4] == (44, "end", 1, 41 * FRAME)


def test_max_segment_splits_without_losing_or_duplicating_audio() -> None:
    params = replace(DEFAULT, max_segment_ms=1000)  # 16000 samples
    start = 30 * FRAME - 9600
    out, seg = feed([N] * 30 + [S] * 60 + [N] * 25, params)
    rows = summary(out)
    assert rows[:5] == [
        (33, "start", 0, start),
        # The cut is exact, mid-frame, on the frame that reaches the limit.
        (42, "end", 0, start + 16000),
        (42, "final", 0, start, start + 16000),
        (42, "start", 1, start + 16000),
        (73, "end", 1, start + 32000),
    ]
    finals = [o for _, o in out if isinstance(o, SpeechAudio)]
    assert [f.end - f.start for f in finals] == [16000, 16000, 90 * FRAME - start - 32000]
    np.testing.assert_array_equal(
        np.concatenate([f.audio for f in finals]), coded(start, 90 * FRAME)
    )
    assert seg.utterances == 3
    check_protocol([o for _, o in out])


def test_max_segment_reached_in_a_silent_run_ends_at_the_voiced_end() -> None:
    params = replace(DEFAULT, max_segment_ms=1000)
    start = 30 * FRAME - 9600  # the cut would be at start + 16000 = 21760, in frame 42
    out, _ = feed([N] * 30 + [S] * 10 + [N] * 40, params)
    # Silent from frame 40 on; frame 42 reaches the limit, voiced audio ended at 40*512.
    assert summary(out) == [
        (33, "start", 0, start),
        (42, "end", 0, 40 * FRAME),
        (42, "final", 0, start, 40 * FRAME),
    ]


def test_finish_closes_an_open_utterance_at_the_last_real_sample() -> None:
    probs = [N] * 30 + [S] * 20 + [S]
    out, seg = feed(probs, last_valid=100)
    rows = summary(out)
    end = 50 * FRAME + 100  # the padded samples of the last frame do not count
    assert rows[1:] == [(51, "end", 0, end), (51, "final", 0, 30 * FRAME - 9600, end)]
    assert seg.position == end


def test_finish_keeps_a_short_trailing_silence() -> None:
    out, _ = feed([N] * 30 + [S] * 20 + [N] * 5)
    assert summary(out)[1] == (55, "end", 0, 55 * FRAME)


def test_finish_drops_an_unconfirmed_candidate_and_is_final() -> None:
    out, seg = feed([N] * 30 + [S, S])
    assert out == []
    with pytest.raises(RuntimeError):
        seg.push(coded(0, FRAME), S, 0.0)


def test_nothing_may_follow_a_partial_frame() -> None:
    seg = Segmenter(DEFAULT)
    seg.push(np.zeros(FRAME, np.float32), N, 0.0, valid=10)
    with pytest.raises(RuntimeError):
        seg.push(np.zeros(FRAME, np.float32), N, 0.0)


def test_current_speech_and_channel() -> None:
    seg = Segmenter(DEFAULT, channel=3)
    for i in range(30):
        seg.push(coded(i * FRAME, (i + 1) * FRAME), N, 0.0)
    assert seg.current_speech() is None
    events = []
    for i in range(30, 40):
        events += seg.push(coded(i * FRAME, (i + 1) * FRAME), S, 0.0)
    assert all(e.channel == 3 for e in events)
    current = seg.current_speech()
    assert current is not None
    utterance, start, end, audio = current
    assert (utterance, start, end) == (0, 30 * FRAME - 9600, 40 * FRAME)
    np.testing.assert_array_equal(audio, coded(start, end))


def test_received_at_is_that_of_the_frame_that_produced_the_output() -> None:
    out, _ = feed([N] * 30 + [S] * 30 + [N] * 25)
    assert all(o.received_at == float(i) for i, o in out)


def test_memory_is_bounded() -> None:
    seg = Segmenter(DEFAULT)
    frame = np.zeros(FRAME, np.float32)
    for _ in range(20_000):  # 10 minutes of silence
        seg.push(frame, N, 0.0)
    kept = seg._audio.end - seg._audio.start
    assert kept <= 9600 + FRAME
    assert len(seg._audio._data) <= 4 * (kept + FRAME)
    params = replace(DEFAULT, max_segment_ms=2000)
    seg = Segmenter(params)
    for _ in range(20_000):  # 10 minutes of speech
        seg.push(frame, S, 0.0)
    assert seg.utterances > 100
    assert seg._audio.end - seg._audio.start <= 32000 + FRAME
    assert len(seg._audio._data) <= 4 * (32000 + 2 * FRAME)


@settings(max_examples=200, deadline=None)
@given(
    probs=st.lists(st.sampled_from([S, N, M, 0.5, 0.35]), max_size=400),
    last_valid=st.integers(1, FRAME),
    pad=st.sampled_from([0, 100, 600]),
    redemption=st.sampled_from([0, 100, 600]),
    min_speech=st.sampled_from([0, 90, 500]),
    max_segment=st.sampled_from([1000, 3000]),
)
def test_invariants_on_random_probabilities(
    probs: list[float],
    last_valid: int,
    pad: int,
    redemption: int,
    min_speech: int,
    max_segment: int,
) -> None:
    params = VadParams(
        pre_speech_pad_ms=pad,
        redemption_ms=redemption,
        min_speech_ms=min_speech,
        max_segment_ms=max_segment,
    )
    out, seg = feed(probs, params, last_valid=last_valid if probs else None)
    outputs = [o for _, o in out]
    check_protocol(outputs)
    total = (len(probs) - 1) * FRAME + last_valid if probs else 0
    finals = [o for o in outputs if isinstance(o, SpeechAudio)]
    for f in finals:
        assert 0 <= f.start < f.end <= total
        assert f.end - f.start <= max_segment * 16
        np.testing.assert_array_equal(f.audio, coded(f.start, f.end))
    for a, b in itertools.pairwise(finals):
        assert a.end <= b.start
    assert seg.utterances == len(finals)
    assert seg.speech_samples == sum(f.end - f.start for f in finals)


def test_flush_ends_the_open_utterance_here_and_the_next_starts_no_earlier() -> None:
    """Deepgram's Finalize: the utterance ends at the audio seen so far, without waiting for
    redemption; speech that goes on opens a new utterance from that very sample."""
    seg = Segmenter(DEFAULT)
    out: list[tuple[int, VadOutput]] = []
    probs = [N] * 30 + [S] * 20 + [S] * 20
    for i, p in enumerate(probs[:50]):
        out += [(i, o) for o in seg.push(coded(i * FRAME, (i + 1) * FRAME), p, float(i))]
    out += [(50, o) for o in seg.flush(50.0)]
    assert seg.flush(50.0) == []  # nothing open any more
    for i, p in enumerate(probs[50:], start=50):
        out += [(i, o) for o in seg.push(coded(i * FRAME, (i + 1) * FRAME), p, float(i))]
    out += [(70, o) for o in seg.finish(70.0)]
    rows = summary(out)
    check_protocol([o for _, o in out])
    assert rows[1:3] == [
        (50, "end", 0, 50 * FRAME),
        (50, "final", 0, 30 * FRAME - 9600, 50 * FRAME),
    ]
    # The next utterance starts at the flush, not a pre-speech pad before it.
    assert rows[3][:4] == (53, "start", 1, 50 * FRAME)
    assert rows[-1] == (70, "final", 1, 50 * FRAME, 70 * FRAME)


def test_flush_leaves_an_unconfirmed_candidate_and_silence_alone() -> None:
    seg = Segmenter(DEFAULT)
    for i in range(10):
        seg.push(coded(i * FRAME, (i + 1) * FRAME), N, 0.0)
    assert seg.flush(0.0) == []
    seg.push(coded(10 * FRAME, 11 * FRAME), S, 0.0)  # a candidate, shorter than min_speech
    assert seg.flush(0.0) == []
    out = [o for i in range(11, 20) for o in seg.push(coded(i * FRAME, (i + 1) * FRAME), S, 0.0)]
    assert [type(o).__name__ for o in out] == ["SpeechStarted"]  # it went on to be confirmed
