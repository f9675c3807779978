"""One run of the client: open the input, work out its pacing, stream it over the chosen
transport, and report what the session said."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TextIO

from service.client.http import run_http
from service.client.options import Options, Outcome
from service.client.pacing import (
    Pacer,
    Timing,
    chunk_size,
    chunks,
    parse_wav_header,
    probe_timing,
    raw_timing,
    wav_timing,
)
from service.client.render import (
    PROGRESS_MIN_BYTES,
    PROGRESS_MIN_SECONDS,
    ProgressBar,
    Renderer,
)
from service.client.source import Source
from service.client.ws import run_ws


async def _timing(opts: Options, source: Source, renderer: Renderer) -> Timing | None:
    if opts.real_time:
        timing = await probe_timing(source, opts.raw)
        if timing is None:
            renderer.problem("cannot tell the audio's duration; sending as fast as possible")
        else:
            renderer.note(
                f"pacing at real time ({timing.basis}, {timing.bytes_per_second:.0f} B/s)"
            )
        return timing
    # Unpaced, timing only labels the progress bar: never wait on a live pipe for it.
    if opts.raw is not None:
        return raw_timing(opts.raw, source.size)
    if source.size is not None:
        header = parse_wav_header(await source.peek(4096))
        return wav_timing(header, source.size) if header else None
    return None


def _wants_progress(opts: Options, source: Source, timing: Timing | None, err: TextIO) -> bool:
    if opts.progress is not None:
        return opts.progress
    if not err.isatty():
        return False
    long_audio = opts.real_time and (
        timing is not None and (timing.duration or 0) >= PROGRESS_MIN_SECONDS
    )
    return long_audio or (source.size or 0) >= PROGRESS_MIN_BYTES


async def _then(audio: AsyncIterator[bytes], done: Callable[[], None]) -> AsyncIterator[bytes]:
    async for chunk in audio:
        yield chunk
    done()


async def stream(opts: Options, renderer: Renderer) -> Outcome:
    source = await Source.open(opts.input)
    try:
        timing = await _timing(opts, source, renderer)
        if _wants_progress(opts, source, timing, renderer.err):
            renderer.progress = ProgressBar(renderer.err, source.size, timing)
        paced = opts.real_time and timing is not None
        pacer = Pacer(timing) if paced and timing is not None else None
        size = chunk_size(timing, opts.chunk_ms, paced)
        frame = opts.raw.frame_bytes if opts.raw is not None else 1
        audio = _then(chunks(source, size, pacer, renderer.sent, frame), renderer.upload_done)
        outcome = Outcome()
        if opts.transport == "ws":
            await run_ws(opts, audio, renderer, outcome)
        else:
            await run_http(opts, audio, renderer, outcome)
        return outcome
    finally:
        renderer.upload_done()
        await source.aclose()
