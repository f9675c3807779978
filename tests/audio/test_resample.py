"""FrameResampler: decoded frames to 16 kHz planar float32, as ``av.AudioResampler`` makes them."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from av.audio.frame import AudioFrame
from av.audio.layout import AudioLayout

from service.audio.resample import FrameResampler

DATA = Path(__file__).resolve().parent.parent / "data"


def frames(name: str) -> list[AudioFrame]:
    with av.open(str(DATA / name)) as container:
        return list(container.decode(audio=0))


def reference(parts: list[list[AudioFrame]], layout: AudioLayout) -> np.ndarray:
    """What the resampler made before: one ``av.AudioResampler`` per run of same-format frames,
    flushed when the format changes, every output frame taken at once."""
    out: list[np.ndarray] = []
    for run in parts:
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=16000)
        for frame in run:
            frame.pts = None
            out += [f.to_ndarray() for f in resampler.resample(frame)]
        out += [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("pull_every", [1, 7, 0])  # 0: only at the end
def test_same_samples_as_av_resampler_however_often_pulled(pull_every: int) -> None:
    decoded = frames("speech.webm")  # Opus, 48 kHz
    expected = reference([frames("speech.webm")], decoded[0].layout)
    r = FrameResampler()
    out = []
    for i, frame in enumerate(decoded, 1):
        r.push(frame)
        if pull_every and i % pull_every == 0:
            out += r.pull()
    out += r.flush()
    got = np.concatenate(out, axis=1)
    assert got.dtype == np.float32
    assert r.channels == 1
    assert np.array_equal(got, expected)
    assert r.flush() == [] and r.pull() == []


def test_a_format_change_keeps_the_first_layout() -> None:
    # 44.1 kHz stereo, then 48 kHz mono: the second run is mapped onto the first run's layout.
    first, second = frames("speech_44k_stereo.wav"), frames("speech.webm")
    expected = reference([frames("speech_44k_stereo.wav"), frames("speech.webm")], first[0].layout)
    r = FrameResampler()
    out = []
    for frame in first + second:
        r.push(frame)
    out += r.pull()
    out += r.flush()
    got = np.concatenate(out, axis=1)
    assert r.channels == 2 and got.shape[0] == 2
    assert np.array_equal(got, expected)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads with /proc")
def test_graphs_start_no_threads() -> None:
    # FFmpeg's automatic thread count would give every graph a thread per core; the resampler
    # needs none, and a webm session would pay for them.
    frame = frames("speech.webm")[0]
    before = len(os.listdir("/proc/self/task"))
    resamplers = [FrameResampler() for _ in range(8)]
    for r in resamplers:
        r.push(frame)
        r.pull()
    assert len(os.listdir("/proc/self/task")) == before
