"""streamer: put any blocking audio model behind a live streaming API."""

__version__ = "0.1.0"
