"""OpenTelemetry traces: a span per session, with child spans for decode, VAD and each model call.

The session span's parent is the session config's ``trace_id`` (a W3C ``traceparent``; the only
way a browser's WebSocket can pass one) or else the request that created the session: the ASGI
instrumentation's server span, itself parented by the request's ``traceparent`` header. The
pipeline runs in the registry's task group, outside any request, so the parent is captured at
creation and carried explicitly; the request that uploads the audio, if it is another trace,
becomes a link.

Configured only by the standard ``OTEL_*`` variables, read once in ``create_app``. Unlike the
OpenTelemetry default, nothing is exported unless ``OTEL_TRACES_EXPORTER`` says so (``console``,
``otlp``); ``otlp`` needs the optional ``otlp`` extra. Spans are still made without an exporter:
their trace ids are what log lines carry, so logs correlate with the caller's trace.
"""

from __future__ import annotations

import importlib
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.middleware import Middleware

from service.config import MODEL_SAMPLE_RATE
from service.events.types import Error, Event
from service.model.engine import CallTrace, ModelCall, ModelObserver
from service.session.observer import SessionObserver

if TYPE_CHECKING:
    from service.session.session import Session

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "streamer"
# Scrapes and probes every few seconds would bury the sessions.
UNTRACED_URLS = "/metrics$,/healthz$,/readyz$"
_OTLP_EXPORTERS = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}
_W3C = TraceContextTextMapPropagator()


def parent_from_traceparent(value: str | None) -> otel_context.Context | None:
    """A context whose (remote) span is the one a W3C ``traceparent`` names; None if invalid."""
    if not value:
        return None
    ctx = _W3C.extract({"traceparent": value.strip()})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def trace_id_hex(span_context: trace.SpanContext) -> str | None:
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None


def _exporters_from_env(env: Mapping[str, str]) -> list[SpanExporter]:
    names = [
        n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()
    ]
    if "none" in names:
        return []
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = env.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            module_name = _OTLP_EXPORTERS.get(protocol)
            if module_name is None:
                log.warning("OTLP protocol %r is not supported; traces are not exported", protocol)
                continue
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                log.warning(
                    "OTEL_TRACES_EXPORTER=otlp needs the exporter package (%s): install the "
                    "'otlp' extra (pip install 'streamer[otlp]'); traces are not exported",
                    module_name.rsplit(".", 2)[0],
                )
                continue
            # Reads OTEL_EXPORTER_OTLP_* (endpoint, headers, timeout) itself.
            exporters.append(module.OTLPSpanExporter())
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (use console or otlp)", name)
    return exporters


class Tracing:
    """The app's tracer provider, built from ``OTEL_*`` variables. Exporting starts with
    :meth:`start` (the lifespan) and is flushed by :meth:`shutdown`: a BatchSpanProcessor owns a
    thread, which an app that is created but never served must not leave behind."""

    def __init__(self, provider: TracerProvider, processors: list[Callable[[], SpanProcessor]]):
        self.provider = provider
        self._processors = processors
        self.tracer = provider.get_tracer("service")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], exporter: SpanExporter | None = None
    ) -> Tracing | None:
        """``None`` when ``OTEL_SDK_DISABLED=true``. ``exporter`` (tests) gets every span at once,
        through a SimpleSpanProcessor, in addition to whatever the environment configures.
        ``env`` chooses the exporters; the SDK reads the resource and sampler variables from
        the process environment itself."""
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); lifespan shutdown flushes, so no
        # atexit hook (which would keep every test app's provider alive).
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        processors: list[Callable[[], SpanProcessor]] = []
        for e in _exporters_from_env(env):
            processors.append(partial(BatchSpanProcessor, e))
        if exporter is not None:
            processors.append(partial(SimpleSpanProcessor, exporter))
        return cls(provider, processors)

    def start(self) -> None:
        for make in self._processors:
            self.provider.add_span_processor(make())
        self._processors = []

    def shutdown(self) -> None:
        """Blocking (flushes the exporters): call it in a worker thread."""
        self.provider.shutdown()

    def middleware(self) -> Middleware:
        return Middleware(
            OpenTelemetryMiddleware,
            tracer_provider=self.provider,
            excluded_urls=UNTRACED_URLS,
            # One span per ASGI message would be one per audio chunk and per SSE event.
            exclude_spans=["receive", "send"],
        )


@dataclass
class _SessionTrace:
    span: Span
    context: otel_context.Context  # the session span as parent, for the stages
    linked: frozenset[int] = frozenset()  # trace ids already linked
    decode_busy_s: float = 0.0
    decoded_samples: int = 0
    utterances: int = 0


