"""The WebSocket transport (``/v1/ws``): a start message with the config, binary audio frames, a
stop message; the server answers ``started`` and then the events as JSON text frames."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from service.client.options import ClientFailure, Options, Outcome
from service.client.render import Renderer
from service.client.retry import RETRY_LATER, Retry

CONNECT_TIMEOUT_S = 10.0
WS_PATH = "/v1/ws"


def ws_url(base_url: str) -> str:
    """``http://host:8000`` -> ``ws://host:8000/v1/ws`` (``https`` -> ``wss``)."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + WS_PATH, "", ""))


async def run_ws(
    opts: Options, audio: AsyncIterable[bytes], renderer: Renderer, outcome: Outcome
) -> None:
    url = ws_url(opts.url)
    retry = Retry(opts.retries, opts.retry_delay_s, renderer.note)
    while True:
        refusal = await _connect(url, opts, audio, renderer, outcome)
        if refusal is None:
            return
        # The start was refused (a bad config, no capacity): no audio was sent, so a server
        # that is only full for now may be asked again.
        code = str(refusal.get("code"))
        why = f"the server refused the start: {code}: {refusal.get('message')}"
        if code not in RETRY_LATER or not await retry.again(why):
            outcome.failure = why
            return


async def _connect(
    url: str, opts: Options, audio: AsyncIterable[bytes], renderer: Renderer, outcome: Outcome
) -> Mapping[str, Any] | None:
    """One connection: the session's whole run, or the error that refused its start."""
    refusal: Mapping[str, Any] | None = None
    try:
        async with connect(
            url,
            additional_headers=opts.headers,
            compression=None,  # audio does not deflate; events are small
            max_size=None,
            open_timeout=CONNECT_TIMEOUT_S,
            proxy=None,
        ) as ws:
            await ws.send(json.dumps({**opts.config, "request": "start"}))
            started = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send_audio, ws, audio, started)
                refusal = await _receive(ws, renderer, outcome, started)
                tg.cancel_scope.cancel()
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 404:
            raise ClientFailure(f"the server has no WebSocket endpoint at {url} (404)") from None
        if status in (401, 403):
            raise ClientFailure(
                f"{url} refused the connection ({status}): check --api-key"
            ) from None
        raise ClientFailure(f"{url} refused the connection ({status})") from None
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        raise ClientFailure(f"cannot connect to {url}: {exc or type(exc).__name__}") from None
    return refusal


async def _send_audio(
    ws: ClientConnection, audio: AsyncIterable[bytes], started: anyio.Event
) -> None:
    await started.wait()
    try:
        async for chunk in audio:
            await ws.send(chunk)
        await ws.send(json.dumps({"request": "stop", "disconnect": True}))
    except ConnectionClosed:
        return  # the receiver says why


async def _receive(
    ws: ClientConnection, renderer: Renderer, outcome: Outcome, started: anyio.Event
) -> Mapping[str, Any] | None:
    """The session's events until ``end``; returns the error if the start was refused."""
    try:
        async for message in ws:
            if isinstance(message, bytes):
                continue
            try:
                event: dict[str, Any] = json.loads(message)
            except json.JSONDecodeError:
                renderer.problem(f"ignored a message that is not JSON: {message[:80]!r}")
                continue
            if not started.is_set() and event.get("type") == "error":
                return event  # the start was refused: nothing was sent
            if event.get("type") == "started":
                outcome.session_id = event.get("session_id")
                renderer.note(f"session {outcome.session_id} via WebSocket")
                started.set()
                continue
            renderer.event(event)
            if outcome.observe(event):
                return None
    except ConnectionClosed:
        pass
    code, reason = ws.close_code, ws.close_reason
    outcome.failure = f"the connection closed before the session ended (code {code}" + (
        f": {reason})" if reason else ")"
    )
    return None
