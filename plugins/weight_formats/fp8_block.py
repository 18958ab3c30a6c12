"""fp8_block: the Hugging Face fine-grained FP8 layout (DeepSeek-V3, Qwen3-*-FP8): E4M3 weights with one scale per
128x128 tile, activations quantized per token and 128 channels at run time.

Checkpoint: `weight` F8_E4M3 `[out, in]`, `weight_scale_inv` F32 `[ceil(out/128), ceil(in/128)]` (despite its name,
the dequant multiplier); config.json `quantization_config` `{"quant_method": "fp8", "weight_block_size": [128, 128],
...}`. Graph: the dynamic FP8 activation quantizer per 128 channels, a blocked DequantizeLinear of the transposed
weight (the tile scale blocked along `in`, repeated along `out`).
"""

from __future__ import annotations

import torch

from contract import formats
from contract.weight_formats import WEIGHT_FORMATS
from plugins.weight_formats.fp8_graph import (
    FP8,
    block_weight,
    dynamic_activation,
    dynamic_qdq,
    is_blocked,
)
from plugins.weight_formats.linear import (
    ExportGraph,
    QuantizedLinear,
    check_scale,
    check_shape,
    fp8_weight,
    need,
)

FORMAT = WEIGHT_FORMATS["fp8_block"]
ort_lowering = None


def unfit(shape: tuple[int, int]) -> str | None:
    return None


def quantize(weight: torch.Tensor, input_amax: float | None = None, scales: dict | None = None) -> dict:
    q, scale = formats.quantize_fp8_block(weight)
    return {"weight": q, "weight_scale_inv": scale}


def config_json(exclude: list[str]) -> dict:
    """config.json `quantization_config` of the HF fine-grained FP8 layout."""
    return {
        "quant_method": FORMAT.hf_quant_method,
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [formats.WEIGHT_BLOCK, formats.WEIGHT_BLOCK],
        "modules_to_not_convert": exclude,
    }


def weight_qdq(w: torch.Tensor) -> torch.Tensor:
    return formats.dequantize_fp8_block(*formats.quantize_fp8_block(w))


def input_qdq(x: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    """Dynamic per token and 128 channels (`amax` is not used)."""
    return dynamic_qdq(x, formats.WEIGHT_BLOCK)


def holds(module: str, tensors: dict) -> bool:
    return f"{module}.weight_scale_inv" in tensors


def read(module: str, tensors: dict, meta: dict) -> QuantizedLinear:
    """`meta["block_size"]`: the config's `weight_block_size` (default 128x128)."""
    weight = fp8_weight(module, tensors, FORMAT.name)
    out, inp = weight.shape
    scale = need(tensors, f"{module}.weight_scale_inv", f"format {FORMAT.name}")
    block = tuple(meta.get("block_size") or (formats.WEIGHT_BLOCK, formats.WEIGHT_BLOCK))
    check_shape(f"{module}.weight_scale_inv", scale, (-(-out // block[0]), -(-inp // block[1])))
    check_scale(f"{module}.weight_scale_inv", scale)
    return QuantizedLinear(module, FORMAT.name, weight, scale.float(), bias=tensors.get(f"{module}.bias"),
                           block_size=block)


def dequantize(linear: QuantizedLinear) -> torch.Tensor:
    return formats.dequantize_fp8_block(linear.weight, linear.weight_scale, linear.block_size)


def graph_activation(g: ExportGraph, x: str, q: QuantizedLinear, name: str) -> str:
    return dynamic_activation(g, x, q.shape[1], q.block_size[1], name)


def graph_weight(g: ExportGraph, q: QuantizedLinear, name: str) -> str:
    return block_weight(g, q, q.weight_scale, name)


def recognize(dq, init, inits: dict, quantized_input: bool) -> bool:
    """FP8 weight, blocked DequantizeLinear, and the MatMul's input is quantized (fp8_pb_wo's is not)."""
    return init.data_type == FP8 and is_blocked(dq) and quantized_input
