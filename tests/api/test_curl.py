"""The README's curl walkthrough, verbatim in spirit: chunked POST from stdin, PUT with -T,
HTTP/2 prior knowledge, and `curl -N` on the events."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DATA, Server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def curl(*args: str, stdin: Path | None = None, timeout: float = 60) -> str:
    source = stdin.read_bytes() if stdin else b""
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args],
        input=source,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
    return out.stdout.decode()


def create(server: Server) -> dict[str, str]:
    body = curl("-X", "POST", f"{server.url}/v1/sessions")
    created: dict[str, str] = json.loads(body)
    return created


def events_of(url: str, *extra: str) -> list[tuple[str, dict[str, object]]]:
    text = curl("-N", *extra, url)
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.mark.parametrize(
    "how",
    [
        ("-T", "speech.wav"),  # PUT with a length
        ("-X", "POST", "-T", "-", "<", "speech.mp3"),  # chunked POST from stdin
        ("--http2-prior-knowledge", "-X", "POST", "-T", "-", "<", "speech.webm"),
        ("--http2-prior-knowledge", "-T", "speech.ogg"),
    ],
    ids=["put-wav", "chunked-mp3", "h2c-webm", "h2c-put-ogg"],
)
def test_curl_upload(server: Server, how: tuple[str, ...]) -> None:
    created = create(server)
    args = list(how)
    stdin = None
    if "<" in args:
        i = args.index("<")
        stdin = DATA / args[i + 1]
        del args[i : i + 2]
    else:
        args[-1] = str(DATA / args[-1])
    summary = json.loads(curl(*args, created["audio_url"], stdin=stdin))
    assert summary["segments"] == 3, summary
    h2 = ("--http2-prior-knowledge",) if "--http2-prior-knowledge" in how else ()
    events = events_of(created["events_url"], *h2)
    finals = [d for t, d in events if t == "segment" and d["is_final"]]
    assert len(finals) == 3
    assert events[-1][0] == "end"


def test_curl_error_is_json(server: Server) -> None:
    created = create(server)
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            "--data-binary",
            "this is not audio at all, sorry",
            "-w",
            "\n%{http_code}",
            created["audio_url"],
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    body, _, status = out.stdout.decode().rpartition("\n")
    assert status == "415", out
    assert json.loads(body)["error"]["code"] == "unsupported_format"
