"""Sessions: one pipeline (one anyio task group) per audio stream, held by one registry."""
