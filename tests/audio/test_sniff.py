"""Format recognition from the first bytes."""

from __future__ import annotations

import struct

import pytest

from service.audio.sniff import FORMAT_PROBE_BYTES, Kind, sniff
from service.audio.source import ByteSource, Head


async def sniffed(upload: bytes, piece: int = 5):
    async def source():
        for i in range(0, len(upload), piece):
            yield upload[i : i + piece]

    head = Head(ByteSource(source()))
    result = await sniff(head)
    assert head.pos == 0  # sniffing consumes nothing: every byte is replayed
    return result


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "kind", "demuxer"),
    [
        ("speech.wav", Kind.WAV, "wav"),
        ("speech.ogg", Kind.FFMPEG, "ogg"),
        ("speech.webm", Kind.FFMPEG, "matroska"),
        ("speech.flac", Kind.FFMPEG, "flac"),
        ("speech.m4a", Kind.FFMPEG, "mov"),
        ("speech_moov_end.m4a", Kind.MP4_MOOV_AT_END, "mov"),
        ("video_only.mp4", Kind.MP4_MOOV_AT_END, "mov"),
        ("speech.mp3", Kind.FFMPEG, None),
    ],
)
async def test_test_files(name, kind, demuxer, data) -> None:
    result = await sniffed(data(name))
    assert (result.kind, result.demuxer) == (kind, demuxer)


def box(kind: bytes, size: int, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, kind, size)
    return struct.pack(">I4s", size, kind)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("boxes", "kind"),
    [
        (box(b"ftyp", 16) + bytes(8) + box(b"free", 8) + box(b"moov", 100), Kind.FFMPEG),
        (box(b"ftyp", 16) + bytes(8) + box(b"moof", 100), Kind.FFMPEG),
        (box(b"ftyp", 16) + bytes(8) + box(b"wide", 8) + box(b"mdat", 100), Kind.MP4_MOOV_AT_END),
        (
            box(b"ftyp", 16)
            + bytes(8)
            + box(b"free", 24, large=True)
            + bytes(8)
            + box(b"mdat", 100),
            Kind.MP4_MOOV_AT_END,
        ),
        (box(b"ftyp", 16) + bytes(8), Kind.FFMPEG),  # ends early: FFmpeg reports it
    ],
    ids=["moov-first", "fragmented", "mdat-first", "largesize", "cut"],
)
async def test_mp4_box_walk(boxes, kind) -> None:
    assert (await sniffed(boxes + bytes(64))).kind is kind


@pytest.mark.anyio
async def test_id3_tag_widens_the_probe() -> None:
    size = 40_000
    syncsafe = bytes((size >> s) & 0x7F for s in (21, 14, 7, 0))
    result = await sniffed(b"ID3\x04\x00\x00" + syncsafe + bytes(100))
    assert result.demuxer is None
    assert result.probe_bytes == FORMAT_PROBE_BYTES + size + 10


def id3_padding_tag(body: int) -> bytes:
    """An ID3v2.4 tag of nothing but padding (zeros): stands in for one with cover art."""
    return b"ID3\x04\x00\x00" + bytes((body >> s) & 0x7F for s in (21, 14, 7, 0)) + bytes(body)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["speech.mp3", "speech.flac"])
async def test_audio_behind_a_large_id3_tag(name, data, decode_bytes) -> None:
    """Cover art makes ID3 tags far larger than the format probe; FFmpeg must still find the
    stream behind it (MP3 copes anyway; FLAC, ADTS AAC and others need the wider probe)."""
    raw = data(name)
    own = 10 + sum(b << (7 * (3 - i)) for i, b in enumerate(raw[6:10])) if raw[:3] == b"ID3" else 0
    out = await decode_bytes(id3_padding_tag(60_000) + raw[own:])
    plain = await decode_bytes(raw)
    assert out.error is None
    assert out.result is not None and out.result.container == name.split(".")[1]
    assert out.frames == plain.frames
