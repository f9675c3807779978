"""A session's input side, without a server: what a write that had to wait becomes."""

from __future__ import annotations

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from service.audio.source import ByteSource
from service.config import SessionConfig
from service.observability.loop import LoopLoad
from service.runtime import Runtime
from service.session.observer import SessionObserver
from service.session.session import EndReason, InputClosed, Session, new_session_id
from service.settings import Settings
from service.store import MemoryStore

pytestmark = pytest.mark.anyio


def _session() -> tuple[Session, MemoryObjectReceiveStream[bytes]]:
    # The pipeline is not run: the test reads the session's input itself, as the decoder does.
    runtime = Runtime(
        Settings.from_env({}),
        batcher=None,  # type: ignore[arg-type]
        models=None,
        observer=SessionObserver(),
        load=LoopLoad(),
    )
    sid = new_session_id()
    session = Session(sid, SessionConfig(), MemoryStore().log(sid), runtime)
    return session, session.open_input(None)


def _fill(session: Session) -> int:
    """Fills the session's input to the brim (past the write path, so nothing is counted), as
    a pipeline that is behind leaves it; returns how many chunks went in."""
    filled = 0
    while True:
        try:
            session._input.send_nowait(b"x")  # type: ignore[union-attr]
        except anyio.WouldBlock:
            return filled
        filled += 1


async def test_input_closing_while_a_write_waits_still_delivers_that_chunk() -> None:
    """Regression: closing the input (shutdown; a transport giving up on its client) while a
    write waited for room in a pipeline that was behind withdrew that chunk: counted in
    ``bytes``, never decoded. The write is now delivered, the input closes after it, and a
    later write is refused."""
    session, receive = _session()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            filled = _fill(session)
            tg.start_soon(session.write, b"late")
            await anyio.wait_all_tasks_blocked()
            session.close_input(EndReason.SHUTDOWN)
            got = [item async for item in receive]
        assert got == [b"x"] * filled + [b"late"]
        with pytest.raises(InputClosed):
            await session.write(b"after")
    assert session.counters.bytes_in == len(b"late")  # the direct sends above bypassed counting


async def test_a_cancelled_writer_still_delivers_the_chunk_it_was_handing_over() -> None:
    """Regression: the HTTP upload's reader is cancelled once the input closes, and that
    cancellation landed inside a write waiting for room, withdrawing the chunk."""
    session, receive = _session()
    with anyio.fail_after(5):
        filled = _fill(session)
        async with anyio.create_task_group() as tg:
            writer = anyio.CancelScope()

            async def write() -> None:
                with writer:
                    await session.write(b"late")

            tg.start_soon(write)
            await anyio.wait_all_tasks_blocked()
            writer.cancel()
            session.close_input(EndReason.CLIENT_DISCONNECTED)
            got = [item async for item in receive]
    assert got == [b"x"] * filled + [b"late"]


async def test_a_decoder_waiting_on_the_bell_gets_the_chunk_a_blocked_write_delivers() -> None:
    """The decoder waits on the session's doorbell, not on the stream. A write that waited for
    room and then closed the input (closed meanwhile) must ring, or the decoder sleeps forever
    with that chunk and the end of input queued."""
    session, receive = _session()
    src = ByteSource(receive, session._arrivals)
    got: list[bytes] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            filled = _fill(session)
            tg.start_soon(session.write, b"late")
            await anyio.wait_all_tasks_blocked()
            session.close_input(EndReason.SHUTDOWN)  # the write is in hand-off: it closes
            while (data := await src.pull()) is not None:
                got.append(data)
    receive.close()
    assert got == [b"x"] * filled + [b"late"]
