"""Ogg, read incrementally: the Opus packets of the first logical stream (RFC 3533, RFC 7845).

An Ogg stream is a run of pages: a 27-byte header, a table of segment lengths, the segments. A
packet is a run of segments ending in one shorter than 255 bytes, and may continue on the next
page. The first page of each logical stream (BOS) comes before any other page, and the first
packet of an Opus stream is its OpusHead, the second its tags.

FFmpeg's Ogg demuxer remains the fallback when the first stream is not Opus or uses a layout
beyond stereo. Page checksums are not verified (a Python CRC per byte would cost more than the
decoding); a damaged packet is caught by libopus instead, and a damaged page structure here.
"""

from __future__ import annotations

import struct

from service.audio.demux import DemuxError, Packet
from service.audio.opus import OpusHead, packet_samples

_HEADER = struct.Struct("<4sBBqIIIB")
_CONTINUED, _BOS, _EOS = 1, 2, 4
# A packet this long is not Opus (a 120 ms packet is under 8 KB): the stream is damaged.
MAX_PACKET_BYTES = 1 << 20


class OggDemuxer:
    """See :class:`service.audio.demux.Demuxer`."""

    def __init__(self) -> None:
        self.container = "ogg"
        self.decided = False
        self.head: OpusHead | None = None
        self._buffer = bytearray()
        self._serial: int | None = None
        self._partial = bytearray()  # a packet continuing on the next page
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
            while len(buffer) - pos >= _HEADER.size:
                capture, version, flags, granule, serial, _seq, _crc, count = _HEADER.unpack_from(
                    buffer, pos
                )
                if capture != b"OggS" or version != 0:
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
                completed.append(bytes(self._partial))
                self._partial.clear()
                start = pos
        self._partial += body[start:pos]
        if len(self._partial) > MAX_PACKET_BYTES:
            raise DemuxError(f"an Ogg packet longer than {MAX_PACKET_BYTES} bytes")
        return completed

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
