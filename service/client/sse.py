"""A small Server-Sent Events reader: lines in, ``(event, id, data)`` messages out."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    data: str
    id: str | None


async def iter_sse(lines: AsyncIterable[str]) -> AsyncIterator[SseMessage]:
    """Messages from the lines of an ``text/event-stream`` body (comments and pings skipped)."""
    event, ident = "message", None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield SseMessage(event, "\n".join(data), ident)
            event, data, ident = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = value
