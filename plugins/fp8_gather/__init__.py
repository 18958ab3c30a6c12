"""`trt_edgellm::Fp8Gather`, the FP8 embedding lookup: schema, torch reference, ONNX Runtime lowering (contracts.md section 3.2)."""
