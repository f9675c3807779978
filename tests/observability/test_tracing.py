"""Traces from the app served in-process (hypercorn's ``serve()`` on 127.0.0.1 with a shutdown
trigger), collected by an in-memory exporter passed to ``create_app``: the span tree of a real
session, and the trace id a client sends, by header over HTTP and in the start message over the
WebSocket."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service.app import create_app
from service.settings import Settings
from tests.conftest import DATA, free_port

pytestmark = pytest.mark.anyio

FAST_MODEL = {"delay": 0.02, "constant_factor": 0.01, "jitter": 0.0}


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    url = f"http://{config.bind[0]}"
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=url) as client:
            with anyio.fail_after(30):
                while True:
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)
        try:
            yield url
        finally:
            stop.set()


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    app = create_app(Settings(model_options=FAST_MODEL, model_threads=2), span_exporter=exporter)
    async with serving(app) as url:
        yield url, exporter


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def session_span(spans: Sequence[ReadableSpan], session_id: str) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == "session" and (s.attributes or {}).get("streamer.session.id") == session_id
    ]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


async def test_session_span_tree_and_traceparent_header(
    served: tuple[str, InMemorySpanExporter], speech_wav: Path
) -> None:
    url, exporter = served
    header, trace_id, caller_span = traceparent()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        with anyio.fail_after(60):
            r = await client.post("/v1/sessions", headers={"traceparent": header})
            session_id = r.json()["id"]
            # The upload carries no traceparent: a trace of its own, linked from the session.
            audio_url = f"/v1/sessions/{session_id}/audio"
            r = await client.put(audio_url, content=speech_wav.read_bytes())
            assert r.status_code == 200
            assert r.json()["segments"] == 3
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans if s.context is not None}

    session = session_span(spans, session_id)
    assert hex_trace(session) == trace_id
    # Parent: the server span of the request that created it, whose parent is the caller's.
    assert session.parent is not None
    server = by_id[session.parent.span_id]
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None and server.parent.span_id == int(caller_span, 16)
    assert session.status.status_code is not StatusCode.ERROR
    attrs = session.attributes or {}
    assert (attrs["streamer.session.end_reason"], attrs["streamer.segments"]) == ("completed", 3)

    kids = children(spans, session)
    assert sorted(k.name for k in kids) == ["decode", "model", "model", "model", "vad"]
    assert all(hex_trace(k) == trace_id for k in kids)
    models = [k for k in kids if k.name == "model"]
    assert all((m.attributes or {})["streamer.model.is_final"] for m in models)
    # One span per segment. Not in segment order by span start: a file uploaded at once reaches
    # the VAD in a few large batches, so several segments end in one batch and their model calls
    # start together, in whichever order the worker threads run.
    starts = [float((m.attributes or {})["streamer.model.start_time"]) for m in models]  # type: ignore[arg-type]
    assert len(set(starts)) == 3
    decode = next(k for k in kids if k.name == "decode")
    decode_attrs = decode.attributes or {}
    assert decode_attrs["streamer.audio.container"] == "wav"
    samples, seconds = decode_attrs["streamer.audio.samples"], attrs["streamer.audio.seconds"]
    assert isinstance(samples, int) and isinstance(seconds, float)
    assert samples / 16000 == pytest.approx(seconds, abs=0.0006)
    # The stages ran inside the session span.
    assert session.start_time is not None and session.end_time is not None
    for k in kids:
        assert k.start_time is not None and k.end_time is not None
        assert session.start_time <= k.start_time <= k.end_time <= session.end_time

    # The upload request, another trace, is linked.
    upload = [
        s
        for s in spans
        if s.kind is SpanKind.SERVER and s.name.startswith("PUT") and s.context is not None
    ]
    assert len(upload) == 1 and upload[0].context is not None
    assert [link.context.trace_id for link in session.links] == [upload[0].context.trace_id]


async def test_websocket_start_message_trace_id_parents_the_session(
    served: tuple[str, InMemorySpanExporter],
) -> None:
    url, exporter = served
    header, trace_id, caller_span = traceparent()
    audio = (DATA / "speech.wav").read_bytes()
    session_id = None
    with anyio.fail_after(60):
        async with connect(url.replace("http", "ws", 1) + "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "trace_id": header}))
            for i in range(0, len(audio), 16000):
                await ws.send(audio[i : i + 16000])
            await ws.send(json.dumps({"request": "stop", "disconnect": True}))
            try:
                async for message in ws:
                    event = json.loads(message)
                    if event["type"] == "started":
                        session_id = event["session_id"]
            except ConnectionClosed:
                pass
    assert session_id is not None
    # The WebSocket closes once the end event is sent, just after the session span ended.
    with anyio.fail_after(10):
        while not any(
            (s.attributes or {}).get("streamer.session.id") == session_id
            for s in exporter.get_finished_spans()
        ):
            await anyio.sleep(0.01)
    spans = exporter.get_finished_spans()
    session = session_span(spans, session_id)
    assert hex_trace(session) == trace_id
    assert session.parent is not None and session.parent.span_id == int(caller_span, 16)
    assert session.parent.is_remote
    assert sorted(k.name for k in children(spans, session)) == [
        "decode",
        "model",
        "model",
        "model",
        "vad",
    ]
    # The connection's own server span (a trace the client did not choose) is linked.
    assert len(session.links) == 1


async def test_an_invalid_trace_id_is_ignored_not_fatal(
    served: tuple[str, InMemorySpanExporter],
) -> None:
    url, exporter = served
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        with anyio.fail_after(30):
            r = await client.post("/v1/sessions", json={"trace_id": "not-a-traceparent"})
            assert r.status_code == 201
            session_id = r.json()["id"]
            r = await client.delete(f"/v1/sessions/{session_id}")
            assert r.status_code == 202
            while not any(
                (s.attributes or {}).get("streamer.session.id") == session_id
                for s in exporter.get_finished_spans()
            ):
                await anyio.sleep(0.01)
    session = session_span(exporter.get_finished_spans(), session_id)
    assert (session.attributes or {})["streamer.session.end_reason"] == "cancelled"
