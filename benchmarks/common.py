"""Shared helpers for the benchmark scripts (cpu_ratio.py, session_memory.py, final_latency.py).

- the server as a subprocess (``python -m service`` on a free port) and its CPU/RSS from /proc;
- long test audio made from tests/data/speech.wav with ffmpeg (WAV and webm/opus);
- a small asyncio HTTP/1.1 client (create a session, a chunked upload, an SSE reader) that costs
  little next to the server: the benchmarks share two cores with it;
- the model used by final_latency.py (:func:`timestamp_model`), which reports when it returned.

This module is imported by the server process too (``STREAMER_MODEL=benchmarks.common:
timestamp_model``), so it imports nothing heavy at module level.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Linux's SO_TIMESTAMPNS (also the control message's type); Python 3.11 does not name it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
# The model costs nothing: the figures are the streaming machinery's.
FREE_MODEL = '{"delay": 0, "constant_factor": 0, "jitter": 0}'


# -- figures ------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by the nearest-rank method (p99 of 100 values is the 99th)."""
    if not values:
        return math.nan
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


# -- processes ----------------------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (the server's Opus decoding process): what the server
    costs is all of them."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited meanwhile
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                pids.append(int(entry.name))
    return pids


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


class Proc:
    """CPU, memory and threads of a process and its children, from /proc (every thread
    counted)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        user, system = self.cpu_split()
        return user + system

    def cpu_split(self) -> tuple[float, float]:
        """User and system CPU seconds."""
        user = system = 0
        for pid in family(self.pid):
            try:
                fields = _stat_fields(pid)
            except OSError:
                continue
            user, system = user + int(fields[11]), system + int(fields[12])
        return user / CLK_TCK, system / CLK_TCK

    def rss_bytes(self) -> int:
        total = 0
        for pid in family(self.pid):
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
            except OSError:
                continue
        return total

    def threads(self) -> int:
        total = 0
        for pid in family(self.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("Threads:"):
                    total += int(line.split()[1])
        return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def proc(self) -> Proc:
        return Proc(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.returncode in (0, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)  # kept when the server failed

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(env: Mapping[str, str] | None = None, timeout_s: float = 60.0) -> Server:
    """``python -m service`` on a free port, cwd the repository root (so ``benchmarks.*`` models
    import; ``BENCH_SERVER_ROOT`` names another checkout), the model free unless ``env`` says
    otherwise, logging at WARNING."""
    import urllib.request

    raise_fd_limit()
    port = free_port()
    full_env = {
        **os.environ,
        "STREAMER_MODEL_OPTIONS": FREE_MODEL,
        "STREAMER_LOG_LEVEL": "WARNING",
        "STREAMER_MAX_SESSIONS": "100000",
        **(env or {}),
    }
    full_env.pop("PORT", None)
    fd, name = tempfile.mkstemp(prefix="bench-server-", suffix=".log")
    os.close(fd)
    log_path = Path(name)
    # BENCH_SERVER_ROOT runs the server from another checkout (A/B of a proposed change).
    root = Path(os.environ.get("BENCH_SERVER_ROOT") or ROOT)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port)],
            cwd=root,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, "127.0.0.1", port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=1.0) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    sys.exit(f"the server was not ready in {timeout_s:g} s:\n{log_path.read_text()}")


# -- audio --------------------------------------------------------------------------------------


def speech_pcm() -> bytes:
    """tests/data/speech.wav's samples: s16le, 16 kHz, mono, 7.5 s."""
    import wave

    with wave.open(str(DATA / "speech.wav")) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return bytes(w.readframes(w.getnframes()))


def long_audio(directory: Path, repeats: int = 8) -> dict[str, Path]:
    """speech.wav concatenated ``repeats`` times (8: ~60 s) as 16 kHz s16 WAV and as webm/opus
    (48 kHz, 32 kbit/s, live muxing as a browser's MediaRecorder writes it)."""
    wav = directory / f"speech_x{repeats}.wav"
    webm = directory / f"speech_x{repeats}.webm"
    inputs: list[str] = []
    for _ in range(repeats):
        inputs += ["-i", str(DATA / "speech.wav")]
    concat = f"{''.join(f'[{i}:a]' for i in range(repeats))}concat=n={repeats}:v=0:a=1[a]"
    quiet = ["-hide_banner", "-loglevel", "error", "-y"]
    subprocess.run(
        [
            "ffmpeg",
            *quiet,
            *inputs,
            "-filter_complex",
            concat,
            "-map",
            "[a]",
            "-c:a",
            "pcm_s16le",
            "-ar",
            "16000",
            "-ac",
            "1",
            str(wav),
        ],
        check=True,
    )
    subprocess.run(
        [
            "ffmpeg",
            *quiet,
            "-i",
            str(wav),
            "-ar",
            "48000",
            "-c:a",
            "libopus",
            "-b:a",
            "32k",
            "-live",
            "1",
            "-f",
            "webm",
            str(webm),
        ],
        check=True,
    )
    return {"wav": wav, "webm": webm}


