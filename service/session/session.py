"""One session: ingest -> decode -> VAD/segmenter (or simple chunker) -> model -> event log.

The stages run in one task group joined by bounded memory object streams. Closing the input
(end of upload, client gone, limit reached, shutdown) drains the pipeline, so every byte
received is decoded, segmented and sent to the model before the ``end`` event; only an explicit
cancel (``DELETE``, or a shutdown past its grace period) stops it short.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.audio.chunk import AudioChunk, ChunkSink
from service.audio.decoder import DecodeResult, decode
from service.audio.source import Doorbell
from service.config import MODEL_SAMPLE_RATE, PcmFormat, SessionConfig, config_to_dict
from service.errors import ErrorCode, OffsetMismatch, StoreUnavailable, StreamerError
from service.events.log import EventLog
from service.events.progress import LoggedProgress
from service.events.types import End, Error, Event, Segment
from service.model.simple import simple_stage
from service.vad.speech import VadOutput
from service.vad.stage import FlushDone, VadStage

if TYPE_CHECKING:
    from service.runtime import Runtime
    from service.session.journal import AudioJournal
    from service.store.base import Adoption

log = logging.getLogger(__name__)


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits


class SessionState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    ENDED = "ended"


class EndReason(StrEnum):
    COMPLETED = "completed"  # the client ended the upload
    CLIENT_DISCONNECTED = "client_disconnected"
    CANCELLED = "cancelled"  # DELETE
    ERROR = "error"  # bad audio or an internal failure; an error event says which
    SHUTDOWN = "shutdown"
    IDLE_TIMEOUT = "idle_timeout"
    DURATION_EXCEEDED = "duration_exceeded"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSTARTED_TIMEOUT = "unstarted_timeout"
    WORKER_LOST = "worker_lost"  # its owner's lease lapsed (shared store only)
    # Not an end for its clients: this worker shut down and another adopts the session (shared
    # store, resumable). No `end` event; only this worker's metrics see it.
    HANDED_OFF = "handed_off"


class InputClosed(Exception):
    """The session no longer takes audio (its pipeline ended or was stopped)."""


@dataclass(eq=False)
class Upload:
    """One connection's turn at feeding a session. A resumable session's upload can be
    superseded by one that continues it (the old connection may not have noticed yet that its
    client is gone): the old one's late bytes are then refused, so nothing arrives twice."""

    number: int
    # Set when this upload may feed no more (superseded, or the session's input closed): its
    # transport stops reading.
    stopped: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class Counters:
    bytes_in: int = 0
    samples: int = 0
    channels: int = 0
    finals: int = 0
    interims: int = 0
    errors: int = 0
    events: int = 0


def summarize(c: Counters, d: DecodeResult | None) -> dict[str, Any]:
    """What a session processed: the ``end`` event's and the status's counters. A function, so a
    shared store can describe a session that has no pipeline in this process."""
    return {
        "bytes": c.bytes_in,
        "audio_seconds": round(c.samples / MODEL_SAMPLE_RATE, 3),
        "channels": c.channels,
        "segments": c.finals,
        "interim_segments": c.interims,
        "errors": c.errors,
        "container": d.container if d else None,
        "codec": d.codec if d else None,
    }


def published_summary(session: Session) -> dict[str, Any]:
    """What a shared store publishes for status on other workers: the summary, and whether a
    resumable session is waiting for its upload."""
    return {**session.summary(), "awaiting_resume": session.awaiting_resume}


