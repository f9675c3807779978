"""Per-session configuration: the body of ``POST /v1/sessions`` and of the WebSocket start message.

Parsing is strict (unknown fields are an error, not silently ignored) because a typo in a VAD
threshold otherwise looks like a model that does not work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from service.errors import ErrorCode, StreamerError

MODEL_SAMPLE_RATE = 16_000
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 32
INTERIM_INTERVAL_FLOOR_S = 0.25

Mode = Literal["segmented", "simple"]


@dataclass(frozen=True, slots=True)
class PcmFormat:
    """Raw interleaved little-endian PCM, as the seed's start message declares it."""

    channels: int = 1
    sample_rate: int = MODEL_SAMPLE_RATE
    bit_depth: int = 16
    is_float: bool = False

    @property
    def sample_bytes(self) -> int:
        return self.bit_depth // 8

    @property
    def frame_bytes(self) -> int:
        return self.sample_bytes * self.channels

    @property
    def encoding(self) -> str:
        return f"{'f' if self.is_float else 's'}{self.bit_depth}le"


@dataclass(frozen=True, slots=True)
class VadParams:
    """The seed's segmentation parameters (silero-rs VadConfig defaults) plus a segment cap."""

    positive_threshold: float = 0.5
    negative_threshold: float = 0.35
    pre_speech_pad_ms: int = 600
    redemption_ms: int = 600
    min_speech_ms: int = 90
    max_segment_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class SessionConfig:
    mode: Mode = "segmented"
    format: PcmFormat | None = None  # None: sniff the container
    interim_results: bool = False
    interim_interval_ms: int = 500
    vad: VadParams = field(default_factory=VadParams)
    trace_id: str | None = None
    # A cut upload does not end the session: it waits (STREAMER_RESUME_GRACE_SECONDS) for an
    # upload that continues at the byte offset received (docs/resume.md).
    resumable: bool = False

    def with_format(self, fmt: PcmFormat | None) -> SessionConfig:
        return replace(self, format=fmt)


def _fail(message: str, code: ErrorCode = ErrorCode.INVALID_CONFIG) -> StreamerError:
    return StreamerError(code, message)


def _check_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(
            f"unknown field{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(unknown)}",
            ErrorCode.UNKNOWN_FIELD,
        )


def _int(obj: Mapping[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{where}.{key} must be a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise _fail(f"{where}.{key} must be a whole number")
        value = int(value)
    if not lo <= value <= hi:
        raise _fail(f"{where}.{key} must be between {lo} and {hi}, got {value}")
    return value


def _float(
    obj: Mapping[str, Any], key: str, default: float, lo: float, hi: float, where: str
) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"{where}.{key} must be a finite number")
    if not lo <= value <= hi:
        raise _fail(f"{where}.{key} must be between {lo} and {hi}, got {value}")
    return float(value)


def _bool(obj: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{where}.{key} must be true or false")
    return value


def parse_pcm_format(obj: Any) -> PcmFormat | None:
    """``None``/``"auto"`` means sniff; an object declares raw PCM as the seed does."""
    if obj is None or obj == "auto":
        return None
    if not isinstance(obj, Mapping):
        raise _fail(
            'format must be "auto" or an object {channels, sample_rate, bit_depth, is_float}'
        )
    _check_unknown(obj, {f.name for f in fields(PcmFormat)}, "format")
    channels = _int(obj, "channels", 1, 1, MAX_CHANNELS, "format")
    sample_rate = _int(
        obj, "sample_rate", MODEL_SAMPLE_RATE, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, "format"
    )
    is_float = _bool(obj, "is_float", False, "format")
    bit_depth = _int(obj, "bit_depth", 32 if is_float else 16, 8, 64, "format")
    if (is_float and bit_depth != 32) or (not is_float and bit_depth != 16):
        raise StreamerError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"raw PCM must be 16-bit integer or 32-bit float, got bit_depth={bit_depth} "
            f"is_float={str(is_float).lower()}",
        )
    return PcmFormat(channels, sample_rate, bit_depth, is_float)


_ENCODINGS = {
    "s16le": (16, False),
    "linear16": (16, False),
    "pcm_s16le": (16, False),
    "f32le": (32, True),
    "float32": (32, True),
    "pcm_f32le": (32, True),
}


def parse_query_format(params: Mapping[str, str]) -> PcmFormat | None:
    """Deepgram-style ``?encoding=s16le&sample_rate=8000&channels=2`` on the upload URL."""
    if "encoding" not in params:
        if "sample_rate" in params or "channels" in params:
            raise _fail("sample_rate and channels need encoding=s16le or encoding=f32le")
        return None
    encoding = params["encoding"].lower()
    if encoding == "auto":
        return None
    if encoding not in _ENCODINGS:
        raise StreamerError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"encoding must be s16le, f32le or auto, got {params['encoding']!r}",
        )
    bit_depth, is_float = _ENCODINGS[encoding]
    raw: dict[str, Any] = {"bit_depth": bit_depth, "is_float": is_float}
    for key in ("sample_rate", "channels"):
        if key in params:
            try:
                raw[key] = int(params[key])
            except ValueError:
                raise _fail(f"{key} must be a whole number, got {params[key]!r}") from None
    return parse_pcm_format(raw)


