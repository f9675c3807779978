"""The events of a session, as both SSE and the WebSocket serialise them.

The JSON shapes follow the seed (``{"type": "segment", "start_time", "end_time", "is_final",
"count", "channel"}``); every event carries ``channel`` (``null`` for session-wide events).
Times are seconds since the session's first sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.config import MODEL_SAMPLE_RATE


def seconds(samples: int) -> float:
    # Exact: n/16000 has a short decimal form, and repr() prints the shortest round-trip.
    return samples / MODEL_SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class Active:
    channel: int
    time: float
    type: str = field(default="active", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "time": self.time, "channel": self.channel}


@dataclass(frozen=True, slots=True)
class Inactive:
    channel: int
    time: float
    type: str = field(default="inactive", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "time": self.time, "channel": self.channel}


@dataclass(frozen=True, slots=True)
class Segment:
    """The model's output on ``[start_time, end_time]``, flattened into the event like the seed."""

    channel: int
    start_time: float
    end_time: float
    is_final: bool
    output: Mapping[str, Any]
    type: str = field(default="segment", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "is_final": self.is_final,
            **self.output,
            "channel": self.channel,
        }


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str
    channel: int | None = None
    start_time: float | None = None
    end_time: float | None = None
    # A model call's failure: whether the call was a final (stands for its utterance) or an
    # interim; None for any other error. Not sent: the log's progress counts by it.
    final: bool | None = field(default=None, compare=False)
    type: str = field(default="error", init=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.start_time is not None:
            d["start_time"] = self.start_time
            d["end_time"] = self.end_time
        d["channel"] = self.channel
        return d


@dataclass(frozen=True, slots=True)
class Lagging:
    """The session's results are late: its oldest utterance waiting for the model has waited
    ``seconds`` (sent when that crosses the threshold and again when it changes a lot;
    ``seconds: 0`` once the session has caught up)."""

    seconds: float
    type: str = field(default="lagging", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "seconds": self.seconds, "channel": None}


@dataclass(frozen=True, slots=True)
class End:
    """The last event of a session: why it ended and what it processed."""

    reason: str
    summary: Mapping[str, Any]
    type: str = field(default="end", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "reason": self.reason, **self.summary, "channel": None}


Event = Active | Inactive | Segment | Error | Lagging | End


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event with its per-session id (1, 2, 3, ...), the SSE ``id:``."""

    id: int
    type: str
    data: Mapping[str, Any]
