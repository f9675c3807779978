"""The Redis store on a real redis-server: stream ids, replay and resume, claim, cancel, lease
loss, retention, and Redis failures that must raise quickly instead of hanging."""

from __future__ import annotations

import time

import anyio
import pytest

from service.config import SessionConfig, parse_session_config
from service.errors import ErrorCode, StoreUnavailable, StreamerError
from service.events.types import Active, End, Inactive, LoggedEvent, Segment
from service.session.session import Counters, summarize
from service.store import Lease, Renewal
from service.store.redis_store import RedisEventLog, RedisStore
from tests.store.conftest import RedisServer, StoreFactory

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

EMPTY = summarize(Counters(), None)


async def started(store: RedisStore, session_id: str = "S" * 22) -> RedisEventLog:
    await store.create(session_id, SessionConfig(), EMPTY)
    await store.claim(session_id)
    return store.log(session_id)


async def collect(store: RedisStore, session_id: str, after: int = 0) -> list[LoggedEvent]:
    log = await store.reader(session_id)
    with anyio.fail_after(5):
        return [e async for e in log.follow(after)]


def end(reason: str = "completed") -> End:
    return End(reason, {**EMPTY, "segments": 1})


async def test_ids_are_stream_positions_replay_and_resume(make_store: StoreFactory) -> None:
    store = make_store()
    log = await started(store)
    await log.append(Active(0, 1.0))
    await log.append(Inactive(0, 2.0))
    await log.append(Segment(0, 1.0, 2.0, True, {"count": 16000}))
    await log.append(end())
    await log.close()
    events = await collect(store, log.session_id)
    assert [e.id for e in events] == [1, 2, 3, 4]
    assert [e.type for e in events] == ["active", "inactive", "segment", "end"]
    assert events[2].data == {
        "type": "segment",
        "start_time": 1.0,
        "end_time": 2.0,
        "is_final": True,
        "count": 16000,
        "channel": 0,
    }
    assert [e.id for e in await collect(store, log.session_id, after=2)] == [3, 4]
    assert await collect(store, log.session_id, after=4) == []  # resumed past the end
    # SSE id N is stream entry 0-N, so any worker resumes with XREAD from 0-N.
    raw = await store._redis.xrange(store._keys(log.session_id).events) or []
    assert [entry_id for entry_id, _ in raw] == ["0-1", "0-2", "0-3", "0-4"]
    status = await store.status(log.session_id)
    assert (status["state"], status["end_reason"], status["last_event_id"]) == (
        "ended",
        "completed",
        4,
    )
    assert status["segments"] == 1
    assert parse_session_config(status["config"]) == SessionConfig()


