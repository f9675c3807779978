"""The model engine: batches across sessions, finals before interims, a bounded queue whose
overflow is reported (never lost silently), lateness, and a VAD path that never waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from service.audio.chunk import Samples
from service.events.types import Event
from service.model.base import ModelError
from service.model.engine import Job, ModelCall, ModelEngine
from service.model.runner import ModelRunner
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

pytestmark = pytest.mark.anyio


class SumModel:
    """Output depends only on the item (its length and sum), so batching cannot change it.
    Every call waits on ``gate`` (set by default), and records its batch."""

    def __init__(self, max_batch_size: int | None = 64, sleep_s: float = 0.0) -> None:
        if max_batch_size is not None:
            self.max_batch_size = max_batch_size
        self.sleep_s = sleep_s
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[int]] = []  # item lengths per call
        self.lock = threading.Lock()

    def _one(self, audio: Samples) -> Mapping[str, Any]:
        if len(audio) and audio[0] == -1:
            raise ModelError("bad item")
        return {"count": len(audio), "sum": round(float(np.sum(audio)), 3)}

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        return self._record([audio])[0]  # type: ignore[return-value]

    def infer_batch(self, audios: Sequence[Samples]) -> list[Mapping[str, Any] | ModelError]:
        return self._record(audios)

    def _record(self, audios: Sequence[Samples]) -> list[Mapping[str, Any] | ModelError]:
        self.gate.wait(10)
        with self.lock:
            self.batches.append([len(a) for a in audios])
        if self.sleep_s:
            time.sleep(self.sleep_s)
        out: list[Mapping[str, Any] | ModelError] = []
        for a in audios:
            try:
                out.append(self._one(a))
            except ModelError as exc:
                out.append(exc)
        return out


class InferOnly:
    """A model with only ``infer``: it must keep working unchanged."""

    def __init__(self) -> None:
        self.inner = SumModel()

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        result = self.inner._one(audio)
        with self.inner.lock:
            self.inner.batches.append([len(audio)])
        return result


def utterances(session: int, n: int, *, interims: bool = False) -> list[VadOutput]:
    """``n`` utterances of one channel, with audio that differs per session and utterance."""
    rng = np.random.default_rng(session)
    items: list[VadOutput] = []
    for u in range(n):
        start, end = u * 4000, u * 4000 + 1600 + 160 * u
        audio = rng.standard_normal(end - start).astype(np.float32)
        items.append(SpeechStarted(0, u, start, 0.0))
        if interims:
            items.append(SpeechAudio(0, u, start, start + 800, audio[:800], False, 0.0))
        items.append(SpeechEnded(0, u, end, 0.0))
        items.append(SpeechAudio(0, u, start, end, audio, True, 0.0))
    return items


async def run_sessions(
    runner: ModelRunner,
    sessions: list[list[VadOutput]],
    *,
    during: Callable[[list[list[Event]]], Awaitable[None]] | None = None,
    limit_s: float = 20,
) -> list[list[Event]]:
    """Feed every session's items through its own model stage, all at once."""
    out: list[list[Event]] = [[] for _ in sessions]

    async def one(i: int, items: list[VadOutput]) -> None:
        send, receive = anyio.create_memory_object_stream[VadOutput](16)

        async def emit(event: Event, received_at: float | None) -> None:
            out[i].append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run_stage, receive, emit)
            async with send:
                for item in items:
                    await send.send(item)

    with anyio.fail_after(limit_s):
        async with anyio.create_task_group() as engine_tg:
            engine_tg.start_soon(runner.run)
            async with anyio.create_task_group() as tg:
                for i, items in enumerate(sessions):
                    tg.start_soon(one, i, items)
                if during is not None:
                    await during(out)
            engine_tg.cancel_scope.cancel()
    return out


def dicts(events: list[Event]) -> list[dict[str, Any]]:
    return [e.to_dict() for e in events]


