"""Cancelling a session stops its decoding thread promptly, wherever the thread is."""

from __future__ import annotations

import sys
import threading

import anyio
import pytest

from service.audio import container
from service.audio.chunk import AudioChunk
from service.audio.decoder import decode


def threads_in_decoder() -> list[str]:
    """Names of threads currently executing code of the container module."""
    busy = []
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_filename == container.__file__:
                busy.append(thread.name)
                break
            frame = frame.f_back
    return busy


async def wait_until_no_decoder_thread() -> None:
    with anyio.fail_after(3):
        # Polling another thread's stack: there is no event to wait on.
        while threads_in_decoder():
            await anyio.sleep(0.01)


async def wait_for_decoder_thread() -> None:
    with anyio.fail_after(3):
        while not threads_in_decoder():
            await anyio.sleep(0.01)


async def open_upload(raw: bytes, upto: int):
    """A source that yields ``raw[:upto]`` and then waits forever, like a stalled client."""
    yield raw[:upto]
    await anyio.sleep_forever()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "upto", "wait_for_audio"),
    [
        ("speech.ogg", 6000, True),  # mid-stream, decoding
        ("speech.webm", 6000, True),
        ("speech.mp3", 1000, False),  # still inside FFmpeg's format probe (av.open)
        ("speech.flac", 5000, False),  # inside the header, format given by magic
    ],
)
async def test_cancel_while_waiting_for_the_upload(name, upto, wait_for_audio, data, capfd):
    raw = data(name)
    send, receive = anyio.create_memory_object_stream[AudioChunk](100)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(decode, open_upload(raw, upto), None, send)
            if wait_for_audio:
                first = await receive.receive()
                assert first.frames > 0
            else:
                with anyio.move_on_after(0.2):
                    await receive.receive()
                    pytest.fail("no audio expected yet")
            await wait_for_decoder_thread()
            tg.cancel_scope.cancel()
    await wait_until_no_decoder_thread()
    # No "exception ignored" noise from PyAV's read callback.
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["speech.ogg", "speech_moov_end.m4a"])
async def test_cancel_while_downstream_is_full(name, data) -> None:
    """The thread is blocked handing audio to a consumer that never reads."""
    raw = data(name)

    async def whole():
        yield raw

    send, receive = anyio.create_memory_object_stream[AudioChunk](0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(decode, whole(), None, send)
            await wait_for_decoder_thread()
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    await wait_until_no_decoder_thread()


@pytest.mark.anyio
async def test_decoding_works_after_cancellations(data, decode_bytes) -> None:
    """Cancelled sessions leave nothing behind that would block the next one."""
    for _ in range(3):
        with anyio.move_on_after(0.05):
            await decode_bytes(data("speech.ogg"), piece=200)
    out = await decode_bytes(data("speech.ogg"))
    assert out.error is None
    await wait_until_no_decoder_thread()


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["speech.ogg", "speech.mp3", "speech.wav"])
async def test_consumer_going_away_ends_decoding(name, data, capfd) -> None:
    """If the next stage closes its end, decode stops with that error instead of reading on."""
    raw = data(name)
    send, receive = anyio.create_memory_object_stream[AudioChunk](0)

    async def slowly():
        for i in range(0, len(raw), 500):
            yield raw[i : i + 500]
            await anyio.sleep(0.001)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def consume_one_then_close() -> None:
                async with receive:
                    await receive.receive()

            tg.start_soon(consume_one_then_close)
            with pytest.raises(anyio.BrokenResourceError):
                await decode(slowly(), None, send)
    await wait_until_no_decoder_thread()
    assert "Traceback" not in capfd.readouterr().err
