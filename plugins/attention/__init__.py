"""`trt_edgellm::AttentionPlugin`: schema, torch reference, ONNX Runtime lowering (contracts.md section 3.1)."""
