"""Load generator: N live streams at real-time pace against one streamer server, and what they cost.

Each stream creates a session, subscribes to its events (SSE), then uploads audio paced like a
live recording (chunked HTTP/1.1; or all of it over one WebSocket with ``--ws``). For every final
segment and every ``inactive`` event it measures the lag: the event's arrival at this client
minus the wall time at which the audio up to the event's ``end_time`` (``time``) had been sent.
With real-time pacing that is the stream's start plus that audio time, rounded up to the end of
the chunk that carried it (``--chunk-ms``).

That lag includes the VAD's own wait: an utterance ends at its last voiced frame, but the
segmenter only knows once ``redemption_ms`` of silence (600 ms, 608 ms in whole frames) has
followed. So the lag is also measured from when the audio up to ``end_time`` plus that wait had
been sent: what the streaming machinery adds. A run "held" when the p99 of that lag (or of the
plain one, with ``--lag-from sent``) stayed under 250 ms, every stream completed without errors,
and none fell behind (its upload took at most 1.1 times the audio's duration).

It reports the server's CPU seconds and RSS (from /proc/<pid>: ``--server-pid``, or the server it
starts itself with ``--spawn``) and its own CPU. It is built to cost little next to the server:
one process, one event loop, the audio read and cut into chunks once, raw asyncio protocols (no
HTTP library) for the upload and the event stream, and ONE timer that sends every stream's due
chunks (a heap step and a non-blocking socket write per chunk, no task wake-up per stream). At
200 streams it uses ~10% of a core (an httpx client with a task per stream used ~45%, and its
own loop lag, up to 0.5 s at 250 streams, ended up in the lag figures).

It also scrapes the server's ``/metrics`` before and after and prints the server's own view:
the p99 bucket of ``streamer_event_lag_seconds`` (a chunk's arrival to the event) and of
``streamer_event_loop_lag_seconds``. Measured lag far above the server's own says the time went
outside it: in the sockets, or waiting for a CPU on a machine the server shares.

    .venv/bin/python benchmarks/loadgen.py --spawn --streams 20
    .venv/bin/python benchmarks/loadgen.py --spawn --find-max --max-streams 800
    .venv/bin/python benchmarks/loadgen.py --url http://127.0.0.1:8000 --server-pid 1234 --ws

``--spawn`` runs ``python -m service`` on a free port with a fast dummy model (the test suite's:
50 ms per call) unless ``--env STREAMER_MODEL_OPTIONS=...`` says otherwise, so the figures are
the streaming machinery's, not the stand-in model's sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import heapq
import io
import json
import math
import os
import resource
import sys
import time
import wave
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    Proc,
    Refused,
    Server,
    create_session,
    raise_fd_limit,
    start_server,
)
from service.client.sse import iter_sse  # noqa: E402
from service.config import MODEL_SAMPLE_RATE, VadParams  # noqa: E402

DATA = ROOT / "tests" / "data"
LAG_BUDGET_S = 0.25
BEHIND_FACTOR = 1.1
# Error codes with which a server turns a new session away for now.
REFUSALS = ("too_many_sessions", "server_overloaded")
FAST_MODEL = '{"delay": 0.05, "constant_factor": 0.01, "jitter": 0.0}'
FIND_MAX_START = 50
VAD_FRAME = 512  # samples per VAD step (service/vad/silero.py FRAME; not imported: onnxruntime)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- the audio, prepared once -------------------------------------------------------------------


@dataclass(frozen=True)
class Audio:
    """One stream's bytes, cut into chunks once for every stream."""

    label: str
    config: dict[str, Any]  # the session config
    duration: float
    bytes_per_second: float
    header_bytes: int
    chunks: list[bytes]
    chunk_ends: list[int]  # byte offset after each chunk
    chunk_due: list[float]  # seconds after the start at which each chunk is sent

    def offset_at(self, seconds: float) -> int:
        return self.header_bytes + round(seconds * self.bytes_per_second)

    def chunk_at(self, seconds: float) -> int:
        """The index of the chunk that completes the audio up to ``seconds``."""
        k = bisect.bisect_left(self.chunk_ends, self.offset_at(seconds))
        return min(k, len(self.chunks) - 1)


def _cut(
    label: str,
    config: dict[str, Any],
    data: bytes,
    duration: float,
    header: int,
    chunk_bytes: int,
) -> Audio:
    bps = (len(data) - header) / duration
    chunks, ends, due = [], [], []
    for start in range(0, len(data), chunk_bytes):
        end = min(len(data), start + chunk_bytes)
        chunks.append(data[start:end])
        ends.append(end)
        due.append(max(0.0, (end - header) / bps))
    return Audio(label, config, duration, bps, header, chunks, ends, due)


