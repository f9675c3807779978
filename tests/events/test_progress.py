"""The progress an event log keeps beside its events (service/events/progress.py), which an
adopting worker reads to emit only what the log lacks.

Guaranteed: every event kind marks exactly the fields the runner's replay counts by (VAD events
and closed utterances per channel, the last interim's end per channel) and the summary totals;
a model error stands in its call's place (a final's error closes an utterance, an interim's
moves the interim end); other events mark nothing. Applied the way the APPEND script applies
them (HINCRBY each count field, HSET the set field), N events on 2 channels read back as the
right per-channel counts and totals, whatever else the session's hash holds."""

from __future__ import annotations

from service.events.progress import (
    ERRORS,
    FINALS,
    INTERIM_END,
    INTERIMS,
    NO_MARK,
    UTTERANCE,
    VAD,
    LoggedProgress,
    Mark,
    mark,
)
from service.events.types import Active, End, Error, Event, Inactive, Lagging, Segment


def test_vad_events_count_per_channel() -> None:
    assert mark(Active(0, 1.0)) == Mark((f"{VAD}0",))
    assert mark(Inactive(3, 2.5)) == Mark((f"{VAD}3",))


def test_a_final_closes_its_utterance_and_counts_as_a_segment() -> None:
    assert mark(Segment(1, 0.5, 1.25, True, {"count": 1})) == Mark((f"{UTTERANCE}1", FINALS))


def test_an_interim_counts_and_moves_the_interim_end() -> None:
    m = mark(Segment(2, 0.5, 1.1, False, {"count": 1}))
    assert m == Mark((INTERIMS,), f"{INTERIM_END}2", repr(1.1))
    assert float(m.set_value) == 1.1  # exactly: repr round-trips


def test_a_final_model_error_stands_in_its_utterance_place() -> None:
    err = Error("model_failed", "bad luck", 1, 0.5, 1.0, final=True)
    assert mark(err) == Mark((f"{UTTERANCE}1", ERRORS))


def test_an_interim_model_error_moves_the_interim_end() -> None:
    err = Error("model_panic", "boom", 0, 0.5, 0.75, final=False)
    assert mark(err) == Mark((ERRORS,), f"{INTERIM_END}0", repr(0.75))


def test_other_errors_only_count() -> None:
    # Session-wide, and a channel's error that is no model call's (final=None).
    assert mark(Error("decode_failed", "junk")) == Mark((ERRORS,))
    assert mark(Error("model_overloaded", "x", 0, 1.0, 2.0)) == Mark((ERRORS,))
    # A model error without a channel or times cannot stand in a call's place.
    assert mark(Error("model_failed", "x", None, final=True)) == Mark((ERRORS,))
    assert mark(Error("model_failed", "x", 0, final=False)) == Mark((ERRORS,))


def test_lagging_and_end_mark_nothing() -> None:
    assert mark(Lagging(2.0)) is NO_MARK
    assert mark(End("completed", {"segments": 0})) is NO_MARK
    assert Mark() == NO_MARK


def apply(record: dict[str, str], event: Event) -> None:
    """What lua.APPEND does with an event's mark in the session's hash (values are strings)."""
    m = mark(event)
    for f in m.counts:
        record[f] = str(int(record.get(f, "0")) + 1)
    if m.set_field:
        record[m.set_field] = m.set_value


def test_an_empty_record_is_no_progress() -> None:
    assert LoggedProgress.from_record({"state": "running", "last_id": "0"}) == LoggedProgress()


def test_round_trip_over_two_channels() -> None:
    events: list[Event] = []
    for u in range(3):  # channel 0: three utterances, each with two interims
        t = 2.0 * u
        events += [
            Active(0, t),
            Segment(0, t, t + 0.3, False, {"count": 1}),
            Segment(0, t, t + 0.6, False, {"count": 2}),
            Inactive(0, t + 1.0),
            Segment(0, t, t + 1.0, True, {"count": 3}),
        ]
    events += [  # channel 1: a final that failed, then an interim that failed, still open
        Active(1, 0.1),
        Inactive(1, 0.9),
        Error("model_failed", "x", 1, 0.1, 0.9, final=True),
        Active(1, 3.0),
        Segment(1, 3.0, 3.4, False, {"count": 1}),
        Error("model_panic", "y", 1, 3.0, 3.7, final=False),
        Lagging(1.5),
        Error("decode_failed", "junk"),
        End("completed", {"segments": 3}),
    ]
    # The hash holds the session's other fields too; they are not progress.
    record = {
        "state": "running",
        "config": '{"resumable": true}',
        "created_at": "1700000000.5",
        "last_id": str(len(events)),
        "journal": "ok",
        "input_end": "completed",
    }
    for e in events:
        apply(record, e)
    assert LoggedProgress.from_record(record) == LoggedProgress(
        vad={0: 6, 1: 3},
        utterances={0: 3, 1: 1},
        interim_end={0: 4.6, 1: 3.7},  # the last interim's end, not the largest count
        finals=3,
        interims=7,
        errors=3,
    )
