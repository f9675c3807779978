"""Journals and adoption in the Redis store, against the real scripts (lua.JOURNAL, lua.ADOPT)
on a real redis-server.

Guaranteed: a resumable session's received bytes are kept at exact offsets, binary as they
came; a write retried after its first attempt landed (wholly or in part) adds nothing twice; a
gap breaks the journal, and a session with a broken journal is ended ``worker_lost`` instead of
adopted; only the owner appends. Once the owner's lease lapses (and not before) exactly one
worker adopts the session, and gets the journal's length, how the input ended, the log's
progress and last id; the dead owner is fenced off. Until then the session is an orphan:
listed for adoption, its status awaiting a resume at the journal's end, and readers wait for
its adoption rather than end it, for ``ADOPT_GIVE_UP_S``."""

from __future__ import annotations

import anyio
import pytest

from service.config import SessionConfig
from service.errors import ErrorCode, StoreUnavailable, StreamerError
from service.events.progress import LoggedProgress
from service.events.types import Active, Error, Event, Inactive, LoggedEvent, Segment
from service.session.session import Counters, summarize
from service.store import JournalWrite, Lease, Renewal
from service.store import redis_store as redis_store_module
from service.store.redis_store import RedisStore
from tests.store.conftest import StoreFactory

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

EMPTY = summarize(Counters(), None)
LEASE_S = 0.6  # make_store's
SID = "J" * 22
# Every byte value: not text in any encoding a client could decode it with.
BINARY = bytes(range(256)) + b"\xff\xfe\xc3\x28\x00\x80"


async def running(store: RedisStore, session_id: str = SID, *, resumable: bool = True) -> None:
    await store.create(session_id, SessionConfig(resumable=resumable), EMPTY)
    await store.claim(session_id)


async def record(store: RedisStore, session_id: str = SID) -> dict[str, str]:
    raw = await store._redis.hgetall(store._keys(session_id).session)
    return {str(k): str(v) for k, v in raw.items()}


async def lapsed(store: RedisStore, session_id: str = SID) -> None:
    """Wait until the owner's lease is gone (nobody renews it: the owner is as good as dead)."""
    with anyio.fail_after(LEASE_S + 2):
        while await store._redis.exists(store._keys(session_id).lease):
            await anyio.sleep(0.02)


async def events(store: RedisStore, session_id: str = SID) -> list[LoggedEvent]:
    log = await store.reader(session_id)
    with anyio.fail_after(5):
        return [e async for e in log.follow()]


async def test_bytes_accumulate_at_exact_offsets_binary(make_store: StoreFactory) -> None:
    store = make_store()
    await running(store)
    await running(store, "K" * 22)
    a, b, c = BINARY[:100], BINARY[100:250], BINARY[250:]
    assert await store.append_audio([JournalWrite(SID, 0, a)]) == {SID: True}
    # Several sessions in one call.
    assert await store.append_audio(
        [JournalWrite(SID, 100, b), JournalWrite("K" * 22, 0, b"other")]
    ) == {SID: True, "K" * 22: True}
    assert await store.append_audio([JournalWrite(SID, 250, c, "completed")]) == {SID: True}
    assert await store.read_audio(SID, 0, 10_000) == BINARY
    assert await store.read_audio(SID, 120, 16) == BINARY[120:136]
    assert await store.read_audio("K" * 22, 0, 100) == b"other"
    assert (await record(store))["input_end"] == "completed"


async def test_a_retry_adds_nothing_twice(make_store: StoreFactory) -> None:
    store = make_store()
    await running(store)
    assert await store.append_audio([JournalWrite(SID, 0, b"abc")]) == {SID: True}
    # Its first attempt landed, its reply was lost: sent again as it was.
    assert await store.append_audio([JournalWrite(SID, 0, b"abc")]) == {SID: True}
    assert await store.read_audio(SID, 0, 100) == b"abc"
    # ... or merged with bytes received meanwhile: only those are new.
    assert await store.append_audio([JournalWrite(SID, 0, b"abc\xffdef")]) == {SID: True}
    assert await store.read_audio(SID, 0, 100) == b"abc\xffdef"
    # An end that landed, retried with nothing new.
    assert await store.append_audio([JournalWrite(SID, 7, b"", "completed")]) == {SID: True}
    assert await store.append_audio([JournalWrite(SID, 7, b"", "completed")]) == {SID: True}
    assert await store.read_audio(SID, 0, 100) == b"abc\xffdef"


