"""The model engine: one queue for every session's model calls, run in batches on worker threads.

Sessions submit :class:`Job` s and never wait for the model: the VAD path goes on at the pace of
the audio, and results come back through each job's owner. The engine

- batches queued calls across sessions into one ``infer_batch`` call when the model has one
  (up to ``max_batch`` items, waiting at most ``batch_wait_s`` for a batch to fill when a
  thread is free), as Triton's dynamic batcher and Ray Serve's ``@serve.batch`` do; a model with
  only ``infer`` gets one call per item, on as many threads;
- runs finals first: an interim is only taken when no final is queued (it may ride in a final's
  batch that has room, or run alone while a thread stays free for the next final);
- orders finals by the seniority of their session, then by arrival: when the model cannot keep
  up, the sessions admitted first keep their latency and the newest feel it (and are told, see
  ``lagging``), rather than every session falling behind together;
- bounds the queue by audio seconds across the process (``max_queued_s``). A final that does
  not fit displaces the queued finals of younger sessions, or is itself refused if its session
  is the youngest; the owner turns that into a ``model_overloaded`` error event with the
  utterance's times, so nothing is lost silently;
- says how long calls wait (:meth:`ModelEngine.wait_s`), for admission, and how late each
  session is (its oldest queued final), for the ``lagging`` event.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE
from service.errors import ErrorCode
from service.model.base import Model, ModelError, batch_size_of

log = logging.getLogger(__name__)

# How often per-session lateness is measured and the admission window moves.
TICK_S = 0.25
# The window over which the wait of dispatched finals is averaged for admission.
WAIT_WINDOW_S = 2.0
# Until sessions have run long enough to measure it, a session is assumed to send this many
# utterances a second: busy speech (speech.wav has one every 2.6 s).
PRIOR_UTTERANCES_PER_S = 0.4
# Session-seconds of history before the measured rate replaces the prior, and the window.
DEMAND_MIN_SESSION_S = 60.0
DEMAND_WINDOW_S = 30.0
# The audio of one probe item: a typical utterance.
PROBE_SECONDS = 1.5


@dataclass(frozen=True, slots=True)
class ModelCall:
    """What the model is asked, for observers (metrics, traces)."""

    channel: int
    start: int
    end: int
    is_final: bool


class CallTrace(Protocol):
    """One call's observation, opened on the event loop when the call is queued (so it can
    capture the session's trace context) and driven from the worker thread."""

    def started(self, queued_s: float, batch_size: int) -> None: ...

    def finished(
        self, seconds_taken: float, error: str | None, exc: BaseException | None
    ) -> None: ...


class _NoTrace:
    def started(self, queued_s: float, batch_size: int) -> None:
        pass

    def finished(self, seconds_taken: float, error: str | None, exc: BaseException | None) -> None:
        pass


NO_TRACE: CallTrace = _NoTrace()


class ModelObserver:
    """Hooks for metrics and tracing; the default does nothing."""

    def call_queued(self, call: ModelCall) -> CallTrace:
        return NO_TRACE

    def batch_finished(self, size: int, audio_s: float, seconds_taken: float) -> None:
        """One model call (a batch of ``size`` items, or a single ``infer``), in its thread."""

    def call_dropped(self, call: ModelCall, reason: str) -> None:
        """A call that will not run: ``overloaded`` (the queue was full) or ``superseded``
        (an interim replaced by a newer one, or dropped because its final is pending)."""


class Owner(Protocol):
    """The session side of a job: told when any of its jobs is done, and how late it is."""

    rank: int  # seniority: lower runs first when the model is behind

    def job_done(self, job: Job) -> None: ...

    def lag_changed(self, seconds: float) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    owner: Owner
    call: ModelCall
    audio: Samples
    trace: CallTrace = NO_TRACE
    received_at: float = 0.0  # when the audio that completed it arrived (for the event lag)
    seq: int = 0
    enqueued_at: float = 0.0
    # The outcome, set once: the model's output, or an error (code, message).
    output: Mapping[str, Any] | None = None
    error: tuple[str, str] | None = None
    done: bool = False
    queued: bool = False  # waiting in the engine (not yet taken into a batch)

    @property
    def samples(self) -> int:
        return len(self.audio)

    def key(self) -> tuple[int, int]:
        return (self.owner.rank, self.seq)


@dataclass
class EngineStats:
    """Counters since start, for /readyz and tests."""

    batches: int = 0
    items: int = 0
    refused: int = 0  # finals refused or displaced by the queue bound (model_overloaded)
    superseded: int = 0  # interims dropped before they ran
    finals: int = 0  # finals submitted
    waits: deque[tuple[float, float]] = field(default_factory=deque)  # (dispatched at, waited)


