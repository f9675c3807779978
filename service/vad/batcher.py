"""Cross-session batching of Silero steps.

Silero costs ~150-200 us per 512-sample frame at batch 1 but ~60 us per frame at batch 32, and a
hop to a worker thread costs more than a frame (~680 us), so a session must neither run the model
on the event loop nor hop to a thread per frame. Instead every session hands its frames to one
:class:`VadBatcher`; the batcher's loop takes everything pending at that moment and runs it in ONE
worker-thread call, batching across sessions and channels.

Two ways in: :meth:`VadBatcher.submit` (a callback, run on the event loop when the batch is done:
no task wakes per request, which is what the session pipeline uses, since at hundreds of live
streams each wake-up is a measurable share of the loop) and :meth:`VadBatcher.infer` (awaitable).

Batching comes from load, not from added latency: with ``max_wait_s == 0`` the loop never waits
for more work, it takes what is pending now; requests that arrive while a batch is in the thread
form the next batch. ``max_wait_s > 0`` trades latency for bigger batches (until ``max_batch``
rows are pending or the time is up).

Memory stays bounded without a queue limit: a caller has at most one request pending or in
flight at a time (it awaits, or waits for its callback, before it submits more), so there is at
most one request per live session, of a bounded number of frames.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import anyio
import numpy as np
import onnxruntime as ort

from service.vad.silero import CONTEXT, FRAME, Floats, VadStream, forward

log = logging.getLogger(__name__)

StreamFrames = tuple[VadStream, Floats]
"""One stream and its next ``k`` frames, shape ``(k, FRAME)``, in order."""


class VadInferenceError(RuntimeError):
    """The model failed on a batch; every request in that batch gets one of these."""


def run_requests(
    session: ort.InferenceSession, groups: Sequence[Sequence[StreamFrames]], max_batch: int
) -> list[list[Floats]]:
    """Run every stream of every group over all its frames; return probabilities per group, per
    stream (shape ``(k,)``). Blocking: call it in a worker thread.

    Step ``t`` runs, in one ``session.run`` per ``max_batch`` rows, every stream that has a frame
    ``t``; a stream's frames are sequential, so its state carries from step to step. Streams are
    sorted by frame count (descending) so the rows of step ``t`` are a prefix of one state array:
    no per-step gather. States go back to the streams only at the end, so a model error leaves
    every stream of the batch as it was.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    flat = [item for group in groups for item in group]
    if len({id(stream) for stream, _ in flat}) != len(flat):
        raise ValueError("a stream appears twice in one batch; its frames must be sequential")
    counts = [len(frames) for _, frames in flat]
    results = [np.empty(k, dtype=np.float32) for k in counts]
    order = sorted((j for j in range(len(flat)) if counts[j]), key=lambda j: -counts[j])
    if order:
        # Every frame in one array, streams in sorted order; ``first[i]`` is stream i's first
        # row. Step t then gathers its rows with one fancy index and scatters the
        # probabilities with another: no Python loop per row per step, which matters beyond
        # CPU: this thread holds the GIL during that Python, and the event loop waits for it.
        sorted_counts = np.array([counts[j] for j in order])
        first = np.concatenate([[0], np.cumsum(sorted_counts)[:-1]])
        all_frames = np.concatenate([flat[j][1] for j in order])
        all_probs = np.empty(len(all_frames), dtype=np.float32)
        streams = [flat[j][0] for j in order]
        state = np.concatenate([s.state for s in streams], axis=1)
        context = np.stack([s.context for s in streams])
        inputs = np.empty((min(max_batch, len(order)), CONTEXT + FRAME), dtype=np.float32)
        rows = len(order)
        for t in range(int(sorted_counts[0])):
            while sorted_counts[rows - 1] <= t:
                rows -= 1
            for a in range(0, rows, max_batch):
                b = min(a + max_batch, rows)
                index = first[a:b] + t
                x = inputs[: b - a]
                x[:, :CONTEXT] = context[a:b]
                x[:, CONTEXT:] = all_frames[index]
                probs, new_state = forward(session, x, np.ascontiguousarray(state[:, a:b]))
                state[:, a:b] = new_state
                context[a:b] = x[:, -CONTEXT:]
                all_probs[index] = probs
        for i, j in enumerate(order):
            results[j] = all_probs[first[i] : first[i] + counts[j]]
        for i, stream in enumerate(streams):
            stream.state = state[:, i : i + 1].copy()
            stream.context = context[i].copy()
    out: list[list[Floats]] = []
    j = 0
    for group in groups:
        out.append(results[j : j + len(group)])
        j += len(group)
    return out


