"""The HTTP transport: create a session, follow its events (SSE), upload the audio alongside.

The subscription opens before the upload starts, then both run in one task group until ``end``
arrives. HTTP/1.1 sends the body chunked; HTTP/2 (``--http2``) speaks h2c with prior knowledge.

Over HTTP/2 the upload gets a connection of its own. On a shared connection httpcore's sender,
once out of flow-control window, waits by reading the socket itself, and misses a WINDOW_UPDATE
that the events stream's reader has already consumed: the upload then stalls until some other
frame arrives (the SSE ping, 15 s later). Measured here with a 3 s WAV of noise, whose session
sends no event until its end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup

from service.client.options import ClientFailure, Options, Outcome
from service.client.render import Renderer
from service.client.resume import RESUME_PATIENCE_S, ReplayBuffer, server_offset
from service.client.retry import Retry
from service.client.sse import iter_sse

CONNECT_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 60.0
# Once the upload's response is in (it comes after the pipeline drained), ``end`` is on its way.
END_AFTER_UPLOAD_S = 30.0
# A resumed upload that fails sooner than this was turned away (421, or the connection closed
# on it), not cut after it ran; the next attempt waits REFUSED_BACKOFF_S (growing), so that a
# client does not hammer the workers while a dead owner's lease runs out (up to 5 s).
REFUSED_WITHIN_S = 1.0
REFUSED_BACKOFF_S = (0.0, 0.05, 0.1, 0.2, 0.5)
# Upload answers after which a resumable session goes on elsewhere (its worker shut down and
# handed it over, or lost Redis): resume, as after a cut.
RESUMABLE_REFUSALS = frozenset({"shutting_down", "store_unavailable"})


def describe_error(response: httpx.Response) -> str:
    """``415 unsupported_format: ...`` from the service's JSON error body, or the raw status."""
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}".strip()


def _client(opts: Options) -> httpx.AsyncClient:
    http2 = opts.transport == "http2"
    timeout = httpx.Timeout(
        connect=CONNECT_TIMEOUT_S,
        # Events may be minutes apart on a quiet stream, and the upload's response only comes
        # when the pipeline has drained: neither read is bounded; the session's limits are.
        read=None,
        write=WRITE_TIMEOUT_S,
        pool=CONNECT_TIMEOUT_S,
    )
    return httpx.AsyncClient(
        http1=not http2, http2=http2, headers=opts.headers, timeout=timeout, trust_env=False
    )


async def create_session(
    client: httpx.AsyncClient, base_url: str, config: Mapping[str, Any], retry: Retry
) -> Any:
    url = base_url.rstrip("/") + "/v1/sessions"
    while True:
        try:
            response = await client.post(url, json=dict(config))
        except httpx.HTTPError as exc:
            raise ClientFailure(f"cannot reach {url}: {_text(exc)}") from None
        if response.status_code == 201:
            return response.json()
        if response.status_code != 503 or not await retry.again(
            f"the server turned the session away: {describe_error(response)}",
            response.headers.get("retry-after"),
        ):
            raise ClientFailure(f"creating the session failed: {describe_error(response)}")


async def run_http(
    opts: Options, audio: AsyncIterable[bytes], renderer: Renderer, outcome: Outcome
) -> None:
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(_client(opts))
        uploader = client
        if opts.transport == "http2":
            uploader = await stack.enter_async_context(_client(opts))
        retry = Retry(opts.retries, opts.retry_delay_s, renderer.note)
        created = await create_session(client, opts.url, opts.config, retry)
        outcome.session_id = created["id"]
        via = "HTTP/2 (h2c)" if opts.transport == "http2" else "HTTP/1.1 chunked"
        renderer.note(f"session {created['id']} via {via}")
        try:
            async with client.stream("GET", created["events_url"]) as events:
                if events.status_code != 200:
                    await events.aread()
                    raise ClientFailure(f"subscribing to events failed: {describe_error(events)}")
                ended = anyio.Event()
                async with anyio.create_task_group() as tg:
                    if opts.resume:
                        tg.start_soon(
                            _upload_resuming, uploader, created["audio_url"], audio, renderer,
                            outcome, ended, tg,
                        )  # fmt: skip
                        last = await _follow(events, renderer, outcome, resuming=True)
                        await _follow_again(client, created["events_url"], last, renderer, outcome)
                    else:
                        tg.start_soon(
                            _upload, uploader, created["audio_url"], audio, outcome, ended, tg
                        )
                        await _follow(events, renderer, outcome)
                    ended.set()
                    tg.cancel_scope.cancel()
        except httpx.HTTPError as exc:
            raise ClientFailure(f"subscribing to events failed: {_text(exc)}") from None


