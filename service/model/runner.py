"""The model stage of one session: speech boundaries become events at once, speech audio goes to
the shared :class:`~service.model.engine.ModelEngine`, and results come back in order.

The stage never waits for the model: ``active``/``inactive`` go out as the VAD finds them and
every utterance is queued in the engine, so the VAD path keeps the pace of the audio whatever
the model's backlog (the engine bounds that backlog, process-wide). Results are emitted by a
second task:

- finals in submission order (so in utterance order per channel), each as soon as it and every
  final before it are done; a final the engine could not run becomes a ``model_overloaded``
  error event with its times, in the same place;
- an interim when it is done, unless it is stale (its final, or a newer interim, was already
  emitted). A channel has at most one interim outstanding: a newer one replaces a queued one,
  one that arrives while a call for the channel runs is skipped, and one that arrives while
  a final of the channel is pending is dropped, as is a queued one when its final arrives
  (finals first);
- ``lagging`` when the session's oldest queued final has waited longer than the engine's
  ``late_s``, again when that changes a lot, and ``lagging {seconds: 0}`` once caught up.

In ``simple`` mode (one call at a time per session, audio accumulating meanwhile: see
``model/simple.py``) the stage takes the next item only when the previous call is done.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from service.audio.source import Doorbell
from service.config import MODEL_SAMPLE_RATE
from service.events.progress import LoggedProgress
from service.events.types import Active, Error, Event, Inactive, Lagging, Segment, seconds
from service.model.base import Model
from service.model.engine import Job, ModelCall, ModelEngine, ModelObserver
from service.model.output import to_session_time
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

__all__ = ["ModelCall", "ModelObserver", "ModelRunner", "ModelSummary"]

Emit = Callable[[Event, float | None], Awaitable[None]]

# A `lagging` event is sent again when the lag moved by this much (and this fraction) since the
# last one: often enough to show, rarely enough not to flood a slow client.
LAG_STEP_S = 1.0
LAG_STEP_RATIO = 0.5


@dataclass
class ModelSummary:
    finals: int = 0
    interims: int = 0
    interims_skipped: int = 0
    failures: int = 0
    panics: int = 0
    overloaded: int = 0


class ModelRunner:
    """Shared by every session: the engine (model, threads, queue) and the observer."""

    def __init__(
        self,
        model: Model,
        limiter: anyio.CapacityLimiter,
        *,
        max_batch: int = 64,
        batch_wait_s: float = 0.002,
        max_queued_s: float = 600.0,
        late_s: float = 1.0,
        observer: ModelObserver | None = None,
    ) -> None:
        self.observer = observer or ModelObserver()
        self.engine = ModelEngine(
            model,
            limiter,
            max_batch=max_batch,
            batch_wait_s=batch_wait_s,
            max_queued_s=max_queued_s,
            late_s=late_s,
            observer=self.observer,
        )
        self._ranks = itertools.count()

    @property
    def model(self) -> Model:
        return self.engine.model

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        return self.engine.limiter

    async def run(self) -> None:
        await self.engine.run()

    def wait_s(self) -> float:
        """How long utterances wait for the model now (what admission reads)."""
        return self.engine.wait_s()

    def load_with(self, sessions: int) -> float | None:
        """The model's expected load with ``sessions`` sessions (None: capacity unknown)."""
        return self.engine.load_with(sessions)

    async def run_stage(
        self,
        receive: MemoryObjectReceiveStream[VadOutput],
        emit: Emit,
        *,
        one_at_a_time: bool = False,
        logged: LoggedProgress | None = None,
    ) -> ModelSummary:
        """Run one session's model stage over ``receive``. ``logged``: the session's log holds
        these results already (an adopted session's pipeline runs again over its audio):
        they are neither emitted again nor sent to the model."""
        stage = _Stage(self, next(self._ranks), emit, logged or LoggedProgress())
        self.engine.stages += 1
        try:
            return await stage.run(receive, one_at_a_time)
        finally:
            self.engine.stages -= 1