class ModelEngine:
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
        self.model = model
        self.limiter = limiter
        self.observer = observer or ModelObserver()
        batch_fn = getattr(model, "infer_batch", None)
        self._batch_fn: Callable[[list[Samples]], Sequence[Any]] | None = (
            batch_fn if callable(batch_fn) else None
        )
        self.max_batch = max(1, min(max_batch, batch_size_of(model))) if self._batch_fn else 1
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.max_queued_samples = max(1, round(max_queued_s * MODEL_SAMPLE_RATE))
        self.late_s = late_s
        # Queued finals, sorted by (session rank, arrival); queued interims by arrival, at most
        # one per (owner, channel): a newer one replaces it.
        self._finals: list[Job] = []
        self._interims: dict[tuple[int, int], Job] = {}
        self.queued_samples = 0
        self._seq = itertools.count()
        self._free = 0  # threads not running a batch (set by run())
        self._wake: anyio.Event | None = None
        self.running = False
        self.stats = EngineStats()
        self._late: dict[int, tuple[Owner, float]] = {}  # owners told they are late
        # Capacity: the time of a full batch (probed at start, then measured), and the demand
        # per session (utterances per session-second, measured over a sliding window).
        self.full_batch_s: float | None = None
        self._took: dict[int, float] = {}  # id(batch) -> seconds, from the worker thread
        self.stages = 0  # sessions whose model stage runs now
        self._demand: deque[tuple[float, int, float]] = deque()  # (t, finals, session-seconds)
        self._session_s = 0.0
        self._last_tick = time.monotonic()

    # -- the sessions' side (event loop, never blocks) -----------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a call. False if it cannot be queued: a final refused by the queue bound (the
        job is marked done with ``model_overloaded``; the owner is not called back)."""
        job.seq = next(self._seq)
        job.enqueued_at = time.monotonic()
        if job.call.is_final:
            self.stats.finals += 1
        if not job.call.is_final:
            key = (id(job.owner), job.call.channel)
            old = self._interims.pop(key, None)
            if old is not None:
                self._unqueue_samples(old)
                self._supersede(old)
                old.owner.job_done(old)
            if self.queued_samples + job.samples > self.max_queued_samples:
                self._supersede(job)
                return False
            self._interims[key] = job
            self._queue_samples(job)
            self._ring()
            return True
        while self.queued_samples + job.samples > self.max_queued_samples:
            # Make room from interims first, then from the youngest sessions' finals.
            if self._interims:
                _, old = self._interims.popitem()
                self._unqueue_samples(old)
                self._supersede(old)
                old.owner.job_done(old)  # its session no longer waits for it
                continue
            if self._finals and self._finals[-1].key() > (job.owner.rank, job.seq):
                victim = self._finals.pop()
                self._unqueue_samples(victim)
                self._overload(victim)
                victim.owner.job_done(victim)
                continue
            self._overload(job)
            return False
        bisect.insort(self._finals, job, key=Job.key)
        self._queue_samples(job)
        self._ring()
        return True

    def withdraw(self, job: Job, *, superseded: bool = False) -> bool:
        """Take a queued job back (its owner no longer wants it; ``superseded``: it was
        replaced, which is counted); False if it already runs."""
        if not job.queued:
            return False
        if job.call.is_final:
            i = bisect.bisect_left(self._finals, job.key(), key=Job.key)
            if i < len(self._finals) and self._finals[i] is job:
                del self._finals[i]
        else:
            key = (id(job.owner), job.call.channel)
            if self._interims.get(key) is job:
                del self._interims[key]
        self._unqueue_samples(job)
        if superseded:
            self._supersede(job)
        return True

    def forget(self, owner: Owner) -> None:
        """An owner that has gone (its session was cancelled): drop its queued calls."""
        for job in [j for j in self._finals if j.owner is owner]:
            self.withdraw(job)
        for key in [k for k, j in self._interims.items() if j.owner is owner]:
            self.withdraw(self._interims[key])
        self._late.pop(id(owner), None)

    # -- what admission and /readyz read --------------------------------------------------------

    @property
    def queued_finals(self) -> int:
        return len(self._finals)

    @property
    def queued_interims(self) -> int:
        return len(self._interims)

    def oldest_wait_s(self, now: float | None = None) -> float:
        """How long the longest-waiting queued final has waited."""
        if not self._finals:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - min(j.enqueued_at for j in self._finals))

    def wait_s(self, now: float | None = None) -> float:
        """How long finals wait for the model now: the longest wait of those still queued, or
        the mean wait of those dispatched over the last couple of seconds if that is longer."""
        now = time.monotonic() if now is None else now
        waits = self._recent_waits(now)
        mean = sum(w for _, w in waits) / len(waits) if waits else 0.0
        return max(self.oldest_wait_s(now), mean)

    def capacity_per_s(self) -> float | None:
        """Utterances a second the model can take at full batches on every thread, or None
        before that is known (:meth:`probe`)."""
        if self.full_batch_s is None:
            return None
        return int(self.limiter.total_tokens) * self.max_batch / max(self.full_batch_s, 1e-3)

    def demand_per_session_s(self) -> float:
        """Utterances a second one session sends: measured once there is enough history."""
        if len(self._demand) < 2:
            return PRIOR_UTTERANCES_PER_S
        (_, f0, s0), (_, f1, s1) = self._demand[0], self._demand[-1]
        if s1 - s0 < DEMAND_MIN_SESSION_S:
            return PRIOR_UTTERANCES_PER_S
        return (f1 - f0) / (s1 - s0)

    def load_with(self, sessions: int) -> float | None:
        """The model's expected load (demand over capacity) with ``sessions`` sessions."""
        capacity = self.capacity_per_s()
        if capacity is None:
            return None
        return sessions * self.demand_per_session_s() / capacity

    async def probe(self) -> None:
        """Time a full batch of typical utterances on every thread at once (which also warms
        the model up), so admission knows the model's capacity before the first session
        speaks. All threads at once: a model that shares the CPU between them (Whisper on a
        CPU) is timed as it will run, and the mean of several calls evens out jitter."""
        n = self.max_batch if self._batch_fn is not None else 1
        # Noise, not silence: a model that skips silent audio (Whisper does) would answer
        # silence in no time and its capacity would look endless.
        rng = np.random.default_rng(0)
        samples = round(PROBE_SECONDS * MODEL_SAMPLE_RATE)
        audio = [(0.1 * rng.standard_normal(samples)).astype(np.float32) for _ in range(n)]
        times: list[float] = []

        def run() -> None:
            t0 = time.monotonic()
            if self._batch_fn is None:
                self.model.infer(audio[0])
            else:
                self._batch_fn(audio)
            times.append(time.monotonic() - t0)

        async def one() -> None:
            await anyio.to_thread.run_sync(run, limiter=self.limiter)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(int(self.limiter.total_tokens)):
                    tg.start_soon(one)
        except Exception:
            log.warning("the model failed its start-up probe; capacity unknown", exc_info=True)
            return
        took = sum(times) / len(times)
        if self.full_batch_s is None:
            self.full_batch_s = took
        log.info("model probe", extra={"batch": n, "calls": len(times), "seconds": round(took, 3)})

    # -- the dispatcher ------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch batches until cancelled (the app's lifespan runs this)."""
        self._free = int(self.limiter.total_tokens)
        self.running = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_lateness)
                while True:
                    batch = await self._next_batch()
                    self._free -= 1
                    tg.start_soon(self._run_batch, batch)
        finally:
            self.running = False

    async def _next_batch(self) -> list[Job]:
        while True:
            if self._free > 0 and (self._finals or (self._interims and self._interim_room())):
                if (
                    self.batch_wait_s > 0
                    and self.max_batch > 1
                    and len(self._finals) + len(self._interims) < self.max_batch
                ):
                    # A thread is free but the batch is small: give the calls about to arrive
                    # a moment to join it. Near-free against a model call of ~0.1-1 s.
                    await anyio.sleep(self.batch_wait_s)
                batch = self._take()
                if batch:
                    return batch
            self._wake = anyio.Event()
            await self._wake.wait()

    def _interim_room(self) -> bool:
        # An interim alone takes a thread only while another stays free for the next final.
        total = int(self.limiter.total_tokens)
        return self._free > (1 if total > 1 else 0)

    def _take(self) -> list[Job]:
        n = self.max_batch
        batch = self._finals[:n]
        del self._finals[: len(batch)]
        if len(batch) < n and self._interims and (batch or self._interim_room()):
            keys = list(itertools.islice(self._interims, n - len(batch)))
            batch.extend(self._interims.pop(k) for k in keys)
        now = time.monotonic()
        for job in batch:
            self._unqueue_samples(job)
            if job.call.is_final:
                self.stats.waits.append((now, now - job.enqueued_at))
        self._recent_waits(now)  # kept to the window here too: nothing else may read them
        return batch

    async def _run_batch(self, batch: list[Job]) -> None:
        try:
            await anyio.to_thread.run_sync(self._work, batch, limiter=self.limiter)
        except Exception:  # a bug in the engine: fail these calls, never the dispatcher
            log.exception("model batch failed")
            for job in batch:
                if not job.done:
                    job.error = (ErrorCode.INTERNAL.value, "internal error running the model")
                    job.done = True
        finally:
            self._free += 1
            took = self._took.pop(id(batch), None)
            if took is not None and len(batch) >= self.max_batch:
                # A full batch: what capacity is made of (a moving average, for jitter).
                prev = self.full_batch_s
                self.full_batch_s = took if prev is None else 0.8 * prev + 0.2 * took
            self.stats.batches += 1
            self.stats.items += len(batch)
            for job in batch:
                job.done = True
                job.owner.job_done(job)
            self._ring()

    def _work(self, batch: list[Job]) -> None:
        """In a worker thread: one model call for the batch (or ``infer`` for one item)."""
        t0 = time.monotonic()
        for job in batch:
            job.trace.started(t0 - job.enqueued_at, len(batch))
        exc: BaseException | None = None
        try:
            if self._batch_fn is None:
                results: Sequence[Any] = [self.model.infer(batch[0].audio)]
            else:
                results = self._batch_fn([job.audio for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"infer_batch returned {len(results)} results for {len(batch)} inputs"
                    )
        except Exception as e:
            exc, results = e, [e] * len(batch)
        took = time.monotonic() - t0
        self._took[id(batch)] = took
        for job, result in zip(batch, results, strict=True):
            job_exc = result if isinstance(result, BaseException) else None
            if job_exc is None:
                job.output = result
            elif isinstance(job_exc, ModelError):
                job.error = (ErrorCode.MODEL_FAILED.value, f"model failed: {job_exc}")
            else:
                job.error = (
                    ErrorCode.MODEL_PANIC.value,
                    f"model crashed ({type(job_exc).__name__}); the session continues",
                )
            job.trace.finished(took, job.error[0] if job.error else None, job_exc)
        if exc is not None and not isinstance(exc, ModelError):
            log.warning("model call raised %s", type(exc).__name__, exc_info=exc)
        audio_s = sum(job.samples for job in batch) / MODEL_SAMPLE_RATE
        self.observer.batch_finished(len(batch), audio_s, took)

    async def _watch_lateness(self) -> None:
        """Tell owners how late they are: the wait of their oldest queued final."""
        while True:
            await anyio.sleep(TICK_S)
            now = time.monotonic()
            self._session_s += self.stages * (now - self._last_tick)
            self._last_tick = now
            demand = self._demand
            demand.append((now, self.stats.finals, self._session_s))
            while len(demand) > 2 and demand[1][0] < now - DEMAND_WINDOW_S:
                demand.popleft()
            oldest: dict[int, tuple[Owner, float]] = {}
            for job in self._finals:
                o = id(job.owner)
                if o not in oldest or job.enqueued_at < oldest[o][1]:
                    oldest[o] = (job.owner, job.enqueued_at)
            late = {o: (owner, now - t) for o, (owner, t) in oldest.items() if now - t > 0}
            for o, (owner, _) in list(self._late.items()):
                if o not in late:
                    del self._late[o]
                    owner.lag_changed(0.0)
            for o, (owner, waited) in late.items():
                self._late[o] = (owner, waited)
                owner.lag_changed(waited)

    # -- internals -----------------------------------------------------------------------------

    def _recent_waits(self, now: float) -> deque[tuple[float, float]]:
        """The finals' waits of the last ``WAIT_WINDOW_S``, older ones dropped."""
        waits = self.stats.waits
        while waits and waits[0][0] < now - WAIT_WINDOW_S:
            waits.popleft()
        return waits

    def _ring(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def _queue_samples(self, job: Job) -> None:
        job.queued = True
        self.queued_samples += job.samples

    def _unqueue_samples(self, job: Job) -> None:
        if job.queued:
            job.queued = False
            self.queued_samples -= job.samples

    def _supersede(self, job: Job) -> None:
        self.stats.superseded += 1
        job.done = True
        self.observer.call_dropped(job.call, "superseded")

    def _overload(self, job: Job) -> None:
        self.stats.refused += 1
        seconds = self.max_queued_samples / MODEL_SAMPLE_RATE
        job.error = (
            ErrorCode.MODEL_OVERLOADED.value,
            f"the model is behind: its queue holds its maximum of {seconds:g} s of audio, so "
            "this utterance was not run",
        )
        job.done = True
        self.observer.call_dropped(job.call, "overloaded")
