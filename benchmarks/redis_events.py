"""Event log cost: in-memory vs Redis Streams, in the same run.

    .venv/bin/python benchmarks/redis_events.py [--events 5000] [--probes 500] [--runs 5]
                                                [--followers 1] [--redis-url URL]

Without ``--redis-url`` it starts its own ``redis-server`` on a free loopback port (no
persistence) and stops it after. For each log, ``--runs`` times:

- throughput: one session appends ``--events`` segment events back to back, as a pipeline does
  (each append awaited), while ``--followers`` subscribers follow it, as SSE readers on another
  worker would (with Redis: through their own client, like another process). Events per second
  = events / time until every follower has received the ``end``.
- latency: ``--probes`` single events, one at a time, each timed from the start of ``append`` to
  its arrival at a follower: the delay an SSE reader sees on top of the pipeline's own.

Prints the median over runs of events/s and of the latency p50/p99. This is a script, not a
test; Redis here is on loopback, so a networked Redis adds its round trip to every figure.
"""

from __future__ import annotations

import argparse
import math
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from service.config import SessionConfig
from service.events.log import EventLog, MemoryEventLog
from service.events.types import End, Segment
from service.settings import Settings
from service.store.redis_store import RedisStore

# One log to write, and a way to open a reader of it (another worker's view, with Redis).
Pair = tuple[EventLog, Callable[[], Awaitable[EventLog]]]
SUMMARY = {"bytes": 0, "audio_seconds": 0.0, "segments": 0}


def segment(i: int) -> Segment:
    # A realistic event: a final segment with the dummy model's output.
    return Segment(0, i * 0.5, i * 0.5 + 0.42, True, {"count": 6720})


@dataclass
class Figures:
    events_per_s: float
    p50_ms: float
    p99_ms: float


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


async def throughput(pair: Pair, events: int, followers: int) -> float:
    log, open_reader = pair
    readers = [await open_reader() for _ in range(followers)]
    ready = anyio.Event()
    started = 0

    async def follow(reader: EventLog) -> None:
        nonlocal started
        started += 1
        if started == followers:
            ready.set()
        async for _ in reader.follow():
            pass

    async with anyio.create_task_group() as tg:
        for reader in readers:
            tg.start_soon(follow, reader)
        await ready.wait()
        t0 = time.perf_counter()
        for i in range(events):
            await log.append(segment(i))
        await log.append(End("completed", SUMMARY))
        await log.close()
    return (events + 1) / (time.perf_counter() - t0)


async def latency(pair: Pair, probes: int) -> list[float]:
    log, open_reader = pair
    reader = await open_reader()
    arrived: dict[int, float] = {}
    wake = anyio.Event()

    async def follow() -> None:
        nonlocal wake
        async for event in reader.follow():
            arrived[event.id] = time.perf_counter()
            wake.set()

    delays: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        for i in range(probes):
            wake = anyio.Event()
            t0 = time.perf_counter()
            logged = await log.append(segment(i))
            while logged.id not in arrived:
                await wake.wait()
                wake = anyio.Event()
            delays.append(arrived[logged.id] - t0)
        await log.append(End("completed", SUMMARY))
        await log.close()
    return delays


def memory_pair() -> Pair:
    log = MemoryEventLog()

    async def reader() -> EventLog:
        return log

    return log, reader


@asynccontextmanager
async def redis_pairs(url: str) -> AsyncIterator[Callable[[], Awaitable[Pair]]]:
    settings = Settings(redis_url=url, redis_prefix=f"bench-{uuid.uuid4().hex[:8]}")
    owner, other = RedisStore(settings), RedisStore(settings)

    async def make() -> Pair:
        session_id = uuid.uuid4().hex
        await owner.create(session_id, SessionConfig(), SUMMARY)
        await owner.claim(session_id)

        async def reader() -> EventLog:
            return await other.reader(session_id)

        return owner.log(session_id), reader

    try:
        yield make
    finally:
        await owner.aclose()
        await other.aclose()


async def measure(
    make: Callable[[], Awaitable[Pair]], events: int, probes: int, followers: int
) -> Figures:
    rate = await throughput(await make(), events, followers)
    delays = await latency(await make(), probes)
    return Figures(rate, pct(delays, 0.5) * 1000, pct(delays, 0.99) * 1000)


def median_of(runs: list[Figures]) -> Figures:
    return Figures(
        statistics.median(r.events_per_s for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
    )


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install it, or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


async def main_async(args: argparse.Namespace, url: str) -> None:
    async def memory() -> Pair:
        return memory_pair()

    results: dict[str, list[Figures]] = {"memory": [], "redis": []}
    async with redis_pairs(url) as redis:
        for _ in range(args.runs):  # interleaved, so drift affects both alike
            results["memory"].append(
                await measure(memory, args.events, args.probes, args.followers)
            )
            results["redis"].append(await measure(redis, args.events, args.probes, args.followers))
    print(
        f"events per run: {args.events}, latency probes: {args.probes}, followers: "
        f"{args.followers}, runs: {args.runs} (medians); Redis at {url}"
    )
    print(f"{'log':<8} {'events/s':>12} {'latency p50':>14} {'latency p99':>14}")
    for name, runs in results.items():
        f = median_of(runs)
        print(f"{name:<8} {f.events_per_s:>12,.0f} {f.p50_ms:>11.3f} ms {f.p99_ms:>11.3f} ms")
    mem, red = median_of(results["memory"]), median_of(results["redis"])
    print(
        f"Redis adds {red.p50_ms - mem.p50_ms:.3f} ms per event at the median "
        f"({red.p99_ms - mem.p99_ms:.3f} ms at p99)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--probes", type=int, default=500)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--followers", type=int, default=1)
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = p.parse_args()
    process = None
    url = args.redis_url
    if url is None:
        process, url = start_redis()
    try:
        anyio.run(main_async, args, url)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
