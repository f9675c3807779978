"""Fault benchmark for resumable uploads (docs/resume.md): N live streams, each cut several times.

Every stream creates a resumable session and uploads a WAV paced at real time (chunked HTTP/1.1,
one chunk per ``--chunk-ms``). At ``--cuts`` random moments its connection is reset (SO_LINGER
0, then close: a network that vanished); the client then does what a resuming client does: asks
``HEAD .../audio`` until the server says ``awaiting_resume``, opens a new upload with
``Upload-Offset`` at the server's offset, sends at once the audio "recorded" meanwhile, and goes
on at real time. Once all streams have ended, each session's whole event log (SSE, replayed from
the start) is compared with that of one uncut upload of the same audio:

- lost: events of the uncut upload missing from the resumed one (a multiset difference, on
  type, times, counts and the end's reason and bytes);
- duplicated: events the resumed one has beyond the uncut one's.
The target for both is 0.

The resume latency of one cut is the time from the reset to the server accepting the new
upload's first bytes (its offset, polled every 10 ms, moves past the resume point): detection
of the cut by the server, the client's HEAD and the new connection together.

    .venv/bin/python benchmarks/resume_faults.py --spawn --streams 100 --cuts 3 --seconds 15
    .venv/bin/python benchmarks/resume_faults.py --spawn --redis-url redis://127.0.0.1:6390/0
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import time
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    ChunkedUpload,
    _read_head,
    create_session,
    machine,
    median,
    pct,
    raise_fd_limit,
    speech_pcm,
    sse_events,
    start_server,
)


def wav_of(seconds: float) -> bytes:
    pcm = speech_pcm()
    need = int(seconds * 32000) // 2 * 2
    data = (pcm * (need // len(pcm) + 1))[:need]
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(data)
    return out.getvalue()


def key(event: str, data: dict[str, Any]) -> tuple[Any, ...]:
    if event == "segment":
        return (event, data["is_final"], data["start_time"], data["end_time"], data.get("count"))
    if event in ("active", "inactive"):
        return (event, data["time"], data["channel"])
    if event == "end":
        return (event, data["reason"], data["bytes"])
    return (event, data.get("code"))


async def events_of(host: str, port: int, session_id: str) -> Counter[tuple[Any, ...]]:
    got: Counter[tuple[Any, ...]] = Counter()
    async for e in sse_events(host, port, f"/v1/sessions/{session_id}/events"):
        got[key(e.event, json.loads(e.data))] += 1
    return got


async def head(host: str, port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status, headers = await _read_head(reader)
        if status != 200:
            raise RuntimeError(f"HEAD {path}: {status}")
        return int(headers["upload-offset"]), headers["session-state"]
    finally:
        writer.close()


async def open_upload(host: str, port: int, path: str, offset: int) -> ChunkedUpload:
    """A chunked upload continuing at ``offset`` (``Upload-Offset``), which may be reset."""
    return await ChunkedUpload.open(host, port, path, {"Upload-Offset": str(offset)})


@dataclass
class Result:
    lost: int = 0
    duplicated: int = 0
    latencies: list[float] = field(default_factory=list)
    failure: str | None = None


async def watch_resumed(host: str, port: int, path: str, past: int, cut_at: float) -> float:
    while True:
        offset, _ = await head(host, port, path)
        if offset > past:
            return time.monotonic() - cut_at
        await asyncio.sleep(0.01)


async def one_stream(
    host: str,
    port: int,
    audio: bytes,
    chunk: int,
    chunk_s: float,
    cuts: int,
    rng: random.Random,
    expected: Counter[tuple[Any, ...]],
    result: Result,
) -> None:
    session_id = await create_session(host, port, {"resumable": True})
    path = f"/v1/sessions/{session_id}/audio"
    duration = len(audio) / 32000
    cut_times = sorted(rng.uniform(0.3, duration - 0.3) for _ in range(cuts))
    start = time.monotonic()
    upload = await open_upload(host, port, path, 0)
    sent = 0
    watchers: list[asyncio.Task[float]] = []
    while sent < len(audio):
        now = time.monotonic() - start
        if cut_times and now >= cut_times[0]:
            cut_times.pop(0)
            upload.reset()
            cut_at = time.monotonic()
            while True:
                offset, state = await head(host, port, path)
                if state == "awaiting_resume":
                    break
                await asyncio.sleep(0.01)
            # Everything "recorded" up to now goes out at once on the new connection.
            due = min(len(audio), int((time.monotonic() - start) / chunk_s) * chunk)
            upload = await open_upload(host, port, path, offset)
            watchers.append(asyncio.create_task(watch_resumed(host, port, path, offset, cut_at)))
            await upload.send(audio[offset : max(due, offset)])
            sent = max(due, offset)
            continue
        await upload.send(audio[sent : sent + chunk])
        sent += chunk
        next_at = start + (sent // chunk) * chunk_s
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    status, body = await upload.finish()
    if status != 200:
        result.failure = f"{status} {body[:200]!r}"
    result.latencies = list(await asyncio.gather(*watchers))
    got = await events_of(host, port, session_id)
    result.lost = sum((expected - got).values())
    result.duplicated = sum((got - expected).values())


async def reference(host: str, port: int, audio: bytes) -> Counter[tuple[Any, ...]]:
    session_id = await create_session(host, port, {"resumable": True})
    upload = await open_upload(host, port, f"/v1/sessions/{session_id}/audio", 0)
    await upload.send(audio)
    status, body = await upload.finish()
    assert status == 200, body
    return await events_of(host, port, session_id)


async def run(args: argparse.Namespace, host: str, port: int) -> int:
    audio = wav_of(args.seconds)
    expected = await reference(host, port, audio)
    chunk = int(32000 * args.chunk_ms / 1000) // 2 * 2
    results = [Result() for _ in range(args.streams)]
    rng = random.Random(args.seed)
    t0 = time.monotonic()

    async def guarded(i: int) -> None:
        try:
            await one_stream(
                host, port, audio, chunk, args.chunk_ms / 1000, args.cuts,
                random.Random(rng.random()), expected, results[i],
            )  # fmt: skip
        except Exception as exc:  # a failed stream is a finding, not a crash of the benchmark
            results[i].failure = f"{type(exc).__name__}: {exc}"

    async with asyncio.TaskGroup() as tg:
        for i in range(args.streams):
            tg.create_task(guarded(i))
            await asyncio.sleep(args.ramp_s / max(1, args.streams))
    wall = time.monotonic() - t0
    latencies = [x for r in results for x in r.latencies]
    failures = [r.failure for r in results if r.failure]
    print(f"machine: {machine()}")
    print(
        f"{args.streams} streams x {args.seconds:g} s of audio at real time, "
        f"{args.cuts} cuts (TCP reset) each, {len(latencies)} resumes, wall {wall:.1f} s"
    )
    print(f"events per stream (uncut): {sum(expected.values())}")
    print(f"lost events: {sum(r.lost for r in results)}")
    print(f"duplicated events: {sum(r.duplicated for r in results)}")
    print(f"failed streams: {len(failures)}" + (f" (first: {failures[0]})" if failures else ""))
    if latencies:
        ms = [x * 1000 for x in latencies]
        print(
            f"resume latency ms: median {median(ms):.0f}  p95 {pct(ms, 0.95):.0f}  "
            f"max {max(ms):.0f}"
        )
    bad = sum(r.lost + r.duplicated for r in results) + len(failures)
    return 1 if bad else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    p.add_argument("--spawn", action="store_true", help="start python -m service on a free port")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--cuts", type=int, default=3, help="resets per stream")
    p.add_argument("--seconds", type=float, default=15.0, help="audio per stream")
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--ramp-s", type=float, default=2.0, help="spread the streams' starts")
    p.add_argument("--seed", default="resume-faults")
    p.add_argument(
        "--redis-url", help="with --spawn: sessions in this Redis (REDIS_URL), one worker"
    )
    args = p.parse_args()
    raise_fd_limit()
    env = {"REDIS_URL": args.redis_url} if args.redis_url else None
    server = start_server(env) if args.spawn else None
    try:
        if server is not None:
            host, port = server.host, server.port
        else:
            host, _, port_s = args.url.removeprefix("http://").partition(":")
            port = int(port_s or 80)
        sys.exit(asyncio.run(run(args, host, port)))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
