"""The VAD stage end to end: real speech, chunking invariance, the tail, interims, closing."""

from __future__ import annotations

import itertools
import random
import threading

import anyio
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.audio.chunk import AudioChunk
from service.config import VadParams
from service.vad.batcher import VadBatcher, VadInferenceError
from service.vad.segmenter import FEW_FRAMES
from service.vad.silero import FRAME
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput
from service.vad.stage import VadStage, VadSummary, vad_stage
from tests.vad.vad_helpers import ScriptedBatcher, check_protocol, chunks_of, finals, run_stage

Audio = npt.NDArray[np.float32]
RATE = 16_000


def boundaries(outputs: list[VadOutput], channel: int = 0) -> list[tuple[int, int]]:
    return [(f.start, f.end) for f in finals(outputs, channel)]


def every(n: int, length: int) -> list[int]:
    return list(range(n, length, n))


@pytest.mark.anyio
async def test_real_speech_gives_three_utterances(speech: Audio, batcher: VadBatcher) -> None:
    outputs, summary = await run_stage(chunks_of(speech, every(4000, speech.shape[1])), batcher)
    check_protocol(outputs)
    spans = boundaries(outputs)
    assert len(spans) == 3, spans
    for (start, end), f in zip(spans, finals(outputs), strict=True):
        assert 0.5 * RATE < end - start < 3.5 * RATE  # a sentence, not a blip or the whole file
        np.testing.assert_array_equal(f.audio, speech[0, start:end])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start - end > 0.5 * RATE  # the ~1.5 s pauses separate them
    # Speech is loud and silence is quiet: the utterances hold most of the signal's energy.
    energy = float(np.sum(speech[0] ** 2))
    inside = sum(float(np.sum(speech[0, a:b] ** 2)) for a, b in spans)
    assert inside > 0.95 * energy
    assert summary == VadSummary(
        frames=-(-speech.shape[1] // FRAME),
        utterances=(3,),
        speech_seconds=sum(b - a for a, b in spans) / RATE,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["noise", "silence"])
async def test_no_speech_in_noise_or_silence(
    name: str, request: pytest.FixtureRequest, batcher: VadBatcher
) -> None:
    audio = request.getfixturevalue(name)
    outputs, summary = await run_stage(chunks_of(audio, every(3200, audio.shape[1])), batcher)
    assert outputs == []
    assert summary.utterances == (0,) and summary.speech_seconds == 0.0


@pytest.mark.anyio
async def test_empty_input_closes_the_output(batcher: VadBatcher) -> None:
    outputs, summary = await run_stage([], batcher)
    assert outputs == [] and summary == VadSummary(0, (), 0.0)


@pytest.fixture(scope="module")
def reference(speech: Audio, onnx_session: ort.InferenceSession) -> list[tuple[int, int]]:
    batcher = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    outputs, _ = anyio.run(run_stage, [AudioChunk(speech, 0, 0.0)], batcher)
    return boundaries(outputs)


@pytest.mark.anyio
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_any_chunking_gives_the_same_utterances(
    data: st.DataObject,
    speech: Audio,
    onnx_session: ort.InferenceSession,
    reference: list[tuple[int, int]],
) -> None:
    n = speech.shape[1]
    cuts = data.draw(
        st.one_of(
            st.lists(st.integers(1, n - 1), max_size=40),  # anywhere, any size
            st.integers(1, 3000).map(lambda size: every(size, n)),  # regular, tiny to large
        )
    )
    batcher = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            outputs, _ = await run_stage(chunks_of(speech, cuts), batcher)
            tg.cancel_scope.cancel()
    check_protocol(outputs)
    assert boundaries(outputs) == reference
    for f in finals(outputs):
        np.testing.assert_array_equal(f.audio, speech[0, f.start : f.end])


@pytest.mark.anyio
async def test_the_tail_is_never_dropped(speech: Audio, batcher: VadBatcher) -> None:
    """Audio that stops mid-utterance, not on a frame boundary: the last utterance ends at the
    very last sample and carries it."""
    full, _ = await run_stage([AudioChunk(speech, 0, 0.0)], batcher)
    start, end = boundaries(full)[-1]
    cut = (start + end) // 2 // FRAME * FRAME + 333
    audio = speech[:, :cut]
    outputs, summary = await run_stage(chunks_of(audio, every(1000, cut)), batcher)
    last = finals(outputs)[-1]
    assert (last.start, last.end) == (start, cut)
    np.testing.assert_array_equal(last.audio, audio[0, start:cut])
    assert summary.frames == cut // FRAME + 1
    ended = [o for o in outputs if isinstance(o, SpeechEnded)]
    assert ended[-1].end == cut


@pytest.mark.anyio
async def test_interims_every_interval_of_audio(speech: Audio, batcher: VadBatcher) -> None:
    outputs, _ = await run_stage(
        chunks_of(speech, every(5000, speech.shape[1])), batcher, interim_interval_s=0.5
    )
    check_protocol(outputs)
    interims = [o for o in outputs if isinstance(o, SpeechAudio) and not o.is_final]
    assert interims
    last_emission: dict[int, int] = {}
    position = 0
    for o in outputs:
        if isinstance(o, SpeechStarted):
            last_emission = {o.utterance: -1}
        elif isinstance(o, SpeechAudio) and not o.is_final:
            np.testing.assert_array_equal(o.audio, speech[0, o.start : o.end])
            previous = last_emission[o.utterance]
            if previous >= 0:
                # 0.5 s of audio since the last interim, at frame granularity.
                assert 8000 <= o.end - previous < 8000 + FRAME
            last_emission[o.utterance] = o.end
            assert o.end >= position
            position = o.end
    # Without the option, no interims at all.
    plain, _ = await run_stage(chunks_of(speech, every(5000, speech.shape[1])), batcher)
    assert all(o.is_final for o in plain if isinstance(o, SpeechAudio))
    assert boundaries(plain) == boundaries(outputs)


@pytest.mark.anyio
async def test_channels_are_independent_and_batched_together(
    speech: Audio, batcher: VadBatcher
) -> None:
    mono, _ = await run_stage([AudioChunk(speech, 0, 0.0)], batcher)
    quiet = np.zeros_like(speech[0])
    stereo = np.stack([quiet, speech[0], speech[0] * 0.9])
    outputs, summary = await run_stage(chunks_of(stereo, every(2048, stereo.shape[1])), batcher)
    check_protocol(outputs)
    assert boundaries(outputs, 0) == []
    assert boundaries(outputs, 1) == boundaries(mono)
    assert len(boundaries(outputs, 2)) == 3
    assert summary.utterances == (0, 3, 3)
    assert summary.frames == 3 * -(-speech.shape[1] // FRAME)


def scripted(speech_frames: range) -> ScriptedBatcher:
    return ScriptedBatcher(lambda _stream, t: 0.9 if t in speech_frames else 0.1)


@pytest.mark.anyio
async def test_received_at_is_that_of_the_chunk_that_produced_each_output() -> None:
    """Scripted probabilities, chunks of 3 frames with received_at = chunk index."""
    batcher = scripted(range(30, 60))
    audio = np.zeros((1, 90 * FRAME), np.float32)
    outputs, _ = await run_stage(
        chunks_of(audio, every(3 * FRAME, audio.shape[1])), batcher, interim_interval_s=0.25
    )
    check_protocol(outputs)
    kinds = [(type(o).__name__, getattr(o, "is_final", None), o.received_at) for o in outputs]
    # Confirmed on frame 33 (chunk 11); interims every 8 frames (8 * 512 samples first reach
    # 0.25 s = 4000), through the redemption silence too, as the utterance is still open; ended
    # on frame 78 (chunk 26).
    assert kinds[0] == ("SpeechStarted", None, 11.0)
    assert [k[2] for k in kinds if k[1] is False] == [13.0, 16.0, 19.0, 21.0, 24.0]
    assert kinds[-2:] == [("SpeechEnded", None, 26.0), ("SpeechAudio", True, 26.0)]
    # One batcher call per chunk, all channels in it.
    assert len(batcher.calls) == 30 and all(c == [3] for c in batcher.calls)


@pytest.mark.anyio
async def test_outputs_of_a_padded_tail_carry_the_last_chunk_received_at() -> None:
    batcher = scripted(range(30, 1000))
    audio = np.zeros((2, 40 * FRAME + 7), np.float32)
    outputs, summary = await run_stage(chunks_of(audio, [FRAME * 20]), batcher)
    assert [(type(o).__name__, o.channel, o.received_at) for o in outputs[-4:]] == [
        ("SpeechEnded", 0, 1.0),
        ("SpeechAudio", 0, 1.0),
        ("SpeechEnded", 1, 1.0),
        ("SpeechAudio", 1, 1.0),
    ]
    assert [f.end for f in finals(outputs, 0) + finals(outputs, 1)] == [40 * FRAME + 7] * 2
    assert batcher.calls[-1] == [1, 1]  # the zero-padded tail frame, both channels at once
    assert summary.frames == 2 * 41


@pytest.mark.anyio
async def test_a_model_failure_propagates_and_still_closes_the_output(speech: Audio) -> None:
    class Failing(ScriptedBatcher):
        async def infer(self, requests):  # type: ignore[no-untyped-def]
            raise VadInferenceError("boom")

    chunk_send, chunk_recv = anyio.create_memory_object_stream[AudioChunk](1)
    out_send, out_recv = anyio.create_memory_object_stream[VadOutput](1)
    with anyio.fail_after(10):
        await chunk_send.send(AudioChunk(speech[:, :4000], 0, 0.0))
        chunk_send.close()
        with pytest.raises(VadInferenceError):
            await vad_stage(
                chunk_recv,
                out_send,
                batcher=Failing(lambda s, t: 0.0),
                params=VadParams(),
                interim_interval_s=None,
            )
        assert [o async for o in out_recv] == []  # closed: iteration ends


@pytest.mark.anyio
async def test_inconsistent_chunks_are_rejected() -> None:
    for chunks in (
        [
            AudioChunk(np.zeros((1, 600), np.float32), 0, 0.0),
            AudioChunk(np.zeros((2, 10), np.float32), 600, 0.0),
        ],
        [
            AudioChunk(np.zeros((1, 600), np.float32), 0, 0.0),
            AudioChunk(np.zeros((1, 10), np.float32), 601, 0.0),
        ],
    ):
        with pytest.raises(ExceptionGroup) as info:
            await run_stage(chunks, scripted(range(0)))
        assert info.group_contains(ValueError)


@pytest.mark.anyio
async def test_many_sessions_through_the_running_batcher_match_one_alone(
    speech: Audio, onnx_session: ort.InferenceSession
) -> None:
    alone, _ = await run_stage(
        [AudioChunk(speech, 0, 0.0)],
        VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1)),
    )
    batcher = VadBatcher(onnx_session, max_batch=8, limiter=anyio.CapacityLimiter(1))
    rng = random.Random(3)
    results: list[list[tuple[int, int]]] = []
    calls = 0

    async def session() -> None:
        nonlocal calls
        chunks = chunks_of(speech, every(rng.randint(300, 6000), speech.shape[1]))
        calls += len(chunks) + 1  # one infer per chunk, plus the padded tail
        outputs, _ = await run_stage(chunks, batcher)
        results.append(boundaries(outputs))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            async with anyio.create_task_group() as sessions:
                for _ in range(12):
                    sessions.start_soon(session)
            tg.cancel_scope.cancel()
    assert results == [boundaries(alone)] * 12
    assert batcher.batches < calls / 2  # sessions shared batches


