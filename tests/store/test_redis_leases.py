"""How a worker keeps the sessions it runs, on a real redis-server: one lease keeper and one
cancel wait per worker, whatever the number of sessions, with every guarantee of the per-session
loops they replaced (cancel from another worker, a lost lease stops the session, Redis down).

Regression: the owner used to run one loop per live session, a RENEW round trip each per third of
the lease and then a BLPOP on a connection of its own for the session's cancel list. With 400 live
sessions on two workers (``benchmarks/loadgen.py --streams 400``) every worker wanted ~200 such
connections plus one per SSE reader from a pool that redis-py 8 caps at 100: "Too many
connections", logged ~2,000 times as "lease renewal failed; retrying", and 377 of 400 streams
failed (their SSE readers hit the same cap). It broke from ~100 streams on two workers."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import pytest
import redis.asyncio.connection
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from service.config import SessionConfig
from service.errors import ErrorCode, StreamerError
from service.events.types import Active, End, Event, LoggedEvent
from service.observability.loop import LoopLoad
from service.runtime import Runtime
from service.session.observer import SessionObserver
from service.session.registry import Registry
from service.session.session import Counters, Session, SessionState, summarize
from service.settings import Settings
from service.store import Lease, Renewal
from service.store.redis_store import COMMAND_CONNECTIONS, RedisStore
from tests.store.conftest import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

EMPTY = summarize(Counters(), None)
# More sessions on one worker than redis-py 8's default pool (100 connections) would serve with
# a connection per session.
MANY = 150


class IdleModels:
    """The model stage of sessions that get no audio: it only waits for their end."""

    async def run_stage(
        self,
        receive: MemoryObjectReceiveStream[Any],
        emit: Callable[[Event], Awaitable[None]],
        **options: Any,
    ) -> None:
        async with receive:
            async for _ in receive:
                pass

    def wait_s(self) -> float:
        return 0.0

    def load_with(self, sessions: int) -> None:
        return None


def settings(server: RedisServer, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": server.url,
        "redis_prefix": prefix,
        "redis_lease_seconds": 0.6,
        "redis_poll_seconds": 0.1,
        "redis_timeout_seconds": 1.0,
        "retention_seconds": 30.0,
        **overrides,
    }
    return Settings(**values)


class Worker:
    """A registry on a Redis store, as in one worker, running sessions that wait for audio."""

    def __init__(self, tg: TaskGroup, s: Settings) -> None:
        self.store = RedisStore(s)
        runtime = Runtime(
            s, batcher=None, models=IdleModels(), observer=SessionObserver(), load=LoopLoad()
        )
        self.registry = Registry(runtime, tg, self.store)
        self.renewals: list[int] = []  # sessions per call of store.renew
        renew = self.store.renew

        async def counted(sessions: Sequence[Renewal]) -> dict[str, Lease]:
            self.renewals.append(len(sessions))
            return await renew(sessions)

        self.store.renew = counted  # type: ignore[method-assign]

    async def start(self, n: int) -> list[Session]:
        sessions = []
        for _ in range(n):
            sid = await self.registry.create(SessionConfig())
            sessions.append(await self.registry.start(sid))
        return sessions

    async def close(self) -> None:
        await self.registry.shutdown(2)
        await self.store.aclose()


@pytest.fixture
async def worker_factory(prefix: str) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    workers: list[Worker] = []
    async with anyio.create_task_group() as tg:

        async def make(server: RedisServer, **overrides: Any) -> Worker:
            w = Worker(tg, settings(server, prefix, **overrides))
            workers.append(w)
            return w

        yield make
        with anyio.fail_after(10):
            for w in workers:
                await w.close()
        tg.cancel_scope.cancel()


async def redis_info(server: RedisServer) -> dict[str, Any]:
    client = redis.asyncio.Redis(port=server.port, decode_responses=True)
    try:
        info: dict[str, Any] = await client.info("all")
        clients: list[dict[str, Any]] = await client.client_list()
    finally:
        await client.aclose()
    info["blpop_clients"] = sum(1 for c in clients if c.get("cmd") == "blpop")
    info["blpop_calls"] = info.get("cmdstat_blpop", {}).get("calls", 0)
    return info


async def test_many_live_sessions_on_one_worker_share_one_keeper_and_one_cancel_wait(
    own_redis: RedisServer,
    worker_factory: Callable[..., Awaitable[Worker]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = await worker_factory(own_redis)
    sessions = await w.start(MANY)
    before = await redis_info(own_redis)
    w.renewals.clear()
    t0 = time.monotonic()
    await anyio.sleep(2.0)  # over three lease periods (0.6 s), nine renewal intervals
    elapsed = time.monotonic() - t0
    after = await redis_info(own_redis)

    # Every session still runs: no renewal failed, none was given up.
    assert all(s.state is SessionState.RUNNING for s in sessions)
    assert "lease renewal failed" not in caplog.text
    # One renewal call per third of the lease for all of them together (each one pipelined
    # round trip: see the next test), not one per session: per-session loops made MANY calls.
    intervals = elapsed / (0.6 / 3)
    assert w.renewals and all(n == MANY for n in w.renewals)
    assert len(w.renewals) <= intervals + 2, (len(w.renewals), intervals)
    # One blocking cancel wait for the worker, not one connection per session (they were
    # MANY, capped at 100 by the pool, the rest failing with "Too many connections").
    assert after["blpop_clients"] <= 1
    assert int(after["blocked_clients"]) <= 1
    assert after["blpop_calls"] - before["blpop_calls"] <= intervals + 2
    # All connections: the few commands this worker had in flight at once (sessions were
    # started one by one, and they append nothing), its cancel wait, and the one asking.
    assert int(after["connected_clients"]) <= 10, after["connected_clients"]


async def test_renewing_many_sessions_is_one_round_trip(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(settings(redis_server, prefix))
    try:
        ids = [f"{i:022d}" for i in range(300)]
        for sid in ids:
            await store.create(sid, SessionConfig(), EMPTY)
            await store.claim(sid)
        renewals = [Renewal(sid, EMPTY, {}) for sid in ids]
        # The first renewal loads the script, should this Redis not know it yet.
        assert await store.renew(renewals) == dict.fromkeys(ids, Lease.HELD)
        sent: list[int] = []
        send = redis.asyncio.connection.AbstractConnection.send_packed_command

        async def counted(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(1)
            await send(self, command, check_health)

        monkeypatch.setattr(
            redis.asyncio.connection.AbstractConnection, "send_packed_command", counted
        )
        assert await store.renew(renewals) == dict.fromkeys(ids, Lease.HELD)
        assert len(sent) == 1
    finally:
        await store.aclose()


async def test_many_readers_and_writers_on_one_store(own_redis: RedisServer, prefix: str) -> None:
    """SSE readers hold a connection each while they wait, and concurrent appends need one
    each for a moment: neither may run into a connection cap the service did not choose (with
    redis-py 8's default of 100, the 101st reader failed with "Too many connections")."""
    # Nobody renews here: a lease that outlasts the test.
    store = RedisStore(settings(own_redis, prefix, redis_lease_seconds=60.0))
    try:
        owner_ids = [f"W{i:021d}" for i in range(MANY)]
        for sid in owner_ids:
            await store.create(sid, SessionConfig(), EMPTY)
            await store.claim(sid)
        followed = owner_ids[0]
        seen: list[list[LoggedEvent]] = []

        async def follow() -> None:
            seen.append([e async for e in (await store.reader(followed)).follow()])

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(MANY):
                    tg.start_soon(follow)
                while int((await redis_info(own_redis))["blocked_clients"]) < MANY:
                    await anyio.sleep(0.05)
                # Every session appends at once: they queue for the bounded command pool.
                async with anyio.create_task_group() as writers:
                    for sid in owner_ids:
                        writers.start_soon(store.log(sid).append, Active(0, 1.0))
                await store.log(followed).append(End("completed", EMPTY))
        assert len(seen) == MANY
        assert all([e.type for e in events] == ["active", "end"] for events in seen)
        info = await redis_info(own_redis)
        assert int(info["connected_clients"]) <= COMMAND_CONNECTIONS + MANY + 1
    finally:
        await store.aclose()


async def test_cancel_on_another_worker_reaches_the_owner_at_once(
    redis_server: RedisServer, prefix: str, worker_factory: Callable[..., Awaitable[Worker]]
) -> None:
    # A long lease: renewals come every 10 s, so only the worker's cancel wait can be this fast.
    w = await worker_factory(redis_server, redis_lease_seconds=30.0)
    sessions = await w.start(20)
    other = RedisStore(settings(redis_server, prefix, redis_lease_seconds=30.0))
    try:
        target = sessions[7]
        t0 = time.monotonic()
        status = await other.cancel(target.id)
        assert status["state"] in ("running", "ended")
        with anyio.fail_after(2):
            await target.done.wait()
        assert time.monotonic() - t0 < 2
        assert target.end_reason is not None and target.end_reason.value == "cancelled"
        ended = await other.status(target.id)
        assert (ended["state"], ended["end_reason"]) == ("ended", "cancelled")
        assert all(s.state is SessionState.RUNNING for s in sessions if s is not target)
    finally:
        await other.aclose()


async def test_a_cancel_whose_push_was_lost_arrives_with_the_next_renewal(
    redis_server: RedisServer, prefix: str, worker_factory: Callable[..., Awaitable[Worker]]
) -> None:
    w = await worker_factory(redis_server)
    sessions = await w.start(5)
    target = sessions[2]
    # Only the CANCEL script: the session is marked, its owner's list never gets the id.
    await w.store._cancel(keys=[w.store._keys(target.id).session])
    with anyio.fail_after(2):  # a renewal interval (0.2 s) and slack
        await target.done.wait()
    assert target.end_reason is not None and target.end_reason.value == "cancelled"
    assert all(s.state is SessionState.RUNNING for s in sessions if s is not target)


async def test_a_worker_that_lost_a_lease_stops_that_session(
    redis_server: RedisServer, prefix: str, worker_factory: Callable[..., Awaitable[Worker]]
) -> None:
    w = await worker_factory(redis_server)
    sessions = await w.start(10)
    lost = sessions[3]
    other = RedisStore(settings(redis_server, prefix))
    try:
        # As if this worker had stalled past its lease: the lease is gone, and a reader on
        # another worker ends the session as worker_lost.
        await other._redis.delete(other._keys(lost.id).lease)
        assert await other._settle(lost.id) == "ended"
        with anyio.fail_after(2):
            await lost.done.wait()
        assert lost.error is not None and lost.error.code is ErrorCode.STORE_UNAVAILABLE
        assert "lost the session" in lost.error.message
        # It wrote nothing after the end the other worker wrote.
        events = [e async for e in (await other.reader(lost.id)).follow()]
        assert [(e.type, e.data.get("reason")) for e in events] == [("end", "worker_lost")]
        assert all(s.state is SessionState.RUNNING for s in sessions if s is not lost)
    finally:
        await other.aclose()


async def test_redis_down_stops_every_session_within_a_lease_and_says_so_once(
    own_redis: RedisServer,
    worker_factory: Callable[..., Awaitable[Worker]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = await worker_factory(own_redis)
    sessions = await w.start(30)
    await anyio.sleep(0.3)  # a renewal or two
    own_redis.stop(kill=True)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), anyio.fail_after(10):
        for s in sessions:
            await s.done.wait()
    # A lease (0.6 s) after the last renewal, plus a failed attempt's reconnects (~0.4 s).
    assert time.monotonic() - t0 < 3
    for s in sessions:
        assert s.error is not None and s.error.code is ErrorCode.STORE_UNAVAILABLE
    renewal_failures = [r for r in caplog.records if r.getMessage().startswith("lease renewal")]
    assert len(renewal_failures) == 1, [r.getMessage() for r in renewal_failures]


async def test_a_busy_worker_turns_an_upload_away_and_the_session_waits_for_another(
    redis_server: RedisServer, prefix: str, worker_factory: Callable[..., Awaitable[Worker]]
) -> None:
    """With a shared store a session runs where its upload lands, so that worker applies the
    load gate (STREAMER_ADMIT_MAX_LOOP_BUSY) as it does the session limit: a busy one refuses
    the upload with server_overloaded and the session, still created, starts on another."""
    busy = await worker_factory(redis_server, admit_max_loop_busy=0.5)
    idle = await worker_factory(redis_server, admit_max_loop_busy=0.5)
    sid = await idle.registry.create(SessionConfig())
    busy.registry.runtime.load.record(1.0, 0.9)
    with pytest.raises(StreamerError) as refused:
        await busy.registry.start(sid)
    assert refused.value.code is ErrorCode.SERVER_OVERLOADED
    assert (await idle.registry.status(sid))["state"] == "created"
    session = await idle.registry.start(sid)
    assert session.state is SessionState.RUNNING


class FullModels(IdleModels):
    """The model side of a worker whose model is at capacity: it would refuse new sessions."""

    def load_with(self, sessions: int) -> float:  # type: ignore[override]
        return 10.0


async def test_a_session_admitted_elsewhere_is_not_refused_its_upload_for_the_model(
    redis_server: RedisServer, prefix: str, worker_factory: Callable[..., Awaitable[Worker]]
) -> None:
    """Regression: with two workers a session was admitted (model included) by the worker that
    took its POST, then its upload reached the other, whose model gate refused it: the client
    was left with a created session that never ran (a load run saw it end only at the
    unstarted timeout). The upload's worker checks only its own loop and decoder."""
    admitting = await worker_factory(redis_server)
    full = await worker_factory(redis_server)
    full.registry.runtime = replace(full.registry.runtime, models=FullModels())
    with pytest.raises(StreamerError) as refused:
        await full.registry.create(SessionConfig())  # a new session: the model says no
    assert refused.value.code is ErrorCode.SERVER_OVERLOADED
    sid = await admitting.registry.create(SessionConfig())
    session = await full.registry.start(sid)  # its upload lands on the full worker: runs
    assert session.state is SessionState.RUNNING


class SmallModels(IdleModels):
    """A model with room for two sessions and a half (each adds 30% of its capacity)."""

    def load_with(self, sessions: int) -> float:  # type: ignore[override]
        return 0.3 * sessions


async def test_sessions_admitted_here_count_against_the_model_before_their_upload(
    redis_server: RedisServer, prefix: str, worker_factory: Callable[..., Awaitable[Worker]]
) -> None:
    """Regression: with a shared store a session runs where its upload lands, so a worker's
    live count held only sessions already running there; a ramp of creates, over before any
    upload started, was admitted whole (two workers past a one-utterance-per-call model took
    21-23 sessions for ~16 and their finals waited 25-30 s). Sessions admitted here now count
    until their upload starts here, or for a while if it starts elsewhere."""
    worker = await worker_factory(redis_server)
    worker.registry.runtime = replace(worker.registry.runtime, models=SmallModels())
    first = await worker.registry.create(SessionConfig())
    await worker.registry.create(SessionConfig())
    with pytest.raises(StreamerError) as refused:
        await worker.registry.create(SessionConfig())  # 3 x 30% > 75%
    assert refused.value.code is ErrorCode.SERVER_OVERLOADED
    await worker.registry.start(first)  # running here: counted once, as live
    with pytest.raises(StreamerError):
        await worker.registry.create(SessionConfig())
