"""``streamer-client --resume`` (issue 21): its upload and its event stream (or its WebSocket)
are cut (TCP resets, through a proxy) while it streams at real time; it resumes, and prints
exactly the events of an uncut run: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.client.test_cli import client, json_events
from tests.conftest import DATA, ROOT, Server
from tests.web.dropping_proxy import DroppingProxy


def _shape(events: list[dict[str, Any]]) -> list[str]:
    keep = ("type", "time", "start_time", "end_time", "is_final", "count", "reason", "bytes")
    return sorted(json.dumps({k: e.get(k) for k in keep}) for e in events)


@pytest.mark.parametrize("transport", ["http1", "http2"])
def test_resume_through_cuts_prints_what_an_uncut_run_prints(
    server: Server, transport: str
) -> None:
    wav = str(DATA / "speech.wav")
    extra = ["--http2"] if transport == "http2" else []
    uncut = client("--url", server.url, "--json", "--resume", *extra, wav)
    assert uncut.returncode == 0, uncut.stderr
    expected = json_events(uncut.stdout)

    proxy = DroppingProxy(server.port).start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("STREAMER_URL",)}
        args = ["--url", proxy.url, "--json", "--resume", "--real-time", *extra, wav]
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.client", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        started = time.monotonic()
        cuts = 0
        # h2c: every connection opens with the h2 preface, so the upload's and the events'
        # connections are cut together there.
        upload = b"PRI * HTTP/2.0" if transport == "http2" else b"Upload-Offset"
        for at, marker in ((1.5, upload), (2.5, b"/events"), (3.5, upload), (5.0, upload)):
            time.sleep(max(0.0, started + at - time.monotonic()))
            cuts += proxy.drop(marker, reset=True)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.close()
    assert cuts >= 2, err
    assert proc.returncode == 0, err.decode()
    assert "resuming" in err.decode()
    got = json_events(out.decode())
    assert _shape(got) == _shape(expected)
    assert got[-1]["type"] == "end" and got[-1]["reason"] == "completed"
    assert got[-1]["bytes"] == (DATA / "speech.wav").stat().st_size


def test_ws_resume_through_cuts_prints_what_an_uncut_run_prints(server: Server) -> None:
    wav = str(DATA / "speech.wav")
    uncut = client("--url", server.url, "--json", "--resume", "--ws", wav)
    assert uncut.returncode == 0, uncut.stderr
    expected = json_events(uncut.stdout)
    proxy = DroppingProxy(server.port).start()
    try:
        args = ["--url", proxy.url, "--json", "--resume", "--ws", "--real-time", wav]
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.client", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "STREAMER_URL"},
        )
        started = time.monotonic()
        cuts = 0
        for at in (1.5, 3.0, 4.5):
            time.sleep(max(0.0, started + at - time.monotonic()))
            cuts += proxy.drop(b"GET /v1/ws", reset=True)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.close()
    assert cuts == 3, err
    assert proc.returncode == 0, err.decode()
    assert err.decode().count("resuming") == 3
    got = json_events(out.decode())
    assert _shape(got) == _shape(expected)
    assert got[-1]["type"] == "end" and got[-1]["reason"] == "completed"
