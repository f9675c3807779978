"""VAD CPU cost per stream-second, batch 1 vs cross-stream batching.

    .venv/bin/python benchmarks/vad_batching.py [--streams 100] [--runs 5] [--max-batch 64]

Every stream is real speech (tests/data/speech.wav by default), each rotated by a different
offset so no two streams see the same frame at the same time. The audio arrives in chunks of
``--chunk-ms`` per stream, as live sessions deliver it:

- batch 1: every stream runs on its own, one ``session.run`` per 512-sample frame (what a
  per-session VAD does);
- batched: at each chunk, every stream's frames go through one ``run_requests`` call, as the
  batcher's loop does when all sessions are pending (``max_batch`` rows per ``session.run``).

CPU is ``time.process_time()`` (all threads of this process), the median of ``--runs`` runs,
divided by the stream-seconds of audio processed. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.vad.batcher import run_requests
from service.vad.silero import FRAME, SAMPLE_RATE, VadStream, load_session

DEFAULT_AUDIO = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech.wav"

Streams = list[npt.NDArray[np.float32]]  # per stream: (frames, FRAME)


def read_mono(path: Path) -> npt.NDArray[np.float32]:
    with wave.open(str(path)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16-bit PCM at {SAMPLE_RATE} Hz")
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        audio = raw.reshape(-1, w.getnchannels())[:, 0]
    return audio.astype(np.float32) / 32768.0


def make_streams(audio: npt.NDArray[np.float32], count: int) -> Streams:
    n = len(audio) // FRAME * FRAME
    step = max(1, n // count)
    return [np.roll(audio[:n], i * step + i).reshape(-1, FRAME) for i in range(count)]


def run_batch1(session: ort.InferenceSession, streams: Streams, chunk: int) -> None:
    states = [VadStream() for _ in streams]
    for t in range(0, len(streams[0]), chunk):
        for state, frames in zip(states, streams, strict=True):
            run_requests(session, [[(state, frames[t : t + chunk])]], max_batch=1)


def run_batched(
    session: ort.InferenceSession, streams: Streams, chunk: int, max_batch: int
) -> None:
    states = [VadStream() for _ in streams]
    for t in range(0, len(streams[0]), chunk):
        group = [(s, f[t : t + chunk]) for s, f in zip(states, streams, strict=True)]
        run_requests(session, [group], max_batch=max_batch)


def median_cpu(fn: Callable[[], None], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--chunk-ms", type=int, default=256, help="audio per chunk per stream")
    args = parser.parse_args()

    session = load_session()
    streams = make_streams(read_mono(args.audio), args.streams)
    chunk = max(1, args.chunk_ms * SAMPLE_RATE // 1000 // FRAME)
    stream_seconds = args.streams * len(streams[0]) * FRAME / SAMPLE_RATE
    # Warm up onnxruntime (first runs allocate) so neither variant pays for it.
    run_batched(session, [s[:8] for s in streams], chunk, args.max_batch)

    one = median_cpu(lambda: run_batch1(session, streams, chunk), args.runs)
    many = median_cpu(lambda: run_batched(session, streams, chunk, args.max_batch), args.runs)

    print(
        f"{args.streams} streams x {len(streams[0]) * FRAME / SAMPLE_RATE:.2f} s of "
        f"{args.audio.name}, chunks of {chunk} frames, median of {args.runs} runs (process time)"
    )
    for label, cpu in (("batch 1", one), (f"batched (max {args.max_batch})", many)):
        per = cpu / stream_seconds
        print(
            f"  {label:<20} {per * 1e3:7.3f} ms CPU per stream-second "
            f"(real-time factor {per:.5f}; {cpu / (stream_seconds * SAMPLE_RATE / FRAME) * 1e6:.1f}"
            f" us per frame)"
        )
    print(f"  ratio batch 1 / batched: {one / many:.2f}x")


if __name__ == "__main__":
    main()
