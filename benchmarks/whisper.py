"""Whisper tiny.en (``service.model.whisper``): accuracy, cost, and live streams held.

1. Accuracy and cost, in this process, without the server: a dozen utterances that espeak-ng
   says (two voices, known text), each with 0.3 s of silence around it as the VAD's pad would
   leave. Word error rate over all of them (lower case, punctuation dropped), and CPU seconds per
   utterance and per second of audio, through ``infer`` one by one and through ``infer_batch``;
   medians of ``--runs`` runs after one warm-up pass. CPU is this process's (every thread).
2. Live streams: ``benchmarks/loadgen.py --spawn`` with ``STREAMER_MODEL=service.model.whisper:
   create``, N streams of speech at real-time pace (tests/data/speech.wav looped: about one
   utterance every 2.5 s per stream; finals only, no interims). Whisper takes ~0.5 s per call,
   so loadgen's own 250 ms budget cannot hold; here a step holds when every stream completed,
   none fell behind, and the p99 lag of final segments (from when the utterance's end could be
   detected, i.e. the model's queueing plus its own time) stayed under ``--final-budget-ms``.

    .venv/bin/python benchmarks/whisper.py                       # both parts
    .venv/bin/python benchmarks/whisper.py --streams 2,4,6 --duration 20 --runs 3
    .venv/bin/python benchmarks/whisper.py --no-streams          # accuracy and cost only

Needs the ``whisper`` extra (``uv sync --extra whisper``) and espeak-ng and sox. The figures are
of the machine it runs on, at that time: on a shared machine, run it twice.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median

RATE = 16_000
PAD_S = 0.3
# Known text, two voices. No numbers: Whisper writes "9" for "nine", and that is not an error.
UTTERANCES = [
    ("en-us", "Hello, how are you?"),
    ("en-us", "Please call me tomorrow."),
    ("en-us", "Streaming audio is fun."),
    ("en-us", "The meeting starts early in the morning."),
    ("en-us", "Can you send me the report before lunch?"),
    ("en-us", "The weather is nice today, so we will walk to the park."),
    ("en-us", "I would like a cup of coffee with milk."),
    ("en-us", "Turn left at the next traffic light."),
    ("en-gb+f3", "See you later today."),
    ("en-gb+f3", "Thank you for calling, how can I help?"),
    ("en-gb+f3", "The train to London leaves from the main station."),
    ("en-gb+f3", "We need to buy bread, eggs and cheese."),
]


# -- accuracy -----------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    errors = sum(edit_distance(words(r), words(h)) for r, h in zip(refs, hyps, strict=True))
    return errors / sum(len(words(r)) for r in refs)


def say(voice: str, text: str, work: Path) -> np.ndarray:
    raw, out = work / "raw.wav", work / "out.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "175", "-w", str(raw), text], check=True)
    trim = ["silence", "1", "0.02", "0.5%", "reverse"]  # espeak-ng's silence off both ends
    sox = ["sox", "-R", "-D", "-V1", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)]
    subprocess.run([*sox, *trim, *trim], check=True)
    with wave.open(str(out)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    pad = np.zeros(int(PAD_S * RATE), dtype=np.float32)
    return np.concatenate([pad, pcm.astype(np.float32) / 32768.0, pad])


def accuracy_and_cost(runs: int, options: dict[str, Any]) -> dict[str, Any]:
    from service.model.whisper import create

    with tempfile.TemporaryDirectory() as tmp:
        audios = [say(voice, text, Path(tmp)) for voice, text in UTTERANCES]
    refs = [text for _, text in UTTERANCES]
    audio_s = sum(len(a) for a in audios) / RATE
    t0 = time.process_time()
    model = create(**options)
    load_cpu = time.process_time() - t0
    model.infer(audios[0])  # warm-up: the first call allocates

    one: list[tuple[float, float]] = []
    batch: list[tuple[float, float]] = []
    texts: list[str] = []
    batch_texts: list[str] = []
    for _ in range(runs):
        c0, w0 = time.process_time(), time.monotonic()
        texts = [str(model.infer(a)["text"]) for a in audios]
        one.append((time.process_time() - c0, time.monotonic() - w0))
        c0, w0 = time.process_time(), time.monotonic()
        batch_texts = [str(o["text"]) for o in model.infer_batch(audios)]
        batch.append((time.process_time() - c0, time.monotonic() - w0))
    n = len(audios)
    cpu_one, wall_one = median([c for c, _ in one]), median([w for _, w in one])
    cpu_batch, wall_batch = median([c for c, _ in batch]), median([w for _, w in batch])
    return {
        "utterances": n,
        "audio_s": round(audio_s, 2),
        "mean_utterance_s": round(audio_s / n, 2),
        "wer": round(wer(refs, texts), 3),
        "wer_batch": round(wer(refs, batch_texts), 3),
        "load_cpu_s": round(load_cpu, 2),
        "cpu_s_per_utterance": round(cpu_one / n, 3),
        "wall_s_per_utterance": round(wall_one / n, 3),
        "cpu_s_per_audio_s": round(cpu_one / audio_s, 3),
        "batch_cpu_s_per_utterance": round(cpu_batch / n, 3),
        "batch_wall_s_per_utterance": round(wall_batch / n, 3),
        "batch_size": model.max_batch_size,
        "runs": runs,
        "transcripts": [{"said": r, "heard": h} for r, h in zip(refs, texts, strict=True)],
    }


# -- live streams -------------------------------------------------------------------------------


def stream_step(n: int, duration: float, options: dict[str, Any], threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "loadgen.py"),
        "--spawn",
        "--streams",
        str(n),
        "--duration",
        str(duration),
        "--ramp",
        "2.5",  # one utterance's length: streams do not all finish their utterances together
        "--env",
        "STREAMER_MODEL=service.model.whisper:create",
        "--env",
        f"STREAMER_MODEL_OPTIONS={json.dumps(options)}",
        "--env",
        f"STREAMER_MODEL_THREADS={threads}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 4 + 120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen printed no result:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def held(r: dict[str, Any], budget_ms: float) -> bool:
    p99 = r.get("final_lag_p99_ms")
    return (
        r["failed"] == 0
        and r["refused"] == 0
        and r["behind"] == 0
        and p99 is not None
        and p99 < budget_ms
    )


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="passes over the utterances (median)")
    p.add_argument("--options", default="{}", help="STREAMER_MODEL_OPTIONS for Whisper (JSON)")
    p.add_argument("--streams", default="1,2,4,6,8", help="live stream counts to try")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of audio per stream")
    p.add_argument("--threads", type=int, default=2, help="STREAMER_MODEL_THREADS")
    p.add_argument("--final-budget-ms", type=float, default=2000.0)
    p.add_argument("--no-streams", action="store_true", help="accuracy and cost only")
    args = p.parse_args(argv)
    options = json.loads(args.options)
    print(f"machine: {machine()} (shared: other work runs beside it)")

    r = accuracy_and_cost(args.runs, options)
    print(f"\nWhisper {json.dumps(options) if options else '(defaults)'}, in process")
    print(f"  {r['utterances']} espeak-ng utterances, {r['audio_s']} s of audio")
    print(f"  WER                   {r['wer']:.1%}  (infer_batch: {r['wer_batch']:.1%})")
    print(
        f"  CPU per utterance     {r['cpu_s_per_utterance']} s   "
        f"(wall {r['wall_s_per_utterance']} s; mean utterance {r['mean_utterance_s']} s)"
    )
    print(f"  CPU per audio second  {r['cpu_s_per_audio_s']} s")
    print(
        f"  infer_batch ({r['batch_size']} a call): {r['batch_cpu_s_per_utterance']} CPU-s, "
        f"{r['batch_wall_s_per_utterance']} wall-s per utterance"
    )
    for t in r["transcripts"]:
        print(f"    {t['said']!r:58} -> {t['heard']!r}")
    print(json.dumps({k: v for k, v in r.items() if k != "transcripts"}), flush=True)
    if args.no_streams:
        return

    print(
        f"\nlive streams (real-time raw PCM, {args.duration:g} s each, finals only, "
        f"STREAMER_MODEL_THREADS={args.threads}); held: all ok, none behind, final p99 < "
        f"{args.final_budget_ms:g} ms"
    )
    print("  streams  held  final p50/p99 ms  server CPU %  behind  failed")
    steps = []
    for n in (int(x) for x in args.streams.split(",")):
        step = stream_step(n, args.duration, options, args.threads)
        step["whisper_held"] = held(step, args.final_budget_ms)
        steps.append(step)
        print(
            f"  {n:7d}  {'yes' if step['whisper_held'] else 'no':4}  "
            f"{step['final_lag_p50_ms']}/{step['final_lag_p99_ms']:>8}  "
            f"{step['server_cpu_pct']!s:>11}  {step['behind']:6d}  {step['failed']:6d}",
            flush=True,
        )
    best = max((s["streams"] for s in steps if s["whisper_held"]), default=0)
    print(f"  largest N held: {best}")
    print(json.dumps({"max_streams_held": best, "steps": steps}), flush=True)


if __name__ == "__main__":
    main()
