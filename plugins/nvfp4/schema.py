"""`trt::TRT_FP4DynamicQuantize`, the op ModelOpt / TensorRT use for NVFP4 activations (reference 2.6).

Inputs `x` (fp16 `[..., K]`) and `input_scale` (fp32 scalar, the static global scale amax/(6*448)); outputs the
E2M1 values (FLOAT4E2M1 `[..., K]`) and their FP8 E4M3 block scales `[..., K/block_size]` in units of `input_scale`.
Attributes `axis=-1`, `block_size=16`, `scale_type=17` (FLOAT8E4M3FN). `reference.py` holds the semantics.
"""

from __future__ import annotations

from onnx import TensorProto, helper

DOMAIN = "trt"
OP_TYPE = "TRT_FP4DynamicQuantize"
OPSET = helper.make_opsetid(DOMAIN, 1)


def attrs(block_size: int = 16) -> dict:
    return {"axis": -1, "block_size": block_size, "scale_type": TensorProto.FLOAT8E4M3FN}
