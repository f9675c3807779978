"""VAD: Silero (ONNX via onnxruntime) probabilities, batched across sessions, and the segmenter."""
