"""The real server with ``STREAMER_MODEL=service.model.whisper:create`` on generated speech.

tests/data/speech.* say "Hello, how are you?", "Streaming audio is fun." and "Please call me
tomorrow." (scripts/make_test_audio.sh). Whatever the container or PCM format, the model must
get float32 in [-1, 1] at 16 kHz: integer samples or a wrong rate give empty or nonsense text,
so the keywords in the final texts are the check that every decoder path converts right.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import DATA, Server, start_server, stop_server
from tests.sse_client import SseEvent, finals, read_all

pytest.importorskip(
    "faster_whisper", reason="the whisper extra is not installed (uv sync --extra whisper)"
)

pytestmark = pytest.mark.anyio

WHISPER_ENV = {
    "STREAMER_MODEL": "service.model.whisper:create",
    "STREAMER_MODEL_OPTIONS": "{}",
    "STREAMER_MODEL_THREADS": "2",
}
ROUNDING_S = 0.0011  # session times are rounded to the millisecond on both sides


@pytest.fixture(scope="module")
def whisper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("whisper"), env=WHISPER_ENV, timeout=60)
    yield s
    stop_server(s)


def assert_words_inside_their_segment(segment: dict[str, Any]) -> None:
    assert segment["language"] == "en"
    assert isinstance(segment["text"], str)
    for w in segment["words"]:
        assert set(w) == {"word", "start", "end", "probability"}, w
        assert segment["start_time"] - ROUNDING_S <= w["start"] <= w["end"], (w, segment)
        assert w["end"] <= segment["end_time"] + ROUNDING_S, (w, segment)


def assert_the_three_utterances(events: list[SseEvent], channel: int = 0) -> None:
    assert events[-1].event == "end" and events[-1].data["reason"] == "completed", events[-1]
    assert [e.data for e in events if e.event == "error"] == []
    texts = [f["text"] for f in finals(events, channel)]
    assert len(texts) == 3, texts
    assert "hello" in texts[0].lower(), texts
    assert texts[1], texts  # tiny.en mishears espeak's "Streaming audio is fun." variously
    assert "tomorrow" in texts[2].lower(), texts
    for f in finals(events):
        assert_words_inside_their_segment(f)
    # Word times are session time: the last utterance's words come after 5 s, not near 0.
    assert finals(events, channel)[2]["words"][0]["start"] > 5.0


@pytest.mark.parametrize(
    ("name", "query"),
    [
        ("speech.wav", ""),
        ("speech.mp3", ""),
        ("speech.webm", ""),
        ("speech_s16le_8k_stereo.raw", "?encoding=s16le&sample_rate=8000&channels=2"),
    ],
)
async def test_every_input_format_reaches_whisper_as_float(
    whisper_server: Server, name: str, query: str
) -> None:
    async with httpx.AsyncClient(base_url=whisper_server.url, timeout=60) as client:
        created = (await client.post("/v1/sessions")).json()
        with anyio.fail_after(60):
            r = await client.post(created["audio_url"] + query, content=(DATA / name).read_bytes())
            assert r.status_code == 200, r.text
            events = await read_all(client, created["events_url"])
    assert_the_three_utterances(events)
    if name.endswith(".raw"):
        assert finals(events, 1) == []  # channel 1 is silent: no speech, no text


async def paced(data: bytes, bytes_per_second: float, chunk: int = 3200) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]
        await anyio.sleep(chunk / bytes_per_second)


async def test_interim_text_arrives_while_speaking_and_before_its_final(
    whisper_server: Server,
) -> None:
    data = (DATA / "speech.wav").read_bytes()
    async with httpx.AsyncClient(base_url=whisper_server.url, timeout=60) as client:
        created = (await client.post("/v1/sessions", json={"interim_results": True})).json()
        with anyio.fail_after(60):
            # Live: at the audio's own pace (16 kHz s16 mono), as a microphone would send it.
            r = await client.post(created["audio_url"], content=paced(data, 32000))
            assert r.status_code == 200, r.text
            events = await read_all(client, created["events_url"])
    assert_the_three_utterances(events)
    segments = [e for e in events if e.event == "segment"]
    for e in segments:
        assert_words_inside_their_segment(e.data)
    final_at = {e.data["start_time"]: e.id for e in segments if e.data["is_final"]}
    interims = [e for e in segments if not e.data["is_final"]]
    for e in interims:
        # Every interim belongs to an utterance whose final comes later in the log.
        assert e.id is not None and e.id < final_at[e.data["start_time"]], e
    # Text while someone speaks. Not for every utterance: an interim tick is skipped while
    # the previous interim call still runs, and on a busy machine a whole utterance can pass.
    with_text = {e.data["start_time"] for e in interims if e.data["text"]}
    assert with_text, [e.data for e in interims]
    assert events[-1].data["interim_segments"] == len(interims)
