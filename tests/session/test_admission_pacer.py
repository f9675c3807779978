"""Admission pacing: while the loop is busy, new sessions wait their turn and are let in as
the loop's headroom allows, first come first served; past the wait they are refused."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from service.session.admission import SETUP_S, AdmissionPacer

pytestmark = pytest.mark.anyio


async def test_an_idle_loop_admits_at_once() -> None:
    pacer = AdmissionPacer(0.8, 5.0, 0.1)
    pacer.sampled(0.3)
    with anyio.fail_after(1):
        assert await pacer.wait()
    assert pacer.waiting == 0


async def test_a_busy_loop_lets_sessions_in_as_its_headroom_pays_for() -> None:
    pacer = AdmissionPacer(0.8, 5.0, 0.1)
    pacer.sampled(0.9)
    admitted: list[int] = []

    async def one(i: int) -> None:
        if await pacer.wait():
            admitted.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.01)
            assert pacer.waiting == 20 and not admitted
            pacer.sampled(0.85)  # still over the mark: nobody
            await anyio.sleep(0.01)
            assert not admitted
            # 0.1 s x (0.8 - 0.7) of headroom pays for 0.01 / SETUP_S sessions, in order.
            pacer.sampled(0.7)
            await anyio.sleep(0.01)
            n = int(0.1 * 0.1 / SETUP_S)
            assert admitted == list(range(n))
            pacer.sampled(0.0)  # lots of room: everyone else
    assert sorted(admitted) == list(range(20))


async def test_a_session_that_waits_too_long_is_refused_and_leaves_the_queue() -> None:
    pacer = AdmissionPacer(0.8, 0.2, 0.1)
    pacer.sampled(0.99)
    with anyio.fail_after(2):
        assert not await pacer.wait()
    assert pacer.waiting == 0


async def test_a_client_that_gives_up_leaves_the_queue() -> None:
    pacer = AdmissionPacer(0.8, 5.0, 0.1)
    pacer.sampled(0.99)
    with anyio.fail_after(2):
        with anyio.move_on_after(0.1):
            await pacer.wait()
    assert pacer.waiting == 0


async def test_off_when_the_mark_is_zero_or_one() -> None:
    for pace in (0.0, 1.0):
        pacer = AdmissionPacer(pace, 5.0, 0.1)
        pacer.sampled(1.0)
        with anyio.fail_after(1):
            assert await pacer.wait()
