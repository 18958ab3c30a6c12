"""Torch fake-quantization of a linear's weight and input in each weight format, for the searches (smoothing scales,
NVFP4 scales, mixed-precision sensitivities): what the engine computes, in fp32, from `contract.formats` (NVFP4 as
plugins/nvfp4/reference.py without its final fp16 roundings). The engines' own semantics are tested in
tests/test_quantized_export.py; tests/test_quantization_methods.py checks these against the writer and the reference.
"""

from __future__ import annotations

import torch

from contract import formats
from plugins.nvfp4.reference import nvfp4_block_scales


def weight_qdq(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """fp32 weight ``[out, in]`` as the format stores it (amax scales)."""
    if fmt == "fp16":
        return w.float()
    if fmt == "fp8":
        q, s = formats.quantize_fp8_per_tensor(w)
        return q.float() * s
    if fmt == "fp8_pc":
        q, s = formats.quantize_fp8_per_channel(w)
        return q.float() * s[:, None]
    if fmt == "fp8_block":
        return formats.dequantize_fp8_block(*formats.quantize_fp8_block(w))
    if fmt == "nvfp4":  # = dequantize_nvfp4(*quantize_nvfp4(w)), without packing the codes
        global_scale = formats.nvfp4_global_scale(w.float().abs().amax())
        return _nvfp4_qdq(w.float(), formats.nvfp4_block_scales(w, global_scale).float() * global_scale)
    raise ValueError(f"unknown format {fmt}")


def _nvfp4_qdq(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """`formats.e2m1_qdq` per block of 16 along the last axis (`step` ``[..., K/16]``)."""
    return formats.e2m1_qdq(x.unflatten(-1, (-1, formats.NVFP4_GROUP)), step[..., None]).flatten(-2)


def input_qdq(fmt: str, x: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    """fp32 input ``[..., in]`` as the engine quantizes it; `amax` is the static amax (fp8, nvfp4), default x's."""
    if fmt == "fp16":
        return x.float()
    if fmt in ("fp8", "nvfp4"):
        amax = float(x.abs().amax()) if amax is None else amax
        if amax <= 0:
            return x.float()
        if fmt == "fp8":
            scale = amax / formats.FP8_MAX
            return formats.to_fp8(x, scale).float() * scale
        # plugins/nvfp4/reference.py without its final fp16 roundings (a search needs the fp32 error only)
        input_scale = amax / (formats.E2M1_MAX * formats.FP8_MAX)
        return _nvfp4_qdq(x.float(), nvfp4_block_scales(x, input_scale).float() * input_scale)
    # dynamic per token (fp8_pc) or per token and 128 channels (fp8_block): the row-block format on 2-D rows
    block = x.shape[-1] if fmt == "fp8_pc" else formats.WEIGHT_BLOCK
    rows = x.reshape(-1, x.shape[-1])
    return formats.dequantize_fp8_row_block(*formats.quantize_fp8_row_block(rows, block), block).reshape(x.shape)
