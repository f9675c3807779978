"""Deepgram's own Python SDK (``deepgram-sdk``, pinned in the dev group) against the real server
at ``/v1/listen``: its live client, unmodified but for the base URL (its ``environment``).
The server runs a model with text (``tests/api/text_model.py``) so that transcripts, words and
confidences travel the whole way."""

from __future__ import annotations

import asyncio
import hashlib
import wave
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.socket_client import AsyncV1SocketClient
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)

from tests.api.text_model import PROBABILITY, words_for
from tests.conftest import DATA, Server, start_server, stop_server
from tests.sse_client import finals, read_all

pytestmark = pytest.mark.anyio

KEY = "deepgram-test-key"
FRAME_BYTES = 3200  # 100 ms of 16 kHz s16le mono


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio's; module scope for speech_messages


@pytest.fixture(scope="module")
def dg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("deepgram"),
        env={"STREAMER_MODEL": "tests.api.text_model:create", "STREAMER_API_KEY": KEY},
    )
    yield s
    stop_server(s)


def pcm_of(name: str) -> tuple[bytes, int]:
    with wave.open(str(DATA / name)) as w:
        assert (w.getframerate(), w.getsampwidth()) == (16000, 2)
        return w.readframes(w.getnframes()), w.getnchannels()


def client(server: Server, api_key: str | None = KEY, **kwargs: Any) -> AsyncDeepgramClient:
    ws = server.url.replace("http", "ws", 1)
    env = DeepgramClientEnvironment(base=server.url, production=ws, agent=ws, agent_rest=server.url)
    return AsyncDeepgramClient(api_key=api_key, environment=env, **kwargs)


async def send_audio(
    conn: AsyncV1SocketClient, pcm: bytes, frame: int = FRAME_BYTES, pause_s: float = 0.002
) -> None:
    for i in range(0, len(pcm), frame):
        await conn.send_media(pcm[i : i + frame])
        await asyncio.sleep(pause_s)  # faster than real time, but as a stream of frames


async def collect(conn: AsyncV1SocketClient) -> list[Any]:
    return [message async for message in conn]


@pytest.fixture(scope="module")
async def speech_messages(dg_server: Server) -> list[Any]:
    """speech.wav streamed once with most options on; several tests look at what came back."""
    pcm, _ = pcm_of("speech.wav")
    with anyio.fail_after(60):
        async with client(dg_server).listen.v1.connect(
            model="nova-3",
            encoding="linear16",
            sample_rate=16000,
            channels=1,
            interim_results="true",
            vad_events="true",
            utterance_end_ms="1000",
            punctuate="true",
            smart_format="true",
            language="en",
        ) as conn:
            reader = asyncio.ensure_future(collect(conn))
            # 4x real time: much faster, and an utterance's final follows its interims within
            # milliseconds and supersedes them (finals first), so there would be none to see.
            await send_audio(conn, pcm, pause_s=0.025)
            await conn.send_close_stream()
            messages = await reader
    return messages


async def test_results_interim_and_final_with_the_model_text(speech_messages: list[Any]) -> None:
    results = [m for m in speech_messages if isinstance(m, ListenV1Results)]
    final = [r for r in results if r.is_final]
    assert len(final) == 3  # speech.wav's three sentences
    assert all(r.speech_final and not r.from_finalize for r in final)
    assert any(not r.is_final for r in results)
    for r in results:
        assert r.channel_index == [0, 1]
        alt = r.channel.alternatives[0]
        expected = words_for(round(r.duration * 16000))
        assert alt.transcript == " ".join(expected)
        assert [w.punctuated_word for w in alt.words] == expected
        assert [w.word for w in alt.words] == [w.rstrip(",.").lower() for w in expected]
        assert alt.confidence == pytest.approx(PROBABILITY)
        assert {w.confidence for w in alt.words} == {PROBABILITY}
    # Interims of an utterance come before its final and start where it starts.
    for r in results:
        if not r.is_final:
            owner = next(f for f in final if f.start == r.start)
            assert results.index(r) < results.index(owner)
            # The utterance so far: an interim taken while the VAD waits out its 600 ms of
            # silence may run past where the final, trimmed to the speech, ends.
            assert r.duration < owner.duration + 0.61


async def test_speech_started_and_utterance_end_frame_each_utterance(
    speech_messages: list[Any],
) -> None:
    kinds = [type(m).__name__.removeprefix("ListenV1") for m in speech_messages]
    assert kinds.count("SpeechStarted") == 3 and kinds.count("UtteranceEnd") == 3, kinds
    final_at = [i for i, m in enumerate(speech_messages) if getattr(m, "is_final", False)]
    for i in final_at:  # each utterance's end follows its final result
        end = speech_messages[i + 1]
        assert isinstance(end, ListenV1UtteranceEnd) and end.channel == [0, 1]
        final = speech_messages[i]
        assert end.last_word_end == final.channel.alternatives[0].words[-1].end
    started = [m for m in speech_messages if isinstance(m, ListenV1SpeechStarted)]
    finals_ = [m for m in speech_messages if getattr(m, "is_final", False)]
    for s, f in zip(started, finals_, strict=True):
        assert s.channel == [0, 1] and s.timestamp == f.start
        assert speech_messages.index(s) < speech_messages.index(f)


