"""Several observers behind the one hook the pipeline calls: logs, metrics, traces, and any
observer a caller of ``create_app`` adds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from service.model.engine import NO_TRACE, CallTrace, ModelCall, ModelObserver
from service.session.observer import SessionObserver

if TYPE_CHECKING:
    from service.events.types import Event
    from service.session.session import Session

T = TypeVar("T")


class FanOutObserver(SessionObserver):
    """Calls each observer in order; stages are entered in order and left in reverse."""

    def __init__(self, observers: Sequence[SessionObserver]) -> None:
        self.observers = tuple(observers)

    def session_created(self, session: Session) -> None:
        for o in self.observers:
            o.session_created(session)

    def session_started(self, session: Session) -> None:
        for o in self.observers:
            o.session_started(session)

    def session_refused(self, cause: str) -> None:
        for o in self.observers:
            o.session_refused(cause)

    def session_adopted(self, session: Session) -> None:
        for o in self.observers:
            o.session_adopted(session)

    def session_ended(self, session: Session) -> None:
        for o in self.observers:
            o.session_ended(session)

    def bytes_received(self, session: Session, n: int) -> None:
        for o in self.observers:
            o.bytes_received(session, n)

    def audio_decoded(self, session: Session, samples: int, busy_s: float) -> None:
        for o in self.observers:
            o.audio_decoded(session, samples, busy_s)

    def event_emitted(self, session: Session, event: Event, lag_s: float | None) -> None:
        for o in self.observers:
            o.event_emitted(session, event, lag_s)

    def stage(self, session: Session, name: str) -> AbstractContextManager[Any]:
        return self._stage(session, name)

    @contextmanager
    def _stage(self, session: Session, name: str) -> Iterator[None]:
        with ExitStack() as stack:
            for o in self.observers:
                stack.enter_context(o.stage(session, name))
            yield

    def subscriber(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        for o in self.observers:
            events = o.subscriber(events)
        return events


class FanOutModelObserver(ModelObserver):
    def __init__(self, observers: Sequence[ModelObserver]) -> None:
        self.observers = tuple(observers)

    def call_queued(self, call: ModelCall) -> CallTrace:
        traces = [o.call_queued(call) for o in self.observers]
        traces = [t for t in traces if t is not NO_TRACE]
        if not traces:
            return NO_TRACE
        return traces[0] if len(traces) == 1 else _FanOutTrace(traces)

    def batch_finished(self, size: int, audio_s: float, seconds_taken: float) -> None:
        for o in self.observers:
            o.batch_finished(size, audio_s, seconds_taken)

    def call_dropped(self, call: ModelCall, reason: str) -> None:
        for o in self.observers:
            o.call_dropped(call, reason)


class _FanOutTrace:
    __slots__ = ("traces",)

    def __init__(self, traces: Sequence[CallTrace]) -> None:
        self.traces = traces

    def started(self, queued_s: float, batch_size: int) -> None:
        for t in self.traces:
            t.started(queued_s, batch_size)

    def finished(self, seconds_taken: float, error: str | None, exc: BaseException | None) -> None:
        for t in reversed(self.traces):
            t.finished(seconds_taken, error, exc)
