"""The VAD stage of one session: audio chunks in, speech boundaries and speech audio out.

Each chunk's channels are cut into 512-sample frames; what does not fill a frame is carried to
the next chunk, and at the end of input the remainder is zero-padded to one frame and processed
too (the seed dropped it).

:class:`VadStage` is a chunk sink: the decoder hands it each chunk (``await stage.send(chunk)``)
in its own task, with no stream or task in between. The frames go to the shared
:class:`VadBatcher` with :meth:`~VadBatcher.submit`, and the segmenter runs in the batcher's
completion callback on the event loop. So a live chunk costs no task wake-up of its own beyond
the decoder's: at hundreds of streams x 10 chunks a second, every hop on the event loop counts.
A session has at most one request in flight; frames that arrive meanwhile wait in the stage and
go in the next batch together, and the decoder waits (backpressure) only when more than
``max_queued_frames`` are waiting or the model stage is not keeping up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.audio.chunk import AudioChunk, Samples
from service.config import MODEL_SAMPLE_RATE, VadParams
from service.vad.batcher import VadBatcher
from service.vad.segmenter import Segmenter
from service.vad.silero import FRAME, Floats, VadStream
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

# Runs of at least this many frames go to Segmenter.skip at once rather than frame by frame.
# Even one frame: skip counts a live chunk's few frames in plain Python and appends its audio
# in one copy, where push costs a list, two window updates and the checks per frame.
SKIP_MIN_FRAMES = 1
# A flush (request_flush) is due once the stage has run the audio up to its position, less the
# partial frame it carries and less this much: the resampler of a rate other than 16 kHz holds
# back a few samples, which must not leave a flush waiting for the client's next audio.
FLUSH_SLACK = 64

# Flushes waiting for their audio, at most; past this a new one is merged into the last (it is
# due later, and does the earlier one's work too): a client's Finalize messages while the
# pipeline lags cannot pile up.
MAX_PENDING_FLUSHES = 8

# Told, per channel, where a flush ended its open utterance (None: none was open).
FlushDone = Callable[[tuple[int | None, ...]], None]


@dataclass(frozen=True, slots=True)
class VadSummary:
    frames: int  # model frames run, over all channels (the padded last one included)
    utterances: tuple[int, ...]  # final utterances per channel
    speech_seconds: float  # total length of the final utterances, over all channels


class _Channel:
    __slots__ = ("carry", "last_interim", "segmenter", "stream")

    def __init__(self, params: VadParams, channel: int, start: int) -> None:
        self.segmenter = Segmenter(params, channel, start=start)
        self.stream = VadStream()
        self.carry: Samples = np.zeros(0, dtype=np.float32)
        self.last_interim = start

    def take_frames(self, samples: Samples) -> Samples:
        """Whole frames ``(k, FRAME)`` of carry + samples; the rest becomes the new carry."""
        audio = np.concatenate([self.carry, samples]) if len(self.carry) else samples
        k = len(audio) // FRAME
        self.carry = audio[k * FRAME :].copy()
        return audio[: k * FRAME].reshape(k, FRAME)


class VadStage:
    """Segment one session's audio. Outputs go to ``send`` in order per channel (and in frame
    order across channels); :meth:`aclose` flushes every remainder, then closes ``send``.

    With ``interim_interval_s``, while a channel is speaking, the utterance so far goes out as
    ``SpeechAudio(is_final=False)`` each time that much audio has passed since the channel's
    last emission (its speech start, or its previous interim): audio time, not wall time, so
    a fast upload gets the same interims as a live stream.

    With a batcher that is not running (unit tests, after shutdown) each chunk is run at once
    with :meth:`VadBatcher.infer` instead.
    """

    def __init__(
        self,
        send: MemoryObjectSendStream[VadOutput],
        *,
        batcher: VadBatcher,
        params: VadParams,
        interim_interval_s: float | None,
        max_queued_frames: int = 64,
    ) -> None:
        self._out = send
        self._batcher = batcher
        self._params = params
        self._interval = (
            None
            if interim_interval_s is None
            else max(1, round(interim_interval_s * MODEL_SAMPLE_RATE))
        )
        self._max_queued = max_queued_frames
        self._channels: list[_Channel] = []
        self._expected_start: int | None = None
        self._received_at = 0.0
        # Frames cut but not yet submitted, as (frames per channel, received_at, valid).
        self._queued: list[_Frames] = []
        self._queued_frames = 0
        self._in_flight: list[_Frames] | None = None
        # Outputs the model stage could not take at once, in order; sent by the next send().
        self._outbox: deque[VadOutput] = deque()
        self._out_closed = False
        self._error: BaseException | None = None
        self._changed: anyio.Event | None = None
        self._closed = False
        # Flushes asked for (request_flush) and not yet due, in order.
        self._flushes: deque[_Flush] = deque()
        self._finishing = False  # past the last flush: open utterances end with the input
        self.frames_run = 0

    async def __aenter__(self) -> VadStage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the decoder's side --------------------------------------------------------------------

    async def send(self, chunk: AudioChunk) -> None:
        """Take one chunk. Returns at once unless the stage is behind (backpressure)."""
        self._raise_if_failed()
        if self._expected_start is None:
            self._expected_start = chunk.start
            self._channels = [
                _Channel(self._params, ch, chunk.start) for ch in range(chunk.channels)
            ]
        if chunk.channels != len(self._channels):
            raise ValueError(
                f"channel count changed from {len(self._channels)} to {chunk.channels} mid-stream"
            )
        if chunk.start != self._expected_start:
            raise ValueError(f"chunk starts at {chunk.start}, expected {self._expected_start}")
        self._expected_start = chunk.end
        self._received_at = chunk.received_at
        samples = np.asarray(chunk.samples, dtype=np.float32)
        frames = [c.take_frames(samples[i]) for i, c in enumerate(self._channels)]
        if frames and len(frames[0]):
            self._queue(_Frames(frames, chunk.received_at, None))
        limit = self._max_queued if self._batcher.running else 0
        while self._outbox or self._queued_frames > limit:
            await self._advance()

    async def aclose(self) -> None:
        """End of input: run every queued frame and the zero-padded remainder, finish open
        utterances, then close the output. Raises the model's error if a batch failed (the
        output is closed all the same)."""
        if self._closed:
            return
        self._closed = True
        async with self._out:
            while self._outbox or self._queued or self._in_flight is not None:
                await self._advance()
            channels = self._channels
            if channels and len(channels[0].carry):
                # Every channel has the same remainder length; pad it to one frame for the
                # model, but only the real samples count as time and audio in the segmenter.
                valid = len(channels[0].carry)
                tails = []
                for c in channels:
                    tail = np.zeros((1, FRAME), dtype=np.float32)
                    tail[0, :valid] = c.carry
                    c.carry = np.zeros(0, dtype=np.float32)
                    tails.append(tail)
                self._queue(_Frames(tails, self._received_at, valid))
                while self._outbox or self._queued or self._in_flight is not None:
                    await self._advance()
            while self._flushes:  # due now: every sample has been run
                self._flush(self._flushes.popleft(), self._received_at)
            self._finishing = True
            while self._outbox:
                await self._out.send(self._outbox.popleft())
            for c in channels:
                for output in c.segmenter.finish(self._received_at):
                    await self._out.send(output)

    def request_flush(self, at: int, done: FlushDone, channel: int | None = None) -> None:
        """End every channel's open utterance (or only ``channel``'s) once the audio up to
        sample ``at`` has been segmented (a client's ``Finalize``), rather than waiting for the
        speaker's silence; ``done`` is told where each ended. The partial frame the stage
        carries (under 32 ms) goes to what follows. After the end of input, ``done`` is told at
        once: nothing is open any more."""
        if self._finishing or (not self._channels and at <= FLUSH_SLACK):
            done(tuple(None for _ in self._channels))  # nothing is open, or can be
            return
        last = self._flushes[-1] if self._flushes else None
        if last is not None and len(self._flushes) >= MAX_PENDING_FLUSHES and last.done == done:
            merged = channel if last.channel == channel else None
            self._flushes[-1] = _Flush(max(at, last.at), done, merged)
        else:
            self._flushes.append(_Flush(at, done, channel))
        self._flush_due(self._received_at)

    def summary(self) -> VadSummary:
        return VadSummary(
            frames=self.frames_run,
            utterances=tuple(c.segmenter.utterances for c in self._channels),
            speech_seconds=sum(c.segmenter.speech_samples for c in self._channels)
            / MODEL_SAMPLE_RATE,
        )

    # -- internals -----------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _queue(self, frames: _Frames) -> None:
        self._queued.append(frames)
        self._queued_frames += len(frames.frames[0])
        self._submit()

    def _submit(self) -> None:
        """Hand everything queued to the batcher, if nothing of ours is in flight."""
        if (
            self._in_flight is not None
            or not self._queued
            or self._error is not None
            or not self._batcher.running
        ):
            return
        batch, self._queued, self._queued_frames = self._queued, [], 0
        self._in_flight = batch
        per_channel = (
            [np.concatenate([b.frames[i] for b in batch]) for i in range(len(self._channels))]
            if len(batch) > 1
            else batch[0].frames
        )
        self._batcher.submit(
            [(c.stream, f) for c, f in zip(self._channels, per_channel, strict=True)], self._done
        )

    async def _advance(self) -> None:
        """Wait for one step of progress: the outbox sent, a batch done, or an inline run."""
        self._raise_if_failed()
        if self._outbox:
            await self._out.send(self._outbox.popleft())
            if not self._outbox:
                self._submit()
            return
        if self._in_flight is None and self._queued and not self._batcher.running:
            batch, self._queued, self._queued_frames = self._queued, [], 0
            for frames in batch:
                self._in_flight = [frames]
                try:
                    probs = await self._batcher.infer(
                        [(c.stream, f) for c, f in zip(self._channels, frames.frames, strict=True)]
                    )
                except BaseException as exc:
                    self._in_flight = None
                    if isinstance(exc, Exception):
                        self._error = exc
                    raise
                self._done(probs, None)
            return
        if self._in_flight is None and self._queued:
            self._submit()  # the batcher started after this stage queued frames
            if self._in_flight is None:
                raise RuntimeError("the VAD stage cannot submit its frames")
        self._changed = anyio.Event()
        await self._changed.wait()

    def _done(self, probs: list[Floats] | None, error: BaseException | None) -> None:
        """The batcher's callback, on the event loop: run the segmenter over the results."""
        batch, self._in_flight = self._in_flight, None
        try:
            if error is not None:
                self._error = error
            elif batch is not None and probs is not None:
                self._segment(batch, probs)
                if not self._outbox:
                    self._submit()
        except Exception as exc:  # a bug here must fail this session only
            self._error = exc
        if self._changed is not None:
            self._changed.set()

    def _segment(self, batch: list[_Frames], probs: list[Floats]) -> None:
        offset = 0
        for frames in batch:
            at = frames.received_at
            k = len(frames.frames[0])
            if len(self._channels) == 1 and k >= SKIP_MIN_FRAMES:
                self._segment_one(frames, probs[0][offset : offset + k])
            else:
                for t in range(k):
                    for c, f, p in zip(self._channels, frames.frames, probs, strict=True):
                        self._push(c, f[t], float(p[offset + t]), at, frames.valid)
            offset += k
            self.frames_run += k * len(self._channels)
            if self._flushes:
                self._flush_due(at)

    def _flush_due(self, received_at: float) -> None:
        if not self._channels:
            return
        # Run so far, plus what waits for a whole frame: the audio before the next whole frame.
        first = self._channels[0]
        reached = first.segmenter.position + len(first.carry) + FLUSH_SLACK
        while self._flushes and reached >= self._flushes[0].at:
            self._flush(self._flushes.popleft(), received_at)

    def _flush(self, flush: _Flush, received_at: float) -> None:
        ends: list[int | None] = []
        for c in self._channels:
            end = None
            if flush.channel is None or flush.channel == c.segmenter.channel:
                for output in c.segmenter.flush(received_at):
                    if isinstance(output, SpeechEnded):
                        end = output.end
                    self._emit(output)
            ends.append(end)
        flush.done(tuple(ends))

    def _segment_one(self, frames: _Frames, probs: Floats) -> None:
        """One channel's frames, with the runs that produce nothing taken at once
        (:meth:`Segmenter.skip`); the same outputs as pushing every frame."""
        c = self._channels[0]
        segmenter = c.segmenter
        f = frames.frames[0]
        at = frames.received_at
        k = len(f)
        whole = k if frames.valid is None else k - 1  # a padded tail goes to push
        interval = self._interval
        t = 0
        while t < k:
            if whole - t >= SKIP_MIN_FRAMES:
                until = None
                if interval is not None and segmenter.speaking:
                    until = c.last_interim + interval
                t += segmenter.skip(f[t:whole], probs[t:whole], until)
                if t >= k:
                    break
            self._push(c, f[t], float(probs[t]), at, frames.valid if t == k - 1 else None)
            t += 1

    def _push(self, c: _Channel, frame: Samples, prob: float, at: float, valid: int | None) -> None:
        for output in c.segmenter.push(frame, prob, at, valid=valid):
            if isinstance(output, SpeechStarted):
                c.last_interim = c.segmenter.position
            self._emit(output)
        interval = self._interval
        if (
            interval is not None
            and c.segmenter.speaking
            and c.segmenter.position - c.last_interim >= interval
        ):
            self._emit(_interim(c.segmenter, at))
            c.last_interim = c.segmenter.position

    def _emit(self, output: VadOutput) -> None:
        if self._out_closed:
            return
        if not self._outbox:
            try:
                self._out.send_nowait(output)
                return
            except anyio.WouldBlock:
                pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._out_closed = True  # the session is being torn down
                return
        self._outbox.append(output)


@dataclass(frozen=True, slots=True)
class _Flush:
    at: int  # due once the audio up to here is segmented
    done: FlushDone
    channel: int | None  # None: every channel


class _Frames:
    """One chunk's whole frames, per channel ``(k, FRAME)``; ``valid`` real samples in the last
    frame of a zero-padded tail."""

    __slots__ = ("frames", "received_at", "valid")

    def __init__(self, frames: list[Samples], received_at: float, valid: int | None) -> None:
        self.frames = frames
        self.received_at = received_at
        self.valid = valid


async def vad_stage(
    chunks: MemoryObjectReceiveStream[AudioChunk],
    send: MemoryObjectSendStream[VadOutput],
    *,
    batcher: VadBatcher,
    params: VadParams,
    interim_interval_s: float | None,
) -> VadSummary:
    """:class:`VadStage` fed from a stream: for tests and benchmarks that drive the stage alone.
    ``send`` is closed when the input ends, after every remainder is flushed."""
    stage = VadStage(send, batcher=batcher, params=params, interim_interval_s=interim_interval_s)
    async with chunks, stage:
        async for chunk in chunks:
            await stage.send(chunk)
    return stage.summary()


def _interim(segmenter: Segmenter, received_at: float) -> SpeechAudio:
    current = segmenter.current_speech()
    assert current is not None
    utterance, start, end, audio = current
    return SpeechAudio(segmenter.channel, utterance, start, end, audio, False, received_at)