@pytest.mark.anyio
async def test_chunks_sent_while_a_batch_runs_go_together_and_send_does_not_wait(
    speech: Audio, onnx_session: ort.InferenceSession
) -> None:
    """The decoder hands chunks to the stage without waiting for the model: while the session's
    batch is in the VAD thread, later chunks queue in the stage and go in ONE next request;
    the segments are those of the whole clip run alone."""
    from tests.vad.test_vad_batcher import RecordingSession

    alone, _ = await run_stage(
        [AudioChunk(speech, 0, 0.0)], VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    )
    recording = RecordingSession(onnx_session)
    batcher = VadBatcher(recording, max_batch=64, limiter=anyio.CapacityLimiter(1))
    chunks = chunks_of(speech, every(1600, speech.shape[1]))  # 100 ms each
    out_send, out_recv = anyio.create_memory_object_stream[VadOutput](1000)
    stage = VadStage(out_send, batcher=batcher, params=VadParams(), interim_interval_s=None)
    gate = recording.gate = threading.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            await anyio.wait_all_tasks_blocked()
            await stage.send(chunks[0])  # 3 frames: the first request; it blocks in the thread
            await anyio.to_thread.run_sync(recording.entered.wait)
            for chunk in chunks[1:6]:  # 500 ms more: queued, and no wait
                with anyio.fail_after(0.5):
                    await stage.send(chunk)
            assert stage._queued_frames == (6 * 1600) // FRAME - 3
            gate.set()
            async with stage:
                for chunk in chunks[6:]:
                    await stage.send(chunk)
            tg.cancel_scope.cancel()
    outputs = [o async for o in out_recv]
    assert boundaries(outputs) == boundaries(alone)
    check_protocol(outputs)
    assert batcher.batches < len(chunks)  # queued chunks went in fewer requests


