"""Silero VAD v5 through onnxruntime: loading the model and running batched steps.

The ``silero-vad`` package is only the carrier of ``silero_vad.onnx``: importing it would import
torch, so the file is found through the distribution's file list instead.

One :class:`onnxruntime.InferenceSession` serves every stream (``run`` is thread-safe); all the
per-stream memory lives in :class:`VadStream`: the recurrent state and the 64-sample context. The
model v5 takes ``input`` float32 ``[B, 64 + 512]`` (the context prepended to the new frame),
``state`` float32 ``[2, B, 128]`` and ``sr`` int64 scalar, and returns ``output`` ``[B, 1]`` (the
speech probability) and ``stateN`` ``[2, B, 128]``. Without the context the model finds no speech
at all, so it is not optional. Rows of a batch are independent: a batch of B streams gives the
same probabilities as B runs of one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.vad import dense

SAMPLE_RATE = 16_000
FRAME = 512  # samples per model step at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees before each new frame
STATE_SIZE = 128
MODEL_FILE = "silero_vad.onnx"
DISTRIBUTION = "silero-vad"

Floats = npt.NDArray[np.float32]


def model_path() -> Path:
    """Where the installed ``silero-vad`` distribution keeps ``silero_vad.onnx``."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the {DISTRIBUTION!r} distribution is not installed") from exc
    for file in dist.files or ():
        if file.name == MODEL_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{MODEL_FILE} not found in the {DISTRIBUTION!r} distribution")


GRAPHS = ("dense", "reference")


def load_session(
    path: str | os.PathLike[str] | None = None, *, graph: str = "dense"
) -> ort.InferenceSession:
    """One CPU session for the whole process, over ``silero_vad.onnx`` (or ``path``).

    ``graph="dense"`` runs the file's 16 kHz weights as the batch-friendly graph of
    :mod:`service.vad.dense` (~3.5x cheaper per row at batch 256, ~1.9x at batch 1, same
    probabilities to ~1e-5), which takes ``K`` frames per stream per run (:func:`forward_frames`);
    ``"reference"`` runs the file exactly as shipped, one frame per run.

    One intra-op and one inter-op thread: the model is tiny, so more threads per run only add
    synchronisation; parallelism comes from batching streams and from the batcher's own threads.
    """
    if graph not in GRAPHS:
        raise ValueError(f"unknown VAD graph {graph!r}; expected one of {', '.join(GRAPHS)}")
    data = Path(path if path is not None else model_path()).read_bytes()
    if graph == "dense":
        data = dense.build(dense.silero_weights(data))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class VadStream:
    """The model's memory for one channel of one session.

    ``state`` has shape ``(2, 1, 128)``; ``context`` is the last :data:`CONTEXT` samples of the
    previous frame (zeros before the first frame). Frames of a stream must be fed in order.
    """

    __slots__ = ("context", "state")

    def __init__(self) -> None:
        self.state: Floats = np.zeros((2, 1, STATE_SIZE), dtype=np.float32)
        self.context: Floats = np.zeros(CONTEXT, dtype=np.float32)

    def reset(self) -> None:
        self.state = np.zeros((2, 1, STATE_SIZE), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def takes_sequences(session: ort.InferenceSession) -> bool:
    """Whether ``session`` is the dense graph, which takes ``K`` frames per stream per call."""
    return any(i.name == "lengths" for i in session.get_inputs())


_SR = np.array(SAMPLE_RATE, dtype=np.int64)


def forward(session: ort.InferenceSession, inputs: Floats, state: Floats) -> tuple[Floats, Floats]:
    """One step: ``inputs`` ``(B, CONTEXT + FRAME)``, ``state`` ``(2, B, 128)`` ->
    (probabilities ``(B,)``, new state ``(2, B, 128)``)."""
    if takes_sequences(session):
        lengths = np.ones(len(inputs), dtype=np.int32)
        probs, new_state = forward_frames(session, inputs[:, None, :], state, lengths)
        return probs[:, 0], new_state
    output, new_state = session.run(
        ["output", "stateN"], {"input": inputs, "state": state, "sr": _SR}
    )
    return (
        np.asarray(output, dtype=np.float32).reshape(-1),
        np.asarray(new_state, dtype=np.float32),
    )


def forward_frames(
    session: ort.InferenceSession,
    inputs: Floats,
    state: Floats,
    lengths: npt.NDArray[np.int32],
) -> tuple[Floats, Floats]:
    """``K`` steps of ``B`` streams: ``inputs`` ``(B, K, CONTEXT + FRAME)`` (each frame with its
    own context), stream ``b`` has ``lengths[b]`` frames (1 to ``K``; the rest is padding) ->
    (probabilities ``(B, K)``, state after each stream's last frame ``(2, B, 128)``).

    The dense graph does it in one ``run``: one release of the GIL per batch rather than one per
    step, which is what lets this thread keep up next to a busy event loop. The reference graph
    runs step by step over the streams that still have frames (``lengths`` sorted descending
    makes them a prefix)."""
    if takes_sequences(session):
        output, new_state = session.run(
            ["output", "stateN"], {"input": inputs, "state": state, "lengths": lengths}
        )
        return np.asarray(output, dtype=np.float32), np.asarray(new_state, dtype=np.float32)
    probs = np.zeros((*lengths.shape, inputs.shape[1]), dtype=np.float32)
    state = state.copy()
    for t in range(int(lengths.max(initial=0))):
        rows = np.flatnonzero(lengths > t)
        p, s = forward(session, inputs[rows, t], np.ascontiguousarray(state[:, rows]))
        probs[rows, t] = p
        state[:, rows] = s
    return probs, state


def step(session: ort.InferenceSession, streams: Sequence[VadStream], frames: Floats) -> Floats:
    """Advance each of B streams by one frame (``frames`` ``(B, FRAME)``) in one run: gather the
    states and contexts, run, scatter the new states and contexts back. Returns ``(B,)``."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.shape != (len(streams), FRAME):
        raise ValueError(f"expected frames of shape ({len(streams)}, {FRAME}), got {frames.shape}")
    if not streams:
        return np.zeros(0, dtype=np.float32)
    inputs = np.empty((len(streams), CONTEXT + FRAME), dtype=np.float32)
    for i, stream in enumerate(streams):
        inputs[i, :CONTEXT] = stream.context
    inputs[:, CONTEXT:] = frames
    state = np.concatenate([s.state for s in streams], axis=1)
    probs, new_state = forward(session, inputs, state)
    for i, stream in enumerate(streams):
        stream.state = new_state[:, i : i + 1, :].copy()
        stream.context = frames[i, -CONTEXT:].copy()
    return probs
