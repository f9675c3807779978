"""Final-segment latency at the SSE client after the model returns, at N real-time streams.

    .venv/bin/python benchmarks/final_latency.py [--streams 100] [--runs 3] [--duration 30]

The model's return time is not visible to a client, so the server runs a model that reports it:
``benchmarks.common:timestamp_model``, the dummy model (same options; by default the test
suite's fast one, 50 ms + 1% of the audio, no jitter) whose output adds
``"returned_at": time.time()`` taken as ``infer`` returns in the worker thread. It travels in the
``segment`` event; the client takes ``time.time()`` when the bytes completing each final segment
arrive and records ``arrival - returned_at``: the thread hand-back, the event loop, the event
log, the SSE encoding, hypercorn, the socket and the client's own read. Client and server share
the machine's clock. The SSE sockets also carry ``SO_TIMESTAMPNS``, so each read says when the
kernel received the bytes: ``kernel - returned_at`` is the same latency without the client's own
event-loop delay (the client shares the two cores with the server and runs all the streams).

Each stream creates a session, subscribes to its events, and uploads raw s16le 16 kHz mono
(tests/data/speech.wav looped to ``--duration``) in ``--chunk-ms`` chunks at real-time pace, the
streams starting within ``--ramp`` seconds. Each run first measures one stream alone (the
unloaded baseline, same server, same run), then ``--streams`` at once. The client is one asyncio
process with raw sockets; its own event-loop lag is reported, since it is part of what it
measures. Median of the runs' p50/p99. Target: p99 <= 20 ms at 100 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    Proc,
    StreamResult,
    cut,
    live_stream,
    loop_lag_sampler,
    machine,
    median,
    pct,
    speech_pcm,
    start_server,
)

TARGET_MS = 20.0
FAST_MODEL = '{"delay": 0.05, "constant_factor": 0.01, "jitter": 0.0}'
RAW_QUERY = "?encoding=s16le&sample_rate=16000&channels=1"


def latencies(results: list[StreamResult]) -> tuple[list[float], list[float]]:
    """Per final segment: (client read - returned_at), (kernel receipt - returned_at)."""
    read, kernel = [], []
    for r in results:
        for e in r.events:
            if e.event == "segment":
                data = json.loads(e.data)
                if data.get("is_final") and "returned_at" in data:
                    read.append(e.arrived - float(data["returned_at"]))
                    kernel.append(e.kernel - float(data["returned_at"]))
    return read, kernel


async def step(
    port: int, n: int, chunks: list[bytes], chunk_s: float, ramp: float, proc: Proc
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    sampler = asyncio.create_task(loop_lag_sampler(lags))
    t0 = loop.time() + 0.5
    cpu0 = proc.cpu_seconds()
    w0 = loop.time()
    results = await asyncio.gather(
        *(
            live_stream(
                "127.0.0.1",
                port,
                chunks,
                chunk_s,
                query=RAW_QUERY,
                start_at=t0 + ramp * i / max(1, n),
            )
            for i in range(n)
        )
    )
    wall = loop.time() - w0
    cpu = proc.cpu_seconds() - cpu0
    sampler.cancel()
    lat, kern = latencies(results)
    failed = [r for r in results if r.failure or (r.end or {}).get("reason") != "completed"]
    return {
        "n": n,
        "finals": len(lat),
        "p50_ms": pct(lat, 0.5) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "max_ms": max(lat) * 1e3 if lat else float("nan"),
        "k50_ms": pct(kern, 0.5) * 1e3,
        "k99_ms": pct(kern, 0.99) * 1e3,
        "failed": len(failed),
        "client_loop_lag_p99_ms": pct(lags, 0.99) * 1e3,
        "server_cpu_pct": 100 * cpu / wall,
    }


def show(label: str, r: dict[str, float]) -> None:
    print(
        f"  {label}: N={r['n']:.0f} finals {r['finals']:.0f}, after model return p50 "
        f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms (kernel receipt "
        f"p50 {r['k50_ms']:.1f}, p99 {r['k99_ms']:.1f}); failed "
        f"{r['failed']:.0f}; server CPU {r['server_cpu_pct']:.0f}% of a core; client loop lag "
        f"p99 {r['client_loop_lag_p99_ms']:.1f} ms",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio per stream")
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--ramp", type=float, default=5.0)
    p.add_argument("--model-options", default=FAST_MODEL)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    pcm = speech_pcm()
    n = int(args.duration * 16000) * 2
    data = (pcm * (n // len(pcm) + 1))[:n]
    chunk_s = args.chunk_ms / 1000
    chunks = cut(data, args.duration, chunk_s)
    env = {
        "STREAMER_MODEL": "benchmarks.common:timestamp_model",
        "STREAMER_MODEL_OPTIONS": args.model_options,
        **dict(item.split("=", 1) for item in args.env),
    }
    print(f"machine: {machine()}")
    with start_server(env) as server:
        proc = server.proc()
        asyncio.run(step(server.port, 4, chunks[:40], chunk_s, 0.0, proc))  # warm-up
        ones, manys = [], []
        for i in range(args.runs):
            one = asyncio.run(step(server.port, 1, chunks, chunk_s, 0.0, proc))
            show(f"run {i + 1} baseline", one)
            many = asyncio.run(step(server.port, args.streams, chunks, chunk_s, args.ramp, proc))
            show(f"run {i + 1} loaded  ", many)
            ones.append(one)
            manys.append(many)
    print()
    print(
        f"{'streams':>7} {'finals/run':>10} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'kernel p50':>10} {'kernel p99':>10} {'srv CPU%':>8} {'client lag p99':>14}"
    )
    for rows in (ones, manys):
        p99 = median([r["p99_ms"] for r in rows])
        mark = "" if rows is ones else ("  ok" if p99 <= TARGET_MS else f"  MISSES {TARGET_MS}")
        print(
            f"{rows[0]['n']:7.0f} {median([r['finals'] for r in rows]):10.0f} "
            f"{median([r['p50_ms'] for r in rows]):7.1f} {p99:7.1f} "
            f"{median([r['max_ms'] for r in rows]):7.1f} "
            f"{median([r['k50_ms'] for r in rows]):10.1f} "
            f"{median([r['k99_ms'] for r in rows]):10.1f} "
            f"{median([r['server_cpu_pct'] for r in rows]):8.0f} "
            f"{median([r['client_loop_lag_p99_ms'] for r in rows]):14.1f}{mark}"
        )
    ratio = median([r["p99_ms"] for r in manys]) / median([r["p99_ms"] for r in ones])
    print(
        f"medians of {args.runs} runs; p99 loaded / unloaded: {ratio:.1f}x; "
        f"{args.duration:g} s streams, {args.chunk_ms} ms chunks"
    )


if __name__ == "__main__":
    main()
