"""A worker's journal of received audio (service/session/journal.py) against a fake store.

Guaranteed: the bytes every journaled session received go out together, one ``append_audio``
call per interval (``write_now`` and ``end`` send at once); ``end`` carries the reason with the
input's final offset; bytes a call did not write (the store was unavailable, or its answer
lacks the session) are sent again first, merged with newer ones, in order, and never twice; a
session the store answered False for (its journal broke) is journaled no more; an upload
waits in ``catch_up`` while its session has more than ``MAX_PENDING_BYTES`` pending, and goes
on once they are written, or once the journal gave up on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import anyio
import anyio.lowlevel
import pytest

from service.errors import StoreUnavailable
from service.session.journal import MAX_PENDING_BYTES, AudioJournal
from service.store import JournalWrite, SessionStore

pytestmark = pytest.mark.anyio


class FakeStore:
    """Records each ``append_audio`` call, keeps the journals as the JOURNAL script does
    (append at the exact offset, bytes an earlier attempt landed not twice, never a gap), and
    can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[list[JournalWrite]] = []
        self.journals: dict[str, bytearray] = {}
        self.input_ends: dict[str, str] = {}
        self.unavailable = 0  # fail this many calls with StoreUnavailable
        self.land_then_fail = False  # ... after writing them (the reply was lost)
        self.crash = False  # fail the next call with an unexpected error
        self.refuse: set[str] = set()  # answer False (the journal is broken)
        self.unanswered: set[str] = set()  # missing from the answer (their command failed)
        self.gate: anyio.Event | None = None  # holds calls until set

    async def append_audio(self, writes: Sequence[JournalWrite]) -> dict[str, bool]:
        self.calls.append(list(writes))
        if self.gate is not None:
            await self.gate.wait()
        if self.crash:
            self.crash = False
            raise RuntimeError("a bug in the store")
        if self.unavailable and not self.land_then_fail:
            self.unavailable -= 1
            raise StoreUnavailable("Redis unavailable while keeping received audio")
        kept: dict[str, bool] = {}
        for w in writes:
            if w.session_id in self.unanswered:
                continue
            if w.session_id in self.refuse:
                kept[w.session_id] = False
                continue
            journal = self.journals.setdefault(w.session_id, bytearray())
            assert w.offset <= len(journal) <= w.offset + len(w.data), "a gap, or bytes lost"
            journal += w.data[len(journal) - w.offset :]
            if w.input_end:
                self.input_ends[w.session_id] = w.input_end
            kept[w.session_id] = True
        if self.unavailable:
            self.unavailable -= 1
            raise StoreUnavailable("Redis unavailable while keeping received audio")
        return kept

    def sent(self, session_id: str) -> list[tuple[int, bytes, str | None]]:
        """What each call carried for the session: (offset, data, input_end)."""
        return [
            (w.offset, w.data, w.input_end)
            for call in self.calls
            for w in call
            if w.session_id == session_id
        ]


JournalFactory = Callable[..., tuple[AudioJournal, FakeStore]]


@pytest.fixture
async def make() -> AsyncIterator[JournalFactory]:
    async with anyio.create_task_group() as tg:

        def factory(interval_s: float = 10.0, *sessions: str) -> tuple[AudioJournal, FakeStore]:
            store = FakeStore()
            journal = AudioJournal(cast(SessionStore, store), tg, interval_s)
            for sid in sessions:
                journal.open(sid)
            return journal, store

        yield factory
        tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while not condition():
            await anyio.sleep(0.005)


async def test_sessions_go_out_together_once_per_interval(make: JournalFactory) -> None:
    journal, store = make(0.2, "a", "b", "c")
    t0 = anyio.current_time()
    for sid in ("a", "b", "c"):
        journal.add(sid, 0, f"{sid}1".encode())
    for sid in ("a", "b", "c"):
        journal.add(sid, 2, f"{sid}2".encode())
    journal.add("unjournaled", 0, b"x")  # never opened: not kept
    await until(lambda: len(store.calls) == 1)
    assert anyio.current_time() - t0 >= 0.15  # waited for the interval
    assert sorted((w.session_id, w.offset, w.data) for w in store.calls[0]) == [
        ("a", 0, b"a1a2"),
        ("b", 0, b"b1b2"),
        ("c", 0, b"c1c2"),
    ]
    journal.add("b", 4, b"b3")
    await until(lambda: len(store.calls) == 2)
    assert store.calls[1] == [JournalWrite("b", 4, b"b3")]
    await anyio.sleep(0.3)
    assert len(store.calls) == 2  # nothing pending: no empty writes


async def test_write_now_sends_at_once(make: JournalFactory) -> None:
    journal, store = make(10.0, "a")
    journal.add("a", 0, b"abc")
    await anyio.sleep(0.05)
    assert store.calls == []
    journal.write_now()
    await until(lambda: len(store.calls) == 1, within=1.0)
    assert store.journals["a"] == b"abc"


async def test_end_carries_the_reason_at_the_input_end(make: JournalFactory) -> None:
    journal, store = make(10.0, "a", "b")
    journal.add("a", 0, b"abc")
    journal.end("a", 3, "completed")  # with bytes pending: in the same write
    await until(lambda: len(store.calls) == 1, within=1.0)
    assert store.calls[0] == [JournalWrite("a", 0, b"abc", "completed")]
    journal.add("b", 0, b"xy")
    journal.write_now()
    await until(lambda: len(store.calls) == 2, within=1.0)
    journal.end("b", 2, "client_disconnected")  # nothing pending: at the offset received
    await until(lambda: len(store.calls) == 3, within=1.0)
    assert store.calls[2] == [JournalWrite("b", 2, b"", "client_disconnected")]
    assert store.input_ends == {"a": "completed", "b": "client_disconnected"}


