"""llm-build: detect what an ONNX directory holds and build engines for a backend."""
