"""Torch reference of NVFP4 activation fake-quant: `TRT_FP4DynamicQuantize` followed by the graph's two DQs.

Per block of `group` elements along the last axis, in fp32: block scale `s = fp8(min(block_amax / 6 / input_scale,
448))`, a block whose FP8 scale is 0 divides by 1 instead, codes `e2m1(x / (s * input_scale))` rounded to the nearest
level (ties to the even code); dequantized as the graph does it, in fp16: `fp16(e2m1 * fp16(s * fp16(input_scale)))`.
"""

from __future__ import annotations

import torch

from contract import formats


def _divisor(value: float) -> torch.Tensor:
    """A shape-[1] fp32 tensor: torch divides by a 0-d (scalar) divisor as a multiply by its rounded reciprocal,
    which is not the correctly rounded quotient the ONNX Div computes."""
    return torch.tensor([value], dtype=torch.float32)


def nvfp4_block_scales(x: torch.Tensor, input_scale: float, group: int = formats.NVFP4_GROUP) -> torch.Tensor:
    """FP8 E4M3 block scales `[..., K/group]` (in units of `input_scale`)."""
    blocks = x.float().unflatten(-1, (-1, group))
    ratio = blocks.abs().amax(-1) / _divisor(formats.E2M1_MAX) / _divisor(input_scale)
    return ratio.clamp(max=formats.FP8_MAX).to(formats.FP8_DTYPE)


def nvfp4_activation_qdq(x: torch.Tensor, input_scale: float, group: int = formats.NVFP4_GROUP) -> torch.Tensor:
    """fp16 fake-quantized `x` (same shape)."""
    blocks = x.float().unflatten(-1, (-1, group))
    scale = nvfp4_block_scales(x, input_scale, group).float()
    step = torch.where(scale == 0, torch.ones_like(scale), scale) * _divisor(input_scale)
    values = formats.e2m1_decode(formats.e2m1_encode(blocks / step[..., None]))
    scale16 = (scale.half().float() * torch.tensor(input_scale).half().float()).half()
    return (values.half() * scale16[..., None]).flatten(-2)
