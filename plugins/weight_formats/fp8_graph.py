"""The graph pieces the FP8 weight formats share (contracts.md 2.1): the FP8 weight stored transposed, its blocked
DequantizeLinear, and the dynamic FP8 activation quantizer (per token, or per token and block of channels)."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from contract import formats
from plugins.weight_formats.linear import ExportGraph, QuantizedLinear

FP16, FP32, FP8 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN
# dynamic FP8 activation scale of a token (block): max(amax, MIN_ACT_AMAX) / 448, so an all-zero block stays 0
MIN_ACT_AMAX = formats.MIN_BLOCK_AMAX


def transposed_weight(g: ExportGraph, q: QuantizedLinear) -> str:
    """The FP8 weight stored transposed `[in, out]` (like the fp16 weights), as its bytes."""
    return g.add_raw(f"{q.name}.weight", q.weight.t().contiguous().view(torch.uint8).numpy(), FP8)


def block_weight(g: ExportGraph, q: QuantizedLinear, tiles: torch.Tensor, name: str) -> str:
    """FP8 weight with a `[rows x cols]` tile scale `tiles` `[ceil(out/rows), ceil(in/cols)]`: a scale blocked along
    `in` (axis 0 of the transposed weight, block cols) and repeated along out."""
    w = transposed_weight(g, q)
    out, _ = q.shape
    rows, cols = q.block_size
    expanded = tiles.float().repeat_interleave(rows, dim=0)[:out].t().contiguous()  # [ceil(in/cols), out]
    return g.op("DequantizeLinear", [w, g.weight(f"{q.name}.weight_scale_inv", expanded.half())], f"{name}/weight_dq",
                axis=0, block_size=cols)


def dynamic_activation(g: ExportGraph, x: str, size: int, block: int, name: str) -> str:
    """Per token, per `block` channels of the last axis (block = size: per token), in fp32:
    scale = max(amax, MIN_ACT_AMAX) / 448; blocked QuantizeLinear to FP8 -> DequantizeLinear -> fp16."""
    nblocks = -(-size // block)
    x32 = g.op("Cast", [x], f"{name}/input_fp32", to=FP32)
    padded = x32
    if nblocks * block != size:  # zeros do not change a block's amax
        pads = g.shared_const(f"const.pad_last.{nblocks * block - size}", [0, 0, 0, 0, 0, nblocks * block - size],
                              np.int64)
        padded = g.op("Pad", [x32, pads], f"{name}/input_pad")
    shape = g.shared_const(f"const.blocks.{nblocks}x{block}", [0, 0, nblocks, block], np.int64)
    blocks = g.op("Reshape", [padded, shape], f"{name}/input_blocks")
    amax = g.op("ReduceMax", [g.op("Abs", [blocks], f"{name}/input_abs"), "const.last_axis"], f"{name}/input_amax",
                keepdims=0)
    floor = g.shared_const("const.min_act_amax", [MIN_ACT_AMAX], np.float32)
    fp8_max = g.shared_const("const.fp8_max", [formats.FP8_MAX], np.float32)
    scale = g.op("Div", [g.op("Max", [amax, floor], f"{name}/input_amax_floor"), fp8_max], f"{name}/input_scale")
    xq = g.op("QuantizeLinear", [x32, scale], f"{name}/input_q", axis=2, block_size=block, output_dtype=FP8)
    xdq = g.op("DequantizeLinear", [xq, scale], f"{name}/input_dq", axis=2, block_size=block)
    return g.op("Cast", [xdq], f"{name}/input_fp16", to=FP16)


def dynamic_qdq(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 input ``[..., in]`` quantized as `dynamic_activation` does, per token and `block` channels."""
    rows = x.reshape(-1, x.shape[-1])
    return formats.dequantize_fp8_row_block(*formats.quantize_fp8_row_block(rows, block), block).reshape(x.shape)


def is_blocked(dq) -> bool:
    """A DequantizeLinear with a `block_size` attribute."""
    return any(a.name == "block_size" and a.i > 0 for a in dq.attribute)
