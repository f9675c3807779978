"""``python -m service --workers N``: N worker processes on one listening socket.

Every worker is a whole server (its own models, registry and event loop) on the same inherited
socket, so the kernel spreads connections between them, and all of them serve every session from
Redis. This parent only starts, watches and stops them: on SIGTERM or SIGINT each worker ends its
own sessions (``end {reason: "shutdown"}``, written to Redis; resumable ones are handed over
instead, for the next deployment's workers to adopt) and exits, and one that does not
within the grace period is killed, so no worker is ever left running (hypercorn's own
multi-process mode was seen leaving one behind). A worker that dies later is replaced; the
sessions it ran end as ``worker_lost`` for their subscribers, except resumable ones, which
another worker adopts from the audio journaled in Redis (docs/resume.md). The other workers
keep accepting on the shared socket meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from hypercorn.config import Config

from service.settings import Settings

log = logging.getLogger("service")

# A worker that exits sooner than this after starting is taken for a configuration error (bad
# model path, port in use...): restarting it would only loop, so everything stops instead.
STARTUP_FAILURE_S = 15.0
# After SIGTERM, how long past the sessions' grace period a worker may take before SIGKILL.
EXIT_MARGIN_S = 10.0


def supervise(settings: Settings, config: Config) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; returns the exit code."""
    sockets = config.create_sockets()
    listeners = [*sockets.secure_sockets, *sockets.insecure_sockets]
    ctx = multiprocessing.get_context("spawn")
    workers: dict[BaseProcess, float] = {}

    def spawn() -> None:
        process = ctx.Process(target=_worker, args=(settings, listeners), name="streamer-worker")
        process.start()
        workers[process] = time.monotonic()

    # Signals only set a flag and wake the wait below through this pipe: no polling. Both ends
    # non-blocking: the wait also wakes for a worker's exit, with no signal byte to read, and a
    # blocking read there would hang the supervisor (the dead worker never reaped or replaced).
    stop = False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    exit_code = 0
    try:
        for _ in range(settings.workers):
            spawn()
        log.info("supervising %d workers on port %s", settings.workers, settings.port)
        while not stop:
            wait([wake_r, *(p.sentinel for p in workers)])
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)  # drain the signal bytes
            for process in [p for p in workers if not p.is_alive()]:
                process.join()
                lived = time.monotonic() - workers.pop(process)
                if stop:
                    continue
                if lived < STARTUP_FAILURE_S:
                    log.error(
                        "worker %s exited with %s %.1f s after starting; stopping",
                        process.pid,
                        process.exitcode,
                        lived,
                    )
                    stop, exit_code = True, 1
                else:
                    log.warning(
                        "worker %s died (exit code %s); its sessions end as worker_lost (resumable "
                        "ones are adopted); starting another",
                        process.pid,
                        process.exitcode,
                    )
                    spawn()
    finally:
        _stop(list(workers), settings.shutdown_grace_seconds + EXIT_MARGIN_S)
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
        for sock in listeners:
            sock.close()
    return exit_code


def _stop(processes: list[BaseProcess], timeout: float) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: the worker's own graceful shutdown
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker %s did not exit after SIGTERM; killing it", process.pid)
            process.kill()
            process.join(5)


def _worker(settings: Settings, listeners: list[socket.socket]) -> None:
    # Runs in the child. Imported here: in the parent that module is __main__, and spawn can
    # only start a function it can import by name, which is why this one lives in this module.
    from service.__main__ import run_worker

    run_worker(settings, [f"fd://{s.fileno()}" for s in listeners])