async def test_batched_results_equal_unbatched() -> None:
    sessions = [utterances(s, 5) for s in range(12)]
    batched_model = SumModel(sleep_s=0.02)
    batched = await run_sessions(ModelRunner(batched_model, anyio.CapacityLimiter(2)), sessions)
    single_model = SumModel(sleep_s=0.02)
    single = await run_sessions(
        ModelRunner(single_model, anyio.CapacityLimiter(2), max_batch=1), sessions
    )
    assert [dicts(s) for s in batched] == [dicts(s) for s in single]
    assert all(len(b) == 1 for b in single_model.batches)
    # Calls from several sessions really went in one batch.
    assert max(len(b) for b in batched_model.batches) > 1
    assert len(batched_model.batches) < len(single_model.batches)
    finals = [e for s in batched for e in dicts(s) if e["type"] == "segment"]
    assert len(finals) == 12 * 5


async def test_a_model_with_only_infer_works_unchanged() -> None:
    model = InferOnly()
    out = await run_sessions(ModelRunner(model, anyio.CapacityLimiter(4)), [utterances(1, 3)])
    reference = await run_sessions(
        ModelRunner(SumModel(), anyio.CapacityLimiter(4)), [utterances(1, 3)]
    )
    assert dicts(out[0]) == dicts(reference[0])
    assert all(len(b) == 1 for b in model.inner.batches)


async def test_batch_size_is_capped_by_the_model_and_the_setting() -> None:
    model = SumModel(max_batch_size=3)
    model.gate.clear()
    runner = ModelRunner(model, anyio.CapacityLimiter(1), max_batch=64)
    assert runner.engine.max_batch == 3
    assert ModelRunner(SumModel(max_batch_size=None), anyio.CapacityLimiter(1), max_batch=5)
    assert ModelRunner(SumModel(max_batch_size=100), anyio.CapacityLimiter(1), max_batch=5)

    async def release(out: list[list[Event]]) -> None:
        await anyio.sleep(0.2)
        model.gate.set()

    await run_sessions(runner, [utterances(s, 2) for s in range(5)], during=release)
    assert max(len(b) for b in model.batches) == 3
    assert sum(len(b) for b in model.batches) == 10


class _Owner:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.done: list[Job] = []
        self.lags: list[float] = []

    def job_done(self, job: Job) -> None:
        self.done.append(job)

    def lag_changed(self, seconds: float) -> None:
        self.lags.append(seconds)


def job(owner: _Owner, start: int, n: int, *, final: bool = True) -> Job:
    return Job(owner, ModelCall(0, start, start + n, final), np.ones(n, dtype=np.float32))


async def test_a_final_is_never_behind_interims() -> None:
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    engine = ModelEngine(model, anyio.CapacityLimiter(1), batch_wait_s=0)
    owners = [_Owner(r) for r in range(20)]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.lowlevel.checkpoint()
            assert engine.submit(job(owners[0], 0, 100))  # takes the one thread, blocked
            await anyio.sleep(0.05)
            for o in owners[1:]:
                assert engine.submit(job(o, 0, 200 + o.rank, final=False))
            assert engine.submit(job(owners[19], 0, 999))  # the youngest session's final
            model.gate.set()
            while engine.queued_finals or engine.queued_interims:
                await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    order = [b[0] for b in model.batches]
    assert order[:2] == [100, 999]  # the final went before all 19 interims queued earlier
    assert sorted(order[2:]) == sorted(200 + o.rank for o in owners[1:])


