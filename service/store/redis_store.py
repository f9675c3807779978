"""Sessions in Redis, so that any worker on any host serves any session (docs/scaling.md).

- A session is a hash (config, state, counters, owner), a Stream of events and a lease key;
  ``lua.py`` lists the keys and holds the scripts that change them atomically.
- Event N is stream entry ``0-N``: the SSE ``id:`` is the stream position, so ``Last-Event-ID``
  resumes with one XREAD on whichever worker the client reconnects to.
- The worker that receives the audio claims the session and runs the pipeline; it renews a lease
  while it runs: each worker renews all of its sessions together, one pipelined round trip per
  ``RENEW_BATCH`` sessions, and takes cancel requests for all of them from one list it blocks
  on (the registry's lease keeper drives both). Readers block on XREAD for at most
  ``redis_poll_seconds`` at a time and then check the lease: a running session without one lost
  its worker, and the first reader to notice writes its ``end {reason: "worker_lost"}`` (a
  guarded script, so exactly one does).
- Connections are pooled explicitly, never by the client library's default: a bounded pool for
  commands (callers wait briefly for a free connection rather than fail), one connection per
  SSE reader while it waits, and one per worker for its cancel wait.
- Every Redis failure surfaces as ``StoreUnavailable`` (code ``store_unavailable``, 503) after a
  few quick reconnect attempts; nothing waits on Redis without a bound.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import anyio
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError

from service.config import SessionConfig, config_to_dict, parse_session_config
from service.errors import ErrorCode, StoreUnavailable, StreamerError
from service.events.encode import to_json
from service.events.progress import NO_MARK, LoggedProgress, Mark, mark
from service.events.types import End, Event, LoggedEvent
from service.session.session import EndReason
from service.settings import Settings
from service.store import lua
from service.store.base import ADOPT_AFTER_S, Adoption, Claim, JournalWrite, Lease, Renewal

log = logging.getLogger(__name__)

# Replay page size: catches up quickly without one huge reply.
READ_COUNT = 256
# Quick reconnect attempts (50, 100, 200 ms apart) ride out a restart or failover; past them the
# caller gets StoreUnavailable rather than a wait.
RETRIES = 3
# Connections per worker for ordinary commands (appends, claims, status, renewals, a reader's
# lease check). Each is held for one round trip, so a few dozen are busy at a time even with
# hundreds of sessions; this many leave room for a worker whose event loop runs late (a reply
# is only read when the loop gets to it). Past them, callers queue for up to the command
# timeout. redis-py's own default (100 in redis-py 8, failing at once with "Too many
# connections") is what 400 live sessions on two workers ran into.
COMMAND_CONNECTIONS = 256
# Connections per worker for SSE readers, each held while its XREAD BLOCK waits: one per
# subscriber this worker serves. Size Redis's maxclients for the sum over all workers.
FOLLOWER_CONNECTIONS = 4096
# Sessions renewed per pipelined round trip (one RENEW script each).
RENEW_BATCH = 500
# Cancel requests taken per wake-up of a worker's cancel wait.
CANCEL_DRAIN = 1000
# Connections per worker for reading journals back (adopted sessions replaying their audio).
JOURNAL_CONNECTIONS = 16
# An orphaned resumable session nobody adopted for this long after its lease lapsed (every
# worker looks for them about once a second, so only a broken adoption gets here) is ended
# ``worker_lost`` by its readers.
ADOPT_GIVE_UP_S = 60.0

_END_FIELDS = frozenset({"type", "reason", "channel"})


@dataclass(frozen=True, slots=True)
class _Keys:
    session: str
    events: str
    lease: str
    audio: str  # a resumable session's received bytes (its journal)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _float(raw: str | None) -> float | None:
    return float(raw) if raw else None


@contextmanager
def _unavailable(doing: str) -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        raise StoreUnavailable(f"Redis unavailable while {doing}: {exc}") from exc


def _not_found() -> NoReturn:
    raise StreamerError(
        ErrorCode.SESSION_NOT_FOUND, "no such session (unknown, or expired after retention)"
    )


def _gone(session_id: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"Redis no longer holds session {session_id} (Redis restarted without persistence, or "
        "its keys were removed)"
    )


class RedisStore:
    shared = True

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("RedisStore needs settings.redis_url")
        self.settings = settings
        self.worker_id = worker_id or (
            f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        timeout = settings.redis_timeout_seconds
        # Commands: a bounded pool; a caller finding every connection busy waits for one (up to
        # the command timeout) instead of failing.
        self._redis = self._client(COMMAND_CONNECTIONS, timeout, queue=True)
        # XREAD BLOCK (SSE readers) and BLPOP (the worker's cancel wait) wait by design, so their
        # connections need a longer read timeout than one command: pools of their own. The
        # cancel wait has its own single connection, so readers can never crowd it out.
        self._longest_wait = max(settings.redis_poll_seconds, settings.redis_lease_seconds / 3)
        self._blocking = self._client(
            FOLLOWER_CONNECTIONS, timeout + self._longest_wait, queue=False
        )
        self._cancel_waits = self._client(1, timeout + self._longest_wait, queue=True)
        # Journal reads return audio, which must not be decoded as text.
        self._raw = self._client(JOURNAL_CONNECTIONS, timeout, queue=True, decode=False)
        self._cancels_key = self._worker_cancels(self.worker_id)
        self._append = self._redis.register_script(lua.APPEND)
        self._claim = self._redis.register_script(lua.CLAIM)
        self._renew = self._redis.register_script(lua.RENEW)
        self._cancel = self._redis.register_script(lua.CANCEL)
        self._journal = self._redis.register_script(lua.JOURNAL)
        self._adopt = self._redis.register_script(lua.ADOPT)
        self._release = self._redis.register_script(lua.RELEASE)
        # Resumable sessions by when their lease lapses (ms since the epoch, as their owner
        # last renewed it): where workers look for sessions to adopt.
        self._journaled_key = f"{settings.redis_prefix}:journaled"
        self._lease_ms = _ms(settings.redis_lease_seconds)
        self._retention_ms = _ms(settings.retention_seconds)
        self._poll_ms = _ms(settings.redis_poll_seconds)

    def _client(
        self, max_connections: int, socket_timeout: float, *, queue: bool, decode: bool = True
    ) -> Redis:
        """A client with a pool of its own of at most ``max_connections``. With ``queue`` a caller
        finding them all busy waits up to the command timeout for one, otherwise it fails."""
        url = self.settings.redis_url
        assert url
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "decode_responses": decode,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": self.settings.redis_timeout_seconds,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        }
        if queue:
            timeout = self.settings.redis_timeout_seconds
            pool: ConnectionPool = BlockingConnectionPool.from_url(url, timeout=timeout, **options)
        else:
            pool = ConnectionPool.from_url(url, **options)
        return Redis.from_pool(pool)  # the client owns its pool: closing it closes the pool

    def _keys(self, session_id: str) -> _Keys:
        base = f"{self.settings.redis_prefix}:{{{session_id}}}"
        return _Keys(f"{base}:session", f"{base}:events", f"{base}:lease", f"{base}:audio")

    def _worker_cancels(self, worker_id: str) -> str:
        return f"{self.settings.redis_prefix}:worker:{{{worker_id}}}:cancels"

    # -- records ------------------------------------------------------------------------------

    def log(self, session_id: str, last_id: int = 0) -> RedisEventLog:
        return RedisEventLog(self, session_id, owned=True, last_id=last_id)

    async def create(
        self, session_id: str, config: SessionConfig, summary: Mapping[str, Any]
    ) -> None:
        k = self._keys(session_id)
        start_ms = _ms(self.settings.unstarted_timeout_seconds)
        record: dict[Any, str | int] = {  # redis-py types its keys invariantly
            "state": "created",
            "config": to_json(config_to_dict(config)),
            "created_at": repr(time.time()),
            "summary": to_json(summary),
            "last_id": 0,
            "owner": "",
        }
        with _unavailable("creating a session"):
            async with self._redis.pipeline(transaction=True) as p:
                p.hset(k.session, mapping=record)
                p.pexpire(k.session, start_ms + self._retention_ms)
                # The start deadline: claimable while this exists (see lua.CLAIM).
                p.set(k.lease, "", px=start_ms)
                await p.execute()

    async def claim(self, session_id: str) -> Claim:
        k = self._keys(session_id)
        token = secrets.token_hex(8)
        started_at = time.time()
        args: list[str | int] = [
            self.worker_id,
            token,
            self._lease_ms,
            repr(started_at),
            self._lease_ms + self._retention_ms,
        ]
        with _unavailable("claiming a session"):
            reply = await self._claim(keys=[k.session, k.lease], args=args)
        if reply[0] == "ok":
            config = parse_session_config(json.loads(reply[1]))
            if config.resumable:
                # Findable for adoption from now on, should this worker die before its first
                # renewal.
                await self._mark_journaled([session_id])
            return Claim(config, float(reply[2]), started_at)
        state, leased = reply[0], int(reply[1])
        if state == "missing":
            _not_found()
        if state == "running" and leased:
            raise StreamerError(ErrorCode.SESSION_BUSY, "this session already has an audio upload")
        # Its start deadline passed, or its owner died: end it for everyone, then refuse; unless
        # it lives on (a resumable session another worker adopts, to go on with a resuming
        # upload, or its owner renewed just now).
        if state != "ended" and await self._settle(session_id) == "live":
            raise StreamerError(ErrorCode.SESSION_BUSY, "this session already has an audio upload")
        raise StreamerError(ErrorCode.SESSION_ENDED, "this session has ended; create a new one")

    async def status(self, session_id: str) -> dict[str, Any]:
        k = self._keys(session_id)
        orphan_offset: int | None = None
        for _ in range(2):
            with _unavailable("reading a session"):
                async with self._redis.pipeline(transaction=False) as p:
                    p.hgetall(k.session)
                    p.exists(k.lease)
                    p.zscore(self._journaled_key, session_id)
                    p.strlen(k.audio)
                    record, leased, lapsed_ms, kept = await p.execute()
            if not record:
                _not_found()
            if record["state"] == "ended" or leased:
                break
            if self._adoptable(record["state"], record.get("journal"), lapsed_ms):
                # Its owner died; the next worker to take it goes on from what was kept.
                orphan_offset = int(kept)
                break
            await self._settle(session_id)  # nobody will end it otherwise; then read again
        return self._status(session_id, record, orphan_offset)

    def _status(
        self, session_id: str, h: Mapping[str, str], orphan_offset: int | None = None
    ) -> dict[str, Any]:
        # The same shape as Session.status(); counters are as of the owner's last renewal (and
        # exact while a resumable session waits for its upload: the owner publishes them then).
        # A resumable session whose owner died waits for its upload at the journal's end.
        summary = json.loads(h.get("summary") or "{}")
        if orphan_offset is not None:
            summary = {**summary, "bytes": orphan_offset, "awaiting_resume": True}
        return {
            "id": session_id,
            "state": h["state"],
            "end_reason": h.get("end_reason") or None,
            "created_at": _float(h.get("created_at")),
            "started_at": _float(h.get("started_at")),
            "ended_at": _float(h.get("ended_at")),
            "last_event_id": int(h.get("last_id") or 0),
            "config": json.loads(h["config"]),
            **summary,
            "upload_offset": summary.get("bytes", 0),
            "awaiting_resume": bool(summary.get("awaiting_resume")) and h["state"] == "running",
        }

    async def cancel(self, session_id: str) -> dict[str, Any]:
        k = self._keys(session_id)
        for _ in range(3):
            with _unavailable("cancelling a session"):
                state, owner = await self._cancel(keys=[k.session])
            if state == "missing":
                _not_found()
            if state == "running":
                # Marked: the owner's next renewal (within a third of the lease) sees it in any
                # case. Telling the owner's cancel wait makes it milliseconds.
                if owner:
                    await self._signal_owner(owner, session_id)
                break
            if state != "created":
                break  # ended: nothing to do
            # Nobody runs it: end it here, unless an upload claims it first (then signal that).
            summary = await self._summary(session_id)
            outcome = await self._end_unowned(
                session_id, "created", EndReason.CANCELLED, summary, lease_gone=False
            )
            if outcome != "state":
                break
        return await self.status(session_id)

    async def reader(self, session_id: str) -> RedisEventLog:
        with _unavailable("opening a session's events"):
            exists = await self._redis.exists(self._keys(session_id).session)
        if not exists:
            _not_found()
        return RedisEventLog(self, session_id, owned=False)

    async def _signal_owner(self, owner: str, session_id: str) -> None:
        key = self._worker_cancels(owner)
        with _unavailable("cancelling a session"):
            async with self._redis.pipeline(transaction=True) as p:
                p.rpush(key, session_id)
                # A worker that died leaves its list behind only this long.
                p.pexpire(key, self._lease_ms + self._retention_ms)
                await p.execute()

    async def renew(self, sessions: Sequence[Renewal]) -> dict[str, Lease]:
        """Renew every session this worker owns: one pipelined round trip per ``RENEW_BATCH``
        sessions (each a ``RENEW`` script, atomic per session). Raises ``StoreUnavailable``
        only if no batch got through; a session of a failed batch is missing from the answer."""
        leases: dict[str, Lease] = {}
        failure: StoreUnavailable | None = None
        for i in range(0, len(sessions), RENEW_BATCH):
            try:
                leases.update(await self._renew_batch(sessions[i : i + RENEW_BATCH]))
            except StoreUnavailable as exc:
                failure = failure or exc
        if failure is not None and not leases:
            raise failure
        return leases

    async def _renew_batch(self, batch: Sequence[Renewal]) -> dict[str, Lease]:
        common: list[str | int] = [
            self.worker_id,
            self._lease_ms,
            self._lease_ms + self._retention_ms,
        ]
        replies: list[Any] = []
        for attempt in range(2):
            with _unavailable("renewing leases"):
                async with self._redis.pipeline(transaction=False) as p:
                    journaled = [r.session_id for r in batch if r.journaled]
                    if journaled:
                        # When their leases lapse, as far as this worker can tell: the hint
                        # the other workers' sweeps go by (adoption checks the lease itself).
                        deadline = self._lease_deadline_ms()
                        p.zadd(self._journaled_key, dict.fromkeys(journaled, deadline))
                    for r in batch:
                        k = self._keys(r.session_id)
                        config = "" if r.config is None else to_json(r.config)
                        p.evalsha(
                            self._renew.sha,
                            3,
                            k.session,
                            k.lease,
                            k.events,
                            *common,
                            to_json(r.summary),
                            config,
                        )
                    replies = await p.execute(raise_on_error=False)
                    if journaled:
                        replies = replies[1:]  # the ZADD's
                if attempt == 0 and any(isinstance(x, NoScriptError) for x in replies):
                    # Redis restarted or flushed its scripts: load it, send the batch again.
                    await self._redis.script_load(lua.RENEW)
                    continue
            break
        leases: dict[str, Lease] = {}
        errors: list[Exception] = []
        for r, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                errors.append(reply)  # not renewed this time; the caller counts from before
            elif reply == 0:
                leases[r.session_id] = Lease.LOST
            else:
                leases[r.session_id] = Lease.CANCEL if reply == 2 else Lease.HELD
        if errors:
            log.warning("%d of %d lease renewals failed: %s", len(errors), len(batch), errors[0])
        return leases

    async def wait_cancels(self, seconds: float) -> list[str]:
        """BLPOP on this worker's cancel list (one connection, however many sessions it owns),
        then whatever else is queued there, in one more round trip."""
        # 0 would block for ever, and a wait past the connection's read timeout would time out.
        seconds = min(max(seconds, 0.01), self._longest_wait)
        key = self._cancels_key
        with _unavailable("waiting for cancel requests"):
            popped = await self._cancel_waits.blpop([key], timeout=seconds)
            if popped is None:
                return []
            more = cast(list[str] | None, await self._cancel_waits.lpop(key, CANCEL_DRAIN))
        return [cast(str, popped[1]), *(more or [])]

    # -- journals and adoption -------------------------------------------------------------

    def _lease_deadline_ms(self) -> int:
        return round(time.time() * 1000) + self._lease_ms

    async def _mark_journaled(self, session_ids: Sequence[str]) -> None:
        deadline = self._lease_deadline_ms()
        with _unavailable("recording a resumable session"):
            await self._redis.zadd(self._journaled_key, dict.fromkeys(session_ids, deadline))

    async def append_audio(self, writes: Sequence[JournalWrite]) -> dict[str, bool]:
        """One pipelined round trip for every session's bytes (one ``JOURNAL`` script each)."""
        replies: list[Any] = []
        ttl = self._lease_ms + self._retention_ms
        for attempt in range(2):
            with _unavailable("keeping received audio"):
                async with self._redis.pipeline(transaction=False) as p:
                    for w in writes:
                        k = self._keys(w.session_id)
                        p.evalsha(
                            self._journal.sha,
                            2,
                            k.session,
                            k.audio,
                            self.worker_id,
                            w.offset,
                            w.data,
                            w.input_end or "",
                            ttl,
                        )
                    replies = await p.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(x, NoScriptError) for x in replies):
                await self._redis.script_load(lua.JOURNAL)
                continue
            break
        kept: dict[str, bool] = {}
        errors: list[Exception] = []
        for w, reply in zip(writes, replies, strict=True):
            if isinstance(reply, Exception):
                errors.append(reply)  # not written: missing from the answer, sent again
            else:
                kept[w.session_id] = reply[0] == "ok"
                if reply[0] != "ok":
                    log.warning(
                        "a resumable session's journal is broken; it cannot be adopted",
                        extra={"session_id": w.session_id, "why": reply[0], "at": reply[1]},
                    )
        if errors and not kept:
            raise StoreUnavailable(f"Redis unavailable while keeping received audio: {errors[0]}")
        return kept

    async def read_audio(self, session_id: str, start: int, size: int) -> bytes:
        with _unavailable("reading received audio"):
            data = await self._raw.getrange(self._keys(session_id).audio, start, start + size - 1)
        return cast(bytes, data)  # a client that does not decode

    async def orphans(self, lapsed_for: float, limit: int) -> list[str]:
        until = round((time.time() - lapsed_for) * 1000)
        with _unavailable("looking for sessions to adopt"):
            ids = await self._redis.zrangebyscore(
                self._journaled_key, "-inf", until, start=0, num=limit
            )
        return [str(i) for i in ids]

    async def adopt(self, session_id: str) -> Adoption | None:
        k = self._keys(session_id)
        token = secrets.token_hex(8)
        args: list[str | int] = [
            self.worker_id,
            token,
            self._lease_ms,
            self._lease_ms + self._retention_ms,
        ]
        with _unavailable("adopting a session"):
            reply: list[Any] = await self._adopt(keys=[k.session, k.lease, k.audio], args=args)
        outcome = str(reply[0])
        if outcome == "ok":
            fields = reply[2:]
            record = dict(zip(fields[::2], fields[1::2], strict=True))
            await self._mark_journaled([session_id])
            return Adoption(
                config=parse_session_config(json.loads(record["config"])),
                created_at=float(record["created_at"]),
                started_at=float(record.get("started_at") or record["created_at"]),
                received=int(reply[1]),
                input_end=record.get("input_end") or None,
                logged=LoggedProgress.from_record(record),
                last_id=int(record.get("last_id") or 0),
            )
        if outcome == "leased":
            return None  # its owner lives after all (or another worker adopted it just now)
        if outcome == "nojournal":
            # Not resumable, or its journal is broken: nothing to go on from.
            await self._settle(session_id, adopting=False)
        with _unavailable("looking for sessions to adopt"):
            await self._redis.zrem(self._journaled_key, session_id)
        return None

    async def release(self, session_id: str) -> None:
        k = self._keys(session_id)
        # As if its lease had lapsed ADOPT_AFTER_S ago: the next sweep anywhere adopts it.
        lapsed = round((time.time() - ADOPT_AFTER_S) * 1000)
        with _unavailable("handing a session over"):
            if await self._release(keys=[k.session, k.lease], args=[self.worker_id]):
                await self._redis.zadd(self._journaled_key, {session_id: lapsed})

    async def ping(self) -> None:
        with _unavailable("checking readiness"):
            await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._blocking.aclose()
        await self._cancel_waits.aclose()
        await self._raw.aclose()

    # -- events -------------------------------------------------------------------------------

    async def append_owned(self, session_id: str, event: Event) -> LoggedEvent:
        """Append as the owner: refused unless this worker still owns the running session."""
        data = event.to_dict()
        # Unique per append, so a retry whose first attempt landed is recognised; the id comes
        # from Redis, so an append cancelled after it landed leaves no gap or duplicate.
        token = secrets.token_hex(8)
        reply = await self._append_event(
            session_id, "running", self.worker_id, token, data, progress=mark(event)
        )
        if reply[0] == "ok":
            return LoggedEvent(id=int(reply[1]), type=event.type, data=data)
        if reply[0] == "missing":
            raise _gone(session_id)
        raise StoreUnavailable(
            "this worker lost the session: its lease lapsed (longer than "
            f"{self.settings.redis_lease_seconds:g} s without reaching Redis) and it was ended "
            "as worker_lost"
        )

    async def _append_event(
        self,
        session_id: str,
        state: str,
        owner: str,
        token: str,
        data: Mapping[str, Any],
        *,
        lease_gone: bool = False,
        progress: Mark = NO_MARK,
    ) -> list[Any]:
        k = self._keys(session_id)
        kind = str(data["type"])
        is_end = kind == "end"
        summary = {f: v for f, v in data.items() if f not in _END_FIELDS} if is_end else {}
        args: list[str | int] = [
            state,
            owner,
            "1" if lease_gone else "0",
            token,
            kind,
            to_json(data),
            self.settings.redis_stream_maxlen,
            to_json(summary),
            str(data["reason"]) if is_end else "",
            repr(time.time()),
            self._retention_ms,
            " ".join(progress.counts),
            progress.set_field,
            progress.set_value,
        ]
        keys = [k.session, k.events, k.lease, k.audio]
        with _unavailable("appending an event"):
            reply: list[Any] = await self._append(keys=keys, args=args)
        return reply

    async def _end_unowned(
        self,
        session_id: str,
        state: str,
        reason: EndReason,
        summary: Mapping[str, Any],
        *,
        lease_gone: bool,
    ) -> str:
        """Write the ``end`` of a session no worker runs. Guarded: at most one writer wins;
        returns the script's outcome ("ok", or why it did not write)."""
        data = End(reason.value, summary).to_dict()
        token = secrets.token_hex(8)
        reply = await self._append_event(session_id, state, "", token, data, lease_gone=lease_gone)
        if reply[0] == "ok":
            log.warning(
                "ended session %s nobody was running", session_id, extra={"reason": reason.value}
            )
        return str(reply[0])

    async def _summary(self, session_id: str) -> dict[str, Any]:
        with _unavailable("reading a session"):
            raw = await self._redis.hget(self._keys(session_id).session, "summary")
        summary: dict[str, Any] = json.loads(raw or "{}")
        return summary

    async def _settle(self, session_id: str, *, adopting: bool = True) -> str:
        """A reader found nothing new: is anyone still going to write?

        Returns "ended", "live" (an owner holds the lease, the start deadline has not passed,
        or a resumable session's owner died and another worker will adopt it), or writes the
        ``end`` of a session whose lease is gone and returns "ended". ``adopting=False``: the
        session cannot be adopted (its journal is broken)."""
        k = self._keys(session_id)
        with _unavailable("checking a session's owner"):
            async with self._redis.pipeline(transaction=False) as p:
                p.hmget(k.session, "state", "summary", "journal")
                p.exists(k.lease)
                p.zscore(self._journaled_key, session_id)
                (state, summary, journal), leased, lapsed_ms = await p.execute()
        if state is None:
            raise _gone(session_id)
        if state == "ended":
            return "ended"
        if leased:
            return "live"
        if adopting and self._adoptable(state, journal, lapsed_ms):
            return "live"  # a worker's sweep adopts it within a second or so
        reason = EndReason.WORKER_LOST if state == "running" else EndReason.UNSTARTED_TIMEOUT
        outcome = await self._end_unowned(
            session_id, state, reason, json.loads(summary or "{}"), lease_gone=True
        )
        # "leased": the owner renewed just now after all.
        return "live" if outcome == "leased" else "ended"

    @staticmethod
    def _adoptable(state: str, journal: str | None, lapsed_ms: float | None) -> bool:
        """Whether a session without a lease is for another worker to adopt (not to end)."""
        if state != "running" or journal != "ok" or lapsed_ms is None:
            return False
        return time.time() * 1000 - lapsed_ms < ADOPT_GIVE_UP_S * 1000

    async def follow(self, session_id: str, after: int = 0) -> AsyncIterator[LoggedEvent]:
        """Replay from ``after``, then follow live, until ``end``. Blocks at most a poll interval
        at a time, then checks that someone is still writing."""
        stream = self._keys(session_id).events
        cursor = max(0, after)
        block: int | None = None  # the first read never waits: an ended session returns at once
        last_look = False
        while True:
            with _unavailable("reading events"):
                # [[stream, [(entry_id, fields), ...]]], or empty when nothing came
                reply: Any = await self._blocking.xread(
                    {stream: f"0-{cursor}"}, count=READ_COUNT, block=block
                )
            if reply:
                for entry_id, fields in reply[0][1]:
                    cursor = int(entry_id.partition("-")[2])
                    yield LoggedEvent(id=cursor, type=fields["t"], data=json.loads(fields["d"]))
                    if fields["t"] == "end":
                        return
                block = self._poll_ms
                continue
            if last_look:
                return  # ended, and nothing after the cursor (resumed past the end)
            if await self._settle(session_id) == "ended":
                # Its end may have landed between the read and the check: one more look.
                last_look, block = True, None
            else:
                block = self._poll_ms


class RedisEventLog:
    """One session's Redis Stream as an ``EventLog``. The owner's instance appends, one append
    in flight at a time so that ids follow the order of the emits; any instance follows."""

    def __init__(
        self, store: RedisStore, session_id: str, *, owned: bool, last_id: int = 0
    ) -> None:
        self._store = store
        self.session_id = session_id
        self._owned = owned
        self._last = last_id
        self._closed = False
        self._lock = anyio.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_id(self) -> int:
        return self._last

    async def append(self, event: Event) -> LoggedEvent:
        if not self._owned:
            raise RuntimeError("only the session's owner appends to its log")
        if self._closed:
            raise RuntimeError("append to a closed event log")
        async with self._lock:
            logged = await self._store.append_owned(self.session_id, event)
            self._last = logged.id
        return logged

    async def close(self) -> None:
        # The end event already marked the session ended in Redis, in the same script.
        self._closed = True

    def follow(self, after: int = 0) -> AsyncIterator[LoggedEvent]:
        return self._store.follow(self.session_id, after)
