"""``/metrics`` scraped from the real server (``python -m service``) after real sessions: the
figures must be what was sent and what the session reported, not merely present. Each test
compares a scrape before and after, so the tests share one server in any order."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, start_server, stop_server
from tests.sse_client import SseEvent, read_all

pytestmark = pytest.mark.anyio

STAGES = ("audio_decoding", "vad_processing", "model_inference")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("metrics"), env={"STREAMER_LOG_FORMAT": "json"})
    yield s
    stop_server(s)


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    """Summed over every label set."""
    return sum(v for (n, _), v in samples.items() if n == name)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def has_lag(e: SseEvent) -> bool:
    # Events produced from audio carry a lag; session-level ones (end, input errors) do not.
    return e.event in ("active", "inactive", "segment") or (
        e.event == "error" and "start_time" in e.data
    )


async def test_a_session_figures_match_what_was_sent(server: Server, speech_wav: Path) -> None:
    body = speech_wav.read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            before = await scrape(client)
            r = await client.post("/v1/sessions")
            session = r.json()
            r = await client.put(session["audio_url"], content=body)
            assert r.status_code == 200, r.text
            summary = r.json()
            events = await read_all(client, session["events_url"])
            after = await scrape(client)

    assert summary["segments"] == 3
    audio_s = summary["audio_seconds"]
    # In: every byte, and every decoded second (the summary rounds to milliseconds).
    assert delta(after, before, "streamer_received_bytes_total") == len(body) == summary["bytes"]
    got_audio = delta(after, before, "streamer_received_audio_seconds_total")
    assert got_audio == pytest.approx(audio_s, abs=0.0006)
    # Out: one count per event, by type.
    finals = [e for e in events if e.event == "segment" and e.data["is_final"]]
    assert delta(after, before, "streamer_events_total", type="final") == len(finals) == 3
    assert delta(after, before, "streamer_events_total", type="active") == 3
    assert delta(after, before, "streamer_events_total", type="inactive") == 3
    assert delta(after, before, "streamer_events_total", type="end") == 1
    assert delta(after, before, "streamer_events_total", type="interim") == 0
    # Lag: one observation per event produced from audio.
    lag_count = total(after, "streamer_event_lag_seconds_count") - total(
        before, "streamer_event_lag_seconds_count"
    )
    assert lag_count == sum(1 for e in events if has_lag(e)) == 9
    assert delta(after, before, "streamer_event_lag_seconds_count", type="final") == 3
    # Sessions: created, ended as completed, none left active.
    assert delta(after, before, "streamer_sessions_created_total") == 1
    assert delta(after, before, "streamer_sessions_ended_total", reason="completed") == 1
    assert delta(after, before, "streamer_session_duration_seconds_count") == 1
    assert total(after, "streamer_sessions_active") == 0
    # The real-time-factor set: every stage observed, over the audio it actually processed.
    for stage in STAGES:
        assert delta(after, before, "streamer_rtf_count", stage=stage) > 0, stage
        assert delta(after, before, "streamer_processing_duration_seconds_sum", stage=stage) > 0
    decoded = delta(after, before, "streamer_media_duration_seconds_sum", stage="audio_decoding")
    assert decoded == pytest.approx(got_audio)
    # VAD sees whole 512-sample frames, the last one padded.
    vad = delta(after, before, "streamer_media_duration_seconds_sum", stage="vad_processing")
    assert got_audio <= vad < got_audio + 512 / 16000
    model = delta(after, before, "streamer_media_duration_seconds_sum", stage="model_inference")
    assert model == pytest.approx(sum(f.data["end_time"] - f.data["start_time"] for f in finals))
    # One real-time-factor observation per call into the model (a batch of 1-3 finals).
    batches = delta(after, before, "streamer_model_batches_total")
    assert 1 <= batches <= 3
    assert delta(after, before, "streamer_rtf_count", stage="model_inference") == batches
    assert delta(after, before, "streamer_model_batch_size_sum") == 3
    # The model: three successful final calls, each queued once; threads idle again.
    assert delta(after, before, "streamer_model_calls_total", kind="final", outcome="ok") == 3
    assert delta(after, before, "streamer_model_queue_wait_seconds_count") == 3
    assert value(after, "streamer_model_queue_depth", kind="final") == 0
    assert value(after, "streamer_model_threads") >= 2
    assert value(after, "streamer_model_threads_busy") == 0
    assert value(after, "streamer_model_calls_waiting") == 0
    assert delta(after, before, "streamer_vad_batch_streams_count") > 0
    assert value(after, "streamer_subscribers_active") == 0


async def test_errors_count_once_by_code(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(30):
            before = await scrape(client)
            # Answered over HTTP before any session exists.
            r = await client.post("/v1/sessions", content=b"{not json")
            assert r.status_code == 400
            r = await client.get("/v1/sessions/" + "x" * 22)
            assert r.status_code == 404
            # Found while decoding: an error event (and the upload's response) - counted once.
            session = (await client.post("/v1/sessions")).json()
            r = await client.put(session["audio_url"], content=b"this is not audio at all" * 40)
            assert r.json()["error"]["code"] == "unsupported_format"
            after = await scrape(client)
    assert delta(after, before, "streamer_errors_total", code="invalid_json") == 1
    assert delta(after, before, "streamer_errors_total", code="session_not_found") == 1
    assert delta(after, before, "streamer_errors_total", code="unsupported_format") == 1
    assert delta(after, before, "streamer_events_total", type="error") == 1
    assert delta(after, before, "streamer_sessions_ended_total", reason="error") == 1


async def test_the_event_loop_is_sampled_while_the_server_runs(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(30):
            before = await scrape(client)
            await anyio.sleep(0.5)
            after = await scrape(client)
    # Ten samples a second; a loose lower bound, as the test machine may be busy.
    assert delta(after, before, "streamer_event_loop_lag_seconds_count") >= 2
    assert delta(after, before, "streamer_event_loop_lag_seconds_sum") >= 0


async def test_subscribers_and_created_sessions_are_live_gauges(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(30):
            session = (await client.post("/v1/sessions")).json()
            m = await scrape(client)
            assert value(m, "streamer_sessions_active", state="created") >= 1
            async with client.stream("GET", session["events_url"]) as response:
                assert response.status_code == 200
                # The stream is open once its first bytes (the retry hint, or a ping) could be
                # sent; scraping until the gauge moves is the client's view of that.
                while value(await scrape(client), "streamer_subscribers_active") < 1:
                    await anyio.sleep(0.02)
                r = await client.delete(session["url"])
                assert r.status_code == 202
                async for _ in response.aiter_lines():
                    pass  # to the end event
            m = await scrape(client)
    assert value(m, "streamer_subscribers_active") == 0
    assert value(m, "streamer_sessions_ended_total", reason="cancelled") >= 1


async def test_log_lines_are_json_with_session_and_trace_ids(
    server: Server, speech_wav: Path
) -> None:
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            r = await client.post("/v1/sessions", headers={"traceparent": traceparent})
            session = r.json()
            r = await client.put(session["audio_url"], content=speech_wav.read_bytes())
            assert r.status_code == 200
    lines = [line for line in server.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"ts", "level", "logger", "message", "session_id", "trace_id"} <= record.keys()
    ended = [
        r for r in records if r["message"] == "session ended" and r["session_id"] == session["id"]
    ]
    assert len(ended) == 1
    assert ended[0]["trace_id"] == trace_id
    assert (ended[0]["reason"], ended[0]["segments"]) == ("completed", 3)


async def test_decoding_is_observed_per_second_of_audio_not_per_chunk(
    server: Server, speech_wav: Path
) -> None:
    """Regression (cost): the decode stage's three histograms were observed for every chunk,
    three lock-taking observations per 100 ms chunk at hundreds of streams, for a real-time
    factor of microseconds. They are now observed once per second of audio (and once for the
    rest at the end), and the totals stay exact."""
    body = speech_wav.read_bytes()
    chunk = 3200  # 100 ms of 16 kHz s16 mono

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]
            await anyio.lowlevel.checkpoint()

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            before = await scrape(client)
            session = (await client.post("/v1/sessions")).json()
            r = await client.put(session["audio_url"], content=pieces())
            assert r.status_code == 200, r.text
            await read_all(client, session["events_url"])
            after = await scrape(client)
    audio_s = r.json()["audio_seconds"]
    assert audio_s > 7
    got_audio = delta(after, before, "streamer_received_audio_seconds_total")
    assert got_audio == pytest.approx(audio_s, abs=0.0006)
    decoded = delta(after, before, "streamer_media_duration_seconds_sum", stage="audio_decoding")
    assert decoded == pytest.approx(got_audio)
    observations = delta(after, before, "streamer_rtf_count", stage="audio_decoding")
    assert 1 <= observations <= int(audio_s) + 1 < len(body) // chunk