def parse_vad(obj: Any) -> VadParams:
    if obj is None:
        return VadParams()
    if not isinstance(obj, Mapping):
        raise _fail("vad must be an object")
    _check_unknown(obj, {f.name for f in fields(VadParams)}, "vad")
    d = VadParams()
    params = VadParams(
        positive_threshold=_float(obj, "positive_threshold", d.positive_threshold, 0.0, 1.0, "vad"),
        negative_threshold=_float(obj, "negative_threshold", d.negative_threshold, 0.0, 1.0, "vad"),
        pre_speech_pad_ms=_int(obj, "pre_speech_pad_ms", d.pre_speech_pad_ms, 0, 5_000, "vad"),
        redemption_ms=_int(obj, "redemption_ms", d.redemption_ms, 0, 10_000, "vad"),
        min_speech_ms=_int(obj, "min_speech_ms", d.min_speech_ms, 0, 10_000, "vad"),
        max_segment_ms=_int(obj, "max_segment_ms", d.max_segment_ms, 1_000, 600_000, "vad"),
    )
    if params.negative_threshold > params.positive_threshold:
        raise _fail("vad.negative_threshold must not exceed vad.positive_threshold")
    return params


CONFIG_FIELDS = {f.name for f in fields(SessionConfig)}


def parse_session_config(obj: Any, *, extra_allowed: frozenset[str] = frozenset()) -> SessionConfig:
    """Validate a decoded JSON object into a :class:`SessionConfig`.

    ``extra_allowed`` lets the WebSocket start message carry its ``request`` key.
    """
    if obj is None:
        return SessionConfig()
    if not isinstance(obj, Mapping):
        raise _fail("session config must be a JSON object")
    _check_unknown(obj, CONFIG_FIELDS | extra_allowed, "config")
    mode = obj.get("mode", "segmented")
    if mode not in ("segmented", "simple"):
        raise _fail(f'mode must be "segmented" or "simple", got {mode!r}')
    trace_id = obj.get("trace_id")
    if trace_id is not None and not isinstance(trace_id, str):
        raise _fail("trace_id must be a string (a W3C traceparent)")
    return SessionConfig(
        mode=mode,
        format=parse_pcm_format(obj.get("format")),
        interim_results=_bool(obj, "interim_results", False, "config"),
        interim_interval_ms=_int(
            obj, "interim_interval_ms", 500, int(INTERIM_INTERVAL_FLOOR_S * 1000), 60_000, "config"
        ),
        vad=parse_vad(obj.get("vad")),
        trace_id=trace_id,
        resumable=_bool(obj, "resumable", False, "config"),
    )


def config_to_dict(config: SessionConfig) -> dict[str, Any]:
    fmt = config.format
    return {
        "mode": config.mode,
        "format": "auto"
        if fmt is None
        else {
            "channels": fmt.channels,
            "sample_rate": fmt.sample_rate,
            "bit_depth": fmt.bit_depth,
            "is_float": fmt.is_float,
        },
        "interim_results": config.interim_results,
        "interim_interval_ms": config.interim_interval_ms,
        "vad": {f.name: getattr(config.vad, f.name) for f in fields(VadParams)},
        "trace_id": config.trace_id,
        "resumable": config.resumable,
    }
