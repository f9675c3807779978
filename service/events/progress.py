"""How far a session's event log got, kept beside the log so that a worker adopting the session
(its owner died; docs/resume.md) can run the pipeline again over the received audio and emit
only what the log does not hold yet.

The adopter's pipeline sees the same bytes, so it finds the same speech in the same order; the
log's progress says, per channel, how many VAD events (``active``/``inactive``) and how many
closed utterances (a final ``segment``, or the ``error`` that stands in its place) were
logged, and where the last interim ended. Counting, not matching times, keeps the two runs in
step: both emit one channel's VAD events, and its finals, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from service.events.types import Active, Error, Event, Inactive, Segment

# Fields of the session's record (a Redis hash) that hold the progress.
PREFIX = "p:"
VAD = "p:v:"  # + channel: active/inactive events
UTTERANCE = "p:u:"  # + channel: finals, and the model errors in their place
INTERIM_END = "p:ie:"  # + channel: the end_time of the last interim (set, not counted)
FINALS = "p:f"  # final segments (the summary's ``segments``)
INTERIMS = "p:i"  # interim segments
ERRORS = "p:e"  # error events


@dataclass(frozen=True, slots=True)
class Mark:
    """What one logged event adds to the progress: fields to increment, and one to set."""

    counts: tuple[str, ...] = ()
    set_field: str = ""
    set_value: str = ""


NO_MARK = Mark()


def mark(event: Event) -> Mark:
    """The progress ``event`` makes once it is in the log."""
    if isinstance(event, Active | Inactive):
        return Mark((f"{VAD}{event.channel}",))
    if isinstance(event, Segment):
        if event.is_final:
            return Mark((f"{UTTERANCE}{event.channel}", FINALS))
        return Mark((INTERIMS,), f"{INTERIM_END}{event.channel}", repr(event.end_time))
    if isinstance(event, Error):
        if event.final and event.channel is not None:
            return Mark((f"{UTTERANCE}{event.channel}", ERRORS))  # in its utterance's place
        if event.final is False and event.channel is not None and event.end_time is not None:
            return Mark((ERRORS,), f"{INTERIM_END}{event.channel}", repr(event.end_time))
        return Mark((ERRORS,))
    return NO_MARK


@dataclass(frozen=True, slots=True)
class LoggedProgress:
    """The progress of a log, per channel, and the counters an ``end`` summary carries."""

    vad: Mapping[int, int] = field(default_factory=dict)
    utterances: Mapping[int, int] = field(default_factory=dict)
    interim_end: Mapping[int, float] = field(default_factory=dict)
    finals: int = 0
    interims: int = 0
    errors: int = 0

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> LoggedProgress:
        vad: dict[int, int] = {}
        utterances: dict[int, int] = {}
        interim_end: dict[int, float] = {}
        for key, raw in record.items():
            head, _, channel = key.rpartition(":")
            if not channel.isdigit():
                continue
            prefix, ch = f"{head}:", int(channel)
            if prefix == VAD:
                vad[ch] = int(raw)
            elif prefix == UTTERANCE:
                utterances[ch] = int(raw)
            elif prefix == INTERIM_END:
                interim_end[ch] = float(raw)
        return cls(
            vad=vad,
            utterances=utterances,
            interim_end=interim_end,
            finals=int(record.get(FINALS) or 0),
            interims=int(record.get(INTERIMS) or 0),
            errors=int(record.get(ERRORS) or 0),
        )
