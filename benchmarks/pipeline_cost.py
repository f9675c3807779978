"""Event-loop CPU per live chunk of the session pipeline alone, without HTTP or SSE.

    .venv/bin/python benchmarks/pipeline_cost.py [--streams 300] [--duration 10] [--runs 3]
    .venv/bin/python benchmarks/pipeline_cost.py --baseline ../other-checkout   # A/B

In this process: the app's lifespan (the real VAD batcher, model runner, registry, metrics and
tracing; free model), ``--streams`` sessions of raw s16le 16 kHz speech (tests/data/speech.wav,
looped), each fed one 100 ms chunk per 100 ms through ``Session.write`` on a 10 ms grid of slots,
as the load generator paces its uploads. The figure is the event-loop thread's CPU time
(``time.thread_time``) from the sixth chunk to the last, divided by the chunks written: what
decoding, VAD framing, batching, segmenting, the model stage and the event log cost the loop per
chunk. The worker threads (onnxruntime, the model) are not counted.

Less noisy than a load test (one process, no sockets), so small changes show: ``--baseline DIR``
runs another checkout's ``service`` package in alternation with this one and prints the ratio of
the medians (machines are shared; only same-run comparisons count). A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK_BYTES = 3200  # 100 ms of s16le at 16 kHz
SLOTS = 10  # streams start on a 10 ms grid, as loadgen's default --slot-ms


def _measure(streams: int, duration: float) -> float:
    """One run in this process; returns loop microseconds per chunk."""
    import time
    import wave

    import anyio

    from service.app import create_app
    from service.config import PcmFormat, parse_session_config
    from service.settings import Settings

    settings = Settings.from_env(
        {
            "STREAMER_MODEL_OPTIONS": '{"delay": 0, "constant_factor": 0, "jitter": 0}',
            "STREAMER_MAX_SESSIONS": "100000",
            "STREAMER_LOG_LEVEL": "WARNING",
        }
    )
    app = create_app(settings)
    with wave.open(str(ROOT / "tests" / "data" / "speech.wav")) as w:
        pcm = w.readframes(w.getnframes())
    need = int(duration * 16000) * 2
    audio = (pcm * (need // len(pcm) + 1))[:need]
    chunks = [audio[i : i + CHUNK_BYTES] for i in range(0, len(audio), CHUNK_BYTES)]
    skip = 5  # the first chunks open sessions and warm caches

    async def main() -> float:
        async with app.router.lifespan_context(app):
            registry = app.state.registry
            ids = [await registry.create(parse_session_config({})) for _ in range(streams)]
            sessions = [await registry.start(i, PcmFormat()) for i in ids]
            t0 = time.monotonic() + 0.2
            start: list[float] = []

            async def slot(k: int) -> None:
                mine = sessions[k::SLOTS]
                for c, chunk in enumerate(chunks):
                    await anyio.sleep(max(0.0, t0 + c * 0.1 + k * 0.01 - time.monotonic()))
                    if c == skip and k == 0:
                        start.append(time.thread_time())
                    for s in mine:
                        await s.write(chunk)
                for s in mine:
                    s.close_input()

            async with anyio.create_task_group() as tg:
                for k in range(SLOTS):
                    tg.start_soon(slot, k)
            cpu = time.thread_time() - start[0]
            with anyio.fail_after(60):
                for s in sessions:
                    await s.done.wait()
        return cpu / ((len(chunks) - skip) * streams) * 1e6

    return anyio.run(main)


def _run_in(checkout: Path, streams: int, duration: float) -> float:
    """One run in a fresh interpreter whose ``service`` package comes from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(
        [sys.executable, __file__, "--one", "--streams", str(streams), "--duration", str(duration)],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio per stream")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="another checkout to compare, run alternately")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(f"{_measure(args.streams, args.duration):.2f}")
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine

    print(machine())
    ours: list[float] = []
    base: list[float] = []
    for run in range(1, args.runs + 1):
        if args.baseline is not None:
            base.append(_run_in(args.baseline.resolve(), args.streams, args.duration))
            print(f"  run {run}: baseline {base[-1]:.1f} us/chunk")
        ours.append(_run_in(ROOT, args.streams, args.duration))
        print(f"  run {run}: this checkout {ours[-1]:.1f} us/chunk")
    line = f"{args.streams} streams, loop CPU per chunk, median of {args.runs}: "
    line += f"{statistics.median(ours):.1f} us"
    if base:
        ratio = statistics.median(ours) / statistics.median(base)
        line += f"; baseline {statistics.median(base):.1f} us; ratio {ratio:.3f}"
    print(line)


if __name__ == "__main__":
    main()