@pytest.mark.anyio
async def test_send_waits_once_too_many_frames_are_queued(
    speech: Audio, onnx_session: ort.InferenceSession
) -> None:
    """Backpressure: a fast upload cannot queue more than ``max_queued_frames`` in the stage."""
    from tests.vad.test_vad_batcher import RecordingSession

    recording = RecordingSession(onnx_session)
    batcher = VadBatcher(recording, limiter=anyio.CapacityLimiter(1))
    out_send, _out_recv = anyio.create_memory_object_stream[VadOutput](1000)
    stage = VadStage(
        out_send,
        batcher=batcher,
        params=VadParams(),
        interim_interval_s=None,
        max_queued_frames=10,
    )
    recording.gate = threading.Event()
    chunks = chunks_of(speech, every(FRAME * 4, speech.shape[1]))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            await anyio.wait_all_tasks_blocked()
            for chunk in chunks[:3]:  # 4 in flight, then 8 queued
                await stage.send(chunk)
            with anyio.move_on_after(0.3) as scope:
                await stage.send(chunks[3])  # 12 queued > 10: waits for the batch
            assert scope.cancelled_caught
            recording.gate.set()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_failing_batch_fails_the_stage_that_submitted_it(
    speech: Audio, onnx_session: ort.InferenceSession
) -> None:
    from tests.vad.test_vad_batcher import RecordingSession

    recording = RecordingSession(onnx_session)
    recording.fail = True
    batcher = VadBatcher(recording, limiter=anyio.CapacityLimiter(1))
    out_send, out_recv = anyio.create_memory_object_stream[VadOutput](100)
    stage = VadStage(out_send, batcher=batcher, params=VadParams(), interim_interval_s=None)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            await anyio.wait_all_tasks_blocked()
            await stage.send(AudioChunk(speech[:, :4000], 0, 0.0))
            with pytest.raises(VadInferenceError):
                await stage.aclose()
            with pytest.raises(VadInferenceError):
                await stage.send(AudioChunk(speech[:, 4000:5000], 4000, 0.0))
            assert batcher.running  # the batcher itself goes on
            tg.cancel_scope.cancel()
    assert [o async for o in out_recv] == []


