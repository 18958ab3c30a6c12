"""fp8: ModelOpt's FP8 (`quant_algo FP8`): E4M3 weights with one scale per tensor, and a static per-tensor input
scale from calibration.

Checkpoint: `weight` F8_E4M3 `[out, in]`, `weight_scale` F32 `[]` = amax_w / 448, `input_scale` F32 `[]` =
amax_x / 448. Graph: QuantizeLinear(x, fp16 input_scale) -> DequantizeLinear, and DequantizeLinear of the
transposed FP8 weight by its fp16 scale, into MatMul.
"""

from __future__ import annotations

import torch

from contract import formats
from contract.weight_formats import WEIGHT_FORMATS
from plugins.weight_formats.fp8_graph import FP8, is_blocked, transposed_weight
from plugins.weight_formats.linear import (
    ExportGraph,
    QuantizedLinear,
    check_scale,
    fp8_weight,
    need,
)

FORMAT = WEIGHT_FORMATS["fp8"]
ort_lowering = None  # ONNX Runtime runs FP8 Q/DQ natively


def unfit(shape: tuple[int, int]) -> str | None:
    return None


def quantize(weight: torch.Tensor, input_amax: float | None, scales: dict | None = None) -> dict:
    """`scales` may give a chosen (shared) `weight_scale` instead of the amax one."""
    q, scale = formats.quantize_fp8_per_tensor(weight, (scales or {}).get("weight_scale"))
    return {"weight": q, "weight_scale": scale, "input_scale": formats.amax_to_scale(torch.tensor(input_amax))}


def config_json(exclude: list[str]) -> None:
    return None


def group_scales(weights: dict[str, torch.Tensor], input_sq: dict, search: bool) -> dict[str, dict]:
    """One per-tensor `weight_scale` for a fusion group: the largest amax / 448."""
    amax = max(float(w.float().abs().amax()) for w in weights.values())
    scale = formats.amax_to_scale(torch.tensor(amax))
    return {n: {"weight_scale": scale} for n in weights}


def gptq(w: torch.Tensor, h, scales: dict, search: bool, loop) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(GPTQ-rounded fp32 weight, plainly rounded fp32 weight, scales) on the per-tensor grid of the chosen scale;
    `loop(w, h, round_column)` is the GPTQ loop (`quantization.gptq`)."""
    codes, s = formats.quantize_fp8_per_tensor(w, scales["weight_scale"])
    scale = s.float().reshape(())
    q = loop(w, h, lambda W1, i, col: formats.to_fp8(W1[:, i], scale).float() * scale)
    return q, codes.float() * s, scales


def weight_qdq(w: torch.Tensor) -> torch.Tensor:
    q, s = formats.quantize_fp8_per_tensor(w)
    return q.float() * s


def input_qdq(x: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    """Static per tensor: `amax` the calibrated one (default x's own)."""
    amax = float(x.abs().amax()) if amax is None else amax
    if amax <= 0:
        return x.float()
    scale = amax / formats.FP8_MAX
    return formats.to_fp8(x, scale).float() * scale


def holds(module: str, tensors: dict) -> bool:
    scale = tensors.get(f"{module}.weight_scale")
    return (scale is not None and scale.numel() == 1 and scale.dim() != 4
            and f"{module}.weight_scale_2" not in tensors and f"{module}.weight_scale_inv" not in tensors)


def read(module: str, tensors: dict, meta: dict) -> QuantizedLinear:
    what = f"format {FORMAT.name}"
    weight = fp8_weight(module, tensors, FORMAT.name)
    scale = check_scale(f"{module}.weight_scale", need(tensors, f"{module}.weight_scale", what).reshape(()))
    input_scale = check_scale(f"{module}.input_scale", need(tensors, f"{module}.input_scale", what), scalar=True)
    return QuantizedLinear(module, FORMAT.name, weight, scale.float(), None, input_scale,
                           tensors.get(f"{module}.bias"))


def dequantize(linear: QuantizedLinear) -> torch.Tensor:
    return linear.weight.float() * linear.weight_scale.float()


def graph_activation(g: ExportGraph, x: str, q: QuantizedLinear, name: str) -> str:
    """QuantizeLinear(x, input_scale fp16) to FP8 -> DequantizeLinear."""
    scale = g.scalar(f"{q.name}.input_scale", q.input_scale.float().reshape(()), torch.float16)
    xq = g.op("QuantizeLinear", [x, scale], f"{name}/input_q", output_dtype=FP8)
    return g.op("DequantizeLinear", [xq, scale], f"{name}/input_dq")


def graph_weight(g: ExportGraph, q: QuantizedLinear, name: str) -> str:
    w = transposed_weight(g, q)
    return g.op("DequantizeLinear", [w, g.scalar(f"{q.name}.weight_scale", q.weight_scale.float(), torch.float16)],
                f"{name}/weight_dq")


def recognize(dq, init, inits: dict, quantized_input: bool) -> bool:
    """FP8 weight, unblocked DequantizeLinear, a scalar scale."""
    scale = inits.get(dq.input[1])
    return init.data_type == FP8 and not is_blocked(dq) and not (scale is not None and len(scale.dims) > 0)
