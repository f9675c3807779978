"""Cross-session batching: same probabilities as stream-by-stream, real batching under load,
failures confined to their batch, no hang without the loop."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from service.vad.batcher import VadBatcher, VadInferenceError, run_requests
from service.vad.silero import FRAME, VadStream, load_session, step

Clip = npt.NDArray[np.float32]


def clips_from(speech: Clip, n: int, frames: int) -> list[Clip]:
    """n clips of real speech at different offsets, each (frames, FRAME)."""
    audio = speech[0]
    out = []
    for i in range(n):
        offset = (i * 3001) % (len(audio) - frames * FRAME)
        out.append(audio[offset : offset + frames * FRAME].reshape(frames, FRAME).copy())
    return out


def one_by_one(session: ort.InferenceSession, clips: Sequence[Clip]) -> list[np.ndarray]:
    """The reference: each stream alone, batch size 1."""
    out = []
    for clip in clips:
        stream = VadStream()
        out.append(np.array([step(session, [stream], f[None])[0] for f in clip]))
    return out


def split(clip: Clip, rng: random.Random) -> list[Clip]:
    """Cut a clip into consecutive pieces of 0..9 frames (empty pieces included)."""
    pieces, t = [], 0
    while t < len(clip):
        k = rng.randint(0, 9)
        pieces.append(clip[t : t + k])
        t += k
    return pieces


class RecordingSession:
    """Wraps the real session, recording batch sizes; can be told to fail or to block."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.sizes: list[int] = []
        self.fail = False
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("model exploded")
        self.sizes.append(int(np.prod(feeds["input"].shape[:-1])))  # frames in this call
        return self.session.run(names, feeds)

    def get_inputs(self) -> Any:
        return self.session.get_inputs()


def test_infer_sync_equals_one_by_one(onnx_session: ort.InferenceSession, speech: Clip) -> None:
    lengths = [0, 1, 5, 17, 40, 40, 3] + [25] * 13  # 20 streams, ragged, some empty
    clips = clips_from(speech, 20, 40)
    clips = [c[:k] for c, k in zip(clips, lengths, strict=True)]
    expected = one_by_one(onnx_session, clips)
    for max_batch in (1, 4, 64):
        batcher = VadBatcher(onnx_session, max_batch=max_batch, limiter=anyio.CapacityLimiter(1))
        streams = [VadStream() for _ in clips]
        # Two calls in a row: the state must carry over from one call to the next.
        first = batcher.infer_sync([(s, c[:2]) for s, c in zip(streams, clips, strict=True)])
        rest = batcher.infer_sync([(s, c[2:]) for s, c in zip(streams, clips, strict=True)])
        for e, a, b in zip(expected, first, rest, strict=True):
            np.testing.assert_allclose(np.concatenate([a, b]), e, rtol=0, atol=1e-6)
    assert max(e.max() for e in expected if len(e)) > 0.9


def test_streams_keep_their_own_state_not_views_of_a_batch(
    onnx_session: ort.InferenceSession, speech: Clip
) -> None:
    # A stream waiting for audio keeps its state and context until its next batch: views into
    # the batch's arrays would keep a whole batch's worth alive for each idle stream.
    batcher = VadBatcher(onnx_session, max_batch=64, limiter=anyio.CapacityLimiter(1))
    streams = [VadStream() for _ in range(5)]
    batcher.infer_sync(list(zip(streams, clips_from(speech, 5, 3), strict=True)))
    for stream in streams:
        assert stream.state.base is None and stream.context.base is None
        assert stream.state.shape == (2, 1, 128) and stream.context.shape == (64,)


def test_reference_steps_take_the_streams_that_still_have_frames() -> None:
    recording = RecordingSession(load_session(graph="reference"))
    frames = [np.zeros((k, FRAME), np.float32) for k in (3, 1, 2, 7, 7)]
    groups = [
        [(VadStream(), frames[0]), (VadStream(), frames[1])],
        [(VadStream(), f) for f in frames[2:]],
    ]
    out = run_requests(recording, groups, max_batch=2)
    assert [[len(p) for p in g] for g in out] == [[3, 1], [2, 7, 7]]
    # One run per step over every stream that still has a frame.
    assert recording.sizes == [5, 4, 3, 2, 2, 2, 2]


