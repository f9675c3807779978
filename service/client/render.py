"""Events as readable lines or JSON lines on stdout; notes and the progress bar on stderr.

Readable lines, one per event::

    active 0.37s ch0
    inactive 1.82s ch0
      0.37s- 1.82s  ch0  final  count=23232
      0.37s- 1.82s  ch0  final  Hello, how are you?        (a model with text)
    error model_failed: unexpected inference failure  1.20s- 2.31s ch0
    end completed  7.52s audio  3 segments  0 errors  wav/pcm_s16le
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from typing import Any, TextIO

from service.client.pacing import Timing

_SEGMENT_KEYS = {"type", "start_time", "end_time", "is_final", "channel"}
_TEXT_KEYS = {"text", "words", "language"}
PROGRESS_MIN_SECONDS = 10.0  # shown by default from this much audio (paced) ...
PROGRESS_MIN_BYTES = 2 * 1024 * 1024  # ... or this big a file
PROGRESS_INTERVAL_S = 0.1


def _channel(event: Mapping[str, Any]) -> str:
    ch = event.get("channel")
    return "" if ch is None else f" ch{ch}"


def _span(event: Mapping[str, Any]) -> str:
    return f"{event['start_time']:6.2f}s-{event['end_time']:5.2f}s"


def format_event(event: Mapping[str, Any]) -> str:
    kind = event.get("type")
    try:
        if kind in ("active", "inactive"):
            return f"{kind} {event['time']:.2f}s{_channel(event)}"
        if kind == "segment":
            text = event.get("text")
            # A model with text (Whisper): the text is the line; its words and language are in
            # --json. Anything else the model returns is shown as key=value, as for the dummy.
            hidden = _SEGMENT_KEYS | _TEXT_KEYS if isinstance(text, str) else _SEGMENT_KEYS
            extra = "  ".join(
                f"{k}={json.dumps(v, ensure_ascii=False)}"
                for k, v in event.items()
                if k not in hidden
            )
            state = "final" if event.get("is_final") else "interim"
            line = f"{_span(event)}  ch{event.get('channel')}  {state}"
            if isinstance(text, str):
                line = f"{line}  {text}" if text else f"{line}  (no words)"
            return f"{line}  {extra}" if extra else line
        if kind == "error":
            line = f"error {event['code']}: {event['message']}"
            if "start_time" in event:
                line += f"  {_span(event)}"
            return line + _channel(event)
        if kind == "lagging":
            seconds = float(event["seconds"])
            if seconds <= 0:
                return "lagging 0s: results on time again"
            return f"lagging {seconds:.1f}s: results are late (the model is behind)"
        if kind == "end":
            parts = [f"end {event['reason']}"]
            if "audio_seconds" in event:
                parts.append(f"{event['audio_seconds']:.2f}s audio")
            if "segments" in event:
                parts.append(f"{event['segments']} segments")
            if "errors" in event:
                parts.append(f"{event['errors']} errors")
            if event.get("container"):
                parts.append(f"{event['container']}/{event.get('codec')}")
            return "  ".join(parts)
    except (KeyError, TypeError, ValueError):
        pass  # an event of an unexpected shape is still shown, as JSON
    return f"{kind} {json.dumps(event, ensure_ascii=False)}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressBar:
    """One self-redrawing line on stderr: ``[=====>    ]  45%  3.4/7.5 s  108.0 KiB``."""

    def __init__(self, err: TextIO, total: int | None, timing: Timing | None) -> None:
        self._err = err
        self._total = total
        self._timing = timing
        self._sent = 0
        self._last_draw = 0.0
        self._shown = False

    def update(self, sent: int) -> None:
        self._sent = sent
        now = time.monotonic()
        if now - self._last_draw >= PROGRESS_INTERVAL_S or sent == self._total:
            self._last_draw = now
            self.draw()

    def line(self, width: int) -> str:
        parts = []
        if self._timing is not None:
            seconds = self._timing.seconds_at(self._sent)
            total_s = self._timing.duration
            parts.append(f"{seconds:.1f}/{total_s:.1f} s" if total_s else f"{seconds:.1f} s")
        parts.append(_human_bytes(self._sent))
        tail = "  ".join(parts)
        if not self._total:
            return f"sent {tail}"
        fraction = min(1.0, self._sent / self._total)
        bar_width = max(10, width - len(tail) - 10)
        filled = int(bar_width * fraction)
        arrow = ">" if filled < bar_width else ""
        bar = ("=" * filled + arrow).ljust(bar_width)
        return f"[{bar}] {fraction:4.0%}  {tail}"

    def draw(self) -> None:
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self._err.write("\r" + self.line(width)[:width] + "\x1b[K")
        self._err.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._err.write("\r\x1b[K")
            self._err.flush()
            self._shown = False


class Renderer:
    def __init__(self, out: TextIO, err: TextIO, json_lines: bool, quiet: bool = False) -> None:
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.quiet = quiet
        self.progress: ProgressBar | None = None

    def note(self, message: str) -> None:
        """Information for a person, on stderr (stdout carries only events)."""
        if not self.quiet:
            self._stderr(message)

    def problem(self, message: str) -> None:
        self._stderr(f"streamer-client: {message}")

    def _stderr(self, message: str) -> None:
        if self.progress is not None:
            self.progress.clear()
        print(message, file=self.err, flush=True)
        if self.progress is not None:
            self.progress.draw()

    def event(self, event: Mapping[str, Any]) -> None:
        if self.progress is not None:
            self.progress.clear()
        if self.json_lines:
            line = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        else:
            line = format_event(event)
        print(line, file=self.out, flush=True)
        if self.progress is not None:
            self.progress.draw()

    def sent(self, offset: int) -> None:
        if self.progress is not None:
            self.progress.update(offset)

    def upload_done(self) -> None:
        if self.progress is not None:
            self.progress.clear()
            self.progress = None
