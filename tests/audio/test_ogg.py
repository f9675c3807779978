"""Our Ogg demuxer finds exactly the packets FFmpeg's does, and the same end trimming."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import DATA, encode_opus, ffmpeg_packets

from service.audio.demux import DemuxError
from service.audio.ogg import OggDemuxer
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
