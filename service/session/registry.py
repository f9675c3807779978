"""The one place that holds sessions. Nothing else keeps per-session state.

It owns a task group (opened in the app's lifespan) in which every session's pipeline and its
watcher run, so a session outlives the request that feeds it: a client that disconnects, a
WebSocket that closes, a DELETE from another connection all act on the same running pipeline.

Where sessions live is the store's business (``service/store``). With the in-memory default,
every session is a ``Session`` here. With a shared store (Redis), a ``Session`` exists only in
the worker that runs its pipeline (the one that received the audio); status, events and cancel
of any other session are served from the store, so any worker answers for any session.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from service.config import PcmFormat, SessionConfig
from service.errors import ErrorCode, OffsetMismatch, StoreUnavailable, StreamerError
from service.events.log import EventLog
from service.runtime import Runtime
from service.session.journal import AudioJournal
from service.session.leases import LeaseKeeper
from service.session.session import (
    Counters,
    EndReason,
    Session,
    SessionState,
    new_session_id,
    summarize,
)
from service.store import MemoryStore, SessionStore
from service.store.base import ADOPT_AFTER_S

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# How long a readiness check waits for the store.
READY_TIMEOUT_S = 1.0
# Shared store: how long a session admitted here counts against this worker's model while its
# upload has not started here (it may start on another worker, which then counts it).
ADMITTED_HOLD_S = 10.0
# Shared store: how often every worker looks for resumable sessions whose owner died, and how
# long after the lease lapsed it adopts one. Until then an upload resuming it adopts it where
# it lands (a client retries within a second or two), and so never has to find the adopter.
SWEEP_S = 1.0
SWEEP_BATCH = 64
# An adopted session's earlier audio is read back from the store this much at a time.
REPLAY_READ_BYTES = 256 * 1024


def _overloaded(why: str) -> StreamerError:
    """A new session turned away to keep the running ones on time (load shedding)."""
    return StreamerError(
        ErrorCode.SERVER_OVERLOADED,
        f"the server is at capacity ({why}); the sessions it holds come first, try again shortly",
    )


class Registry:
    def __init__(
        self, runtime: Runtime, task_group: TaskGroup, store: SessionStore | None = None
    ) -> None:
        self.runtime = runtime
        self._tg = task_group
        self.store: SessionStore = store or MemoryStore()
        # Sessions whose Session object lives here: all of them in memory, with a shared store
        # only those whose pipeline runs in this worker.
        self._sessions: dict[str, Session] = {}
        # The sessions not yet seen ended, pruned when counted: the capacity check on every
        # create then costs what is live, not everything kept for replay (which at a few
        # sessions per second and the default retention is thousands).
        self._unended: dict[str, Session] = {}
        self.accepting = True
        # Shared store only: sessions this worker admitted whose upload has not started here,
        # with when to stop counting them (their upload may start on another worker, which
        # then counts them). A ramp of creates is over before its uploads start, so without
        # these the model's load gate counted nothing and admitted the whole ramp.
        self._admitted: dict[str, float] = {}
        # Shared store only: the leases of the sessions whose pipelines run here, and the
        # audio their resumable sessions received.
        self._leases = LeaseKeeper(self.store, runtime.settings.redis_lease_seconds, task_group)
        self._journal = AudioJournal(
            self.store, task_group, runtime.settings.resume_journal_seconds
        )

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @property
    def live(self) -> int:
        ended = [sid for sid, s in self._unended.items() if s.state is SessionState.ENDED]
        for sid in ended:
            del self._unended[sid]
        return len(self._unended)

    def _admitted_elsewhere(self) -> int:
        """Sessions admitted here and not (yet) running here: counted by the model's load
        gate for ``ADMITTED_HOLD_S``, the time an upload takes to follow its POST."""
        now = time.monotonic()
        gone = [sid for sid, until in self._admitted.items() if until < now]
        for sid in gone:
            del self._admitted[sid]
        return len(self._admitted)

    def _check_capacity(self, *, model: bool = True, loop: bool = True) -> None:
        if not self.accepting:
            raise StreamerError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        refusal = self._refusal(model=model, loop=loop)
        if refusal is not None:
            cause, error = refusal
            self.runtime.observer.session_refused(cause)
            raise error

    def _refusal(
        self, *, model: bool = True, loop: bool = True
    ) -> tuple[str, StreamerError] | None:
        """Why a new session would be turned away now (its cause, for the metric), or None.
        ``model``: also ask whether the model can take it (not for a session already admitted
        whose upload lands here: see :meth:`start`). ``loop``: also refuse while the event
        loop is saturated (not where the pacer makes a new session wait for it instead)."""
        settings = self.runtime.settings
        limit = settings.max_sessions
        if self.live >= limit:
            return "max_sessions", StreamerError(
                ErrorCode.TOO_MANY_SESSIONS, f"the server holds its maximum of {limit} sessions"
            )
        busy, most = self.runtime.load.busy, settings.admit_max_loop_busy
        if loop and 0 < most < 1 and busy > most:
            return "event_loop", _overloaded(
                f"its event loop was {busy:.0%} busy, the limit is {most:.0%}"
            )
        decoders, most_ms = self.runtime.decoders, settings.admit_max_decode_ms
        if decoders is not None and most_ms > 0:
            took_ms = decoders.turnaround.seconds() * 1000
            if took_ms > most_ms:
                return "opus_decoder", _overloaded(
                    f"its Opus decoder takes {took_ms:.0f} ms per batch, "
                    f"the limit is {most_ms:g} ms"
                )
        if not model:
            return None
        models, most_ms = self.runtime.models, settings.admit_max_model_wait_ms
        if most_ms > 0:
            wait_ms = models.wait_s() * 1000
            if wait_ms > most_ms:
                return "model", _overloaded(
                    f"utterances wait {wait_ms:.0f} ms for the model, the limit is {most_ms:g} ms"
                )
        most_load = settings.admit_max_model_load
        if most_load > 0:
            load = models.load_with(self.live + self._admitted_elsewhere() + 1)
            if load is not None and load > most_load:
                return "model", _overloaded(
                    f"one more session would load the model to {load:.0%} of its capacity, "
                    f"the limit is {most_load:.0%}"
                )
        return None

    async def create(self, config: SessionConfig) -> str:
        """A new session, waiting for its audio; returns its id. While the event loop is busy
        it may first wait its turn (service/session/admission.py)."""
        pacer = self.runtime.pacer
        # With pacing, a busy loop makes a new session wait its turn rather than be refused at
        # once: during a burst the loop is saturated by the set-ups themselves, and the
        # sessions turned away would fit a few seconds later.
        self._check_capacity(loop=not pacer.enabled)
        if pacer.enabled and not await pacer.wait():
            self.runtime.observer.session_refused("event_loop")
            raise _overloaded(
                f"its event loop stayed over {pacer.pace:.0%} busy for the "
                f"{pacer.max_wait_s:g} s this session waited"
            )
        # Again, for what may have changed while it waited (the loop: the pacer just said).
        self._check_capacity(loop=not pacer.enabled)
        session_id = new_session_id()
        if self.store.shared:
            # No pipeline yet: whichever worker receives the audio will run it.
            await self.store.create(session_id, config, summarize(Counters(), None))
            self._admitted[session_id] = time.monotonic() + ADMITTED_HOLD_S
            return session_id
        session = Session(session_id, config, self.store.log(session_id), self.runtime)
        self._add(session)
        self._tg.start_soon(self._watch, session)
        return session_id

    def _add(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._unended[session.id] = session
        self.runtime.observer.session_created(session)

    def local(self, session_id: str) -> Session | None:
        """The session if it lives in this process; a malformed id is never found anywhere."""
        if not _ID.match(session_id):
            raise StreamerError(ErrorCode.SESSION_NOT_FOUND, "malformed session id")
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> Session:
        session = self.local(session_id)
        if session is None:
            raise StreamerError(
                ErrorCode.SESSION_NOT_FOUND, "no such session (unknown, or expired after retention)"
            )
        return session

    async def start(self, session_id: str, fmt: PcmFormat | None = None) -> Session:
        """Claim the session's input and start its pipeline here; the caller then writes bytes.
        With a shared store the claim is atomic across workers: a second upload anywhere gets
        ``session_busy``."""
        if not self.accepting:
            raise StreamerError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if not self.store.shared:
            session = self.get(session_id)
            receive = session.open_input(fmt)
            self._tg.start_soon(session.run, receive, name=f"session {session.id}")
            return session
        self.local(session_id)  # rejects a malformed id before asking the store
        # The session was admitted when it was created, model included, by whichever worker
        # took the POST; the one its upload reaches checks only that its own process can run
        # it (a saturated loop or decoder), so an admitted session is not turned away for the
        # model after all.
        self._check_capacity(model=False)
        claimed_at = time.monotonic()  # the lease is at least this fresh
        claim = await self.store.claim(session_id)
        self._admitted.pop(session_id, None)  # running here now: counted as live
        session = Session(session_id, claim.config, self.store.log(session_id), self.runtime)
        self._own(session)
        receive = session.open_input(fmt)
        # The times every worker reports, not this process's clock readings a moment later.
        session.created_at, session.started_at = claim.created_at, claim.started_at
        self._tg.start_soon(
            self._run_owned, session, receive, claimed_at, name=f"session {session.id}"
        )
        return session

    def _own(self, session: Session) -> None:
        """A shared session whose pipeline runs here from now on."""
        # A cut upload: other workers should report its exact offset (HEAD) at once.
        session.on_detach = self._leases.publish_now
        if session.config.resumable:
            session.journal = self._journal
            self._journal.open(session.id)
            session.on_handoff = self._release
        self._add(session)

    async def _release(self, session: Session) -> None:
        """A resumable session handed over at shutdown: another worker adopts it now."""
        self._leases.discard(session.id)
        try:
            await self.store.release(session.id)
        except StoreUnavailable as exc:
            # Its lease lapses on its own: adopted a lease later.
            log.warning("handing a session over failed", extra={"error": str(exc)})

    async def resume(self, session_id: str, offset: int, fmt: PcmFormat | None = None) -> Session:
        """An upload that continues a resumable session at byte ``offset`` (``Upload-Offset``);
        the caller then writes bytes from ``session.upload``. An unstarted session starts here
        (offset 0). With a shared store only the worker running the pipeline can continue it
        (its decoder's state is in that process): elsewhere this raises ``session_elsewhere``,
        which a client answers by retrying on a new connection; unless that worker died, and
        this one adopts the session (:meth:`adopt`)."""
        if not self.accepting:
            raise StreamerError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        session = self.local(session_id)
        if session is None and self.store.shared:
            state = (await self.store.status(session_id))["state"]
            if state == "created":
                if offset != 0:
                    raise OffsetMismatch(0, offset)
                return await self.start(session_id, fmt)
            if state != "running":
                raise StreamerError(
                    ErrorCode.SESSION_ENDED, "this session has ended; create a new one"
                )
            # Its owner may have died: then the upload goes on here.
            session = await self.adopt(session_id, via="upload") or self.local(session_id)
            if session is None:
                raise StreamerError(
                    ErrorCode.SESSION_ELSEWHERE,
                    "another worker runs this session's pipeline; retry on a new connection",
                )
        if session is None:
            session = self.get(session_id)
        if session.state is SessionState.CREATED:
            if offset != 0:
                raise OffsetMismatch(0, offset)
            return await self.start(session_id, fmt)
        await session.resume_input(offset)
        return session

    async def adopt(self, session_id: str, *, via: Literal["sweep", "upload"]) -> Session | None:
        """Take over a resumable session whose owner died (shared store): its pipeline runs
        here again over the audio received so far (kept in the store by the owner's
        journal), emitting only what its log lacks, and it waits for an upload that resumes
        it. None if it is not to be adopted (its owner lives, it ended, or this worker cannot
        take it now). ``via``: what found it (``sweep`` or a resuming ``upload``), for the
        log."""
        if not self.accepting or not self.store.shared:
            return None
        if session_id in self._sessions:
            return self._sessions[session_id]
        if self._refusal(model=False) is not None:
            return None  # saturated: another worker's sweep will take it
        claimed_at = time.monotonic()
        adoption = await self.store.adopt(session_id)
        if adoption is None:
            return None
        log_ = self.store.log(session_id, adoption.last_id)
        session = Session(session_id, adoption.config, log_, self.runtime)
        self._own(session)
        receive = session.open_adopted(adoption)
        self.runtime.observer.session_adopted(session)
        replay = self._journaled_audio(session_id, adoption.received)
        self._tg.start_soon(
            self._run_owned, session, receive, claimed_at, replay, name=f"session {session_id}"
        )
        log.warning(
            "adopted a session whose worker died",
            extra={
                "session_id": session_id,
                "bytes": adoption.received,
                "input_end": adoption.input_end,
                "last_event_id": adoption.last_id,
                "via": via,
            },
        )
        return session

    async def _journaled_audio(self, session_id: str, size: int) -> AsyncIterator[bytes]:
        for start in range(0, size, REPLAY_READ_BYTES):
            want = min(REPLAY_READ_BYTES, size - start)
            data = await self.store.read_audio(session_id, start, want)
            if len(data) != want:
                raise StoreUnavailable(
                    f"the store holds {start + len(data)} bytes of session {session_id}'s audio, "
                    f"not {size}"
                )
            yield data

    async def adopt_orphans(self) -> None:
        """Every worker's sweep (shared store): adopt the resumable sessions whose owner died
        and that no resuming upload adopted, so that the audio they received is processed
        and they wait for their upload where it can continue. Runs until shutdown."""
        if not self.store.shared:
            return
        failing = False
        while self.accepting:
            await anyio.sleep(SWEEP_S)
            try:
                ids = await self.store.orphans(ADOPT_AFTER_S, SWEEP_BATCH)
                for session_id in ids:
                    await self.adopt(session_id, via="sweep")
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("looking for sessions to adopt failed", extra={"error": str(exc)})
                failing = True
                continue
            except StreamerError:
                log.exception("adopting a session failed")
            failing = False

    async def status(self, session_id: str) -> dict[str, Any]:
        session = self.local(session_id)
        if session is not None:
            return session.status()
        return await self.store.status(session_id)

    async def cancel(self, session_id: str) -> dict[str, Any]:
        """Stop the session's pipeline, wherever it runs; returns its status."""
        session = self.local(session_id)
        if session is not None:
            session.cancel(EndReason.CANCELLED)
            return session.status()
        return await self.store.cancel(session_id)

    async def events(self, session_id: str) -> EventLog:
        """The session's log, to follow."""
        if not self.store.shared:
            return self.get(session_id).log
        self.local(session_id)
        return await self.store.reader(session_id)

    async def unready_reason(self) -> str | None:
        """Why this worker should not get traffic now, or None."""
        if not self.accepting:
            return "shutting down"
        try:
            with anyio.fail_after(READY_TIMEOUT_S):
                await self.store.ping()
        except (StoreUnavailable, TimeoutError):
            return "session store unreachable"
        return None

    async def _watch(self, session: Session) -> None:
        settings = self.runtime.settings
        with anyio.move_on_after(settings.unstarted_timeout_seconds):
            await session.started.wait()
        if session.state is SessionState.CREATED:
            # Never started: it timed out, or was cancelled before any audio.
            session.close_input(EndReason.UNSTARTED_TIMEOUT)
            await session.finish()
        await session.done.wait()
        await anyio.sleep(settings.retention_seconds)
        self._sessions.pop(session.id, None)
        self._unended.pop(session.id, None)

    async def _run_owned(
        self,
        session: Session,
        receive: MemoryObjectReceiveStream[bytes],
        claimed_at: float,
        replay: AsyncIterable[bytes] | None = None,
    ) -> None:
        """A shared session's pipeline. Its lease is kept by the worker's one lease keeper, with
        those of every other session running here. Once it ends the store holds everything, so
        the Session object goes at once."""
        self._leases.add(session, claimed_at)
        try:
            await session.run(receive, replay)
        finally:
            self._leases.discard(session.id)
            self._journal.close(session.id)
            self._sessions.pop(session.id, None)
            self._unended.pop(session.id, None)

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop taking sessions, let live ones drain what they received, cancel the rest.
        A resumable session whose audio is kept in a shared store is handed over instead of
        ended (``Session.hand_off``): another worker adopts it at once and takes its resumed
        upload, so a rolling restart ends no recording."""
        self.accepting = False
        sessions = [s for s in self._sessions.values() if s.state is not SessionState.ENDED]
        for s in sessions:
            if s.state is SessionState.CREATED:
                s.close_input(EndReason.SHUTDOWN)
                await s.finish()
            elif not s.hand_off():
                s.close_input(EndReason.SHUTDOWN)
        with anyio.move_on_after(grace_seconds):
            for s in sessions:
                await s.done.wait()
        for s in sessions:
            if not s.done.is_set():
                s.cancel(EndReason.SHUTDOWN)
        with anyio.move_on_after(2):
            for s in sessions:
                await s.done.wait()
