"""The dummy model behaves like the seed's: delay, warm-up, failures, panics, sample count."""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.model.base import Model, ModelError, load_model
from service.model.dummy import DummyModel, ModelPanic


def test_counts_samples_and_sleeps() -> None:
    m = DummyModel(delay=0.05, constant_factor=0.1, jitter=0.0)
    audio = np.zeros(8000, dtype=np.float32)  # 0.5 s -> 0.05 + 0.05
    t0 = time.monotonic()
    assert m.infer(audio) == {"count": 8000}
    assert 0.09 <= time.monotonic() - t0 < 0.5


def test_warmup_penalty_only_first_call() -> None:
    m = DummyModel(delay=0.02, constant_factor=0.0, jitter=0.0, warmup_penalty=4.0)
    audio = np.zeros(10, dtype=np.float32)
    t0 = time.monotonic()
    m.infer(audio)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    m.infer(audio)
    second = time.monotonic() - t0
    assert first >= 0.1 > second


def test_failure_and_panic_rates() -> None:
    audio = np.zeros(10, dtype=np.float32)
    with pytest.raises(ModelError):
        DummyModel(delay=0, constant_factor=0, jitter=0, failure_rate=1.0).infer(audio)
    with pytest.raises(ModelPanic):
        DummyModel(delay=0, constant_factor=0, jitter=0, panic_rate=1.0).infer(audio)
    m = DummyModel(delay=0, constant_factor=0, jitter=0, failure_rate=0.5, seed=1)
    outcomes = []
    for _ in range(200):
        try:
            m.infer(audio)
            outcomes.append(True)
        except ModelError:
            outcomes.append(False)
    assert 60 < sum(outcomes) < 140


def test_load_model_by_spec() -> None:
    m = load_model("service.model.dummy:create", {"delay": 0})
    assert isinstance(m, Model)
    with pytest.raises(ValueError):
        load_model("service.model.dummy", {})
    with pytest.raises(TypeError):
        load_model("builtins:dict", {})
