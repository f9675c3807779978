"""``streamer-client``: stream an audio file or stdin to a streamer session and print its events
as they arrive.

Exit status: 0 the session completed cleanly; 1 it reported errors or ended for another reason
than ``completed``; 2 bad usage, no connection, or a refused request; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from service.client.options import ClientFailure, Options, RawFormat, Transport
from service.client.render import Renderer
from service.client.run import stream

DEFAULT_URL = "http://127.0.0.1:8000"
MIN_CHUNK_MS, MAX_CHUNK_MS = 10, 2000

EXAMPLES = """\
examples:
  streamer-client speech.wav                        # HTTP/1.1 chunked upload, SSE events
  streamer-client --http2 --real-time speech.webm   # h2c, paced like a live recording
  streamer-client --ws --json speech.mp3            # WebSocket, events as JSON lines
  arecord -f S16_LE -r 16000 | streamer-client --raw s16le --sample-rate 16000 -
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamer-client",
        description="Stream an audio file or stdin to a streamer session and print its events "
        "as they arrive.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="FILE", help="the audio: a file, or - for stdin")

    conn = p.add_argument_group("connection")
    conn.add_argument(
        "--url",
        default=os.environ.get("STREAMER_URL") or DEFAULT_URL,
        help=f"the service (env STREAMER_URL, default {DEFAULT_URL})",
    )
    conn.add_argument(
        "--api-key",
        default=os.environ.get("STREAMER_API_KEY") or None,
        metavar="KEY",
        help="sent as Authorization: Bearer (env STREAMER_API_KEY)",
    )
    how = conn.add_mutually_exclusive_group()
    how.add_argument(
        "--http2", action="store_true", help="HTTP/2 with prior knowledge (h2c) instead of 1.1"
    )
    how.add_argument("--ws", action="store_true", help="the WebSocket endpoint /v1/ws")
    conn.add_argument(
        "--retry",
        type=int,
        default=0,
        metavar="N",
        help="when the server turns the session away for now (full, overloaded: HTTP 503, "
        "WebSocket 1013), ask again up to N times, after its Retry-After (default 0)",
    )
    conn.add_argument(
        "--retry-delay",
        type=float,
        metavar="S",
        help="with --retry: wait S seconds between tries instead of the server's Retry-After",
    )

    send = p.add_argument_group("sending")
    send.add_argument(
        "--real-time",
        action="store_true",
        help="send at the audio's own pace, as a live recording would (default: as fast as "
        "possible)",
    )
    send.add_argument(
        "--resume",
        action="store_true",
        help="create the session resumable; when the upload's connection is cut, continue it "
        "where the server's bytes end, and reconnect the events after the last one seen",
    )
    send.add_argument(
        "--chunk-ms",
        type=int,
        default=100,
        metavar="MS",
        help="audio per piece when pacing at real time (default 100)",
    )

    audio = p.add_argument_group("raw PCM (default: the server sniffs the container)")
    audio.add_argument("--raw", choices=["s16le", "f32le"], help="the input is headerless PCM")
    audio.add_argument("--sample-rate", type=int, metavar="HZ", help="with --raw (default 16000)")
    audio.add_argument("--channels", type=int, metavar="N", help="with --raw (default 1)")

    session = p.add_argument_group("session config")
    session.add_argument(
        "--config",
        metavar="JSON",
        help="the session config as JSON, or @FILE; the options below override its fields",
    )
    session.add_argument("--mode", choices=["segmented", "simple"])
    session.add_argument("--interim", action="store_true", help="interim results while speaking")

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="events as JSON lines")
    bar = out.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show the upload progress bar on stderr (default: on a terminal, for long inputs)",
    )
    bar.add_argument("--no-progress", action="store_false", dest="progress")
    out.add_argument("-q", "--quiet", action="store_true", help="no notes on stderr")
    return p


def _load_config(p: argparse.ArgumentParser, text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            p.error(f"--config {text}: {exc.strerror or exc}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        p.error(f"--config is not valid JSON: {exc}")
    if not isinstance(config, dict):
        p.error("--config must be a JSON object")
    return config


def _raw_from_config(fmt: Any) -> RawFormat | None:
    """Pacing needs the byte rate of raw PCM declared inside ``--config`` too."""
    if not isinstance(fmt, dict):
        return None
    try:
        is_float = bool(fmt.get("is_float", False))
        return RawFormat(
            "f32le" if is_float else "s16le",
            int(fmt.get("sample_rate", 16000)),
            int(fmt.get("channels", 1)),
        )
    except (TypeError, ValueError):
        return None  # the server will say what is wrong with it


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = build_parser()
    args = p.parse_args(argv)
    config = _load_config(p, args.config)
    if args.mode is not None:
        config["mode"] = args.mode
    if args.interim:
        config["interim_results"] = True
    if args.resume:
        config["resumable"] = True

    raw: RawFormat | None = None
    if args.raw is not None:
        rate = 16000 if args.sample_rate is None else args.sample_rate
        channels = 1 if args.channels is None else args.channels
        if rate <= 0 or channels <= 0:
            p.error("--sample-rate and --channels must be positive")
        raw = RawFormat(args.raw, rate, channels)
        config["format"] = raw.to_config()
    elif args.sample_rate is not None or args.channels is not None:
        p.error("--sample-rate and --channels describe raw PCM: add --raw s16le or --raw f32le")
    else:
        raw = _raw_from_config(config.get("format"))

    if not MIN_CHUNK_MS <= args.chunk_ms <= MAX_CHUNK_MS:
        p.error(f"--chunk-ms must be between {MIN_CHUNK_MS} and {MAX_CHUNK_MS}")
    if args.retry < 0 or (args.retry_delay is not None and args.retry_delay < 0):
        p.error("--retry and --retry-delay must not be negative")
    if not args.url.startswith(("http://", "https://")):
        p.error(f"--url must start with http:// or https://, got {args.url!r}")

    transport: Transport = "ws" if args.ws else "http2" if args.http2 else "http1"
    return Options(
        input=args.input,
        url=args.url,
        transport=transport,
        config=config,
        raw=raw,
        api_key=args.api_key,
        real_time=args.real_time,
        chunk_ms=args.chunk_ms,
        json_lines=args.json,
        progress=args.progress,
        quiet=args.quiet,
        retries=args.retry,
        retry_delay_s=args.retry_delay,
        resume=args.resume,
    )


def run(argv: Sequence[str] | None = None) -> int:
    """The exit status of one run (``main`` exits with it)."""
    opts = parse_args(argv)
    renderer = Renderer(sys.stdout, sys.stderr, opts.json_lines, opts.quiet)
    try:
        outcome = anyio.run(stream, opts, renderer)
    except ClientFailure as exc:
        renderer.problem(str(exc))
        return 2
    except KeyboardInterrupt:
        renderer.problem("interrupted")
        return 130
    if outcome.end is None and outcome.failure:
        renderer.problem(outcome.failure)
    return outcome.exit_code


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except BrokenPipeError:
        # stdout went away (``| head``): stop quietly, without a second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)
