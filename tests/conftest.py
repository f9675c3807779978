"""Shared fixtures: the real server (``python -m service`` under hypercorn on 127.0.0.1), test
audio, and an anyio backend. Every wait is bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent

# A quick dummy model so the suite is fast; its behaviour (threads, delay) is still real.
FAST_MODEL = '{"delay": 0.05, "constant_factor": 0.01, "jitter": 0.0}'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    tmp: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    timeout: float = 30.0,
) -> Server:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {
        **os.environ,
        "STREAMER_MODEL_OPTIONS": FAST_MODEL,
        "STREAMER_LOG_LEVEL": "INFO",
        **(env or {}),
    }
    full_env.pop("PORT", None)
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port), *(args or [])],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    scheme = "https" if args and "--certfile" in args else "http"
    server = Server(f"{scheme}://127.0.0.1:{port}", port, process, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            r = httpx.get(f"{server.url}/readyz", timeout=1.0, verify=False)
            if r.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"server not ready in {timeout} s:\n{server.log()}")
        time.sleep(0.1)


def stop_server(server: Server, timeout: float = 20.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)
    return server.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared server for the tests that only need a running service."""
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    stop_server(s)


@pytest.fixture
def speech_wav() -> Path:
    return DATA / "speech.wav"


def worker_processes(server: Server) -> list[psutil.Process]:
    """The live worker processes of a ``--workers N`` server (not a dead one it has not reaped)."""
    found = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue  # gone meanwhile
    return found
