"""The model interface a user implements to put their own model behind the service.

A model is any object with a blocking ``infer(audio) -> mapping`` method; the mapping is
JSON-serialisable and is flattened into the ``segment`` event (the dummy model returns
``{"count": n}``). Raise :class:`ModelError` for an expected failure (the client gets an ``error``
event with code ``model_failed``); anything else counts as a panic (``model_panic``). Either way
the session goes on.

A model may also offer ``infer_batch(list of audio) -> list`` (one output per input, in order;
an item may be a :class:`ModelError` instance for an input that failed alone) and say how many
inputs it takes at once with ``max_batch_size``. The engine (``service/model/engine.py``) then
gathers queued calls from every session into one ``infer_batch`` call. Worth it where a batch
costs about as much as its longest item (a GPU, a vectorised CPU kernel); a model with only
``infer`` gets one call per item, on ``STREAMER_MODEL_THREADS`` threads.

Plug one in by configuration: ``STREAMER_MODEL=package.module:factory`` and
``STREAMER_MODEL_OPTIONS='{"json": "kwargs"}'``; the factory is called once at startup.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from service.audio.chunk import Samples


class ModelError(Exception):
    """An expected inference failure: reported to the client, the session continues."""


@runtime_checkable
class Model(Protocol):
    def infer(self, audio: Samples) -> Mapping[str, Any]:
        """Run on 16 kHz mono float32 audio. Blocking; called from worker threads,
        possibly several at once (up to ``STREAMER_MODEL_THREADS``)."""
        ...


def batch_size_of(model: object) -> int:
    """How many inputs ``model.infer_batch`` takes at once (``max_batch_size``; unbounded if it
    does not say)."""
    size = getattr(model, "max_batch_size", None)
    if size is None:
        return 1 << 30
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {size!r}")
    return size


def load_model(spec: str, options: Mapping[str, Any]) -> Model:
    """Build a model from ``"module:factory"``, calling ``factory(**options)``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model must be 'module:factory', got {spec!r}")
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{spec!r} is not callable")
    model = factory(**options)
    if not isinstance(model, Model):
        raise TypeError(f"{spec!r} returned {type(model).__name__}, which has no infer(audio)")
    return model
