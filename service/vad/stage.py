"""The VAD stage of one session: audio chunks in, speech boundaries and speech audio out.

Each chunk's channels are cut into 512-sample frames; what does not fill a frame is carried to
the next chunk, and at the end of input the remainder is zero-padded to one frame and processed
too (the seed dropped it). One :meth:`VadBatcher.infer` call per chunk covers every channel, so
the model runs batched across channels and sessions and the stage never hops to a thread per
frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.audio.chunk import AudioChunk, Samples
from service.config import MODEL_SAMPLE_RATE, VadParams
from service.vad.batcher import VadBatcher
from service.vad.segmenter import Segmenter
from service.vad.silero import FRAME, VadStream
from service.vad.speech import SpeechAudio, SpeechStarted, VadOutput


@dataclass(frozen=True, slots=True)
class VadSummary:
    frames: int  # model frames run, over all channels (the padded last one included)
    utterances: tuple[int, ...]  # final utterances per channel
    speech_seconds: float  # total length of the final utterances, over all channels


class _Channel:
    __slots__ = ("carry", "last_interim", "segmenter", "stream")

    def __init__(self, params: VadParams, channel: int, start: int) -> None:
        self.segmenter = Segmenter(params, channel, start=start)
        self.stream = VadStream()
        self.carry: Samples = np.zeros(0, dtype=np.float32)
        self.last_interim = start

    def take_frames(self, samples: Samples) -> Samples:
        """Whole frames ``(k, FRAME)`` of carry + samples; the rest becomes the new carry."""
        audio = np.concatenate([self.carry, samples]) if len(self.carry) else samples
        k = len(audio) // FRAME
        self.carry = audio[k * FRAME :].copy()
        return audio[: k * FRAME].reshape(k, FRAME)


async def vad_stage(
    chunks: MemoryObjectReceiveStream[AudioChunk],
    send: MemoryObjectSendStream[VadOutput],
    *,
    batcher: VadBatcher,
    params: VadParams,
    interim_interval_s: float | None,
) -> VadSummary:
    """Segment one session's audio. Outputs go out in order per channel (and in frame order
    across channels); ``send`` is closed when the input ends, after every remainder is flushed.

    With ``interim_interval_s``, while a channel is speaking, the utterance so far goes out as
    ``SpeechAudio(is_final=False)`` each time that much audio has passed since the channel's
    last emission (its speech start, or its previous interim): audio time, not wall time, so
    a fast upload gets the same interims as a live stream.
    """
    interval = (
        None
        if interim_interval_s is None
        else max(1, round(interim_interval_s * MODEL_SAMPLE_RATE))
    )
    channels: list[_Channel] = []
    frames_run = 0
    received_at = 0.0
    expected_start: int | None = None

    async def feed(frames: list[Samples], valid: int | None, at: float) -> None:
        nonlocal frames_run
        probs = await batcher.infer([(c.stream, f) for c, f in zip(channels, frames, strict=True)])
        frames_run += sum(len(f) for f in frames)
        for t in range(len(frames[0])):
            for c, f, p in zip(channels, frames, probs, strict=True):
                outputs = c.segmenter.push(f[t], float(p[t]), at, valid=valid)
                for output in outputs:
                    if isinstance(output, SpeechStarted):
                        c.last_interim = c.segmenter.position
                    await send.send(output)
                if (
                    interval is not None
                    and c.segmenter.speaking
                    and c.segmenter.position - c.last_interim >= interval
                ):
                    await send.send(_interim(c.segmenter, at))
                    c.last_interim = c.segmenter.position

    async with chunks, send:
        async for chunk in chunks:
            received_at = chunk.received_at
            if expected_start is None:
                expected_start = chunk.start
                channels = [_Channel(params, ch, chunk.start) for ch in range(chunk.channels)]
            if chunk.channels != len(channels):
                raise ValueError(
                    f"channel count changed from {len(channels)} to {chunk.channels} mid-stream"
                )
            if chunk.start != expected_start:
                raise ValueError(f"chunk starts at {chunk.start}, expected {expected_start}")
            expected_start = chunk.end
            samples = np.asarray(chunk.samples, dtype=np.float32)
            frames = [c.take_frames(samples[i]) for i, c in enumerate(channels)]
            if frames and len(frames[0]):
                await feed(frames, None, received_at)

        if channels and len(channels[0].carry):
            # Every channel has the same remainder length; pad it to one frame for the model,
            # but only the real samples count as time and audio in the segmenter.
            valid = len(channels[0].carry)
            tails = []
            for c in channels:
                tail = np.zeros((1, FRAME), dtype=np.float32)
                tail[0, :valid] = c.carry
                c.carry = np.zeros(0, dtype=np.float32)
                tails.append(tail)
            await feed(tails, valid, received_at)
        for c in channels:
            for output in c.segmenter.finish(received_at):
                await send.send(output)

    return VadSummary(
        frames=frames_run,
        utterances=tuple(c.segmenter.utterances for c in channels),
        speech_seconds=sum(c.segmenter.speech_samples for c in channels) / MODEL_SAMPLE_RATE,
    )


def _interim(segmenter: Segmenter, received_at: float) -> SpeechAudio:
    current = segmenter.current_speech()
    assert current is not None
    utterance, start, end, audio = current
    return SpeechAudio(segmenter.channel, utterance, start, end, audio, False, received_at)
