"""``python -m service``: serve the app with hypercorn.

HTTP/1.1 and h2c (prior knowledge) share the port; with ``--certfile``/``--keyfile`` (or
``STREAMER_CERTFILE``/``STREAMER_KEYFILE``) it serves TLS with HTTP/2 negotiated by ALPN.
On SIGTERM/SIGINT live sessions end with ``end {reason: "shutdown"}`` before hypercorn's own
graceful shutdown, so SSE subscribers see it.

``--workers N`` (N > 1) needs ``REDIS_URL``: this process then supervises N worker processes
that share one listening socket and serve every session from Redis (docs/scaling.md). Without
Redis it refuses (exit code 2): in-memory sessions cannot be shared between processes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from service.app import create_app, shutdown_sessions
from service.observability.logs import configure_logging
from service.observability.loop import TimedEventLoop
from service.settings import Settings
from service.workers import supervise


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="bind address (default 127.0.0.1, env STREAMER_HOST)")
    p.add_argument("--port", type=int, help="port (default 8000, env PORT or STREAMER_PORT)")
    p.add_argument("--workers", type=int, help="worker processes (default 1)")
    p.add_argument("--certfile", help="TLS certificate (PEM): serves HTTPS with HTTP/2")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (env STREAMER_LOG_LEVEL)")
    return p.parse_args(argv)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    # Hypercorn's own records go through our handler (JSON lines), not a handler of its own.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level
    # Audio bodies are streamed and limited by the session; headers stay small.
    config.h11_max_incomplete_size = 64 * 1024
    config.websocket_max_message_size = 16 * 1024 * 1024
    return config


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "workers": args.workers,
            "certfile": args.certfile,
            "keyfile": args.keyfile,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    settings = Settings.from_env(**overrides)
    _configure_process(settings)
    if settings.workers < 1:
        print("python -m service: --workers must be at least 1", file=sys.stderr)
        sys.exit(2)
    if settings.workers > 1:
        if not settings.redis_url:
            print(
                f"python -m service: --workers {settings.workers} needs REDIS_URL (or "
                "STREAMER_REDIS_URL): without it sessions and their event logs live in one "
                "process's memory and cannot be shared between workers. Run one worker, or see "
                "docs/scaling.md.",
                file=sys.stderr,
            )
            sys.exit(2)
        sys.exit(supervise(settings, hypercorn_config(settings)))
    app = create_app(settings)
    _run(_serve(app, settings))


def _configure_process(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    # The event loop shares the GIL with the VAD and model threads. A thread that wants the GIL
    # back (the loop, after a socket call; the VAD thread, between onnxruntime steps) waits up
    # to the switch interval while another runs Python; at the default 5 ms that wait, several
    # times per VAD batch, becomes most of the event lag under load (BENCHMARKS.md).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    # The cyclic GC stops the event loop while it runs. At the default thresholds (700, 10, 10)
    # 400 live streams (~360k tracked objects) paid 2-3 s of collections per 15 s with full
    # collections up to ~350 ms, every one of them event lag; at 50,000 / 20 / 100 it was 0.3 s
    # with one full collection of ~50 ms. Objects alive now (modules, the app) never become
    # garbage, so they are moved out of the collector's way.
    if settings.gc_gen0_threshold > 0:
        gc.set_threshold(settings.gc_gen0_threshold, 20, 100)
    gc.freeze()


def run_worker(settings: Settings, bind: list[str]) -> None:
    """One worker of ``--workers N``, in its own process, serving on inherited sockets."""
    _configure_process(settings)
    app = create_app(settings)
    _run(_serve(app, settings, bind=bind))


def _run(main: Coroutine[Any, Any, None]) -> None:
    # asyncio's own loop, timing its waits for I/O: how busy it is decides whether new sessions
    # are admitted (service/observability/loop.py).
    with asyncio.Runner(loop_factory=TimedEventLoop) as runner:
        runner.run(main)


async def _serve(app: object, settings: Settings, bind: list[str] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        logging.getLogger("service").info("shutting down: ending live sessions")
        await shutdown_sessions(app)  # type: ignore[arg-type]

    config = hypercorn_config(settings)
    if bind is not None:
        config.bind = bind
    await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
