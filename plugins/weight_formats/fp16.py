"""fp16: the unquantized weight. A plain `MatMul` on the transposed weight; no scales, no activation quantizer.

The exporter writes an unquantized linear straight from the checkpoint (fused q|k|v and gate|up when no member is
quantized); these operations are the same form for one linear that a quantized checkpoint keeps in fp16.
"""

from __future__ import annotations

import torch

from contract.weight_formats import UNQUANTIZED, WEIGHT_FORMATS
from plugins.weight_formats.linear import ExportGraph, QuantizedLinear

FORMAT = WEIGHT_FORMATS[UNQUANTIZED]
ort_lowering = None  # nothing to lower


def unfit(shape: tuple[int, int]) -> str | None:
    return None


def quantize(weight: torch.Tensor, input_amax: float | None = None, scales: dict | None = None) -> dict:
    return {"weight": weight.to(torch.float16)}


def config_json(exclude: list[str]) -> None:
    return None


def weight_qdq(w: torch.Tensor) -> torch.Tensor:
    """The fp32 weight itself: the searches' unquantized reference (the checkpoint rounds it to fp16)."""
    return w.float()


def input_qdq(x: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    return x.float()


def holds(module: str, tensors: dict) -> bool:
    """No scale tensor of any format beside the weight."""
    return not any(f"{module}.{s}" in tensors for s in ("weight_scale", "weight_scale_inv", "weight_scale_2"))


def read(module: str, tensors: dict, meta: dict) -> QuantizedLinear:
    return QuantizedLinear(module, FORMAT.name, tensors[f"{module}.weight"], bias=tensors.get(f"{module}.bias"))


def dequantize(linear: QuantizedLinear) -> torch.Tensor:
    return linear.weight.float()


def graph_activation(g: ExportGraph, x: str, q: QuantizedLinear, name: str) -> str:
    return x


def graph_weight(g: ExportGraph, q: QuantizedLinear, name: str) -> str:
    """The weight transposed to `[in, out]` in fp16, as MatMul reads it."""
    return g.weight(f"{q.name}.weight", q.weight.to(torch.float16).t().contiguous())


def recognize(dq, init, inits: dict, quantized_input: bool) -> bool:
    """An fp16 weight has no DequantizeLinear: a linear whose weight no format recognises is fp16."""
    return False
