"""A model whose output depends on every sample (a checksum), for checking that batching across
sessions gives each session exactly its own results. ``STREAMER_MODEL=tests.model.checksum:create``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.audio.chunk import Samples


@dataclass
class ChecksumModel:
    delay: float = 0.05
    max_batch_size: int = 64
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        return self.infer_batch([audio])[0]

    def infer_batch(self, audios: Sequence[Samples]) -> list[Mapping[str, Any]]:
        time.sleep(self.delay)  # one sleep for the batch, as on a GPU
        return [
            {
                "count": len(a),
                "checksum": round(float(np.sum(a, dtype=np.float64)), 4),
                "batch": len(audios),
            }
            for a in audios
        ]


def create(**options: Any) -> ChecksumModel:
    return ChecksumModel(**options)