def _run_timed(
    session: ort.InferenceSession, groups: Sequence[Sequence[StreamFrames]], max_batch: int
) -> tuple[list[list[Floats]], float]:
    """:func:`run_requests` and the seconds it took, measured in the worker thread so that
    queueing for the thread is not counted as compute."""
    t0 = time.perf_counter()
    return run_requests(session, groups, max_batch), time.perf_counter() - t0


def _check(requests: Sequence[tuple[VadStream, Floats]]) -> list[StreamFrames]:
    checked: list[StreamFrames] = []
    for stream, frames in requests:
        array = np.asarray(frames, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != FRAME:
            raise ValueError(f"frames must have shape (k, {FRAME}), got {array.shape}")
        checked.append((stream, array))
    if len({id(stream) for stream, _ in checked}) != len(checked):
        raise ValueError("a stream appears twice in one request")
    return checked


Done = Callable[[list[Floats] | None, BaseException | None], None]
"""``done(result, error)``: exactly one of the two is not None. Runs on the event loop."""


class _Request:
    __slots__ = ("done", "error", "items", "result")

    def __init__(self, items: list[StreamFrames], done: Done) -> None:
        self.items = items
        self.done = done
        self.result: list[Floats] | None = None
        self.error: BaseException | None = None

    def finish(self) -> None:
        try:
            self.done(self.result, self.error)
        except Exception:  # the caller's bug must not take the batcher (every session) down
            log.exception("VAD result callback failed")


class VadBatcher:
    """Shared by every session; :meth:`run` is started once in the app's lifespan task group.

    ``limiter`` caps the worker threads: the loop keeps at most ``limiter.total_tokens`` batches
    in flight, each in one ``anyio.to_thread.run_sync`` call. A session's streams are in at most
    one batch at a time (it awaits its result), so concurrent batches never share a stream.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.0,
        limiter: anyio.CapacityLimiter,
        on_batch: Callable[[float, int, int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not (max_wait_s >= 0 and math.isfinite(max_wait_s)):
            raise ValueError("max_wait_s must be a finite number >= 0")
        self.session = session
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.limiter = limiter
        # Called after each batch with (compute seconds, streams, frames), for metrics.
        self.on_batch = on_batch
        self._pending: list[_Request] = []
        self._pending_rows = 0
        self._in_flight = 0
        self._running = False
        self._changed = anyio.Event()  # set when work arrives or a batch finishes
        # For metrics and tests.
        self.batches = 0
        self.frames = 0

    @property
    def running(self) -> bool:
        return self._running

    def infer_sync(self, requests: Sequence[tuple[VadStream, Floats]]) -> list[Floats]:
        """Blocking, in the calling thread, without the loop (tests, benchmarks). Must not be
        used on streams that are in an :meth:`infer` call at the same time."""
        return run_requests(self.session, [_check(requests)], self.max_batch)[0]

    def submit(self, requests: Sequence[tuple[VadStream, Floats]], done: Done) -> None:
        """Queue one caller's frames for the next batch; ``done(result, error)`` is called on
        the event loop once that batch has run, ``result`` as :meth:`infer` returns it and
        ``error`` a :class:`VadInferenceError`. Does not wait, so it needs :meth:`run` running
        (:attr:`running`). The caller must not submit streams that are still in a request."""
        if not self._running:
            raise RuntimeError("the VAD batcher is not running")
        items = _check(requests)
        if not any(len(frames) for _, frames in items):
            done([np.zeros(0, dtype=np.float32) for _ in items], None)
            return
        self._pending.append(_Request(items, done))
        self._pending_rows += len(items)
        # Wake the loop only when it can act on this now; a batch in flight wakes it when done
        # anyway, and most requests arrive while one is (one wake-up per batch, not per request).
        if self._in_flight < self.limiter.total_tokens or self.max_wait_s > 0:
            self._notify()

    async def infer(self, requests: Sequence[tuple[VadStream, Floats]]) -> list[Floats]:
        """Probabilities for one session: for each ``(stream, frames (k, FRAME))`` an array
        ``(k,)``. Raises :class:`VadInferenceError` if the model failed on the batch.

        If the loop is not running (a unit test, or after shutdown) the request runs on its own
        in a worker thread, unbatched, rather than waiting for a loop that will never come.
        If the caller is cancelled while its request is in a batch, the batch still runs and
        its streams advance; the session is being torn down then anyway.
        """
        items = _check(requests)
        if not any(len(frames) for _, frames in items):
            return [np.zeros(0, dtype=np.float32) for _ in items]
        if not self._running:
            try:
                groups = await anyio.to_thread.run_sync(
                    run_requests, self.session, [items], self.max_batch, limiter=self.limiter
                )
            except Exception as exc:
                raise VadInferenceError(f"VAD inference failed: {exc!r}") from exc
            return groups[0]
        finished = anyio.Event()
        outcome: list[tuple[list[Floats] | None, BaseException | None]] = []

        def done(result: list[Floats] | None, error: BaseException | None) -> None:
            outcome.append((result, error))
            finished.set()

        self.submit(items, done)
        request = self._pending[-1]
        try:
            await finished.wait()
        except BaseException:
            if request in self._pending:  # not taken yet: nobody else will ever look at it
                self._pending.remove(request)
                self._pending_rows -= len(items)
            raise
        result, error = outcome[0]
        if error is not None:
            raise error
        assert result is not None
        return result

    async def run(self) -> None:
        """The batching loop; runs until cancelled. Sleeps on an event while there is no work
        (no polling). A failing batch fails only its requests."""
        if self._running:
            raise RuntimeError("VadBatcher.run is already running")
        self._running = True
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    await self._wait_for_work()
                    if self.max_wait_s > 0:
                        await self._gather()
                    batch, self._pending, self._pending_rows = self._pending, [], 0
                    self._in_flight += 1
                    tg.start_soon(self._execute, batch)
        finally:
            self._running = False
            pending, self._pending, self._pending_rows = self._pending, [], 0
            for request in pending:
                request.error = VadInferenceError("the VAD batcher stopped")
                request.finish()

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_changed(self) -> None:
        # Safe without a lock: nothing else runs between the caller's check and this wait.
        self._changed = anyio.Event()
        await self._changed.wait()

    async def _wait_for_work(self) -> None:
        while not self._pending or self._in_flight >= self.limiter.total_tokens:
            await self._wait_changed()

    async def _gather(self) -> None:
        with anyio.move_on_after(self.max_wait_s):
            while self._pending_rows < self.max_batch:
                await self._wait_changed()

    async def _execute(self, batch: list[_Request]) -> None:
        try:
            groups, seconds = await anyio.to_thread.run_sync(
                _run_timed,
                self.session,
                [r.items for r in batch],
                self.max_batch,
                limiter=self.limiter,
            )
        except Exception as exc:
            log.exception("VAD batch failed", extra={"requests": len(batch)})
            for request in batch:
                request.error = VadInferenceError(f"VAD inference failed: {exc!r}")
                request.error.__cause__ = exc
        else:
            n_frames = sum(len(frames) for r in batch for _, frames in r.items)
            self.batches += 1
            self.frames += n_frames
            for request, result in zip(batch, groups, strict=True):
                request.result = result
            if self.on_batch is not None:
                self.on_batch(seconds, sum(len(r.items) for r in batch), n_frames)
        finally:
            self._in_flight -= 1
            self._notify()
            for request in batch:
                if request.result is None and request.error is None:
                    request.error = VadInferenceError("the VAD batcher stopped")
                request.finish()
