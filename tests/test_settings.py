"""Settings come from the environment, once, with clear errors."""

from __future__ import annotations

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
