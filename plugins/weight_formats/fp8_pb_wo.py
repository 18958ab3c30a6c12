"""fp8_pb_wo: ModelOpt's `FP8_PB_WO`, FP8 E4M3 weights in 128x128 tiles, weight-only (activations stay fp16). Read
from ModelOpt checkpoints; `llm-quantize` does not write it.

Checkpoint: `weight` F8_E4M3 `[out, in]`, `weight_scale` F32 `[out/128, 1, in/128, 1]`. Graph: the blocked weight
DequantizeLinear of fp8_block, no activation quantizer.
"""

from __future__ import annotations

import torch

from contract import formats
from contract.weight_formats import WEIGHT_FORMATS
from plugins.weight_formats import fp16
from plugins.weight_formats.fp8_graph import FP8, block_weight, is_blocked
from plugins.weight_formats.linear import (
    ExportGraph,
    QuantizedLinear,
    check_scale,
    check_shape,
    fp8_weight,
    need,
)

FORMAT = WEIGHT_FORMATS["fp8_pb_wo"]
TILE = (formats.WEIGHT_BLOCK, formats.WEIGHT_BLOCK)
ort_lowering = None


def unfit(shape: tuple[int, int]) -> str | None:
    return None


def weight_qdq(w: torch.Tensor) -> torch.Tensor:
    return formats.dequantize_fp8_block(*formats.quantize_fp8_block(w))


input_qdq = fp16.input_qdq  # weight-only: the input stays as it is


def holds(module: str, tensors: dict) -> bool:
    """ModelOpt's `[out/128, 1, in/128, 1]` tiles, even when there is only one."""
    scale = tensors.get(f"{module}.weight_scale")
    return (scale is not None and scale.dim() == 4
            and f"{module}.weight_scale_2" not in tensors and f"{module}.weight_scale_inv" not in tensors)


def read(module: str, tensors: dict, meta: dict) -> QuantizedLinear:
    weight = fp8_weight(module, tensors, FORMAT.name)
    out, inp = weight.shape
    scale = need(tensors, f"{module}.weight_scale", f"format {FORMAT.name}")
    check_shape(f"{module}.weight_scale", scale, (out // TILE[0], 1, inp // TILE[1], 1))
    check_scale(f"{module}.weight_scale", scale)
    return QuantizedLinear(module, FORMAT.name, weight, scale.float(), bias=tensors.get(f"{module}.bias"),
                           block_size=TILE)


def _tiles(linear: QuantizedLinear) -> torch.Tensor:
    s = linear.weight_scale
    return s.reshape(s.shape[0], s.shape[2])


def dequantize(linear: QuantizedLinear) -> torch.Tensor:
    return formats.dequantize_fp8_block(linear.weight, _tiles(linear), linear.block_size)


graph_activation = fp16.graph_activation  # weight-only


def graph_weight(g: ExportGraph, q: QuantizedLinear, name: str) -> str:
    return block_weight(g, q, _tiles(q), name)


def recognize(dq, init, inits: dict, quantized_input: bool) -> bool:
    """FP8 weight, blocked DequantizeLinear, and the MatMul's input stays fp16."""
    return init.data_type == FP8 and is_blocked(dq) and not quantized_input
