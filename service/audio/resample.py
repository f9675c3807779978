"""Rate conversion to 16 kHz with FFmpeg's resampler (``av.AudioResampler`` or the same filter
graph built here).

Two shapes of input: planar numpy arrays from the PCM path (:class:`ArrayResampler`) and decoded
``av.AudioFrame`` objects from the container path (:class:`FrameResampler`). Both keep the channel
count: each channel is its own stream for the VAD later.
"""

from __future__ import annotations

from typing import cast

import av
import av.error
import av.filter
import numpy as np
from av.audio.frame import AudioFrame
from av.audio.layout import AudioLayout
from av.filter.context import FilterContext

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE


def empty(channels: int) -> Samples:
    return np.zeros((channels, 0), np.float32)


class ArrayResampler:
    """Planar float32 ``(channels, n)`` at ``rate`` in, planar float32 at 16 kHz out.

    One mono resampler per channel, so any channel count works (FFmpeg's channel layouts stop
    at a few dozen named ones). No resampler at all when the rate is already 16 kHz. Output
    does not depend on how the input was split: FFmpeg's resampler is stateful and exact.
    """

    def __init__(self, channels: int, rate: int) -> None:
        self.channels = channels
        self.rate = rate
        self._resamplers = (
            []
            if rate == MODEL_SAMPLE_RATE
            else [
                av.AudioResampler(format="flt", layout="mono", rate=MODEL_SAMPLE_RATE)
                for _ in range(channels)
            ]
        )
        # Per-channel output not yet returned: channels are resampled independently and are
        # only handed out in equal lengths (in practice they always are equal already).
        self._pending: list[list[Samples]] = [[] for _ in range(channels)]

    def process(self, samples: Samples) -> Samples:
        if not self._resamplers:
            return samples
        if samples.shape[1] == 0:
            return empty(self.channels)
        for ch, resampler in enumerate(self._resamplers):
            frame = AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[ch : ch + 1]), format="flt", layout="mono"
            )
            frame.sample_rate = self.rate
            self._collect(ch, resampler.resample(frame))
        return self._take()

    def flush(self) -> Samples:
        """The resampler's delayed tail; call once at the end of the input."""
        if not self._resamplers:
            return empty(self.channels)
        for ch, resampler in enumerate(self._resamplers):
            self._collect(ch, resampler.resample(None))
        return self._take(final=True)

    def _collect(self, ch: int, frames: list[AudioFrame]) -> None:
        self._pending[ch].extend(np.asarray(f.to_ndarray(), np.float32).reshape(-1) for f in frames)

    def _take(self, final: bool = False) -> Samples:
        columns = [np.concatenate(p) if p else np.zeros(0, np.float32) for p in self._pending]
        n = max(len(c) for c in columns) if final else min(len(c) for c in columns)
        out = np.zeros((self.channels, n), np.float32)
        for ch, column in enumerate(columns):
            out[ch, : min(n, len(column))] = column[:n]
            self._pending[ch] = [column[n:]] if len(column) > n else []
        return out


class FrameResampler:
    """Decoded frames of any sample format and rate to planar float32 at 16 kHz.

    Frames go in with :meth:`push` as they are decoded; :meth:`pull` returns what is ready, and
    is meant to be called once per batch of frames rather than once per frame: each pull ends in
    an EAGAIN that PyAV raises as an exception, and each call into FFmpeg releases and retakes
    the GIL, a thread hand-off whenever another thread (the event loop, the VAD) is waiting for
    it. Frames wait in the graph's input until then.

    The filter graph (abuffer -> aformat -> abuffersink, FFmpeg inserting its aresample, as
    ``av.AudioResampler`` builds it: the output is the same sample for sample) is built here to
    give it one thread: with FFmpeg's automatic count every graph starts a thread per core, which
    the resampler never uses.

    The channel count is fixed by the first frame; should a stream change its layout or rate
    mid-way (chained Ogg, some AAC streams), the old graph is flushed and a new one maps the
    new input onto the original layout, so downstream sees one consistent shape.
    """

    def __init__(self) -> None:
        # The graph owns the filters: the contexts hold raw pointers into it (PyAV keeps only a
        # weak reference from them), so it must stay referenced while they are used.
        self._graph: av.filter.Graph | None = None
        self._source: FilterContext | None = None
        self._sink: FilterContext | None = None
        self._input: tuple[str, str, int] | None = None
        self._layout: AudioLayout | None = None
        # Output of a graph already flushed (after an input change), ahead of the current one's.
        self._ready: list[Samples] = []
        self.channels = 0

    def push(self, frame: AudioFrame) -> None:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._source is None or key != self._input:
            if self._source is not None:
                self._source.push(None)
                self._ready.extend(self._drain())
            if self._layout is None:
                self._layout = frame.layout
                self.channels = frame.layout.nb_channels
            self._graph, self._source, self._sink = _graph(frame, self._layout)
            self._input = key
        # Timestamps do not matter here (output is contiguous by construction) and odd ones
        # from a damaged stream could make the resampler pad or drop audio.
        frame.pts = None
        self._source.push(frame)

    def pull(self) -> list[Samples]:
        """Everything the frames pushed so far resample to (less the filter's short delay)."""
        out = self._ready
        self._ready = []
        if self._sink is not None:
            out.extend(self._drain())
        return out

    def flush(self) -> list[Samples]:
        """:meth:`pull` plus the resampler's delayed tail; call once at the end of the input."""
        if self._source is not None:
            self._source.push(None)
        out = self.pull()
        self._graph = self._source = self._sink = None
        self._input = None
        return out

    def _drain(self) -> list[Samples]:
        assert self._sink is not None
        out: list[Samples] = []
        while True:
            try:
                # An abuffersink yields audio frames (PyAV types pull() as any Frame).
                frame = cast(AudioFrame, self._sink.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return out
            out.append(np.asarray(frame.to_ndarray(), np.float32).reshape(self.channels, -1))


def _graph(
    frame: AudioFrame, layout: AudioLayout
) -> tuple[av.filter.Graph, FilterContext, FilterContext]:
    """A one-thread filter graph from ``frame``'s format to planar float32 16 kHz ``layout``;
    the graph, its source and its sink."""
    graph = av.filter.Graph()
    graph.threads = 1  # must be set before any filter is added
    source = graph.add(
        "abuffer",
        sample_rate=str(frame.sample_rate),
        sample_fmt=frame.format.name,
        channel_layout=frame.layout.name,
    )
    aformat = graph.add(
        "aformat",
        sample_rates=str(MODEL_SAMPLE_RATE),
        sample_fmts="fltp",
        channel_layouts=layout.name,
    )
    sink = graph.add("abuffersink")
    source.link_to(aformat)
    aformat.link_to(sink)
    graph.configure()
    return graph, source, sink
