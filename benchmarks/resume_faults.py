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

``--kill-worker``: the death of a worker instead of cuts. It starts redis-server (or uses
``--redis-url``) and ``--workers`` server processes of one deployment (same Redis and key
prefix, a port each), creates every session on a survivor and uploads all of them to one worker,
which it SIGKILLs ``--kill-after`` seconds (plus a random part of ``--kill-jitter``: a death
falls anywhere between two lease renewals) after the last stream started. Each client notices
its connection die, asks ``HEAD`` (any worker that answers) until the session is
``awaiting_resume`` (the dead owner's lease has lapsed), then uploads at ``Upload-Offset`` to
the workers in turn: on 421 the next one, on 409 ``offset_mismatch`` at the offset given, on a
connection closed without an answer HEAD again. It reports, besides lost and duplicated events,
sessions whose event ids have gaps, the time from the kill to each resume being accepted, the
bytes each client sent again (what it had sent minus the offset it resumed at), and how the
sessions were adopted (the servers' logs: by a worker's sweep or by the resuming upload).
The model is the seed's default dummy (``--model-options``): results in flight at the kill.
``--signal TERM`` restarts the worker instead (a rolling deploy): it hands its sessions over,
answering their uploads ``503 shutting_down``, and no lease has to lapse.

    .venv/bin/python benchmarks/resume_faults.py --kill-worker --streams 100 --runs 3
    .venv/bin/python benchmarks/resume_faults.py --kill-worker --signal TERM --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    ChunkedUpload,
    Server,
    _read_body,
    _read_head,
    create_session,
    free_port,
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
        return (event, data["reason"], data["bytes"], data["audio_seconds"], data["segments"])
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


# -- --kill-worker: the worker running every upload dies -----------------------------------------

ADOPTED = "adopted a session whose worker died"
# How often a client asks whether a resumed upload is being read (the latency's resolution);
# how often it asks whether the session awaits its upload again is --poll-ms.
ACCEPT_POLL_S = 0.01
ELSEWHERE_PAUSE_S = 0.05  # after a 421, before the next worker


class WatchedUpload(ChunkedUpload):
    """A chunked upload whose answer is awaited from the start: a resume turned away (421,
    409) is answered at once, before its body; one accepted, only after the body's end. A
    connection that dies (its worker killed) ends the wait without an answer."""

    answer: asyncio.Task[tuple[int, dict[str, str]]]
    broken = False  # a write failed

    @classmethod
    async def start(cls, host: str, port: int, path: str, offset: int) -> WatchedUpload:
        base = await ChunkedUpload.open(host, port, path, {"Upload-Offset": str(offset)})
        upload = cls(base.reader, base.writer)
        upload.answer = asyncio.create_task(_read_head(upload.reader))
        return upload

    def dead(self) -> bool:
        return self.broken or self.answer.done() or self.writer.transport.is_closing()

    async def send(self, data: bytes) -> None:
        try:
            await super().send(data)
        except OSError:
            self.broken = True

    async def answered(self) -> tuple[int, dict[str, str], bytes] | None:
        """Its answer, once it came; None if the connection died without one."""
        try:
            status, headers = await self.answer
        except (OSError, asyncio.IncompleteReadError):
            self.writer.close()
            return None
        try:
            body = await _read_body(self.reader, headers)
        except (OSError, asyncio.IncompleteReadError):
            body = b""
        self.writer.close()
        return status, headers, body

    async def finish(self) -> tuple[int, bytes]:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        got = await self.answered()
        if got is None:
            raise ConnectionError("the upload's connection closed without an answer")
        return got[0], got[2]


@dataclass
class Deployment:
    """The workers' addresses, the victim's included (a client does not know which died)."""

    workers: list[tuple[str, int]]
    victim: tuple[str, int]
    await_poll_s: float  # how often a client asks whether the session awaits its upload
    killed_at: float | None = None  # time.monotonic()

    @property
    def survivors(self) -> list[tuple[str, int]]:
        return [w for w in self.workers if w != self.victim]


@dataclass
class KillResult:
    lost: int = 0
    duplicated: int = 0
    missing_ids: int = 0  # ids absent from 1..last in the session's log
    repeated_ids: int = 0  # ids seen more than once
    noticed_after: float | None = None  # kill -> the client saw its connection die
    awaiting_after: float | None = None  # kill -> a HEAD said awaiting_resume (lease lapsed)
    resumed_after: float | None = None  # kill -> the resumed upload being read
    resent: int | None = None  # bytes sent before the cut minus the offset resumed at
    turned_away: Counter[str] = field(default_factory=Counter)
    failure: str | None = None


class Rotation:
    """The workers in turn, from a stream's own starting point."""

    def __init__(self, workers: list[tuple[str, int]], first: int) -> None:
        self.workers = workers
        self.i = first

    def next(self) -> tuple[str, int]:
        self.i += 1
        return self.workers[self.i % len(self.workers)]


async def head_any(rot: Rotation, path: str) -> tuple[int, str]:
    """``HEAD`` on the next worker that answers (the dead one's port refuses)."""
    for _ in range(10 * len(rot.workers)):
        host, port = rot.next()
        try:
            return await head(host, port, path)
        except OSError:
            continue
    raise RuntimeError("no worker answered HEAD")


async def accepted(upload: WatchedUpload, host: str, port: int, path: str, offset: int) -> bool:
    """Whether the worker reads the resumed upload (its offset moves past ``offset``), or
    False once the upload was answered or its connection died."""
    while not upload.dead():
        try:
            now, _ = await head(host, port, path)
        except (OSError, RuntimeError):
            return False
        if now > offset:
            return True
        await asyncio.sleep(ACCEPT_POLL_S)
    return False


async def resume_anywhere(
    dep: Deployment,
    rot: Rotation,
    path: str,
    audio: bytes,
    t0: float,
    chunk: int,
    chunk_s: float,
    result: KillResult,
) -> tuple[WatchedUpload, int, int]:
    """What a client behind a load balancer does when its upload's connection dies: wait for
    the session to await its upload, resume at the offset, on whichever worker takes it.
    Returns the accepted upload, the offset it resumed at and the bytes sent so far."""
    while True:
        offset, state = await head_any(rot, path)
        if state == "awaiting_resume":
            if dep.killed_at is not None and result.awaiting_after is None:
                result.awaiting_after = time.monotonic() - dep.killed_at
            break
        if state == "ended":
            raise RuntimeError("the session ended instead of awaiting its upload")
        await asyncio.sleep(dep.await_poll_s)
    for _ in range(1000):
        host, port = rot.next()
        try:
            upload = await WatchedUpload.start(host, port, path, offset)
        except OSError:
            result.turned_away["refused connection"] += 1
            continue
        due = min(len(audio), int((time.monotonic() - t0) / chunk_s) * chunk)
        await upload.send(audio[offset : max(due, offset)])  # "recorded" during the outage
        if await accepted(upload, host, port, path, offset):
            return upload, offset, max(due, offset)
        got = await upload.answered()
        if got is None:  # closed without an answer (a refusal whose answer a reset ate)
            result.turned_away["closed"] += 1
            offset, _ = await head_any(rot, path)
            continue
        status, headers, body = got
        code = json.loads(body or b"{}").get("error", {}).get("code") if body else None
        if status == 409 and code == "offset_mismatch":
            result.turned_away["409"] += 1
            offset = int(headers["upload-offset"])
            continue
        if status == 421:
            result.turned_away["421"] += 1
            await asyncio.sleep(ELSEWHERE_PAUSE_S)
            continue
        if status == 503 and code == "shutting_down":
            # The restarting worker still answers during its grace period: another one.
            result.turned_away["503 shutting_down"] += 1
            continue
        raise RuntimeError(f"resume answered {status} {body[:200]!r}")
    raise RuntimeError("no worker took the resumed upload")


async def killed_stream(
    dep: Deployment,
    index: int,
    audio: bytes,
    chunk: int,
    chunk_s: float,
    expected: Counter[tuple[Any, ...]],
    result: KillResult,
) -> None:
    host, port = dep.survivors[index % len(dep.survivors)]
    session_id = await create_session(host, port, {"resumable": True})
    path = f"/v1/sessions/{session_id}/audio"
    rot = Rotation(dep.workers, index)
    t0 = time.monotonic()
    upload = await WatchedUpload.start(*dep.victim, path, 0)
    sent = 0
    while sent < len(audio):
        if upload.dead():
            if dep.killed_at is not None and result.noticed_after is None:
                result.noticed_after = time.monotonic() - dep.killed_at
            answer = await upload.answered()
            if answer is not None:
                status, _, body = answer
                # A worker shutting down (--signal TERM) hands the session over: resume it.
                if not (status == 503 and b"shutting_down" in body):
                    raise RuntimeError(
                        f"the upload was answered mid-stream: {status} {body[:200]!r}"
                    )
            before = sent
            upload, offset, sent = await resume_anywhere(
                dep, rot, path, audio, t0, chunk, chunk_s, result
            )
            if dep.killed_at is not None and result.resumed_after is None:
                result.resumed_after = time.monotonic() - dep.killed_at
                result.resent = before - offset
            continue
        await upload.send(audio[sent : sent + chunk])
        if upload.broken:
            continue
        sent += chunk
        await asyncio.sleep(max(0.0, t0 + (sent // chunk) * chunk_s - time.monotonic()))
    status, body = await upload.finish()
    if status != 200:
        result.failure = f"{status} {body[:200]!r}"
    got: Counter[tuple[Any, ...]] = Counter()
    ids: list[int] = []
    async for e in sse_events(host, port, f"/v1/sessions/{session_id}/events"):
        got[key(e.event, json.loads(e.data))] += 1
        ids.append(int(e.id or 0))
    result.lost = sum((expected - got).values())
    result.duplicated = sum((got - expected).values())
    result.missing_ids = len(set(range(1, max(ids, default=0) + 1)) - set(ids))
    result.repeated_ids = len(ids) - len(set(ids))


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free port, no persistence."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"redis-server ({binary}) did not start")
        time.sleep(0.05)


def adoptions(servers: list[Server]) -> Counter[str]:
    """The workers' log lines for adopted sessions, by what adopted them (``via``: a worker's
    sweep, or the resuming upload on the worker it reached)."""
    found: Counter[str] = Counter()
    for server in servers:
        for line in server.log_path.read_text(errors="replace").splitlines():
            if ADOPTED in line:
                try:
                    found[str(json.loads(line).get("via", "?"))] += 1
                except json.JSONDecodeError:
                    found["?"] += 1
    return found


def spread(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    if not values:
        return "-"
    xs = [v * scale for v in values]
    return f"median {median(xs):{fmt}}  p95 {pct(xs, 0.95):{fmt}}  max {max(xs):{fmt}}"


async def kill_run(args: argparse.Namespace, servers: list[Server], n: int) -> dict[str, Any]:
    victim = servers[0]
    dep = Deployment(
        [(s.host, s.port) for s in servers], (victim.host, victim.port), args.poll_ms / 1000
    )
    audio = wav_of(args.seconds)
    expected = await reference(*dep.survivors[0], audio)
    chunk = int(32000 * args.chunk_ms / 1000) // 2 * 2
    results = [KillResult() for _ in range(args.streams)]
    # The owner renews its leases every third of the lease from its first session on: a fixed
    # kill time would always fall at the same point between two renewals.
    kill_after = args.kill_after + random.Random(f"{args.seed}-{n}").uniform(0, args.kill_jitter)

    async def guarded(i: int) -> None:
        try:
            await killed_stream(dep, i, audio, chunk, args.chunk_ms / 1000, expected, results[i])
        except Exception as exc:  # a failed stream is a finding, not a crash of the benchmark
            results[i].failure = f"{type(exc).__name__}: {exc}"

    async def kill() -> None:
        await asyncio.sleep(args.ramp_s + kill_after)
        os.kill(victim.pid, getattr(signal, f"SIG{args.signal}"))
        dep.killed_at = time.monotonic()

    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(kill())
        for i in range(args.streams):
            tg.create_task(guarded(i))
            await asyncio.sleep(args.ramp_s / max(1, args.streams))
    wall = time.monotonic() - t0
    turned: Counter[str] = Counter()
    for r in results:
        turned.update(r.turned_away)
    return {
        "wall": wall,
        "kill_after": kill_after,
        "load": Path("/proc/loadavg").read_text().split()[:3],
        "events": sum(expected.values()),
        "failures": [r.failure for r in results if r.failure],
        "lost": sum(r.lost for r in results),
        "duplicated": sum(r.duplicated for r in results),
        "gapped": sum(1 for r in results if r.missing_ids or r.repeated_ids),
        "missing_ids": sum(r.missing_ids for r in results),
        "noticed": [r.noticed_after for r in results if r.noticed_after is not None],
        "awaiting": [r.awaiting_after for r in results if r.awaiting_after is not None],
        "own": [
            r.resumed_after - r.awaiting_after
            for r in results
            if r.resumed_after is not None and r.awaiting_after is not None
        ],
        "resumed": [r.resumed_after for r in results if r.resumed_after is not None],
        "resent": [float(r.resent) for r in results if r.resent is not None],
        "turned": turned,
        "adopted": adoptions(servers),
    }


def run_kill(args: argparse.Namespace) -> int:
    redis_proc, url = (None, args.redis_url) if args.redis_url else start_redis()
    lease = f"{args.lease:g} s" if args.lease else "5 s (default)"
    print(f"machine: {machine()}")
    print(
        f"{args.streams} streams x {args.seconds:g} s at real time, all uploading to 1 of "
        f"{args.workers} workers, SIG{args.signal}ed {args.kill_after:g}-"
        f"{args.kill_after + args.kill_jitter:g} s after the last started; "
        f"lease {lease}; model options {args.model_options}; clients HEAD every "
        f"{args.poll_ms:g} ms until awaiting_resume"
    )
    runs: list[dict[str, Any]] = []
    try:
        for n in range(args.runs):
            env = {
                "REDIS_URL": url,
                "STREAMER_REDIS_PREFIX": f"rf{os.getpid()}-{n}",
                "STREAMER_MODEL_OPTIONS": args.model_options,
            }
            if args.lease:
                env["STREAMER_REDIS_LEASE_SECONDS"] = str(args.lease)
            with ThreadPoolExecutor(args.workers) as pool:
                servers = list(pool.map(start_server, [env] * args.workers))
            try:
                r = asyncio.run(kill_run(args, servers, n))
            finally:
                for server in servers[1:]:
                    server.stop()
                servers[0].process.wait(10)
                servers[0].log_path.unlink(missing_ok=True)
            runs.append(r)
            turned = ", ".join(f"{k} {v}" for k, v in sorted(r["turned"].items())) or "none"
            adopted = ", ".join(f"{k} {v}" for k, v in sorted(r["adopted"].items())) or "none"
            failures = r["failures"]
            print(
                f"run {n + 1}: load {' '.join(r['load'])}, wall {r['wall']:.1f} s, killed "
                f"{r['kill_after']:.2f} s after the last stream started"
            )
            print(f"  events per stream (uncut): {r['events']}")
            print(
                f"  lost {r['lost']}, duplicated {r['duplicated']}, sessions with id gaps "
                f"{r['gapped']} ({r['missing_ids']} ids missing), failed streams {len(failures)}"
                + (f" (first: {failures[0]})" if failures else "")
            )
            print(f"  kill -> client noticed, s: {spread(r['noticed'])}")
            print(f"  kill -> HEAD says awaiting_resume, s: {spread(r['awaiting'])}")
            print(f"  kill -> resume accepted, s: {spread(r['resumed'])} ({len(r['resumed'])})")
            print(f"  awaiting_resume -> accepted, ms: {spread(r['own'], 1000, '.0f')}")
            print(f"  bytes sent again: {spread(r['resent'], fmt='.0f')}")
            print(f"  resumes turned away: {turned}; adopted via: {adopted}")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    if len(runs) > 1:
        meds = [median(r["resumed"]) for r in runs]
        p95s = [pct(r["resumed"], 0.95) for r in runs]
        resent = [median(r["resent"]) for r in runs]
        own = [median(r["own"]) * 1000 for r in runs]
        print(
            f"over {len(runs)} runs: kill -> resume median of medians {median(meds):.2f} s "
            f"(runs {', '.join(f'{m:.2f}' for m in meds)}), p95 median {median(p95s):.2f} s; "
            f"bytes sent again, median of medians {median(resent):.0f}; awaiting_resume -> "
            f"accepted, median of medians {median(own):.0f} ms"
        )
    bad = sum(r["lost"] + r["duplicated"] + r["gapped"] + len(r["failures"]) for r in runs)
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
    p.add_argument(
        "--kill-worker",
        action="store_true",
        help="SIGKILL the worker every upload goes to, instead of cutting connections",
    )
    p.add_argument("--workers", type=int, default=3, help="with --kill-worker: processes")
    p.add_argument(
        "--signal",
        choices=["KILL", "TERM"],
        default="KILL",
        help="with --kill-worker: KILL (it dies) or TERM (a restart: it hands its sessions over)",
    )
    p.add_argument(
        "--kill-after",
        type=float,
        default=5.0,
        help="with --kill-worker: seconds after the last stream started",
    )
    p.add_argument(
        "--kill-jitter",
        type=float,
        default=2.0,
        help="with --kill-worker: plus up to this many seconds, at random (seeded)",
    )
    p.add_argument(
        "--lease",
        type=float,
        help="with --kill-worker: STREAMER_REDIS_LEASE_SECONDS (default: the server's, 5)",
    )
    p.add_argument(
        "--model-options",
        default="{}",
        help="with --kill-worker: STREAMER_MODEL_OPTIONS (default: the dummy's own)",
    )
    p.add_argument("--runs", type=int, default=1, help="with --kill-worker: fresh deployments")
    p.add_argument(
        "--poll-ms",
        type=float,
        default=100,
        help="with --kill-worker: a client's HEAD interval until awaiting_resume",
    )
    args = p.parse_args()
    raise_fd_limit()
    if args.kill_worker:
        if args.workers < 2:
            p.error("--kill-worker needs --workers 2 or more")
        sys.exit(run_kill(args))
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
