"""libopus straight to 16 kHz: the same audio as FFmpeg's decoder plus its resampler."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from conftest import DATA, SPEECH_SAMPLES, encode_opus, resigned

from service.audio.ogg import OggDemuxer
from service.audio.opus import OpusDecoder, OpusError, OpusHead, available, packet_samples
from service.audio.resample import FrameResampler

pytestmark = pytest.mark.skipif(not available(), reason="libopus not found")


def ffmpeg_decode(data: bytes) -> np.ndarray:
    resampler = FrameResampler()
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            resampler.push(frame)
    return np.concatenate(resampler.pull() + resampler.flush(), axis=1)


def ours(data: bytes) -> np.ndarray:
    demuxer = OggDemuxer()
    packets = demuxer.feed(data)
    assert demuxer.head is not None
    decoder = OpusDecoder(demuxer.head)
    return np.concatenate([decoder.decode(p.data, p.trim_end) for p in packets], axis=1)


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    error = reference - other
    return float(10 * np.log10(np.sum(reference**2) / np.sum(error**2)))


def test_speech_decodes_to_ffmpegs_samples_aligned_and_as_many() -> None:
    data = (DATA / "speech.ogg").read_bytes()
    reference, decoded = ffmpeg_decode(data), ours(data)
    # Pre-skip and end trimming as FFmpeg applies them: not one sample more or less, and no
    # shift (a missed pre-skip would shift everything by 104 samples, SNR below 0 dB).
    assert decoded.shape == reference.shape == (1, SPEECH_SAMPLES)
    assert snr_db(reference, decoded) > 35  # two decoders, two resamplers: ~43 dB measured


def test_stereo_keeps_its_channels_apart() -> None:
    t = np.arange(48000) / 48000
    left, right = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 1000 * t)
    data = encode_opus(np.stack([left, right]).astype(np.float32) * 0.3, "ogg")
    reference, decoded = ffmpeg_decode(data), ours(data)
    assert decoded.shape == reference.shape and decoded.shape[0] == 2
    for ch in range(2):
        assert snr_db(reference[ch], decoded[ch]) > 25


def test_output_gain_from_the_header_is_applied() -> None:
    data = (DATA / "speech.ogg").read_bytes()
    plain = ours(data)
    head_at = data.index(b"OpusHead")
    boosted = bytearray(data)
    boosted[head_at + 16 : head_at + 18] = (6 * 256).to_bytes(2, "little", signed=True)  # +6 dB
    louder = ours(resigned(boosted))  # a header page with a wrong checksum is refused
    ratio = np.sqrt(np.sum(louder**2) / np.sum(plain**2))
    assert ratio == pytest.approx(10 ** (6 / 20), rel=0.01)


def test_a_damaged_packet_is_rejected_and_decoding_goes_on() -> None:
    data = (DATA / "speech.ogg").read_bytes()
    demuxer = OggDemuxer()
    packets = demuxer.feed(data)
    assert demuxer.head is not None
    decoder = OpusDecoder(demuxer.head)
    with pytest.raises(OpusError):
        decoder.decode(b"\xff\xff")  # code 3 with a frame count of 63: too long
    assert decoder.decode(packets[0].data).shape[1] > 0


def test_packet_samples_reads_the_toc() -> None:
    assert packet_samples(b"") == 0
    assert packet_samples(bytes([0xFC])) == 960  # CELT 20 ms, one frame
    assert packet_samples(bytes([0xFD])) == 1920  # two frames
    assert packet_samples(bytes([0x03, 0x03])) == 1440  # SILK 10 ms, code 3, three frames


def test_layouts_beyond_stereo_are_declined() -> None:
    head = b"OpusHead" + bytes([1, 6]) + (312).to_bytes(2, "little") + b"\0" * 7 + bytes([1])
    parsed = OpusHead.parse(head + b"\0" * 8)
    assert parsed is not None and not parsed.supported
    with pytest.raises(ValueError):
        OpusDecoder(parsed)


@pytest.mark.parametrize("name", ["speech.ogg", "speech.webm", "stereo.ogg", "stereo.webm"])
def test_merged_runs_decode_to_exactly_the_samples_of_packet_by_packet(name: str) -> None:
    """decode_run hands libopus up to 120 ms of packets merged into one: it must give the very
    samples (not just close ones) of decoding them one at a time, pre-skip included."""
    from service.audio.webm import WebmDemuxer

    if name.startswith("stereo"):
        t = np.arange(3 * 48000) / 48000
        tones = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 1000 * t)])
        data = encode_opus(tones.astype(np.float32) * 0.3, name.split(".")[1])
    else:
        data = (DATA / name).read_bytes()
    demuxer = OggDemuxer() if name.endswith(".ogg") else WebmDemuxer()
    packets = demuxer.feed(data) + demuxer.end()
    assert demuxer.head is not None
    one, merged = OpusDecoder(demuxer.head), OpusDecoder(demuxer.head)
    expected = np.concatenate([one.decode(p.data, p.trim_end) for p in packets], axis=1)
    parts, i, runs = [], 0, 0
    while i < len(packets):
        untrimmed = [p.data for p in packets[i : i + 6] if p.trim_end == 0]
        run = merged.decode_run(untrimmed) if len(untrimmed) == min(6, len(packets) - i) else None
        if run is not None:
            parts.append(run[0])
            i += run[1]
            runs += 1
        else:
            parts.append(merged.decode(packets[i].data, packets[i].trim_end))
            i += 1
    assert runs > len(packets) // 7  # six 20 ms packets per run, nearly throughout
    assert np.array_equal(np.concatenate(parts, axis=1), expected)


def test_a_run_stops_at_a_packet_that_does_not_merge() -> None:
    demuxer = OggDemuxer()
    packets = [p.data for p in demuxer.feed((DATA / "speech.ogg").read_bytes())]
    assert demuxer.head is not None
    decoder = OpusDecoder(demuxer.head)
    run = decoder.decode_run([packets[0], packets[1], b"\xff\xff", packets[2]])
    assert run is not None and run[1] == 2  # the damaged one is left for decode() to report
    assert decoder.decode_run([b"\xff\xff", packets[3]]) is None
