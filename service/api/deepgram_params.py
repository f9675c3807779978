"""The query parameters of Deepgram's live endpoint (``/v1/listen``), as a session config and the
options of the translation. No I/O.

Like Deepgram, parameters this server has no use for (``model``, ``language``, ``punctuate``,
``smart_format``, ``diarize``, ``keyterm``, ``tag``, ...) and unknown ones are accepted and
ignored: a client written for Deepgram sends many. A value this server cannot honour (an
encoding it does not decode, a malformed number) refuses the handshake with HTTP 400, as
Deepgram does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from service.config import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    PcmFormat,
    SessionConfig,
    VadParams,
)
from service.errors import ErrorCode, StreamerError

# Deepgram's raw encodings, by the bytes per sample they take. The transport converts the ones
# the decoder does not read itself (linear32, mulaw, alaw) to 16-bit or float PCM.
RAW_ENCODINGS = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}
# Encodings that come in a container (Ogg, WebM, FLAC): the decoder sniffs it, as with no
# encoding at all.
CONTAINER_ENCODINGS = frozenset({"flac", "opus", "ogg-opus"})
# Named by Deepgram, not decoded here.
UNSUPPORTED_ENCODINGS = frozenset({"amr-nb", "amr-wb", "speex", "g729"})
MAX_ENDPOINTING_MS = 10_000


@dataclass(frozen=True, slots=True)
class RawAudio:
    """Raw PCM as the client declares it (``encoding``, ``sample_rate``, ``channels``)."""

    encoding: str
    sample_rate: int
    channels: int
    mixdown: bool  # several channels without multichannel: averaged to one, as Deepgram does

    @property
    def frame_bytes(self) -> int:
        return RAW_ENCODINGS[self.encoding] * self.channels

    @property
    def session_format(self) -> PcmFormat:
        """What the session decodes: what the transport writes after converting."""
        channels = 1 if self.mixdown else self.channels
        if self.encoding == "linear32":
            return PcmFormat(channels, self.sample_rate, 32, is_float=True)
        return PcmFormat(channels, self.sample_rate, 16, is_float=False)


@dataclass(frozen=True, slots=True)
class ListenOptions:
    config: SessionConfig
    raw: RawAudio | None  # None: a container, sniffed
    multichannel: bool
    interim_results: bool
    endpointing: bool  # false: no result is speech_final
    utterance_end: bool  # utterance_end_ms given: UtteranceEnd after each utterance
    vad_events: bool  # SpeechStarted


def _bad(message: str, code: ErrorCode = ErrorCode.INVALID_CONFIG) -> StreamerError:
    return StreamerError(code, message)


def _bool(params: Mapping[str, str], key: str) -> bool:
    value = params.get(key, "false").strip().lower()
    if value not in ("true", "false"):
        raise _bad(f"{key} must be true or false, got {params[key]!r}")
    return value == "true"


def _int(params: Mapping[str, str], key: str, lo: int, hi: int) -> int:
    try:
        value = int(params[key])
    except ValueError:
        raise _bad(f"{key} must be a whole number, got {params[key]!r}") from None
    if not lo <= value <= hi:
        raise _bad(f"{key} must be between {lo} and {hi}, got {value}")
    return value


def _raw_audio(params: Mapping[str, str], multichannel: bool) -> RawAudio | None:
    encoding = params.get("encoding", "").strip().lower()
    if not encoding or encoding in CONTAINER_ENCODINGS:
        return None
    if encoding in UNSUPPORTED_ENCODINGS or encoding not in RAW_ENCODINGS:
        supported = ", ".join([*RAW_ENCODINGS, *sorted(CONTAINER_ENCODINGS)])
        raise _bad(
            f"encoding {params['encoding']!r} is not supported here ({supported}, "
            "or none for a container)",
            ErrorCode.UNSUPPORTED_FORMAT,
        )
    if "sample_rate" not in params:
        raise _bad(f"encoding={encoding} needs sample_rate")
    rate = _int(params, "sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    channels = _int(params, "channels", 1, MAX_CHANNELS) if "channels" in params else 1
    return RawAudio(encoding, rate, channels, mixdown=channels > 1 and not multichannel)


def parse_listen_params(params: Mapping[str, str]) -> ListenOptions:
    """Raises :class:`StreamerError` for a value this server cannot honour."""
    multichannel = _bool(params, "multichannel")
    raw = _raw_audio(params, multichannel)
    interim = _bool(params, "interim_results")
    vad = VadParams()
    endpointing = True
    value = params.get("endpointing", "").strip().lower()
    if value == "false":
        endpointing = False
    elif value not in ("", "true"):
        # The silence that ends an utterance: the VAD's redemption time.
        vad = replace(vad, redemption_ms=_int(params, "endpointing", 0, MAX_ENDPOINTING_MS))
    utterance_end = "utterance_end_ms" in params
    if utterance_end:
        _int(params, "utterance_end_ms", 0, 60_000)  # validated; the VAD decides the end
    config = SessionConfig(
        mode="segmented",
        format=raw.session_format if raw is not None else None,
        interim_results=interim,
        vad=vad,
    )
    return ListenOptions(
        config=config,
        raw=raw,
        multichannel=multichannel,
        interim_results=interim,
        endpointing=endpointing,
        utterance_end=utterance_end,
        vad_events=_bool(params, "vad_events"),
    )
