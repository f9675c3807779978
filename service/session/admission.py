"""Pacing new sessions so that a burst of them does not swamp the streams already running.

Setting a session up (three HTTP requests, the SSE response, the pipeline's tasks) costs the
event loop ~4 ms, so 100 new sessions a second are ~40% of it on top of the live streams
(BENCHMARKS.md). Refusing outright while the loop is saturated (``STREAMER_ADMIT_MAX_LOOP_BUSY``)
protects the running streams only after they have already fallen behind, and turns away
sessions the server could hold a few seconds later. So while the loop was busier than
``STREAMER_ADMIT_PACE_LOOP_BUSY`` over its last few samples, a new session waits its turn
instead: every sample (0.1 s) lets in as many waiting sessions as the loop's headroom below
that mark pays for, first come first served. One that waits longer than
``STREAMER_ADMIT_WAIT_SECONDS`` gets ``503 server_overloaded`` with ``Retry-After`` as before.
"""

from __future__ import annotations

from collections import deque

import anyio

# Event-loop seconds one new session costs to set up (measured 4.3 ms of server CPU per
# session, the VAD thread's share included).
SETUP_S = 0.004


class AdmissionPacer:
    def __init__(self, pace: float, max_wait_s: float, interval_s: float) -> None:
        self.pace = pace
        self.max_wait_s = max_wait_s
        self.interval_s = interval_s
        self._waiters: deque[anyio.Event] = deque()
        self.recent_busy = 0.0

    @property
    def enabled(self) -> bool:
        return 0 < self.pace < 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait(self) -> bool:
        """Until this session may start: True, or False if it waited ``max_wait_s`` in vain."""
        if not self.enabled or (not self._waiters and self.recent_busy < self.pace):
            return True
        event = anyio.Event()
        self._waiters.append(event)
        try:
            with anyio.move_on_after(self.max_wait_s):
                await event.wait()
            return event.is_set()  # also when let in just as its time ran out
        finally:
            if not event.is_set():
                self._waiters.remove(event)  # timed out, or its client gave up

    def sampled(self, recent_busy: float) -> None:
        """The loop's busy fraction over its last few samples: let in what it pays for."""
        self.recent_busy = recent_busy
        if not self._waiters:
            return
        headroom_s = (self.pace - recent_busy) * self.interval_s
        if headroom_s <= 0:
            return
        for _ in range(max(1, int(headroom_s / SETUP_S))):
            if not self._waiters:
                break
            self._waiters.popleft().set()
