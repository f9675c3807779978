"""Ogg, read incrementally: the Opus packets of the first logical stream (RFC 3533, RFC 7845).

An Ogg stream is a run of pages: a 27-byte header, a table of segment lengths, the segments. A
packet is a run of segments ending in one shorter than 255 bytes, and may continue on the next
page. The first page of each logical stream (BOS) comes before any other page, and the first
packet of an Opus stream is its OpusHead, the second its tags.

FFmpeg's Ogg demuxer remains the fallback when the first stream is not Opus or uses a layout
beyond stereo. Every page's checksum is verified, as FFmpeg does: a page that fails it is
dropped (libopus would decode most damaged packets into noise without a word), its place is
reported to the decoder as damage, and reading resumes at the next page boundary found.
"""

from __future__ import annotations

import struct
import zlib

from service.audio.demux import DemuxError, Packet
from service.audio.opus import OpusHead, packet_samples

_HEADER = struct.Struct("<4sBBqIIIB")
_CONTINUED, _BOS, _EOS = 1, 2, 4
# A packet this long is not Opus (a 120 ms packet is under 8 KB): the stream is damaged.
MAX_PACKET_BYTES = 1 << 20
_CAPTURE = b"OggS"
_CRC_AT = 22  # the checksum field: bytes 22-25 of the header
# Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, no initial or final XOR) is zlib's
# reflected CRC-32 over bit-reversed bytes, bit-reversed: both passes run in C, where a Python
# loop over every byte would cost more than decoding the audio.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def page_checksum(page: bytes | bytearray) -> int:
    """The checksum of a whole page, its checksum field taken as zeros (RFC 3533 section 6)."""
    zeroed = bytes(page[:_CRC_AT]) + bytes(4) + bytes(page[_CRC_AT + 4 :])
    crc = zlib.crc32(zeroed.translate(_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{crc:032b}"[::-1], 2)


class OggDemuxer:
    """See :class:`service.audio.demux.Demuxer`."""

    def __init__(self) -> None:
        self.container = "ogg"
        self.decided = False
        self.head: OpusHead | None = None
        self._buffer = bytearray()
        self._serial: int | None = None
        self._partial = bytearray()  # a packet continuing on the next page
        self._headless = False  # the page before was lost: drop the tail of its last packet
        self._resync = False  # looking for the next page after a damaged one
        self._packets = 0  # packets completed in our stream (0: OpusHead, 1: tags)
        self._samples = 0  # audio samples (48 kHz) in the packets so far, pre-skip included
        self._ended = False
        self._offset = 0

    def feed(self, data: bytes) -> list[Packet]:
        self._buffer += data
        buffer = self._buffer
        packets: list[Packet] = []
        pos = 0
        try:
            while True:
                if self._resync:
                    found = buffer.find(_CAPTURE, pos)
                    if found < 0:
                        # Keep what could be the start of the next capture pattern.
                        pos = max(pos, len(buffer) - len(_CAPTURE) + 1)
                        break
                    pos, self._resync = found, False
                if len(buffer) - pos < _HEADER.size:
                    break
                capture, version, flags, granule, serial, _seq, crc, count = _HEADER.unpack_from(
                    buffer, pos
                )
                if capture != _CAPTURE or version != 0:
                    raise DemuxError(
                        f"no Ogg page where one should start, {self._offset + pos} bytes in"
                    )
                table_end = pos + _HEADER.size + count
                if len(buffer) < table_end:
                    break
                lacing = buffer[pos + _HEADER.size : table_end]
                end = table_end + sum(lacing)
                if len(buffer) < end:
                    break
                if page_checksum(buffer[pos:end]) != crc:
                    # Any of it may be wrong, its lengths too: resume at the next capture
                    # pattern after its start (a false one fails its checksum in turn).
                    self._lost(serial, packets)
                    pos += 1
                    self._resync = True
                    continue
                self._page(flags, granule, serial, lacing, bytes(buffer[table_end:end]), packets)
                pos = end
        finally:
            del buffer[:pos]
            self._offset += pos
        return packets

    def end(self) -> list[Packet]:
        # A stream cut inside a page is not an error, as with FFmpeg: the partial page cannot
        # be decoded, everything before it has been.
        return []

    def _page(
        self,
        flags: int,
        granule: int,
        serial: int,
        lacing: bytes | bytearray,
        body: bytes,
        out: list[Packet],
    ) -> None:
        if self._serial is None:
            if not flags & _BOS:
                raise DemuxError("the Ogg stream does not start with a first page (BOS)")
            self._serial = serial
        if serial != self._serial:
            if flags & _BOS and self._ended:
                raise DemuxError("chained Ogg streams are not supported: the first one ended")
            return  # another logical stream (video, a second track): not ours
        if self._ended:
            raise DemuxError("pages after the end (EOS) of the Ogg stream")
        if not flags & _CONTINUED:
            self._partial.clear()  # a packet cut short by a lost page is dropped
            self._headless = False
        before = len(out)
        for data in self._split(lacing, body):
            self._packet(data, out)
        if flags & _EOS:
            self._ended = True
            if granule >= 0 and len(out) > before:
                # The last granule position counts the samples that are real audio: what the
                # packets decode to beyond it is padding, cut from the last packet.
                extra = self._samples - granule
                if extra > 0:
                    last = out[-1]
                    out[-1] = Packet(last.data, min(extra, packet_samples(last.data)))

    def _split(self, lacing: bytes | bytearray, body: bytes) -> list[bytes]:
        completed: list[bytes] = []
        start = pos = 0
        for size in lacing:
            pos += size
            if size < 255:
                self._partial += body[start:pos]
                if self._headless:
                    self._headless = False  # the end of a packet whose start was lost
                else:
                    completed.append(bytes(self._partial))
                self._partial.clear()
                start = pos
        self._partial += body[start:pos]
        if len(self._partial) > MAX_PACKET_BYTES:
            raise DemuxError(f"an Ogg packet longer than {MAX_PACKET_BYTES} bytes")
        return completed

    def _lost(self, serial: int, out: list[Packet]) -> None:
        """A page failed its checksum: it is dropped, up to the next page found."""
        if self._packets < 2 and self._serial in (serial, None):
            # Without the stream's headers nothing after them can be decoded.
            raise DemuxError("an Ogg page of the stream's headers failed its checksum")
        if serial != self._serial:
            return  # another logical stream's page (or ours with its serial number damaged)
        self._partial.clear()
        self._headless = True
        out.append(Packet(b"", damage="an Ogg page failed its checksum and was skipped"))

    def _packet(self, data: bytes, out: list[Packet]) -> None:
        index = self._packets
        self._packets += 1
        if index == 0:
            self.decided = True
            head = OpusHead.parse(data)
            if head is not None and head.supported:
                self.head = head
            return
        if index == 1 or self.head is None:
            return  # OpusTags, or a stream FFmpeg will decode instead
        self._samples += packet_samples(data)
        out.append(Packet(data))