async def test_interims_of_a_channel_replace_each_other_in_the_queue() -> None:
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    engine = ModelEngine(model, anyio.CapacityLimiter(1), batch_wait_s=0)
    owner = _Owner(0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.lowlevel.checkpoint()
            engine.submit(job(_Owner(1), 0, 50))  # occupies the thread
            await anyio.sleep(0.05)
            for n in (100, 200, 300):
                engine.submit(job(owner, 0, n, final=False))
            assert engine.queued_interims == 1
            model.gate.set()
            while engine.queued_interims:
                await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert [b[0] for b in model.batches] == [50, 300]
    assert engine.stats.superseded == 2


async def test_full_queue_displaces_the_youngest_sessions_finals_with_an_error() -> None:
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    # Room for 1000 samples of queued audio.
    engine = ModelEngine(model, anyio.CapacityLimiter(1), batch_wait_s=0, max_queued_s=1000 / 16000)
    old, young, younger = _Owner(0), _Owner(5), _Owner(9)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.lowlevel.checkpoint()
            engine.submit(job(old, 0, 10))  # running, blocked: not queued
            await anyio.sleep(0.05)
            assert engine.submit(job(young, 0, 600))
            refused = job(younger, 0, 600)
            assert not engine.submit(refused)  # the youngest: it is the one refused
            assert refused.done and refused.error is not None
            assert refused.error[0] == "model_overloaded"
            # An older session's final displaces the younger one's queued final.
            assert engine.submit(job(old, 100, 600))
            assert [j.call.start for j in young.done] == [0]
            assert young.done[0].error is not None
            assert young.done[0].error[0] == "model_overloaded"
            assert engine.queued_samples == 600
            model.gate.set()
            while engine.queued_finals:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert engine.stats.refused == 2


async def test_overloaded_utterances_become_error_events_with_times_in_order() -> None:
    model = SumModel(max_batch_size=1, sleep_s=0.05)
    # Room for about one utterance: the rest of a fast burst does not fit.
    runner = ModelRunner(model, anyio.CapacityLimiter(1), max_queued_s=2000 / 16000)
    out = await run_sessions(runner, [utterances(3, 6)])
    finals = [e for e in dicts(out[0]) if e["type"] == "error" or (e["type"] == "segment")]
    assert len(finals) == 6  # every utterance accounted for, once
    starts = [e["start_time"] for e in finals]
    assert starts == sorted(starts)
    errors = [e for e in finals if e["type"] == "error"]
    assert errors, "the queue bound should have refused some utterances"
    for e in errors:
        assert e["code"] == "model_overloaded"
        assert e["end_time"] > e["start_time"]


async def test_boundary_events_flow_while_the_model_is_blocked() -> None:
    model = SumModel()
    model.gate.clear()
    runner = ModelRunner(model, anyio.CapacityLimiter(2))
    items = utterances(7, 30)  # many more utterances than threads or stream buffers

    async def check(out: list[list[Event]]) -> None:
        with anyio.fail_after(5):
            while sum(1 for e in out[0] if e.type == "inactive") < 30:
                await anyio.sleep(0.01)
        # Every active/inactive is out while no model call has returned.
        assert not any(e.type == "segment" for e in out[0])
        model.gate.set()

    out = await run_sessions(runner, [items], during=check)
    assert sum(1 for e in out[0] if e.type == "segment") == 30


async def test_a_late_session_is_told_and_told_again_when_it_catches_up() -> None:
    # Lateness is time queued for a thread: with one item per call, finals queue behind the
    # blocked one.
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    runner = ModelRunner(model, anyio.CapacityLimiter(1), late_s=0.3)

    async def release(out: list[list[Event]]) -> None:
        with anyio.fail_after(5):
            while not any(e.type == "lagging" for e in out[0]):
                await anyio.sleep(0.02)
        model.gate.set()

    out = await run_sessions(runner, [utterances(2, 3)], during=release)
    lagging = [e.to_dict()["seconds"] for e in out[0] if e.type == "lagging"]
    assert lagging[0] >= 0.3  # rounded to 0.1 s
    assert lagging[-1] == 0
    assert sum(1 for e in out[0] if e.type == "segment") == 3


async def test_wait_reads_the_oldest_queued_final() -> None:
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    engine = ModelEngine(model, anyio.CapacityLimiter(1), batch_wait_s=0)
    owner = _Owner(0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.lowlevel.checkpoint()
            engine.submit(job(owner, 0, 10))
            await anyio.sleep(0.02)
            engine.submit(job(owner, 10, 10))
            await anyio.sleep(0.3)
            assert engine.wait_s() >= 0.3
            model.gate.set()
            while engine.queued_finals:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


async def test_an_interim_dropped_for_its_final_does_not_hold_the_session_open() -> None:
    """Regression: an interim still queued when its utterance's final arrived was taken out
    of the engine's queue but stayed the channel's outstanding interim, so the stage waited
    for it forever and the upload never got its answer."""
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    runner = ModelRunner(model, anyio.CapacityLimiter(1), batch_wait_s=0)
    blocker = [SpeechAudio(0, 0, 0, 100, np.ones(100, np.float32), True, 0.0)]

    async def release(out: list[list[Event]]) -> None:
        await anyio.sleep(0.3)  # the interim is queued behind the blocker, then its final
        model.gate.set()

    out = await run_sessions(
        runner, [blocker, utterances(4, 2, interims=True)], during=release, limit_s=10
    )
    segments = [e for e in dicts(out[1]) if e["type"] == "segment"]
    assert [s["is_final"] for s in segments] == [True, True]
    assert runner.engine.stats.superseded >= 1


async def test_capacity_comes_from_a_probe_then_from_full_batches() -> None:
    model = SumModel(max_batch_size=4, sleep_s=0.1)
    engine = ModelEngine(model, anyio.CapacityLimiter(2), batch_wait_s=0.05)
    assert engine.load_with(10) is None  # unknown before the probe: the load gate stays open
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.probe()
            # A full batch of 1.5 s utterances on each thread at once.
            assert model.batches == [[24000] * 4] * 2
            assert engine.full_batch_s is not None and 0.1 <= engine.full_batch_s < 0.5
            # 2 threads x 4 per batch / ~0.1 s: ~80 utterances a second; 0.4 per session.
            capacity = engine.capacity_per_s()
            assert capacity is not None and 16 < capacity <= 80
            load = engine.load_with(100)
            assert load == pytest.approx(100 * 0.4 / capacity)
            # A full batch that took longer moves the estimate (a moving average).
            model.sleep_s = 0.4
            before = engine.full_batch_s
            owner = _Owner(0)
            for i in range(4):
                engine.submit(job(owner, i * 100, 100))
            while engine.stats.batches < 1:
                await anyio.sleep(0.02)
            await anyio.sleep(0.05)
            assert engine.full_batch_s > before
            tg.cancel_scope.cancel()


async def test_an_interim_pushed_out_of_a_full_queue_does_not_hold_its_session_open() -> None:
    """Regression: a queued interim dropped to make room for another session's final was
    marked done without telling its session, which waited for it forever."""
    model = SumModel(max_batch_size=1)
    model.gate.clear()
    # Room for ~0.15 s of queued audio: one interim, or one final, not both.
    runner = ModelRunner(model, anyio.CapacityLimiter(1), batch_wait_s=0, max_queued_s=0.15)
    blocker = [SpeechAudio(0, 0, 0, 100, np.ones(100, np.float32), True, 0.0)]
    audio = np.ones(2000, np.float32)
    talker = [
        SpeechStarted(0, 0, 0, 0.0),
        SpeechAudio(0, 0, 0, 2000, audio, False, 0.0),  # an interim, queued behind the blocker
    ]

    async def other_final(out: list[list[Event]]) -> None:
        await anyio.sleep(0.2)
        assert runner.engine.queued_interims == 1
        # Another session's final needs the room: interims go first.
        send, receive = anyio.create_memory_object_stream[VadOutput](1)
        send.send_nowait(SpeechAudio(0, 1, 200, 2200, audio, True, 0.0))
        send.close()
        sink: list[Event] = []

        async def emit(event: Event, received_at: float | None) -> None:
            sink.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run_stage, receive, emit)
            await anyio.sleep(0.1)
            assert runner.engine.queued_interims == 0
            model.gate.set()

    out = await run_sessions(runner, [blocker, talker], during=other_final, limit_s=10)
    assert [e.type for e in out[1]] == ["active"]  # ended, with its interim dropped
