"""``streamer-client --resume`` survives the death of the worker running its session.

Behind ``python -m service --workers 2`` (one port, Redis), the worker that owns the session is
killed (SIGKILL) while the CLI streams at real time, over chunked HTTP/1.1 or the WebSocket.
The other worker goes on accepting on the shared listening socket, adopts the session once the
dead owner's lease lapses (5 s, the default), and the supervisor replaces the dead worker.
Guaranteed: the CLI exits 0 and prints exactly the events of an uncut run (nothing lost,
nothing twice).

And, without a server: while a dead owner's lease runs out the resume is turned away (421)
for seconds; the CLI keeps trying for that long, rather than a fixed number of times."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from service.client import http as client_http
from service.client.options import Options, Outcome
from service.client.render import Renderer
from service.workers import STARTUP_FAILURE_S
from tests.client.test_cli import client
from tests.conftest import DATA, ROOT, start_server, stop_server, worker_processes
from tests.store.conftest import RedisServer, redis_binary

# When the owner dies, this far into the stream (its first results are out by then).
KILL_AFTER_S = 3.0
TIMEOUT_S = 90.0


# -- the real CLI, two workers, one killed -----------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(binary)
    server.start()
    yield server.url
    server.stop()


def _twice(tmp: Path) -> Path:
    """speech.wav twice over (15 s): audio still to come, live, after the resume."""
    with wave.open(str(DATA / "speech.wav")) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    path = tmp / "speech_x2.wav"
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes(frames * 2)
    return path


@pytest.mark.redis
@pytest.mark.parametrize(
    ("transport", "stop"),
    [("http1", signal.SIGKILL), ("ws", signal.SIGKILL), ("http1", signal.SIGTERM)],
    ids=["http1-killed", "ws-killed", "http1-restarted"],
)
def test_cli_resumes_after_the_worker_running_its_session_is_killed(
    redis_url: str, tmp_path: Path, transport: str, stop: signal.Signals
) -> None:
    """SIGKILL: the worker dies; its session is adopted once its lease lapses. SIGTERM (a
    rolling restart): the worker hands the session over at once, answering the upload
    ``503 shutting_down``, which the CLI takes for a cut."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": redis_url, "STREAMER_REDIS_PREFIX": prefix}
    server = start_server(tmp_path, env=env, args=["--workers", "2"])
    try:
        wav = str(_twice(tmp_path))
        extra = ["--ws"] if transport == "ws" else []
        uncut = client("--url", server.url, "--json", "--resume", *extra, wav)
        assert uncut.returncode == 0, uncut.stderr
        before = worker_processes(server)
        assert len(before) == 2
        # The supervisor takes a worker that dies within STARTUP_FAILURE_S of starting for a
        # configuration error and stops everything: the owner dies later than that.
        kill_at = max(c.create_time() for c in before) + STARTUP_FAILURE_S + 1.0
        time.sleep(max(0.0, kill_at - KILL_AFTER_S - time.time()))

        args = ["--url", server.url, "--json", "--resume", "--real-time", *extra, wav]
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.client", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "STREAMER_URL"},
        )
        err_lines: list[str] = []
        named = threading.Event()

        def read_stderr() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                err_lines.append(raw.decode())
                if " via " in err_lines[-1]:
                    named.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            assert named.wait(30), "".join(err_lines)
            started = time.time()
            found = re.search(r"session (\S+) via", "".join(err_lines))
            assert found
            time.sleep(max(0.0, max(kill_at, started + KILL_AFTER_S) - time.time()))
            store = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5)
            owner = store.hget(f"{prefix}:{{{found.group(1)}}}:session", "owner")
            store.close()
            assert isinstance(owner, str)
            pid = int(owner.split(":")[1])  # the worker id is host:pid:random
            assert pid in {c.pid for c in before}
            os.kill(pid, stop)
            assert proc.stdout is not None
            out = proc.stdout.read().decode()
            assert proc.wait(TIMEOUT_S) == 0, "".join(err_lines)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        reader.join(5)
        err = "".join(err_lines)
        assert "resuming" in err
        assert sorted(out.splitlines()) == sorted(uncut.stdout.splitlines())
        assert json.loads(out.splitlines()[-1])["reason"] == "completed"
        assert "adopted a session whose worker died" in server.log()
        if stop is signal.SIGTERM:
            # Handed over, not lost: no lease to wait for. (The upload's 503 shutting_down
            # mostly reaches the client as a reset: it was answered before its body ended.)
            assert "session handed over to another worker" in server.log()
        # The supervisor noticed the death and started another worker in its place.
        deadline = time.monotonic() + 30
        while len(worker_processes(server)) < 2:
            assert time.monotonic() < deadline, f"no worker replaced the dead one:\n{server.log()}"
            time.sleep(0.1)
        assert pid not in {c.pid for c in worker_processes(server)}
        assert "starting another" in server.log()
    finally:
        stop_server(server)


# -- the resume loop against a fake server ----------------------------------------------------

LEASE_LEFT_S = 4.0  # the dead owner's lease still runs this long after the cut
BASE = "http://streamer.test"
END = b'id: 1\ndata: {"type": "end", "reason": "completed"}\n\n'


@pytest.mark.anyio
async def test_resume_keeps_trying_while_a_dead_owners_lease_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upload's worker dies; every resume is answered 421 until its lease lapses (seconds),
    then one is accepted. The client must still be trying then (it gave up after 50 quick
    tries, 2.5 s), tell the user once rather than per attempt, and not hammer the server."""
    accepted = anyio.Event()
    posts: list[float] = []
    cut_at: list[float] = []

    async def events() -> AsyncIterator[bytes]:
        await accepted.wait()
        yield END

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/sessions":
            audio, events_url = f"{BASE}/v1/sessions/s/audio", f"{BASE}/v1/sessions/s/events"
            return httpx.Response(
                201, json={"id": "s", "audio_url": audio, "events_url": events_url}
            )
        if path.endswith("/events"):
            return httpx.Response(
                200, content=events(), headers={"content-type": "text/event-stream"}
            )
        if request.method == "HEAD":
            return httpx.Response(200, headers={"upload-offset": "0", "session-state": "running"})
        posts.append(time.monotonic())
        if len(posts) == 1:
            cut_at.append(time.monotonic())
            raise httpx.ReadError("the owner died")
        if time.monotonic() - cut_at[0] < LEASE_LEFT_S:
            error = {"code": "session_elsewhere", "message": "another worker runs it"}
            return httpx.Response(421, json={"error": error})
        await request.aread()
        accepted.set()
        return httpx.Response(200, json={"id": "s"})

    def fake_client(opts: Options) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(handler))

    async def audio() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield bytes(3200)

    monkeypatch.setattr(client_http, "_client", fake_client)
    monkeypatch.setattr(client_http, "END_AFTER_UPLOAD_S", 1.0)
    opts = Options(input="-", url=BASE, transport="http1", config={}, resume=True)
    err = io.StringIO()
    outcome = Outcome()
    with anyio.fail_after(LEASE_LEFT_S + 10):
        await client_http.run_http(opts, audio(), Renderer(io.StringIO(), err, True), outcome)
    assert outcome.failure is None, err.getvalue()
    assert outcome.end is not None and outcome.end["reason"] == "completed"
    assert err.getvalue().count("421") == 1, err.getvalue()
    # At most a few tries a second once the backoff has grown (not 20 a second for seconds).
    late = [t for t in posts if t - cut_at[0] > 2.0]
    assert len(late) <= 2.0 * (posts[-1] - cut_at[0] - 2.0) + 2, len(late)
