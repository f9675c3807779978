"""The application factory. Nothing happens at import: the VAD model, the user's model and the
session registry are created in the lifespan, from the settings passed in."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute

from service.api import deepgram, health, sessions, sse, upload, web, websocket
from service.api.absolute_form import AbsoluteFormMiddleware
from service.api.responses import http_error_handler, internal_error_handler, streamer_error_handler
from service.api.security import ApiKeyMiddleware
from service.audio import opus
from service.audio.packets import DecodePool, DecodeProcess
from service.errors import StreamerError
from service.model.base import load_model
from service.model.runner import ModelRunner
from service.observability import Observability
from service.observability.loop import SAMPLE_S as LOOP_SAMPLE_S
from service.observability.loop import LoopLoad
from service.runtime import Runtime
from service.session.admission import AdmissionPacer
from service.session.observer import SessionObserver
from service.session.registry import Registry
from service.settings import Settings
from service.store import open_store
from service.store.memory import warn_if_unshared_workers
from service.vad.batcher import VadBatcher
from service.vad.silero import load_session

log = logging.getLogger(__name__)


def _decode_pool(settings: Settings) -> DecodePool | DecodeProcess | None:
    if settings.opus_decoder == "ffmpeg":
        return None
    if settings.opus_decoder not in ("libopus", "process"):
        raise ValueError(
            "STREAMER_OPUS_DECODER must be libopus, process or ffmpeg, "
            f"not {settings.opus_decoder!r}"
        )
    if not opus.available():
        log.warning("libopus not found: WebM and Ogg Opus are decoded by FFmpeg")
        return None
    return DecodeProcess() if settings.opus_decoder == "process" else DecodePool()


def create_app(
    settings: Settings | None = None,
    *,
    observer: SessionObserver | None = None,
    span_exporter: SpanExporter | None = None,
) -> Starlette:
    settings = settings or Settings.from_env()
    # Metrics, traces (from OTEL_* variables; span_exporter is for tests) and log context.
    observability = Observability.create(observer=observer, span_exporter=span_exporter)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        onnx = await anyio.to_thread.run_sync(
            functools.partial(load_session, graph=settings.vad_graph)
        )
        model = await anyio.to_thread.run_sync(load_model, settings.model, settings.model_options)
        pacer = AdmissionPacer(
            settings.admit_pace_loop_busy, settings.admit_wait_seconds, LOOP_SAMPLE_S
        )
        runtime = Runtime(
            settings=settings,
            batcher=VadBatcher(
                onnx,
                max_batch=settings.vad_max_batch,
                max_wait_s=settings.vad_max_wait_ms / 1000,
                limiter=anyio.CapacityLimiter(settings.vad_threads),
                on_batch=observability.metrics.vad_batch,
            ),
            models=ModelRunner(
                model,
                anyio.CapacityLimiter(settings.model_threads),
                max_batch=settings.model_batch_max,
                batch_wait_s=settings.model_batch_wait_ms / 1000,
                max_queued_s=settings.model_queue_max_seconds,
                late_s=settings.model_late_ms / 1000,
                observer=observability.model_observer,
            ),
            observer=observability.session_observer,
            load=LoopLoad(on_lag=observability.metrics.loop_lag.observe, on_sample=pacer.sampled),
            pacer=pacer,
            decoders=_decode_pool(settings),
        )
        observability.start(runtime.models.engine)
        observability.metrics.watch_loop(runtime.load)
        observability.metrics.watch_pacer(pacer)
        if runtime.decoders is not None:
            observability.metrics.watch_decoder(runtime.decoders.turnaround)
        # sse-starlette only detects uvicorn's shutdown; under hypercorn we set this ourselves.
        app.state.shutdown_event = anyio.Event()
        store = open_store(settings)
        warn_if_unshared_workers(store)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(runtime.batcher.run)
                tg.start_soon(runtime.models.run)
                if settings.model_probe:
                    await runtime.models.engine.probe()
                tg.start_soon(runtime.load.run)
                if runtime.decoders is not None:
                    tg.start_soon(runtime.decoders.run)
                app.state.registry = registry = Registry(runtime, tg, store)
                # Resumable sessions whose worker died go on in another (shared store only).
                tg.start_soon(registry.adopt_orphans)
                log.info("ready", extra={"model": settings.model, "worker": store.worker_id})
                try:
                    yield
                finally:
                    await shutdown_sessions(app)
                    await observability.aclose()  # the sessions' spans have ended: flush
                    tg.cancel_scope.cancel()
        finally:
            await store.aclose()

    routes = [
        Route("/healthz", health.healthz),
        Route("/readyz", health.readyz),
        Route("/metrics", observability.metrics.endpoint),
        Route("/v1/sessions", sessions.create_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}", sessions.get_session, methods=["GET"]),
        Route("/v1/sessions/{session_id}", sessions.delete_session, methods=["DELETE"]),
        Route(
            "/v1/sessions/{session_id}/audio",
            upload.upload_audio,
            methods=["POST", "PUT", "PATCH"],
        ),
        Route("/v1/sessions/{session_id}/audio", upload.upload_offset, methods=["HEAD"]),
        Route("/v1/sessions/{session_id}/events", sse.stream_events, methods=["GET"]),
        WebSocketRoute("/v1/ws", websocket.v1_ws),
        WebSocketRoute("/api/v1/segmented", websocket.seed_segmented),
        WebSocketRoute("/api/v1/simple", websocket.seed_simple),
        WebSocketRoute(deepgram.LISTEN_PATH, deepgram.listen),  # Deepgram's live protocol
        *web.routes(),  # last: the page at "/" must never shadow an API route
    ]
    middleware = [Middleware(ApiKeyMiddleware, api_key=settings.api_key)]
    if settings.cors_origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Upload-Offset"],
                expose_headers=["Location", "Upload-Offset", "Session-State"],
            ),
        )
    middleware[:0] = observability.middleware()  # the server span covers it all
    # Outermost: every other layer (the span's route, the API key check) sees the origin form.
    middleware.insert(0, Middleware(AbsoluteFormMiddleware))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            StreamerError: observability.metrics.count_errors(streamer_error_handler),
            HTTPException: http_error_handler,
            Exception: internal_error_handler,
        },
    )
    app.state.settings = settings
    app.state.observability = observability
    return app


async def shutdown_sessions(app: Starlette) -> None:
    """End every live session with ``end {reason: "shutdown"}`` (subscribers see it), then
    release SSE streams. Safe to call twice (signal handler, then lifespan)."""
    registry: Registry | None = getattr(app.state, "registry", None)
    if registry is None:
        return
    await registry.shutdown(app.state.settings.shutdown_grace_seconds)
    app.state.shutdown_event.set()
