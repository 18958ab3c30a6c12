"""fp8_pc: ModelOpt's `FP8_PER_CHANNEL_PER_TOKEN`: E4M3 weights with one scale per output channel, activations
quantized per token at run time (no calibrated input scale).

Checkpoint: `weight` F8_E4M3 `[out, in]`, `weight_scale` F32 `[out]` (or `[out, 1]`). Graph: the dynamic FP8
activation quantizer over the whole row, DequantizeLinear of the transposed weight along axis 1.
"""

from __future__ import annotations

import torch

from contract import formats
from contract.weight_formats import WEIGHT_FORMATS
from plugins.weight_formats.fp8_graph import (
    FP8,
    dynamic_activation,
    dynamic_qdq,
    is_blocked,
    transposed_weight,
)
from plugins.weight_formats.linear import (
    ExportGraph,
    QuantizedLinear,
    check_scale,
    check_shape,
    fp8_weight,
    need,
)

FORMAT = WEIGHT_FORMATS["fp8_pc"]
ort_lowering = None


def unfit(shape: tuple[int, int]) -> str | None:
    return None


def quantize(weight: torch.Tensor, input_amax: float | None = None, scales: dict | None = None) -> dict:
    q, scale = formats.quantize_fp8_per_channel(weight)
    return {"weight": q, "weight_scale": scale}


def config_json(exclude: list[str]) -> None:
    return None


def weight_qdq(w: torch.Tensor) -> torch.Tensor:
    q, s = formats.quantize_fp8_per_channel(w)
    return q.float() * s[:, None]


def input_qdq(x: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    """Dynamic per token (`amax` is not used)."""
    return dynamic_qdq(x, x.shape[-1])


def holds(module: str, tensors: dict) -> bool:
    scale = tensors.get(f"{module}.weight_scale")
    return (scale is not None and scale.numel() != 1 and scale.dim() != 4
            and f"{module}.weight_scale_2" not in tensors and f"{module}.weight_scale_inv" not in tensors)


def read(module: str, tensors: dict, meta: dict) -> QuantizedLinear:
    weight = fp8_weight(module, tensors, FORMAT.name)
    scale = need(tensors, f"{module}.weight_scale", f"format {FORMAT.name}").reshape(-1)  # [out] or [out, 1]
    check_shape(f"{module}.weight_scale", scale, (weight.shape[0],))
    check_scale(f"{module}.weight_scale", scale)
    return QuantizedLinear(module, FORMAT.name, weight, scale.float(), bias=tensors.get(f"{module}.bias"))


def dequantize(linear: QuantizedLinear) -> torch.Tensor:
    return linear.weight.float() * linear.weight_scale.float()[:, None]


def graph_activation(g: ExportGraph, x: str, q: QuantizedLinear, name: str) -> str:
    return dynamic_activation(g, x, q.shape[1], q.shape[1], name)


def graph_weight(g: ExportGraph, q: QuantizedLinear, name: str) -> str:
    """One scale per output channel = axis 1 of the transposed `[in, out]` weight."""
    w = transposed_weight(g, q)
    return g.op("DequantizeLinear", [w, g.weight(f"{q.name}.weight_scale", q.weight_scale.float().half())],
                f"{name}/weight_dq", axis=1)


def recognize(dq, init, inits: dict, quantized_input: bool) -> bool:
    """FP8 weight, unblocked DequantizeLinear, a scale with dims (one per channel)."""
    scale = inits.get(dq.input[1])
    return init.data_type == FP8 and not is_blocked(dq) and scale is not None and len(scale.dims) > 0
