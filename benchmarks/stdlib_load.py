"""An independent check of the load figures: live streams from a plain stdlib asyncio client.

benchmarks/loadgen.py is built to cost little: one timer sends every stream's due chunks, with
streams aligned on a 10 ms grid. Real clients are not aligned; each sends on its own clock. This
client shares no code with the service or the load generator (standard library only, HTTP/1.1
by hand) and does what a population of ordinary clients does: per stream, POST a raw-PCM
session, open one SSE connection, and upload 100 ms chunks (chunked transfer encoding) at real
time from its own task with its own ``asyncio.sleep`` timer, streams started ``--gap-ms`` apart.

It reports streams admitted / refused (503) / failed, and the lag of ``inactive`` and final
``segment`` events: arrival minus the moment the audio up to the event's time, plus the VAD's
redemption wait (608 ms) for ``inactive``, had been sent.

    python benchmarks/stdlib_load.py --url http://127.0.0.1:8000 --streams 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
REDEMPTION_S = 0.608  # 600 ms in whole 512-sample frames, + one frame
CHUNK_S = 0.1


@dataclass
class Result:
    refused: bool = False
    failed: str | None = None
    ended: bool = False
    inactive_lags: list[float] = field(default_factory=list)
    final_lags: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def http(host: str, port: int, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


async def stream(host: str, port: int, pcm: bytes, seconds: float, r: Result) -> None:
    config = {"format": {"channels": 1, "sample_rate": 16000, "bit_depth": 16, "is_float": False}}
    status, body = await http(host, port, "POST", "/v1/sessions", json.dumps(config).encode())
    if status == 503:
        r.refused = True
        return
    if status != 201:
        r.failed = f"create: {status}"
        return
    sid = json.loads(body)["id"]
    sent_at: list[float] = []  # the wall time each chunk went out

    def sent(audio_s: float) -> float:
        k = min(len(sent_at) - 1, max(0, math.ceil(audio_s / CHUNK_S - 1e-9) - 1))
        return sent_at[k]

    async def events() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: {host}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        kind = ""
        try:
            while line := await reader.readline():
                now = time.monotonic()
                text = line.decode().strip()
                if text.startswith("event: "):
                    kind = text[7:]
                elif text.startswith("data: "):
                    data = json.loads(text[6:])
                    if kind == "inactive":
                        r.inactive_lags.append(now - sent(data["time"] + REDEMPTION_S))
                    elif kind == "segment" and data["is_final"]:
                        r.final_lags.append(now - sent(data["end_time"]))
                    elif kind == "error":
                        r.errors.append(data["code"])
                    elif kind == "end":
                        r.ended = data["reason"] == "completed"
                        return
        finally:
            writer.close()

    listener = asyncio.create_task(events())
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST /v1/sessions/{sid}/audio HTTP/1.1\r\nHost: {host}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    step = int(16000 * CHUNK_S) * 2
    n = int(seconds / CHUNK_S)
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i * CHUNK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        off = (i * step) % (len(pcm) - step)
        chunk = pcm[off : off + step]
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        sent_at.append(time.monotonic())
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()
    try:
        await asyncio.wait_for(listener, 60)
    except TimeoutError:
        r.failed = "no end event within 60 s"
    if not r.ended and r.failed is None:
        r.failed = "ended badly"


async def main_async(args: argparse.Namespace) -> int:
    u = urlsplit(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    with wave.open(str(DATA / "speech.wav")) as w:
        pcm = w.readframes(w.getnframes())
    results = [Result() for _ in range(args.streams)]
    tasks = []
    for r in results:
        tasks.append(asyncio.create_task(stream(host, port, pcm, args.duration, r)))
        await asyncio.sleep(args.gap_ms / 1000)
    await asyncio.gather(*tasks, return_exceptions=True)
    refused = sum(r.refused for r in results)
    admitted = [r for r in results if not r.refused]
    failed = [r for r in admitted if r.failed or r.errors]
    inactive = [x for r in admitted for x in r.inactive_lags]
    finals = [x for r in admitted for x in r.final_lags]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    print(
        f"{args.streams} streams, {args.gap_ms:g} ms apart, {args.duration:g} s each: "
        f"admitted {len(admitted)}, refused {refused}, failed {len(failed)}; "
        f"inactive lag p50/p99 {ms(pct(inactive, 0.5))}/{ms(pct(inactive, 0.99))} ms, "
        f"final lag p50/p99 {ms(pct(finals, 0.5))}/{ms(pct(finals, 0.99))} ms; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    if failed:
        print("  first failure:", failed[0].failed or failed[0].errors[:3])
    print(
        json.dumps(
            {
                "streams": args.streams,
                "admitted": len(admitted),
                "refused": refused,
                "failed": len(failed),
                "inactive_p50_ms": ms(pct(inactive, 0.5)),
                "inactive_p99_ms": ms(pct(inactive, 0.99)),
                "final_p50_ms": ms(pct(finals, 0.5)),
                "final_p99_ms": ms(pct(finals, 0.99)),
            }
        )
    )
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--streams", type=int, default=400)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
