"""Upload audio over real HTTP and read the results as SSE: every format, raw PCM, channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import DATA, Server
from tests.sse_client import SseEvent, finals, read_all

pytestmark = pytest.mark.anyio

FORMATS = [
    "speech.wav",
    "speech.flac",
    "speech.mp3",
    "speech.ogg",
    "speech.webm",
    "speech.m4a",
    "speech_moov_end.m4a",
]


async def chunks(path: Path, size: int = 16384, pause_s: float = 0.0) -> Any:
    data = path.read_bytes()
    for i in range(0, len(data), size):
        yield data[i : i + size]
        if pause_s:
            await anyio.sleep(pause_s)


async def run_session(
    server: Server,
    path: Path,
    config: dict[str, Any] | None = None,
    query: str = "",
    method: str = "POST",
    pause_s: float = 0.0,
) -> tuple[httpx.Response, list[SseEvent]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json=config)).json()
        with anyio.fail_after(60):
            upload = await client.request(
                method, created["audio_url"] + query, content=chunks(path, pause_s=pause_s)
            )
            events = await read_all(client, created["events_url"])
    return upload, events


def spans(events: list[SseEvent], channel: int = 0) -> list[tuple[float, float]]:
    return [(s["start_time"], s["end_time"]) for s in finals(events, channel)]


@pytest.fixture(scope="module")
async def reference(server: Server) -> list[tuple[float, float]]:
    _, events = await run_session(server, DATA / "speech.wav")
    return spans(events)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def test_wav_gives_one_final_per_utterance(server: Server) -> None:
    upload, events = await run_session(server, DATA / "speech.wav")
    assert upload.status_code == 200, upload.text
    summary = upload.json()
    assert summary["state"] == "ended" and summary["end_reason"] == "completed"
    assert summary["segments"] == 3
    assert summary["bytes"] == (DATA / "speech.wav").stat().st_size
    types = [e.event for e in events]
    assert types.count("active") == types.count("inactive") == 3
    assert types[-1] == "end"
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    segs = finals(events)
    assert len(segs) == 3
    for s in segs:
        # The dummy model counts the samples it was given: the whole utterance.
        assert s["count"] == pytest.approx((s["end_time"] - s["start_time"]) * 16000, abs=1)
        assert s["channel"] == 0
    # Each inactive comes before its final segment.
    assert types.index("inactive") < types.index("segment")
    end = events[-1].data
    assert end["reason"] == "completed" and end["segments"] == 3
    assert end["audio_seconds"] == pytest.approx(summary["audio_seconds"])


@pytest.mark.parametrize("name", FORMATS)
async def test_formats_agree_within_100ms(
    server: Server, reference: list[tuple[float, float]], name: str
) -> None:
    upload, events = await run_session(server, DATA / name)
    assert upload.status_code == 200, upload.text
    got = spans(events)
    assert len(got) == len(reference) == 3, (name, got)
    for (s0, e0), (s1, e1) in zip(reference, got, strict=True):
        assert abs(s0 - s1) <= 0.1 and abs(e0 - e1) <= 0.1, (name, reference, got)


@pytest.mark.parametrize("name", ["noise.wav", "silence.wav"])
async def test_no_segments_for_noise_or_silence(server: Server, name: str) -> None:
    upload, events = await run_session(server, DATA / name)
    assert upload.status_code == 200
    assert finals(events) == []
    assert upload.json()["audio_seconds"] > 2


async def test_raw_pcm_by_query_parameters(
    server: Server, reference: list[tuple[float, float]]
) -> None:
    upload, events = await run_session(
        server,
        DATA / "speech_s16le_8k_stereo.raw",
        query="?encoding=s16le&sample_rate=8000&channels=2",
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["channels"] == 2
    got = spans(events, 0)
    assert len(got) == 3 and spans(events, 1) == []
    for (s0, e0), (s1, e1) in zip(reference, got, strict=True):
        assert abs(s0 - s1) <= 0.1 and abs(e0 - e1) <= 0.1


@pytest.mark.parametrize(
    ("name", "config"),
    [
        (
            "speech_f32le_48k.raw",
            {"format": {"channels": 1, "sample_rate": 48000, "bit_depth": 32, "is_float": True}},
        ),
        ("speech_44k_stereo.wav", None),
    ],
)
async def test_resampled_sources_agree_and_keep_their_tail(
    server: Server, reference: list[tuple[float, float]], name: str, config: dict[str, Any] | None
) -> None:
    # These fixtures hold only the first 1.35 s (to stay small), cut mid-utterance: the open
    # utterance must still be closed and sent to the model at the end of the upload.
    upload, events = await run_session(server, DATA / name, config)
    assert upload.status_code == 200, upload.text
    assert upload.json()["audio_seconds"] == pytest.approx(1.35, abs=0.01)
    ((start, end),) = spans(events)
    assert abs(start - reference[0][0]) <= 0.1
    assert end == pytest.approx(1.35, abs=0.01)


async def test_each_channel_has_its_own_vad(server: Server) -> None:
    upload, events = await run_session(server, DATA / "stereo_two_speakers.wav")
    assert upload.status_code == 200
    a, b = spans(events, 0), spans(events, 1)
    assert len(a) == 1 and len(b) == 1
    assert a[0][0] < 1.5 < b[0][0]
    assert {e.data["channel"] for e in events if e.event in ("active", "inactive")} == {0, 1}


async def test_put_works_like_post(server: Server) -> None:
    upload, events = await run_session(server, DATA / "speech.flac", method="PUT")
    assert upload.status_code == 200
    assert len(finals(events)) == 3


async def test_simple_mode_sends_every_sample(server: Server) -> None:
    upload, events = await run_session(server, DATA / "speech.wav", {"mode": "simple"})
    assert upload.status_code == 200
    segs = finals(events)
    total = sum(s["count"] for s in segs)
    # audio_seconds is rounded to the millisecond in the summary.
    assert total == pytest.approx(upload.json()["audio_seconds"] * 16000, abs=8)
    assert [s["start_time"] for s in segs] == sorted(s["start_time"] for s in segs)


async def test_interim_results(server: Server) -> None:
    # At 4x real time (0.512 s of audio every 0.128 s): over a fast upload an utterance's final
    # follows its interims within milliseconds and replaces them in the model's queue.
    upload, events = await run_session(
        server, DATA / "speech.wav", {"interim_results": True}, pause_s=0.128
    )
    assert upload.status_code == 200
    interims = [e.data for e in events if e.event == "segment" and not e.data["is_final"]]
    assert interims, "speech over 0.5 s should give at least one interim result"
    assert len(finals(events)) == 3
    # An interim never follows the final of its utterance.
    for i, e in enumerate(events):
        if e.event == "segment" and e.data["is_final"]:
            later = [
                x.data for x in events[i + 1 :] if x.event == "segment" and not x.data["is_final"]
            ]
            assert all(x["start_time"] > e.data["start_time"] for x in later)


async def test_second_upload_to_a_session_conflicts(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()
        first = await client.post(created["audio_url"], content=chunks(DATA / "speech.wav"))
        assert first.status_code == 200
        again = await client.post(created["audio_url"], content=b"RIFF")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "session_ended"


@pytest.fixture(scope="module")
def ffmpeg_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import start_server, stop_server

    s = start_server(tmp_path_factory.mktemp("ffmpeg"), env={"STREAMER_OPUS_DECODER": "ffmpeg"})
    yield s
    stop_server(s)


@pytest.mark.parametrize("name", ["speech.webm", "speech.ogg"])
async def test_opus_gives_the_same_segments_through_libopus_and_through_ffmpeg(
    server: Server, ffmpeg_server: Server, name: str
) -> None:
    # The default server demuxes WebM/Ogg itself and decodes with libopus in its shared decode
    # thread; the other uses PyAV in a thread per session. Two decoders, one speech.
    ours, ours_events = await run_session(server, DATA / name)
    theirs, theirs_events = await run_session(ffmpeg_server, DATA / name)
    for upload in (ours, theirs):
        assert upload.status_code == 200, upload.text
    a, b = ours.json(), theirs.json()
    assert (a["container"], a["codec"], a["channels"]) == (b["container"], b["codec"], 1)
    assert a["audio_seconds"] == pytest.approx(b["audio_seconds"], abs=0.01)
    ours_spans, theirs_spans = spans(ours_events), spans(theirs_events)
    assert len(ours_spans) == len(theirs_spans) == 3
    for (s1, e1), (s2, e2) in zip(ours_spans, theirs_spans, strict=True):
        assert s1 == pytest.approx(s2, abs=0.033) and e1 == pytest.approx(e2, abs=0.033)
