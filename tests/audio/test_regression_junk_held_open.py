"""Regression: junk that FFmpeg opens as MP3, with the upload then held open, got no error.

FFmpeg's probe settled on the MP3 demuxer for these random bytes; that demuxer resynchronises by
reading on and on, so the decoder waited for more junk and the client heard nothing until it
sent more or the idle timeout closed the upload (seen by the load generator with 50 KB of random
bytes, on every transport). Now an unidentified input that decodes no audio within the probe
plus 64 KiB is reported as ``unsupported_format`` at once.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import anyio
import pytest

from service.audio.chunk import AudioChunk
from service.audio.decoder import decode
from service.errors import ErrorCode, StreamerError

pytestmark = pytest.mark.anyio


async def test_junk_opened_as_mp3_fails_while_the_upload_is_still_open() -> None:
    rng = random.Random(10)
    junk = bytes(rng.getrandbits(8) for _ in range(100_000))  # FFmpeg reads these as MP3
    held_open = anyio.Event()
    send, recv = anyio.create_memory_object_stream[AudioChunk](8)

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(junk), 4096):
            yield junk[i : i + 4096]
        await held_open.wait()  # the client keeps the upload open and sends nothing

    async def drain() -> None:
        async with recv:
            async for _ in recv:
                pass

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            with pytest.raises(StreamerError) as info:
                await decode(source(), None, send)
            held_open.set()
    assert info.value.code is ErrorCode.UNSUPPORTED_FORMAT
