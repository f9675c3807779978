"""WebM/Ogg Opus through the shared decode pool, as sessions use it."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.lowlevel
import av
import numpy as np
import psutil
import pytest
from conftest import (
    DATA,
    SPEECH_SAMPLES,
    Decoded,
    decode_pieces,
    ogg_pages,
    resigned,
    split,
)

from service.audio.opus import available
from service.audio.packets import (
    DecodePool,
    DecodeProcess,
    Turnaround,
    _Decoded,
    _Failures,
    pack_step,
    unpack_step,
)
from service.errors import ErrorCode

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not available(), reason="libopus not found")]


Pool = type[DecodePool] | type[DecodeProcess]


@pytest.fixture(params=[DecodePool, DecodeProcess], ids=["thread", "process"])
def pool_cls(request: pytest.FixtureRequest) -> Pool:
    """Each test runs with the shared decoding thread and with the decoding process."""
    cls: Pool = request.param
    return cls


async def with_pool(
    pool_cls: Pool, *uploads: list[bytes]
) -> tuple[DecodePool | DecodeProcess, list[Decoded]]:
    pool = pool_cls()
    results: list[Decoded] = [Decoded(None, None)] * len(uploads)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run)

            async def one(i: int) -> None:
                results[i] = await decode_pieces(uploads[i], pool=pool)

            async with anyio.create_task_group() as sessions:
                for i in range(len(uploads)):
                    sessions.start_soon(one, i)
            tg.cancel_scope.cancel()
    return pool, results


@pytest.mark.parametrize("channels", [1, 2])
def test_a_step_crosses_from_the_process_as_plain_values(channels: int) -> None:
    samples = np.random.default_rng(0).uniform(-1, 1, (channels, 960)).astype(np.float32)
    failures = _Failures(3, 1, "corrupted stream", None)
    reply = pack_step(_Decoded(samples, 0.25, False), failures)
    assert all(isinstance(v, (bytes, int, float, str, type(None))) for v in reply)
    decoded, back = unpack_step(reply)
    assert decoded.samples is not None and decoded.samples.shape == (channels, 960)
    assert np.array_equal(decoded.samples, samples)
    assert (decoded.busy_s, decoded.stop, back) == (0.25, False, failures)
    nothing, _ = unpack_step(pack_step(_Decoded(None, 0.0, True), _Failures(0, 0, None, "x")))
    assert nothing.samples is None and nothing.stop


@pytest.mark.parametrize("name", ["speech.webm", "speech.ogg"])
async def test_a_pool_decodes_what_ffmpeg_decodes(name: str, pool_cls: Pool) -> None:
    data = (DATA / name).read_bytes()
    pool, [ours] = await with_pool(pool_cls, split(data, 300))
    with anyio.fail_after(20):
        ffmpeg = await decode_pieces(split(data, 300))
    assert ours.error is None and ffmpeg.error is None
    ours.assert_contiguous()
    assert ours.result is not None and ffmpeg.result is not None
    assert (ours.result.container, ours.result.codec) == (ffmpeg.result.container, "opus")
    assert ours.result.bytes_in == len(data) and ours.result.channels == 1
    assert ours.frames == SPEECH_SAMPLES
    assert pool.jobs > 1  # it went through the pool, chunk by chunk


async def test_sessions_share_batches(pool_cls: Pool) -> None:
    data = (DATA / "speech.webm").read_bytes()
    pool, results = await with_pool(pool_cls, *[split(data, 200) for _ in range(20)])
    assert all(r.error is None and r.frames == SPEECH_SAMPLES for r in results)
    # 20 sessions decoding at once: each thread hop takes several of them.
    assert pool.batches < pool.jobs / 2


async def test_other_codecs_still_go_to_ffmpeg(pool_cls: Pool) -> None:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.int16), format="s16")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in stream.encode(frame):
            out.mux(packet)
    pieces = split(buffer.getvalue(), 1000)
    pool, [decoded] = await with_pool(pool_cls, pieces)
    with anyio.fail_after(20):
        ffmpeg = await decode_pieces(pieces)
    assert decoded.error is None and decoded.result is not None
    assert (decoded.result.container, decoded.result.codec) == ("mkv", "pcm_s16le")
    # Every byte our demuxer read while deciding went to FFmpeg too.
    assert decoded.result == ffmpeg.result and decoded.frames == ffmpeg.frames > 0
    assert pool.jobs == 0


async def test_a_damaged_container_is_reported_after_the_audio_before_it(pool_cls: Pool) -> None:
    data = (DATA / "speech.webm").read_bytes()
    cut = len(data) // 2
    _, [decoded] = await with_pool(pool_cls, split(data[:cut] + b"\x00" * 64 + data[cut:], 500))
    assert decoded.error is not None and decoded.error.code is ErrorCode.DECODE_FAILED
    assert "webm container is damaged" in decoded.error.message
    assert SPEECH_SAMPLES * 0.4 < decoded.frames < SPEECH_SAMPLES * 0.6


async def test_a_run_of_bad_packets_stops_decoding_with_an_error(pool_cls: Pool) -> None:
    data = bytearray((DATA / "speech.ogg").read_bytes())
    # Overwrite the audio pages' packet bytes (leaving page headers alone) with a TOC whose
    # frame count libopus rejects.
    pos = data.index(b"OggS", data.index(b"OpusTags"))
    while pos < len(data):
        count = data[pos + 26]
        body = pos + 27 + count
        size = sum(data[pos + 27 : body])
        data[body : body + size] = b"\xff" * size
        pos = body + size
    _, [decoded] = await with_pool(pool_cls, split(resigned(data), 4096))
    assert decoded.error is not None and decoded.error.code is ErrorCode.DECODE_FAILED
    assert "decoding stopped" in decoded.error.message
    assert decoded.frames == 0


async def test_an_ogg_page_that_fails_its_checksum_costs_its_audio_and_is_reported(
    pool_cls: Pool,
) -> None:
    data = bytearray((DATA / "speech.ogg").read_bytes())
    start, _ = ogg_pages(data)[5]
    data[start + 300] ^= 0x55  # inside a packet: libopus alone would decode it into noise
    _, [decoded] = await with_pool(pool_cls, split(bytes(data), 4096))
    assert decoded.error is not None and decoded.error.code is ErrorCode.DECODE_FAILED
    assert decoded.error.message.startswith(
        "1 opus packet of the ogg stream failed to decode and was skipped"
    )
    assert "checksum" in decoded.error.message
    decoded.assert_contiguous()
    # The audio before and after the page is kept; the page's is gone, as FFmpeg drops it.
    with av.open(io.BytesIO(bytes(data))) as container:
        ffmpeg = sum(f.samples for f in container.decode(audio=0))  # 48 kHz
    assert decoded.frames == pytest.approx(ffmpeg / 3, abs=2 * 320)
    assert 0 < decoded.frames < SPEECH_SAMPLES - 16000 // 2


async def test_cancelling_a_waiting_session_leaves_the_pool_serving_others(pool_cls: Pool) -> None:
    data = (DATA / "speech.webm").read_bytes()
    pool = pool_cls()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run)
            with anyio.move_on_after(0.01):
                await decode_pieces(split(data, 50), pool=pool)
            other = await decode_pieces(split(data, 500), pool=pool)
            tg.cancel_scope.cancel()
    assert other.error is None and other.frames == SPEECH_SAMPLES


async def test_damaged_packets_inside_merged_runs_are_skipped_one_by_one(pool_cls: Pool) -> None:
    """Packets decode six at a time merged (OpusDecoder.decode_run); a damaged one among them
    must still cost only itself, and be counted as decoding packet by packet counts it."""
    data = bytearray((DATA / "speech.ogg").read_bytes())
    pos = data.index(b"OggS", data.index(b"OpusTags"))
    damaged = 0
    while pos < len(data):  # spoil the 3rd packet of every other page (a frame count of 63)
        count = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + count]
        body = pos + 27 + count
        if count >= 4 and damaged < 5 and lacing[2] >= 2:
            start = body + sum(lacing[:2])
            data[start : start + lacing[2]] = b"\xff" * lacing[2]
            damaged += 1
        pos = body + sum(lacing)
    assert damaged == 5
    _, [merged] = await with_pool(pool_cls, split(resigned(data), 4096))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("service.audio.packets.MAX_RUN", 1)  # packet by packet, as before runs
        # In this process, where the patch applies (a decoding process has its own MAX_RUN).
        _, [alone] = await with_pool(DecodePool, split(resigned(data), 4096))
    for decoded in (merged, alone):
        assert decoded.error is not None and decoded.error.code is ErrorCode.DECODE_FAILED
        assert decoded.error.message.startswith("5 opus packets of the ogg stream failed")
    assert merged.frames > SPEECH_SAMPLES - 6 * 320  # only the five packets are missing
    assert np.array_equal(merged.samples, alone.samples)


async def _paced(data: bytes, size: int, pause_s: float) -> AsyncIterator[bytes]:
    """An upload arriving in ``size``-byte pieces ``pause_s`` apart, as a live one does."""
    for piece in split(data, size):
        yield piece
        await anyio.sleep(pause_s)


def _decoding_process() -> psutil.Process:
    [child] = [p for p in psutil.Process().children() if "opus_worker" in " ".join(p.cmdline())]
    return child


async def _spoil_mid_session(
    pool: DecodeProcess, spoil: Callable[[psutil.Process], Awaitable[None] | None]
) -> tuple[Decoded, Decoded, psutil.Process]:
    """One live session into ``pool``; once it is in the decoding process, ``spoil`` that
    process (and wait for it, if it is async). Returns the session's outcome, that of a session
    decoded after it, and the process spoiled."""
    data = (DATA / "speech.webm").read_bytes()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run)
            results: list[Decoded] = []

            async def first() -> None:
                results.append(await decode_pieces(_paced(data, 500, 0.01), pool=pool))

            tg.start_soon(first)
            while pool.jobs < 3:  # the session is in the process by now
                await anyio.sleep(0.01)
            child = _decoding_process()
            spoiled = spoil(child)
            if spoiled is not None:
                await spoiled
            while not results:
                await anyio.sleep(0.01)
            after = await decode_pieces(split(data, 500), pool=pool)
            tg.cancel_scope.cancel()
    return results[0], after, child


async def test_a_dead_decoding_process_fails_its_sessions_and_is_replaced() -> None:
    """A crash in libopus or the demuxer kills only the decoding process: the sessions it held
    end with decode_failed (after the audio decoded before), and the next session is decoded
    by a new process."""
    pool = DecodeProcess()
    crashed, after, _ = await _spoil_mid_session(pool, psutil.Process.kill)
    assert crashed.error is not None and crashed.error.code is ErrorCode.DECODE_FAILED
    assert "decoding process" in crashed.error.message
    assert 0 < crashed.frames < SPEECH_SAMPLES
    assert after.error is None and after.frames == SPEECH_SAMPLES
    assert pool.restarts == 1


async def test_stopping_the_decoding_process_fails_the_steps_it_was_running() -> None:
    """Shutdown cancels the process's runner while a batch is in the process: the sessions
    waiting for that batch's replies must get an error, not wait for ever (nothing else would
    answer them)."""
    data = (DATA / "speech.webm").read_bytes()
    pool = DecodeProcess()
    outcome: list[BaseException | Decoded] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            runner = anyio.CancelScope()

            async def run() -> None:
                with runner:
                    await pool.run()

            async def session() -> None:
                try:
                    outcome.append(await decode_pieces(_paced(data, 200, 0.005), pool=pool))
                except* RuntimeError as group:
                    outcome.extend(group.exceptions)

            tg.start_soon(run)
            tg.start_soon(session)
            while pool.jobs < 3:
                await anyio.sleep(0.005)
            while not pool._sent:  # a batch is in the process right now
                await anyio.lowlevel.checkpoint()
            runner.cancel()
    [ended] = outcome
    assert isinstance(ended, RuntimeError) and "stopped" in str(ended)


async def test_a_hung_decoding_process_is_killed_and_replaced() -> None:
    """A process that stops answering (stuck in libopus, stopped by a debugger) must not stall
    every webm session for ever: past the reply timeout it is killed, its sessions end with
    decode_failed, and a new process decodes the next session."""
    pool = DecodeProcess(reply_timeout_s=1.0)
    # SIGSTOP: alive, but it never replies.
    stalled, after, child = await _spoil_mid_session(pool, psutil.Process.suspend)
    assert stalled.error is not None and stalled.error.code is ErrorCode.DECODE_FAILED
    assert 0 < stalled.frames < SPEECH_SAMPLES
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert after.error is None and after.frames == SPEECH_SAMPLES
    assert pool.restarts == 1


def test_turnaround_is_the_recent_mean_or_the_age_of_the_batch_out() -> None:
    turnaround = Turnaround(window_s=0.3)
    assert turnaround.seconds() == 0.0  # idle
    for pause in (0.02, 0.06):
        turnaround.start()
        time.sleep(pause)
        turnaround.stop()
    assert turnaround.seconds() == pytest.approx(0.04, abs=0.015)
    turnaround.start()
    time.sleep(0.12)  # longer than the mean: a batch still out counts as slow
    assert turnaround.seconds() >= 0.12
    turnaround.stop()
    time.sleep(0.35)  # every batch is older than the window
    assert turnaround.seconds() == 0.0


async def test_a_stuck_decoding_process_reads_as_slow_not_idle() -> None:
    """The load gate refuses new sessions on the decoder's turnaround: a process that has
    stopped answering must read as ever slower while its batch is out (not as idle), and its
    session still completes once it answers."""
    pool = DecodeProcess()
    readings: list[float] = []

    async def stall(child: psutil.Process) -> None:
        readings.append(pool.turnaround.seconds())
        child.suspend()
        try:
            await anyio.sleep(0.5)
            readings.append(pool.turnaround.seconds())
        finally:
            child.resume()

    decoded, after, _ = await _spoil_mid_session(pool, stall)
    assert readings[0] < 0.3 and readings[1] >= 0.4
    assert decoded.error is None and decoded.frames == SPEECH_SAMPLES
    assert after.error is None and pool.restarts == 0
