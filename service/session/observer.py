"""Hooks a session calls at the moments operators care about; metrics and tracing implement them.
The default does nothing, so the pipeline never depends on observability being configured."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from service.events.types import Event
    from service.session.session import Session

T = TypeVar("T")


class SessionObserver:
    def session_created(self, session: Session) -> None:
        pass

    def session_started(self, session: Session) -> None:
        pass

    def session_refused(self, cause: str) -> None:
        """A new session was turned away for capacity (max_sessions, event_loop, opus_decoder,
        model)."""

    def session_adopted(self, session: Session) -> None:
        """This worker took over a resumable session whose worker died (shared store)."""

    def session_ended(self, session: Session) -> None:
        pass

    def bytes_received(self, session: Session, n: int) -> None:
        pass

    def event_emitted(self, session: Session, event: Event, lag_s: float | None) -> None:
        pass

    def audio_decoded(self, session: Session, samples: int, busy_s: float) -> None:
        """The decoder sent ``samples`` more (per channel, 16 kHz), having spent ``busy_s`` of
        decoding work on them (waits for input excluded): the decode stage's real-time factor."""

    def stage(self, session: Session, name: str) -> AbstractContextManager[Any]:
        """Wraps a pipeline stage ("decode", "vad", "model") for its whole life, e.g. a span."""
        return nullcontext()

    def subscriber(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """Wraps one SSE subscriber's stream, e.g. to count live subscribers."""
        return events
