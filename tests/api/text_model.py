"""A model with text, for the Deepgram tests: loaded by the real server through
``STREAMER_MODEL=tests.api.text_model:create``, as a user's model would be. Its output has the
shape of a speech recogniser's (``text``, ``words`` with ``probability``, ``language``), as a
function of the audio's length only, so that the tests know what to expect."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

WORD_SECONDS = 0.4
PROBABILITY = 0.875


def words_for(samples: int) -> list[str]:
    """``Word0, Word1, ..., WordN.``: one word per 0.4 s of audio, punctuated."""
    n = max(1, round(samples / 16_000 / WORD_SECONDS))
    return [f"Word{i}{'.' if i == n - 1 else ','}" for i in range(n)]


class TextModel:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def infer(self, audio: npt.NDArray[np.float32]) -> dict[str, Any]:
        time.sleep(self.delay)  # a blocking call, as a real model's
        words = words_for(len(audio))
        return {
            "text": " " + " ".join(words),  # leading space, as Whisper's
            "words": [
                {
                    "word": f" {w}",
                    "start": i * WORD_SECONDS,
                    "end": i * WORD_SECONDS + 0.3,
                    "probability": PROBABILITY,
                }
                for i, w in enumerate(words)
            ],
            "language": "en",
        }


def create(delay: float = 0.02, **_dummy_options: Any) -> TextModel:
    """Takes the dummy model's options too (the test server's defaults) and ignores them."""
    return TextModel(delay)
