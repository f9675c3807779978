"""The dense Silero graph against the file as shipped: same probabilities, same segments."""

from __future__ import annotations

import anyio
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from service.vad import dense
from service.vad.batcher import VadBatcher
from service.vad.silero import (
    CONTEXT,
    FRAME,
    VadStream,
    forward_frames,
    load_session,
    model_path,
    step,
)
from tests.vad.vad_helpers import chunks_of, finals, run_stage


@pytest.fixture(scope="module")
def reference() -> ort.InferenceSession:
    return load_session(graph="reference")


@pytest.fixture(scope="module")
def dense_session() -> ort.InferenceSession:
    return load_session(graph="dense")


def run(session: ort.InferenceSession, audio: npt.NDArray[np.float32], rows: int = 3) -> tuple:
    """Probabilities and final states of ``rows`` streams over different parts of ``audio``, run
    as one batch per step, so state carries over hundreds of frames."""
    n = len(audio) // FRAME // rows
    frames = audio[: rows * n * FRAME].reshape(rows, n, FRAME)
    streams = [VadStream() for _ in range(rows)]
    probs = np.stack([step(session, streams, frames[:, t]) for t in range(n)], axis=1)
    return probs, np.concatenate([s.state for s in streams], axis=1)


def test_same_probabilities_and_states_as_the_shipped_graph(
    reference: ort.InferenceSession,
    dense_session: ort.InferenceSession,
    speech: npt.NDArray[np.float32],
    noise: npt.NDArray[np.float32],
) -> None:
    for audio in (speech[0], noise[0], np.concatenate([noise[0], speech[0]])):
        want_probs, want_state = run(reference, audio)
        got_probs, got_state = run(dense_session, audio)
        np.testing.assert_allclose(got_probs, want_probs, atol=5e-5)
        np.testing.assert_allclose(got_state, want_state, rtol=1e-3, atol=1e-3)
    assert want_probs.max() > 0.9  # the comparison covered speech, not only silence


@pytest.mark.anyio
async def test_same_segments_as_the_shipped_graph(
    reference: ort.InferenceSession,
    dense_session: ort.InferenceSession,
    speech: npt.NDArray[np.float32],
) -> None:
    cuts = list(range(1600, speech.shape[1], 1600))
    segments = []
    for session in (reference, dense_session):
        batcher = VadBatcher(session, max_batch=64, limiter=anyio.CapacityLimiter(1))
        outputs, _ = await run_stage(chunks_of(speech, cuts), batcher)
        segments.append([(o.start, o.end) for o in finals(outputs)])
    assert len(segments[0]) == 3
    assert segments[1] == segments[0]


def test_ragged_sequences_in_one_call_equal_steps_of_the_shipped_graph(
    reference: ort.InferenceSession,
    dense_session: ort.InferenceSession,
    speech: npt.NDArray[np.float32],
) -> None:
    """The dense graph runs K frames of B streams in one call; streams shorter than K are
    padded, and their probabilities and final states must not see the padding."""
    rows, steps = 4, 50  # speech.wav holds 7.5 s: 4 x 50 x 32 ms
    frames = speech[0, : rows * steps * FRAME].reshape(rows, steps, FRAME)
    lengths = np.array([steps, steps - 5, 18, 1], dtype=np.int32)
    inputs = np.zeros((rows, steps, CONTEXT + FRAME), dtype=np.float32)
    inputs[:, :, CONTEXT:] = frames
    inputs[:, 1:, :CONTEXT] = frames[:, :-1, -CONTEXT:]
    state = np.zeros((2, rows, 128), dtype=np.float32)
    got, got_state = forward_frames(dense_session, inputs, state, lengths)
    for b, k in enumerate(lengths):
        stream = VadStream()
        want = np.array([step(reference, [stream], frames[b, t : t + 1])[0] for t in range(k)])
        np.testing.assert_allclose(got[b, :k], want, atol=5e-5)
        np.testing.assert_allclose(got_state[:, b], stream.state[:, 0], rtol=1e-3, atol=1e-3)


def test_window_blocks_equal_reflection_padding() -> None:
    """The graph cuts STFT windows as pairs of 128-sample blocks of the reflection-padded input;
    check that arithmetic against numpy's own reflect padding."""
    x = np.arange(dense.SAMPLES, dtype=np.float32)
    padded = np.pad(x, (0, dense.PAD), mode="reflect")
    blocks = padded.reshape(dense.STEPS + 1, dense.HOP)
    for t in range(dense.STEPS):
        window = padded[t * dense.HOP : t * dense.HOP + dense.WINDOW]
        np.testing.assert_array_equal(np.concatenate([blocks[t], blocks[t + 1]]), window)


def test_dense_conv_equals_convolution() -> None:
    rng = np.random.default_rng(1)
    for steps, stride in ((4, 1), (4, 2), (2, 2), (1, 1)):
        weight = rng.standard_normal((5, 3, 3)).astype(np.float32)
        x = rng.standard_normal((steps, 3)).astype(np.float32)  # (step, channel)
        padded = np.pad(x, ((1, 1), (0, 0)))
        want = np.stack(
            [
                np.einsum("kc,ock->o", padded[t * stride : t * stride + 3], weight)
                for t in range((steps - 1) // stride + 1)
            ]
        )
        got = x.reshape(-1) @ dense.dense_conv(weight, steps, stride)
        np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-5)


def test_unknown_graph_and_foreign_model_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown VAD graph"):
        load_session(graph="fast")
    with pytest.raises(ValueError, match="not a Silero v5 model"):
        dense.silero_weights(model_path().read_bytes()[:0])
