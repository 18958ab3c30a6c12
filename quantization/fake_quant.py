"""Torch fake-quantization of a linear's weight and input in each weight format, for the searches (smoothing scales,
NVFP4 scales, mixed-precision sensitivities): what the engine computes, in fp32, from `contract.formats` and the
NVFP4 activation reference. The engines' own semantics are tested in tests/test_quantized_export.py.
"""

from __future__ import annotations

import torch

from contract import formats
from plugins.nvfp4.reference import nvfp4_activation_qdq


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
    if fmt == "nvfp4":
        return formats.dequantize_nvfp4(*formats.quantize_nvfp4(w))
    raise ValueError(f"unknown format {fmt}")


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
        return nvfp4_activation_qdq(x.float(), amax / (formats.E2M1_MAX * formats.FP8_MAX)).float()
    block = x.shape[-1] if fmt == "fp8_pc" else formats.WEIGHT_BLOCK
    nblocks = -(-x.shape[-1] // block)
    padded = torch.nn.functional.pad(x.float(), (0, nblocks * block - x.shape[-1]))
    amax = padded.unflatten(-1, (nblocks, block)).abs().amax(-1).clamp_min(formats.MIN_BLOCK_AMAX)
    scale = formats.expand_row_block_scale(amax / formats.FP8_MAX, x.shape[-1], block)
    return formats.to_fp8(x, scale).float() * scale
