"""Custom ops. One sub-package per op is the single source of truth for it: schema, torch reference, ONNX Runtime lowering, Triton kernel, TensorRT registration."""
