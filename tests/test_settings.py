"""Settings come from the environment, once, with clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.settings import Settings


def test_defaults_and_env() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.api_key) == ("127.0.0.1", 8000, None)
    s = Settings.from_env(
        {
            "PORT": "9001",
            "STREAMER_MAX_SESSIONS": "7",
            "STREAMER_MODEL_OPTIONS": '{"delay": 0}',
            "STREAMER_CORS_ORIGINS": "http://a, http://b",
            "STREAMER_IDLE_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert (s.port, s.max_sessions, dict(s.model_options)) == (9001, 7, {"delay": 0})
    assert s.cors_origins == ("http://a", "http://b")
    assert s.idle_timeout_seconds == 2.5


def test_streamer_port_wins_over_port_and_overrides_win_over_env() -> None:
    assert Settings.from_env({"PORT": "1", "STREAMER_PORT": "2"}).port == 2
    assert Settings.from_env({"PORT": "1"}, port=3).port == 3


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="STREAMER_MAX_SESSIONS"):
        Settings.from_env({"STREAMER_MAX_SESSIONS": "many"})
    with pytest.raises(ValueError, match="STREAMER_MODEL_OPTIONS"):
        Settings.from_env({"STREAMER_MODEL_OPTIONS": "[1]"})


def test_process_configuration_sets_switch_interval_and_gc() -> None:
    """`python -m service` tunes the interpreter for a busy event loop: the GIL switch interval,
    and a GC whose young generation is collected rarely (at 700, full collections stopped the
    loop for up to ~350 ms at 400 streams) with the objects alive at start frozen."""
    code = (
        "import gc, sys\n"
        "from service.__main__ import _configure_process\n"
        "from service.settings import Settings\n"
        "_configure_process(Settings(gil_switch_interval_ms=2.0, gc_gen0_threshold=12345))\n"
        "assert abs(sys.getswitchinterval() - 0.002) < 1e-9, sys.getswitchinterval()\n"
        "assert gc.get_threshold() == (12345, 20, 100), gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 0\n"
        "_configure_process(Settings(gc_gen0_threshold=0))\n"
        "assert gc.get_threshold()[0] == 12345  # 0 leaves the threshold alone\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bools_read_as_people_write_them() -> None:
    for raw, value in (("false", False), ("0", False), ("off", False), ("True", True), ("1", True)):
        assert Settings.from_env({"STREAMER_MODEL_PROBE": raw}).model_probe is value
    with pytest.raises(ValueError, match="STREAMER_MODEL_PROBE"):
        Settings.from_env({"STREAMER_MODEL_PROBE": "maybe"})
