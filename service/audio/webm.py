"""Matroska/WebM, read incrementally: the Opus packets of the first audio track.

Only what finding those packets needs is parsed. EBML is a tree of elements, each an ID and a
size (both variable-length integers) and a body. The masters on the way to the packets
(Segment, Tracks, TrackEntry, Audio, Cluster) are entered by reading just their header, so
their children follow as if at top level. Live recorders (MediaRecorder, ``ffmpeg -live``)
write Segment and Cluster with an unknown size, and this needs no size. Every other element
is skipped by its size without being buffered, and blocks are read whole.

FFmpeg's Matroska demuxer remains the fallback for everything this declines: another codec,
header compression or encryption (ContentEncodings), and Opus layouts beyond stereo.
"""

from __future__ import annotations

from service.audio.demux import DemuxError, Packet
from service.audio.opus import OPUS_RATE, OpusHead

EBML = 0x1A45DFA3
DOC_TYPE = 0x4282
SEGMENT = 0x18538067
TRACKS = 0x1654AE6B
TRACK_ENTRY = 0xAE
TRACK_NUMBER = 0xD7
TRACK_TYPE = 0x83
CODEC_ID = 0x86
CODEC_PRIVATE = 0x63A2
CONTENT_ENCODINGS = 0x6D80
AUDIO = 0xE1
CLUSTER = 0x1F43B675
SIMPLE_BLOCK = 0xA3
BLOCK_GROUP = 0xA0
BLOCK = 0xA1
DISCARD_PADDING = 0x75A2

_ENTERED = frozenset({EBML, SEGMENT, TRACKS, TRACK_ENTRY, AUDIO, CLUSTER})
# Read whole: small leaves of the track header, and blocks.
_READ = frozenset(
    {
        DOC_TYPE,
        TRACK_NUMBER,
        TRACK_TYPE,
        CODEC_ID,
        CODEC_PRIVATE,
        CONTENT_ENCODINGS,
        SIMPLE_BLOCK,
        BLOCK_GROUP,
    }
)
_AUDIO_TRACK = 2
# A block holds a few Opus frames (at most 120 ms each, under 8 KB); a megabyte is damage.
MAX_ELEMENT_BYTES = 1 << 20
# Header bytes before the first cluster, past which the file is not what a recorder writes.
MAX_HEADER_BYTES = 1 << 20


class _Track:
    __slots__ = ("codec", "encoded", "number", "private", "type")

    def __init__(self) -> None:
        self.number = 0
        self.type = 0
        self.codec = ""
        self.private = b""
        self.encoded = False


