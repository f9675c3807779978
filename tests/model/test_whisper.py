"""Whisper tiny.en (the ``whisper`` extra) on generated speech: text, word times inside the
audio, silence and empty audio, input checks, and ``infer_batch`` agreeing with ``infer``.

The speech is tests/data/speech.wav (scripts/make_test_audio.sh): espeak-ng saying "Hello, how
are you?", "Streaming audio is fun." and "Please call me tomorrow.". tiny.en hears the first and
the last reliably; the second, in espeak's voice, comes out differently from run to run of the
VAD's cut ("Streaming on it.", "Treating audio."), so only its presence is asserted.
"""

from __future__ import annotations

import os
import wave
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from service.audio.chunk import Samples
from service.model.base import Model, ModelError, load_model
from service.model.whisper import WINDOW_SECONDS, Whisper, create
from tests.conftest import DATA

pytest.importorskip(
    "faster_whisper", reason="the whisper extra is not installed (uv sync --extra whisper)"
)


RATE = 16_000
# Where speech.wav's utterances are, in seconds (as the service's VAD cuts them, pad included).
CUTS = [(0.0, 1.6), (2.6, 4.35), (5.26, 7.52)]


def speech() -> Samples:
    with wave.open(str(DATA / "speech.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0).astype(np.float32)


def utterances() -> list[Samples]:
    audio = speech()
    return [audio[int(a * RATE) : int(b * RATE)] for a, b in CUTS]


@pytest.fixture(scope="module")
def whisper() -> Iterator[Whisper]:
    yield create()


def assert_words_inside(output: Mapping[str, Any], seconds: float) -> None:
    words = output["words"]
    assert words, output
    for w in words:
        assert set(w) == {"word", "start", "end", "probability"}, w
        assert 0.0 <= w["start"] <= w["end"] <= seconds, (w, seconds)
        assert 0.0 <= w["probability"] <= 1.0
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    assert " ".join(w["word"] for w in words) == output["text"]


def test_transcribes_generated_speech(whisper: Whisper) -> None:
    first, second, third = (whisper.infer(u) for u in utterances())
    assert "hello" in first["text"].lower()
    assert "tomorrow" in third["text"].lower()
    assert second["text"]
    for output, u in zip((first, second, third), utterances(), strict=True):
        assert output["language"] == "en"
        assert_words_inside(output, len(u) / RATE)


def test_silence_and_empty_audio_give_empty_text(whisper: Whisper) -> None:
    empty = {"text": "", "words": [], "language": "en"}
    assert whisper.infer(np.zeros(0, dtype=np.float32)) == empty
    assert whisper.infer(np.zeros(RATE, dtype=np.float32)) == empty
    assert whisper.infer(np.zeros(10, dtype=np.float32)) == empty


def test_integer_or_unscaled_samples_are_refused_not_transcribed(whisper: Whisper) -> None:
    # Whisper turns int16 values into confident nonsense; the model says what is wrong instead.
    pcm16 = (utterances()[0] * 32767).astype(np.int16)
    with pytest.raises(ModelError, match="float"):
        whisper.infer(pcm16)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="peak"):
        whisper.infer(pcm16.astype(np.float32))
    with pytest.raises(ModelError, match="one channel"):
        whisper.infer(np.zeros((2, 100), dtype=np.float32))


def test_infer_batch_matches_infer_in_order(whisper: Whisper) -> None:
    audios = [*utterances(), np.zeros(RATE, dtype=np.float32), np.zeros(0, dtype=np.float32)]
    batched = whisper.infer_batch(audios)
    assert len(batched) == len(audios)
    for output, audio in zip(batched[:3], audios[:3], strict=True):
        single = whisper.infer(audio)
        assert output["text"] == single["text"]
        assert_words_inside(output, len(audio) / RATE)
        # The same words at nearly the same times. Not exactly: faster-whisper's batched path
        # places word edges with slightly different heuristics (no initial-timestamp limit, a
        # "first word after a pause" rule carried between windows); a first word's start moved
        # 0.0 -> 0.32 s here (the speech starts at 0.5 s, so the batch was the closer one).
        assert [w["word"] for w in output["words"]] == [w["word"] for w in single["words"]]
        for a, b in zip(output["words"], single["words"], strict=True):
            assert abs(a["start"] - b["start"]) <= 0.5 and abs(a["end"] - b["end"]) <= 0.5
    assert batched[3]["text"] == "" and batched[4]["text"] == ""


def test_infer_batch_splits_by_max_batch_size_and_handles_long_audio() -> None:
    model = create(max_batch_size=2)
    assert model.max_batch_size == 2
    first, _, third = utterances()
    # Longer than one window: decoded window by window, its words after the 30 s mark.
    long = np.concatenate([first, np.zeros(WINDOW_SECONDS * RATE, dtype=np.float32), third])
    outputs = model.infer_batch([third, first, long, first])
    assert "tomorrow" in outputs[0]["text"].lower()
    assert "hello" in outputs[1]["text"].lower() and "hello" in outputs[3]["text"].lower()
    text = outputs[2]["text"].lower()
    assert "hello" in text and "tomorrow" in text, text
    assert_words_inside(outputs[2], len(long) / RATE)
    assert outputs[2]["words"][-1]["start"] > WINDOW_SECONDS


def test_loads_by_configuration_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "unset below")  # so that teardown restores the original
    monkeypatch.delenv("HF_HUB_OFFLINE")
    model = load_model("service.model.whisper:create", {"beam_size": 1, "cpu_threads": 1})
    assert isinstance(model, Model)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(TypeError, match="beam"):
        load_model("service.model.whisper:create", {"beam": 5})
