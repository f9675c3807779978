"""A worker's leases on the shared sessions whose pipelines it runs (``REDIS_URL`` only).

Every session a worker runs has a lease in the store; a worker that stops renewing loses its
sessions to the others (``worker_lost``). One keeper per worker renews all of them in one call
per third of the lease, and one wait per worker takes cancel requests made on other workers: a
loop per session cost a Redis round trip each per period and a blocking connection each, and
at a few hundred sessions per worker the connection pool ran out (``Too many connections``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

from service.config import SessionConfig, config_to_dict
from service.errors import ErrorCode, StoreUnavailable, StreamerError
from service.session.session import EndReason, Session, SessionState, published_summary
from service.store import Lease, Renewal, SessionStore

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Owned:
    """A shared session whose pipeline runs here, as the worker's lease keeper sees it."""

    session: Session
    # When its lease was last known set (the claim, or the start of a renewal that landed).
    renewed: float
    # The config last published (sent again only when the session's config is replaced).
    config_sent: SessionConfig | None = None
    cancelled: bool = False


class LeaseKeeper:
    """Keeps the leases of the sessions added to it until they are discarded; its two tasks run
    in ``task_group`` while there is at least one session."""

    def __init__(self, store: SessionStore, lease_seconds: float, task_group: TaskGroup) -> None:
        self.store = store
        self._lease_s = lease_seconds
        self._tg = task_group
        self._owned: dict[str, _Owned] = {}
        self._keeping = False
        self._taking_cancels = False
        # Set to renew (and publish) at once instead of at the next third of the lease.
        self._now = anyio.Event()

    def __len__(self) -> int:
        return len(self._owned)

    def add(self, session: Session, claimed_at: float) -> None:
        """Keep ``session``'s lease, claimed at ``claimed_at`` (``time.monotonic()``)."""
        self._owned[session.id] = _Owned(session, claimed_at)
        if not self._keeping:
            self._keeping = True
            self._tg.start_soon(self._renew_all, name="lease keeper")
        if not self._taking_cancels:
            self._taking_cancels = True
            self._tg.start_soon(self._take_cancels, name="cancel wait")

    def discard(self, session_id: str) -> None:
        self._owned.pop(session_id, None)

    def publish_now(self) -> None:
        """Renew now, publishing every session's counters: a resumable session's upload was cut,
        and other workers should report its exact offset. Done by the keeper itself, so no
        renewal computed before the cut can land after it and publish stale counters."""
        self._now.set()

    async def _renew_all(self) -> None:
        """The worker's heartbeat, one task for all the sessions it runs: every third of the
        lease, renew all their leases in one call (one pipelined round trip per few hundred
        sessions), publishing their live counters for status on other workers. Per-session
        loops cost a Redis round trip each per period, and their cancel waits a connection each.

        A session this worker no longer owns (another worker declared it lost) stops at once; one
        whose lease could not be renewed for a whole lease stops too (other workers may already
        have ended it). A renewal also reports cancel requests whose push was lost. Runs while
        there are sessions to keep."""
        interval = self._lease_s / 3
        failing = False
        try:
            while self._owned:
                began = time.monotonic()
                batch = [(owned, owned.session.config) for owned in self._owned.values()]
                renewals = [r for owned, config in batch if (r := self._renewal(owned, config))]
                try:
                    leases = await self.store.renew(renewals)
                except StoreUnavailable as exc:
                    if not failing:
                        log.warning(
                            "lease renewal failed; retrying",
                            extra={"sessions": len(batch), "error": str(exc)},
                        )
                    failing = True
                    self._expire([owned for owned, _ in batch], exc)
                    await anyio.sleep(min(interval, 0.5))
                    continue
                if failing:
                    log.info("lease renewal works again", extra={"sessions": len(batch)})
                    failing = False
                missed: list[_Owned] = []
                for owned, config in batch:
                    lease = leases.get(owned.session.id)
                    if lease is None:
                        missed.append(owned)  # its own command failed; the others renewed
                    else:
                        self._renewed(owned, lease, began, config)
                if missed:
                    self._expire(missed, StoreUnavailable("Redis refused to renew the lease"))
                with anyio.move_on_after(max(0.0, began + interval - time.monotonic())):
                    await self._now.wait()
                self._now = anyio.Event()
        except Exception:
            # A bug here leaves this worker's sessions without leases: end them, as a bug in a
            # pipeline stage ends its session, rather than let other workers declare them lost.
            log.exception("lease keeper failed")
            for owned in list(self._owned.values()):
                session = owned.session
                session.error = session.error or StreamerError(ErrorCode.INTERNAL, "internal error")
                session.cancel(EndReason.ERROR)
        finally:
            self._keeping = False

    def _renewal(self, owned: _Owned, config: SessionConfig) -> Renewal | None:
        session = owned.session
        try:
            changed = config is not owned.config_sent
            return Renewal(
                session.id,
                published_summary(session),
                config_to_dict(config) if changed else None,
                journaled=session.journal is not None,
            )
        except Exception:
            # A bug here must end this session only, as a bug in a pipeline stage does.
            log.exception("lease keeper failed", extra={"session_id": session.id})
            self._owned.pop(session.id, None)
            session.error = session.error or StreamerError(ErrorCode.INTERNAL, "internal error")
            session.cancel(EndReason.ERROR)
            return None

    def _renewed(self, owned: _Owned, lease: Lease, began: float, config: SessionConfig) -> None:
        session = owned.session
        if session.state is SessionState.ENDED or self._owned.get(session.id) is not owned:
            return  # its end is written (or failed on its own): nothing left to keep
        if lease is Lease.LOST:
            self._owned.pop(session.id, None)
            session.store_failed(
                StoreUnavailable(
                    "this worker lost the session: another worker declared it lost after "
                    f"{self._lease_s:g} s without a lease renewal"
                )
            )
            return
        owned.renewed, owned.config_sent = began, config
        if lease is Lease.CANCEL and not owned.cancelled:
            owned.cancelled = True
            session.cancel(EndReason.CANCELLED)

    def _expire(self, sessions: list[_Owned], error: StoreUnavailable) -> None:
        """After a failed renewal: stop the sessions whose lease may have lapsed by now."""
        now = time.monotonic()
        for owned in sessions:
            session = owned.session
            if session.state is SessionState.ENDED or self._owned.get(session.id) is not owned:
                continue
            if now - owned.renewed > self._lease_s:
                # Other workers may already consider it lost: stop producing into the void.
                self._owned.pop(session.id, None)
                session.store_failed(error)

    async def _take_cancels(self) -> None:
        """The worker's one wait for cancel requests made on other workers (a DELETE there),
        for all the sessions it runs: one blocking connection per worker, not one per session.
        Should it fail, renewals still deliver them, within a third of the lease."""
        wait = self._lease_s / 3
        failing = False
        try:
            while self._owned:
                try:
                    ids = await self.store.wait_cancels(wait)
                except StoreUnavailable as exc:
                    if not failing:
                        log.warning("cancel wait failed; retrying", extra={"error": str(exc)})
                    failing = True
                    await anyio.sleep(min(wait, 0.5))
                    continue
                failing = False
                for session_id in ids:
                    owned = self._owned.get(session_id)
                    if owned is not None and not owned.cancelled:
                        owned.cancelled = True
                        owned.session.cancel(EndReason.CANCELLED)
        except Exception:
            log.exception("cancel wait failed; cancels now arrive with lease renewals")
        finally:
            self._taking_cancels = False
