"""WAV (RIFF/RF64/BW64) headers, parsed as the bytes arrive.

FFmpeg's WAV demuxer only starts after a ~64 KiB probe, two seconds of 16 kHz stereo, so the
header is parsed here and the sample data goes through numpy (:mod:`service.audio.pcm`). Codecs
numpy cannot do (mu-law, ADPCM, MP3-in-WAV, ...) are handed to FFmpeg instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from service.audio.pcm import PcmLayout
from service.audio.source import Head
from service.config import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from service.errors import ErrorCode, StreamerError

RIFF_IDS = (b"RIFF", b"RF64", b"BW64")
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# A data size of 0 or 0xFFFFFFFF is what writers that cannot seek back (streams, pipes) leave.
UNKNOWN_SIZES = (0, 0xFFFFFFFF)
MAX_HEADER_CHUNK_BYTES = 64 * 1024


def is_wav(head: bytes) -> bool:
    return len(head) >= 12 and head[:4] in RIFF_IDS and head[8:12] == b"WAVE"


@dataclass(frozen=True, slots=True)
class WavFormat:
    """The ``fmt `` chunk, with WAVE_FORMAT_EXTENSIBLE resolved to its sub-format tag."""

    format_tag: int
    channels: int
    sample_rate: int
    block_align: int
    bits_per_sample: int

    def layout(self) -> PcmLayout | None:
        """The numpy layout of a sample frame, or ``None`` if FFmpeg has to decode this."""
        if self.channels < 1 or self.block_align % self.channels:
            return None
        width = self.block_align // self.channels
        if self.format_tag == WAVE_FORMAT_PCM and width in (1, 2, 3, 4):
            return PcmLayout(self.channels, width, "uint" if width == 1 else "int")
        if self.format_tag == WAVE_FORMAT_IEEE_FLOAT and width in (4, 8):
            return PcmLayout(self.channels, width, "float")
        return None


@dataclass(frozen=True, slots=True)
class WavHeader:
    format: WavFormat
    layout: PcmLayout | None  # None: not PCM numpy can read; FFmpeg decodes it
    data_size: int | None  # None: unknown, read the data to the end of the upload


def _corrupt(message: str) -> StreamerError:
    return StreamerError(ErrorCode.DECODE_FAILED, f"invalid WAV header: {message}")


def _parse_fmt(body: bytes) -> WavFormat:
    if len(body) < 16:
        raise _corrupt(f"fmt chunk is {len(body)} bytes, expected at least 16")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise _corrupt("WAVE_FORMAT_EXTENSIBLE fmt chunk is shorter than 40 bytes")
        # The sub-format GUID starts with the plain format tag (KSDATAFORMAT_SUBTYPE_PCM, ...).
        (tag,) = struct.unpack_from("<H", body, 24)
    if channels < 1:
        raise _corrupt("no channels")
    if channels > MAX_CHANNELS:
        raise StreamerError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"WAV has {channels} channels; at most {MAX_CHANNELS} are supported",
        )
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise StreamerError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"WAV sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
        )
    return WavFormat(tag, channels, rate, block_align, bits)


async def read_header(head: Head) -> WavHeader:
    """Parse from the start of the upload up to the first byte of sample data.

    On return the cursor of ``head`` sits on the first data byte. Chunks other than ``fmt ``,
    ``ds64`` and ``data`` are skipped (odd sizes are padded to even, as RIFF requires). As soon
    as the format is known to need FFmpeg, returns with ``layout=None`` so the caller can replay
    the bytes read so far; ``head.replay()`` then holds everything.
    """
    riff = await head.read(12)
    if riff is None or not is_wav(riff):
        raise _corrupt("the upload ended inside the RIFF header")
    ds64_data_size: int | None = None
    fmt: WavFormat | None = None
    while True:
        chunk = await head.read(8)
        if chunk is None:
            raise _corrupt("the upload ended before the data chunk")
        chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if chunk_id == b"data":
            if fmt is None:
                raise _corrupt("data chunk before fmt chunk")
            data_size: int | None = size
            if size == 0xFFFFFFFF and ds64_data_size is not None:
                data_size = ds64_data_size
            if data_size in UNKNOWN_SIZES:
                data_size = None
            return WavHeader(fmt, fmt.layout(), data_size)
        padded = size + (size & 1)
        if chunk_id in (b"fmt ", b"ds64"):
            if size > MAX_HEADER_CHUNK_BYTES:
                # These are tens of bytes; reading a bogus size would buffer the whole upload.
                raise _corrupt(f"{chunk_id.decode()!r} chunk claims {size} bytes")
            body = await head.read(padded)
            if body is None:
                raise _corrupt(f"the upload ended inside the {chunk_id.decode()!r} chunk")
            if chunk_id == b"ds64":
                if len(body) < 16:
                    raise _corrupt("ds64 chunk is shorter than 16 bytes")
                # riffSize (8 bytes) then dataSize (8 bytes).
                (ds64_data_size,) = struct.unpack_from("<Q", body, 8)
            else:
                fmt = _parse_fmt(body[:size])
                if fmt.layout() is None:
                    # Hand over now, before skipping chunks would make the head unreplayable.
                    return WavHeader(fmt, None, None)
        elif not await head.skip(padded):
            raise _corrupt(f"the upload ended inside the {chunk_id!r} chunk")
