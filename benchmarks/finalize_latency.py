"""How long after Deepgram's ``Finalize`` its ``from_finalize`` Results arrives on /v1/listen.

    .venv/bin/python benchmarks/finalize_latency.py [--runs 10] [--delay 0]

Each run opens ``/v1/listen`` (raw linear16, 16 kHz), streams the first second of
tests/data/speech.wav at real-time pace in 20 ms frames (the first sentence is still being
spoken), sends ``Finalize``, and measures until the Results with ``from_finalize: true``
arrives. The server runs the dummy model with ``--delay`` seconds per call and nothing else
(by default 0: the figure is the server's own share: the receive, the VAD catching up with the
last frames, the flush, a model call in a thread, the event log and the send). Without
``Finalize`` the same final comes only after the VAD's redemption time of silence (600 ms of
audio by default) has streamed in. Prints each run and the median and worst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect

from benchmarks.common import machine, median, speech_pcm, start_server

FRAME_S = 0.02


async def one_run(url: str, pcm: bytes) -> float:
    frame = int(16000 * FRAME_S) * 2
    async with connect(f"{url}?encoding=linear16&sample_rate=16000") as ws:
        start = time.monotonic()
        for i, at in enumerate(range(0, 32000, frame)):
            await ws.send(pcm[at : at + frame])
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_S - time.monotonic()))
        sent = time.monotonic()
        await ws.send(json.dumps({"type": "Finalize"}))
        while True:
            message = json.loads(await ws.recv())
            if message.get("from_finalize"):
                took = time.monotonic() - sent
                break
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for _ in ws:
            pass
    return took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.0, help="the model's seconds per call")
    args = parser.parse_args()
    model = json.dumps({"delay": args.delay, "constant_factor": 0, "jitter": 0})
    pcm = speech_pcm()
    print(machine())
    with start_server({"STREAMER_MODEL_OPTIONS": model}) as server:
        url = server.url.replace("http", "ws", 1) + "/v1/listen"
        times = []
        for run in range(args.runs):
            took = await asyncio.wait_for(one_run(url, pcm), 30)
            times.append(took)
            print(f"run {run + 1}: Finalize -> from_finalize Results {took * 1000:.1f} ms")
    print(
        f"median {median(times) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms "
        f"over {len(times)} runs (model delay {args.delay * 1000:g} ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())
