"""Our Ogg demuxer finds exactly the packets FFmpeg's does, and the same end trimming."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import DATA, encode_opus, ffmpeg_packets, ogg_pages, resigned

from service.audio.demux import DemuxError
from service.audio.ogg import OggDemuxer, page_checksum
from service.audio.opus import packet_samples


def demux(data: bytes, piece: int) -> tuple[OggDemuxer, list]:
    demuxer = OggDemuxer()
    packets = []
    for i in range(0, len(data), piece):
        packets += demuxer.feed(data[i : i + piece])
    return demuxer, packets + demuxer.end()


@pytest.mark.parametrize("piece", [1, 13, 4096, 1 << 20])
def test_packets_equal_ffmpegs(piece: int) -> None:
    data = (DATA / "speech.ogg").read_bytes()
    demuxer, packets = demux(data, piece)
    assert demuxer.head is not None and demuxer.head.pre_skip == 312
    assert [p.data for p in packets] == ffmpeg_packets(data)


def test_the_final_granule_position_trims_the_last_packet() -> None:
    data = (DATA / "speech.ogg").read_bytes()
    _, packets = demux(data, 1 << 20)
    total = sum(packet_samples(p.data) for p in packets)
    # The last page's granule position: the real audio, pre-skip included.
    last_page = data.rindex(b"OggS")
    (granule,) = struct.unpack_from("<q", data, last_page + 6)
    assert [p.trim_end for p in packets[:-1]] == [0] * (len(packets) - 1)
    assert packets[-1].trim_end == total - granule > 0


def test_packets_spanning_pages_are_joined() -> None:
    # Long packets (120 ms at a high bit rate are ~1.5 KB, over a page's 255-byte segments)
    # make FFmpeg's muxer continue packets across pages.
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.5, 0.5, (2, 48000)).astype(np.float32)
    data = encode_opus(noise, "ogg")
    _, packets = demux(data, 97)
    assert [p.data for p in packets] == ffmpeg_packets(data)


def test_pages_of_another_stream_are_an_error_after_the_end() -> None:
    data = (DATA / "speech.ogg").read_bytes()
    demuxer = OggDemuxer()
    demuxer.feed(data)
    with pytest.raises(DemuxError, match="after the end"):
        demuxer.feed(data[data.index(b"OggS", 4) :])  # our stream's pages again


def test_a_stream_that_is_not_opus_is_left_to_ffmpeg() -> None:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ogg") as out:
        stream = out.add_stream("flac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.int16), format="s16")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    demuxer, packets = demux(buffer.getvalue(), 1 << 20)
    assert demuxer.decided and demuxer.head is None and packets == []


def test_bytes_that_are_not_a_page_are_an_error() -> None:
    with pytest.raises(DemuxError, match="no Ogg page"):
        OggDemuxer().feed(b"RIFF" + b"\0" * 40)


def test_page_checksums_are_ogg_crc32() -> None:
    data = (DATA / "speech.ogg").read_bytes()
    pages = ogg_pages(data)
    assert len(pages) > 5
    for start, end in pages:
        assert page_checksum(data[start:end]) == int.from_bytes(
            data[start + 22 : start + 26], "little"
        )


def _spoil(data: bytes, page: int, at: int) -> bytes:
    """One byte flipped ``at`` bytes into page ``page`` (0: the OpusHead page)."""
    start, _ = ogg_pages(data)[page]
    out = bytearray(data)
    out[start + at] ^= 0x55
    return bytes(out)


@pytest.mark.parametrize("piece", [1, 13, 4096])
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(400, id="a packet's bytes"),
        pytest.param(30, id="the page's lengths"),
    ],
)
def test_a_page_that_fails_its_checksum_is_dropped_as_ffmpeg_drops_it(
    piece: int, where: int
) -> None:
    # Before, the flipped byte went to libopus, which decodes most damaged packets into noise
    # without an error; a damaged length lost the rest of the stream ("no Ogg page where one
    # should start"). FFmpeg drops the page and reads on from the next one.
    data = _spoil((DATA / "speech.ogg").read_bytes(), 4, where)
    _, packets = demux(data, piece)
    damaged = [p for p in packets if p.damage is not None]
    assert len(damaged) == 1 and "checksum" in damaged[0].damage
    assert damaged[0].data == b""
    kept = [p.data for p in packets if p.damage is None]
    assert kept == ffmpeg_packets(data)
    assert 0 < len(kept) < len(ffmpeg_packets((DATA / "speech.ogg").read_bytes()))


def _paged(packets: list[bytes], segments_per_page: int) -> bytes:
    """speech.ogg's two header pages, then ``packets`` laid out in pages of at most that many
    segments, so that long packets continue from page to page; checksums right."""
    data = (DATA / "speech.ogg").read_bytes()
    (head_end,) = [end for _, end in ogg_pages(data)[1:2]]
    (serial,) = struct.unpack_from("<I", data, 14)
    segments: list[tuple[bytes, bool]] = []  # (segment, ends a packet)
    for packet in packets:
        for i in range(0, len(packet) + 1, 255):
            segment = packet[i : i + 255]
            segments.append((segment, len(segment) < 255))
    out, done, continued = bytearray(data[:head_end]), 0, False
    for k in range(0, len(segments), segments_per_page):
        page = segments[k : k + segments_per_page]
        done += sum(1 for _, ends in page if ends)
        flags = (1 if continued else 0) | (4 if k + segments_per_page >= len(segments) else 0)
        granule = 960 * done if any(ends for _, ends in page) else -1
        header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, 2 + k, 0, len(page))
        out += header + bytes(len(s) for s, _ in page) + b"".join(s for s, _ in page)
        continued = not page[-1][1]
    return resigned(out)


def test_the_tail_of_a_packet_whose_page_was_lost_is_dropped() -> None:
    # Long packets continue across pages: losing one page leaves the next page starting with
    # the end of a packet whose beginning is gone; it must not be taken for a packet.
    rng = np.random.default_rng(0)
    packets = [b"\xfc" + rng.bytes(600) for _ in range(12)]  # CELT 20 ms TOC, 3 segments
    data = _paged(packets, 4)
    _, clean = demux(data, 97)
    assert [p.data for p in clean] == packets == ffmpeg_packets(data)
    pages = ogg_pages(data)
    spoilt = _spoil(data, 3, 100)  # the second audio page: it ends inside a packet
    assert data[pages[4][0] + 5] & 1  # and the page after it continues that packet
    _, got = demux(spoilt, 97)
    # Packets 1 and 2 had bytes on the lost page. (FFmpeg hands on the 346-byte tail of
    # packet 2 as a packet of its own, for the decoder to reject or turn into noise.)
    assert [p.data for p in got if p.damage is None] == packets[:1] + packets[3:]
    assert sum(p.damage is not None for p in got) == 1


def test_a_damaged_header_page_is_an_error() -> None:
    data = _spoil((DATA / "speech.ogg").read_bytes(), 0, 30)
    with pytest.raises(DemuxError, match="headers failed its checksum"):
        demux(data, 4096)
