"""Server memory per live session: RSS delta / N with N real-time uploads in progress.

    .venv/bin/python benchmarks/session_memory.py [--streams 200] [--runs 3] [--formats raw,webm]

Per run, a fresh server (``python -m service``, free model, logging at WARNING) is warmed up
(a few short sessions of each format, so lazy imports, onnxruntime's arena and the thread pools
exist), left idle, and its RSS sampled: the baseline. Then ``--streams`` sessions start within
``--ramp`` seconds, each with an SSE subscriber and a chunked upload paced at real time
(``--chunk-ms`` per chunk). Once every stream is ``--hold`` seconds into its audio (the pipeline
holding utterances in flight, VAD state, event logs, queues; for webm the demuxer and libopus state)
RSS is sampled for ``--sample`` seconds while the uploads go on; the median of those samples minus
the baseline, divided by N, is the figure. Then every upload ends and the server is stopped.

- ``raw``: s16le 16 kHz mono declared with ``?encoding=s16le&sample_rate=16000&channels=1``
  (the numpy path; WAV takes the same path after its header).
- ``webm``: webm/opus 48 kHz 32 kbit/s, sniffed (our demuxer and libopus in the shared decoding
  thread; ``--env STREAMER_OPUS_DECODER=ffmpeg`` for the PyAV path, a decoding thread each).

Median over ``--runs`` runs. Target: <= 2 MB per session.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    Proc,
    StreamResult,
    cut,
    live_stream,
    long_audio,
    machine,
    median,
    start_server,
)

TARGET_MB = 2.0
RAW_QUERY = "?encoding=s16le&sample_rate=16000&channels=1"
MB = 1e6


def sample_rss(proc: Proc, seconds: float, interval: float = 0.1) -> list[int]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(proc.rss_bytes())
        time.sleep(interval)
    return out


async def sample_rss_async(proc: Proc, seconds: float, interval: float = 0.1) -> list[int]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(proc.rss_bytes())
        await asyncio.sleep(interval)
    return out


async def streams(
    port: int,
    n: int,
    chunks: list[bytes],
    chunk_s: float,
    query: str,
    ramp: float,
    hold: float,
    sample: float,
    proc: Proc | None,
) -> tuple[list[StreamResult], list[int], int]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    t0 = loop.time() + 0.5
    tasks = [
        asyncio.create_task(
            live_stream(
                "127.0.0.1",
                port,
                chunks,
                chunk_s,
                query=query,
                stop=stop,
                start_at=t0 + ramp * i / max(1, n),
            )
        )
        for i in range(n)
    ]
    samples: list[int] = []
    threads = 0
    if proc is not None:
        await asyncio.sleep(max(0.0, t0 + ramp + hold - loop.time()))
        samples = await sample_rss_async(proc, sample)
        threads = proc.threads()
    stop.set()
    results = await asyncio.gather(*tasks)
    return results, samples, threads


def one_run(fmt: str, files: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    chunk_s = args.chunk_ms / 1000
    if fmt == "raw":
        wav = files["wav"].read_bytes()
        pcm = wav[44:]  # ffmpeg's canonical 44-byte header
        chunks = cut(pcm, len(pcm) / 32000, chunk_s)
        query = RAW_QUERY
    else:
        data = files["webm"].read_bytes()
        chunks = cut(data, files["seconds"], chunk_s)
        query = ""
    with start_server(dict(item.split("=", 1) for item in args.env)) as server:
        proc = server.proc()
        # Warm-up: a few short sessions of both formats, then idle.
        for f in ("raw", "webm"):
            if f == "raw":
                w = files["wav"].read_bytes()[44:]
                warm, q = cut(w, len(w) / 32000, chunk_s)[:20], RAW_QUERY
            else:
                d = files["webm"].read_bytes()
                warm, q = cut(d, files["seconds"], chunk_s)[:20], ""
            asyncio.run(streams(server.port, 5, warm, 0.0, q, 0.0, 0.0, 0.0, None))
        time.sleep(1.0)
        base = median(sample_rss(proc, 2.0))
        threads0 = proc.threads()
        results, samples, threads = asyncio.run(
            streams(
                server.port,
                args.streams,
                chunks,
                chunk_s,
                query,
                args.ramp,
                args.hold,
                args.sample,
                proc,
            )
        )
        failed = [r for r in results if r.failure or (r.end or {}).get("reason") != "completed"]
        loaded = median(samples)
        return {
            "base_mb": base / MB,
            "loaded_mb": loaded / MB,
            "per_session_mb": (loaded - base) / args.streams / MB,
            "threads_base": threads0,
            "threads_loaded": threads,
            "failed": len(failed),
            "first_failure": (failed[0].failure or str(failed[0].end)) if failed else "",
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--formats", default="raw,webm")
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--ramp", type=float, default=3.0, help="seconds over which streams start")
    p.add_argument("--hold", type=float, default=4.0, help="seconds of audio before sampling")
    p.add_argument("--sample", type=float, default=3.0, help="seconds of RSS sampling")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server environment, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    args = p.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, object] = dict(long_audio(Path(tmp), 4))  # ~30 s: longer than a run
        files["seconds"] = 4 * 240000 / 32000
        table = {}
        for fmt in args.formats.split(","):
            runs = []
            for i in range(args.runs):
                r = one_run(fmt, files, args)
                runs.append(r)
                print(
                    f"  {fmt} run {i + 1}: base {r['base_mb']:.1f} MB, loaded {r['loaded_mb']:.1f}"
                    f" MB, {r['per_session_mb']:.3f} MB/session, threads {r['threads_base']:.0f}"
                    f" -> {r['threads_loaded']:.0f}, failed {r['failed']:.0f} "
                    f"{r['first_failure']}",
                    flush=True,
                )
            table[fmt] = runs
    print()
    print(
        f"{'format':<6} {'N':>4} {'base MB':>8} {'loaded MB':>10} {'MB/session':>11} "
        f"{'min..max':>13} {'threads':>12}"
    )
    for fmt, runs in table.items():
        per = [r["per_session_mb"] for r in runs]
        ok = "ok" if median(per) <= TARGET_MB else f"MISSES {TARGET_MB}"
        print(
            f"{fmt:<6} {args.streams:>4} {median([r['base_mb'] for r in runs]):8.1f} "
            f"{median([r['loaded_mb'] for r in runs]):10.1f} {median(per):11.3f} "
            f"{min(per):6.3f}..{max(per):6.3f} "
            f"{median([r['threads_base'] for r in runs]):5.0f}->"
            f"{median([r['threads_loaded'] for r in runs]):<5.0f}  {ok}"
        )
    print(f"medians of {args.runs} runs (a fresh server each); MB = 10^6 bytes of RSS")


if __name__ == "__main__":
    main()