def audio_seconds(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(stream))
        return samples / stream.codec_context.sample_rate


# -- a small HTTP/1.1 client --------------------------------------------------------------------


class HttpError(RuntimeError):
    pass


class Refused(HttpError):
    """The server turned a new session away for now (503: ``too_many_sessions``,
    ``server_overloaded``); ``code`` is the error's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


async def request(
    host: str, port: int, method: str, path: str, body: bytes = b"", content_type: str = ""
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        status, headers = await _read_head(reader)
        return status, await _read_body(reader, headers)
    finally:
        writer.close()


async def create_session(host: str, port: int, config: Mapping[str, Any] | None = None) -> str:
    status, body = await request(
        host, port, "POST", "/v1/sessions", json.dumps(config or {}).encode(), "application/json"
    )
    if status == 503:
        error = json.loads(body)["error"]
        raise Refused(error["code"], f"create: 503 {error['code']}: {error['message']}")
    if status != 201:
        raise HttpError(f"create: {status} {body[:200]!r}")
    return str(json.loads(body)["id"])


class ChunkedUpload:
    """``POST /v1/sessions/{id}/audio`` with ``Transfer-Encoding: chunked``, one write per
    chunk; :meth:`finish` ends the body and returns the summary."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, headers: Mapping[str, str] | None = None
    ) -> ChunkedUpload:
        """``headers``: more request headers (``Upload-Offset`` for a resumed upload)."""
        reader, writer = await asyncio.open_connection(host, port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n{extra}"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            await self.writer.drain()

    def reset(self) -> None:
        """Cut the connection as a network failure does: a TCP reset (SO_LINGER 0)."""
        sock: socket.socket = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def finish(self) -> tuple[int, bytes]:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        try:
            status, headers = await _read_head(self.reader)
            return status, await _read_body(self.reader, headers)
        finally:
            self.writer.close()

    def abort(self) -> None:
        self.writer.close()


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    arrived: float  # time.time() when this process read the bytes that completed it
    kernel: float  # time.time() when the kernel received them (SO_TIMESTAMPNS): no client lag
    id: str | None = None  # its ``id:`` field (the event's number in the session's log)


class _TimestampedSocket:
    """A non-blocking TCP socket read with ``recvmsg`` and ``SO_TIMESTAMPNS``: each read also
    says when the kernel received the data, so a busy client loop does not count as latency."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        self._space = socket.CMSG_SPACE(16)

    async def recv(self) -> tuple[bytes, float]:
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, self._space)
            except BlockingIOError:
                ready = self.loop.create_future()
                self.loop.add_reader(self.sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    self.loop.remove_reader(self.sock.fileno())
                continue
            kernel = time.time()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    kernel = sec + nsec / 1e9
            return data, kernel


async def sse_events(host: str, port: int, path: str) -> AsyncIterator[SseEvent]:
    """The events of ``GET path`` as they arrive (de-chunked by hand), until the stream ends."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(
            sock,
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        reader = _TimestampedSocket(sock)
        raw = b""
        while b"\r\n\r\n" not in raw:
            data, _ = await reader.recv()
            if not data:
                raise HttpError("events: connection closed before the response")
            raw += data
        head, raw = raw.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if int(lines[0].split()[1]) != 200:
            raise HttpError(f"events: {lines[0]}")
        chunked = any(
            line.lower().startswith("transfer-encoding:") and "chunked" in line.lower()
            for line in lines[1:]
        )
        kernel = time.time()
        body = b""  # de-chunked, not yet split into events
        ended = False
        while True:
            # De-chunk what has arrived.
            if chunked:
                while (eol := raw.find(b"\r\n")) >= 0:
                    size = int(raw[:eol].split(b";")[0], 16)
                    if size == 0:
                        ended = True
                        break
                    if len(raw) < eol + 2 + size + 2:
                        break
                    body += raw[eol + 2 : eol + 2 + size]
                    raw = raw[eol + 2 + size + 2 :]
            else:
                body, raw = body + raw, b""
            arrived = time.time()
            body = body.replace(b"\r\n", b"\n")
            while (end := body.find(b"\n\n")) >= 0:
                block, body = body[:end], body[end + 2 :]
                event, data_lines, event_id = "message", [], None
                for line in block.decode().split("\n"):
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("id:"):
                        event_id = line[3:].strip()
                    elif line.startswith("data:"):
                        data_lines.append(line[5:].lstrip(" "))
                if data_lines:
                    yield SseEvent(event, "\n".join(data_lines), arrived, kernel, event_id)
            if ended:
                return
            data, kernel = await reader.recv()
            if not data:
                return
            raw += data
    finally:
        sock.close()


# -- the benchmark model ------------------------------------------------------------------------


def timestamp_model(**options: Any) -> Any:
    """The dummy model (same options, same sleep) whose output also says when it returned:
    ``{"count": n, "returned_at": time.time()}``. For final_latency.py:
    ``STREAMER_MODEL=benchmarks.common:timestamp_model``."""
    from service.model.dummy import DummyModel

    class TimestampModel(DummyModel):
        def infer(self, audio: Any) -> Mapping[str, Any]:
            out = dict(super().infer(audio))
            out["returned_at"] = time.time()
            return out

    return TimestampModel(**options)


# -- live streams -------------------------------------------------------------------------------


def cut(data: bytes, duration_s: float, chunk_s: float, header: int = 0) -> list[bytes]:
    """``data`` in pieces of ``chunk_s`` seconds of audio each (bytes proportional to time past
    a ``header``); the header goes with the first piece."""
    per = max(1, round((len(data) - header) / duration_s * chunk_s))
    pieces = [data[i : i + per] for i in range(header, len(data), per)]
    if header and pieces:
        pieces[0] = data[:header] + pieces[0]
    return pieces


@dataclass
class StreamResult:
    events: list[SseEvent]
    summary: dict[str, Any] | None = None
    failure: str | None = None
    started: float = 0.0  # time.time() at the first chunk

    @property
    def end(self) -> dict[str, Any] | None:
        for e in reversed(self.events):
            if e.event == "end":
                return dict(json.loads(e.data))
        return None


async def live_stream(
    host: str,
    port: int,
    chunks: Sequence[bytes],
    chunk_s: float,
    *,
    query: str = "",
    config: Mapping[str, Any] | None = None,
    subscribe: bool = True,
    stop: asyncio.Event | None = None,
    start_at: float | None = None,
) -> StreamResult:
    """One live session: create it, follow its events, upload ``chunks`` one per ``chunk_s``
    (real time), end the body after the last chunk or once ``stop`` is set, wait for ``end``.
    ``start_at`` is a ``loop.time()`` to start sending at (streams on a shared grid)."""
    loop = asyncio.get_running_loop()
    result = StreamResult([])
    try:
        sid = await create_session(host, port, config)
        follower: asyncio.Task[None] | None = None
        if subscribe:
            ready = asyncio.Event()

            async def follow() -> None:
                agen = sse_events(host, port, f"/v1/sessions/{sid}/events")
                ready.set()
                async for e in agen:
                    result.events.append(e)
                    if e.event == "end":
                        return

            follower = asyncio.create_task(follow())
            await ready.wait()
        upload = await ChunkedUpload.open(host, port, f"/v1/sessions/{sid}/audio{query}")
        t0 = start_at if start_at is not None else loop.time()
        for i, chunk in enumerate(chunks):
            if stop is not None and stop.is_set():
                break
            delay = t0 + i * chunk_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == 0:
                result.started = time.time()
            await upload.send(chunk)
        status, body = await upload.finish()
        if status != 200:
            result.failure = f"upload: {status} {body[:200]!r}"
        else:
            result.summary = json.loads(body)
        if follower is not None:
            await asyncio.wait_for(follower, 60)
    except Exception as exc:  # one failed stream is a figure, not the end of the run
        result.failure = result.failure or f"{type(exc).__name__}: {exc}"
    return result


async def loop_lag_sampler(samples: list[float], interval: float = 0.05) -> None:
    """How late this process's own event loop wakes up: the client's share of measured lag."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(interval)
        samples.append(loop.time() - t - interval)
