"""The observers without a server: model calls that fail or panic (spans and counters), tracing
configured from ``OTEL_*`` variables, and the ``/metrics`` content negotiation."""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.routing import Route

from service.audio.chunk import Samples
from service.events.types import Event
from service.model.base import ModelError
from service.model.runner import ModelRunner
from service.observability.fanout import FanOutModelObserver
from service.observability.loop import LoopLoad
from service.observability.metrics import Metrics, MetricsObserver
from service.observability.tracing import Tracing, TracingObserver, parent_from_traceparent
from service.vad.speech import SpeechAudio, VadOutput


class Flaky:
    """Succeeds, then fails, then panics."""

    def __init__(self) -> None:
        self.calls = 0

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        self.calls += 1
        if self.calls == 2:
            raise ModelError("out of memory")
        if self.calls == 3:
            raise RuntimeError("segfault-ish")
        return {"count": len(audio)}


async def _run_finals(runner: ModelRunner, n: int) -> list[Event]:
    """``n`` finals of 0.1 s, 1 s apart, through one session's model stage."""
    send, receive = anyio.create_memory_object_stream[VadOutput](n)
    out: list[Event] = []

    async def emit(event: Event, received_at: float | None) -> None:
        out.append(event)

    for u in range(n):
        start = 16000 * (u + 1)
        audio = np.zeros(1600, dtype=np.float32)
        send.send_nowait(SpeechAudio(0, u, start, start + 1600, audio, True, 0.0))
    send.close()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            await runner.run_stage(receive, emit)
            tg.cancel_scope.cancel()
    return out


def _observed() -> tuple[InMemorySpanExporter, Metrics, FanOutModelObserver]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics()
    observer = FanOutModelObserver(
        [MetricsObserver(metrics), TracingObserver(provider.get_tracer("test"))]
    )
    return exporter, metrics, observer


@pytest.mark.anyio
async def test_model_calls_get_a_span_and_a_count_each_with_their_outcome() -> None:
    exporter, metrics, observer = _observed()
    runner = ModelRunner(Flaky(), anyio.CapacityLimiter(1), observer=observer)
    out = await _run_finals(runner, 3)
    assert [e.to_dict().get("code") for e in out] == [None, "model_failed", "model_panic"]

    ok, failed, panic = sorted(
        exporter.get_finished_spans(),
        key=lambda s: (s.attributes or {})["streamer.model.start_time"],
    )
    assert all(s.name == "model" for s in (ok, failed, panic))
    assert ok.status.status_code is StatusCode.UNSET
    assert (ok.attributes or {})["streamer.model.audio_seconds"] == 0.1
    assert (ok.attributes or {})["streamer.model.start_time"] == 1.0
    assert (ok.attributes or {})["streamer.model.batch_size"] == 1
    for span, code in ((failed, "model_failed"), (panic, "model_panic")):
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == code
        assert [e.name for e in span.events] == ["exception"]

    def count(outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "streamer_model_calls_total", {"kind": "final", "outcome": outcome}
        )

    assert (count("ok"), count("failed"), count("panic")) == (1, 1, 1)
    rtf = metrics.registry.get_sample_value("streamer_rtf_count", {"stage": "model_inference"})
    assert rtf == 3
    media = metrics.registry.get_sample_value(
        "streamer_media_duration_seconds_sum", {"stage": "model_inference"}
    )
    assert media == pytest.approx(0.3)


class Batched:
    """Takes a batch; the second item of every batch fails alone."""

    max_batch_size = 8

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        return {"count": len(audio)}

    def infer_batch(self, audios: list[Samples]) -> list[Mapping[str, Any] | ModelError]:
        time.sleep(0.05)
        return [ModelError("item 2") if i == 1 else {"count": len(a)} for i, a in enumerate(audios)]


