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
from service.client.resume import RESUME_BACKOFF_S, RESUME_PATIENCE_S, ReplayBuffer
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
    if opts.resume:
        await _run_resuming(url, opts, audio, renderer, outcome)
        return
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


class _Cut(Exception):
    """The connection dropped (not closed by the server) while the session was live."""


class _Resumable:
    """``--resume`` over the WebSocket: the session's progress across connections."""

    def __init__(self, audio: AsyncIterable[bytes]) -> None:
        self.replay = ReplayBuffer(audio)
        self.session_id: str | None = None
        self.events = 0  # events of the session received: the last one's id in its log
        self.connections = 0  # connections that started or resumed the session


async def _run_resuming(
    url: str, opts: Options, audio: AsyncIterable[bytes], renderer: Renderer, outcome: Outcome
) -> None:
    """Start the session; whenever the connection drops, reconnect and resume it at the offset
    the server received (``{"request": "resume"}``), until ``end`` arrives."""
    state = _Resumable(audio)
    failure: ClientFailure | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(state.replay.fill)  # reads on while the connection is down
        try:
            await _resume_while_cut(url, opts, state, renderer, outcome)
        except ClientFailure as exc:
            failure = exc  # raised outside the task group, not as an exception group
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _resume_while_cut(
    url: str, opts: Options, state: _Resumable, renderer: Renderer, outcome: Outcome
) -> None:
    deadline: float | None = None
    attempt, connections = 0, 0
    told = ""  # the last reason noted: one note per outage and reason, not per attempt
    while True:
        try:
            await _resuming_connection(url, opts, state, renderer, outcome)
            return
        except _Cut as cut:
            if state.session_id is None:
                raise ClientFailure(f"the connection to {url} failed: {cut}") from None
            if state.connections != connections:  # it was resumed since the last cut
                connections, deadline, attempt, told = state.connections, None, 0, ""
            now = anyio.current_time()
            deadline = deadline if deadline is not None else now + RESUME_PATIENCE_S
            if now > deadline:
                outcome.failure = f"the connection could not be resumed: {cut}"
                return
            if str(cut) != told:
                told = str(cut)
                renderer.note(f"connection cut at byte {state.replay.read} ({cut}); resuming")
            await anyio.sleep(RESUME_BACKOFF_S[min(attempt, len(RESUME_BACKOFF_S) - 1)])
            attempt += 1
            continue


async def _resuming_connection(
    url: str, opts: Options, state: _Resumable, renderer: Renderer, outcome: Outcome
) -> None:
    try:
        async with connect(
            url,
            additional_headers=opts.headers,
            compression=None,
            max_size=None,
            open_timeout=CONNECT_TIMEOUT_S,
            proxy=None,
        ) as ws:
            if state.session_id is None:
                await ws.send(json.dumps({**opts.config, "request": "start"}))
            else:
                await ws.send(_resume_message(state, state.replay.read))
            offset: list[int] = []
            started = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send_from, ws, state.replay, offset, started)
                cut = await _receive_resuming(ws, state, renderer, outcome, offset, started)
                tg.cancel_scope.cancel()
    except InvalidStatus as exc:
        raise ClientFailure(f"{url} refused the connection ({exc.response.status_code})") from None
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        raise _Cut(str(exc) or type(exc).__name__) from None
    if cut is not None:
        raise _Cut(cut)


def _resume_message(state: _Resumable, offset: int) -> str:
    return json.dumps(
        {
            "request": "resume",
            "id": state.session_id,
            "offset": offset,
            "last_event_id": state.events,
        }
    )


async def _send_from(
    ws: ClientConnection, replay: ReplayBuffer, offset: list[int], started: anyio.Event
) -> None:
    await started.wait()
    try:
        async for chunk in replay.from_offset(offset[0]):
            await ws.send(chunk)
        await ws.send(json.dumps({"request": "stop", "disconnect": True}))
    except ConnectionClosed:
        return  # the receiver says why


async def _receive_resuming(
    ws: ClientConnection,
    state: _Resumable,
    renderer: Renderer,
    outcome: Outcome,
    offset: list[int],
    started: anyio.Event,
) -> str | None:
    """The session's events until ``end``; returns why, if the connection was cut."""
    try:
        async for message in ws:
            if isinstance(message, bytes):
                continue
            event: dict[str, Any] = json.loads(message)
            kind = event.get("type")
            if not started.is_set():
                if kind == "error" and event.get("code") == "offset_mismatch":
                    await ws.send(_resume_message(state, int(event["offset"])))
                    continue
                if kind == "error" and event.get("code") == "session_elsewhere":
                    # Another worker runs it (a new connection may reach that one), or its
                    # owner died and its lease has not lapsed yet (seconds; a worker then
                    # adopts it): connect again, as after a cut.
                    return "another worker runs the session (session_elsewhere)"
                if kind == "error":
                    why = f"{event.get('code')}: {event.get('message')}"
                    outcome.failure = f"the server refused: {why}"
                    return None
                if kind == "started":
                    if state.session_id is None:
                        state.session_id = outcome.session_id = event.get("session_id")
                        renderer.note(f"session {state.session_id} via WebSocket (resumable)")
                    at = int(event.get("offset", 0))
                    if not state.replay.holds(at):
                        outcome.failure = f"cannot resume at byte {at}: no longer at hand"
                        return None
                    offset.append(at)
                    state.connections += 1
                    started.set()
                continue
            state.events += 1
            renderer.event(event)
            if outcome.observe(event):
                return None
    except ConnectionClosed:
        pass
    code, reason = ws.close_code, ws.close_reason
    if code is None or code == 1006:
        return f"code {code}"  # dropped, not closed by the server: resume
    outcome.failure = f"the connection closed before the session ended (code {code}" + (
        f": {reason})" if reason else ")"
    )
    return None
