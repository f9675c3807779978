"""Real redis-server processes for the store tests: each on a free loopback port, with no
persistence, stopped after its test (or module). Skipped, saying why, only when the
redis-server binary is missing (scripts/test installs Debian's)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from service.settings import Settings
from service.store.redis_store import RedisStore
from tests.conftest import free_port


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


@dataclass
class RedisServer:
    binary: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)


def _server() -> RedisServer:
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    return RedisServer(binary)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for every test that does not stop it; tests keep apart by key prefix."""
    server = _server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private server, for tests that stop or restart it."""
    server = _server()
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def make_store(redis_server: RedisServer, prefix: str) -> AsyncIterator[StoreFactory]:
    """Stores of one deployment (one prefix), as several workers have, with a short lease;
    closed after the test."""
    stores: list[RedisStore] = []

    def make(server: RedisServer | None = None, **overrides: Any) -> RedisStore:
        values: dict[str, Any] = {
            "redis_url": (server or redis_server).url,
            "redis_prefix": prefix,
            "redis_lease_seconds": 0.6,
            "redis_poll_seconds": 0.1,
            "redis_timeout_seconds": 1.0,
            "retention_seconds": 30.0,
            **overrides,
        }
        store = RedisStore(Settings(**values))
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()
