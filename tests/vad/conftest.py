"""Fixtures for the VAD tests: the anyio backend, one ONNX session, the test audio.

The audio comes from tests/data (generated speech); if a file is missing, a stand-in is
synthesised with espeak-ng and sox into a temporary directory, so these tests never depend on
another test package having run first.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from service.vad.batcher import VadBatcher
from service.vad.silero import load_session
from tests.vad.vad_helpers import read_wav

DATA = Path(__file__).parent.parent / "data"
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Streaming audio arrives in small pieces.",
    "Every utterance should be found exactly once.",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def onnx_session() -> ort.InferenceSession:
    return load_session()


@pytest.fixture
def batcher(onnx_session: ort.InferenceSession) -> VadBatcher:
    return VadBatcher(onnx_session, max_batch=64, limiter=anyio.CapacityLimiter(1))


def _synthesise(directory: Path, name: str) -> Path:
    """speech: three utterances 1.5 s apart; noise: quiet white noise; silence: zeros."""
    if shutil.which("sox") is None or (name == "speech" and shutil.which("espeak-ng") is None):
        pytest.skip("tests/data is missing and espeak-ng/sox are not installed")
    out = directory / f"{name}.wav"
    fmt = ["-r", "16000", "-c", "1", "-b", "16"]
    if name == "speech":
        parts = []
        for i, text in enumerate(SENTENCES):
            raw, part = directory / f"raw{i}.wav", directory / f"part{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, timeout=30)
            subprocess.run(["sox", str(raw), *fmt, str(part), "pad", "0.5", "1.0"], check=True)
            parts.append(str(part))
        subprocess.run(["sox", *parts, str(out)], check=True, timeout=30)
    else:
        effect = (
            ["synth", "3", "whitenoise", "vol", "0.05"] if name == "noise" else ["trim", "0", "3"]
        )
        subprocess.run(["sox", "-n", *fmt, str(out), *effect], check=True, timeout=30)
    return out


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    files: dict[str, Path] = {}
    tmp: Path | None = None
    for name in ("speech", "noise", "silence"):
        path = DATA / f"{name}.wav"
        if not path.is_file():
            tmp = tmp or tmp_path_factory.mktemp("vad-audio")
            path = _synthesise(tmp, name)
        files[name] = path
    yield files


@pytest.fixture(scope="session")
def speech(audio_files: dict[str, Path]) -> npt.NDArray[np.float32]:
    """(1, n) float32: three utterances separated by silence."""
    return read_wav(audio_files["speech"])


@pytest.fixture(scope="session")
def noise(audio_files: dict[str, Path]) -> npt.NDArray[np.float32]:
    return read_wav(audio_files["noise"])


@pytest.fixture(scope="session")
def silence(audio_files: dict[str, Path]) -> npt.NDArray[np.float32]:
    return read_wav(audio_files["silence"])
