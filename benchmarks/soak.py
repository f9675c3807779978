"""Soak: many short sessions, then a batch of concurrent ones; reports the server's RSS before and
after, to show memory stays bounded (ended sessions are dropped after retention).

    uv run python benchmarks/soak.py                      # spawns a server (fast dummy model)
    uv run python benchmarks/soak.py --sessions 1000 --concurrent 200

Not a test: a script that prints figures. Traffic goes to 127.0.0.1 only, bounded in count.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
SPEECH = (ROOT / "tests" / "data" / "speech.wav").read_bytes()
SHORT = SPEECH[: 44 + 32000 * 2]  # the first utterance: 2 s


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spawn(retention: float) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "STREAMER_MODEL_OPTIONS": '{"delay": 0.01, "constant_factor": 0, "jitter": 0}',
        "STREAMER_RETENTION_SECONDS": str(retention),
        "STREAMER_LOG_LEVEL": "WARNING",
        "STREAMER_MAX_SESSIONS": "5000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


async def one_session(client: httpx.AsyncClient) -> tuple[int, float]:
    t0 = time.monotonic()
    created = (await client.post("/v1/sessions")).json()
    r = await client.post(created["audio_url"], content=SHORT)
    async with client.stream("GET", created["events_url"]) as events:
        async for _ in events.aiter_lines():
            pass
    return r.json()["segments"], time.monotonic() - t0


async def run(url: str, n: int, concurrency: int) -> dict[str, Any]:
    limiter = anyio.CapacityLimiter(concurrency)
    segments: list[int] = []
    latencies: list[float] = []
    failures = 0
    errors: list[str] = []  # what the first few failures were: a count alone says nothing
    limits = httpx.Limits(
        max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2
    )
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def task() -> None:
            nonlocal failures
            async with limiter:
                try:
                    s, t = await one_session(client)
                    segments.append(s)
                    latencies.append(t)
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    failures += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(task)
    return {
        "sessions": n,
        "failures": failures,
        "segments": sum(segments),
        "median_s": statistics.median(latencies) if latencies else float("nan"),
        "errors": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--sequential-concurrency", type=int, default=8)
    p.add_argument("--concurrent", type=int, default=200)
    p.add_argument("--retention", type=float, default=2.0)
    args = p.parse_args()
    proc, url = spawn(args.retention)
    try:
        anyio.run(run, url, 20, 4)  # warm-up: model loaded, threads started
        time.sleep(args.retention + 1)
        before = rss_mib(proc.pid)
        t0 = time.monotonic()
        short = anyio.run(run, url, args.sessions, args.sequential_concurrency)
        t_short = time.monotonic() - t0
        after_short = rss_mib(proc.pid)
        burst = anyio.run(run, url, args.concurrent, args.concurrent)
        peak = rss_mib(proc.pid)
        time.sleep(args.retention + 2)
        live = httpx.get(f"{url}/readyz").json().get("sessions")
        after = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    report = {
        "short_sessions": short,
        "short_wall_s": round(t_short, 1),
        "concurrent_batch": burst,
        "rss_mib_before": round(before, 1),
        "rss_mib_after_short": round(after_short, 1),
        "rss_mib_after_burst": round(peak, 1),
        "rss_mib_after_retention": round(after, 1),
        "live_sessions_after": live,
    }
    print(f"{'RSS before (MiB)':<34}{before:8.1f}")
    print(f"{f'RSS after {args.sessions} sessions':<34}{after_short:8.1f}")
    print(f"{f'RSS after {args.concurrent} concurrent':<34}{peak:8.1f}")
    print(f"{'RSS after retention expired':<34}{after:8.1f}")
    print(f"{'failures':<34}{short['failures'] + burst['failures']:8}")
    for error in short["errors"] + burst["errors"]:
        print(f"  {error}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
