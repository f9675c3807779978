"""How busy the event loop is: the window, both ways of measuring it, and the lag it reports."""

from __future__ import annotations

import asyncio
import time

import anyio
import anyio.lowlevel
import pytest

from service.observability.loop import LoopLoad, TimedEventLoop


def test_busy_is_the_ratio_over_the_last_window_of_samples() -> None:
    load = LoopLoad(interval_s=0.1, window_s=0.3)
    assert load.busy == 0.0  # nothing sampled yet: never refuses
    load.record(0.1, 0.1)
    load.record(0.1, 0.0)
    assert load.busy == pytest.approx(0.5)
    load.record(0.2, 0.2)
    assert load.busy == pytest.approx(0.3 / 0.4)
    load.record(0.1, 0.0)  # the first sample leaves the window of three
    assert load.busy == pytest.approx(0.2 / 0.4)
    load.record(0.1, 0.5)  # a busy time beyond the wall time counts as the whole sample
    assert load.busy == pytest.approx(0.3 / 0.4)


def _measure(loop_factory: type[asyncio.AbstractEventLoop] | None) -> tuple[str, float, float]:
    """An idle stretch then a spinning one, on a fresh loop: (measured, idle busy, spun busy)."""

    async def main() -> tuple[str, float, float]:
        load = LoopLoad(interval_s=0.02, window_s=0.2)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(load.run)
                await anyio.sleep(0.3)
                idle = load.busy
                for _ in range(30):  # spins in 20 ms steps, so samples keep coming
                    end = time.perf_counter() + 0.02
                    while time.perf_counter() < end:
                        pass
                    await anyio.lowlevel.checkpoint()
                spun = load.busy
                tg.cancel_scope.cancel()
        return load.measured, idle, spun

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def test_the_timed_loop_counts_everything_but_waiting_for_io_as_busy() -> None:
    measured, idle, spun = _measure(TimedEventLoop)
    assert measured == "idle time"
    assert idle < 0.5
    assert spun > 0.8


def test_another_loop_falls_back_to_the_loop_threads_cpu_time() -> None:
    measured, idle, spun = _measure(None)
    assert measured == "thread CPU"
    assert idle < 0.5
    assert spun > 0.5  # CPU time: a busy test machine may take some of the spin's wall time


def test_the_timed_loop_adds_up_its_waits() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, TimedEventLoop)
        before = loop.idle_seconds
        await asyncio.sleep(0.2)
        return loop.idle_seconds - before

    with asyncio.Runner(loop_factory=TimedEventLoop) as runner:
        waited = runner.run(main())
    assert 0.15 < waited < 1.0
