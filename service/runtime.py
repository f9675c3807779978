"""What every session shares, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.audio.packets import DecodePool, DecodeProcess
from service.model.runner import ModelRunner
from service.observability.loop import SAMPLE_S, LoopLoad
from service.session.admission import AdmissionPacer
from service.session.observer import SessionObserver
from service.settings import Settings
from service.vad.batcher import VadBatcher


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    batcher: VadBatcher
    models: ModelRunner
    observer: SessionObserver
    # How busy the event loop is: new sessions are refused while it is too busy.
    load: LoopLoad
    # WebM/Ogg Opus decoding shared by every session; None: FFmpeg decodes them.
    decoders: DecodePool | DecodeProcess | None = None
    # Spreads a burst of new sessions out while the loop is busy (the load's samples drive it);
    # off unless given.
    pacer: AdmissionPacer = field(default_factory=lambda: AdmissionPacer(0.0, 0.0, SAMPLE_S))
