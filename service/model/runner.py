"""The model stage: speech boundaries become events, speech audio goes to the model in threads.

Final results of a channel are emitted in utterance order even though several model calls run at
once; an interim result that would arrive after its utterance's final (or after a newer interim)
is stale and dropped; while an interim call is in flight the next interim tick is skipped, so a
slow model never builds a backlog of partials.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from service.audio.chunk import Samples
from service.errors import ErrorCode
from service.events.types import Active, Error, Event, Inactive, Segment, seconds
from service.model.base import Model, ModelError
from service.model.output import to_session_time
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

Emit = Callable[[Event, float | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ModelCall:
    """What the model is asked, for observers (metrics, traces)."""

    channel: int
    start: int
    end: int
    is_final: bool


class ModelObserver:
    """Hooks for metrics and tracing; the default does nothing."""

    def call_started(self, call: ModelCall, queued_s: float) -> None:
        pass

    def call_finished(self, call: ModelCall, seconds_taken: float, error: str | None) -> None:
        pass

    def infer_wrapper(
        self, call: ModelCall, fn: Callable[[Samples], Mapping[str, Any]]
    ) -> Callable[[Samples], Mapping[str, Any]]:
        """Wrap the blocking call (runs in the worker thread), e.g. to open a span there."""
        return fn


@dataclass
class ModelSummary:
    finals: int = 0
    interims: int = 0
    interims_skipped: int = 0
    failures: int = 0
    panics: int = 0


@dataclass
class _Channel:
    last_final_emitted: int = -1
    interim_in_flight: bool = False
    last_interim_end: int = -1
    final_done: dict[int, anyio.Event] = field(default_factory=dict)


class ModelRunner:
    """Shared by every session: the model, the thread limiter and the observer."""

    def __init__(
        self,
        model: Model,
        limiter: anyio.CapacityLimiter,
        *,
        max_in_flight_per_session: int = 4,
        observer: ModelObserver | None = None,
    ) -> None:
        self.model = model
        self.limiter = limiter
        self.max_in_flight = max_in_flight_per_session
        self.observer = observer or ModelObserver()

    async def infer(self, call: ModelCall, audio: Samples) -> Mapping[str, Any]:
        queued = time.monotonic()
        fn = self.observer.infer_wrapper(call, self.model.infer)
        observer = self.observer

        def work(samples: Samples) -> Mapping[str, Any]:
            # Runs in the worker thread: the wait before it is queueing for a model slot.
            t0 = time.monotonic()
            observer.call_started(call, t0 - queued)
            error: str | None = None
            try:
                return fn(samples)
            except ModelError:
                error = ErrorCode.MODEL_FAILED.value
                raise
            except Exception:
                error = ErrorCode.MODEL_PANIC.value
                raise
            finally:
                observer.call_finished(call, time.monotonic() - t0, error)

        return await anyio.to_thread.run_sync(work, audio, limiter=self.limiter)

    async def run_stage(
        self, receive: MemoryObjectReceiveStream[VadOutput], emit: Emit
    ) -> ModelSummary:
        summary = ModelSummary()
        channels: dict[int, _Channel] = {}
        slots = anyio.Semaphore(self.max_in_flight)
        async with receive, anyio.create_task_group() as tg:
            async for item in receive:
                ch = channels.setdefault(item.channel, _Channel())
                if isinstance(item, SpeechStarted):
                    await emit(Active(item.channel, seconds(item.start)), item.received_at)
                elif isinstance(item, SpeechEnded):
                    await emit(Inactive(item.channel, seconds(item.end)), item.received_at)
                elif item.is_final:
                    ch.final_done[item.utterance] = anyio.Event()
                    # Backpressure: wait for a slot before reading more input.
                    await slots.acquire()
                    tg.start_soon(self._final, item, ch, slots, emit, summary)
                else:
                    self._interim(tg, item, ch, emit, summary)
        return summary

    async def _final(
        self,
        item: SpeechAudio,
        ch: _Channel,
        slots: anyio.Semaphore,
        emit: Emit,
        summary: ModelSummary,
    ) -> None:
        try:
            event = await self._call(item, summary)
        finally:
            slots.release()
        # Keep finals of a channel in utterance order.
        previous = ch.final_done.get(item.utterance - 1)
        if previous is not None:
            await previous.wait()
        await emit(event, item.received_at)
        ch.last_final_emitted = max(ch.last_final_emitted, item.utterance)
        ch.final_done.pop(item.utterance - 1, None)
        ch.final_done[item.utterance].set()
        if isinstance(event, Segment):
            summary.finals += 1

    def _interim(
        self, tg: TaskGroup, item: SpeechAudio, ch: _Channel, emit: Emit, summary: ModelSummary
    ) -> None:
        if ch.interim_in_flight:
            summary.interims_skipped += 1
            return
        ch.interim_in_flight = True

        async def run() -> None:
            try:
                event = await self._call(item, summary)
            finally:
                ch.interim_in_flight = False
            stale = ch.last_final_emitted >= item.utterance or ch.last_interim_end >= item.end
            if not stale:
                ch.last_interim_end = item.end
                await emit(event, item.received_at)
                if isinstance(event, Segment):
                    summary.interims += 1

        tg.start_soon(run)

    async def _call(self, item: SpeechAudio, summary: ModelSummary) -> Event:
        call = ModelCall(item.channel, item.start, item.end, item.is_final)
        start, end = seconds(item.start), seconds(item.end)
        try:
            output = await self.infer(call, item.audio)
        except ModelError as exc:
            summary.failures += 1
            return Error(
                ErrorCode.MODEL_FAILED.value, f"model failed: {exc}", item.channel, start, end
            )
        except Exception as exc:
            summary.panics += 1
            return Error(
                ErrorCode.MODEL_PANIC.value,
                f"model crashed ({type(exc).__name__}); the session continues",
                item.channel,
                start,
                end,
            )
        return Segment(item.channel, start, end, item.is_final, to_session_time(output, start))