def test_dense_calls_take_all_frames_of_several_streams(onnx_session: ort.InferenceSession) -> None:
    """The dense graph runs every frame of a stream in one call: calls hold at most max_batch
    frames (padding included), streams of similar length together, one stream at least."""
    recording = RecordingSession(onnx_session)
    counts = (3, 1, 2, 7, 7, 16, 8, 8)
    streams = [VadStream() for _ in counts]
    frames = [np.zeros((k, FRAME), np.float32) for k in counts]
    out = run_requests(recording, [list(zip(streams, frames, strict=True))], max_batch=16)
    assert [len(p) for p in out[0]] == list(counts)
    # Longest first: 16 alone; 8+8 (16 frames); 7+7 (14); 3+2 padded to 3 (6); then 1.
    assert recording.sizes == [16, 16, 14, 6, 1]


def test_bad_requests_are_rejected(onnx_session: ort.InferenceSession) -> None:
    batcher = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    stream = VadStream()
    with pytest.raises(ValueError):
        batcher.infer_sync([(stream, np.zeros((2, 100), np.float32))])
    with pytest.raises(ValueError):
        batcher.infer_sync([(stream, np.zeros((1, FRAME), np.float32))] * 2)
    with pytest.raises(ValueError):
        VadBatcher(onnx_session, max_batch=0, limiter=anyio.CapacityLimiter(1))


@pytest.mark.anyio
async def test_concurrent_sessions_are_batched_and_match_sync(
    onnx_session: ort.InferenceSession, speech: Clip
) -> None:
    """30 sessions of 2 channels feeding ragged pieces concurrently through the running loop."""
    rng = random.Random(7)
    sessions = [clips_from(speech, 2, 50 + i) for i in range(30)]
    for i, chans in enumerate(sessions):
        for j in range(len(chans)):
            chans[j] = np.roll(chans[j], i + j, axis=0)  # every stream different
    recording = RecordingSession(onnx_session)
    batcher = VadBatcher(recording, max_batch=16, limiter=anyio.CapacityLimiter(1))
    got: dict[int, list[list[np.ndarray]]] = {}
    calls = 0

    async def session(i: int) -> None:
        nonlocal calls
        streams = [VadStream() for _ in sessions[i]]
        cuts = split(sessions[i][0], rng)  # both channels cut alike, as the stage does
        results: list[list[np.ndarray]] = [[] for _ in streams]
        t = 0
        for piece in cuts:
            k = len(piece)
            probs = await batcher.infer(
                [(s, c[t : t + k]) for s, c in zip(streams, sessions[i], strict=True)]
            )
            calls += 1
            for r, p in zip(results, probs, strict=True):
                r.append(p)
            t += k
            await anyio.sleep(rng.random() * 0.002)
        got[i] = results

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            async with anyio.create_task_group() as sessions_tg:
                for i in range(len(sessions)):
                    sessions_tg.start_soon(session, i)
            tg.cancel_scope.cancel()

    reference = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    for i, chans in enumerate(sessions):
        expected = reference.infer_sync([(VadStream(), c) for c in chans])
        for e, pieces in zip(expected, got[i], strict=True):
            np.testing.assert_allclose(np.concatenate(pieces), e, rtol=0, atol=1e-6)
    assert batcher.batches < calls / 3, "requests were not batched across sessions"
    assert max(recording.sizes) > 2
    assert max(recording.sizes) <= 16
    assert not batcher.running


@pytest.mark.anyio
async def test_infer_without_the_loop_does_not_hang(
    onnx_session: ort.InferenceSession, speech: Clip
) -> None:
    batcher = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    clip = clips_from(speech, 1, 30)[0]
    with anyio.fail_after(10):
        probs = await batcher.infer([(VadStream(), clip)])
        empty = await batcher.infer([(VadStream(), clip[:0])])
    np.testing.assert_allclose(probs[0], one_by_one(onnx_session, [clip])[0], atol=1e-6)
    assert len(empty[0]) == 0
    recording = RecordingSession(onnx_session)
    recording.fail = True
    failing = VadBatcher(recording, limiter=anyio.CapacityLimiter(1))
    with anyio.fail_after(10), pytest.raises(VadInferenceError):
        await failing.infer([(VadStream(), clip)])


