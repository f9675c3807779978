"""What the VAD stage tells the model stage: speech boundaries and the audio to run the model on.

All positions are sample indices at 16 kHz since the session's first sample, per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.audio.chunk import Samples


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    channel: int
    utterance: int
    start: int
    received_at: float


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    channel: int
    utterance: int
    end: int
    received_at: float


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    """Audio for one model call: a whole utterance (``is_final``) or the utterance so far."""

    channel: int
    utterance: int
    start: int
    end: int
    audio: Samples
    is_final: bool
    received_at: float


VadOutput = SpeechStarted | SpeechEnded | SpeechAudio
