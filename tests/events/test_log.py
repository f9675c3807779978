"""The in-memory event log: ids, replay, resume, many followers, close."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from service.events.log import MemoryEventLog
from service.events.types import Active, End, Inactive, LoggedEvent, Segment

pytestmark = pytest.mark.anyio


async def collect(log: MemoryEventLog, after: int = 0) -> list[LoggedEvent]:
    return [e async for e in log.follow(after)]


async def test_ids_replay_and_resume() -> None:
    log = MemoryEventLog()
    await log.append(Active(0, 1.0))
    await log.append(Inactive(0, 2.0))
    await log.append(Segment(0, 1.0, 2.0, True, {"count": 16000}))
    await log.append(End("completed", {"segments": 1}))
    await log.close()
    with anyio.fail_after(2):
        events = await collect(log)
        resumed = await collect(log, after=2)
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
    assert [e.id for e in resumed] == [3, 4]


async def test_live_followers_see_every_event_once() -> None:
    log = MemoryEventLog()
    seen: list[list[int]] = [[], [], []]

    async def follow(i: int) -> None:
        async for e in log.follow():
            seen[i].append(e.id)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(follow, i)
            for t in range(50):
                await log.append(Active(0, float(t)))
                if t % 7 == 0:
                    await anyio.lowlevel.checkpoint()
            await log.close()
    assert seen == [list(range(1, 51))] * 3


async def test_append_after_close_is_refused() -> None:
    log = MemoryEventLog()
    await log.close()
    with pytest.raises(RuntimeError):
        await log.append(Active(0, 0.0))
