"""Prometheus metrics: what an operator of a streaming service watches.

Every metric lives on the app's own :class:`CollectorRegistry`, never the process-wide default:
several apps run in one test process, and an app's figures must be its own. ``docs/operators.md``
says what each metric tells.

The real-time factor (processing seconds / audio seconds) is measured per stage as the seed
does, with the seed's histogram names under our ``streamer_`` prefix and its stage names as the
``stage`` label: ``audio_decoding`` (one observation per decoded chunk, decoding work only, not
waits for the network), ``vad_processing`` (one per cross-session batch, onnxruntime time over
the stream-seconds in the batch) and ``model_inference`` (one per model call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from service.audio.packets import TURNAROUND_WINDOW_S, Turnaround
from service.config import MODEL_SAMPLE_RATE
from service.errors import ErrorCode, StreamerError
from service.events.types import Error, Event, Segment
from service.model.engine import CallTrace, ModelCall, ModelEngine, ModelObserver
from service.observability.loop import SAMPLE_S, WINDOW_S, LoopLoad
from service.session.admission import AdmissionPacer
from service.session.observer import SessionObserver
from service.session.session import EndReason
from service.vad.silero import FRAME

if TYPE_CHECKING:
    from service.session.session import Session

T = TypeVar("T")

# The seed's stage names, as the value of the ``stage`` label.
DECODE, VAD, MODEL = "audio_decoding", "vad_processing", "model_inference"
STAGES = (DECODE, VAD, MODEL)

# The seed's RTF buckets, with three below its 0.01: decoding and batched Silero run at RTF
# ~0.001-0.005 here, which would otherwise all land in the first bucket.
RTF_BUCKETS = (
    *(0.001, 0.0025, 0.005),
    *(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0),
    *(4.0, 6.0, 8.0, 10.0, 15.0),
)
# The seed's duration buckets, with finer ones below 0.25 s: decoded chunks and VAD batches
# hold tens of milliseconds of audio.
MEDIA_BUCKETS = (
    *(0.02, 0.05, 0.1),
    *(0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 90.0),
    *(120.0, 300.0),
)
PROCESSING_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SESSION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
# An idle loop wakes a sleeper within ~1 ms (epoll's millisecond timeout); a loaded one later.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Event types as labelled: the API's, with segments split by finality (finals are the product;
# interims are optional extras whose volume and lag differ).
EVENT_TYPES = ("active", "inactive", "final", "interim", "error", "lagging", "end")
MODEL_OUTCOMES = {
    None: "ok",
    ErrorCode.MODEL_FAILED.value: "failed",
    ErrorCode.MODEL_PANIC.value: "panic",
    ErrorCode.INTERNAL.value: "panic",
}
# Why a new session was turned away (streamer_sessions_refused_total's label).
REFUSAL_CAUSES = ("max_sessions", "event_loop", "opus_decoder", "model")


def event_type(event: Event) -> str:
    if isinstance(event, Segment):
        return "final" if event.is_final else "interim"
    return event.type


class Metrics:
    """The app's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        # No "<name>_created" timestamp series: they double the series count and nothing here
        # reads them (Prometheus detects counter resets by itself). A process-wide switch.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        # The real-time-factor set, per stage.
        self.media = Histogram(
            "streamer_media_duration_seconds",
            "Audio processed per unit of work (decoded chunk, VAD batch, model call)",
            ["stage"],
            buckets=MEDIA_BUCKETS,
            registry=r,
        )
        self.processing = Histogram(
            "streamer_processing_duration_seconds",
            "Processing time per unit of work (decoded chunk, VAD batch, model call)",
            ["stage"],
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "streamer_rtf",
            "Real-time factor per unit of work: processing seconds / audio seconds",
            ["stage"],
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self._rtf_children: dict[str, tuple[Histogram, Histogram, Histogram]] = {}

        # Sessions.
        self.sessions_active = Gauge(
            "streamer_sessions_active",
            "Sessions not yet ended: created (waiting for audio) or running",
            ["state"],
            registry=r,
        )
        self.sessions_created = Counter("streamer_sessions_created", "Sessions created", registry=r)
        self.sessions_ended = Counter(
            "streamer_sessions_ended", "Sessions ended, by end reason", ["reason"], registry=r
        )
        self.session_duration = Histogram(
            "streamer_session_duration_seconds",
            "Wall-clock length of ended sessions, from first audio (or creation) to end",
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        self.subscribers = Gauge(
            "streamer_subscribers_active", "Open SSE event streams", registry=r
        )

        # In and out.
        self.bytes_in = Counter(
            "streamer_received_bytes", "Audio bytes received (uploads and WebSocket)", registry=r
        )
        self.audio_in = Counter(
            "streamer_received_audio_seconds",
            "Audio decoded, in seconds per channel (16 kHz samples / 16000)",
            registry=r,
        )
        self.events = Counter("streamer_events", "Events emitted, by type", ["type"], registry=r)
        self.event_lag = Histogram(
            "streamer_event_lag_seconds",
            "From the arrival of the audio that produced an event to its emission",
            ["type"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "streamer_errors",
            "Errors reported to clients (error events and HTTP error responses), by code",
            ["code"],
            registry=r,
        )

        # The model and its shared worker threads.
        self.model_calls = Counter(
            "streamer_model_calls",
            "Model calls, by kind (final/interim) and outcome (ok/failed/panic)",
            ["kind", "outcome"],
            registry=r,
        )
        self.model_queue_wait = Histogram(
            "streamer_model_queue_wait_seconds",
            "Time a model call waited in the model engine's queue before its batch started",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.model_batches = Counter(
            "streamer_model_batches",
            "Calls into the model (an infer_batch of several items, or one infer); its rate is "
            "the model's calls per second",
            registry=r,
        )
        self.model_batch_size = Histogram(
            "streamer_model_batch_size",
            "Items (utterances or interims, across sessions) per call into the model",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_dropped = Counter(
            "streamer_model_dropped_calls",
            "Model calls that never ran: overloaded (a final the full queue could not hold: "
            "its session got a model_overloaded error) or superseded (an interim replaced by "
            "a newer one, or dropped while its final was pending)",
            ["reason"],
            registry=r,
        )
        self.sessions_adopted = Counter(
            "streamer_sessions_adopted",
            "Resumable sessions this worker took over from a worker that died (shared store): "
            "their audio so far was processed again here, and their upload goes on here",
            registry=r,
        )
        self.sessions_refused = Counter(
            "streamer_sessions_refused",
            "New sessions turned away (503 too_many_sessions / server_overloaded), by cause: "
            "max_sessions, event_loop, opus_decoder, model",
            ["cause"],
            registry=r,
        )
        self._engine: ModelEngine | None = None
        self._pacer: AdmissionPacer | None = None
        Gauge(
            "streamer_sessions_waiting",
            "New sessions waiting their turn while the event loop is busy "
            "(STREAMER_ADMIT_PACE_LOOP_BUSY)",
            registry=r,
        ).set_function(lambda: self._pacer.waiting if self._pacer else 0)
        depth = Gauge(
            "streamer_model_queue_depth",
            "Model calls queued in the engine, not yet running, by kind (final/interim)",
            ["kind"],
            registry=r,
        )
        depth.labels("final").set_function(
            lambda: self._engine.queued_finals if self._engine else 0
        )
        depth.labels("interim").set_function(
            lambda: self._engine.queued_interims if self._engine else 0
        )
        Gauge(
            "streamer_model_queue_audio_seconds",
            "Audio queued for the model across the process (bounded by "
            "STREAMER_MODEL_QUEUE_MAX_SECONDS)",
            registry=r,
        ).set_function(
            lambda: self._engine.queued_samples / MODEL_SAMPLE_RATE if self._engine else 0.0
        )
        Gauge(
            "streamer_model_queue_oldest_seconds",
            "How long the longest-waiting queued final has waited for the model",
            registry=r,
        ).set_function(lambda: self._engine.oldest_wait_s() if self._engine else 0.0)
        Gauge(
            "streamer_model_wait_seconds",
            "What admission reads: the oldest queued final's wait, or the mean wait of finals "
            "over the last 2 s if longer; new sessions get 503 server_overloaded above "
            "STREAMER_ADMIT_MAX_MODEL_WAIT_MS",
            registry=r,
        ).set_function(lambda: self._engine.wait_s() if self._engine else 0.0)
        self._model_limiter: anyio.CapacityLimiter | None = None
        Gauge("streamer_model_threads", "Worker threads for model calls", registry=r).set_function(
            lambda: self._limiter_stat("total")
        )
        Gauge(
            "streamer_model_threads_busy", "Worker threads running a model call", registry=r
        ).set_function(lambda: self._limiter_stat("borrowed"))
        Gauge(
            "streamer_model_calls_waiting", "Model calls waiting for a worker thread", registry=r
        ).set_function(lambda: self._limiter_stat("waiting"))

        # Cross-session VAD batching.
        self.vad_batch_streams = Histogram(
            "streamer_vad_batch_streams",
            "Streams (session channels) in one VAD batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

        # The one event loop that every session shares: how busy and how late it is says what
        # one process has left before its streams fall behind (BENCHMARKS.md).
        self.loop_lag = Histogram(
            "streamer_event_loop_lag_seconds",
            f"How much later than asked the event loop wakes a task sleeping {SAMPLE_S:g} s: "
            "its backlog of ready work, a long callback or a GC pause",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self._loop_load: LoopLoad | None = None
        Gauge(
            "streamer_event_loop_busy_ratio",
            f"Fraction of the last {WINDOW_S:g} s the event loop was not waiting for I/O; new "
            "sessions get 503 server_overloaded above STREAMER_ADMIT_MAX_LOOP_BUSY",
            registry=r,
        ).set_function(lambda: self._loop_load.busy if self._loop_load is not None else 0.0)
        self._turnaround: Turnaround | None = None
        Gauge(
            "streamer_opus_decode_batch_seconds",
            f"Mean time of the Opus decoder's batches over the last {TURNAROUND_WINDOW_S:g} s (or "
            "the batch out now, if longer): what decoding adds to webm/Ogg streams' lag; new "
            "sessions get 503 server_overloaded above STREAMER_ADMIT_MAX_DECODE_MS",
            registry=r,
        ).set_function(lambda: self._turnaround.seconds() if self._turnaround else 0.0)

        # Every known label value from the start, at zero: rate() and alerts need the series
        # to exist before the first event.
        for stage in STAGES:
            for h in (self.media, self.processing, self.rtf):
                h.labels(stage)
        for state in ("created", "running"):
            self.sessions_active.labels(state)
        for reason in EndReason:
            self.sessions_ended.labels(reason.value)
        for t in EVENT_TYPES:
            self.events.labels(t)
            if t != "end":
                self.event_lag.labels(t)
        for code in ErrorCode:
            self.errors.labels(code.value)
        for kind in ("final", "interim"):
            for outcome in ("ok", "failed", "panic", "overloaded"):
                self.model_calls.labels(kind, outcome)
        for dropped in ("overloaded", "superseded"):
            self.model_dropped.labels(dropped)
        for cause in REFUSAL_CAUSES:
            self.sessions_refused.labels(cause)

    def watch_model_limiter(self, limiter: anyio.CapacityLimiter) -> None:
        """Expose the model threads' capacity in use (read at scrape time)."""
        self._model_limiter = limiter

    def watch_pacer(self, pacer: AdmissionPacer) -> None:
        """Expose how many new sessions wait their turn (read at scrape time)."""
        self._pacer = pacer

    def watch_engine(self, engine: ModelEngine) -> None:
        """Expose the model engine's queue (read at scrape time)."""
        self._engine = engine

    def _limiter_stat(self, which: str) -> float:
        limiter = self._model_limiter
        if limiter is None:
            return 0.0
        if which == "total":
            return float(limiter.total_tokens)
        if which == "borrowed":
            return float(limiter.borrowed_tokens)
        return float(limiter.statistics().tasks_waiting)

    def observe_rtf(self, stage: str, media_s: float, processing_s: float) -> None:
        if media_s <= 0:
            return
        # Children resolved once per stage: ``labels()`` takes a lock and builds a key, and the
        # decode stage observes every chunk of every live stream.
        children = self._rtf_children.get(stage)
        if children is None:
            children = self._rtf_children[stage] = (
                self.media.labels(stage),
                self.processing.labels(stage),
                self.rtf.labels(stage),
            )
        media, processing, rtf = children
        media.observe(media_s)
        processing.observe(processing_s)
        rtf.observe(processing_s / media_s)

    def watch_decoder(self, turnaround: Turnaround) -> None:
        """Expose how long the Opus decoder's batches take (read at scrape time)."""
        self._turnaround = turnaround

    def watch_loop(self, load: LoopLoad) -> None:
        """Expose how busy the event loop is (read at scrape time); ``load`` feeds the lag
        histogram with ``self.loop_lag.observe``."""
        self._loop_load = load

    def vad_batch(self, seconds: float, streams: int, frames: int) -> None:
        """:class:`VadBatcher`'s ``on_batch``: one batch's compute time over its stream-seconds."""
        self.observe_rtf(VAD, frames * FRAME / MODEL_SAMPLE_RATE, seconds)
        self.vad_batch_streams.observe(streams)

    def count_errors(
        self, handler: Callable[[Request, Exception], Awaitable[Response]]
    ) -> Callable[[Request, Exception], Awaitable[Response]]:
        """Wrap the app's ``StreamerError`` handler so errors answered over HTTP (bad config,
        unknown session, too many sessions, ...) count like error events do."""

        async def counted(request: Request, exc: Exception) -> Response:
            if isinstance(exc, StreamerError):
                self.errors.labels(exc.code.value).inc()
            return await handler(request, exc)

        return counted

    async def endpoint(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text format (OpenMetrics if the scraper asks for it)."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.registry), headers={"Content-Type": content_type})


class MetricsObserver(SessionObserver, ModelObserver):
    """Feeds :class:`Metrics` from the session and model hooks. Model hooks run in worker
    threads; prometheus-client metrics are thread-safe."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    # -- sessions ------------------------------------------------------------------------------

    def session_created(self, session: Session) -> None:
        self.m.sessions_created.inc()
        self.m.sessions_active.labels("created").inc()

    def session_started(self, session: Session) -> None:
        self.m.sessions_active.labels("created").dec()
        self.m.sessions_active.labels("running").inc()

    def session_adopted(self, session: Session) -> None:
        self.m.sessions_adopted.inc()

    def session_ended(self, session: Session) -> None:
        m = self.m
        started = session.started_at is not None
        m.sessions_active.labels("running" if started else "created").dec()
        reason = session.end_reason.value if session.end_reason else "unknown"
        m.sessions_ended.labels(reason).inc()
        begin = session.started_at if session.started_at is not None else session.created_at
        if session.ended_at is not None:
            m.session_duration.observe(max(0.0, session.ended_at - begin))

    def bytes_received(self, session: Session, n: int) -> None:
        self.m.bytes_in.inc(n)

    def audio_decoded(self, session: Session, samples: int, busy_s: float) -> None:
        seconds = samples / MODEL_SAMPLE_RATE
        self.m.audio_in.inc(seconds)
        self.m.observe_rtf(DECODE, seconds, busy_s)

    def event_emitted(self, session: Session, event: Event, lag_s: float | None) -> None:
        kind = event_type(event)
        self.m.events.labels(kind).inc()
        if lag_s is not None:
            self.m.event_lag.labels(kind).observe(max(0.0, lag_s))
        if isinstance(event, Error):
            self.m.errors.labels(event.code).inc()

    def subscriber(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        return _counted(events, self.m.subscribers)

    # -- model calls (worker threads) ----------------------------------------------------------

    def call_queued(self, call: ModelCall) -> CallTrace:
        return _CallMetrics(self.m, call)

    def batch_finished(self, size: int, audio_s: float, seconds_taken: float) -> None:
        # One observation per call into the model: its real-time factor is the batch's time
        # over all the audio in it, what the model really costs per audio second.
        self.m.model_batches.inc()
        self.m.model_batch_size.observe(size)
        self.m.observe_rtf(MODEL, audio_s, seconds_taken)

    def call_dropped(self, call: ModelCall, reason: str) -> None:
        self.m.model_dropped.labels(reason).inc()
        if reason == "overloaded":
            self.m.model_calls.labels("final" if call.is_final else "interim", reason).inc()

    def session_refused(self, cause: str) -> None:
        self.m.sessions_refused.labels(cause).inc()


class _CallMetrics:
    __slots__ = ("call", "m")

    def __init__(self, m: Metrics, call: ModelCall) -> None:
        self.m, self.call = m, call

    def started(self, queued_s: float, batch_size: int) -> None:
        self.m.model_queue_wait.observe(max(0.0, queued_s))

    def finished(self, seconds_taken: float, error: str | None, exc: BaseException | None) -> None:
        kind = "final" if self.call.is_final else "interim"
        self.m.model_calls.labels(kind, MODEL_OUTCOMES.get(error, "panic")).inc()


async def _counted(events: AsyncIterator[T], gauge: Gauge) -> AsyncIterator[T]:
    # Counted from the first read, not from creation: a HEAD request builds the stream but
    # never reads it, and nothing would ever close it.
    gauge.inc()
    try:
        async for item in events:
            yield item
    finally:
        gauge.dec()
        # sse-starlette closes the stream it was given (this one); pass that on, so the log
        # follower's own cleanup runs now rather than at garbage collection.
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
