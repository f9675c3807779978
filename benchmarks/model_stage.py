"""The model stage under load: live raw-PCM streams at real time against a SLOW model.

Every other load figure is taken with a free model; users bring a slow one. This runs the load
generator's streams (benchmarks/loadgen.py: POST a session, one SSE connection, a chunked upload
of 100 ms chunks at real time, speech.wav looped: an utterance every ~2.6 s) against a fresh
server with the seed's default dummy model (delay 0.5 s, constant_factor 0.3, jitter 0.2) on 4
model threads, for N = 50/100/200/400 streams, and reports per step:

- streams admitted / refused (503 server_overloaded) / failed (an error event, e.g.
  model_overloaded, or no clean end);
- ``inactive`` lag p99 beyond the VAD's own redemption wait (the audio path; target < 250 ms);
- final lag p50/p99 since the audio up to the speech's end was sent (what a user waits after
  they stop speaking, the VAD's 608 ms included; target p99 < 3.5 s: the dummy alone takes up
  to 0.5 + 0.3 x 2.3 + 0.2 = 1.4 s on speech.wav's longest utterance);
- the model's mean batch size and calls per second, from the server's /metrics;
- ``lagging`` events received.

"on target" = the admitted streams all completed without errors, none fell behind, inactive
p99 < 250 ms and final p99 < 3.5 s; "held" = on target with none refused.

    .venv/bin/python benchmarks/model_stage.py                  # N = 50,100,200,400
    .venv/bin/python benchmarks/model_stage.py --streams 400 --runs 3
    .venv/bin/python benchmarks/model_stage.py --model-options '{"max_batch_size": 1}'
    .venv/bin/python benchmarks/model_stage.py --free           # the free model beside it
    .venv/bin/python benchmarks/model_stage.py --workers 2      # two workers and Redis
    .venv/bin/python benchmarks/model_stage.py --workers 2 --resumable  # the journal's cost

(``max_batch_size`` 1 is past capacity: 4 threads x ~1 s per utterance hold ~10 streams.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Proc, median, raise_fd_limit, start_server  # noqa: E402
from benchmarks.loadgen import Options, raw_audio, run_step, wait_idle, warm_up  # noqa: E402

DEFAULT_MODEL = {"delay": 0.5, "constant_factor": 0.3, "jitter": 0.2}
FREE_MODEL = {"delay": 0.0, "constant_factor": 0.0, "jitter": 0.0}
INACTIVE_BUDGET_MS = 250.0
FINAL_BUDGET_MS = 3500.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A throwaway redis-server for --workers > 1."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("--workers needs redis-server (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.process = subprocess.Popen(
            [exe, "--port", str(self.port), "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


MODEL_SERIES = (
    "streamer_model_batch_size_sum",
    "streamer_model_batch_size_count",
    "streamer_model_dropped_calls_total",
)


async def scrape(url: str, workers: int) -> dict[str, float]:
    """The model's counters, summed over label sets; with several workers each scrape lands on
    one of them, so several scrapes are taken and the largest value per worker kept (a counter
    only grows): an estimate, said so in the output."""
    from prometheus_client.parser import text_string_to_metric_families

    seen: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        for _ in range(1 if workers == 1 else workers * 6):
            r = await client.get(f"{url}/metrics")
            text = r.text
            values: dict[str, float] = {}
            pid = "0"
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in MODEL_SERIES:
                        values[sample.name] = values.get(sample.name, 0.0) + sample.value
                    elif sample.name == "process_start_time_seconds":
                        pid = str(sample.value)
            prev = seen.get(pid, {})
            seen[pid] = {k: max(v, prev.get(k, 0.0)) for k, v in values.items()}
    out: dict[str, float] = {}
    for values in seen.values():
        for k, v in values.items():
            out[k] = out.get(k, 0.0) + v
    return out


async def step(opts: Options, n: int, workers: int, resumable: bool = False) -> dict[str, Any]:
    audio = raw_audio(opts.duration, opts.chunk_ms)
    if resumable:  # with Redis, every byte is journaled
        audio = dataclasses.replace(audio, config={**audio.config, "resumable": True})
    await wait_idle(opts.url)
    before = await scrape(opts.url, workers)
    result = await run_step(opts, audio, n)
    await anyio.sleep(1.0)
    after = await scrape(opts.url, workers)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    calls = delta("streamer_model_batch_size_count")
    result["model_calls"] = int(calls)
    result["mean_batch"] = (
        round(delta("streamer_model_batch_size_sum") / calls, 2) if calls else None
    )
    result["model_calls_per_s"] = round(calls / result["wall_s"], 2) if result["wall_s"] else None
    result["dropped_calls"] = int(delta("streamer_model_dropped_calls_total"))
    admitted = result["streams"] - result["refused"]
    result["admitted"] = admitted
    inactive, final = result["inactive_lag_p99_ms"], result["final_sent_lag_p99_ms"]
    result["on_target"] = bool(
        admitted > 0
        and result["failed"] == 0
        and result["behind"] == 0
        and inactive is not None
        and inactive < INACTIVE_BUDGET_MS
        and final is not None
        and final < FINAL_BUDGET_MS
    )
    result["model_held"] = result["on_target"] and result["refused"] == 0
    return result


COLUMNS = [
    ("N", "streams"),
    ("admitted", "admitted"),
    ("refused", "refused"),
    ("failed", "failed"),
    ("behind", "behind"),
    ("inactive p99 ms", "inactive_lag_p99_ms"),
    ("final p50 ms", "final_sent_lag_p50_ms"),
    ("final p99 ms", "final_sent_lag_p99_ms"),
    ("mean batch", "mean_batch"),
    ("calls/s", "model_calls_per_s"),
    ("lagging", "lagging_events"),
    ("on target", "on_target"),
    ("held", "model_held"),
    ("srv cpu%", "server_cpu_pct"),
    ("load", "loadavg_1m"),
]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def print_table(rows: list[dict[str, Any]]) -> None:
    widths = [max(len(h), *(len(fmt(r[k])) for r in rows)) for h, k in COLUMNS]
    print("  ".join(h.rjust(w) for (h, _), w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(fmt(r[k]).rjust(w) for (_, k), w in zip(COLUMNS, widths, strict=True)))
        if r["error_codes"] or r["first_failure"]:
            print(f"      errors: {r['error_codes']}  first failure: {r['first_failure']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--streams", default="50,100,200,400", help="comma-separated N")
    p.add_argument("--runs", type=int, default=1, help="rounds over every N (fresh server each)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of audio per stream")
    p.add_argument("--ramp-ms", type=float, default=10.0, help="ms between stream starts")
    p.add_argument("--threads", type=int, default=4, help="STREAMER_MODEL_THREADS")
    p.add_argument("--model-options", default="{}", help="JSON merged over the default dummy's")
    p.add_argument("--free", action="store_true", help="a free model (no sleep) instead")
    p.add_argument("--workers", type=int, default=1, help=">1: several workers sharing Redis")
    p.add_argument(
        "--resumable",
        action="store_true",
        help='sessions created {"resumable": true} (with --workers: their audio kept in Redis)',
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="more server settings"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    model = dict(FREE_MODEL if args.free else DEFAULT_MODEL)
    model.update(json.loads(args.model_options))
    env = {
        "STREAMER_MODEL_OPTIONS": json.dumps(model),
        "STREAMER_MODEL_THREADS": str(args.threads),
        "STREAMER_MAX_SESSIONS": "100000",
    }
    env.update(item.split("=", 1) for item in args.env)
    ns = [int(n) for n in args.streams.split(",")]
    rows: list[dict[str, Any]] = []
    print(
        f"model {json.dumps(model)}, {args.threads} threads, {args.workers} worker(s)"
        f"{', resumable' if args.resumable else ''}; "
        f"{args.duration:g} s streams started {args.ramp_ms:g} ms apart; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for run in range(args.runs):
        for n in ns:
            redis = Redis() if args.workers > 1 else None
            server_env = dict(env)
            if redis is not None:
                server_env["STREAMER_REDIS_URL"] = redis.url
                server_env["STREAMER_WORKERS"] = str(args.workers)
            server = start_server(server_env)
            try:
                opts = Options(
                    server.url,
                    Proc(server.process.pid),
                    n,
                    args.duration,
                    n * args.ramp_ms / 1000,
                    100,
                    False,
                    "raw",
                    "detectable",
                    10,
                )

                async def go(opts: Options = opts, n: int = n) -> dict[str, Any]:
                    await warm_up(opts.url, False)
                    return await step(opts, n, args.workers, args.resumable)

                row = anyio.run(go)
            finally:
                server.stop()
                if redis is not None:
                    redis.stop()
            row["run"] = run
            rows.append(row)
            print(
                f"run {run} N={n}: admitted {row['admitted']} refused {row['refused']} "
                f"failed {row['failed']} inactive p99 {fmt(row['inactive_lag_p99_ms'])} ms "
                f"final p50/p99 {fmt(row['final_sent_lag_p50_ms'])}/"
                f"{fmt(row['final_sent_lag_p99_ms'])} ms batch {fmt(row['mean_batch'])} "
                f"on target {fmt(row['on_target'])} held {fmt(row['model_held'])}",
                file=sys.stderr,
                flush=True,
            )
    print()
    print_table(rows)
    if args.runs > 1:
        print("\nmedians over runs:")
        for n in ns:
            mine = [r for r in rows if r["streams"] == n]
            keys = ("inactive_lag_p99_ms", "final_sent_lag_p50_ms", "final_sent_lag_p99_ms")
            meds = {k: median([r[k] for r in mine if r[k] is not None] or [0]) for k in keys}
            held = sum(r["model_held"] for r in mine)
            on_target = sum(r["on_target"] for r in mine)
            admitted = median([r["admitted"] for r in mine])
            print(
                f"  N={n}: held {held}/{len(mine)}  on target {on_target}/{len(mine)}"
                f"  admitted {admitted}"
                f"  inactive p99 {meds[keys[0]]:.0f} ms  final p50 {meds[keys[1]]:.0f} ms"
                f"  final p99 {meds[keys[2]]:.0f} ms"
            )
    print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