async def test_close_stream_ends_with_metadata_and_the_session_is_on_sse(
    dg_server: Server, speech_messages: list[Any]
) -> None:
    pcm, _ = pcm_of("speech.wav")
    last = speech_messages[-1]
    assert isinstance(last, ListenV1Metadata)
    assert last.sha256 == hashlib.sha256(pcm).hexdigest()
    assert last.duration == pytest.approx(len(pcm) / 32000, abs=0.002)
    assert last.channels == 1
    ids = {m.metadata.request_id for m in speech_messages if isinstance(m, ListenV1Results)}
    assert ids == {last.request_id}
    # The request id is the session's: the same results, readable over SSE.
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=dg_server.url, headers=headers, timeout=30) as http:
        with anyio.fail_after(30):
            events = await read_all(http, f"/v1/sessions/{last.request_id}/events")
    assert len(finals(events)) == 3
    assert events[-1].data["reason"] == "completed"
    assert finals(events)[0]["text"].strip() == speech_messages_text(speech_messages, 0)


def speech_messages_text(messages: list[Any], index: int) -> str:
    final = [m for m in messages if getattr(m, "is_final", False)]
    return str(final[index].channel.alternatives[0].transcript)


async def test_finalize_flushes_the_open_utterance_now(dg_server: Server) -> None:
    """Half way through the first sentence (0.37-1.6 s), Finalize: its Results come with
    from_finalize, ending where the audio sent so far ends, without waiting for silence."""
    pcm, _ = pcm_of("speech.wav")
    cut = 16000 * 2  # 1.0 s
    with anyio.fail_after(60):
        async with client(dg_server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000
        ) as conn:
            await send_audio(conn, pcm[:cut])
            await conn.send_finalize()
            flushed = None
            while flushed is None:
                message = await conn.recv()
                if isinstance(message, ListenV1Results) and message.from_finalize:
                    flushed = message
            reader = asyncio.ensure_future(collect(conn))
            await send_audio(conn, pcm[cut:])
            await conn.send_close_stream()
            rest = await reader
    assert flushed.is_final and not flushed.speech_final
    # Up to the audio sent, less the partial VAD frame (32 ms) that goes to what follows.
    assert 1.0 - 0.033 <= flushed.start + flushed.duration <= 1.0
    assert flushed.channel.alternatives[0].transcript
    later = [m for m in rest if isinstance(m, ListenV1Results) and m.is_final]
    assert not any(m.from_finalize for m in later)
    # The sentence goes on in a new utterance from the flush on; then the other two.
    assert later[0].start == flushed.start + flushed.duration
    assert len(later) == 3
    assert isinstance(rest[-1], ListenV1Metadata)


async def test_multichannel_gives_each_channel_its_own_results(dg_server: Server) -> None:
    pcm, channels = pcm_of("stereo_two_speakers.wav")
    assert channels == 2
    with anyio.fail_after(60):
        async with client(dg_server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000, channels=2, multichannel="true"
        ) as conn:
            reader = asyncio.ensure_future(collect(conn))
            await send_audio(conn, pcm, frame=2 * FRAME_BYTES)
            await conn.send_close_stream()
            messages = await reader
    final = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    by_channel = {tuple(m.channel_index): m for m in final}
    assert sorted(by_channel) == [(0, 2), (1, 2)]  # one speaker on each channel
    assert by_channel[(0, 2)].start < 1.5 < by_channel[(1, 2)].start
    assert messages[-1].channels == 2


async def test_without_multichannel_the_channels_are_mixed_down(dg_server: Server) -> None:
    pcm, _ = pcm_of("stereo_two_speakers.wav")
    with anyio.fail_after(60):
        async with client(dg_server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000, channels=2
        ) as conn:
            reader = asyncio.ensure_future(collect(conn))
            await send_audio(conn, pcm, frame=2 * FRAME_BYTES)
            await conn.send_close_stream()
            messages = await reader
    final = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    assert {tuple(m.channel_index) for m in final} == {(0, 1)}
    assert len(final) >= 2  # both speakers, in one stream
    assert messages[-1].channels == 1


async def test_keep_alive_is_accepted(dg_server: Server) -> None:
    pcm, _ = pcm_of("speech.wav")
    with anyio.fail_after(60):
        async with client(dg_server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000
        ) as conn:
            reader = asyncio.ensure_future(collect(conn))
            await conn.send_keep_alive()
            await send_audio(conn, pcm[: 16000 * 2 * 2])
            await conn.send_keep_alive()
            await conn.send_close_stream()
            messages = await reader
    assert isinstance(messages[-1], ListenV1Metadata)
    assert not any(type(m).__name__ == "ListenV1Error" for m in messages)


async def test_a_wrong_api_key_is_refused_as_the_sdk_reports_it(dg_server: Server) -> None:
    with anyio.fail_after(30), pytest.raises(ApiError) as refused:
        async with client(dg_server, api_key="wrong").listen.v1.connect(model="nova-3"):
            pass
    assert refused.value.status_code == 401
    assert "invalid credentials" in str(refused.value.body)


async def test_a_bearer_access_token_works_too(dg_server: Server) -> None:
    pcm, _ = pcm_of("speech.wav")
    with anyio.fail_after(60):
        async with client(dg_server, api_key=None, access_token=KEY).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000
        ) as conn:
            reader = asyncio.ensure_future(collect(conn))
            await send_audio(conn, pcm[: 16000 * 2])
            await conn.send_close_stream()
            messages = await reader
    assert isinstance(messages[-1], ListenV1Metadata)


async def test_a_parameter_it_cannot_honour_is_refused_with_400(dg_server: Server) -> None:
    with anyio.fail_after(30), pytest.raises(ApiError) as refused:
        async with client(dg_server).listen.v1.connect(
            model="nova-3", encoding="speex", sample_rate=16000
        ):
            pass
    assert refused.value.status_code == 400
