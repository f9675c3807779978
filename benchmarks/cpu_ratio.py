"""Server CPU per audio second for a file uploaded as fast as possible, against a raw loop.

    .venv/bin/python benchmarks/cpu_ratio.py [--runs 5] [--uploads 3] [--repeats 8]

The raw loop is the least work the job needs, in this process, one thread: PyAV decodes the
file, ``av.AudioResampler`` makes 16 kHz mono float32, and onnxruntime runs Silero on 512-sample
frames with the 64-sample context, batch 1, with the same graph and ``InferenceSession`` options
as the server (``--vad-graph``, passed to the server as ``STREAMER_VAD_GRAPH``). The dense graph
takes each second of decoded audio in one run (the server's VAD gets a second or more at a time
when an upload is ahead of it); the reference graph runs one frame per run. Its CPU is
``time.process_time()``.

The server is ``python -m service`` in a subprocess with a free model (the dummy with delay 0,
constant_factor 0, jitter 0) and logging at WARNING. Each upload creates a session, subscribes
to its events (SSE, read to ``end``) and PUTs the whole file at once (a sized body, as
``curl -T``); the server's CPU (utime + stime of every thread, /proc/PID/stat) across
``--uploads`` uploads is divided by the audio seconds uploaded.

The file is tests/data/speech.wav concatenated ``--repeats`` times (8: ~60 s), as WAV (the
service's numpy path) and as webm/opus (our demuxer and libopus in the shared thread). Each run
measures the raw loop and the server on the same file back to back; the ratio server / raw is
taken per run (the raw loop runs before and after the server's uploads; their mean is the
baseline) and the median of ``--runs`` runs is reported. Target: <= 1.10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    Server,
    audio_seconds,
    create_session,
    long_audio,
    machine,
    median,
    request,
    sse_events,
    start_server,
)
from service.vad.silero import (
    CONTEXT,
    FRAME,
    GRAPHS,
    STATE_SIZE,
    forward,
    forward_frames,
    load_session,
    takes_sequences,
)

TARGET = 1.10
# The raw loop runs the VAD once per this much decoded audio (16 kHz samples).
RAW_BATCH_SAMPLES = 16000


def raw_loop(path: Path, session: ort.InferenceSession) -> tuple[int, float]:
    """Decode + resample + Silero (batch 1) over the whole file; (samples at 16 kHz, max prob)."""
    dense = takes_sequences(session)
    state = np.zeros((2, 1, STATE_SIZE), dtype=np.float32)
    context = np.zeros(CONTEXT, dtype=np.float32)
    pending = np.zeros(0, dtype=np.float32)  # less than a frame, left by the last run
    parts: list[np.ndarray] = []  # decoded since
    samples = taken = 0  # decoded; of which joined into a run
    top = 0.0

    def frames(audio: np.ndarray) -> np.ndarray:
        """Run every whole frame of ``audio`` (in one run with the dense graph); return the rest."""
        nonlocal state, context, top
        k = len(audio) // FRAME
        if k == 0:
            return audio
        whole = audio[: k * FRAME].reshape(k, FRAME)
        x = np.empty((1, k, CONTEXT + FRAME), dtype=np.float32)
        x[0, 0, :CONTEXT] = context
        x[0, 1:, :CONTEXT] = whole[:-1, -CONTEXT:]
        x[0, :, CONTEXT:] = whole
        context = whole[-1, -CONTEXT:].copy()
        if dense:
            probs, state = forward_frames(session, x, state, np.array([k], dtype=np.int32))
            top = max(top, float(probs.max()))
        else:
            for i in range(k):
                prob, state = forward(session, x[:, i], state)
                top = max(top, float(prob[0]))
        return audio[k * FRAME :]

    def add(audio: np.ndarray) -> None:
        nonlocal pending, samples
        samples += len(audio)
        parts.append(audio)
        if samples - taken >= RAW_BATCH_SAMPLES:
            pending = run()

    def run() -> np.ndarray:
        """The VAD over the last remainder and every part since; returns the new remainder."""
        nonlocal taken
        joined = np.concatenate([pending, *parts])
        parts.clear()
        taken = samples
        return frames(joined)

    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        for frame in container.decode(audio=0):
            for f in resampler.resample(frame):
                add(f.to_ndarray()[0])
        for f in resampler.resample(None):
            add(f.to_ndarray()[0])
    pending = run()
    if len(pending):
        frames(np.concatenate([pending, np.zeros(FRAME - len(pending), np.float32)]))
    return samples, top


async def upload_once(server: Server, data: bytes) -> dict[str, object]:
    """One session: SSE subscriber + one sized PUT of the whole file; the ``end`` event."""
    sid = await create_session(server.host, server.port)
    end: dict[str, object] = {}

    async def follow() -> None:
        async for e in sse_events(server.host, server.port, f"/v1/sessions/{sid}/events"):
            if e.event == "end":
                end.update(json.loads(e.data))
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0)
    status, body = await request(
        server.host,
        server.port,
        "PUT",
        f"/v1/sessions/{sid}/audio",
        data,
        "application/octet-stream",
    )
    if status != 200:
        raise RuntimeError(f"upload: {status} {body[:300]!r}")
    await asyncio.wait_for(watcher, 30)
    if end.get("reason") != "completed":
        raise RuntimeError(f"session ended with {end}")
    return end


def server_cpu(server: Server, data: bytes, uploads: int) -> tuple[float, float]:
    """(server CPU seconds, audio seconds) over ``uploads`` sequential uploads."""
    proc = server.proc()

    async def go() -> float:
        total = 0.0
        for _ in range(uploads):
            end = await upload_once(server, data)
            total += float(end["audio_seconds"])  # type: ignore[arg-type]
        return total

    time.sleep(0.2)  # let the previous upload's tail (SSE close, thread exit) settle
    before = proc.cpu_seconds()
    audio = asyncio.run(go())
    time.sleep(0.2)
    return proc.cpu_seconds() - before, audio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--uploads", type=int, default=3, help="uploads per server measurement")
    p.add_argument("--repeats", type=int, default=8, help="speech.wav copies (8: ~60 s)")
    p.add_argument("--formats", default="wav,webm")
    p.add_argument("--vad-graph", choices=GRAPHS, default="dense")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    onnx = load_session(graph=args.vad_graph)
    with tempfile.TemporaryDirectory() as tmp:
        files = long_audio(Path(tmp), args.repeats)
        short_dir = Path(tmp) / "short"
        short_dir.mkdir()
        shorts = long_audio(short_dir, 1)
        env = {"STREAMER_VAD_GRAPH": args.vad_graph}
        env.update(item.split("=", 1) for item in args.env)
        with start_server(env) as server:
            print(f"machine: {machine()}; server pid {server.pid}; VAD graph {args.vad_graph}")
            results = {}
            for fmt in args.formats.split(","):
                path = files[fmt]
                data = path.read_bytes()
                short = shorts[fmt].read_bytes()
                seconds = audio_seconds(path)
                # Warm-up: lazy imports, onnxruntime allocations, thread pools on both sides.
                raw_loop(path, onnx)
                server_cpu(server, data, 1)
                server_cpu(server, short, 1)
                rows: list[dict[str, float]] = []
                for run in range(args.runs):
                    # The raw loop brackets the server measurements (before and after, averaged)
                    # so a change in the machine's speed during the run hits both sides.
                    t0 = time.process_time()
                    n, _ = raw_loop(path, onnx)
                    t1 = time.process_time()
                    cpu, audio = server_cpu(server, data, args.uploads)
                    cpu_s, audio_s = server_cpu(server, short, args.uploads)
                    t2 = time.process_time()
                    raw_loop(path, onnx)
                    raw = (t1 - t0 + time.process_time() - t2) / 2 / (n / 16000)
                    srv = cpu / audio
                    # Two lengths give the fixed cost of a session (create, SSE, upload request,
                    # pipeline start and end) and the marginal cost of one more audio second.
                    marginal = (cpu - cpu_s) / (audio - audio_s)
                    fixed = (cpu - marginal * audio) / args.uploads
                    rows.append(
                        {
                            "raw": raw,
                            "srv": srv,
                            "ratio": srv / raw,
                            "marginal": marginal,
                            "mratio": marginal / raw,
                            "fixed": fixed,
                        }
                    )
                    print(
                        f"  {fmt} run {run + 1}: raw {raw * 1e3:.2f} ms/s, server "
                        f"{srv * 1e3:.2f} ms/s, ratio {srv / raw:.3f}; marginal "
                        f"{marginal * 1e3:.2f} ms/s (ratio {marginal / raw:.3f}), fixed "
                        f"{fixed * 1e3:.0f} ms per session",
                        flush=True,
                    )
                results[fmt] = (rows, seconds)
            print()
            print(
                f"{'format':<6} {'audio':>6} {'raw ms/s':>9} {'server ms/s':>12} "
                f"{'ratio':>6} {'min..max':>12} {'marginal ms/s':>14} {'ratio':>6} "
                f"{'fixed ms/session':>17}"
            )
            for fmt, (rows, seconds) in results.items():

                def m(key: str, rows: list[dict[str, float]] = rows) -> float:
                    return median([r[key] for r in rows])

                ratio = m("ratio")
                lo, hi = min(r["ratio"] for r in rows), max(r["ratio"] for r in rows)
                ok = "ok" if ratio <= TARGET else f"MISSES {TARGET}"
                print(
                    f"{fmt:<6} {seconds:5.1f}s {m('raw') * 1e3:9.2f} {m('srv') * 1e3:12.2f} "
                    f"{ratio:6.3f} {lo:5.3f}..{hi:5.3f} "
                    f"{m('marginal') * 1e3:14.2f} {m('mratio'):6.3f} {m('fixed') * 1e3:17.0f}  {ok}"
                )
            print(
                f"medians of {args.runs} runs, {args.uploads} uploads of each length per run; "
                f"marginal = (CPU of the {seconds:.0f} s uploads - CPU of the 7.5 s uploads) / "
                "audio-seconds difference"
            )


if __name__ == "__main__":
    main()
