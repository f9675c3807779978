"""ByteSource waiting on a Doorbell instead of the memory object stream's ``receive``.

A missed ring would leave the decoder asleep with audio queued (a hang at the end of an upload,
or lag until the next chunk), so each way a chunk or the end can reach the stream is covered.
"""

from __future__ import annotations

import anyio
import pytest

from service.audio.source import ByteSource, Doorbell

pytestmark = pytest.mark.anyio


async def test_ring_after_send_wakes_a_waiting_pull() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](4)
    bell = Doorbell()
    src = ByteSource(receive, bell)
    got: list[bytes | None] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                while (data := await src.pull()) is not None:
                    got.append(data)
                got.append(None)

            tg.start_soon(consume)
            for part in (b"ab", b"cd"):
                await anyio.sleep(0.01)  # the consumer is waiting on the bell by now
                send.send_nowait(part)
                bell.ring()
            await anyio.sleep(0.01)
            send.close()
            bell.ring()
    assert got == [b"ab", b"cd", None]
    assert src.bytes_in == 4 and src.exhausted


async def test_chunks_queued_before_the_wait_need_no_ring() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](4)
    src = ByteSource(receive, Doorbell())
    send.send_nowait(b"x")
    send.send_nowait(b"")  # empty chunks are skipped, not returned as the end
    send.send_nowait(b"y")
    send.close()
    with anyio.fail_after(5):
        assert [await src.pull(), await src.pull(), await src.pull()] == [b"x", b"y", None]


async def test_a_sender_blocked_on_a_full_stream_is_drained() -> None:
    # The sender's `send` waits for room; its chunk enters the buffer when the consumer takes
    # one, with no ring of its own until the send returns.
    send, receive = anyio.create_memory_object_stream[bytes](1)
    bell = Doorbell()
    src = ByteSource(receive, bell)
    got: list[bytes] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def produce() -> None:
                for i in range(5):
                    await send.send(bytes([i]))
                    bell.ring()
                send.close()
                bell.ring()

            tg.start_soon(produce)
            while (data := await src.pull()) is not None:
                got.append(data)
    assert got == [bytes([i]) for i in range(5)]


async def test_without_a_bell_the_stream_is_received_as_before() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](4)
    src = ByteSource(receive)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def produce() -> None:
                await anyio.sleep(0.01)
                await send.send(b"late")
                send.close()

            tg.start_soon(produce)
            assert await src.pull() == b"late"
            assert await src.pull() is None


async def test_a_ring_with_nobody_waiting_is_not_kept() -> None:
    # A stale ring must not make the next wait return at once (a busy loop of empty pulls).
    bell = Doorbell()
    bell.ring()
    with anyio.move_on_after(0.05) as scope:
        await bell.wait()
    assert scope.cancelled_caught
