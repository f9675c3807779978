"""One settings object, built once from the environment and passed to ``create_app``.

Every variable is ``STREAMER_<FIELD>`` (upper case); ``PORT`` is honoured too, as platforms that
read a Procfile set it. Units are in the names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def _default_model_threads() -> int:
    return max(2, (os.cpu_count() or 2) * 2)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    certfile: str | None = None
    keyfile: str | None = None

    # The model: any "module:factory"; options are the factory's keyword arguments. Empty by
    # default: each factory has its own defaults (the dummy's: delay 0.5, constant_factor 0.3,
    # jitter 0.2), so that STREAMER_MODEL alone switches models without another model's options.
    model: str = "service.model.dummy:create"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    model_threads: int = field(default_factory=_default_model_threads)
    # The model engine (service/model/engine.py): calls from every session are queued in one
    # place and, for a model with infer_batch, run up to this many per call (also capped by
    # the model's own max_batch_size) ...
    model_batch_max: int = 64
    # ... waiting at most this long for a batch to fill while a thread is free.
    model_batch_wait_ms: float = 2.0
    # The queue is bounded by audio, across the process: a final that does not fit displaces
    # the queued finals of younger sessions, or gets a model_overloaded error event. 600 s of
    # float32 at 16 kHz is ~38 MB.
    model_queue_max_seconds: float = 600.0
    # A session whose oldest queued utterance has waited longer than this is told so with a
    # `lagging` event.
    model_late_ms: float = 1000.0

    # VAD batching across sessions.
    vad_threads: int = 1
    vad_max_batch: int = 256
    vad_max_wait_ms: float = 0.0
    # "dense": silero_vad.onnx's weights as batch-wide GEMMs (service/vad/dense.py); "reference":
    # the file as shipped. Same probabilities to ~1e-5; dense is ~3.5x cheaper per stream.
    vad_graph: str = "dense"
    # Opus in WebM/Ogg, parsed by us and decoded with libopus (service/audio/packets.py):
    # "process" in one process of its own for every session (its own GIL; it is restarted if
    # it dies), "libopus" in one thread of the server shared by every session; "ffmpeg": PyAV,
    # a thread per session (the baseline, and the path for every other codec).
    opus_decoder: str = "process"

    # Limits.
    max_sessions: int = 1000
    # While the loop was busier than this over its last 0.3 s, a new session waits its turn (up
    # to admit_wait_seconds, then 503 server_overloaded) and each 0.1 s lets in what the loop's
    # headroom pays for, so a burst of sessions is spread out instead of swamping the streams
    # already running (service/session/admission.py). 0.8 left 12 of 400 waiting in vain in 1
    # of 3 runs; 0.85 held 400 in 3 of 3 (BENCHMARKS.md). 0 or 1: off.
    admit_pace_loop_busy: float = 0.85
    admit_wait_seconds: float = 10.0
    # With pacing off (and for an upload reaching another worker), new sessions get 503
    # server_overloaded at once while the event loop was busier than this over the last 2 s
    # (0 < x < 1; 0 or 1: never), so that the streams already running keep up rather than all
    # falling behind together (benchmarks/HISTORY.md, service/observability/loop.py).
    admit_max_loop_busy: float = 0.95
    # The same for webm/Ogg Opus, whose limit is the decoder, not the loop: new sessions get
    # server_overloaded while its batches took longer than this on average over the last 2 s
    # (0: never). Off by default: 30-40 ms separated 350 held streams from 400 not held here,
    # with overlap while sessions open (BENCHMARKS.md).
    admit_max_decode_ms: float = 0.0
    # ... and while utterances waited longer than this for the model (the oldest queued one, or
    # the mean over the last 2 s; 0: never), so the sessions admitted keep their latency.
    admit_max_model_wait_ms: float = 1000.0
    # ... and, before any utterance has waited, while the sessions would load the model past
    # this fraction of its capacity: utterances a second per session (measured; 0.4 until
    # then) x sessions, over threads x full batch / a full batch's time (probed at start,
    # then measured). So a steep ramp is refused before the backlog shows. 0: never. 0.75
    # leaves room for sessions whose utterances end together (BENCHMARKS.md: at 0.9 those
    # admitted past a one-item-per-call model waited up to 11 s).
    admit_max_model_load: float = 0.75
    # Time one full batch at start (also a warm-up), for the load estimate above.
    model_probe: bool = True
    max_session_seconds: float = 4 * 3600.0
    idle_timeout_seconds: float = 30.0
    unstarted_timeout_seconds: float = 300.0
    max_upload_bytes: int = 2 * 1024**3
    max_config_bytes: int = 64 * 1024
    retention_seconds: float = 300.0
    # How long a resumable session whose upload was cut waits for an upload that continues it
    # before it ends (client_disconnected) with everything received processed.
    resume_grace_seconds: float = 60.0
    # With Redis: how often a worker writes the audio its resumable sessions received to Redis
    # (all of them in one round trip), so that another worker can adopt them should it die.
    # A client whose worker died resends at most this much.
    resume_journal_seconds: float = 0.25
    sse_ping_seconds: float = 15.0
    sse_send_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 10.0

    # Security.
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    # The interpreter's GIL switch interval (sys.setswitchinterval) set by `python -m service`.
    gil_switch_interval_ms: float = 1.0
    # Young-generation threshold of the cyclic GC set by `python -m service` (0: Python's 700).
    gc_gen0_threshold: int = 50_000

    log_level: str = "INFO"
    log_format: str = "json"  # or "text"; one JSON object per line carries session and trace ids

    # Several workers and hosts (docs/scaling.md). Unset: sessions and logs stay in this process.
    redis_url: str | None = None  # also REDIS_URL
    redis_prefix: str = "streamer"  # key prefix, so deployments can share one Redis
    redis_lease_seconds: float = 5.0  # an owner silent this long is declared lost
    redis_poll_seconds: float = 1.0  # longest blocking read before a reader re-checks the owner
    redis_timeout_seconds: float = 2.0  # connect/command timeout; a few retries fit inside
    redis_stream_maxlen: int = 100_000  # events kept per session (approximate trim)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"STREAMER_{f.name.upper()}")
            if f.name == "port" and raw is None:
                raw = env.get("PORT")
            if f.name == "redis_url" and raw is None:
                raw = env.get("REDIS_URL")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update(overrides)
        return cls(**values)


def _parse(name: str, type_: Any, raw: str) -> Any:
    t = str(type_)
    try:
        if t.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if t.startswith("Mapping"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        if t.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"STREAMER_{name.upper()}={raw!r}: {exc}") from None
    return raw
