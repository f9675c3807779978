"""Recognise the upload's format from its first bytes.

Only what changes how we decode is told apart here: WAV (parsed by us), MP4 with its index
(``moov``) at the end (cannot stream), and magic numbers that let FFmpeg skip its format probe
(which otherwise waits for at least 2 KiB). Everything else goes to FFmpeg's probe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from service.audio.source import MAX_HEAD_BYTES, Head
from service.audio.wav import is_wav
from service.errors import ErrorCode, StreamerError

# FFmpeg's format probe is capped at this many bytes (its default is 1 MiB, far too long to
# wait before rejecting a stream of junk); every audio container is recognisable well within it.
FORMAT_PROBE_BYTES = 4096


class Kind(Enum):
    WAV = "wav"
    MP4_MOOV_AT_END = "mp4_moov_at_end"
    FFMPEG = "ffmpeg"


@dataclass(frozen=True, slots=True)
class Sniffed:
    kind: Kind
    # FFmpeg demuxer to use without probing, when the magic number is unambiguous.
    demuxer: str | None = None
    # Bytes FFmpeg may read to identify the format (an ID3 tag ahead of an MP3 adds to it).
    probe_bytes: int = FORMAT_PROBE_BYTES


# Magic numbers at offset 0 that name exactly one FFmpeg demuxer.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"OggS", "ogg"),
    (b"\x1a\x45\xdf\xa3", "matroska"),  # EBML: Matroska and WebM
    (b"fLaC", "flac"),
)

# Top-level ISO BMFF boxes that can precede the movie header without holding media.
_MP4_STREAMABLE = (b"moov", b"moof")


async def sniff(head: Head) -> Sniffed:
    """Look at the first bytes (consuming nothing: the cursor of ``head`` stays at 0)."""
    await head.fill(12)
    first = head.peek(12)
    if not first:
        raise StreamerError(ErrorCode.EMPTY_AUDIO, "the upload contained no bytes")
    if is_wav(first):
        return Sniffed(Kind.WAV, "wav")
    for magic, demuxer in _MAGIC:
        if first.startswith(magic):
            return Sniffed(Kind.FFMPEG, demuxer)
    if first[4:8] == b"ftyp":
        streamable = await _mp4_moov_first(head)
        return Sniffed(Kind.FFMPEG if streamable else Kind.MP4_MOOV_AT_END, "mov")
    if first.startswith(b"ID3") and len(first) >= 10:
        # FFmpeg skips an ID3v2 tag before probing but only once it holds all of it; a tag with
        # cover art can be far larger than our probe limit, so widen the limit by its size.
        return Sniffed(Kind.FFMPEG, None, FORMAT_PROBE_BYTES + _id3_size(first))
    return Sniffed(Kind.FFMPEG)


def _id3_size(header: bytes) -> int:
    # Syncsafe integer: four bytes of seven bits each; plus the 10-byte header and optional
    # 10-byte footer (flag bit 4).
    size = 0
    for byte in header[6:10]:
        size = (size << 7) | (byte & 0x7F)
    return size + 10 + (10 if header[5] & 0x10 else 0)


async def _mp4_moov_first(head: Head) -> bool:
    """Walk the top-level boxes: does ``moov`` (or a fragment) come before ``mdat``?

    Reads box headers only as far as needed; the head is left at position 0 for replay.
    """
    offset = 0
    while offset < MAX_HEAD_BYTES:
        if not await head.fill(offset + 16):
            # The upload ended among the header boxes: let FFmpeg say what is wrong with it.
            return True
        box = bytes(head.buffer[offset : offset + 16])
        size, kind = struct.unpack(">I4s", box[:8])
        if kind in _MP4_STREAMABLE:
            return True
        if kind == b"mdat":
            return False
        if size == 1:
            (size,) = struct.unpack(">Q", box[8:16])
        elif size == 0:
            return True  # box runs to the end of the file: nothing sensible follows
        if size < 8:
            return True  # damaged: FFmpeg will report it
        offset += size
    return False