class Session:
    def __init__(self, session_id: str, config: SessionConfig, log_: EventLog, runtime: Runtime):
        self.id = session_id
        self.config = config
        self.log = log_
        self.runtime = runtime
        self.state = SessionState.CREATED
        self.created_at = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.counters = Counters()
        self.decode_result: DecodeResult | None = None
        self.error: StreamerError | None = None  # the first error that ended or marred input
        self.started = anyio.Event()
        self.done = anyio.Event()
        # Set once the session takes no more input (closed by a transport, or the decoder
        # stopped early): transports stop reading their client instead of waiting for it.
        self.input_closed = anyio.Event()
        self._input: MemoryObjectSendStream[bytes] | None = None
        # Rung after every chunk queued on _input and when it closes: the decoder waits on it.
        self._arrivals = Doorbell()
        self._input_reason: EndReason | None = None
        self._cancel_reason: EndReason | None = None
        self._scope: anyio.CancelScope | None = None
        self._t0 = time.monotonic()
        self.end_reason: EndReason | None = None
        self._store_error: StoreUnavailable | None = None
        self._sending = False  # a write is waiting for room in the pipeline's input
        # Decoded audio and decoding work not yet reported to the observer (see _decoded).
        self._unreported = (0, 0.0)
        self._vad: VadStage | None = None  # segmented mode, once the pipeline runs
        # The upload feeding the input now; None while a resumable session waits for one.
        self.upload: Upload | None = None
        self._uploads = 0
        self._detached_at: float | None = None  # time.monotonic() its last upload was cut
        self._upload_changed = anyio.Event()  # replaced after each set (one per change)
        self._sent = anyio.Event()  # set when a write that waited for room is delivered
        # Called when a resumable session's upload is cut (the registry publishes the offset).
        self.on_detach: Callable[[], None] | None = None
        # Shared store, resumable: where its received bytes are kept, so that another worker
        # can adopt the session should this one die (service/session/journal.py).
        self.journal: AudioJournal | None = None
        # An adopted session: what its log holds already, and whether the audio received
        # before the adoption has all gone into the pipeline again.
        self._logged: LoggedProgress | None = None
        self._replayed = anyio.Event()
        self._replayed.set()
        self._adopted_end: EndReason | None = None
        # Set by hand_off(): at its end, the session is handed over rather than ended, and
        # on_handoff (the registry) releases it to another worker.
        self._handoff = False
        self.on_handoff: Callable[[Session], Awaitable[None]] | None = None

    # -- ingest side ---------------------------------------------------------------------------

    def open_input(self, fmt: PcmFormat | None) -> MemoryObjectReceiveStream[bytes]:
        """Claim the session's single input. Called by the registry, which runs the pipeline."""
        if self.state is SessionState.RUNNING:
            raise StreamerError(ErrorCode.SESSION_BUSY, "this session already has an audio upload")
        if self.state is SessionState.ENDED or self._cancel_reason is not None:
            raise StreamerError(ErrorCode.SESSION_ENDED, "this session has ended; create a new one")
        if fmt is not None:
            self.config = self.config.with_format(fmt)
        # A few chunks of slack; past that the uploader waits (TCP/HTTP2 flow control).
        send, receive = anyio.create_memory_object_stream[bytes](8)
        self._input = send
        self._new_upload()
        self.state = SessionState.RUNNING
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.started.set()
        self.runtime.observer.session_started(self)
        return receive

    def open_adopted(self, adoption: Adoption) -> MemoryObjectReceiveStream[bytes]:
        """Take over a session whose owner died (with a shared store): its pipeline starts
        again here, fed first the audio received before (``run``'s ``replay``), emitting only
        what the log does not hold yet; then it waits for an upload that resumes it, as if its
        upload had just been cut (unless its input had ended: it then ends the same way)."""
        send, receive = anyio.create_memory_object_stream[bytes](8)
        self._input = send
        self.state = SessionState.RUNNING
        self.created_at, self.started_at = adoption.created_at, adoption.started_at
        # Its limits count from its first byte, on whichever worker that was.
        self._t0 = time.monotonic() - max(0.0, time.time() - adoption.started_at)
        logged = self._logged = adoption.logged
        c = self.counters
        c.bytes_in, c.finals, c.interims, c.errors = (
            adoption.received,
            logged.finals,
            logged.interims,
            logged.errors,
        )
        c.events = adoption.last_id
        self._replayed = anyio.Event()
        if adoption.input_end is not None:
            self._adopted_end = EndReason(adoption.input_end)
        else:
            self._detached_at = time.monotonic()  # waits for its upload from now on
        self.started.set()
        self.runtime.observer.session_started(self)
        return receive

    @property
    def awaiting_resume(self) -> bool:
        return self._detached_at is not None and not self.input_closed.is_set()

    def _new_upload(self) -> Upload:
        self._uploads += 1
        self.upload = Upload(self._uploads)
        self._detached_at = None
        self._changed()
        return self.upload

    def _changed(self) -> None:
        self._upload_changed.set()
        self._upload_changed = anyio.Event()

    async def resume_input(self, offset: int) -> Upload:
        """Continue a resumable session's input with a new upload, whose first byte is byte
        ``offset`` of the stream: it must be the number of bytes received (:class:`OffsetMismatch`
        otherwise). The decoder never stopped, so the stream goes on where it was cut."""
        if not self.config.resumable:
            raise StreamerError(
                ErrorCode.NOT_RESUMABLE,
                'this session was not created resumable ("resumable": true); create a new one',
            )
        if self.state is SessionState.CREATED:
            raise StreamerError(ErrorCode.SESSION_NOT_FOUND, "this session has no upload yet")
        while self._sending:  # a chunk in hand-off is counted already, but let it land first
            await self._sent.wait()
        if self.state is SessionState.ENDED or self.input_closed.is_set():
            # Ended, or ending: its input closed, or the decoder stopped (the audio's own end)
            raise StreamerError(ErrorCode.SESSION_ENDED, "this session has ended; create a new one")
        if offset != self.counters.bytes_in:
            raise OffsetMismatch(self.counters.bytes_in, offset)
        old = self.upload
        upload = self._new_upload()
        if old is not None:
            old.stopped.set()  # superseded: whatever it still reads is refused (write)
        log.info(
            "upload resumed",
            extra={"session_id": self.id, "offset": offset, "superseded": old is not None},
        )
        return upload

    def detach_input(self, upload: Upload | None) -> None:
        """``upload``'s client is gone (cut, or silent past the idle timeout). A resumable
        session keeps its pipeline and waits up to the grace period for an upload that resumes
        it; any other session's input ends (``client_disconnected``)."""
        if upload is not None and upload is not self.upload:
            return  # superseded already: the session belongs to a newer upload
        if not self.config.resumable or self._input is None:
            self.close_input(EndReason.CLIENT_DISCONNECTED)
            return
        if self.input_closed.is_set() or self._detached_at is not None:
            return  # ending anyway (its input closed, or the decoder reached the audio's end)
        if upload is not None:
            upload.stopped.set()
        self.upload = None
        self._detached_at = time.monotonic()
        self._changed()
        if self.journal is not None:
            self.journal.write_now()  # keep its exact offset, should this worker die
        log.info(
            "upload cut; awaiting resume",
            extra={"session_id": self.id, "offset": self.counters.bytes_in},
        )
        if self.on_detach is not None:
            self.on_detach()

    async def _expire_abandoned_input(self) -> None:
        """A resumable session's grace period: the input ends (``client_disconnected``, after
        everything received is processed) once no upload has fed it for that long."""
        grace = self.runtime.settings.resume_grace_seconds
        await self._replayed.wait()  # an adopted session's earlier audio goes in first
        while not self.input_closed.is_set():
            changed = self._upload_changed
            if self._detached_at is None:
                await changed.wait()
                continue
            remaining = self._detached_at + grace - time.monotonic()
            if remaining <= 0:
                self.close_input(EndReason.CLIENT_DISCONNECTED)
                return
            with anyio.move_on_after(remaining):
                await changed.wait()

    async def write(self, data: bytes, upload: Upload | None = None) -> None:
        """Feed upload bytes (from ``upload``, if given: a superseded one's are refused). Raises
        :class:`InputClosed` once the session (or this upload) takes no more."""
        if self._input is None or self._input_reason is not None:
            raise InputClosed
        if upload is not None and upload is not self.upload:
            raise InputClosed
        journal = self.journal
        if not self._replayed.is_set() or (journal is not None and journal.behind(self.id)):
            # An adopted session's earlier audio goes in first; and received audio is kept
            # before more is taken (the upload waits meanwhile: TCP flow control).
            await self._replayed.wait()
            if journal is not None:
                await journal.catch_up(self.id)
            if self._input_reason is not None or (upload is not None and upload is not self.upload):
                raise InputClosed
        settings = self.runtime.settings
        room = settings.max_upload_bytes - self.counters.bytes_in
        if len(data) > room:
            # Keep everything up to the limit: it was received, so it is processed.
            if room > 0:
                await self._send(data[:room])
            await self.fail_input(
                StreamerError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"upload exceeds {settings.max_upload_bytes} bytes; audio up to the limit "
                    "was processed",
                ),
                EndReason.PAYLOAD_TOO_LARGE,
            )
            raise InputClosed
        if time.monotonic() - self._t0 > settings.max_session_seconds:
            await self.fail_input(
                StreamerError(
                    ErrorCode.DURATION_EXCEEDED,
                    f"session exceeded {settings.max_session_seconds:g} s; audio up to the "
                    "limit was processed",
                ),
                EndReason.DURATION_EXCEEDED,
            )
            raise InputClosed
        await self._send(data)

    async def _send(self, data: bytes, *, received: bool = True) -> None:
        """Hand ``data`` to the decoder. ``received``: new bytes (counted, and journaled);
        False for an adopted session's earlier audio, counted and kept already."""
        assert self._input is not None
        if received:
            if self.journal is not None:
                self.journal.add(self.id, self.counters.bytes_in, data)
            self.counters.bytes_in += len(data)
            self.runtime.observer.bytes_received(self, len(data))
        try:
            try:
                # Without waiting when there is room: ``send`` would first yield to the loop,
                # a task switch per chunk that buys nothing here.
                self._input.send_nowait(data)
                self._arrivals.ring()
            except anyio.WouldBlock:
                # The pipeline is behind. This chunk was received, so it must reach it: neither
                # the input closing meanwhile (shutdown, the transport giving up on its client)
                # nor the caller being cancelled may withdraw it. The wait ends when the decoder
                # takes it or the pipeline ends (its receive side closes).
                self._sending = True
                try:
                    with anyio.CancelScope(shield=True):
                        await self._input.send(data)
                finally:
                    self._sending = False
                    self._sent.set()
                    self._sent = anyio.Event()
                    if self._input_reason is not None and self._replayed.is_set():
                        self._input.close()  # closed while this chunk waited: close now
                    self._arrivals.ring()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise InputClosed from None

    def close_input(self, reason: EndReason = EndReason.COMPLETED) -> None:
        """End of input: the pipeline drains everything received, then the session ends."""
        if self._input_reason is None:
            self._input_reason = reason
            if self.journal is not None and self._input is not None and not self._handoff:
                # An adopter ends it the same way, after its audio, not waiting for an upload.
                self.journal.end(self.id, self.counters.bytes_in, reason.value)
        if self._input is not None and not self._sending and self._replayed.is_set():
            # Else once the chunk in hand-off is delivered (_send), or the audio received
            # before an adoption has all gone in (_replay).
            self._input.close()
            self._arrivals.ring()
        if self.upload is not None:
            self.upload.stopped.set()
        self.input_closed.set()

    async def fail_input(self, error: StreamerError, reason: EndReason) -> None:
        """Stop taking input because of ``error`` (a limit, a protocol error); keep results."""
        if self._input_reason is None:
            self.error = self.error or error
            await self.emit(Error(error.code.value, error.message))
        self.close_input(reason)

    def hand_off(self) -> bool:
        """This worker shuts down: hand the session over to another worker instead of ending
        it, if its audio is all kept in the shared store (resumable). Its pipeline stops at
        once, without draining: the audio's end has not come (draining would flush the decoder
        and close the utterance in progress as if it had), and the adopter runs the pipeline
        again over the kept audio, doing what this worker had not finished. Returns False (and
        does nothing) otherwise."""
        journal = self.journal
        if (
            journal is None
            or not journal.keeps(self.id)
            or self.on_handoff is None
            or self.state is not SessionState.RUNNING
            or self._cancel_reason is not None
        ):
            return False
        self._handoff = True
        self.cancel(EndReason.SHUTDOWN)
        return True

    def finalize(self, done: FlushDone, channel: int | None = None) -> None:
        """End every open utterance (or only ``channel``'s) once the audio written so far has
        been segmented, without waiting for silence (Deepgram's ``Finalize``); ``done`` is told
        where each channel's ended (None: none was open). Raw PCM is placed exactly; with a
        container, the audio still inside the decoder (tens of ms) goes to what follows."""
        vad = self._vad
        if vad is None:  # simple mode, or no pipeline yet: nothing is segmented
            done(())
            return
        fmt = self.config.format
        if fmt is not None:
            at = self.counters.bytes_in // fmt.frame_bytes * MODEL_SAMPLE_RATE // fmt.sample_rate
        else:
            at = self.counters.samples
        vad.request_flush(at, done, channel)

    def cancel(self, reason: EndReason = EndReason.CANCELLED) -> None:
        """Stop now, dropping work in flight (DELETE, or shutdown past its grace period)."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self.close_input(reason)
        if self._scope is not None:
            self._scope.cancel()
        elif self.state is SessionState.CREATED:
            self.started.set()  # wakes the registry's watcher, which ends it

    # -- the pipeline --------------------------------------------------------------------------

    async def run(
        self,
        receive: MemoryObjectReceiveStream[bytes],
        replay: AsyncIterable[bytes] | None = None,
    ) -> None:
        """Run the pipeline until it ends. ``replay``: an adopted session's audio received
        before (:meth:`open_adopted`), fed in before any upload's."""
        try:
            with anyio.CancelScope() as self._scope:
                if not self.config.resumable:
                    await self._pipeline(receive)
                    return
                async with anyio.create_task_group() as watch:
                    if replay is not None:
                        watch.start_soon(self._replay, replay)
                    watch.start_soon(self._expire_abandoned_input)
                    await self._pipeline(receive)
                    watch.cancel_scope.cancel()  # the grace period has nothing left to end
        except Exception as exc:  # a bug in a stage must end this session only
            log.exception("session pipeline failed", extra={"session_id": self.id})
            self.error = self.error or StreamerError(ErrorCode.INTERNAL, "internal error")
            with anyio.CancelScope(shield=True):
                await self.emit(
                    Error(ErrorCode.INTERNAL.value, f"internal error ({type(exc).__name__})")
                )
        finally:
            with anyio.CancelScope(shield=True):
                await self.finish()

    async def _replay(self, replay: AsyncIterable[bytes]) -> None:
        """Feed an adopted session's earlier audio into its new pipeline."""
        try:
            async for data in replay:
                await self._send(data, received=False)
        except StoreUnavailable as exc:
            self.store_failed(exc)  # it cannot go on where the audio is missing
        except InputClosed:
            pass  # the pipeline stopped (cancelled, or the audio's own end)
        finally:
            self._replayed.set()
            if self._input_reason is not None and self._input is not None and not self._sending:
                self._input.close()  # its input ended meanwhile: now that everything is in
                self._arrivals.ring()
        log.info("adopted session replayed", extra={"session_id": self.id})
        if self._adopted_end is EndReason.CANCELLED:
            self.cancel(EndReason.CANCELLED)
        elif self._adopted_end is not None:
            self.close_input(self._adopted_end)

    async def _pipeline(self, receive: MemoryObjectReceiveStream[bytes]) -> None:
        async with anyio.create_task_group() as tg:
            if self.config.mode == "segmented":
                # Decoding feeds the VAD stage directly (no stream, no task between).
                speech_send, speech_recv = anyio.create_memory_object_stream[VadOutput](16)
                tg.start_soon(self._decode, receive, self._vad_stage(speech_send))
            else:
                # Simple mode needs an unbuffered hand-off so audio accumulates while
                # the model is busy (see model/simple.py).
                audio_send, audio_recv = anyio.create_memory_object_stream[AudioChunk](8)
                speech_send, speech_recv = anyio.create_memory_object_stream[VadOutput](0)
                tg.start_soon(self._decode, receive, audio_send)
                tg.start_soon(self._simple, audio_recv, speech_send)
            tg.start_soon(self._model, speech_recv)

    def _vad_stage(self, send: MemoryObjectSendStream[VadOutput]) -> VadStage:
        interval = self.config.interim_interval_ms / 1000 if self.config.interim_results else None
        self._vad = VadStage(
            send,
            batcher=self.runtime.batcher,
            params=self.config.vad,
            interim_interval_s=interval,
        )
        return self._vad

    async def _decode(self, receive: MemoryObjectReceiveStream[bytes], sink: ChunkSink) -> None:
        observer = self.runtime.observer
        # In segmented mode the VAD runs inside this task, so its span covers the same time.
        vad = observer.stage(self, "vad") if isinstance(sink, VadStage) else nullcontext()
        with observer.stage(self, "decode"), vad:
            try:
                async with receive:
                    try:
                        self.decode_result = await decode(
                            receive,
                            self.config.format,
                            sink,
                            on_chunk=self._decoded,
                            pool=self.runtime.decoders,
                            bell=self._arrivals,
                        )
                    except StreamerError as exc:
                        self.error = self.error or exc
                        await self.emit(Error(exc.code.value, exc.message))
                        if self._input_reason is None:
                            self._input_reason = EndReason.ERROR
            finally:
                self._report_decoded()
            self.input_closed.set()
            if self.upload is not None:
                self.upload.stopped.set()

    def _decoded(self, chunk: AudioChunk, busy_s: float) -> None:
        # The live audio position, for status and the `end` summary (right even when decoding
        # fails half way); counted here rather than by a relay task, one hop fewer per chunk.
        self.counters.samples, self.counters.channels = chunk.end, chunk.channels
        # Reported to the observer per second of audio, not per chunk: a live chunk is 20-250
        # ms, and three histogram observations for each, at hundreds of streams, were a few
        # percent of the event loop (cProfile) for a real-time factor of microseconds per chunk.
        samples, busy = self._unreported
        samples, busy = samples + chunk.frames, busy + busy_s
        if samples >= MODEL_SAMPLE_RATE:
            self.runtime.observer.audio_decoded(self, samples, busy)
            samples, busy = 0, 0.0
        self._unreported = (samples, busy)

    def _report_decoded(self) -> None:
        samples, busy = self._unreported
        if samples:
            self.runtime.observer.audio_decoded(self, samples, busy)
        self._unreported = (0, 0.0)

    async def _simple(
        self, audio: MemoryObjectReceiveStream[AudioChunk], send: MemoryObjectSendStream[VadOutput]
    ) -> None:
        with self.runtime.observer.stage(self, "vad"):
            await simple_stage(audio, send)

    async def _model(self, receive: MemoryObjectReceiveStream[VadOutput]) -> None:
        with self.runtime.observer.stage(self, "model"):
            # Simple mode sends the model one call at a time (audio accumulates meanwhile).
            await self.runtime.models.run_stage(
                receive,
                self.emit,
                one_at_a_time=self.config.mode != "segmented",
                logged=self._logged,
            )

    async def emit(self, event: Event, received_at: float | None = None) -> None:
        if self.log.closed:
            return
        if self._store_error is not None and not isinstance(event, Error | End):
            return  # results can no longer reach anyone; only the ending is worth a try
        try:
            await self.log.append(event)
        except StoreUnavailable as exc:
            self.store_failed(exc)
            return
        c = self.counters
        c.events += 1
        if isinstance(event, Segment):
            if event.is_final:
                c.finals += 1
            else:
                c.interims += 1
        elif isinstance(event, Error):
            c.errors += 1
        lag = None if received_at is None else time.monotonic() - received_at
        self.runtime.observer.event_emitted(self, event, lag)

    def store_failed(self, error: StoreUnavailable) -> None:
        """The shared event log cannot take this session's events (Redis down, or this worker
        lost the session's lease): nothing it produces can reach a subscriber, so stop now."""
        if self._store_error is not None:
            return
        self._store_error = error
        # Outranks an earlier error for the upload's response: the results themselves are lost.
        self.error = error
        self.cancel(EndReason.ERROR)

    async def finish(self) -> None:
        """End the session once: the ``end`` event, then close the log."""
        if self.state is SessionState.ENDED:
            return
        reason = self._cancel_reason or self._input_reason or EndReason.COMPLETED
        if self.error is not None and reason is EndReason.COMPLETED:
            reason = EndReason.ERROR
        self.state = SessionState.ENDED
        self.ended_at = time.time()
        if reason is EndReason.SHUTDOWN and await self._handed_over():
            self.end_reason = EndReason.HANDED_OFF
            await self.log.close()  # here; the log goes on, written by the adopter
            self.runtime.observer.session_ended(self)
            self.started.set()
            self.done.set()
            return
        self.end_reason = reason
        if self._store_error is not None:
            # Reaches subscribers only if the store is back; the upload's response says it anyway.
            await self.emit(Error(self._store_error.code.value, self._store_error.message))
        await self.emit(End(reason.value, self.summary()))
        await self.log.close()
        self.runtime.observer.session_ended(self)
        self.started.set()
        self.done.set()

    async def _handed_over(self) -> bool:
        """At a shutdown's end: hand the session over (see :meth:`hand_off`) once its journal
        holds every byte received. False if it cannot be: it then ends ``shutdown``."""
        if not self._handoff or self._store_error is not None or self.on_handoff is None:
            return False
        assert self.journal is not None
        with anyio.move_on_after(self.runtime.settings.redis_timeout_seconds * 2):
            if await self.journal.flush(self.id):
                await self.on_handoff(self)
                log.info(
                    "session handed over to another worker",
                    extra={"session_id": self.id, "offset": self.counters.bytes_in},
                )
                return True
        return False

    # -- views ---------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return summarize(self.counters, self.decode_result)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "last_event_id": self.log.last_id,
            "config": config_to_dict(self.config),
            # Bytes received: where a resumed upload continues (HEAD .../audio: Upload-Offset).
            "upload_offset": self.counters.bytes_in,
            "awaiting_resume": self.awaiting_resume,
            **self.summary(),
        }
