"""Opus packets to 16 kHz float32 by calling libopus directly.

WebM and Ogg uploads are almost always Opus (every browser's MediaRecorder), and live they were
what limited a machine: FFmpeg's demuxers read with blocking ``read()`` calls, so each session
decoded in a thread of its own, and at ~80 live streams the GIL hand-offs between those threads
and the event loop took over half the CPU (BENCHMARKS.md). Here the container is parsed by us
(:mod:`service.audio.webm`, :mod:`service.audio.ogg`) and the packets are decoded with libopus
for every session in one process (or one thread) of their own (:mod:`service.audio.packets`).

Why libopus through ``ctypes`` rather than FFmpeg's decoder through PyAV:

- libopus decodes straight at 16 kHz, so there is no resampler: 0.65 ms per audio second
  against 1.86 for FFmpeg's decoder at 48 kHz plus the resampler (speech.webm, one thread);
- the call releases the GIL (``ctypes.CDLL``) once per packet, where PyAV releases it three
  times; with the loop 60% busy, PyAV's decode took 2.6x its CPU in wall time.

Releasing the GIL for libopus beats holding it (``ctypes.PyDLL``, which we used first): the
decoding thread then holds the GIL for whole jobs of packets, and the event loop, which wants
it back after every socket call, waits up to the switch interval each time. Live webm/opus,
same hour, alternating: 200 streams p99 lag 169 and 241 ms released against 241 and 583 held;
250 streams 274 and 296 against 531 and 507 (BENCHMARKS.md).

The library is the one PyAV's wheel bundles (FFmpeg links it for its ``libopus`` codec), else
the system's. Without either, :func:`available` is False and Opus goes to FFmpeg as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE

OPUS_RATE = 48000  # Opus timestamps (pre-skip, granule positions) are always at 48 kHz
_RATIO = OPUS_RATE // MODEL_SAMPLE_RATE
# The longest Opus packet: 120 ms.
_MAX_FRAME = MODEL_SAMPLE_RATE * 120 // 1000
_OPUS_SET_GAIN = 4034
_OPUS_OK = 0


@dataclass(frozen=True, slots=True)
class OpusHead:
    """The identification header (RFC 7845 section 5.1), in Ogg the first packet and in
    Matroska the track's CodecPrivate."""

    channels: int
    pre_skip: int  # samples at 48 kHz to drop from the start of the decoded audio
    gain_q8: int  # output gain in dB, Q7.8
    mapping_family: int

    @classmethod
    def parse(cls, data: bytes) -> OpusHead | None:
        """None if ``data`` is not an OpusHead this module decodes (it then goes to FFmpeg)."""
        if len(data) < 19 or not data.startswith(b"OpusHead") or data[8] >> 4 != 0:
            return None
        channels, pre_skip, _rate, gain, family = struct.unpack_from("<BHIhB", data, 9)
        return cls(channels, pre_skip, gain, family)

    @property
    def supported(self) -> bool:
        # Family 0 is mono or stereo in one Opus stream (what browsers and ffmpeg write);
        # surround layouts need libopus's multistream decoder, and are left to FFmpeg.
        return self.mapping_family == 0 and self.channels in (1, 2)


