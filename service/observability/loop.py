"""How loaded the one event loop is.

Every session's Python runs on one event loop, so the loop is what bounds the streams one
process holds (BENCHMARKS.md): past ~90% busy, every chunk waits behind every other one and the
lag of all live streams grows together. :class:`LoopLoad` measures two things from a task on
the loop:

- **busy**, the fraction of wall time the loop was not waiting for I/O, over a window of a few
  seconds (Node.js calls it event loop utilisation). Under ``python -m service`` the loop is a
  :class:`TimedEventLoop`, whose selector adds up the time spent waiting in ``select``; time the
  loop stands waiting for the GIL counts as busy, as it should. Under another launcher the
  loop's thread CPU time stands in, which misses those GIL waits.
- **lag**, how much later than asked a sleeping task wakes: the backlog of ready work, a long
  callback or a GC pause.

The registry refuses new sessions while the loop is busier than ``STREAMER_ADMIT_MAX_LOOP_BUSY``
(``server_overloaded``, 503 with ``Retry-After``), so that streams already running keep up.
"""

from __future__ import annotations

import asyncio
import collections
import selectors
import time
from collections.abc import Callable

import anyio

# How often the loop is sampled (ten timer wake-ups a second cost nothing), and how many seconds
# of samples ``busy`` covers: long enough that a GC pause or one heavy moment does not refuse
# sessions, short enough that the gate shuts before far more streams than fit are admitted and
# opens again soon after the load goes (BENCHMARKS.md).
SAMPLE_S = 0.1
WINDOW_S = 2.0
# Samples in ``recent_busy``: what admission pacing reacts to, within a few tenths of a second.
RECENT = 3


class _TimedSelector(selectors.DefaultSelector):
    """The platform's selector, adding up the time spent waiting in ``select``."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_seconds = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        t0 = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle_seconds += time.perf_counter() - t0


class TimedEventLoop(asyncio.SelectorEventLoop):
    """The default asyncio loop on Linux (a selector loop), knowing how long it has been idle.
    Two clock reads per loop iteration."""

    def __init__(self) -> None:
        self._timed = _TimedSelector()
        super().__init__(self._timed)

    @property
    def idle_seconds(self) -> float:
        """Seconds spent waiting for I/O since the loop was made."""
        return self._timed.idle_seconds


class LoopLoad:
    """Samples the running loop every ``interval_s`` while :meth:`run` runs (the app's
    lifespan runs it). ``on_lag`` gets each sample's lag (the metrics histogram)."""

    def __init__(
        self,
        interval_s: float = SAMPLE_S,
        window_s: float = WINDOW_S,
        on_lag: Callable[[float], None] | None = None,
        on_sample: Callable[[float], None] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._on_lag = on_lag
        # Told each sample how busy the loop was over the last RECENT samples (admission pacing).
        self.on_sample = on_sample
        # (wall seconds, busy seconds) of the last samples; ``busy`` is their ratio.
        self._samples: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max(1, round(window_s / interval_s))
        )
        self._wall = 0.0
        self._busy = 0.0
        self.measured = "not started"  # how busy is measured: "idle time" or "thread CPU"

    @property
    def recent_busy(self) -> float:
        """Fraction of the last ``RECENT`` samples the loop was busy."""
        recent = list(self._samples)[-RECENT:]
        wall = sum(w for w, _ in recent)
        return sum(b for _, b in recent) / wall if wall > 0 else 0.0

    @property
    def busy(self) -> float:
        """Fraction of the last window the loop was busy, 0..1 (0 before the first sample)."""
        return self._busy / self._wall if self._wall > 0 else 0.0

    def record(self, wall_s: float, busy_s: float) -> None:
        """Add one sample: ``busy_s`` of the last ``wall_s`` seconds were busy."""
        busy_s = min(max(busy_s, 0.0), wall_s)
        if len(self._samples) == self._samples.maxlen:
            old_wall, old_busy = self._samples[0]
            self._wall -= old_wall
            self._busy -= old_busy
        self._samples.append((wall_s, busy_s))
        self._wall += wall_s
        self._busy += busy_s

    async def run(self) -> None:
        """Sample until cancelled."""
        self.measured, busy_clock = _busy_clock(asyncio.get_running_loop())
        interval, on_lag = self.interval_s, self._on_lag
        t0, b0 = time.perf_counter(), busy_clock()
        while True:
            asked = time.perf_counter()
            await anyio.sleep(interval)
            now, b1 = time.perf_counter(), busy_clock()
            if on_lag is not None:
                on_lag(max(0.0, now - asked - interval))
            self.record(now - t0, b1 - b0)
            t0, b0 = now, b1
            if self.on_sample is not None:
                self.on_sample(self.recent_busy)


def _busy_clock(loop: asyncio.AbstractEventLoop) -> tuple[str, Callable[[], float]]:
    """How busy seconds are counted on this loop: a clock that advances only while busy."""
    if isinstance(loop, TimedEventLoop):
        timed = loop
        return "idle time", lambda: time.perf_counter() - timed.idle_seconds
    return "thread CPU", time.thread_time
