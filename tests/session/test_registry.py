"""The registry's own bookkeeping, without a server: what it counts as live."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from service.audio.packets import DecodePool
from service.config import SessionConfig
from service.errors import ErrorCode, StreamerError
from service.model.dummy import DummyModel
from service.model.runner import ModelRunner
from service.observability.loop import LoopLoad
from service.runtime import Runtime
from service.session.observer import SessionObserver
from service.session.registry import Registry
from service.settings import Settings

pytestmark = pytest.mark.anyio

# Not running: the registry only reads how long utterances wait (nothing queued: zero).
IDLE_MODEL = ModelRunner(DummyModel(), anyio.CapacityLimiter(1))


async def test_live_forgets_ended_sessions_that_are_kept_for_replay() -> None:
    """Regression: ``live``, which every create checks against ``max_sessions``, walked every
    session the registry keeps for replay. At a few sessions per second and the default
    retention that is thousands of ended sessions, and creating a session cost 16% of the
    event loop in a profile (3,000 retained). It now walks only sessions not yet seen ended,
    and forgets each once it has ended."""
    settings = Settings.from_env({"STREAMER_RETENTION_SECONDS": "60"})
    # Sessions that never start touch neither the VAD batcher nor the model runner.
    runtime = Runtime(
        settings, batcher=None, models=IDLE_MODEL, observer=SessionObserver(), load=LoopLoad()
    )
    async with anyio.create_task_group() as tg:
        registry = Registry(runtime, tg)
        ids = [await registry.create(SessionConfig()) for _ in range(3)]
        assert registry.live == 3
        await registry.cancel(ids[0])
        with anyio.fail_after(5):
            await registry.get(ids[0]).done.wait()
        assert registry.live == 2
        assert len(registry) == 3  # the ended one is still kept for replay...
        unended: dict[str, Any] = registry._unended
        assert set(unended) == set(ids[1:])  # ...but no longer walked by the count
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("limit", ["0.5", "0", "1"])
async def test_a_busy_loop_turns_new_sessions_away_unless_the_gate_is_off(limit: str) -> None:
    settings = Settings.from_env({"STREAMER_ADMIT_MAX_LOOP_BUSY": limit})
    load = LoopLoad()
    runtime = Runtime(
        settings, batcher=None, models=IDLE_MODEL, observer=SessionObserver(), load=load
    )
    async with anyio.create_task_group() as tg:
        registry = Registry(runtime, tg)
        load.record(1.0, 0.5)  # exactly at the limit: still admitted
        await registry.create(SessionConfig())
        load.record(1.0, 1.0)  # 75% busy over the window
        if limit == "0.5":
            with pytest.raises(StreamerError) as refused:
                await registry.create(SessionConfig())
            assert refused.value.code is ErrorCode.SERVER_OVERLOADED
            assert refused.value.status == 503 and refused.value.ws_close == 1013
            assert "75% busy" in refused.value.message
        else:
            await registry.create(SessionConfig())  # 0 and 1 never refuse
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("limit_ms", ["20", "0"])
async def test_a_slow_opus_decoder_turns_new_sessions_away_when_asked_to(limit_ms: str) -> None:
    settings = Settings.from_env({"STREAMER_ADMIT_MAX_DECODE_MS": limit_ms})
    decoders = DecodePool()
    runtime = Runtime(
        settings, batcher=None, models=IDLE_MODEL, observer=SessionObserver(), load=LoopLoad(),
        decoders=decoders,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        registry = Registry(runtime, tg)
        await registry.create(SessionConfig())  # an idle decoder: 0 ms
        decoders.turnaround.start()
        await anyio.sleep(0.05)  # a batch out for 50 ms and counting
        if limit_ms == "0":
            await registry.create(SessionConfig())  # the default: never refuses
        else:
            with pytest.raises(StreamerError) as refused:
                await registry.create(SessionConfig())
            assert refused.value.code is ErrorCode.SERVER_OVERLOADED
            assert "Opus decoder takes" in refused.value.message
        tg.cancel_scope.cancel()
