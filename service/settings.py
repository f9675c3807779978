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

    # The model: any "module:factory"; options are the factory's keyword arguments.
    model: str = "service.model.dummy:create"
    model_options: Mapping[str, Any] = field(
        default_factory=lambda: {"delay": 0.5, "constant_factor": 0.3, "jitter": 0.2}
    )
    model_threads: int = field(default_factory=_default_model_threads)
    model_in_flight_per_session: int = 4

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
    # New sessions get 503 server_overloaded while the event loop was busier than this over the
    # last 2 s (0 < x < 1; 0 or 1: never), so that the streams already running keep up rather
    # than all falling behind together. 0.95 only sheds a saturated loop; 0.85 keeps the
    # admitted streams' p99 lag under 250 ms here, but refuses part of a burst of new sessions
    # that the server could then hold (BENCHMARKS.md, service/observability/loop.py).
    admit_max_loop_busy: float = 0.95
    # The same for webm/Ogg Opus, whose limit is the decoder, not the loop: new sessions get
    # server_overloaded while its batches took longer than this on average over the last 2 s
    # (0: never). Off by default: 30-40 ms separated 350 held streams from 400 not held here,
    # with overlap while sessions open (BENCHMARKS.md).
    admit_max_decode_ms: float = 0.0
    max_session_seconds: float = 4 * 3600.0
    idle_timeout_seconds: float = 30.0
    unstarted_timeout_seconds: float = 300.0
    max_upload_bytes: int = 2 * 1024**3
    max_config_bytes: int = 64 * 1024
    retention_seconds: float = 300.0
    # How long a resumable session whose upload was cut waits for an upload that continues it
    # before it ends (client_disconnected) with everything received processed.
    resume_grace_seconds: float = 60.0
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
