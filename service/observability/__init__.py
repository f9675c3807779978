"""Metrics, traces and structured logs, assembled once per app by :class:`Observability`.

``create_app`` builds one (nothing happens at import), hands its observers to the pipeline,
mounts ``/metrics`` and the ASGI tracing middleware, starts exporting in the lifespan and
flushes at shutdown. ``docs/operators.md`` describes every metric.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.middleware import Middleware

from service.model.engine import ModelEngine, ModelObserver
from service.observability.fanout import FanOutModelObserver, FanOutObserver
from service.observability.logs import LogContextObserver
from service.observability.metrics import Metrics, MetricsObserver
from service.observability.tracing import Tracing, TracingObserver
from service.session.observer import SessionObserver

__all__ = ["Metrics", "Observability", "Tracing"]


@dataclass
class Observability:
    metrics: Metrics
    tracing: Tracing | None
    session_observer: SessionObserver
    model_observer: ModelObserver

    @classmethod
    def create(
        cls,
        *,
        observer: SessionObserver | None = None,
        span_exporter: SpanExporter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Observability:
        """``observer``: an extra session observer, called after ours. ``span_exporter``: gets
        every finished span (tests use an in-memory one). ``environ``: the ``OTEL_*`` variables
        (default ``os.environ``)."""
        metrics = Metrics()
        tracing = Tracing.from_env(os.environ if environ is None else environ, span_exporter)
        metrics_observer = MetricsObserver(metrics)
        tracing_observer = TracingObserver(tracing.tracer) if tracing is not None else None
        # Logs first: its session_ended line still finds the session's trace id.
        sessions: list[SessionObserver] = [
            LogContextObserver(tracing_observer.trace_id if tracing_observer else None),
            metrics_observer,
        ]
        models: list[ModelObserver] = [metrics_observer]
        if tracing_observer is not None:
            sessions.append(tracing_observer)
            models.append(tracing_observer)
        if observer is not None:
            sessions.append(observer)
        return cls(metrics, tracing, FanOutObserver(sessions), FanOutModelObserver(models))

    def middleware(self) -> list[Middleware]:
        return [self.tracing.middleware()] if self.tracing is not None else []

    def start(self, engine: ModelEngine) -> None:
        """In the lifespan, once the shared runtime exists."""
        self.metrics.watch_model_limiter(engine.limiter)
        self.metrics.watch_engine(engine)
        if self.tracing is not None:
            self.tracing.start()

    async def aclose(self) -> None:
        """Flush traces: after the sessions have ended (their spans with them)."""
        if self.tracing is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.tracing.shutdown)