async def test_live_followers_on_other_workers_see_every_event_once(
    make_store: StoreFactory,
) -> None:
    owner = make_store()
    readers = [make_store() for _ in range(3)]
    log = await started(owner)
    seen: list[list[int]] = [[], [], []]

    async def follow(i: int) -> None:
        async for e in (await readers[i].reader(log.session_id)).follow():
            seen[i].append(e.id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(follow, i)
            for t in range(50):
                await log.append(Active(0, float(t)))
            await log.append(end())
    assert seen == [list(range(1, 52))] * 3


async def test_claim_is_atomic_across_workers(make_store: StoreFactory) -> None:
    workers = [make_store() for _ in range(8)]
    session_id = "C" * 22
    await workers[0].create(session_id, SessionConfig(interim_results=True), EMPTY)
    outcomes: list[str] = []

    async def claim(store: RedisStore) -> None:
        try:
            claimed = await store.claim(session_id)
            assert claimed.config.interim_results
            outcomes.append("ok")
        except StreamerError as exc:
            outcomes.append(exc.code.value)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for store in workers:
                tg.start_soon(claim, store)
    assert sorted(outcomes) == ["ok"] + ["session_busy"] * 7
    with pytest.raises(StreamerError) as unknown:
        await workers[0].claim("U" * 22)
    assert unknown.value.code is ErrorCode.SESSION_NOT_FOUND


async def test_an_append_retried_after_a_lost_reply_lands_once(make_store: StoreFactory) -> None:
    store = make_store()
    log = await started(store)
    data = Active(0, 0.5).to_dict()
    args = (log.session_id, "running", store.worker_id, "token-1", data)
    assert await store._append_event(*args) == ["ok", 1]
    assert await store._append_event(*args) == ["ok", 1]  # the same append, retried
    assert await store._redis.xlen(store._keys(log.session_id).events) == 1
    # An append that landed although its caller never heard (cancelled): the next one follows it.
    assert (await log.append(Inactive(0, 1.0))).id == 2


async def test_lost_owner_gets_exactly_one_worker_lost_end(make_store: StoreFactory) -> None:
    owner = make_store()
    readers = [make_store() for _ in range(4)]
    log = await started(owner)
    await log.append(Active(0, 0.5))
    renewal = Renewal(log.session_id, {**EMPTY, "bytes": 1234})
    assert await owner.renew([renewal]) == {log.session_id: Lease.HELD}
    # The owner now falls silent (as if killed): nobody renews its 0.6 s lease.
    t0 = time.monotonic()
    results: list[list[LoggedEvent]] = []

    async def follow(store: RedisStore) -> None:
        results.append([e async for e in (await store.reader(log.session_id)).follow()])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for store in readers:
                tg.start_soon(follow, store)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.6 + 0.1 + 1.0, elapsed  # lease + one poll + slack
    for events in results:
        assert [e.type for e in events] == ["active", "end"]
        assert events[-1].data["reason"] == "worker_lost"
        assert events[-1].data["bytes"] == 1234  # the last counters the owner published
    assert await owner._redis.xlen(owner._keys(log.session_id).events) == 2
    # The old owner, should it wake up, can no longer write: it is fenced off.
    with pytest.raises(StoreUnavailable, match="lost the session"):
        await log.append(Active(0, 9.0))
    assert await owner.renew([renewal]) == {log.session_id: Lease.LOST}
    with pytest.raises(StreamerError) as again:
        await readers[0].claim(log.session_id)
    assert again.value.code is ErrorCode.SESSION_ENDED


async def test_status_on_another_worker_notices_a_lost_owner(make_store: StoreFactory) -> None:
    owner, other = make_store(), make_store()
    log = await started(owner)
    assert (await other.status(log.session_id))["state"] == "running"
    await anyio.sleep(0.8)  # past the lease
    status = await other.status(log.session_id)
    assert (status["state"], status["end_reason"]) == ("ended", "worker_lost")


async def test_unstarted_session_ends_for_its_subscribers(make_store: StoreFactory) -> None:
    store = make_store(unstarted_timeout_seconds=0.3)
    await store.create("N" * 22, SessionConfig(), EMPTY)
    events = await collect(store, "N" * 22)
    assert [(e.type, e.data["reason"]) for e in events] == [("end", "unstarted_timeout")]
    with pytest.raises(StreamerError) as late:
        await store.claim("N" * 22)
    assert late.value.code is ErrorCode.SESSION_ENDED


async def test_cancel(make_store: StoreFactory) -> None:
    owner, other = make_store(), make_store()
    # Not started: ended on the spot, by whichever worker got the DELETE.
    await owner.create("D" * 22, SessionConfig(), EMPTY)
    status = await other.cancel("D" * 22)
    assert (status["state"], status["end_reason"]) == ("ended", "cancelled")
    assert [e.data["reason"] for e in await collect(other, "D" * 22)] == ["cancelled"]
    # Running elsewhere: its owner is told, at once, through its worker's one cancel list.
    log = await started(owner, "R" * 22)
    assert await owner.wait_cancels(0.05) == []
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            waiting: list[list[str]] = []

            async def wait() -> None:
                waiting.append(await owner.wait_cancels(1.5))

            tg.start_soon(wait)
            await anyio.sleep(0.05)
            t0 = time.monotonic()
            await other.cancel(log.session_id)
        assert waiting == [[log.session_id]] and time.monotonic() - t0 < 0.5
    # Had that push been lost, the owner's next renewal says so too.
    assert await owner.renew([Renewal(log.session_id, EMPTY)]) == {log.session_id: Lease.CANCEL}
    with pytest.raises(StreamerError) as gone:
        await other.cancel("U" * 22)
    assert gone.value.code is ErrorCode.SESSION_NOT_FOUND


async def test_cancel_wait_longer_than_a_poll_is_not_a_timeout(make_store: StoreFactory) -> None:
    """The owner waits a third of its lease for a cancel; with a lease much longer than the
    poll interval that wait outlasted the blocking connection's socket timeout."""
    store = make_store(redis_lease_seconds=4.5, redis_timeout_seconds=0.5)
    await started(store)
    with anyio.fail_after(3):
        assert await store.wait_cancels(1.5) == []


async def test_retention_by_length_and_expiry(make_store: StoreFactory) -> None:
    store = make_store(redis_stream_maxlen=10, retention_seconds=5.0)
    log = await started(store)
    for t in range(600):
        await log.append(Active(0, float(t)))
    keys = store._keys(log.session_id)
    # Approximate trimming (whole stream nodes), so far fewer than 600 remain.
    assert await store._redis.xlen(keys.events) < 300
    await log.append(end())
    events = await collect(store, log.session_id)
    assert events[0].id > 1 and events[-1].id == 601 and events[-1].type == "end"
    for key in (keys.session, keys.events):
        assert 0 < await store._redis.pttl(key) <= 5000
    assert not await store._redis.exists(keys.lease)


async def test_redis_down_raises_quickly_instead_of_hanging(
    make_store: StoreFactory, own_redis: RedisServer
) -> None:
    store = make_store(own_redis)
    log = await started(store)
    await log.append(Active(0, 0.5))
    own_redis.stop(kill=True)
    for call in (
        lambda: log.append(Active(0, 1.0)),
        lambda: collect(store, log.session_id),
        store.ping,
        lambda: store.status(log.session_id),
    ):
        t0 = time.monotonic()
        with anyio.fail_after(5), pytest.raises(StoreUnavailable):
            await call()
        assert time.monotonic() - t0 < 3


async def test_redis_restart_without_data_is_a_clear_error(
    make_store: StoreFactory, own_redis: RedisServer
) -> None:
    store = make_store(own_redis)
    log = await started(store)
    await log.append(Active(0, 0.5))
    own_redis.stop()
    own_redis.start()  # same port, empty: no persistence
    with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="no longer holds"):
        await log.append(Active(0, 1.0))
    reader = RedisEventLog(store, log.session_id, owned=False)
    with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="no longer holds"):
        _ = [e async for e in reader.follow()]
    await store.ping()  # reconnected