def _text(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


async def _follow(
    events: httpx.Response,
    renderer: Renderer,
    outcome: Outcome,
    resuming: bool = False,
    last: str | None = None,
) -> str | None:
    """Render events until ``end``; returns the id of the last one seen. ``resuming``: a
    stream that fails is not a failure yet (``_follow_again`` picks it up)."""
    try:
        async for message in iter_sse(events.aiter_lines()):
            last = message.id or last
            try:
                event = json.loads(message.data)
            except json.JSONDecodeError:
                renderer.problem(f"ignored an event that is not JSON: {message.data[:80]!r}")
                continue
            renderer.event(event)
            if outcome.observe(event):
                return last
    except httpx.HTTPError as exc:
        if not resuming:
            outcome.failure = outcome.failure or f"the event stream failed: {_text(exc)}"
            return last
    if not resuming:
        outcome.failure = outcome.failure or "the event stream closed before the session ended"
    return last


async def _follow_again(
    client: httpx.AsyncClient, url: str, last: str | None, renderer: Renderer, outcome: Outcome
) -> None:
    """``--resume``: until ``end`` is seen, reconnect the event stream after the last event
    received (``Last-Event-ID``), as a browser's EventSource does."""
    attempt = 0
    while outcome.end is None:
        attempt += 1
        if attempt > 20:
            outcome.failure = outcome.failure or "the event stream kept failing"
            return
        await anyio.sleep(min(0.1 * attempt, 2.0))
        headers = {"Last-Event-ID": last} if last is not None else {}
        try:
            async with client.stream("GET", url, headers=headers) as events:
                if events.status_code != 200:
                    await events.aread()
                    outcome.failure = f"the event stream failed: {describe_error(events)}"
                    return
                renderer.note(f"event stream reconnected after event {last}")
                last = await _follow(events, renderer, outcome, resuming=True, last=last)
        except httpx.HTTPError:
            continue


async def _upload(
    client: httpx.AsyncClient,
    url: str,
    audio: AsyncIterable[bytes],
    outcome: Outcome,
    ended: anyio.Event,
    tg: TaskGroup,
) -> None:
    problem = "the session did not end after the upload"
    try:
        response = await client.post(url, content=audio)
    except httpx.HTTPError as exc:
        # The server stops reading once a session cannot go on (garbage audio, a limit); the
        # events say why, so this only matters if they do not arrive.
        problem = f"upload failed: {_text(exc)}"
    else:
        if response.status_code >= 400:
            problem = f"upload failed: {describe_error(response)}"
    with anyio.move_on_after(END_AFTER_UPLOAD_S):
        await ended.wait()
    if not ended.is_set():
        outcome.failure = problem
        tg.cancel_scope.cancel()


async def _upload_resuming(
    client: httpx.AsyncClient,
    url: str,
    audio: AsyncIterable[bytes],
    renderer: Renderer,
    outcome: Outcome,
    ended: anyio.Event,
    tg: TaskGroup,
) -> None:
    """``--resume``: upload; when the connection fails, ask where the server's bytes end and
    upload the rest from there (``Upload-Offset``), until one upload finishes the audio.

    A resume can be turned away for a while: with several workers, another worker answers
    ``421 session_elsewhere`` while the session's owner lives, and also while a dead owner's
    lease runs out (``STREAMER_REDIS_LEASE_SECONDS``, 5 s by default) before a worker adopts
    the session. Over HTTP/1.1 that 421 mostly arrives as a failed connection instead (the
    server closes without reading the body it refused, and the reset discards its answer).
    Either way the client tries again, waiting a little longer each time, for up to
    ``RESUME_PATIENCE_S``."""
    replay = ReplayBuffer(audio)
    tg.start_soon(replay.fill)  # reads on while the connection is down
    offset, cuts = 0, 0
    refused = _Refusals()
    problem = "the session did not end after the upload"
    while True:
        if not replay.holds(offset):
            problem = f"cannot resume at byte {offset}: no longer at hand"
            break
        headers = {"Upload-Offset": str(offset)}
        began = anyio.current_time()
        # Why the upload stopped short, if it did (for the user; and if resuming fails).
        cut: tuple[str, str] | None = None
        try:
            response = await client.post(url, content=replay.from_offset(offset), headers=headers)
        except httpx.HTTPError as exc:
            if anyio.current_time() - began >= REFUSED_WITHIN_S:
                refused.clear()  # it ran: a new cut, not a resume turned away
            cut = _text(exc), f"the upload could not be resumed: {_text(exc)}"
        else:
            code = _error_code(response)
            if response.status_code == 409 and code == "offset_mismatch":
                offset = int(response.headers.get("upload-offset", "0"))
                continue
            if response.status_code == 503 and code in RESUMABLE_REFUSALS:
                # Its worker shut down and handed the session over, or lost Redis (and with it
                # the session, which another worker adopts from what was kept): resume it.
                cut = str(code), f"upload failed: {describe_error(response)}"
        if cut is not None:
            if refused.since is None:
                cuts += 1
                renderer.note(f"upload cut at byte {replay.read} ({cut[0]}); resuming")
            if not await refused.again():
                problem = cut[1]
                break
            try:
                offset, state = await server_offset(client, url, renderer.note)
            except ClientFailure as failure:
                problem = str(failure)
                break
            if state == "ended":
                problem = "the session ended before the upload could resume"
                break
            continue
        if response.status_code == 421 and code == "session_elsewhere":
            # Another worker took the connection: a new one may reach the owner, or find the
            # session adoptable once a dead owner's lease has lapsed.
            if not refused.elsewhere:
                refused.elsewhere = True
                renderer.note("another worker runs the session (421); trying again")
            if await refused.again():
                continue
        if response.status_code >= 400:
            problem = f"upload failed: {describe_error(response)}"
        elif cuts:
            renderer.note(f"upload finished after {cuts} resume(s)")
        break
    with anyio.move_on_after(END_AFTER_UPLOAD_S):
        await ended.wait()
    if not ended.is_set():
        outcome.failure = problem
        tg.cancel_scope.cancel()


class _Refusals:
    """Resume attempts turned away in a row (a 421, or a connection that failed at once):
    each next one waits a little longer, and after ``RESUME_PATIENCE_S`` of them the client
    gives up (the server's grace period, 60 s by default, ends the session about then)."""

    def __init__(self) -> None:
        self.count = 0
        self.since: float | None = None
        self.elsewhere = False  # a 421 among them (the user was told)

    def clear(self) -> None:
        self.count, self.since, self.elsewhere = 0, None, False

    async def again(self) -> bool:
        """Wait before the next attempt; False once patience has run out."""
        now = anyio.current_time()
        if self.since is None:
            self.since = now
        elif now - self.since > RESUME_PATIENCE_S:
            return False
        await anyio.sleep(REFUSED_BACKOFF_S[min(self.count, len(REFUSED_BACKOFF_S) - 1)])
        self.count += 1
        return True


def _error_code(response: httpx.Response) -> str | None:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None