@pytest.mark.anyio
async def test_a_model_error_fails_only_its_batch(onnx_session: ort.InferenceSession) -> None:
    recording = RecordingSession(onnx_session)
    batcher = VadBatcher(recording, limiter=anyio.CapacityLimiter(1))
    frames = np.zeros((3, FRAME), np.float32)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            await anyio.wait_all_tasks_blocked()
            assert batcher.running
            recording.fail = True
            stream = VadStream()
            with pytest.raises(VadInferenceError) as info:
                await batcher.infer([(stream, frames)])
            assert isinstance(info.value.__cause__, RuntimeError)
            assert not stream.state.any()  # a failed batch leaves its streams untouched
            recording.fail = False
            probs = await batcher.infer([(stream, frames)])
            assert len(probs[0]) == 3 and batcher.running
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_requests_wait_for_a_free_thread_and_cancelled_ones_are_dropped(
    onnx_session: ort.InferenceSession,
) -> None:
    recording = RecordingSession(onnx_session)
    recording.gate = threading.Event()
    batcher = VadBatcher(recording, limiter=anyio.CapacityLimiter(1))
    frames = np.zeros((1, FRAME), np.float32)
    results: list[int] = []
    three_done = anyio.Event()

    async def call(stream: VadStream) -> None:
        results.append(len((await batcher.infer([(stream, frames)]))[0]))
        if len(results) == 3:
            three_done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            tg.start_soon(call, VadStream())  # goes to the thread and blocks there
            await anyio.to_thread.run_sync(recording.entered.wait, 5)
            with anyio.CancelScope() as doomed:
                doomed.cancel()  # cancelled while its request waits for the busy thread
                await call(VadStream())
            tg.start_soon(call, VadStream())
            tg.start_soon(call, VadStream())
            await anyio.wait_all_tasks_blocked()
            assert batcher.batches == 0
            recording.gate.set()
            await three_done.wait()
            tg.cancel_scope.cancel()
    # The first batch, then the two waiting requests together; the cancelled one never ran.
    assert recording.sizes == [1, 2]
    assert batcher.batches == 2


@pytest.mark.anyio
async def test_max_wait_gathers_requests_that_arrive_soon_after(
    onnx_session: ort.InferenceSession,
) -> None:
    recording = RecordingSession(onnx_session)
    batcher = VadBatcher(recording, max_wait_s=0.5, limiter=anyio.CapacityLimiter(1))
    frames = np.zeros((1, FRAME), np.float32)

    async def call(delay: float) -> None:
        await anyio.sleep(delay)
        await batcher.infer([(VadStream(), frames)])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            async with anyio.create_task_group() as callers:
                callers.start_soon(call, 0.0)
                callers.start_soon(call, 0.05)
            tg.cancel_scope.cancel()
    assert recording.sizes == [2]


@pytest.mark.anyio
async def test_stopping_the_loop_fails_pending_requests(
    onnx_session: ort.InferenceSession,
) -> None:
    batcher = VadBatcher(onnx_session, max_wait_s=5.0, limiter=anyio.CapacityLimiter(1))
    frames = np.zeros((1, FRAME), np.float32)
    loop_scope = anyio.CancelScope()

    async def loop() -> None:
        with loop_scope:
            await batcher.run()

    async def stop_soon() -> None:
        await anyio.sleep(0.05)
        loop_scope.cancel()  # the loop stops while the request waits for more work

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(stop_soon)
            with pytest.raises(VadInferenceError):
                await batcher.infer([(VadStream(), frames)])
    assert not batcher.running


@pytest.mark.anyio
async def test_a_raising_callback_does_not_stop_the_batcher(
    onnx_session: ort.InferenceSession,
) -> None:
    """``submit`` callbacks run in the batcher's task: one caller's bug must not end batching
    for every session."""
    batcher = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    frames = np.zeros((2, FRAME), np.float32)

    def explode(result: Any, error: BaseException | None) -> None:
        raise RuntimeError("a bug in a caller")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            await anyio.wait_all_tasks_blocked()
            batcher.submit([(VadStream(), frames)], explode)
            probs = await batcher.infer([(VadStream(), frames)])
            assert len(probs[0]) == 2 and batcher.running
            tg.cancel_scope.cancel()


def test_submit_needs_the_running_loop(onnx_session: ort.InferenceSession) -> None:
    batcher = VadBatcher(onnx_session, limiter=anyio.CapacityLimiter(1))
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit([(VadStream(), np.zeros((1, FRAME), np.float32))], lambda r, e: None)
