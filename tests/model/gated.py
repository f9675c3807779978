"""A model for server tests that runs only while a file exists: the test holds the model
blocked (no file), then opens the gate (creates it), across the process boundary.

``STREAMER_MODEL=tests.model.gated:create`` with ``{"gate": "/path/to/file"}``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.audio.chunk import Samples

POLL_S = 0.01


@dataclass
class GatedModel:
    gate: str
    delay: float = 0.02
    max_batch_size: int = 1
    timeout: float = 60.0  # never block a thread forever, whatever the test does

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        return self.infer_batch([audio])[0]

    def infer_batch(self, audios: Sequence[Samples]) -> list[Mapping[str, Any]]:
        deadline = time.monotonic() + self.timeout
        while not Path(self.gate).exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        time.sleep(self.delay)
        return [{"count": len(a)} for a in audios]


def create(**options: Any) -> GatedModel:
    return GatedModel(**options)