def _as_rows(outputs: list[VadOutput]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for o in outputs:
        if isinstance(o, SpeechAudio):
            rows.append((o.utterance, o.start, o.end, o.is_final, o.received_at, o.audio.tobytes()))
        else:
            rows.append((type(o).__name__, o.utterance, o.received_at))
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=st.lists(
        st.tuples(st.sampled_from([0.05, 0.35, 0.4, 0.5, 0.9]), st.integers(1, 40)),
        min_size=1,
        max_size=12,
    ),
    chunk_frames=st.sampled_from([1, 3, 4, 9, 16, 31, 64]),
    tail=st.integers(0, FRAME - 1),
    redemption=st.sampled_from([0, 100, 600]),
    max_segment=st.sampled_from([1000, 3000]),
    interim=st.sampled_from([None, 0.1, 0.25]),
)
def test_skipping_runs_of_frames_changes_no_output(
    runs: list[tuple[float, int]],
    chunk_frames: int,
    tail: int,
    redemption: int,
    max_segment: int,
    interim: float | None,
) -> None:
    """The stage takes a big batch's silence and steady speech with ``Segmenter.skip`` rather
    than frame by frame; every output (positions, audio, received_at, interims) must be exactly
    what pushing each frame gives. Probabilities 0.35 and 0.5 sit on the thresholds."""
    script = [p for p, n in runs for _ in range(n)]
    audio = (np.arange(len(script) * FRAME + tail) / 2**24).astype(np.float32)[None, :]
    params = VadParams(redemption_ms=redemption, max_segment_ms=max_segment, min_speech_ms=90)
    cuts = every(chunk_frames * FRAME, audio.shape[1])

    def run(skip_min: int, few_frames: int = FEW_FRAMES) -> list[VadOutput]:
        batcher = ScriptedBatcher(lambda _s, t: script[t] if t < len(script) else 0.05)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("service.vad.stage.SKIP_MIN_FRAMES", skip_min)
            mp.setattr("service.vad.segmenter.FEW_FRAMES", few_frames)
            outputs, _ = anyio.run(
                lambda: run_stage(chunks_of(audio, cuts), batcher, params, interim)
            )
        return outputs

    pushed = _as_rows(run(10**9))
    assert _as_rows(run(1)) == pushed  # every run skipped, however short (as shipped)
    assert _as_rows(run(8)) == pushed
    # Both ways of counting a skip: numpy for every run, and Python for every run.
    assert _as_rows(run(1, few_frames=0)) == pushed
    assert _as_rows(run(1, few_frames=10**9)) == pushed


