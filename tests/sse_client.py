"""A small SSE reader for tests (httpx streaming), so assertions see exactly what a client sees."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class SseEvent:
    id: int | None
    event: str
    data: dict[str, Any]


async def iter_sse(response: httpx.Response) -> AsyncIterator[SseEvent]:
    event, data, ident = "message", [], None
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(ident, event, json.loads("\n".join(data)))
            event, data, ident = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                ident = int(value)


async def read_all(
    client: httpx.AsyncClient, url: str, last_event_id: int | None = None
) -> list[SseEvent]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    out: list[SseEvent] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for ev in iter_sse(response):
            out.append(ev)
    return out


def finals(events: list[SseEvent], channel: int | None = None) -> list[dict[str, Any]]:
    return [
        e.data
        for e in events
        if e.event == "segment"
        and e.data["is_final"]
        and (channel is None or e.data["channel"] == channel)
    ]
