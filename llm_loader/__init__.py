"""Hugging Face checkpoints in, ONNX plus runtime sidecars out."""
