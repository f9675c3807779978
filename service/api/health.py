"""Liveness and readiness."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.config import MODEL_SAMPLE_RATE


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    registry = getattr(request.app.state, "registry", None)
    # Not ready while starting, shutting down, or (with Redis) while the store is unreachable:
    # a load balancer then sends new sessions to workers that can serve them.
    reason = "starting" if registry is None else await registry.unready_reason()
    if registry is None or reason is not None:
        return JSONResponse(
            {"status": "not ready", "reason": reason},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    # Still ready when the loop is busy: sessions already created keep needing this worker.
    # ``loop_busy`` is for a balancer that weighs workers; new sessions past
    # STREAMER_ADMIT_MAX_LOOP_BUSY get 503 server_overloaded.
    engine = registry.runtime.models.engine
    body = {
        "status": "ready",
        "sessions": registry.live,
        "loop_busy": registry.runtime.load.busy,
        # The model's backlog: what admission reads (STREAMER_ADMIT_MAX_MODEL_WAIT_MS).
        "model": {
            "queued_finals": engine.queued_finals,
            "queued_interims": engine.queued_interims,
            "queued_audio_seconds": round(engine.queued_samples / MODEL_SAMPLE_RATE, 3),
            "wait_seconds": round(engine.wait_s(), 3),
            "threads": int(engine.limiter.total_tokens),
            "threads_busy": int(engine.limiter.borrowed_tokens),
            "max_batch": engine.max_batch,
        },
    }
    if registry.store.shared:
        body["worker"] = registry.store.worker_id
    return JSONResponse(body)
