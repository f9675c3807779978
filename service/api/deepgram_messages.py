"""A session's events as Deepgram's live messages (``Results``, ``SpeechStarted``,
``UtteranceEnd``, ``Error``, ``Metadata``). No I/O: one event in, zero or more messages out.

How our events map (field by field: ``docs/deepgram.md``):

- ``segment`` -> ``Results``: the model's ``text``, ``words`` (``probability`` as
  ``confidence``) and ``confidence`` when it has them, an empty transcript otherwise; an interim
  segment is ``is_final: false``. A final is ``speech_final`` when the VAD ended the utterance
  on silence (not when it was cut at its maximum length, nor by ``Finalize``, nor with
  ``endpointing=false``), and ``from_finalize`` when a ``Finalize`` ended it.
- ``active`` -> ``SpeechStarted`` (with ``vad_events=true``), unless it only continues an
  utterance that was cut at its maximum length.
- ``inactive`` -> ``UtteranceEnd`` after that utterance's final ``Results`` (with
  ``utterance_end_ms``).
- ``error`` -> ``Error`` (``variant`` is our stable code).
- ``end`` -> ``Metadata`` (built by :meth:`Translator.metadata`, with what the connection saw).

An utterance's end is matched to its final by time: the ``inactive`` event's ``time`` and the
final's ``end_time`` are the same sample count over the same rate, so they compare exactly.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from service.api.deepgram_params import ListenOptions
from service.events.types import seconds

_PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u2026"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _words(output: Mapping[str, Any]) -> list[dict[str, Any]]:
    words = output.get("words")
    if not isinstance(words, list):
        return []
    out: list[dict[str, Any]] = []
    for w in words:
        if not isinstance(w, Mapping) or not isinstance(w.get("word"), str):
            continue
        punctuated = w["word"].strip()
        confidence = _number(w.get("probability", w.get("confidence")))
        out.append(
            {
                "word": punctuated.strip(_PUNCTUATION).lower() or punctuated,
                "start": _number(w.get("start")) or 0.0,
                "end": _number(w.get("end")) or 0.0,
                "confidence": 0.0 if confidence is None else confidence,
                "punctuated_word": punctuated,
            }
        )
    return out


def alternative(output: Mapping[str, Any]) -> dict[str, Any]:
    """``channel.alternatives[0]`` from a model's output (the ``segment`` event's fields)."""
    words = _words(output)
    text = output.get("text")
    if isinstance(text, str):
        transcript = " ".join(text.split())
    else:
        transcript = " ".join(w["punctuated_word"] for w in words)
    confidence = _number(output.get("confidence"))
    if confidence is None:
        confidence = sum(w["confidence"] for w in words) / len(words) if words else 0.0
    return {"transcript": transcript, "confidence": confidence, "words": words}


class Translator:
    """One connection's translation state: which utterance ends are still waiting for their
    final, which were cuts, which a ``Finalize`` made."""

    def __init__(self, request_id: str, options: ListenOptions, model: str, version: str) -> None:
        self.request_id = request_id
        self.options = options
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"streamer:{model}"))
        self.model_info = {"name": model, "version": version, "arch": "streamer"}
        self._ends: set[tuple[int, float]] = set()  # (channel, time) of inactive, final to come
        self._cuts: set[tuple[int, float]] = set()  # ... and the utterance went straight on
        self._finalized: set[tuple[int, float]] = set()  # ... and a Finalize ended it

    def finalized(self, ends: tuple[int | None, ...]) -> None:
        """Where a ``Finalize`` ended each channel's utterance (``Session.finalize``'s answer,
        which comes before that utterance's events)."""
        for channel, end in enumerate(ends):
            if end is not None:
                self._finalized.add((channel, seconds(end)))

    def translate(self, event: Mapping[str, Any], channels: int) -> list[dict[str, Any]]:
        """``channels``: how many the client is told there are (``channel_index[1]``)."""
        kind = event.get("type")
        channel = event.get("channel")
        if kind == "segment" and isinstance(channel, int):
            return self._results(event, channel, channels)
        if kind == "inactive" and isinstance(channel, int):
            self._ends.add((channel, event["time"]))
            return []
        if kind == "active" and isinstance(channel, int):
            key = (channel, event["time"])
            if key in self._ends:  # a cut: the same speech goes on at the same sample
                self._cuts.add(key)
                return []
            if self.options.vad_events:
                return [
                    {
                        "type": "SpeechStarted",
                        "channel": [channel, channels],
                        "timestamp": event["time"],
                    }
                ]
            return []
        if kind == "error":
            return [error(str(event.get("code")), str(event.get("message")))]
        return []  # end (see metadata), and event types added later

    def _results(
        self, event: Mapping[str, Any], channel: int, channels: int
    ) -> list[dict[str, Any]]:
        start, end, is_final = event["start_time"], event["end_time"], bool(event["is_final"])
        key = (channel, end)
        ended = is_final and key in self._ends
        cut = ended and key in self._cuts
        from_finalize = is_final and key in self._finalized
        if is_final:
            self._ends.discard(key)
            self._cuts.discard(key)
            self._finalized.discard(key)
        alt = alternative(event)
        messages = [
            {
                "type": "Results",
                "channel_index": [channel, channels],
                "duration": round(end - start, 6),
                "start": start,
                "is_final": is_final,
                "speech_final": ended
                and not cut
                and not from_finalize
                and self.options.endpointing,
                "from_finalize": from_finalize,
                "channel": {"alternatives": [alt]},
                "metadata": {
                    "request_id": self.request_id,
                    "model_info": self.model_info,
                    "model_uuid": self.model_uuid,
                },
            }
        ]
        if ended and not cut and self.options.utterance_end:
            words = alt["words"]
            messages.append(
                {
                    "type": "UtteranceEnd",
                    "channel": [channel, channels],
                    "last_word_end": words[-1]["end"] if words else end,
                }
            )
        return messages

    def metadata(
        self, end: Mapping[str, Any], sha256: str, created: datetime, channels: int
    ) -> dict[str, Any]:
        """The last message, from the session's ``end`` event."""
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": sha256,
            "created": created.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "duration": float(end.get("audio_seconds") or 0.0),
            "channels": channels,
            "models": [self.model_uuid],
            "model_info": {self.model_uuid: self.model_info},
        }


def error(code: str, description: str, message: str | None = None) -> dict[str, Any]:
    """Deepgram's ``Error`` message; ``variant`` is our stable error code."""
    out: dict[str, Any] = {"type": "Error", "variant": code, "description": description}
    if message is not None:
        out["message"] = message
    return out
