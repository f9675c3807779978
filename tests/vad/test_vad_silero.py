"""The Silero model through onnxruntime: loading without torch, probabilities, batching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from service.vad.silero import (
    CONTEXT,
    FRAME,
    VadStream,
    forward_frames,
    load_session,
    model_path,
    step,
)

ROOT = Path(__file__).parent.parent.parent


def probabilities(session: ort.InferenceSession, audio: npt.NDArray[np.float32]) -> np.ndarray:
    stream = VadStream()
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    return np.array([step(session, [stream], f[None])[0] for f in frames])


def test_model_is_found_and_loaded_without_torch() -> None:
    assert model_path().name == "silero_vad.onnx"
    code = (
        "import sys\n"
        "from service.vad.silero import load_session\n"
        "load_session()\n"
        "assert 'silero_vad' not in sys.modules and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_importing_loads_nothing() -> None:
    code = (
        "import gc, sys\n"
        "import onnxruntime\n"
        "import service.vad.batcher, service.vad.segmenter, service.vad.stage\n"
        "assert 'silero_vad' not in sys.modules and 'torch' not in sys.modules\n"
        "assert not any(isinstance(o, onnxruntime.InferenceSession) for o in gc.get_objects())\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_session_is_single_threaded_cpu(onnx_session: ort.InferenceSession) -> None:
    options = onnx_session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert onnx_session.get_providers() == ["CPUExecutionProvider"]


def test_explicit_path(tmp_path: Path) -> None:
    session = load_session(model_path(), graph="reference")
    assert [i.name for i in session.get_inputs()] == ["input", "state", "sr"]
    session = load_session(model_path())  # the dense graph: K frames per stream per call
    assert [i.name for i in session.get_inputs()] == ["input", "state", "lengths"]
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own exception type
        load_session(tmp_path / "missing.onnx")


def test_speech_and_silence(
    onnx_session: ort.InferenceSession,
    speech: npt.NDArray[np.float32],
    silence: npt.NDArray[np.float32],
    noise: npt.NDArray[np.float32],
) -> None:
    assert probabilities(onnx_session, speech[0]).max() > 0.9
    assert probabilities(onnx_session, silence[0]).max() < 0.2
    assert probabilities(onnx_session, noise[0]).max() < 0.2


def test_step_keeps_state_and_context(
    onnx_session: ort.InferenceSession, speech: npt.NDArray[np.float32]
) -> None:
    stream = VadStream()
    frame = speech[0, 20 * FRAME : 21 * FRAME]
    step(onnx_session, [stream], frame[None])
    np.testing.assert_array_equal(stream.context, frame[-CONTEXT:])
    assert stream.state.shape == (2, 1, 128) and np.abs(stream.state).sum() > 0
    stream.reset()
    assert not stream.context.any() and not stream.state.any()
    with pytest.raises(ValueError):
        step(onnx_session, [stream], np.zeros((2, FRAME), np.float32))


def test_batched_step_equals_unbatched(
    onnx_session: ort.InferenceSession, speech: npt.NDArray[np.float32]
) -> None:
    """20 streams at different offsets into real speech, one batch per step vs one by one."""
    offsets = [i * 2711 for i in range(20)]
    steps = 60
    clips = [speech[0, o : o + steps * FRAME].reshape(steps, FRAME) for o in offsets]
    alone = [probabilities(onnx_session, clip.reshape(-1)) for clip in clips]
    streams = [VadStream() for _ in clips]
    together = np.stack(
        [step(onnx_session, streams, np.stack([c[t] for c in clips])) for t in range(steps)],
        axis=1,
    )
    np.testing.assert_allclose(together, np.stack(alone), rtol=0, atol=1e-6)
    assert np.stack(alone).max() > 0.9  # the comparison covers speech, not only silence


def test_probabilities_do_not_depend_on_batching(
    onnx_session: ort.InferenceSession, speech: npt.NDArray[np.float32]
) -> None:
    """Bit for bit, not within a tolerance: a session adopted by another worker (its owner died,
    docs/resume.md) is segmented again over the same audio, batched with whatever sessions run
    there and many frames per call (the replay runs ahead of real time), and must find exactly
    the speech its log already holds, or events would be skipped or repeated."""
    steps = 120
    clip = speech[0, : steps * FRAME].reshape(steps, FRAME)
    alone = probabilities(onnx_session, clip.reshape(-1))
    rng = np.random.default_rng(7)
    for others in (1, 7, 31):
        streams = [VadStream() for _ in range(others + 1)]
        noise = rng.standard_normal((steps, others, FRAME)).astype(np.float32) * 0.1
        batched = np.array(
            [
                step(onnx_session, streams, np.vstack([clip[t : t + 1], noise[t]]))[0]
                for t in range(steps)
            ]
        )
        assert np.array_equal(batched, alone), others
    for k in (2, 16, 64):
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(CONTEXT, np.float32)
        out: list[float] = []
        for start in range(0, steps, k):
            frames = clip[start : start + k]
            inputs = np.empty((1, len(frames), CONTEXT + FRAME), np.float32)
            for j, frame in enumerate(frames):
                inputs[0, j, :CONTEXT], inputs[0, j, CONTEXT:] = context, frame
                context = frame[-CONTEXT:]
            probs, state = forward_frames(
                onnx_session, inputs, state, np.array([len(frames)], np.int32)
            )
            out.extend(probs[0, : len(frames)])
        assert np.array_equal(np.array(out, np.float32), alone), k
    assert alone.max() > 0.9  # the comparison covers speech, not only silence
