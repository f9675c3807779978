"""The browser page in real Chromium (Debian's), with a fake microphone playing generated speech.

Each microphone test records ``tests/data/speech.wav`` (three utterances) plus trailing silence
and expects the page to show exactly one final segment per utterance: over the WebSocket when the
page is on plain HTTP, over a streaming ``fetch`` when it is on HTTP/2 with TLS. Screenshots of
the page mid-session go to ``artifacts/web/``.

Every wait is bounded by a Playwright timeout; a test that hangs fails within ``WAIT_MS``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from service.workers import STARTUP_FAILURE_S
from tests.conftest import DATA, ROOT, Server, start_server, stop_server, worker_processes
from tests.store.conftest import RedisServer, redis_binary
from tests.web.dropping_proxy import DroppingProxy

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "web"
UTTERANCES = 3
LEAD_SILENCE_S = 0.3
TRAIL_SILENCE_S = 2.5  # > redemption (600 ms) + pre-speech pad: the last utterance must end
WAIT_MS = 30_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian chromium is not at {CHROMIUM}"),
]

sync_api = pytest.importorskip("playwright.sync_api")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fake_mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """speech.wav at 48 kHz (what a microphone delivers) with silence around it."""
    with wave.open(str(DATA / "speech.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        rate = w.getframerate()
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    out_rate = 48_000
    t_in = np.arange(len(speech)) / rate
    t_out = np.arange(int(len(speech) * out_rate / rate)) / out_rate
    resampled = np.interp(t_out, t_in, speech)
    audio = np.concatenate(
        [
            np.zeros(int(LEAD_SILENCE_S * out_rate)),
            resampled,
            np.zeros(int(TRAIL_SILENCE_S * out_rate)),
        ]
    )
    path = tmp_path_factory.mktemp("mic") / "speech_48k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(out_rate)
        w.writeframes(np.clip(audio, -32768, 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def browser(fake_mic_wav: Path) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            timeout=WAIT_MS,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--ignore-certificate-errors",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={fake_mic_wav}%noloop",
            ],
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("http"))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("https")
    certs = tmp / "certs"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "dev_cert.sh"), str(certs)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    s = start_server(
        tmp,
        args=[
            "--certfile",
            str(certs / "localhost.pem"),
            "--keyfile",
            str(certs / "localhost-key.pem"),
        ],
    )
    yield s
    stop_server(s)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ---------------------------------------------------------------- helpers


def open_page(page: Any, server: Server, query: str = "") -> None:
    page.goto(f"{server.url}/{query}")
    page.wait_for_selector("main[data-state='idle']")


def wait_state(page: Any, state: str) -> None:
    page.wait_for_selector(f"main[data-state='{state}']", timeout=WAIT_MS)


def wait_finals(page: Any, n: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#results .result[data-final=\"true\"]').length >= n",
        arg=n,
        timeout=WAIT_MS,
    )


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


RESULTS_JS = """() => {
    const all = (s) => [...document.querySelectorAll(s)];
    const summary = document.getElementById('summary');
    return {
        finals: all('#results .result[data-final="true"]')
            .map((r) => ({start: Number(r.dataset.start), channel: Number(r.dataset.channel)})),
        interims: all('#results .result[data-final="false"]').length,
        finalBars: all('#timeline .bar.segment[data-final="true"]').length,
        interimBars: all('#timeline .bar.segment[data-final="false"]').length,
        errors: all('#errors .error-item').map((e) => e.textContent),
        summary: summary.textContent,
        reason: summary.dataset.reason,
        log: all('#log li code').map((c) => JSON.parse(c.textContent)),
        logIds: all('#log li .log-id').map((e) => e.textContent),
        duplicates: Number(document.getElementById('events-status').dataset.duplicates || 0),
    };
}"""


def page_results(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(RESULTS_JS)
    return result


def assert_one_final_per_utterance(result: dict[str, Any]) -> None:
    assert result["errors"] == []
    assert len(result["finals"]) == UTTERANCES, result
    assert result["finalBars"] == UTTERANCES
    # Interim results, if any, were all replaced by their finals.
    assert result["interims"] == 0 and result["interimBars"] == 0
    assert all(f["channel"] == 0 for f in result["finals"])
    starts = [f["start"] for f in result["finals"]]
    assert starts == sorted(starts)
    # Each event shown once: the log holds ids 1..n with no gaps or repeats.
    ids = [int(i.lstrip("#")) for i in result["logIds"]]
    assert ids == list(range(1, len(ids) + 1))
    assert result["reason"] == "completed"
    assert f"{UTTERANCES} segments" in result["summary"]


def record(page: Any, name: str, after_first_final: Any, shot_when: str) -> dict[str, Any]:
    """Record the fake microphone to the end, calling ``after_first_final()`` once the first
    final shows. The screenshot is taken during the third utterance, once ``shot_when`` shows."""
    page.click("#record")
    wait_state(page, "running")
    wait_finals(page, 1)
    after_first_final()
    wait_finals(page, 2)
    page.wait_for_selector(shot_when, timeout=WAIT_MS)
    screenshot(page, name)
    wait_finals(page, UTTERANCES)
    page.click("#stop")
    wait_state(page, "ended")
    return page_results(page)


def session_status(page: Any, server: Server) -> dict[str, Any]:
    """The service's own status of the page's last session (``GET /v1/sessions/{id}``)."""
    session_id = page.get_attribute("main", "data-session")
    r = httpx.get(f"{server.url}/v1/sessions/{session_id}", timeout=10, verify=False)
    assert r.status_code == 200, r.text
    status: dict[str, Any] = r.json()
    return status


def assert_sent_as_pcm(page: Any, server: Server) -> None:
    """The microphone went up as raw 16 kHz s16le, every captured sample of it: the page's
    worklet count, the bytes it sent and the bytes the service received all agree."""
    assert page.get_attribute("main", "data-mic-format") == "pcm"
    status = session_status(page, server)
    assert (status["container"], status["codec"]) == ("raw", "pcm_s16le"), status
    assert status["config"]["format"] == {
        "channels": 1,
        "sample_rate": 16_000,
        "bit_depth": 16,
        "is_float": False,
    }, status["config"]
    captured = page.evaluate("() => window.streamer.samplesCaptured")
    sent = page.evaluate("() => window.streamer.bytesSent")
    assert captured > 0 and sent == 2 * captured == status["bytes"], (captured, sent, status)
    # Everything up to Stop: the speech and most of the trailing silence.
    assert status["audio_seconds"] == pytest.approx(captured / 16_000, abs=0.01)


def duplicates(page: Any) -> int:
    return int(page.get_attribute("#events-status", "data-duplicates") or 0)


# ---------------------------------------------------------------- tests


def test_microphone_over_websocket(page: Any, http_server: Server) -> None:
    """Also: the event stream survives a cut connection (the browser reconnects by itself with
    Last-Event-ID) and a full replay (every event already shown is dropped)."""
    proxy = DroppingProxy(http_server.port).start()
    sse = b"/events HTTP/1.1"  # the EventSource's request, not /events.js

    def cut_then_replay() -> None:
        assert proxy.drop(sse) == 1
        page.wait_for_selector("#events-status[data-state='reconnecting']", timeout=WAIT_MS)
        page.wait_for_selector("#events-status[data-state='open']", timeout=WAIT_MS)
        wait_finals(page, 2)  # arrived on the resumed stream: after the last id, nothing twice
        assert duplicates(page) == 0
        resumed = [r for r in proxy.requests(sse) if b"last-event-id:" in r.lower()]
        assert len(resumed) == 1, proxy.requests(sse)
        assert page.evaluate("() => window.streamer.reconnectEvents({replay: true})")
        page.wait_for_function(
            "() => Number(document.getElementById('events-status').dataset.duplicates) > 0",
            timeout=WAIT_MS,
        )
        assert page.locator('#results .result[data-final="true"]').count() == 2

    try:
        page.goto(f"{proxy.url}/")
        wait_state(page, "idle")
        assert page.locator("#transport").inner_text() == "WebSocket"
        result = record(
            page, "microphone-websocket", cut_then_replay, shot_when="#timeline .band.active"
        )
    finally:
        proxy.close()
    assert page.get_attribute("main", "data-transport") == "websocket"
    assert result["duplicates"] > 0
    assert_one_final_per_utterance(result)
    assert_sent_as_pcm(page, http_server)


def test_microphone_over_http2_fetch(page: Any, https_server: Server) -> None:
    open_page(page, https_server)
    protocol = page.evaluate("() => performance.getEntriesByType('navigation')[0].nextHopProtocol")
    assert protocol == "h2"
    assert page.locator("#transport").inner_text() == "fetch stream (HTTP/2)"
    # Interim results on, so replacing them by finals is exercised too.
    page.check("input[name=interim_results]")
    result = record(
        page,
        "microphone-fetch-h2",
        lambda: page.click("#reconnect"),  # reopens after the last id seen
        shot_when="#timeline .bar.interim",
    )
    assert page.get_attribute("main", "data-transport") == "fetch"
    assert result["duplicates"] == 0
    assert any(e.get("type") == "segment" and not e["is_final"] for e in result["log"]), (
        "expected interim results"
    )
    assert_one_final_per_utterance(result)
    assert_sent_as_pcm(page, https_server)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_microphone_as_opus(page: Any, scheme: str, request: pytest.FixtureRequest) -> None:
    """The "send as" selector: Opus from MediaRecorder still works, on both transports, and the
    choice is remembered like the other settings."""
    server: Server = request.getfixturevalue(f"{scheme}_server")
    open_page(page, server)
    assert page.input_value("#mic-format") == "pcm"  # the default
    page.select_option("#mic-format", "opus")
    page.reload()
    wait_state(page, "idle")
    assert page.input_value("#mic-format") == "opus"
    assert page.evaluate("() => window.streamer.micFormat") == "opus"
    result = record(page, f"microphone-opus-{scheme}", lambda: None, shot_when="#timeline .bar")
    assert page.get_attribute("main", "data-mic-format") == "opus"
    assert_one_final_per_utterance(result)
    status = session_status(page, server)
    assert (status["container"], status["codec"]) == ("webm", "opus"), status
    assert status["config"]["format"] in (None, "auto"), status["config"]
    # Defaults puts PCM back.
    page.click("button[type=reset]")
    page.wait_for_function(
        """() => document.getElementById('mic-format').value === 'pcm'
            && JSON.parse(localStorage.getItem('streamer.settings')).mic_format === 'pcm'"""
    )


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_file_picker_streams_a_file(page: Any, scheme: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(f"{scheme}_server")
    open_page(page, server)
    page.uncheck("#realtime")  # as fast as it can go; pacing is for people watching
    page.set_input_files("#file", str(DATA / "speech.wav"))
    wait_state(page, "ended")
    assert page.get_attribute("main", "data-source") == "file"
    assert page.get_attribute("main", "data-transport") == (
        "fetch" if scheme == "https" else "websocket"
    )
    assert_one_final_per_utterance(page_results(page))


def test_transport_can_be_forced_and_errors_show_plainly(page: Any, http_server: Server) -> None:
    # fetch cannot stream over HTTP/1.1: the page says so and uses the WebSocket.
    open_page(page, http_server, "?transport=fetch")
    assert page.locator("#transport").inner_text() == "WebSocket"
    assert "fetch unavailable" in (page.get_attribute("#transport", "title") or "")
    # A server-side rejection reaches the page as a readable error, not a silent failure.
    page.fill("input[name=api_key]", "not-needed")  # accepted and ignored: no key configured
    page.set_input_files(
        "#file",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not audio " * 100}],
    )
    wait_state(page, "ended")
    errors = page.locator("#errors .error-item").all_inner_texts()
    assert errors and any("unsupported_format" in e or "decode" in e for e in errors), errors
    assert page.locator('#results .result[data-final="true"]').count() == 0


def test_api_key_from_settings(page: Any, tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"STREAMER_API_KEY": "sesame"})
    try:
        open_page(page, server)
        page.uncheck("#realtime")
        page.set_input_files("#file", str(DATA / "speech.wav"))
        wait_state(page, "failed")
        # The WebSocket handshake is refused without a reason; the page finds out why.
        assert "unauthorized" in page.locator("#errors").inner_text()
        page.fill("input[name=api_key]", "sesame")
        page.set_input_files("#file", str(DATA / "speech.wav"))
        wait_state(page, "ended")
        assert_one_final_per_utterance(page_results(page))
    finally:
        stop_server(server)


# ---------------------------------------------------------------- with a real model

WATCH_RESULTS_JS = """() => {
    // Every row the list ever shows, in order, with its text when it appeared: interim rows
    // are replaced, so the end state alone cannot tell that text came while speaking.
    window.shown = [];
    new MutationObserver((changes) => {
        for (const change of changes) for (const row of change.addedNodes) {
            window.shown.push({
                final: row.dataset.final === 'true',
                start: Number(row.dataset.start),
                text: row.querySelector('.result-output').textContent,
            });
        }
    }).observe(document.getElementById('results'), {childList: true});
}"""


@pytest.fixture(scope="module")
def whisper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip(
        "faster_whisper", reason="the whisper extra is not installed (uv sync --extra whisper)"
    )
    s = start_server(
        tmp_path_factory.mktemp("whisper"),
        env={"STREAMER_MODEL": "service.model.whisper:create", "STREAMER_MODEL_OPTIONS": "{}"},
        timeout=60,
    )
    yield s
    stop_server(s)


def test_whisper_text_shows_while_a_file_streams(page: Any, whisper_server: Server) -> None:
    """A file streamed at its own pace with interim results: the words show up while each
    utterance is spoken (interim rows, replaced in place), then the final text on the timeline
    and in the segment list."""
    open_page(page, whisper_server)
    page.check("input[name=interim_results]")
    assert page.is_checked("#realtime")
    page.evaluate(WATCH_RESULTS_JS)
    page.set_input_files("#file", str(DATA / "speech.wav"))
    wait_finals(page, 2)
    screenshot(page, "whisper")
    wait_state(page, "ended")
    result = page_results(page)
    assert_one_final_per_utterance(result)
    texts = page.locator('#results .result[data-final="true"] .result-output').all_inner_texts()
    assert "hello" in texts[0].lower() and "tomorrow" in texts[2].lower(), texts
    bars = page.locator('#timeline .bar.segment[data-final="true"] .bar-label').all_inner_texts()
    assert bars == texts
    assert page.get_attribute('#results .result[data-final="true"]', "data-language") == "en"
    shown: list[dict[str, Any]] = page.evaluate("() => window.shown")
    final_index = {row["start"]: i for i, row in enumerate(shown) if row["final"]}
    early = [
        row
        for i, row in enumerate(shown)
        if not row["final"] and row["text"] not in ("", "…") and i < final_index[row["start"]]
    ]
    assert early, shown


# ---------------------------------------------------------------- resumed uploads (issue 21)

# The page's recording survives a dropped connection: its WebSocket is cut with a TCP reset
# (through the proxy) mid-recording; the page resumes the session at the offset the service
# received and sends what it recorded meanwhile.
WS = b"GET /v1/ws"


def test_recording_survives_dropped_websockets(page: Any, http_server: Server) -> None:
    """The session ends ``completed`` with one final per utterance, and every captured sample
    reached the service exactly once."""
    proxy = DroppingProxy(http_server.port).start()

    def cut_twice() -> None:
        for n in (1, 2):
            assert proxy.drop(WS, reset=True) == 1
            page.wait_for_function(
                "n => window.streamer.uploadResumes >= n", arg=n, timeout=WAIT_MS
            )
            assert page.get_attribute("main", "data-upload") == "open"
            page.wait_for_timeout(700)  # audio flows on the resumed connection before the next cut

    try:
        page.goto(f"{proxy.url}/")
        wait_state(page, "idle")
        result = record(page, "microphone-websocket-resumed", cut_twice, shot_when="#timeline .bar")
        resumes = proxy.requests(WS)
    finally:
        proxy.close()
    assert len(resumes) == 3  # the first connection and two resumed ones
    assert page.evaluate("() => window.streamer.uploadResumes") == 2
    assert_one_final_per_utterance(result)
    # Every sample captured was received once: bytes sent == 2 x samples == bytes received.
    assert_sent_as_pcm(page, http_server)


def test_stop_during_a_cut_sends_what_was_kept(page: Any, http_server: Server) -> None:
    """Stop pressed while the connection is down: the kept audio and then the stop go out on the
    resumed connection; the session still completes with every sample."""
    proxy = DroppingProxy(http_server.port).start()
    try:
        page.goto(f"{proxy.url}/")
        wait_state(page, "idle")
        page.click("#record")
        wait_state(page, "running")
        wait_finals(page, 1)
        proxy.drop(WS, reset=True)
        page.click("#stop")
        wait_state(page, "ended")
    finally:
        proxy.close()
    assert page.evaluate("() => window.streamer.uploadResumes") == 1
    assert page.get_attribute("#summary", "data-reason") == "completed"
    assert_sent_as_pcm(page, http_server)


def test_recording_over_http2_fetch_survives_a_dropped_connection(
    page: Any, https_server: Server
) -> None:
    """HTTP/2: one TLS connection carries the page's event stream and its upload; it is reset
    mid-recording. The EventSource reconnects by itself; the upload asks the service for its
    offset (HEAD) and streams the rest in a new fetch with Upload-Offset."""
    proxy = DroppingProxy(https_server.port).start()

    def cut() -> None:
        assert proxy.drop(b"", reset=True) >= 1  # TLS: every connection, whatever it carries
        page.wait_for_function("() => window.streamer.uploadResumes >= 1", timeout=WAIT_MS)
        assert page.get_attribute("main", "data-upload") == "open"

    try:
        page.goto(f"https://127.0.0.1:{proxy.port}/")
        wait_state(page, "idle")
        assert page.locator("#transport").inner_text() == "fetch stream (HTTP/2)"
        result = record(page, "microphone-fetch-h2-resumed", cut, shot_when="#timeline .bar")
    finally:
        proxy.close()
    assert page.get_attribute("main", "data-transport") == "fetch"
    assert page.evaluate("() => window.streamer.uploadResumes") == 1
    assert_one_final_per_utterance(result)
    assert_sent_as_pcm(page, https_server)


@pytest.mark.redis
def test_recording_survives_the_death_of_its_worker(page: Any, tmp_path: Path) -> None:
    """Behind ``--workers 2`` with Redis (the kernel spreads connections, as a load balancer
    would), the worker running the page's session is SIGKILLed after the first final. The page
    keeps recording, resumes on the other worker once that one adopts the session (after the
    dead one's lease, 5 s), and the session completes with one final per utterance, every
    event shown once and every captured sample received once."""
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    store = RedisServer(binary)
    store.start()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": store.url, "STREAMER_REDIS_PREFIX": prefix}
    server = start_server(tmp_path, env=env, args=["--workers", "2"])
    try:
        # The supervisor takes a worker dying within STARTUP_FAILURE_S of its start for a
        # configuration error and stops everything: record once that has passed.
        workers = worker_processes(server)
        assert len(workers) == 2
        started = max(w.create_time() for w in workers)
        time.sleep(max(0.0, started + STARTUP_FAILURE_S - time.time()))
        open_page(page, server)

        def kill_owner() -> None:
            session_id = page.get_attribute("main", "data-session")
            client = redis.Redis.from_url(store.url, decode_responses=True, socket_timeout=5)
            owner = client.hget(f"{prefix}:{{{session_id}}}:session", "owner")
            client.close()
            assert isinstance(owner, str) and owner
            os.kill(int(owner.split(":")[1]), signal.SIGKILL)  # the worker id is host:pid:...
            page.wait_for_function("() => window.streamer.uploadResumes >= 1", timeout=WAIT_MS)

        result = record(page, "microphone-worker-killed", kill_owner, shot_when="#timeline .bar")
        assert page.evaluate("() => window.streamer.uploadResumes") >= 1
        assert_one_final_per_utterance(result)
        assert_sent_as_pcm(page, server)
        assert "adopted a session whose worker died" in server.log()
    finally:
        stop_server(server)
        store.stop()
