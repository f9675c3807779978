"""What our own demuxers (:mod:`service.audio.webm`, :mod:`service.audio.ogg`) hand to the
Opus decoder, and what they promise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.audio.opus import OpusHead


@dataclass(frozen=True, slots=True)
class Packet:
    """One Opus packet; ``trim_end`` samples (at 48 kHz) of its decoded audio are padding that
    the container says to drop (Matroska's DiscardPadding, Ogg's final granule position).

    With ``damage``, no packet but the place of what the container lost there (an Ogg page that
    failed its checksum): the decoder counts it as a packet that failed to decode."""

    data: bytes
    trim_end: int = 0
    damage: str | None = None


class DemuxError(Exception):
    """The container is damaged; the message says how (audio before it is still decoded)."""


class Demuxer(Protocol):
    """Bytes in as they arrive, packets of the first audio track out.

    Until :attr:`decided` the demuxer is still reading headers; then :attr:`head` is the Opus
    header if the first audio track is Opus that :class:`service.audio.opus.OpusDecoder`
    decodes, and None if FFmpeg must take the upload instead (another codec, no audio, a
    layout we do not handle). ``feed`` raises :class:`DemuxError` for damaged input.
    """

    container: str
    decided: bool
    head: OpusHead | None

    def feed(self, data: bytes) -> list[Packet]: ...

    def end(self) -> list[Packet]:
        """The input is complete: any packets still held back."""
        ...
