"""Audio: bytes in, 16 kHz float32 frames per channel out. Knows nothing about HTTP or models."""
