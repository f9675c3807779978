"""Event-loop CPU per live chunk of the session pipeline alone, without HTTP or SSE.

    .venv/bin/python benchmarks/pipeline_cost.py [--streams 300] [--duration 10] [--runs 3]
    .venv/bin/python benchmarks/pipeline_cost.py --baseline ../other-checkout   # A/B
    .venv/bin/python benchmarks/pipeline_cost.py --format webm

In this process: the app's lifespan (the real VAD batcher, model runner, registry, metrics and
tracing; free model), ``--streams`` sessions of raw s16le 16 kHz speech (tests/data/speech.wav,
looped), each fed one 100 ms chunk per 100 ms through ``Session.write`` on a 10 ms grid of slots,
as the load generator paces its uploads. The figure is the event-loop thread's CPU time
(``time.thread_time``) from the sixth chunk to the last, divided by the chunks written: what
decoding, VAD framing, batching, segmenting, the model stage and the event log cost the loop per
chunk. The worker threads (onnxruntime, the model) are not counted.

With ``--format webm`` the sessions get loadgen's webm/opus (MediaRecorder-like live muxing, cut
in 100 ms slices of bytes) with the format left to sniffing, so the Opus decoding process does
the decoding; its CPU per chunk is printed next to the loop's.

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


def _chunks(fmt: str, duration: float) -> list[bytes]:
    if fmt == "webm":
        sys.path.insert(0, str(ROOT))
        from benchmarks.loadgen import webm_audio

        return webm_audio(duration, 100).chunks
    import wave

    with wave.open(str(ROOT / "tests" / "data" / "speech.wav")) as w:
        pcm = w.readframes(w.getnframes())
    need = int(duration * 16000) * 2
    audio = (pcm * (need // len(pcm) + 1))[:need]
    return [audio[i : i + CHUNK_BYTES] for i in range(0, len(audio), CHUNK_BYTES)]


def _children_cpu() -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _measure(streams: int, duration: float, fmt: str) -> tuple[float, float]:
    """One run in this process; returns loop and child-process microseconds per chunk."""
    import time

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
    chunks = _chunks(fmt, duration)
    fmt_given = PcmFormat() if fmt == "raw" else None  # webm: sniffed
    skip = 5  # the first chunks open sessions and warm caches

    async def main() -> tuple[float, float]:
        async with app.router.lifespan_context(app):
            registry = app.state.registry
            ids = [await registry.create(parse_session_config({})) for _ in range(streams)]
            sessions = [await registry.start(i, fmt_given) for i in ids]
            t0 = time.monotonic() + 0.2
            start: list[float] = []
            child_start: list[float] = []

            async def slot(k: int) -> None:
                mine = sessions[k::SLOTS]
                for c, chunk in enumerate(chunks):
                    await anyio.sleep(max(0.0, t0 + c * 0.1 + k * 0.01 - time.monotonic()))
                    if c == skip and k == 0:
                        start.append(time.thread_time())
                        child_start.append(_children_cpu())
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
            child = _children_cpu() - child_start[0]
        per_chunk = 1e6 / ((len(chunks) - skip) * streams)
        return cpu * per_chunk, child * per_chunk

    return anyio.run(main)


def _run_in(checkout: Path, streams: int, duration: float, fmt: str) -> tuple[float, float]:
    """One run in a fresh interpreter whose ``service`` package comes from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    one = ["--one", "--streams", str(streams), "--duration", str(duration), "--format", fmt]
    out = subprocess.run(
        [sys.executable, __file__, *one],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    loop, child = out.stdout.strip().splitlines()[-1].split()
    return float(loop), float(child)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio per stream")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--format", choices=["raw", "webm"], default="raw")
    p.add_argument("--baseline", type=Path, help="another checkout to compare, run alternately")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        loop, child = _measure(args.streams, args.duration, args.format)
        print(f"{loop:.2f} {child:.2f}")
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine

    print(machine())
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    webm = args.format == "webm"

    def show(figures: tuple[float, float]) -> str:
        loop, child = figures
        return f"{loop:.1f} us/chunk" + (f" + decoding process {child:.1f}" if webm else "")

    for run in range(1, args.runs + 1):
        if args.baseline is not None:
            base.append(_run_in(args.baseline.resolve(), args.streams, args.duration, args.format))
            print(f"  run {run}: baseline {show(base[-1])}")
        ours.append(_run_in(ROOT, args.streams, args.duration, args.format))
        print(f"  run {run}: this checkout {show(ours[-1])}")

    def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    line = f"{args.streams} {args.format} streams, CPU per chunk, median of {args.runs}: "
    line += f"loop {show(medians(ours))}"
    if base:
        ratio = medians(ours)[0] / medians(base)[0]
        line += f"; baseline {show(medians(base))}; loop ratio {ratio:.3f}"
        if webm:
            both = sum(medians(ours)) / sum(medians(base))
            line += f", loop + process ratio {both:.3f}"
    print(line)


if __name__ == "__main__":
    main()
