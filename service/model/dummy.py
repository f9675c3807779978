"""The seed's dummy model: slow, blocking, sometimes failing, returns the sample count.

It sleeps ``duration * constant_factor + delay + jitter * U(-1, 1)`` seconds (the first call
``warmup_penalty`` times longer again), then fails with probability ``failure_rate`` and panics
with probability ``panic_rate``.

``infer_batch`` stands for a model on a GPU, where a batch costs about what its longest item
does: one sleep of ``max(duration) * constant_factor + delay + jitter`` for the whole batch (of
up to ``max_batch_size`` items). Each item fails on its own with ``failure_rate`` (a
:class:`ModelError` in its place); a panic takes the whole batch, as a crash would.

(The seed's own check is inverted, succeeding only with probability ``failure_rate``; this one
does what the parameter names say.)
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE
from service.model.base import ModelError


class ModelPanic(RuntimeError):
    """Stands for a crash inside a model (the seed's ``panic!``)."""


@dataclass
class DummyModel:
    delay: float = 0.5
    constant_factor: float = 0.3
    jitter: float = 0.2
    failure_rate: float = 0.0
    panic_rate: float = 0.0
    warmup_penalty: float = 0.0
    seed: int | None = None
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._warm = False

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        result = self.infer_batch([audio])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def infer_batch(self, audios: Sequence[Samples]) -> list[Mapping[str, Any] | ModelError]:
        if len(audios) > self.max_batch_size:
            raise ValueError(f"{len(audios)} inputs, max_batch_size is {self.max_batch_size}")
        longest = max((len(a) for a in audios), default=0) / MODEL_SAMPLE_RATE
        with self._lock:  # Random and the warm-up flag are shared by the worker threads
            jitter = self.jitter * (self._rng.random() * 2.0 - 1.0)
            first = not self._warm
            self._warm = True
            panic_roll = self._rng.random()
            fail_rolls = [self._rng.random() for _ in audios]
        delay = longest * self.constant_factor + self.delay + jitter
        if first and self.warmup_penalty > 0:
            delay += delay * self.warmup_penalty
        if delay > 0:
            time.sleep(delay)
        if panic_roll < self.panic_rate:
            raise ModelPanic("inference catastrophically failed")
        return [
            ModelError("unexpected inference failure")
            if roll < self.failure_rate
            else {"count": len(a)}
            for a, roll in zip(audios, fail_rolls, strict=True)
        ]


def create(**options: Any) -> DummyModel:
    return DummyModel(**options)