@pytest.mark.anyio
async def test_a_batch_is_one_observation_and_a_span_per_item() -> None:
    exporter, metrics, observer = _observed()
    runner = ModelRunner(Batched(), anyio.CapacityLimiter(1), observer=observer)
    out = await _run_finals(runner, 3)
    assert [e.to_dict().get("code") for e in out] == [None, "model_failed", None]
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    assert {(s.attributes or {})["streamer.model.batch_size"] for s in spans} == {3}
    value = metrics.registry.get_sample_value
    assert value("streamer_model_batches_total") == 1
    assert value("streamer_model_batch_size_sum") == 3
    # One real-time-factor observation for the call: its time over all its audio.
    assert value("streamer_rtf_count", {"stage": "model_inference"}) == 1
    assert value(
        "streamer_media_duration_seconds_sum", {"stage": "model_inference"}
    ) == pytest.approx(0.3)
    assert value("streamer_model_calls_total", {"kind": "final", "outcome": "failed"}) == 1


def test_tracing_is_off_only_when_the_sdk_is_disabled() -> None:
    assert Tracing.from_env({"OTEL_SDK_DISABLED": "true"}) is None
    tracing = Tracing.from_env({})
    assert tracing is not None
    assert tracing.provider.resource.attributes["service.name"] == "streamer"


def test_no_exporter_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "asr-edge")
    for env, processors in (
        ({}, 0),
        ({"OTEL_TRACES_EXPORTER": "none"}, 0),
        ({"OTEL_TRACES_EXPORTER": "console"}, 1),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, 0),
    ):
        tracing = Tracing.from_env(env)
        assert tracing is not None
        assert len(tracing._processors) == processors, env
        assert tracing.provider.resource.attributes["service.name"] == "asr-edge"


def otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.skipif(otlp_installed(), reason="the otlp extra is installed")
def test_otlp_without_the_extra_warns_and_exports_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.observability.tracing"):
        tracing = Tracing.from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing is not None and tracing._processors == []
    assert "streamer[otlp]" in caplog.text


def test_traceparent_parsing() -> None:
    assert parent_from_traceparent(None) is None
    assert parent_from_traceparent("garbage") is None
    assert parent_from_traceparent("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None
    assert parent_from_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") is not None


@pytest.mark.anyio
async def test_metrics_endpoint_speaks_prometheus_text_and_openmetrics() -> None:
    metrics = Metrics()
    app = Starlette(routes=[Route("/metrics", metrics.endpoint)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        text = await client.get("/metrics")
        assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'streamer_rtf_bucket{le="0.001",stage="vad_processing"} 0.0' in text.text
        # No "<name>_created" timestamp series (streamer_sessions_created_total is a counter).
        assert not re.search(r"^\w+_created[ {]", text.text, re.MULTILINE)
        om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")


def test_two_apps_do_not_share_figures() -> None:
    a, b = Metrics(), Metrics()
    a.vad_batch(0.01, streams=4, frames=125)
    assert a.registry.get_sample_value("streamer_vad_batch_streams_count") == 1
    assert b.registry.get_sample_value("streamer_vad_batch_streams_count") == 0
    # 125 frames of 512 samples = 4 stream-seconds; 0.01 s of compute: RTF 0.0025.
    assert a.registry.get_sample_value(
        "streamer_rtf_sum", {"stage": "vad_processing"}
    ) == pytest.approx(0.0025)


@pytest.mark.anyio
async def test_a_blocked_event_loop_shows_in_the_loop_lag_histogram() -> None:
    metrics = Metrics()

    def observed(le: str) -> float:
        sample = metrics.registry.get_sample_value(
            "streamer_event_loop_lag_seconds_bucket", {"le": le}
        )
        return sample or 0.0

    load = LoopLoad(0.01, on_lag=metrics.loop_lag.observe)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run)
            await anyio.sleep(0.1)
            assert observed("+Inf") >= 3  # sampled while the loop is idle too
            late = observed("+Inf") - observed("0.25")
            time.sleep(0.3)  # blocks the loop: the stall under test
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    # The sleeper woke ~0.3 s late (>= rather than ==: a busy test machine may add a stall).
    assert observed("+Inf") - observed("0.25") >= late + 1