class _Channel:
    __slots__ = (
        "finals_pending",
        "finals_to_skip",
        "interim",
        "last_final_start",
        "last_interim_end",
        "vad_to_skip",
    )

    def __init__(self, channel: int, logged: LoggedProgress) -> None:
        self.finals_pending = 0  # submitted, not yet emitted
        self.interim: Job | None = None  # the outstanding interim (queued or running)
        # Sample positions: where the last final emitted began (its utterance is closed), and
        # where the last interim emitted ended.
        self.last_final_start = -1
        end = logged.interim_end.get(channel)
        self.last_interim_end = -1 if end is None else round(end * MODEL_SAMPLE_RATE)
        # What the log holds already (an adopted session): the first VAD events and the first
        # utterances of the channel, as its pipeline finds them again, are not news.
        self.vad_to_skip = logged.vad.get(channel, 0)
        self.finals_to_skip = logged.utterances.get(channel, 0)


class _Stage:
    """One session's side of the engine (an :class:`~service.model.engine.Owner`)."""

    def __init__(self, runner: ModelRunner, rank: int, emit: Emit, logged: LoggedProgress) -> None:
        self.runner = runner
        self.logged = logged
        self.engine = runner.engine
        self.rank = rank
        self.emit = emit
        self.summary = ModelSummary()
        self.channels: dict[int, _Channel] = {}
        self.finals: deque[Job] = deque()  # in submission order
        self.interims_done: list[Job] = []
        self.bell = Doorbell()  # wakes the emitter
        self.emitted = Doorbell()  # wakes the reader in one-at-a-time mode
        self.input_done = False
        self.lag = 0.0  # the session's lag as last measured by the engine
        self.lag_reported = 0.0  # as last sent in a `lagging` event

    # -- Owner -----------------------------------------------------------------------------------

    def job_done(self, job: Job) -> None:
        if not job.call.is_final:
            ch = self.channels[job.call.channel]
            if ch.interim is job:
                ch.interim = None
            if job.output is not None or job.error is not None:
                self.interims_done.append(job)
        self.bell.ring()

    def lag_changed(self, seconds_: float) -> None:
        self.lag = seconds_
        if self._lag_to_report() is not None:
            self.bell.ring()

    # -- the stage -------------------------------------------------------------------------------

    async def run(
        self, receive: MemoryObjectReceiveStream[VadOutput], one_at_a_time: bool
    ) -> ModelSummary:
        try:
            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(self._emitter)
                try:
                    async for item in receive:
                        await self._take(item)
                        if one_at_a_time:
                            while self.finals:
                                await self.emitted.wait()
                finally:
                    self.input_done = True
                    self.bell.ring()
        finally:
            self.engine.forget(self)
        return self.summary

    async def _take(self, item: VadOutput) -> None:
        ch = self.channels.get(item.channel)
        if ch is None:
            ch = self.channels[item.channel] = _Channel(item.channel, self.logged)
        if self._logged_already(item, ch):
            return
        if isinstance(item, SpeechStarted):
            await self.emit(Active(item.channel, seconds(item.start)), item.received_at)
        elif isinstance(item, SpeechEnded):
            await self.emit(Inactive(item.channel, seconds(item.end)), item.received_at)
        elif item.is_final:
            self._drop_queued_interim(ch)  # finals first
            job = self._job(item)
            ch.finals_pending += 1
            self.finals.append(job)
            if not self.engine.submit(job):
                self.bell.ring()  # refused: emitted as an error in its place
        else:
            self._interim(item, ch)

    def _logged_already(self, item: VadOutput, ch: _Channel) -> bool:
        """Whether the log holds ``item``'s event already (an adopted session's replay)."""
        if isinstance(item, SpeechStarted | SpeechEnded):
            if ch.vad_to_skip:
                ch.vad_to_skip -= 1
                return True
            return False
        if not ch.finals_to_skip:
            return False
        # Its utterance's final (or the error in its place) is logged: so is anything of it.
        if item.is_final:
            ch.finals_to_skip -= 1
            ch.last_final_start = max(ch.last_final_start, item.start)
        return True

    def _interim(self, item: SpeechAudio, ch: _Channel) -> None:
        if ch.finals_pending:
            self.summary.interims_skipped += 1  # finals first
            return
        if ch.interim is not None and not self._drop_queued_interim(ch):
            self.summary.interims_skipped += 1  # one call per channel at a time
            return
        # None queued now (one that had not started gave its place to this newer audio).
        job = self._job(item)
        if self.engine.submit(job):
            ch.interim = job
        else:
            self.summary.interims_skipped += 1

    def _drop_queued_interim(self, ch: _Channel) -> bool:
        """Drop the channel's interim if it has not started; False if it runs."""
        job = ch.interim
        if job is None or not self.engine.withdraw(job, superseded=True):
            return job is None
        self.summary.interims_skipped += 1
        ch.interim = None
        return True

    def _job(self, item: SpeechAudio) -> Job:
        call = ModelCall(item.channel, item.start, item.end, item.is_final)
        trace = self.runner.observer.call_queued(call)
        return Job(self, call, item.audio, trace, received_at=item.received_at)

    async def _emitter(self) -> None:
        while True:
            # Finals first, in order; then whatever interims are done and still news.
            while self.finals and self.finals[0].done:
                job = self.finals.popleft()
                ch = self.channels[job.call.channel]
                ch.finals_pending -= 1
                await self.emit(self._event(job), job.received_at)
                ch.last_final_start = max(ch.last_final_start, job.call.start)
                if not self.finals:
                    self.lag = 0.0  # caught up; the engine's next measure would say so too
                self.emitted.ring()
            if self.interims_done:
                done, self.interims_done = self.interims_done, []
                for job in done:
                    await self._emit_interim(job)
            lag = self._lag_to_report()
            if lag is not None:
                self.lag_reported = lag
                await self.emit(Lagging(round(lag, 1)), None)
            if self.input_done and not self.finals and not self._interims_outstanding():
                return
            if (self.finals and self.finals[0].done) or self.interims_done:
                continue
            await self.bell.wait()

    async def _emit_interim(self, job: Job) -> None:
        ch = self.channels[job.call.channel]
        # Stale: a final of the channel is pending (it supersedes this, and comes next), or
        # out (an interim starts where its utterance starts, so one of a closed utterance
        # starts at or before the last final), or a newer interim is.
        if (
            ch.finals_pending > 0
            or job.call.start <= ch.last_final_start
            or job.call.end <= ch.last_interim_end
        ):
            self.summary.interims_skipped += 1
            return
        ch.last_interim_end = job.call.end
        await self.emit(self._event(job), job.received_at)

    def _interims_outstanding(self) -> bool:
        return any(ch.interim is not None for ch in self.channels.values())

    def _lag_to_report(self) -> float | None:
        """The lag to announce now, if it is news: over the threshold and moved enough since
        the last `lagging`, or caught up after one."""
        lag, last = self.lag, self.lag_reported
        if lag <= self.engine.late_s:
            return 0.0 if last > 0 else None
        moved = abs(lag - last)
        if last == 0 or (moved >= LAG_STEP_S and moved >= LAG_STEP_RATIO * last):
            return lag
        return None

    def _event(self, job: Job) -> Event:
        call = job.call
        start, end = seconds(call.start), seconds(call.end)
        if job.error is not None:
            code, message = job.error
            if code == "model_failed":
                self.summary.failures += 1
            elif code == "model_overloaded":
                self.summary.overloaded += 1
            else:
                self.summary.panics += 1
            return Error(code, message, call.channel, start, end, final=call.is_final)
        assert job.output is not None
        if call.is_final:
            self.summary.finals += 1
        else:
            self.summary.interims += 1
        # Word times come relative to the utterance's audio; events carry session time.
        return Segment(call.channel, start, end, call.is_final, to_session_time(job.output, start))
