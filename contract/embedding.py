"""The embedding sidecar formats (contracts.md section 4)."""

from __future__ import annotations

EMBEDDING_FP16 = "fp16"
EMBEDDING_FP8 = "fp8_e4m3_row_block"
EMBEDDING_BLOCK = 128
# sidecar metadata `format` -> safetensors dtype of tensor `embedding`
EMBEDDING_DTYPES = {EMBEDDING_FP16: "F16", EMBEDDING_FP8: "F8_E4M3"}
