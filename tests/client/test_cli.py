"""``streamer-client`` end to end: the real CLI as a subprocess against the real server, over
chunked HTTP/1.1, h2c and the WebSocket; plus a smoke run of the load generator."""

from __future__ import annotations

import json
import os
import random
import re
import select
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import DATA, ROOT, Server, free_port, start_server, stop_server

TIMEOUT_S = 90.0


def client(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("STREAMER_URL", "STREAMER_API_KEY")}
    out = subprocess.run(
        [sys.executable, "-m", "service.client", *args],
        input=b"" if stdin is None else stdin,
        capture_output=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env={**base, **(env or {})},
        check=False,
    )
    return subprocess.CompletedProcess(
        out.args, out.returncode, out.stdout.decode(), out.stderr.decode()
    )


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "segment" and e["is_final"]]


def assert_three_utterances(run: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert run.returncode == 0, run.stderr
    events = json_events(run.stdout)
    assert len(finals(events)) == 3, run.stdout
    assert events[-1]["type"] == "end" and events[-1]["reason"] == "completed"
    assert sum(e["type"] == "end" for e in events) == 1
    return events


def ws_endpoint_exists(server: Server) -> bool:
    try:
        with connect(server.url.replace("http", "ws", 1) + "/v1/ws", open_timeout=5):
            return True
    except InvalidStatus as exc:
        if exc.response.status_code == 404:
            return False
        raise


def test_chunked_http_json(server: Server) -> None:
    run = client("--url", server.url, "--json", str(DATA / "speech.wav"))
    assert_three_utterances(run)
    assert "HTTP/1.1 chunked" in run.stderr


def test_h2c(server: Server) -> None:
    run = client("--url", server.url, "--http2", "--json", str(DATA / "speech.wav"))
    assert_three_utterances(run)
    assert "HTTP/2" in run.stderr


def test_h2c_upload_does_not_stall_on_a_quiet_session(server: Server) -> None:
    """Regression: with the upload and the events on one HTTP/2 connection, httpcore's sender
    missed a WINDOW_UPDATE read by the events stream, and a session with no events before its
    end (noise) stalled until the SSE ping, 15 s later."""
    started = time.monotonic()
    run = client("--url", server.url, "--http2", "--json", str(DATA / "noise.wav"))
    assert run.returncode == 0, run.stderr
    assert json_events(run.stdout)[-1]["reason"] == "completed"
    assert time.monotonic() - started < 10


def test_websocket(server: Server) -> None:
    if not ws_endpoint_exists(server):
        pytest.skip("the server has no WebSocket endpoint yet: /v1/ws answered 404")
    run = client("--url", server.url, "--ws", "--json", str(DATA / "speech.wav"))
    assert_three_utterances(run)
    assert "via WebSocket" in run.stderr


def test_websocket_container(server: Server) -> None:
    if not ws_endpoint_exists(server):
        pytest.skip("the server has no WebSocket endpoint yet: /v1/ws answered 404")
    run = client("--url", server.url, "--ws", "--json", str(DATA / "speech.webm"))
    assert_three_utterances(run)


def test_readable_output(server: Server) -> None:
    run = client("--url", server.url, str(DATA / "speech.wav"))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    segment = re.compile(r"^ *\d+\.\d\ds- *\d+\.\d\ds  ch0  final  count=\d+$")
    assert sum(bool(segment.match(line)) for line in lines) == 3, run.stdout
    assert sum(bool(re.match(r"^active \d+\.\d\ds ch0$", line)) for line in lines) == 3
    assert sum(bool(re.match(r"^inactive \d+\.\d\ds ch0$", line)) for line in lines) == 3
    assert lines[-1].startswith("end completed"), run.stdout


def test_stdin(server: Server) -> None:
    run = client("--url", server.url, "--json", "-", stdin=(DATA / "speech.wav").read_bytes())
    assert_three_utterances(run)


def test_stdin_raw_stereo(server: Server) -> None:
    raw = (DATA / "speech_s16le_8k_stereo.raw").read_bytes()
    run = client(
        "--url", server.url, "--json", "--raw", "s16le", "--sample-rate", "8000",
        "--channels", "2", "-", stdin=raw,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    events = json_events(run.stdout)
    assert events[-1]["channels"] == 2
    # The file's right channel is silence (scripts/make_test_audio.sh).
    assert [e["channel"] for e in finals(events)] == [0, 0, 0]


@pytest.mark.parametrize("transport", [[], ["--http2"], ["--ws"]], ids=["http1", "h2c", "ws"])
def test_exits_when_the_session_ends_while_stdin_stays_open(
    server: Server, transport: list[str]
) -> None:
    """Regression: a read of stdin in a worker thread could not be cancelled, so a client fed by
    a recorder that never stops hung after the session had ended (here: cancelled by DELETE)."""
    if transport == ["--ws"] and not ws_endpoint_exists(server):
        pytest.skip("the server has no WebSocket endpoint yet: /v1/ws answered 404")
    with subprocess.Popen(
        [sys.executable, "-m", "service.client", "--url", server.url, "--json", *transport, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    ) as process:
        assert process.stdin and process.stdout and process.stderr
        try:
            process.stdin.write((DATA / "speech.wav").read_bytes()[:100_000])
            process.stdin.flush()
            ready, _, _ = select.select([process.stderr], [], [], TIMEOUT_S)
            assert ready, "no session line on stderr"
            session_id = process.stderr.readline().decode().split()[1]
            assert httpx.delete(f"{server.url}/v1/sessions/{session_id}").status_code == 202
            assert process.wait(15) == 1
            last = json_events(process.stdout.read().decode())[-1]
            assert last["type"] == "end" and last["reason"] == "cancelled"
        finally:
            process.kill()


def test_real_time_takes_about_real_time(server: Server, tmp_path: Path) -> None:
    seconds = 2.0
    with wave.open(str(DATA / "speech.wav")) as w:
        params = w.getparams()
        frames = w.readframes(int(params.framerate * seconds))
    piece = tmp_path / "piece.wav"
    with wave.open(str(piece), "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
    started = time.monotonic()
    run = client("--url", server.url, "--real-time", "--json", str(piece))
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert json_events(run.stdout)[-1]["reason"] == "completed"
    assert elapsed >= 0.8 * seconds
    assert elapsed < seconds + 30


def test_real_time_container_is_paced(server: Server) -> None:
    """webm has no byte rate in a header: pacing uses its duration from PyAV."""
    started = time.monotonic()
    run = client("--url", server.url, "--real-time", "--json", str(DATA / "speech.webm"))
    elapsed = time.monotonic() - started
    assert_three_utterances(run)
    assert "container duration" in run.stderr
    assert elapsed >= 0.8 * 7.5


def test_garbage_input_exits_1(server: Server, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(random.Random(1).randbytes(50_000))
    run = client("--url", server.url, "--json", str(garbage))
    assert run.returncode == 1, run.stdout + run.stderr
    events = json_events(run.stdout)
    assert [e["code"] for e in events if e["type"] == "error"] == ["unsupported_format"]
    assert events[-1]["type"] == "end" and events[-1]["reason"] == "error"


def test_progress_bar_when_asked(server: Server) -> None:
    run = client("--url", server.url, "--progress", str(DATA / "speech.wav"))
    assert run.returncode == 0, run.stderr
    assert "100%" in run.stderr


def test_bad_config_is_a_usage_error(server: Server) -> None:
    run = client("--url", server.url, "--config", '{"mode": "bogus"}', str(DATA / "speech.wav"))
    assert run.returncode == 2
    assert "invalid_config" in run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--sample-rate", "8000", "x.raw"],  # raw PCM options without --raw
        ["--config", "[1]", "x.wav"],
        ["--http2", "--ws", "x.wav"],
        [],
    ],
    ids=["rate-without-raw", "config-not-object", "two-transports", "no-input"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert client(*args).returncode == 2


def test_no_server_exits_2() -> None:
    run = client("--url", f"http://127.0.0.1:{free_port()}", str(DATA / "speech.wav"))
    assert run.returncode == 2
    assert "cannot reach" in run.stderr


def test_missing_file_exits_2(server: Server) -> None:
    run = client("--url", server.url, "/nonexistent/audio.wav")
    assert run.returncode == 2
    assert "cannot read" in run.stderr


def test_api_key(tmp_path: Path) -> None:
    s = start_server(tmp_path, env={"STREAMER_API_KEY": "sekret"})
    try:
        refused = client("--url", s.url, str(DATA / "noise.wav"))
        assert refused.returncode == 2 and "unauthorized" in refused.stderr
        by_flag = client("--url", s.url, "--api-key", "sekret", str(DATA / "noise.wav"))
        assert by_flag.returncode == 0, by_flag.stderr
        by_env = client(
            "--http2",
            str(DATA / "noise.wav"),
            env={"STREAMER_URL": s.url, "STREAMER_API_KEY": "sekret"},
        )
        assert by_env.returncode == 0, by_env.stderr
    finally:
        stop_server(s)


def loadgen(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """benchmarks/loadgen.py with these arguments: the run, and its figures (the JSON line)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    return out, json.loads(lines[-1]) if lines else {}


def test_loadgen_smoke(server: Server) -> None:
    out, figures = loadgen(
        "--url", server.url, "--server-pid", str(server.process.pid),
        "--streams", "3", "--duration", "3", "--ramp", "0.3",
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr  # 1: did not hold (a busy machine)
    assert "lag since the audio was sent p50 / p99 / max" in out.stdout
    assert figures["streams"] == 3 and figures["ok"] == 3, out.stdout
    assert figures["events_measured"] >= 3
    assert figures["server_cpu_s"] is not None and figures["server_rss_peak_mb"] > 0
    assert figures["lag_p99_ms"] is not None
    # The server's own histograms, scraped before and after: its share of the lag, its loop.
    assert figures["server_event_lag_p99_le_ms"] is not None
    assert figures["server_loop_lag_p99_le_ms"] is not None


def test_loadgen_counts_streams_the_server_refuses_apart(tmp_path: Path) -> None:
    """A server shedding load (503) is a figure of the run, not a failed stream, and a step with
    refusals did not hold N."""
    s = start_server(tmp_path, env={"STREAMER_MAX_SESSIONS": "1"})
    try:
        out, figures = loadgen("--url", s.url, "--streams", "3", "--duration", "2", "--ramp", "0")
    finally:
        stop_server(s)
    assert out.returncode == 1, out.stderr
    assert (figures["ok"], figures["failed"], figures["refused"]) == (1, 0, 2), out.stdout
    assert figures["refused_codes"] == ["too_many_sessions"]
    assert figures["held"] is False
    assert re.search(r"streams ok / failed / refused \(503\) +1 / 0 / 2\n", out.stdout)


@pytest.mark.parametrize("transport", [[], ["--ws"]], ids=["http", "ws"])
def test_retry_asks_a_full_server_again_until_it_has_room(
    tmp_path: Path, transport: list[str]
) -> None:
    """A server at its session limit turns the client away for now (HTTP 503 with Retry-After,
    WebSocket 1013). Without --retry that is the end (exit 2); with it the client asks again
    and streams once a session ends."""
    s = start_server(tmp_path, env={"STREAMER_MAX_SESSIONS": "1"})
    try:
        blocker = httpx.post(f"{s.url}/v1/sessions", timeout=10).json()
        wav = str(DATA / "speech.wav")
        refused = client("--url", s.url, *transport, "--json", wav)
        assert refused.returncode == 2, refused.stderr
        assert "too_many_sessions" in refused.stderr and "trying again" not in refused.stderr

        args = ["--url", s.url, *transport, "--json", "--retry", "50", "--retry-delay", "0.2"]
        process = subprocess.Popen(
            [sys.executable, "-m", "service.client", *args, wav],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        try:
            time.sleep(1.0)  # a few refusals
            httpx.delete(f"{s.url}/v1/sessions/{blocker['id']}", timeout=10)
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        finally:
            process.kill()
    finally:
        stop_server(s)
    assert process.returncode == 0, stderr
    assert "too_many_sessions" in stderr and "trying again in 0.2 s (retry 1 of 50)" in stderr
    events = json_events(stdout)
    assert finals(events) and events[-1]["type"] == "end"
