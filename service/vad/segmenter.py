"""The segmentation state machine of one channel: speech probabilities in, utterances out.

It follows silero-rs ``VadSession`` (what the seed uses), on 512-sample frames:

- Silence: a frame with ``prob > positive_threshold`` opens a candidate utterance starting
  ``pre_speech_pad`` before that frame, but never before the end of the previous utterance (so
  no audio goes to the model twice) nor before the stream's first sample.
- Speech: every frame adds to the speech time; once it exceeds ``min_speech`` the utterance is
  confirmed and :class:`SpeechStarted` goes out. Frames with ``prob < negative_threshold`` make
  a silent run (any other frame resets it). A silent frame drops an unconfirmed candidate
  silently; a confirmed utterance ends once the silent run exceeds ``redemption``, at the end of
  its last non-silent frame, with :class:`SpeechEnded` and then the final :class:`SpeechAudio`.
- A confirmed utterance never exceeds ``max_segment``: at that length it is cut and a new one
  starts at the very same sample, so nothing is lost or duplicated. If the speaker is already
  in a silent run at that point (the voiced part ends before the cut) the utterance simply ends
  there, as redemption would have ended it; starting a new utterance made only of silence would
  hand the model empty audio.

Positions are sample indices since the session's first sample. Only the audio that can still
be needed is kept: while silent, the last ``pre_speech_pad`` samples; while speaking, the
utterance so far (at most ``max_segment`` plus one frame).

:meth:`Segmenter.skip` takes a run of frames at once where pushing them one by one would
produce nothing: silence that opens no utterance, and confirmed speech before it ends or is
cut. A fast upload hands the stage a second of frames or more per batch, and per-frame Python
was then the largest share of the event loop (py-spy); the state after ``skip`` is exactly the
state after pushing the same frames.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE, VadParams
from service.vad.silero import FRAME
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

# Up to this many frames, skip counts in Python; beyond, numpy. The numpy path costs ~9-11 us
# whatever the count (a dozen array calls); the loop 0.3-0.1 us per frame and stops at the first
# frame due for push, so it is cheaper up to ~100 frames even when it reads them all. A fast
# upload offers 45-64 frames per call (the stage queues at most 64 per stream).
FEW_FRAMES = 96


def ms_to_samples(ms: int) -> int:
    return ms * MODEL_SAMPLE_RATE // 1000


class _AudioWindow:
    """Samples ``[start, end)`` of one channel in a growable array: appends at the end and drops
    from the front are amortised O(1) per sample; the array stays within four times what is
    kept."""

    __slots__ = ("_data", "_hi", "_lo", "start")

    def __init__(self, start: int) -> None:
        self._data: Samples = np.zeros(8 * FRAME, dtype=np.float32)
        self._lo = 0  # index in _data of the sample at position `start`
        self._hi = 0
        self.start = start

    @property
    def end(self) -> int:
        return self.start + self._hi - self._lo

    def append(self, samples: Samples) -> None:
        n = len(samples)
        if self._hi + n > len(self._data):
            kept = self._hi - self._lo
            size = len(self._data)
            while kept + n > size // 2:
                size *= 2
            data = np.empty(size, dtype=np.float32) if size != len(self._data) else self._data
            data[:kept] = self._data[self._lo : self._hi]
            self._data, self._lo, self._hi = data, 0, kept
        self._data[self._hi : self._hi + n] = samples
        self._hi += n

    def append_keeping(self, samples: Samples, keep_from: int) -> None:
        """``append`` then ``drop_before(keep_from)``, copying only the samples kept."""
        end = self.end
        if keep_from >= end:  # nothing held now is kept: restart the window
            skip = min(keep_from - end, len(samples))
            self._lo = self._hi = 0
            self.start = end + skip
            samples = samples[skip:]
        self.append(samples)
        self.drop_before(keep_from)

    def drop_before(self, position: int) -> None:
        k = min(max(position - self.start, 0), self._hi - self._lo)
        self._lo += k
        self.start += k

    def copy(self, start: int, end: int) -> Samples:
        if not self.start <= start <= end <= self.end:
            raise ValueError(f"[{start}, {end}) is not within [{self.start}, {self.end})")
        lo = self._lo + start - self.start
        return self._data[lo : lo + end - start].copy()


class Segmenter:
    """One channel's state machine. Feed every frame in order with :meth:`push`, then call
    :meth:`finish` once at the end of the stream. Pure: no I/O, no model."""

    def __init__(self, params: VadParams, channel: int = 0, *, start: int = 0) -> None:
        self.params = params
        self.channel = channel
        self._pad = ms_to_samples(params.pre_speech_pad_ms)
        self._redemption = ms_to_samples(params.redemption_ms)
        self._min_speech = ms_to_samples(params.min_speech_ms)
        self._max_segment = max(ms_to_samples(params.max_segment_ms), 1)
        self._first = start  # the stream's first sample: the pre-speech pad stops there
        self._position = start  # end of the audio seen so far
        self._audio = _AudioWindow(start)
        self._in_speech = False  # a candidate or confirmed utterance is open
        self._confirmed = False
        self._start = 0  # of the open utterance
        self._speech_time = 0
        self._silent_run = 0
        self._previous_end = start
        self._utterance = 0  # number of the open (or next) utterance
        self._closed = False  # after a partial frame or finish(): nothing more may come
        self.utterances = 0  # completed (final) utterances
        self.speech_samples = 0  # total length of the final utterances

    @property
    def position(self) -> int:
        """End of the audio processed so far (real samples only)."""
        return self._position

    @property
    def speaking(self) -> bool:
        """A confirmed utterance is open."""
        return self._in_speech and self._confirmed

    def current_speech(self) -> tuple[int, int, int, Samples] | None:
        """``(utterance, start, end, audio)`` of the open confirmed utterance so far, for interim
        results; ``None`` when not speaking."""
        if not self.speaking:
            return None
        return (
            self._utterance,
            self._start,
            self._position,
            self._audio.copy(self._start, self._position),
        )

    def push(
        self, frame: Samples, prob: float, received_at: float, *, valid: int | None = None
    ) -> list[VadOutput]:
        """One frame and its speech probability. ``valid`` is how many leading samples are real
        when the last, partial frame was zero-padded for the model: only those count as time
        and audio, and no frame may follow it."""
        if self._closed:
            raise RuntimeError("no frame may follow a partial frame or finish()")
        n = len(frame) if valid is None else valid
        if not 0 < n <= len(frame):
            raise ValueError(f"valid must be in 1..{len(frame)}, got {valid}")
        if n < len(frame):
            self._closed = True
        frame_start = self._position
        frame_end = frame_start + n
        self._audio.append(frame[:n])
        self._position = frame_end
        out: list[VadOutput] = []
        p = self.params

        if prob < p.negative_threshold:
            self._silent_run += n
        else:
            self._silent_run = 0

        if not self._in_speech:
            if prob > p.positive_threshold:
                self._in_speech = True
                self._confirmed = False
                self._speech_time = 0
                self._start = max(frame_start - self._pad, self._previous_end, self._first)
        else:
            self._speech_time += n
            if not self._confirmed and self._speech_time > self._min_speech:
                self._confirmed = True
                out.append(SpeechStarted(self.channel, self._utterance, self._start, received_at))
            if prob < p.negative_threshold:
                if not self._confirmed:
                    self._in_speech = False
                elif self._silent_run > self._redemption:
                    self._close(frame_end - self._silent_run, received_at, out)

        while self.speaking and frame_end - self._start >= self._max_segment:
            cut = self._start + self._max_segment
            voiced_end = frame_end - self._silent_run
            if voiced_end <= cut:
                self._close(voiced_end, received_at, out)
            else:
                self._close(cut, received_at, out)
                self._in_speech = self._confirmed = True
                self._start = cut
                out.append(SpeechStarted(self.channel, self._utterance, cut, received_at))

        self._trim()
        return out

    def skip(
        self, frames: Samples, probs: npt.NDArray[np.floating], until: int | None = None
    ) -> int:
        """Take the leading whole frames ``(k, FRAME)`` whose :meth:`push` would produce no
        output, at once; returns how many were taken (the next frame must go to ``push``).
        ``until``: take no frame that ends at or after this position (the caller has something
        due there, such as an interim result)."""
        k = len(frames)
        if self._closed or k == 0 or (self._in_speech and not self._confirmed):
            return 0  # a candidate is short (min_speech): frame by frame
        if k <= FEW_FRAMES:
            take, silent_run = self._count_few(probs[:k].tolist(), until)
        else:
            take, silent_run = self._count_many(probs[:k], until)
        if take == 0:
            return 0
        n = take * FRAME
        self._position += n
        self._silent_run = silent_run
        if self._in_speech:
            self._speech_time += n
            self._audio.append(frames[:take].reshape(-1))
        else:
            keep_from = max(self._position - self._pad, self._previous_end)
            self._audio.append_keeping(frames[:take].reshape(-1), keep_from)
        return take

    def _count_few(self, probs: list[float], until: int | None) -> tuple[int, int]:
        """``skip``'s count and the silent run after it, frame by frame in Python: for a live
        chunk's few frames, cheaper than the numpy calls of :meth:`_count_many`."""
        p = self.params
        speaking = self._in_speech
        position, run, take = self._position, self._silent_run, 0
        for prob in probs:
            end = position + FRAME
            if not speaking and prob > p.positive_threshold:
                break  # opens a candidate
            next_run = run + FRAME if prob < p.negative_threshold else 0
            if speaking and (next_run > self._redemption or end - self._start >= self._max_segment):
                break  # ends or cuts the utterance
            if until is not None and end >= until:
                break
            position, run, take = end, next_run, take + 1
        return take, run

    def _count_many(self, probs: npt.NDArray[np.floating], until: int | None) -> tuple[int, int]:
        """``skip``'s count and the silent run after it, with numpy over a long run."""
        k = len(probs)
        p = self.params
        # In float64, as push compares Python floats: a float32 comparison could differ at
        # the threshold itself.
        prob = np.asarray(probs, dtype=np.float64)
        runs = self._silent_runs(prob < p.negative_threshold)
        position = self._position
        if not self._in_speech:
            # Silence: everything before the first frame that opens a candidate.
            opens = np.flatnonzero(prob > p.positive_threshold)
            take = int(opens[0]) if len(opens) else k
        else:
            # Confirmed speech: everything before the frame that ends it (a silent run past
            # redemption) or cuts it (max_segment).
            ends = np.flatnonzero(runs > self._redemption)
            take = int(ends[0]) if len(ends) else k
            cut = -(-(self._start + self._max_segment - position) // FRAME) - 1
            take = min(take, max(cut, 0))
        if until is not None:
            take = min(take, max(0, -(-(until - position) // FRAME) - 1))
        return take, (int(runs[take - 1]) if take else self._silent_run)

    def _silent_runs(self, silent: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """The silent run (samples) after each of these whole frames, as ``push`` counts it."""
        index = np.arange(len(silent))
        # The last frame at or before each one that was not silent (-1: none in this run).
        last_loud = np.maximum.accumulate(np.where(silent, -1, index))
        return np.where(
            last_loud >= 0,
            (index - last_loud) * FRAME,
            self._silent_run + (index + 1) * FRAME,
        )

    def finish(self, received_at: float) -> list[VadOutput]:
        """End of stream: an open confirmed utterance ends at the last real sample (the speaker
        may have been cut off mid-word, so the trailing silent run is kept rather than dropped);
        an unconfirmed candidate is shorter than ``min_speech`` and is dropped."""
        self._closed = True
        out: list[VadOutput] = []
        if self.speaking:
            self._close(self._position, received_at, out)
        self._in_speech = False
        return out

    def flush(self, received_at: float) -> list[VadOutput]:
        """End the open confirmed utterance at the audio seen so far, now (a client's
        ``Finalize``), and go on: the next frames may start a new utterance, which begins no
        earlier than this end. An unconfirmed candidate stays open (it is not speech yet)."""
        out: list[VadOutput] = []
        if self.speaking:
            self._close(self._position, received_at, out)
            self._trim()
        return out

    def _close(self, end: int, received_at: float, out: list[VadOutput]) -> None:
        audio = self._audio.copy(self._start, end)
        out.append(SpeechEnded(self.channel, self._utterance, end, received_at))
        out.append(
            SpeechAudio(self.channel, self._utterance, self._start, end, audio, True, received_at)
        )
        self.utterances += 1
        self.speech_samples += end - self._start
        self._utterance += 1
        self._previous_end = end
        self._in_speech = self._confirmed = False

    def _trim(self) -> None:
        if self._in_speech:
            keep_from = self._start
        else:
            # A new utterance can start at most pre_speech_pad before the next frame, and never
            # before the previous utterance's end.
            keep_from = max(self._position - self._pad, self._previous_end)
        self._audio.drop_before(keep_from)
