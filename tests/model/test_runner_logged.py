"""The model stage of an adopted session (``run_stage(..., logged=...)``): its pipeline runs
again over the journaled audio, and the log already holds a prefix of what it emits.

Guaranteed, per channel: the first ``vad`` VAD events are not emitted again; the first
``utterances`` utterances (finals, or the model errors in their place) are neither emitted nor
sent to the model, nor are their interims; an interim ending at or before the logged interim
end is not emitted; everything after is emitted exactly as a run without ``logged`` emits it.
For any cut of a first run's events, a second run given the cut's progress (as the log keeps
it) emits exactly the events after the cut."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from service.audio.chunk import Samples
from service.events.progress import LoggedProgress, mark
from service.events.types import Event, seconds
from service.model.base import ModelError
from service.model.engine import CallTrace, ModelCall, ModelObserver
from service.model.runner import ModelRunner
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

pytestmark = pytest.mark.anyio

Call = tuple[int, int, int, bool]  # channel, start, end, is_final
FAIL = -1.0


class CountingModel:
    """Records every call (the call's identity is written into its audio); fails a call whose
    audio says so."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.lock = threading.Lock()

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        ch, start, end, final, fail = (int(x) for x in audio[:5])
        with self.lock:
            self.calls.append((ch, start, end, bool(final)))
        if fail:
            raise ModelError("bad luck")
        return {"count": len(audio)}


class Queued(ModelObserver):
    """Counts the calls the stage queued, to tell when every one of them is settled."""

    def __init__(self) -> None:
        self.queued = 0

    def call_queued(self, call: ModelCall) -> CallTrace:
        self.queued += 1
        return super().call_queued(call)


def speech(ch: int, start: int, end: int, final: bool, *, fail: bool = False) -> SpeechAudio:
    audio = np.zeros(160, dtype=np.float32)
    audio[:5] = (ch, start, end, final, fail)
    return SpeechAudio(ch, 0, start, end, audio, final, 0.0)


def utterance(
    ch: int, start: int, *, fail_final: bool = False, fail_interim: bool = False
) -> list[VadOutput]:
    """Started, two interims (the second may fail), ended, the final (which may fail)."""
    end = start + 3000
    return [
        SpeechStarted(ch, 0, start, 0.0),
        speech(ch, start, start + 1000, False),
        speech(ch, start, start + 2000, False, fail=fail_interim),
        SpeechEnded(ch, 0, end, 0.0),
        speech(ch, start, end, True, fail=fail_final),
    ]


def items() -> list[VadOutput]:
    """Three utterances on each of 2 channels, interleaved; channel 0's second final and
    channel 1's third utterance's second interim fail."""
    out: list[VadOutput] = []
    for u in range(3):
        out += utterance(0, u * 10_000, fail_final=u == 1)
        out += utterance(1, u * 10_000 + 5000, fail_interim=u == 2)
    return out


async def run(
    vad: list[VadOutput], logged: LoggedProgress | None = None
) -> tuple[list[Event], list[Call]]:
    """Feeds ``vad`` one item at a time, each once everything before it is settled (its model
    calls done and their events emitted), so that which interims run and are emitted does not
    depend on timing: two runs compare event for event."""
    model = CountingModel()
    observer = Queued()
    runner = ModelRunner(model, anyio.CapacityLimiter(2), observer=observer)
    engine = runner.engine
    send, receive = anyio.create_memory_object_stream[VadOutput](0)
    out: list[Event] = []

    async def emit(event: Event, received_at: float | None) -> None:
        out.append(event)

    async def settle() -> None:
        while True:
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            s = engine.stats
            if observer.queued == s.items + s.superseded + s.refused:
                break
            await anyio.sleep(0.001)
        for _ in range(20):  # the emitter's turn
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as engine_tg:
            engine_tg.start_soon(runner.run)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: runner.run_stage(receive, emit, logged=logged))
                async with send:
                    for item in vad:
                        await send.send(item)
                        await settle()
            engine_tg.cancel_scope.cancel()
    return out, model.calls


def progress(events: list[Event]) -> LoggedProgress:
    """The progress a log holding ``events`` keeps (as lua.APPEND applies their marks)."""
    record: dict[str, str] = {}
    for e in events:
        m = mark(e)
        for f in m.counts:
            record[f] = str(int(record.get(f, "0")) + 1)
        if m.set_field:
            record[m.set_field] = m.set_value
    return LoggedProgress.from_record(record)


def summary(events: list[Event]) -> list[tuple[Any, ...]]:
    return [tuple(e.to_dict().items()) for e in events]


async def test_a_run_without_logged_emits_everything() -> None:
    """The reference the other tests cut: every VAD event, interim and final (or error)."""
    out, calls = await run(items())
    assert len(out) == 6 * 5
    assert len(calls) == 6 * 3
    types = [(e.type, e.to_dict().get("is_final"), e.to_dict().get("code")) for e in out]
    assert types.count(("segment", True, None)) == 5
    assert types.count(("error", None, "model_failed")) == 2  # a final's, an interim's
    assert types.count(("segment", False, None)) == 11


async def test_logged_events_are_neither_emitted_nor_run_again() -> None:
    full, full_calls = await run(items())
    ch1_u1_first_interim_end = 15_000 + 1000
    logged = LoggedProgress(
        vad={0: 4, 1: 2},  # channel 0: two utterances' active/inactive; channel 1: one's
        utterances={0: 2, 1: 1},  # channel 0's second is its failed final
        interim_end={0: seconds(10_000 + 2000), 1: seconds(ch1_u1_first_interim_end)},
        finals=2,
        interims=5,
        errors=1,
    )
    out, calls = await run(items(), logged)

    def logged_utterance(ch: int, start: int) -> bool:
        return (ch, start) in {(0, 0), (0, 10_000), (1, 5000)}

    skipped_vad = {0: 4, 1: 2}
    expected: list[Event] = []
    for e in full:
        d = e.to_dict()
        ch = d["channel"]
        if e.type in ("active", "inactive"):
            if skipped_vad[ch]:
                skipped_vad[ch] -= 1
                continue
        elif logged_utterance(ch, round(d["start_time"] * 16000)):
            continue
        elif ch == 1 and round(d["end_time"] * 16000) <= ch1_u1_first_interim_end:
            continue  # channel 1's second utterance's first interim: logged
        expected.append(e)
    assert summary(out) == summary(expected)
    assert len(out) == len(full) - 6 - 3 * 3 - 1  # VAD events, 3 utterances, 1 interim

    # No call for a logged utterance, its interims included; the rest as before (channel 1's
    # logged interim is run again, then dropped as stale: only finals are skipped by count).
    assert not [c for c in calls if logged_utterance(c[0], c[1])]
    assert calls == [c for c in full_calls if not logged_utterance(c[0], c[1])]


async def test_any_cut_of_a_first_run_resumes_exactly_after_it() -> None:
    full, full_calls = await run(items())
    for cut in range(len(full) + 1):
        out, calls = await run(items(), progress(full[:cut]))
        assert summary(out) == summary(full[cut:]), f"cut after {cut} events"
        finals = [c for c in calls if c[3]]
        logged_finals = progress(full[:cut]).utterances
        assert len(finals) == len([c for c in full_calls if c[3]]) - sum(logged_finals.values())