class OpusError(Exception):
    """libopus rejected a packet (it is skipped, as FFmpeg skips a damaged packet)."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = _bind(ctypes.CDLL(path))
            lib.opus_repacketizer_out  # noqa: B018 - present since libopus 1.0
        except (OSError, AttributeError):
            continue
        return lib
    return None


@functools.cache
def _quick_library() -> ctypes.PyDLL | None:
    """The same library for calls of a microsecond or less (the repacketizer), which keep the
    GIL: releasing it costs a wait to get it back, far more than the call."""
    decoding = _library()
    if decoding is None:
        return None
    lib = ctypes.PyDLL(decoding._name)
    lib.opus_repacketizer_create.restype = ctypes.c_void_p
    lib.opus_repacketizer_create.argtypes = []
    lib.opus_repacketizer_destroy.restype = None
    lib.opus_repacketizer_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_repacketizer_init.restype = ctypes.c_void_p
    lib.opus_repacketizer_init.argtypes = [ctypes.c_void_p]
    lib.opus_repacketizer_cat.restype = ctypes.c_int
    lib.opus_repacketizer_cat.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
    lib.opus_repacketizer_out.restype = ctypes.c_int32
    lib.opus_repacketizer_out.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the decoder's functions (their calls release the GIL)."""
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [
        ctypes.c_int32,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.opus_decode_float.restype = ctypes.c_int
    lib.opus_decode_float.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.opus_decoder_destroy.restype = None
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decoder_ctl.restype = ctypes.c_int
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [ctypes.c_int]
    return lib


def _candidates() -> list[str]:
    import av  # where PyAV's wheel keeps its bundled libraries

    site = Path(av.__file__).resolve().parent
    bundled = [
        *sorted(site.parent.glob("av.libs/libopus*.so*")),  # manylinux wheels
        *sorted(site.glob(".dylibs/libopus*.dylib")),  # macOS wheels
    ]
    found = ctypes.util.find_library("opus")
    return [str(p) for p in bundled] + ([found] if found else [])


def available() -> bool:
    """Whether libopus can be loaded (once; later calls are free)."""
    return _library() is not None


class OpusDecoder:
    """One Opus stream's decoder state; used by one thread at a time.

    Output is planar float32 ``(channels, n)`` at 16 kHz with the header's pre-skip removed
    and its output gain applied. The libopus state (~18 KB mono) is freed with the object.
    """

    def __init__(self, head: OpusHead) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("libopus is not available")
        if not head.supported:
            raise ValueError(f"unsupported Opus layout: {head}")
        error = ctypes.c_int()
        state = lib.opus_decoder_create(MODEL_SAMPLE_RATE, head.channels, ctypes.byref(error))
        if error.value != _OPUS_OK or not state:
            raise RuntimeError(f"opus_decoder_create failed: {_strerror(lib, error.value)}")
        weakref.finalize(self, lib.opus_decoder_destroy, state)
        if head.gain_q8:
            lib.opus_decoder_ctl(ctypes.c_void_p(state), _OPUS_SET_GAIN, ctypes.c_int(head.gain_q8))
        self._lib = lib
        self._state = state
        self.channels = head.channels
        self._buffer = np.empty(_MAX_FRAME * head.channels, np.float32)
        self._pointer = self._buffer.ctypes.data
        # Still to drop from the start, in 16 kHz samples (pre-skip is counted at 48 kHz).
        self._skip = -(-head.pre_skip // _RATIO)
        quick = _quick_library()
        assert quick is not None  # same library as _library()
        self._quick = quick
        self._repacketizer = quick.opus_repacketizer_create()
        if not self._repacketizer:
            raise RuntimeError("opus_repacketizer_create failed")
        weakref.finalize(self, quick.opus_repacketizer_destroy, self._repacketizer)
        # Grown to fit a run: a live stream's six packets are a few hundred bytes, and the
        # largest possible merged packet (~60 KB) per session would dwarf its other state.
        self._merged = ctypes.create_string_buffer(1024)

    def decode(self, packet: bytes, trim_end: int = 0) -> Samples:
        """Decode one packet; ``trim_end`` samples (at 48 kHz) are dropped from its end (the
        container's end padding). Raises :class:`OpusError` for a packet libopus rejects."""
        n = self._lib.opus_decode_float(
            self._state, packet, len(packet), self._pointer, _MAX_FRAME, 0
        )
        if n < 0:
            raise OpusError(_strerror(self._lib, n))
        return self._output(n, trim_end)

    def decode_run(self, packets: Sequence[bytes]) -> tuple[Samples, int] | None:
        """Decode the leading packets that fit one packet of at most 120 ms, merged by libopus's
        repacketizer, in one call: ``(samples, packets used)``, the same samples as decoding
        them one by one. None when not even the first two merge (different modes, or one that
        does not parse) or the merged packet fails: decode those one by one instead.

        Each decoding call releases and retakes the GIL, and with the event loop busy retaking
        it was most of the decoding thread's time: a live 20 ms-packet stream costs one wait
        per 100 ms chunk this way, not five."""
        quick, rp = self._quick, self._repacketizer
        quick.opus_repacketizer_init(rp)
        used = 0
        for packet in packets:
            if quick.opus_repacketizer_cat(rp, packet, len(packet)) != _OPUS_OK:
                break  # past 120 ms, another mode, or damaged: it starts the next run
            used += 1
        if used < 2:
            return None
        # The merged packet: a TOC and a count byte, the frames, and up to two length bytes
        # for each of at most 48 frames (were it ever short, the run decodes one by one).
        room = sum(len(p) for p in packets[:used]) + 2 * 48 + 2
        if len(self._merged) < room:
            self._merged = ctypes.create_string_buffer(room)
        size = quick.opus_repacketizer_out(rp, self._merged, len(self._merged))
        if size <= 0:
            return None
        n = self._lib.opus_decode_float(
            self._state, self._merged, size, self._pointer, _MAX_FRAME, 0
        )
        if n < 0:
            return None
        return self._output(n, 0), used

    def _output(self, n: int, trim_end: int) -> Samples:
        samples = self._buffer[: n * self.channels].reshape(n, self.channels).T
        if trim_end > 0:
            samples = samples[:, : max(0, n - trim_end // _RATIO)]
        if self._skip:
            drop = min(self._skip, samples.shape[1])
            self._skip -= drop
            samples = samples[:, drop:]
        # A copy: the buffer is reused by the next packet.
        return np.array(samples, dtype=np.float32, order="C")


def _strerror(lib: ctypes.CDLL, code: int) -> str:
    message: bytes | None = lib.opus_strerror(code)
    return message.decode() if message else f"error {code}"


def packet_samples(packet: bytes) -> int:
    """Samples (at 48 kHz) that an Opus packet decodes to, from its TOC byte (RFC 6716 3.1);
    0 for a malformed packet. Ogg end trimming needs it before decoding."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        per_frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        per_frame = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        per_frame = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    elif len(packet) < 2:
        return 0
    else:
        frames = packet[1] & 0x3F
    return per_frame * frames