class TracingObserver(SessionObserver, ModelObserver):
    """Session, stage and model-call spans."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        # Keyed by the session object itself, so a session that is dropped without ending
        # (it should not happen) cannot leak its span state.
        self._sessions: weakref.WeakKeyDictionary[Session, _SessionTrace] = (
            weakref.WeakKeyDictionary()
        )

    def trace_id(self, session: Session) -> str | None:
        """The session's trace id (hex), for log lines."""
        st = self._sessions.get(session)
        return trace_id_hex(st.span.get_span_context()) if st is not None else None

    # -- the session span ----------------------------------------------------------------------

    def session_created(self, session: Session) -> None:
        current = trace.get_current_span().get_span_context()
        parent = parent_from_traceparent(session.config.trace_id)
        if parent is None:
            if session.config.trace_id:
                log.warning(
                    "trace_id is not a valid W3C traceparent; ignored",
                    extra={"session_id": session.id, "given": session.config.trace_id[:100]},
                )
            parent = otel_context.get_current()
        links = (
            [Link(current, {"streamer.link": "request"})] if _other_trace(current, parent) else None
        )
        span = self.tracer.start_span(
            "session",
            context=parent,
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={
                "streamer.session.id": session.id,
                "streamer.session.mode": session.config.mode,
                "streamer.session.interim_results": session.config.interim_results,
            },
        )
        self._sessions[session] = _SessionTrace(
            span,
            trace.set_span_in_context(span),
            linked=frozenset({current.trace_id}) if links else frozenset(),
        )

    def session_started(self, session: Session) -> None:
        st = self._sessions.get(session)
        if st is None:
            return
        # Runs in the request that brings the audio: if that is another trace, link it.
        current = trace.get_current_span().get_span_context()
        if _other_trace(current, st.context) and current.trace_id not in st.linked:
            st.span.add_link(current, {"streamer.link": "audio upload"})
            st.linked |= {current.trace_id}
        fmt = session.config.format
        st.span.add_event(
            "audio started", {"streamer.format": fmt.encoding if fmt is not None else "auto"}
        )

    def event_emitted(self, session: Session, event: Event, lag_s: float | None) -> None:
        st = self._sessions.get(session)
        if st is None:
            return
        if isinstance(event, Error):
            st.span.add_event(
                "error",
                {"streamer.error.code": event.code, "streamer.error.message": event.message},
            )
        elif event.type == "inactive":
            st.utterances += 1

    def audio_decoded(self, session: Session, samples: int, busy_s: float) -> None:
        st = self._sessions.get(session)
        if st is not None:
            st.decoded_samples += samples
            st.decode_busy_s += busy_s

    def session_ended(self, session: Session) -> None:
        st = self._sessions.pop(session, None)
        if st is None:
            return
        summary = session.summary()
        span = st.span
        span.set_attributes(
            {
                "streamer.session.end_reason": session.end_reason.value
                if session.end_reason
                else "unknown",
                "streamer.audio.bytes": int(summary["bytes"]),
                "streamer.audio.seconds": float(summary["audio_seconds"]),
                "streamer.audio.channels": int(summary["channels"]),
                "streamer.segments": int(summary["segments"]),
                "streamer.interim_segments": int(summary["interim_segments"]),
                "streamer.errors": int(summary["errors"]),
            }
        )
        if session.error is not None:
            span.set_status(Status(StatusCode.ERROR, session.error.code.value))
        span.end()

    # -- stages --------------------------------------------------------------------------------

    def stage(self, session: Session, name: str) -> AbstractContextManager[Any]:
        return self._stage(session, name)

    @contextmanager
    def _stage(self, session: Session, name: str) -> Iterator[None]:
        st = self._sessions.get(session)
        if st is None:
            yield
            return
        if name == "model":
            # No span of its own: each model call gets one, a direct child of the session.
            token = otel_context.attach(st.context)
            try:
                yield
            finally:
                otel_context.detach(token)
            return
        span = self.tracer.start_span(name, context=st.context)
        token = otel_context.attach(trace.set_span_in_context(span, st.context))
        try:
            yield
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            otel_context.detach(token)
            if name == "decode":
                d = session.decode_result
                span.set_attributes(
                    {
                        "streamer.audio.samples": st.decoded_samples,
                        "streamer.decode.busy_seconds": st.decode_busy_s,
                        **({"streamer.audio.container": d.container} if d else {}),
                        **({"streamer.audio.codec": d.codec} if d else {}),
                    }
                )
            elif name == "vad":
                span.set_attribute("streamer.vad.utterances", st.utterances)
            span.end()

    # -- model calls ---------------------------------------------------------------------------

    def call_queued(self, call: ModelCall) -> CallTrace:
        # Called on the event loop inside the session's model stage, whose context holds the
        # session span; the call itself runs in a worker thread, so the parent is passed on.
        return _CallSpan(self.tracer, call, otel_context.get_current())


class _CallSpan:
    """A model call's span: from the start of its batch in the worker thread to its outcome."""

    __slots__ = ("call", "parent", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, call: ModelCall, parent: otel_context.Context) -> None:
        self.tracer, self.call, self.parent = tracer, call, parent
        self.span: Span | None = None

    def started(self, queued_s: float, batch_size: int) -> None:
        call = self.call
        self.span = self.tracer.start_span(
            "model",
            context=self.parent,
            attributes={
                "streamer.model.channel": call.channel,
                "streamer.model.start_time": call.start / MODEL_SAMPLE_RATE,
                "streamer.model.end_time": call.end / MODEL_SAMPLE_RATE,
                "streamer.model.audio_seconds": (call.end - call.start) / MODEL_SAMPLE_RATE,
                "streamer.model.is_final": call.is_final,
                "streamer.model.queued_seconds": queued_s,
                "streamer.model.batch_size": batch_size,
            },
        )

    def finished(self, seconds_taken: float, error: str | None, exc: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        if error is not None:
            if exc is not None:
                span.record_exception(exc)
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def _fail(span: Span, exc: Exception, code: str) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", code)
    span.set_status(Status(StatusCode.ERROR, code))


def _other_trace(current: trace.SpanContext, parent: otel_context.Context) -> bool:
    """Whether ``current`` is a real span of another trace than ``parent``'s (worth a link)."""
    if not current.is_valid:
        return False
    return current.trace_id != trace.get_current_span(parent).get_span_context().trace_id
