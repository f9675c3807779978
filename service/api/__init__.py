"""API: transports (HTTP upload, SSE, WebSocket) to and from sessions. Knows nothing of audio."""
