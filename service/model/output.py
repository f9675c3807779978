"""What happens to a model's output on its way into a ``segment`` event.

A model sees one utterance, starting at sample 0, so the word times it returns are relative to
the start of that audio. Clients want session time (every other time in an event is), and only
the stage that cut the utterance knows where it started: the shift happens here, once, where
``Segment`` events are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Session times are printed to the millisecond: enough for word timing, and 0.1 + 3.2 does not
# come out as 3.3000000000000003 in the JSON.
_DIGITS = 3


def to_session_time(output: Mapping[str, Any], start_seconds: float) -> Mapping[str, Any]:
    """``output`` with each ``words[i].start``/``end`` moved from audio time to session time.

    Outputs without a ``words`` list (the dummy's ``{"count": n}``) come back unchanged; a word
    that is not a mapping, or has no numeric time, is passed through as it is, since the model's
    own format is the user's business.
    """
    words = output.get("words")
    if not isinstance(words, list) or not words:
        return output
    shifted = [_shift(word, start_seconds) for word in words]
    return {**output, "words": shifted}


def _shift(word: Any, offset: float) -> Any:
    if not isinstance(word, Mapping):
        return word
    moved = dict(word)
    for key in ("start", "end"):
        value = moved.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            moved[key] = round(value + offset, _DIGITS)
    return moved