def raw_audio(duration: float, chunk_ms: int) -> Audio:
    """s16le 16 kHz mono: tests/data/speech.wav's samples, looped or cut to ``duration``."""
    with wave.open(str(DATA / "speech.wav")) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = w.readframes(w.getnframes())
    n = int(duration * 16000) * 2
    data = (pcm * (n // len(pcm) + 1))[:n]
    fmt = {"channels": 1, "sample_rate": 16000, "bit_depth": 16, "is_float": False}
    chunk_bytes = int(16000 * chunk_ms / 1000) * 2
    return _cut("raw s16le 16 kHz", {"format": fmt}, data, duration, 0, chunk_bytes)


def webm_audio(duration: float, chunk_ms: int) -> Audio:
    """webm/opus as a browser records it: tests/data/speech.webm decoded, looped or cut to
    ``duration``, re-encoded once (live muxing, no cues, as MediaRecorder writes)."""
    import av
    import numpy as np

    rate, frame = 48000, 960
    with av.open(str(DATA / "speech.webm"), mode="r") as src:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        parts = [f.to_ndarray() for fr in src.decode(audio=0) for f in resampler.resample(fr)]
        parts += [f.to_ndarray() for f in resampler.resample(None)]
    pcm = np.concatenate(parts, axis=1)[0]
    n = int(duration * rate)
    samples = np.tile(pcm, n // len(pcm) + 1)[:n]
    samples = np.concatenate([samples, np.zeros(-len(samples) % frame, np.int16)])
    out = io.BytesIO()
    with av.open(out, mode="w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 32000
        for i in range(0, len(samples), frame):
            f = av.AudioFrame.from_ndarray(
                samples[None, i : i + frame], format="s16", layout="mono"
            )
            f.sample_rate, f.pts = rate, i
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = out.getvalue()
    chunk_bytes = max(64, round(len(data) / duration * chunk_ms / 1000))
    return _cut("webm/opus", {}, data, duration, 0, chunk_bytes)


# -- processes ----------------------------------------------------------------------------------


def own_cpu_seconds() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def _minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


# -- one stream ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lag:
    kind: str  # "final" or "inactive"
    sent: float  # arrival - when the audio up to the event's time had been sent
    detectable: float  # arrival - when the audio up to that time + the redemption wait had been
    nominal: float  # arrival - (stream start + the event's time)


def redemption_wait_s(config: dict[str, Any]) -> float:
    """How much audio after an utterance's end the VAD must see before it can end it: a silent
    run longer than ``redemption_ms``, counted in whole frames (service/vad/segmenter.py)."""
    redemption_ms = int(config.get("vad", {}).get("redemption_ms", VadParams().redemption_ms))
    samples = redemption_ms * MODEL_SAMPLE_RATE // 1000
    return (samples // VAD_FRAME + 1) * VAD_FRAME / MODEL_SAMPLE_RATE


@dataclass
class Stream:
    """What one stream saw. Events are kept raw during the run and measured afterwards."""

    index: int
    started: float = 0.0  # the pacing clock's zero (monotonic)
    sent_at: list[float] = field(default_factory=list)  # per chunk
    upload_done: float | None = None
    ended: float | None = None
    marks: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, audio s, arrival)
    end_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    failure: str | None = None
    refused: str | None = None  # the server turned the session away (503), with this code
    lagging: int = 0  # `lagging` events: the server said this stream's results were late

    def lags(self, audio: Audio, wait_s: float) -> list[Lag]:
        """Per mark: the lag after the audio up to its time was sent, and after the audio up to
        its time plus the VAD's redemption wait (``wait_s``) was sent."""
        out = []
        for kind, seconds, arrival in self.marks:
            out.append(
                Lag(
                    kind,
                    arrival - self.sent_time(audio, seconds),
                    arrival - self.sent_time(audio, seconds + wait_s),
                    arrival - (self.started + seconds),
                )
            )
        return out

    def sent_time(self, audio: Audio, seconds: float) -> float:
        k = audio.chunk_at(seconds)
        return self.sent_at[k] if k < len(self.sent_at) else self.started + audio.chunk_due[k]

    def upload_ratio(self, audio: Audio) -> float | None:
        if self.upload_done is None:
            return None
        return (self.upload_done - self.started) / audio.duration

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.errors and self.end_reason == "completed"


async def _paced(audio: Audio, s: Stream, slot_s: float) -> AsyncIterator[bytes]:
    clock = time.monotonic
    # Streams start on a grid of slots, so the ones in a slot send in one wake-up of the loop
    # (a wake-up from idle costs more than the send) while the load still spreads over time.
    s.started = t0 = math.ceil(clock() / slot_s) * slot_s if slot_s else clock()
    for chunk, due in zip(audio.chunks, audio.chunk_due, strict=True):
        delay = t0 + due - clock()
        if delay > 0:
            await anyio.sleep(delay)
        s.sent_at.append(clock())
        yield chunk
    s.upload_done = clock()


_MARKED = frozenset({"inactive", "segment", "error", "lagging", "end"})


def _mark(s: Stream, event: dict[str, Any], now: float | None = None) -> bool:
    """Record one event (arrived at ``now``); true on ``end``."""
    now = time.monotonic() if now is None else now
    kind = event.get("type")
    if kind == "inactive":
        s.marks.append(("inactive", event["time"], now))
    elif kind == "segment":
        if event["is_final"]:
            s.marks.append(("final", event["end_time"], now))
    elif kind == "error":
        s.errors.append(f"{event.get('code')}: {event.get('message')}")
    elif kind == "lagging":
        s.lagging += 1
    elif kind == "end":
        s.ended = now
        s.end_reason = event.get("reason")
        return True
    return False


class _Pacer:
    """Sends every HTTP stream's chunks from ONE timer: a heap of (due, stream) and a task that
    sleeps until the earliest is due, then writes every chunk that is due. Per chunk that is a
    heap step and a non-blocking socket write, where a task per stream would cost a sleep (a
    timer, a task wake-up) per chunk; with hundreds of streams on two shared cores, the load
    generator's own loop lag would otherwise end up in the figures.

    A stream whose socket buffer is full (the server not reading) is not written to; it is
    retried a millisecond later, so its ``sent_at`` shows when the chunk really went out."""

    def __init__(self, audio: Audio) -> None:
        self.audio = audio
        self.heap: list[tuple[float, int, _Upload]] = []
        self.wake = asyncio.Event()

    def add(self, upload: _Upload) -> None:
        heapq.heappush(self.heap, (upload.due(), upload.s.index, upload))
        self.wake.set()

    async def run(self) -> None:
        clock = time.monotonic
        heap = self.heap
        while True:
            if not heap:
                self.wake.clear()
                await self.wake.wait()
                continue
            delay = heap[0][0] - clock()
            if delay > 0:
                self.wake.clear()
                with anyio.move_on_after(delay):
                    await self.wake.wait()
                continue
            now = clock()
            while heap and heap[0][0] <= now:
                _, _, upload = heapq.heappop(heap)
                if upload.send_next(now):
                    heapq.heappush(heap, (upload.due(), upload.s.index, upload))


class _Upload(asyncio.Protocol):
    """``POST audio_url`` with ``Transfer-Encoding: chunked``: one ``transport.write`` per
    chunk; the response is read and dropped (the events say everything)."""

    def __init__(self, audio: Audio, s: Stream, slot_s: float) -> None:
        self.audio = audio
        self.s = s
        self.next = 0
        self.late = 0.0  # seconds the server's full socket buffer has held this stream back
        self.paused = False
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        clock = time.monotonic()
        # Streams start on a grid of slots, so the ones in a slot go out in one wake-up.
        s.started = math.ceil(clock / slot_s) * slot_s if slot_s else clock

    def due(self) -> float:
        return self.s.started + self.late + self.audio.chunk_due[self.next]

    def send_next(self, now: float) -> bool:
        """Write the next chunk; true while more are left."""
        assert self.transport is not None
        if self.transport.is_closing():
            return False
        if self.paused:
            self.late += 0.001  # retried a millisecond later; sent_at will show it
            return True
        chunk = self.audio.chunks[self.next]
        self.s.sent_at.append(now)
        self.next += 1
        if self.next == len(self.audio.chunks):
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(chunk), chunk))
            self.s.upload_done = now
            return False
        self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Events(asyncio.Protocol):
    """``GET events_url``: the SSE response de-chunked and split into events by hand; only the
    measured events' data is parsed, each stamped with when its bytes arrived."""

    def __init__(self, s: Stream) -> None:
        self.s = s
        self.raw = bytearray()
        self.body = bytearray()
        self.head: bytes | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.raw += data
        if self.head is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.raw[:end])
            del self.raw[: end + 4]
            if not self.head.startswith(b"HTTP/1.1 200"):
                status = self.head.split(b"\r\n")[0].decode()
                self._finish(f"events: {status}")
                return
        raw = self.raw
        while (eol := raw.find(b"\r\n")) >= 0:  # de-chunk what has fully arrived
            size = int(raw[:eol].split(b";")[0], 16)
            if size == 0 or len(raw) < eol + 2 + size + 2:
                break
            self.body += raw[eol + 2 : eol + 2 + size]
            del raw[: eol + 2 + size + 2]
        while (end := self.body.find(b"\n\n")) >= 0:
            block = bytes(self.body[:end])
            del self.body[: end + 2]
            kind, data = b"", b""
            for line in block.split(b"\n"):
                if line.startswith(b"event: "):
                    kind = line[7:]
                elif line.startswith(b"data: "):
                    data = line[6:]
            if kind.decode() not in _MARKED:
                continue
            if _mark(self.s, json.loads(data), now):
                self._finish(None)
                return

    def _finish(self, failure: str | None) -> None:
        if failure:
            self.s.failure = self.s.failure or failure
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def http_stream(host: str, port: int, pacer: _Pacer, slot_s: float, s: Stream) -> None:
    audio = pacer.audio
    session_id = await create_session(host, port, audio.config)
    loop = asyncio.get_running_loop()
    path = f"/v1/sessions/{session_id}"
    _, events = await loop.create_connection(lambda: _Events(s), host, port)
    assert events.transport is not None
    events.transport.write(
        f"GET {path}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    _, upload = await loop.create_connection(lambda: _Upload(audio, s, slot_s), host, port)
    assert upload.transport is not None
    try:
        upload.transport.write(
            f"POST {path}/audio HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        pacer.add(upload)
        await events.done
    finally:
        upload.transport.close()
        if events.transport is not None:
            events.transport.close()
    if s.end_reason is None:
        s.failure = s.failure or "the event stream closed before end"


async def ws_stream(url: str, audio: Audio, slot_s: float, s: Stream) -> None:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http", "ws", 1) + "/v1/ws"
    async with connect(ws_url, compression=None, max_size=None, proxy=None) as ws:
        await ws.send(json.dumps({**audio.config, "request": "start"}))
        first = json.loads(await ws.recv())
        if first.get("type") != "started":
            if first.get("code") in REFUSALS:
                raise Refused(first["code"], f"start: {first}")
            s.failure = f"start: {first}"
            return

        async def upload() -> None:
            async for chunk in _paced(audio, s, slot_s):
                await ws.send(chunk)
            await ws.send(json.dumps({"request": "stop", "disconnect": True}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(upload)
            async for message in ws:
                if isinstance(message, str) and _mark(s, json.loads(message)):
                    break
            tg.cancel_scope.cancel()
    if s.end_reason is None:
        s.failure = s.failure or "the connection closed before end"


async def guarded(coro_fn: Any, s: Stream, *args: Any) -> None:
    try:
        await coro_fn(*args, s)
    except Refused as exc:  # a server shedding load: counted apart from the streams it took
        s.refused = exc.code
    except Exception as exc:  # one failed stream is a figure, not the end of the run
        s.failure = s.failure or f"{type(exc).__name__}: {exc}"


# -- one step: N streams ------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


@dataclass
class Options:
    url: str
    server: Proc | None
    streams: int
    duration: float
    ramp: float
    chunk_ms: int
    ws: bool
    format: str
    lag_from: str
    slot_ms: int


async def _sample(proc: Proc | None, peak: list[int], loop_lag: list[float]) -> None:
    interval = 0.1
    while True:
        before = time.monotonic()
        await anyio.sleep(interval)
        loop_lag.append(time.monotonic() - before - interval)
        if proc is not None:
            peak[0] = max(peak[0], proc.rss_bytes())


async def run_step(opts: Options, audio: Audio, n: int) -> dict[str, Any]:
    streams = [Stream(i) for i in range(n)]
    proc = opts.server
    rss0 = proc.rss_bytes() if proc else 0
    peak, loop_lag = [rss0], [0.0]
    cpu0_server = proc.cpu_split() if proc else (0.0, 0.0)
    cpu0_self, wall0 = own_cpu_seconds(), time.monotonic()
    budget = opts.ramp + opts.duration * 2 + 60
    slot = opts.slot_ms / 1000
    parsed = urlsplit(opts.url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    pacer = _Pacer(audio)
    scraped = [await scrape_histograms(opts.url)]
    with anyio.move_on_after(budget):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sample, proc, peak, loop_lag)
            tg.start_soon(pacer.run)
            async with anyio.create_task_group() as streams_tg:
                for s in streams:
                    if opts.ws:
                        streams_tg.start_soon(guarded, ws_stream, s, opts.url, audio, slot)
                    else:
                        streams_tg.start_soon(guarded, http_stream, s, host, port, pacer, slot)
                    if n > 1:
                        await anyio.sleep(opts.ramp / n)
            tg.cancel_scope.cancel()
    wall = time.monotonic() - wall0
    cpu_self = _minus(own_cpu_seconds(), cpu0_self)
    cpu_server = _minus(proc.cpu_split(), cpu0_server) if proc else None
    scraped.append(await scrape_histograms(opts.url))
    for s in streams:
        if s.end_reason is None and s.failure is None:
            s.failure = f"no end within {budget:g} s"
    result = summarise(opts, audio, streams, wall, cpu_self, cpu_server, rss0, peak[0], loop_lag)
    for key in SERVER_HISTOGRAMS:
        result[f"server_{key}_lag_p99_le_ms"] = server_p99_ms(scraped[0], scraped[1], key)
    return result


def summarise(
    opts: Options,
    audio: Audio,
    streams: list[Stream],
    wall: float,
    cpu_self: tuple[float, float],
    cpu_server: tuple[float, float] | None,
    rss0: int,
    rss_peak: int,
    loop_lag: list[float],
) -> dict[str, Any]:
    wait_s = redemption_wait_s(audio.config)
    # Streams the server turned away (503) count apart: the figures are those of the streams it
    # took, and a step with refusals did not hold N.
    refused = [s for s in streams if s.refused is not None]
    asked, streams = len(streams), [s for s in streams if s.refused is None]
    all_lags = [(s, lag) for s in streams for lag in s.lags(audio, wait_s)]
    sent = [lag.sent for _, lag in all_lags]
    detectable = [lag.detectable for _, lag in all_lags]
    nominal = [lag.nominal for _, lag in all_lags]

    def basis(lag: Lag) -> float:
        return lag.sent if opts.lag_from == "sent" else lag.detectable

    held_lags = [basis(lag) for _, lag in all_lags]
    finals = [basis(lag) for _, lag in all_lags if lag.kind == "final"]
    inactive = [basis(lag) for _, lag in all_lags if lag.kind == "inactive"]
    final_sent = [lag.sent for _, lag in all_lags if lag.kind == "final"]
    stream_p99 = [
        p
        for s in streams
        if (p := pct([basis(lag) for t, lag in all_lags if t is s], 0.99)) is not None
    ]
    ratios = [r for s in streams if (r := s.upload_ratio(audio)) is not None]
    behind = sum(1 for s in streams if (r := s.upload_ratio(audio)) is None or r > BEHIND_FACTOR)
    failed = [s for s in streams if not s.ok]
    p99 = pct(held_lags, 0.99)
    held = not refused and not failed and behind == 0 and p99 is not None and p99 < LAG_BUDGET_S
    first_failure = next((s.failure or "; ".join(s.errors) or s.end_reason for s in failed), None)
    return {
        "streams": asked,
        "format": opts.format,
        "transport": "ws" if opts.ws else "http1",
        "duration_s": opts.duration,
        "chunk_ms": opts.chunk_ms,
        "lag_from": opts.lag_from,
        "redemption_wait_ms": ms(wait_s),
        "held": held,
        "ok": len(streams) - len(failed),
        "failed": len(failed),
        "first_failure": first_failure,
        "refused": len(refused),
        "refused_codes": sorted({s.refused for s in refused if s.refused}),
        "behind": behind,
        "upload_ratio_max": round(max(ratios), 3) if ratios else None,
        "events_measured": len(all_lags),
        "held_lag_p50_ms": ms(pct(held_lags, 0.5)),
        "held_lag_p99_ms": ms(p99),
        "held_lag_max_ms": ms(max(held_lags) if held_lags else None),
        # Finals since the audio up to the speech's end was sent (the VAD's wait included):
        # what a user waits for a result after they stop speaking.
        "final_sent_lag_p50_ms": ms(pct(final_sent, 0.5)),
        "final_sent_lag_p99_ms": ms(pct(final_sent, 0.99)),
        "lagging_events": sum(s.lagging for s in streams),
        "error_codes": sorted({e.split(":")[0] for s in streams for e in s.errors}),
        "final_lag_p50_ms": ms(pct(finals, 0.5)),
        "final_lag_p99_ms": ms(pct(finals, 0.99)),
        "inactive_lag_p50_ms": ms(pct(inactive, 0.5)),
        "inactive_lag_p99_ms": ms(pct(inactive, 0.99)),
        "stream_p99_median_ms": ms(pct(stream_p99, 0.5)),
        "stream_p99_worst_ms": ms(max(stream_p99) if stream_p99 else None),
        "lag_p50_ms": ms(pct(sent, 0.5)),
        "lag_p99_ms": ms(pct(sent, 0.99)),
        "lag_max_ms": ms(max(sent) if sent else None),
        "detectable_lag_p50_ms": ms(pct(detectable, 0.5)),
        "detectable_lag_p99_ms": ms(pct(detectable, 0.99)),
        "nominal_lag_p99_ms": ms(pct(nominal, 0.99)),
        "wall_s": round(wall, 2),
        "server_cpu_s": None if cpu_server is None else round(sum(cpu_server), 2),
        "server_cpu_sys_s": None if cpu_server is None else round(cpu_server[1], 2),
        "server_cpu_pct": None if cpu_server is None else round(100 * sum(cpu_server) / wall, 1),
        "server_rss_start_mb": round(rss0 / 2**20, 1) if opts.server else None,
        "server_rss_peak_mb": round(rss_peak / 2**20, 1) if opts.server else None,
        "loadgen_cpu_s": round(sum(cpu_self), 2),
        "loadgen_cpu_sys_s": round(cpu_self[1], 2),
        "loadgen_cpu_pct": round(100 * sum(cpu_self) / wall, 1),
        "loadgen_loop_lag_p99_ms": ms(pct(loop_lag, 0.99)),
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
    }


# -- output -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


FIGURES: list[tuple[str, str | tuple[str, ...]]] = [
    ("streams", "streams"),
    ("held (p99 < 250 ms, none behind, all ok)", "held"),
    ("streams ok / failed / refused (503)", ("ok", "failed", "refused")),
    ("streams behind (upload > 1.1x real time)", "behind"),
    ("slowest upload / audio duration", "upload_ratio_max"),
    ("events measured (finals + inactive)", "events_measured"),
    (
        "lag since the audio was sent p50 / p99 / max, ms",
        ("lag_p50_ms", "lag_p99_ms", "lag_max_ms"),
    ),
    (
        "lag beyond the VAD redemption wait p50 / p99, ms",
        ("detectable_lag_p50_ms", "detectable_lag_p99_ms"),
    ),
    ("lag p99 from start + audio time, ms", "nominal_lag_p99_ms"),
    ("held on: p50 / p99 / max, ms", ("held_lag_p50_ms", "held_lag_p99_ms", "held_lag_max_ms")),
    ("  final segments p50 / p99, ms", ("final_lag_p50_ms", "final_lag_p99_ms")),
    ("  inactive p50 / p99, ms", ("inactive_lag_p50_ms", "inactive_lag_p99_ms")),
    ("  per-stream p99: median / worst, ms", ("stream_p99_median_ms", "stream_p99_worst_ms")),
    (
        "server's own view, p99 <= : event lag / loop lag, ms",
        ("server_event_lag_p99_le_ms", "server_loop_lag_p99_le_ms"),
    ),
    ("wall, s", "wall_s"),
    (
        "server CPU, s / of it system, s / % of a core",
        ("server_cpu_s", "server_cpu_sys_s", "server_cpu_pct"),
    ),
    ("server RSS start / peak, MiB", ("server_rss_start_mb", "server_rss_peak_mb")),
    (
        "loadgen CPU, s / of it system, s / % of a core",
        ("loadgen_cpu_s", "loadgen_cpu_sys_s", "loadgen_cpu_pct"),
    ),
    ("loadgen event-loop lag p99, ms", "loadgen_loop_lag_p99_ms"),
    ("machine load average (1 min) at the end", "loadavg_1m"),
]


def print_figures(r: dict[str, Any], out: TextIO) -> None:
    print(
        f"\n{r['streams']} streams x {r['duration_s']:g} s, {r['format']} over {r['transport']}, "
        f"{r['chunk_ms']} ms chunks; held on the lag {HELD_ON[r['lag_from']]}"
        f" ({r['redemption_wait_ms']:g} ms)" * (r["lag_from"] == "detectable"),
        file=out,
    )
    width = max(len(label) for label, _ in FIGURES)
    for label, keys in FIGURES:
        value = " / ".join(_fmt(r[k]) for k in keys) if isinstance(keys, tuple) else _fmt(r[keys])
        print(f"  {label:<{width}}  {value}", file=out)
    if r["first_failure"]:
        print(f"  first failure: {r['first_failure']}", file=out)


HELD_ON = {
    "sent": "since the audio was sent",
    "detectable": "beyond the VAD redemption wait",
}

STEP_COLUMNS = [
    ("N", "streams"),
    ("held", "held"),
    ("ok", "ok"),
    ("refused", "refused"),
    ("behind", "behind"),
    ("p50 ms", "held_lag_p50_ms"),
    ("p99 ms", "held_lag_p99_ms"),
    ("max ms", "held_lag_max_ms"),
    ("sent p99", "lag_p99_ms"),
    ("srv cpu%", "server_cpu_pct"),
    ("srv MiB", "server_rss_peak_mb"),
    ("gen cpu%", "loadgen_cpu_pct"),
    ("load", "loadavg_1m"),
]


def print_steps(steps: list[dict[str, Any]], out: TextIO) -> None:
    widths = [max(len(h), *(len(_fmt(s[k])) for s in steps)) for h, k in STEP_COLUMNS]
    print("  ".join(h.rjust(w) for (h, _), w in zip(STEP_COLUMNS, widths, strict=True)), file=out)
    for s in steps:
        cells = (_fmt(s[k]).rjust(w) for (_, k), w in zip(STEP_COLUMNS, widths, strict=True))
        print("  ".join(cells), file=out)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loadgen",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument(
        "--spawn", action="store_true", help="start python -m service on a free port"
    )
    p.add_argument("--server-pid", type=int, help="the server's pid, for CPU and RSS (/proc)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for --spawn, e.g. STREAMER_VAD_MAX_BATCH=64 (repeatable)",
    )
    p.add_argument(
        "--streams",
        type=int,
        help=f"concurrent streams (default 20; with --find-max the first step, default "
        f"{FIND_MAX_START})",
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds of audio per stream")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams start")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per chunk, 20-500 ms")
    p.add_argument(
        "--slot-ms",
        type=int,
        default=10,
        help="streams start on a grid of this many ms (0: anywhere); default 10",
    )
    p.add_argument("--format", choices=["raw", "webm"], default="raw")
    p.add_argument("--ws", action="store_true", help="WebSocket /v1/ws instead of HTTP + SSE")
    p.add_argument(
        "--lag-from",
        choices=["detectable", "sent"],
        default="detectable",
        help="what 'held' measures lag from: the audio up to the event's time plus the VAD's "
        "redemption wait (default), or up to the event's time alone (includes that wait)",
    )
    p.add_argument(
        "--find-max",
        action="store_true",
        help=f"double N from --streams (default {FIND_MAX_START}) until a step does not hold",
    )
    p.add_argument("--max-streams", type=int, default=3200, help="--find-max stops here")
    p.add_argument(
        "--refine",
        type=int,
        default=2,
        help="--find-max: bisection steps after doubling (default 2)",
    )
    args = p.parse_args(argv)
    if not 20 <= args.chunk_ms <= 500:
        p.error("--chunk-ms must be between 20 and 500")
    if args.slot_ms < 0 or args.slot_ms > args.chunk_ms:
        p.error("--slot-ms must be between 0 and --chunk-ms")
    if args.streams is None:
        args.streams = FIND_MAX_START if args.find_max else 20
    if args.streams < 1 or args.duration <= 0 or args.ramp < 0:
        p.error("--streams, --duration must be positive and --ramp not negative")
    return args


async def wait_idle(url: str, timeout_s: float = 30.0) -> None:
    """Between steps: until the server has no live sessions left."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        with anyio.move_on_after(timeout_s):
            while True:
                try:
                    r = await client.get(f"{url}/readyz")
                    if r.status_code == 200 and not r.json().get("sessions"):
                        return
                except httpx.HTTPError:
                    pass
                await anyio.sleep(0.5)


Histograms = dict[str, dict[float, float]]  # metric -> upper bound -> cumulative count
# The server's own view: lag from a chunk's arrival to the event (finals and inactive, as the
# load generator measures), and how late its event loop wakes (streamer_event_loop_lag_seconds).
SERVER_HISTOGRAMS = {
    "event": ("streamer_event_lag_seconds", {"final", "inactive"}),
    "loop": ("streamer_event_loop_lag_seconds", None),
}


async def scrape_histograms(url: str) -> Histograms | None:
    """The server's histograms of :data:`SERVER_HISTOGRAMS` (label sets summed); None when
    ``/metrics`` does not answer (another server, metrics off)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            r = await client.get(f"{url}/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    out: Histograms = {key: {} for key in SERVER_HISTOGRAMS}
    names = {f"{name}_bucket": (key, types) for key, (name, types) in SERVER_HISTOGRAMS.items()}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name not in names:
                continue
            key, types = names[sample.name]
            if types is not None and sample.labels.get("type") not in types:
                continue
            bound = float(sample.labels["le"])
            out[key][bound] = out[key].get(bound, 0.0) + sample.value
    return out


def server_p99_ms(before: Histograms | None, after: Histograms | None, key: str) -> float | None:
    """The upper bound of the bucket holding the 99th percentile of what ``key`` observed
    between two scrapes, in ms (a histogram gives no more than that); None if nothing was."""
    if before is None or after is None or not after.get(key):
        return None
    counts = sorted((b, c - before[key].get(b, 0.0)) for b, c in after[key].items())
    total = counts[-1][1]
    if total <= 0:
        return None
    bound = next(b for b, c in counts if c >= 0.99 * total)
    return None if math.isinf(bound) else round(bound * 1000, 1)


async def warm_up(url: str, ws: bool) -> None:
    """Load what the streams use lazily (httpcore's HTTP/1.1 code, the WebSocket client) before
    anything is measured: imports are not the generator's running cost."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        await client.get(f"{url}/readyz")
        async with client.stream("GET", f"{url}/healthz") as response:
            async for _ in iter_sse(response.aiter_lines()):
                pass
    if ws:
        import websockets.asyncio.client  # noqa: F401


async def find_max(
    opts: Options, audio: Audio, url: str, first: int, most: int, refine: int
) -> list[dict[str, Any]]:
    """Double N from ``first`` while steps hold (halve it while the first ones do not), then
    bisect ``refine`` times between the largest N held and the smallest not held."""
    steps: list[dict[str, Any]] = []

    async def step(n: int) -> bool:
        await wait_idle(url)
        result = await run_step(opts, audio, n)
        steps.append(result)
        print(
            f"N={n}: {'held' if result['held'] else 'did not hold'}  "
            f"p99 {_fmt(result['held_lag_p99_ms'])} ms  behind {result['behind']}  "
            f"failed {result['failed']}  refused {result['refused']}  load {result['loadavg_1m']}",
            file=sys.stderr,
            flush=True,
        )
        return bool(result["held"])

    good, bad = 0, None
    n = min(first, most)
    if await step(n):
        good = n
        while n * 2 <= most:
            n *= 2
            if not await step(n):
                bad = n
                break
            good = n
    else:
        bad = n
        while n > 1:
            n //= 2
            if await step(n):
                good = n
                break
            bad = n
    for _ in range(refine):
        if bad is None or bad - good <= max(1, good // 10):
            break
        n = (good + bad) // 2
        if await step(n):
            good = n
        else:
            bad = n
    return steps


async def main_async(args: argparse.Namespace, url: str, server: Proc | None) -> int:
    make = raw_audio if args.format == "raw" else webm_audio
    audio = make(args.duration, args.chunk_ms)
    opts = Options(
        url,
        server,
        args.streams,
        args.duration,
        args.ramp,
        args.chunk_ms,
        args.ws,
        args.format,
        args.lag_from,
        args.slot_ms,
    )
    if server is None:
        print("no --server-pid or --spawn: server CPU and RSS are not measured", file=sys.stderr)
    await warm_up(url, args.ws)
    if not args.find_max:
        result = await run_step(opts, audio, args.streams)
        print_figures(result, sys.stdout)
        print(json.dumps(result), flush=True)
        return 0 if result["held"] else 1

    steps = await find_max(opts, audio, url, args.streams, args.max_streams, args.refine)
    held = [s["streams"] for s in steps if s["held"]]
    best = max(held) if held else 0
    print(
        f"\nfind-max: {audio.label} over {'ws' if args.ws else 'http1'}, "
        f"{args.duration:g} s streams, {args.chunk_ms} ms chunks"
    )
    print_steps(steps, sys.stdout)
    print(f"largest N held: {best}")
    print(json.dumps({"max_streams_held": best, "steps": steps}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    spawned: Server | None = None
    url, pid = args.url.rstrip("/"), args.server_pid
    if args.spawn:
        # The test suite's fast model unless --env says otherwise (start_server's default is
        # a free model).
        env = {"STREAMER_MODEL_OPTIONS": FAST_MODEL}
        env.update(item.split("=", 1) for item in args.env)
        spawned = start_server(env)
        url, pid = spawned.url, spawned.process.pid
        print(f"spawned server pid {pid} at {url} (log {spawned.log_path})", file=sys.stderr)
    try:
        code = anyio.run(main_async, args, url, Proc(pid) if pid else None)
    finally:
        if spawned is not None:
            spawned.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