@pytest.mark.anyio
async def test_a_flush_ends_open_utterances_where_the_audio_so_far_ends() -> None:
    """Finalize: requested at a position the stage has not reached yet, it is done once the
    audio up to there is segmented; the partial frame carried goes to what follows; channels
    with nothing open report None; after the end of input it is answered at once."""
    batcher = ScriptedBatcher(lambda stream, t: 0.9 if stream == 0 and t >= 10 else 0.1)
    send, receive = anyio.create_memory_object_stream[VadOutput](100)
    stage = VadStage(send, batcher=batcher, params=VadParams(), interim_interval_s=None)
    audio = np.zeros((2, 60 * FRAME + 100), np.float32)
    told: list[tuple[int | None, ...]] = []
    with anyio.fail_after(10):
        await stage.send(AudioChunk(audio[:, : 20 * FRAME], 0, 1.0))
        stage.request_flush(40 * FRAME + 100, told.append)
        assert told == []  # that audio has not arrived yet
        await stage.send(AudioChunk(audio[:, 20 * FRAME : 40 * FRAME + 100], 20 * FRAME, 2.0))
        assert told == [(40 * FRAME, None)]  # the 100 carried samples were not run yet
        await stage.send(AudioChunk(audio[:, 40 * FRAME + 100 :], 40 * FRAME + 100, 3.0))
        await stage.aclose()
        stage.request_flush(0, told.append)
    assert told[1] == (None, None)
    async with receive:
        outputs = [o async for o in receive]
    check_protocol(outputs)
    # The pre-speech pad reaches back to the first sample.
    assert boundaries(outputs) == [(0, 40 * FRAME), (40 * FRAME, 60 * FRAME + 100)]
    assert finals(outputs)[0].received_at == 2.0
    assert boundaries(outputs, 1) == []


