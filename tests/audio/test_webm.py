"""Our WebM demuxer finds exactly the packets FFmpeg's does, however the bytes are split."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, encode_opus, ffmpeg_packets

from service.audio.demux import DemuxError
from service.audio.webm import CLUSTER, EBML, SEGMENT, WebmDemuxer, _element_header, _unlace


def demux(data: bytes, piece: int) -> tuple[WebmDemuxer, list[bytes]]:
    demuxer = WebmDemuxer()
    packets = []
    for i in range(0, len(data), piece):
        packets += demuxer.feed(data[i : i + piece])
    packets += demuxer.end()
    return demuxer, [p.data for p in packets]


def stereo(seconds: float) -> np.ndarray:
    t = np.arange(int(48000 * seconds)) / 48000
    return np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).astype(
        np.float32
    ) * np.float32(0.3)


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_packets_equal_ffmpegs_for_a_file_with_cues(piece: int) -> None:
    data = (DATA / "speech.webm").read_bytes()
    demuxer, packets = demux(data, piece)
    assert demuxer.decided and demuxer.head is not None
    assert (demuxer.head.channels, demuxer.head.pre_skip) == (1, 312)
    assert demuxer.container == "webm"
    assert packets == ffmpeg_packets(data)


UNKNOWN_SIZE = b"\x01\xff\xff\xff\xff\xff\xff\xff"


def unknown_cluster_sizes(data: bytes) -> bytes:
    """Rewrite every cluster with an unknown size, as MediaRecorder writes them (FFmpeg's live
    mode leaves only the segment's size unknown)."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        header = _element_header(data, pos)
        assert header is not None
        element, size, length = header
        if element in (EBML, SEGMENT):
            out += data[pos : pos + length]
            pos += length
            if element == EBML:
                assert size is not None
                out += data[pos : pos + size]
                pos += size
            continue
        assert size is not None
        body = data[pos + length : pos + length + size]
        out += (
            element.to_bytes(4, "big") + UNKNOWN_SIZE
            if element == CLUSTER
            else data[pos : pos + length]
        ) + body
        pos += length + size
    return bytes(out)


@pytest.mark.parametrize("piece", [3, 500])
def test_packets_equal_ffmpegs_for_a_live_recording(piece: int) -> None:
    # Segment and clusters of unknown size, as MediaRecorder writes them.
    data = unknown_cluster_sizes(encode_opus(stereo(1.0), "webm", live=True))
    assert SEGMENT.to_bytes(4, "big") + UNKNOWN_SIZE in data
    assert data.count(CLUSTER.to_bytes(4, "big") + UNKNOWN_SIZE) >= 1
    demuxer, packets = demux(data, piece)
    assert demuxer.head is not None and demuxer.head.channels == 2
    assert packets == ffmpeg_packets(data)


def test_the_last_block_carries_its_discard_padding_as_a_trim() -> None:
    data = (DATA / "speech.webm").read_bytes()
    demuxer = WebmDemuxer()
    packets = demuxer.feed(data)
    # DiscardPadding 11,937,500 ns on the last BlockGroup: 573 samples at 48 kHz.
    assert [p.trim_end for p in packets[-2:]] == [0, 573]
    assert all(p.trim_end == 0 for p in packets[:-1])


def test_decides_at_the_first_cluster_before_any_block_arrives() -> None:
    data = (DATA / "speech.webm").read_bytes()
    cluster = data.index(b"\x1f\x43\xb6\x75")
    demuxer = WebmDemuxer()
    assert demuxer.feed(data[: cluster - 1]) == []
    assert not demuxer.decided
    demuxer.feed(data[cluster - 1 : cluster + 12])
    assert demuxer.decided and demuxer.head is not None


def test_a_codec_other_than_opus_is_left_to_ffmpeg() -> None:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
    demuxer, packets = demux(buffer.getvalue(), 1 << 20)
    assert demuxer.decided and demuxer.head is None and packets == []
    assert demuxer.container == "mkv"


def test_garbage_where_an_element_should_start_is_an_error() -> None:
    data = (DATA / "speech.webm").read_bytes()
    cluster = data.index(b"\x1f\x43\xb6\x75")
    demuxer = WebmDemuxer()
    demuxer.feed(data[: cluster + 200])
    with pytest.raises(DemuxError):
        demuxer.feed(b"\x00" * 16)


def test_not_ebml_is_an_error() -> None:
    with pytest.raises(DemuxError, match="not an EBML"):
        WebmDemuxer().feed(b"OggS" + b"\0" * 40)


@pytest.mark.parametrize(
    ("lacing", "laced", "frames"),
    [
        # Xiph: sizes 300 (255 + 45) and 2, the last one implied.
        (1, bytes([2, 255, 45, 2]) + b"a" * 300 + b"bb" + b"ccc", [b"a" * 300, b"bb", b"ccc"]),
        # Fixed: three frames of equal size.
        (2, bytes([2]) + b"xxyyzz", [b"xx", b"yy", b"zz"]),
        # EBML: first size 3 (0x83), then a signed difference of -1 (0xBE: 62 - 63), then 4.
        (3, bytes([2, 0x83, 0xBE]) + b"aaa" + b"bb" + b"cccc", [b"aaa", b"bb", b"cccc"]),
    ],
)
def test_laced_blocks_are_split_into_their_frames(
    lacing: int, laced: bytes, frames: list[bytes]
) -> None:
    assert _unlace(laced, 0, lacing) == frames


def test_lacing_that_does_not_add_up_is_rejected() -> None:
    assert _unlace(bytes([1, 200]) + b"short", 0, 1) is None
    assert _unlace(bytes([2]) + b"xxyyz", 0, 2) is None