async def test_only_the_owner_appends(make_store: StoreFactory) -> None:
    owner, other = make_store(), make_store()
    await running(owner)
    await running(owner, "N" * 22, resumable=False)
    assert await owner.append_audio([JournalWrite(SID, 0, b"abc")]) == {SID: True}
    assert await other.append_audio([JournalWrite(SID, 3, b"def")]) == {SID: False}
    assert await owner.read_audio(SID, 0, 100) == b"abc"
    # Not resumable: no journal to keep.
    assert await owner.append_audio([JournalWrite("N" * 22, 0, b"x")]) == {"N" * 22: False}
    # A refusal breaks nothing: the owner goes on.
    assert await owner.append_audio([JournalWrite(SID, 3, b"def")]) == {SID: True}


async def test_a_gap_breaks_the_journal_and_the_session_ends_worker_lost(
    make_store: StoreFactory,
) -> None:
    owner, other = make_store(), make_store()
    await running(owner)
    assert await owner.append_audio([JournalWrite(SID, 0, b"abc")]) == {SID: True}
    # Bytes 3..5 never came: what follows cannot be replayed.
    assert await owner.append_audio([JournalWrite(SID, 6, b"ghi")]) == {SID: False}
    assert (await record(owner))["journal"] == "broken"
    assert await owner.read_audio(SID, 0, 100) == b""  # dropped: nobody can use it
    assert await owner.append_audio([JournalWrite(SID, 3, b"def")]) == {SID: False}
    assert await owner.renew([Renewal(SID, EMPTY, journaled=True)]) == {SID: Lease.HELD}
    assert await other.adopt(SID) is None  # its owner lives
    assert (await record(owner))["state"] == "running"

    await lapsed(owner)
    assert await other.adopt(SID) is None
    r = await record(owner)
    assert (r["state"], r["end_reason"]) == ("ended", "worker_lost")  # by adopt() itself
    assert r.get("owner") != other.worker_id
    got = await events(other)
    assert [e.type for e in got] == ["end"]
    assert got[0].data["reason"] == "worker_lost"
    assert await other.orphans(0.0, 100) == []


async def test_adopt_takes_over_a_lapsed_owner_once(make_store: StoreFactory) -> None:
    owner, adopter, late = make_store(), make_store(), make_store()
    await running(owner)
    log = owner.log(SID)
    logged: list[Event] = [
        Active(0, 0.5),
        Segment(0, 0.5, 0.8, False, {"count": 1}),
        Active(1, 0.6),
        Inactive(0, 1.0),
        Segment(0, 0.5, 1.0, True, {"count": 2}),
        Error("model_failed", "bad luck", 1, 0.6, 0.9, final=False),
        Error("model_failed", "bad luck", 1, 0.6, 1.2, final=True),
        Inactive(1, 1.2),
    ]
    for e in logged:
        await log.append(e)
    assert await owner.append_audio([JournalWrite(SID, 0, BINARY)]) == {SID: True}
    assert await owner.append_audio([JournalWrite(SID, len(BINARY), b"", "completed")]) == {
        SID: True
    }
    assert await owner.renew([Renewal(SID, EMPTY, journaled=True)]) == {SID: Lease.HELD}
    assert await adopter.adopt(SID) is None  # the owner's lease holds
    assert (await record(owner))["owner"] == owner.worker_id

    await lapsed(owner)
    adoption = await adopter.adopt(SID)
    assert adoption is not None
    assert adoption.received == len(BINARY)
    assert adoption.input_end == "completed"
    assert adoption.last_id == len(logged)
    assert adoption.logged == LoggedProgress(
        vad={0: 2, 1: 2},
        utterances={0: 1, 1: 1},
        interim_end={0: 0.8, 1: 0.9},
        finals=1,
        interims=1,
        errors=2,
    )
    assert adoption.config.resumable
    r = await record(owner)
    assert adoption.created_at == float(r["created_at"])
    assert adoption.started_at == float(r["started_at"])
    assert (r["state"], r["owner"], r["adoptions"]) == ("running", adopter.worker_id, "1")

    assert await late.adopt(SID) is None  # leased again: the adopter's
    assert (await record(owner))["owner"] == adopter.worker_id
    # The dead owner, should it wake up, is fenced off.
    with pytest.raises(StoreUnavailable, match="lost the session"):
        await log.append(Active(0, 9.0))
    assert await owner.append_audio([JournalWrite(SID, len(BINARY), b"late")]) == {SID: False}
    # The adopter goes on where the log and the journal end.
    assert (await adopter.log(SID, adoption.last_id).append(Active(0, 2.0))).id == 9
    assert await adopter.append_audio([JournalWrite(SID, len(BINARY), b"more")]) == {SID: True}
    assert await adopter.read_audio(SID, 0, 1000) == BINARY + b"more"