@pytest.mark.parametrize("landed", [False, True], ids=["lost", "landed-reply-lost"])
async def test_unwritten_bytes_go_again_first_merged_never_twice(
    make: JournalFactory, landed: bool
) -> None:
    journal, store = make(0.05, "a", "b")
    store.unavailable = 1
    store.land_then_fail = landed
    store.gate = anyio.Event()
    journal.add("a", 0, b"a1")
    journal.add("b", 0, b"b1")
    journal.write_now()
    await until(lambda: len(store.calls) == 1)
    # While that call is out (and fails), more comes.
    journal.add("a", 2, b"a2")
    journal.add("b", 2, b"b2")
    store.gate.set()
    store.gate = None  # later calls write before they return
    await until(lambda: len(store.calls) == 2)
    assert sorted(store.calls[1], key=lambda w: w.session_id) == [
        JournalWrite("a", 0, b"a1a2"),
        JournalWrite("b", 0, b"b1b2"),
    ]
    journal.add("a", 4, b"a3")
    await until(lambda: len(store.calls) == 3)
    assert store.calls[2] == [JournalWrite("a", 4, b"a3")]
    assert store.journals == {"a": b"a1a2a3", "b": b"b1b2"}


async def test_a_session_missing_from_the_answer_goes_again(make: JournalFactory) -> None:
    journal, store = make(0.05, "a", "b")
    store.unanswered = {"b"}
    journal.add("a", 0, b"a1")
    journal.add("b", 0, b"b1")
    await until(lambda: len(store.calls) == 1)
    store.unanswered = set()
    journal.add("b", 2, b"b2")
    await until(lambda: len(store.calls) == 2)
    assert store.calls[1] == [JournalWrite("b", 0, b"b1b2")]
    assert store.journals == {"a": b"a1", "b": b"b1b2"}


async def test_a_session_closed_meanwhile_is_not_sent_again(make: JournalFactory) -> None:
    journal, store = make(0.05, "a", "b")
    store.unavailable = 1
    store.gate = anyio.Event()
    journal.add("a", 0, b"a1")
    journal.add("b", 0, b"b1")
    await until(lambda: len(store.calls) == 1)
    journal.close("a")  # it ended: its journal goes with its end
    store.gate.set()
    await until(lambda: len(store.calls) == 2)
    assert store.calls[1] == [JournalWrite("b", 0, b"b1")]


async def test_a_broken_journal_is_journaled_no_more(make: JournalFactory) -> None:
    journal, store = make(0.05, "a", "b")
    store.refuse = {"a"}
    journal.add("a", 0, b"a1")
    journal.add("b", 0, b"b1")
    await until(lambda: len(store.calls) == 1)
    journal.add("a", 2, b"a2")
    journal.end("a", 4, "completed")
    journal.add("b", 2, b"b2")
    await until(lambda: len(store.calls) == 2)
    await anyio.sleep(0.15)
    assert store.sent("a") == [(0, b"a1", None)]
    assert store.calls[1:] == [[JournalWrite("b", 2, b"b2")]]
    assert not journal.behind("a")


async def test_catch_up_waits_while_too_much_is_pending(make: JournalFactory) -> None:
    journal, store = make(10.0, "a", "b")
    journal.add("a", 0, b"x" * 100)
    with anyio.fail_after(1):
        await journal.catch_up("a")  # not behind: at once, no write
    assert store.calls == []

    store.gate = anyio.Event()
    journal.add("a", 100, b"y" * MAX_PENDING_BYTES)
    assert journal.behind("a")
    caught_up = anyio.Event()

    async def upload() -> None:
        await journal.catch_up("a")
        caught_up.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(upload)
        await until(lambda: len(store.calls) == 1)  # catch_up asked for the write at once
        await anyio.sleep(0.1)
        assert not caught_up.is_set()  # still not written
        store.gate.set()
        with anyio.fail_after(2):
            await caught_up.wait()
    assert len(store.journals["a"]) == 100 + MAX_PENDING_BYTES


async def test_catch_up_goes_on_when_the_journal_gives_up(make: JournalFactory) -> None:
    """Regression: an unexpected failure of the store ends the journal's writer, which gave up
    on what was pending but not on the batch it was writing: an upload waiting for that batch
    waited for ever."""
    journal, store = make(10.0, "a")
    store.crash = True
    store.gate = anyio.Event()
    journal.add("a", 0, b"y" * (MAX_PENDING_BYTES + 1))

    async with anyio.create_task_group() as tg:
        done = anyio.Event()

        async def upload() -> None:
            await journal.catch_up("a")
            done.set()

        tg.start_soon(upload)
        await until(lambda: len(store.calls) == 1)
        store.gate.set()
        with anyio.fail_after(2):
            await done.wait()
    # Given up: the session is journaled no more.
    journal.add("a", MAX_PENDING_BYTES + 1, b"z")
    journal.write_now()
    await anyio.sleep(0.05)
    assert len(store.calls) == 1