@pytest.mark.anyio
async def test_a_flush_already_due_is_done_at_once() -> None:
    batcher = ScriptedBatcher(lambda _stream, t: 0.9 if t >= 10 else 0.1)
    send, receive = anyio.create_memory_object_stream[VadOutput](100)
    stage = VadStage(send, batcher=batcher, params=VadParams(), interim_interval_s=None)
    told: list[tuple[int | None, ...]] = []
    with anyio.fail_after(10):
        stage.request_flush(0, told.append)  # no audio yet: nothing to end
        await stage.send(AudioChunk(np.zeros((1, 30 * FRAME), np.float32), 0, 1.0))
        assert told == [()]  # no channel yet
        stage.request_flush(30 * FRAME, told.append)
        assert told[1] == (30 * FRAME,)
        await stage.aclose()
    async with receive:
        assert boundaries([o async for o in receive]) == [(0, 30 * FRAME)]


@pytest.mark.anyio
async def test_a_flush_of_one_channel_leaves_the_others_speaking() -> None:
    batcher = ScriptedBatcher(lambda _stream, t: 0.9 if t >= 10 else 0.1)
    send, receive = anyio.create_memory_object_stream[VadOutput](100)
    stage = VadStage(send, batcher=batcher, params=VadParams(), interim_interval_s=None)
    told: list[tuple[int | None, ...]] = []
    with anyio.fail_after(10):
        await stage.send(AudioChunk(np.zeros((2, 30 * FRAME), np.float32), 0, 1.0))
        stage.request_flush(30 * FRAME, told.append, channel=1)
        await stage.send(AudioChunk(np.zeros((2, 10 * FRAME), np.float32), 30 * FRAME, 2.0))
        await stage.aclose()
    assert told == [(None, 30 * FRAME)]
    async with receive:
        outputs = [o async for o in receive]
    assert boundaries(outputs, 0) == [(0, 40 * FRAME)]
    assert boundaries(outputs, 1) == [(0, 30 * FRAME), (30 * FRAME, 40 * FRAME)]


@pytest.mark.anyio
async def test_flushes_waiting_for_their_audio_are_bounded() -> None:
    """A client sending Finalize after Finalize while the pipeline lags: past eight waiting,
    each new one is merged into the last, which is due later and does its work too."""
    batcher = ScriptedBatcher(lambda _stream, t: 0.9 if t >= 10 else 0.1)
    send, receive = anyio.create_memory_object_stream[VadOutput](100)
    stage = VadStage(send, batcher=batcher, params=VadParams(), interim_interval_s=None)
    told: list[tuple[int | None, ...]] = []
    with anyio.fail_after(10):
        await stage.send(AudioChunk(np.zeros((1, 20 * FRAME), np.float32), 0, 1.0))
        for k in range(100):  # none due yet: audio up to frame 30 + k has not arrived
            stage.request_flush((30 + k) * FRAME, told.append)
        assert len(stage._flushes) == 8 and stage._flushes[-1].at == 129 * FRAME
        for t in range(20, 150):
            await stage.send(AudioChunk(np.zeros((1, FRAME), np.float32), t * FRAME, 2.0))
        await stage.aclose()
    assert len(told) == 8
    assert told[0] == (30 * FRAME,) and told[-1] == (129 * FRAME,)  # the merged one
    async with receive:
        outputs = [o async for o in receive]
    spans = boundaries(outputs)
    assert spans[0] == (0, 30 * FRAME) and spans[-1] == (129 * FRAME, 150 * FRAME)
    assert spans[-2][1] == 129 * FRAME  # the merged flush ended the utterance it was due in