async def test_orphans_are_listed_once_their_lease_lapsed(make_store: StoreFactory) -> None:
    owner, other = make_store(), make_store()
    await running(owner)
    await running(owner, "N" * 22, resumable=False)  # never an orphan: nothing to go on from
    assert await other.orphans(0.0, 100) == []
    await lapsed(owner)
    with anyio.fail_after(2):
        while await other.orphans(0.0, 100) != [SID]:
            await anyio.sleep(0.02)
    assert await other.orphans(30.0, 100) == []  # not lapsed that long
    assert await other.adopt(SID) is not None
    assert await other.orphans(0.0, 100) == []  # adopted: leased again


async def test_an_orphan_awaits_its_adoption_for_a_while(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, other = make_store(), make_store()
    await running(owner)
    assert await owner.append_audio([JournalWrite(SID, 0, b"x" * 1234)]) == {SID: True}
    await owner.log(SID).append(Active(0, 0.5))
    status = await other.status(SID)
    assert (status["awaiting_resume"], status["upload_offset"]) == (False, 0)  # as renewed

    await lapsed(owner)
    with anyio.fail_after(2):
        while not await other.orphans(0.0, 100):
            await anyio.sleep(0.02)
    status = await other.status(SID)
    assert status["state"] == "running"
    assert (status["awaiting_resume"], status["upload_offset"]) == (True, 1234)

    # Readers wait for a worker to adopt it; they do not end it.
    seen: list[LoggedEvent] = []
    reader = await other.reader(SID)
    with anyio.move_on_after(1.0) as waited:
        async for e in reader.follow():
            seen.append(e)
    assert waited.cancelled_caught
    assert [e.type for e in seen] == ["active"]
    assert (await record(other))["state"] == "running"

    # Nobody adopted it for ADOPT_GIVE_UP_S: its readers end it.
    monkeypatch.setattr(redis_store_module, "ADOPT_GIVE_UP_S", 0.2)
    got = await events(other)
    assert [e.type for e in got] == ["active", "end"]
    assert got[-1].data["reason"] == "worker_lost"
    status = await other.status(SID)
    assert (status["state"], status["end_reason"]) == ("ended", "worker_lost")
    assert await other.adopt(SID) is None


async def test_a_new_upload_to_an_orphan_is_busy_not_ended(make_store: StoreFactory) -> None:
    """Regression: claiming an orphan (a new upload, not a resuming one) answered
    ``session_ended`` although the session runs on (another worker adopts it, and a resuming
    upload continues it); it is ``session_busy``, as for a session whose owner lives."""
    owner, other = make_store(), make_store()
    await running(owner)
    await lapsed(owner)
    with pytest.raises(StreamerError) as refused:
        await other.claim(SID)
    assert refused.value.code is ErrorCode.SESSION_BUSY
    assert (await record(other))["state"] == "running"
    assert await other.adopt(SID) is not None
