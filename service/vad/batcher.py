"""Cross-session batching of Silero.

A hop to a worker thread costs more than a frame of VAD, so a session must neither run the model
on the event loop nor hop to a thread per frame. Instead every session hands its frames to one
:class:`VadBatcher`; the batcher's loop takes everything pending at that moment and runs it in ONE
worker-thread call, batching across sessions and channels. With the dense graph
(:mod:`service.vad.dense`) a call takes every pending frame of up to ``max_batch // K`` streams
(``K`` frames each), so a batch costs one ``session.run`` per ``max_batch`` frames, not one per
frame step: ~17 us per frame against ~100 us alone.

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
import numpy.typing as npt
import onnxruntime as ort

from service.vad.silero import CONTEXT, FRAME, Floats, VadStream, forward_frames, takes_sequences

log = logging.getLogger(__name__)

StreamFrames = tuple[VadStream, Floats]
"""One stream and its next ``k`` frames, shape ``(k, FRAME)``, in order."""


class VadInferenceError(RuntimeError):
    """The model failed on a batch; every request in that batch gets one of these."""


class _Plan:
    """One batch cut into model calls: built on the event loop, run in the worker thread, and
    written back on the loop. The thread does nothing but ``session.run``: each time a thread
    releases the GIL it waits for the loop to give it back (up to the switch interval), so
    numpy gathers and scatters there cost far more than their CPU."""

    __slots__ = ("calls", "counts", "flat")

    def __init__(self, flat: list[StreamFrames], max_batch: int | None) -> None:
        self.flat = flat
        self.counts = [len(frames) for _, frames in flat]
        # Longest first, so each call pads its streams to nearly the same length.
        counts = self.counts
        order = sorted((j for j in range(len(flat)) if counts[j]), key=lambda j: -counts[j])
        self.calls: list[tuple[list[int], Floats, Floats, npt.NDArray[np.int32]]] = []
        if max_batch is None:  # one call, every stream
            if order:
                self.calls.append(self._call(order, self.counts[order[0]]))
            return
        i = 0
        while i < len(order):
            steps = self.counts[order[i]]
            # At most max_batch frames per call (padding included; one stream at least), and
            # no stream shorter than half the longest, so padding stays under half the work.
            rows = [order[i]]
            i += 1
            while (
                i < len(order)
                and (len(rows) + 1) * steps <= max_batch
                and 2 * self.counts[order[i]] > steps
            ):
                rows.append(order[i])
                i += 1
            self.calls.append(self._call(rows, steps))

    def _call(
        self, rows: list[int], steps: int
    ) -> tuple[list[int], Floats, Floats, npt.NDArray[np.int32]]:
        """``(rows, inputs (B, K, CONTEXT + FRAME), state (2, B, 128), lengths (B,))``: every
        frame with the 64 samples before it (the stream's context for the first).

        One slice assignment per stream, the contexts for all at once: at hundreds of live
        streams of three frames each, three numpy calls per stream were most of the cost."""
        flat, counts = self.flat, self.counts
        inputs = np.zeros((len(rows), steps, CONTEXT + FRAME), dtype=np.float32)
        for b, j in enumerate(rows):
            inputs[b, : counts[j], CONTEXT:] = flat[j][1]
        # Each step's context is the end of the step before; the first step's is the stream's.
        # (Padding steps get one too: the graph ignores every step past a stream's length.)
        inputs[:, 1:, :CONTEXT] = inputs[:, :-1, -CONTEXT:]
        inputs[:, 0, :CONTEXT] = np.stack([flat[j][0].context for j in rows])
        lengths = np.array([counts[j] for j in rows], dtype=np.int32)
        state = np.concatenate([flat[j][0].state for j in rows], axis=1)
        return rows, inputs, state, lengths

    def run(self, session: ort.InferenceSession) -> list[tuple[Floats, Floats]]:
        """Blocking: the model calls, in a worker thread."""
        return [forward_frames(session, x, state, lengths) for _, x, state, lengths in self.calls]

    def finish(self, outputs: Sequence[tuple[Floats, Floats]]) -> list[Floats]:
        """On success only: the new states and contexts go to the streams, so a failed batch
        leaves every stream as it was. Returns the probabilities per stream, in input order.

        The probabilities are views into the call's output (read at once, not kept). The
        state and context each stream keeps are copies: a view would keep the whole call's
        arrays alive for as long as the stream waits for audio, one call's worth per idle
        stream."""
        # Streams without frames are in no call: they share one empty array (an array per
        # stream here, most of them replaced at once, was a measurable share of this method).
        none = np.zeros(0, dtype=np.float32)
        results = [none] * len(self.flat)
        flat, counts = self.flat, self.counts
        for (rows, _, _, _), (probs, new_state) in zip(self.calls, outputs, strict=True):
            for b, j in enumerate(rows):
                stream, frames = flat[j]
                results[j] = probs[b, : counts[j]]
                stream.state = new_state[:, b : b + 1].copy()
                stream.context = frames[-1, -CONTEXT:].copy()
        return results


def _split(groups: Sequence[Sequence[StreamFrames]], results: list[Floats]) -> list[list[Floats]]:
    out: list[list[Floats]] = []
    j = 0
    for group in groups:
        out.append(results[j : j + len(group)])
        j += len(group)
    return out


def _plan(
    session: ort.InferenceSession, groups: Sequence[Sequence[StreamFrames]], max_batch: int
) -> _Plan:
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    flat = [item for group in groups for item in group]
    if len({id(stream) for stream, _ in flat}) != len(flat):
        raise ValueError("a stream appears twice in one batch; its frames must be sequential")
    # The reference graph runs step by step anyway: one call, each step over every stream that
    # still has a frame (a wider step is a cheaper row).
    return _Plan(flat, max_batch if takes_sequences(session) else None)


def run_requests(
    session: ort.InferenceSession, groups: Sequence[Sequence[StreamFrames]], max_batch: int
) -> list[list[Floats]]:
    """Run every stream of every group over all its frames; return probabilities per group, per
    stream (shape ``(k,)``). Blocking, all in the calling thread (tests, benchmarks).

    With the dense graph, streams go to the model all their ``K`` frames at once, at most
    ``max_batch`` frames per ``session.run``; the reference graph runs step by step over every
    stream that still has a frame. Either way a stream's state carries from frame to frame.
    """
    plan = _plan(session, groups, max_batch)
    return _split(groups, plan.finish(plan.run(session)))


def _run_timed(
    plan: _Plan, session: ort.InferenceSession
) -> tuple[list[tuple[Floats, Floats]], float]:
    """The plan's model calls and the seconds they took, measured in the worker thread so that
    queueing for the thread is not counted as compute."""
    t0 = time.perf_counter()
    return plan.run(session), time.perf_counter() - t0


def _check(requests: Sequence[tuple[VadStream, Floats]]) -> list[StreamFrames]:
    checked: list[StreamFrames] = []
    for stream, frames in requests:
        array = np.asarray(frames, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != FRAME:
            raise ValueError(f"frames must have shape (k, {FRAME}), got {array.shape}")
        checked.append((stream, array))
    if len(checked) > 1 and len({id(stream) for stream, _ in checked}) != len(checked):
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
        for _, frames in items:
            if len(frames):
                break
        else:  # nothing to run (a plain loop: a generator here is per live chunk)
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
            groups = [r.items for r in batch]
            plan = _plan(self.session, groups, self.max_batch)
            outputs, seconds = await anyio.to_thread.run_sync(
                _run_timed, plan, self.session, limiter=self.limiter
            )
            results = _split(groups, plan.finish(outputs))
        except Exception as exc:
            log.exception("VAD batch failed", extra={"requests": len(batch)})
            for request in batch:
                request.error = VadInferenceError(f"VAD inference failed: {exc!r}")
                request.error.__cause__ = exc
        else:
            n_frames = sum(plan.counts)
            self.batches += 1
            self.frames += n_frames
            for request, result in zip(batch, results, strict=True):
                request.result = result
            if self.on_batch is not None:
                self.on_batch(seconds, len(plan.flat), n_frames)
        finally:
            self._in_flight -= 1
            self._notify()
            for request in batch:
                if request.result is None and request.error is None:
                    request.error = VadInferenceError("the VAD batcher stopped")
                request.finish()