class WebmDemuxer:
    """See :class:`service.audio.demux.Demuxer`."""

    def __init__(self) -> None:
        self.container = "webm"
        self.decided = False
        self.head: OpusHead | None = None
        self._buffer = bytearray()
        self._skip = 0  # body bytes of a skipped element still to come
        self._tracks: list[_Track] = []
        self._number = 0  # the chosen track's number, once decided
        self._offset = 0  # bytes consumed, for messages
        self._started = False

    def feed(self, data: bytes) -> list[Packet]:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            self._offset += dropped
            data = data[dropped:]
        self._buffer += data
        packets: list[Packet] = []
        buffer = self._buffer
        pos = 0
        try:
            while True:
                header = _element_header(buffer, pos)
                if header is None:
                    break
                element, size, length = header
                if not self._started:
                    if element != EBML:
                        raise DemuxError("not an EBML file")
                    self._started = True
                if element in _ENTERED:
                    pos += length
                    self._enter(element)
                    continue
                if size is None:
                    raise DemuxError(f"element {element:#x} has an unknown size")
                if element in _READ:
                    if size > MAX_ELEMENT_BYTES:
                        raise DemuxError(f"element {element:#x} claims {size} bytes")
                    if len(buffer) - pos - length < size:
                        break
                    body = bytes(buffer[pos + length : pos + length + size])
                    pos += length + size
                    self._leaf(element, body, packets)
                    continue
                # Skipped: drop what is here, count the rest off as it arrives.
                available = len(buffer) - pos - length
                if available < size:
                    self._skip = size - available
                    pos = len(buffer)
                    break
                pos += length + size
        finally:
            del buffer[:pos]
            self._offset += pos
        if not self.decided and self._offset > MAX_HEADER_BYTES:
            self._decide()
        return packets

    def end(self) -> list[Packet]:
        # A stream cut inside a block (a recorder stopped mid-write) is not an error, as with
        # FFmpeg: everything before it has been decoded, the partial block cannot be.
        return []

    def _enter(self, element: int) -> None:
        if element == TRACK_ENTRY:
            self._tracks.append(_Track())
        elif element == CLUSTER:
            self._decide()

    def _leaf(self, element: int, body: bytes, packets: list[Packet]) -> None:
        if element == SIMPLE_BLOCK:
            self._block(body, 0, packets)
        elif element == BLOCK_GROUP:
            self._group(body, packets)
        elif element == DOC_TYPE:
            self.container = "webm" if body.rstrip(b"\0") == b"webm" else "mkv"
        elif self._tracks and not self.decided:
            track = self._tracks[-1]
            if element == TRACK_NUMBER:
                track.number = int.from_bytes(body, "big")
            elif element == TRACK_TYPE:
                track.type = int.from_bytes(body, "big")
            elif element == CODEC_ID:
                track.codec = body.rstrip(b"\0").decode("ascii", "replace")
            elif element == CODEC_PRIVATE:
                track.private = body
            elif element == CONTENT_ENCODINGS:
                track.encoded = True

    def _decide(self) -> None:
        if self.decided:
            return
        self.decided = True
        audio = [t for t in self._tracks if t.type == _AUDIO_TRACK]
        if not audio:
            return
        track = audio[0]  # as FFmpeg's path takes the first audio stream
        if track.codec != "A_OPUS" or track.encoded:
            return
        head = OpusHead.parse(track.private)
        if head is not None and head.supported:
            self.head = head
            self._number = track.number

    def _group(self, body: bytes, packets: list[Packet]) -> None:
        block: bytes | None = None
        padding = 0
        pos = 0
        while pos < len(body):
            header = _element_header(body, pos)
            size = None if header is None else header[1]
            if header is None or size is None or pos + header[2] + size > len(body):
                raise DemuxError(f"a damaged BlockGroup {self._offset} bytes in")
            element, _, length = header
            content = body[pos + length : pos + length + size]
            if element == BLOCK:
                block = content
            elif element == DISCARD_PADDING:
                padding = int.from_bytes(content, "big", signed=True)
            pos += length + size
        if block is not None:
            # Nanoseconds to samples, rounded as FFmpeg does.
            self._block(block, (padding * OPUS_RATE + 500_000_000) // 1_000_000_000, packets)

    def _block(self, body: bytes, trim_end: int, packets: list[Packet]) -> None:
        if self.head is None:
            return
        parsed = _vint(body, 0)
        if parsed is None or len(body) < parsed[1] + 3:
            raise DemuxError(f"a damaged block {self._offset} bytes in")
        number, length = parsed
        if number != self._number:
            return
        flags = body[length + 2]
        frames = _unlace(body, length + 3, (flags >> 1) & 3)
        if frames is None:
            raise DemuxError(f"a block with damaged lacing {self._offset} bytes in")
        for i, frame in enumerate(frames):
            packets.append(Packet(frame, trim_end if i == len(frames) - 1 else 0))


def _vint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """An EBML variable-length integer at ``pos`` (marker bit removed): (value, length);
    None if incomplete or invalid. A value of all ones means "unknown" (checked by callers)."""
    if pos >= len(data):
        return None
    first = data[pos]
    if first == 0:
        return None
    length = 9 - first.bit_length()
    if pos + length > len(data):
        return None
    value = first & ((1 << (8 - length)) - 1)
    for i in range(1, length):
        value = (value << 8) | data[pos + i]
    return value, length


def _element_header(data: bytes | bytearray, pos: int) -> tuple[int, int | None, int] | None:
    """(ID with its marker, size or None when unknown, header length), or None when the header
    is not all here yet. Raises :class:`DemuxError` for bytes that cannot start an element."""
    if pos >= len(data):
        return None
    first = data[pos]
    id_length = 9 - first.bit_length() if first else 9
    if id_length > 4:
        raise DemuxError(f"invalid EBML element ID byte {first:#04x}")
    if pos + id_length >= len(data):
        return None
    element = int.from_bytes(data[pos : pos + id_length], "big")
    if data[pos + id_length] == 0:
        raise DemuxError(f"invalid EBML size for element {element:#x}")
    size = _vint(data, pos + id_length)
    if size is None:
        return None
    value, size_length = size
    unknown = value == (1 << (7 * size_length)) - 1
    return element, None if unknown else value, id_length + size_length


def _unlace(body: bytes, pos: int, lacing: int) -> list[bytes] | None:
    if lacing == 0:
        return [body[pos:]]
    if pos >= len(body):
        return None
    count = body[pos] + 1
    pos += 1
    sizes: list[int] = []
    if lacing == 1:  # Xiph: each size a run of 255s and a final byte
        for _ in range(count - 1):
            size = 0
            while True:
                if pos >= len(body):
                    return None
                byte = body[pos]
                pos += 1
                size += byte
                if byte != 255:
                    break
            sizes.append(size)
    elif lacing == 3:  # EBML: the first size, then signed differences
        first = _vint(body, pos)
        if first is None:
            return None
        size, length = first
        pos += length
        sizes.append(size)
        for _ in range(count - 2):
            delta = _vint(body, pos)
            if delta is None:
                return None
            value, length = delta
            pos += length
            size += value - ((1 << (7 * length - 1)) - 1)
            sizes.append(size)
    else:  # fixed: equal sizes
        total = len(body) - pos
        if total % count:
            return None
        sizes = [total // count] * (count - 1)
    last = len(body) - pos - sum(sizes)
    if last < 0 or any(size < 0 for size in sizes):
        return None
    frames = []
    for size in [*sizes, last]:
        frames.append(body[pos : pos + size])
        pos += size
    return frames
