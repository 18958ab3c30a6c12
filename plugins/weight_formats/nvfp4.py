"""nvfp4: ModelOpt's NVFP4: E2M1 weights with an FP8 E4M3 scale per 16 elements and an fp32 global scale; the
activations likewise, with a static (calibrated) global input scale and block scales computed at run time.

Checkpoint: `weight` U8 `[out, in/2]` (two E2M1 codes per byte, low nibble = even index), `weight_scale` F8_E4M3
`[out, in/16]`, `weight_scale_2` and `input_scale` F32 `[]` (amax / (6 * 448)). Graph: `trt::TRT_FP4DynamicQuantize`
then two DequantizeLinear for the input; the FLOAT4E2M1 weight's DequantizeLinear by its DQ'd block scales, cast to
fp16 and transposed. ONNX Runtime implements neither FLOAT4 nor the trt op: `plugins/nvfp4/ort_lowering.py` lowers
both patterns.

The scale search (`--scale_search mse`): NVFP4 rounds each block of 16 to 8 levels times an FP8 block scale times the
global scale. Scaling a block by its amax never clips but wastes levels when one value stands out; a smaller FP8
block scale clips that value and rounds the rest finer. For each block the FP8 scale codes around the amax one are
tried, and for the global scale a few factors within an octave (which shifts the FP8 grid the block scales are
rounded to), keeping what minimizes the output error ``sum_j E[x_j^2] (w_j - q(w_j))^2`` (diagonal input covariance,
E[x^2] per input channel from calibration).
"""

from __future__ import annotations

import torch
from onnx import TensorProto

from contract import formats
from contract.errors import InputError
from contract.weight_formats import WEIGHT_FORMATS
from plugins.nvfp4 import schema as nvfp4_schema
from plugins.nvfp4.ort_lowering import lower_fp4 as ort_lowering  # noqa: F401  (the format's CPU lowering)
from plugins.nvfp4.reference import nvfp4_block_scales as activation_block_scales
from plugins.weight_formats.linear import (
    FP8,
    ExportGraph,
    QuantizedLinear,
    check_scale,
    check_shape,
    need,
)

FORMAT = WEIGHT_FORMATS["nvfp4"]
GROUP = formats.NVFP4_GROUP
FP16, FP4 = TensorProto.FLOAT16, TensorProto.FLOAT4E2M1
BLOCK_STEPS = (0, -1, -2, -3, 1)  # FP8 codes tried around the amax block scale (one code is 6-12%)
GLOBAL_FACTORS = (1.0, 2 ** -0.25, 2 ** -0.5, 2 ** -0.75)  # x the amax global scale: shifts the FP8 grid by 1/4 octave
FP8_MAX_CODE = 0x7E  # 448; 0x7F is NaN in E4M3FN


def unfit(shape: tuple[int, int]) -> str | None:
    """16-element groups along `in`."""
    if shape[1] % GROUP:
        return f"in_features {shape[1]} is not a multiple of {GROUP}"
    return None


def quantize(weight: torch.Tensor, input_amax: float | None, scales: dict | None = None) -> dict:
    """`scales` may give chosen (shared or searched) `weight_scale` / `weight_scale_2` instead of the amax ones."""
    scales = scales or {}
    packed, block_scale, global_scale = formats.quantize_nvfp4(
        weight, block_scale=scales.get("weight_scale"), global_scale=scales.get("weight_scale_2"))
    return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale,
            "input_scale": formats.nvfp4_global_scale(torch.tensor(input_amax))}


def config_json(exclude: list[str]) -> None:
    return None


# --- scale search and GPTQ ------------------------------------------------------------------------------------------

def _blocks(w: torch.Tensor) -> torch.Tensor:
    out, inp = w.shape
    return w.float().view(out, inp // GROUP, GROUP)


def _dequant(blocks: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    return formats.e2m1_qdq(blocks, (block_scale.float() * global_scale)[..., None])


def search_block_scales(w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor | None):
    """FP8 block scales ``[out, in/16]`` minimizing the h-weighted error per block, and that total error."""
    blocks = _blocks(w)
    weight = torch.ones(blocks.shape[1:]) if h is None else h.float().view(blocks.shape[1:])
    base = formats.nvfp4_block_scales(w, global_scale).view(torch.uint8).int()
    best, best_err = None, None
    for k in BLOCK_STEPS:
        code = (base + k).clamp(0, FP8_MAX_CODE).to(torch.uint8).view(formats.FP8_DTYPE)
        err = ((blocks - _dequant(blocks, code, global_scale)).pow(2) * weight).sum(-1)
        if best is None:
            best, best_err = code, err
        else:
            better = err < best_err
            best = torch.where(better, code.view(torch.uint8), best.view(torch.uint8)).view(formats.FP8_DTYPE)
            best_err = torch.minimum(err, best_err)
    return best, float(best_err.sum())


def group_scales(weights: dict[str, torch.Tensor], input_sq: dict, search: bool) -> dict[str, dict]:
    """`weight_scale` (FP8 blocks) and one shared `weight_scale_2` for the linears of one fusion group: amax
    scales, or (`search`) the global factor and block codes of least output error."""
    amax = max(float(w.float().abs().amax()) for w in weights.values())
    base = formats.nvfp4_global_scale(torch.tensor(amax))
    if not search:
        return {n: {"weight_scale": formats.nvfp4_block_scales(w, base), "weight_scale_2": base}
                for n, w in weights.items()}
    best, best_err = None, None
    for factor in GLOBAL_FACTORS:
        gs = (base * factor).float()
        found = {n: search_block_scales(w, gs, input_sq.get(n)) for n, w in weights.items()}
        err = sum(e for _, e in found.values())
        if best_err is None or err < best_err:
            best, best_err = {n: {"weight_scale": s, "weight_scale_2": gs} for n, (s, _) in found.items()}, err
    return best


def scale_error(w: torch.Tensor, scales: dict, h: torch.Tensor | None) -> float:
    """The h-weighted squared weight error of `w` with `scales` (h: E[x^2] per input channel, None: 1)."""
    blocks = _blocks(w)
    weight = torch.ones(blocks.shape[1:]) if h is None else h.float().view(blocks.shape[1:])
    dq = _dequant(blocks, scales["weight_scale"], scales["weight_scale_2"])
    return float(((blocks - dq).pow(2) * weight).sum())


def amax_scales(w: torch.Tensor) -> dict:
    """The scales ModelOpt's amax calibration gives `w` alone."""
    gs = formats.nvfp4_global_scale(w.float().abs().amax())
    return {"weight_scale": formats.nvfp4_block_scales(w, gs), "weight_scale_2": gs}


def gptq(w: torch.Tensor, h, scales: dict, search: bool, loop) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(GPTQ-rounded fp32 weight, plainly rounded fp32 weight, scales with the block scales GPTQ chose): the global
    scale is the chosen (shared) one; each group's block scale is chosen when the loop reaches it, from the
    error-updated weights (searched as above with `h.diag`, or from the amax). `loop(w, h, round_column)` is the
    GPTQ loop (`quantization.gptq`)."""
    out, n = w.shape
    gs = scales["weight_scale_2"].float().reshape(())
    block_scales = torch.zeros(out, n // GROUP, dtype=formats.FP8_DTYPE)
    step = torch.ones(out)

    def round_column(W1: torch.Tensor, i: int, col: int) -> torch.Tensor:
        nonlocal step
        if col % GROUP == 0:
            block = W1[:, i:i + GROUP]
            s = search_block_scales(block, gs, h.diag[col:col + GROUP])[0] if search else formats.nvfp4_block_scales(
                block, gs)
            block_scales[:, col // GROUP] = s[:, 0]
            step = s[:, 0].float() * gs
        return formats.e2m1_qdq(W1[:, i], step)

    q = loop(w, h, round_column)
    rtn = formats.dequantize_nvfp4(*formats.quantize_nvfp4(w, block_scale=scales["weight_scale"],
                                                           global_scale=scales["weight_scale_2"]))
    return q, rtn, {**scales, "weight_scale": block_scales}


# --- fake quantization ----------------------------------------------------------------------------------------------

def _qdq(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """`formats.e2m1_qdq` per block of 16 along the last axis (`step` ``[..., K/16]``)."""
    return formats.e2m1_qdq(x.unflatten(-1, (-1, GROUP)), step[..., None]).flatten(-2)


def weight_qdq(w: torch.Tensor) -> torch.Tensor:
    """= dequantize_nvfp4(*quantize_nvfp4(w)), without packing the codes."""
    global_scale = formats.nvfp4_global_scale(w.float().abs().amax())
    return _qdq(w.float(), formats.nvfp4_block_scales(w, global_scale).float() * global_scale)


def input_qdq(x: torch.Tensor, amax: float | None = None) -> torch.Tensor:
    """plugins/nvfp4/reference.py without its final fp16 roundings (a search needs the fp32 error only); `amax` the
    calibrated one (default x's own)."""
    amax = float(x.abs().amax()) if amax is None else amax
    if amax <= 0:
        return x.float()
    input_scale = amax / (formats.E2M1_MAX * formats.FP8_MAX)
    return _qdq(x.float(), activation_block_scales(x, input_scale).float() * input_scale)


# --- checkpoint and graph -------------------------------------------------------------------------------------------

def holds(module: str, tensors: dict) -> bool:
    return f"{module}.weight_scale_2" in tensors and f"{module}.weight_scale_inv" not in tensors


def read(module: str, tensors: dict, meta: dict) -> QuantizedLinear:
    """`meta["group_size"]`: the checkpoint's (default 16)."""
    what = f"format {FORMAT.name}"
    weight = need(tensors, f"{module}.weight", what, torch.uint8)
    scale = need(tensors, f"{module}.weight_scale", what, FP8)
    group = meta.get("group_size") or GROUP
    if weight.shape[1] * 2 % group:
        raise InputError(f"tensor {module}.weight: expected input features ({weight.shape[1] * 2}) in groups of "
                         f"group_size {group}, found a remainder")
    check_shape(f"{module}.weight_scale", scale, (weight.shape[0], weight.shape[1] * 2 // group))
    check_scale(f"{module}.weight_scale", scale, zero_ok=True)
    global_scale = check_scale(f"{module}.weight_scale_2", need(tensors, f"{module}.weight_scale_2", what),
                               scalar=True)
    input_scale = check_scale(f"{module}.input_scale", need(tensors, f"{module}.input_scale", what), scalar=True)
    return QuantizedLinear(module, FORMAT.name, weight, scale, global_scale, input_scale,
                           tensors.get(f"{module}.bias"), (1, group), packing=2)


def dequantize(linear: QuantizedLinear) -> torch.Tensor:
    return formats.dequantize_nvfp4(linear.weight, linear.weight_scale, linear.weight_scale_2, linear.block_size[1])


def graph_activation(g: ExportGraph, x: str, q: QuantizedLinear, name: str) -> str:
    """trt::TRT_FP4DynamicQuantize(x, input_scale) -> DQ of the FP8 block scales by fp16(input_scale) -> blocked DQ."""
    group = q.block_size[1]
    scale = g.scalar(f"{q.name}.input_scale", q.input_scale.float().reshape(()), torch.float32)
    xq, sq = g.op(nvfp4_schema.OP_TYPE, [x, scale], f"{name}/input_fp4", outputs=2, domain=nvfp4_schema.DOMAIN,
                  **nvfp4_schema.attrs(group))
    scale16 = g.op("Cast", [scale], f"{name}/input_scale_fp16", to=FP16)
    block_scale = g.op("DequantizeLinear", [sq, scale16], f"{name}/input_scale_dq")
    return g.op("DequantizeLinear", [xq, block_scale], f"{name}/input_dq", axis=-1, block_size=group)


def graph_weight(g: ExportGraph, q: QuantizedLinear, name: str) -> str:
    """FLOAT4E2M1 `[out, in]` (the packed bytes as stored) -> DQ(FP8 block scales, weight_scale_2) -> blocked DQ ->
    fp16 -> Transpose to `[in, out]`."""
    out, inp = q.shape
    w = g.add_raw(f"{q.name}.weight", q.weight.numpy(), FP4, (out, inp))
    block_scale = g.add_raw(f"{q.name}.weight_scale", q.weight_scale.view(torch.uint8).numpy(),
                            TensorProto.FLOAT8E4M3FN)
    global_scale = g.scalar(f"{q.name}.weight_scale_2", q.weight_scale_2.float().reshape(()), torch.float32)
    ws = g.op("DequantizeLinear", [block_scale, global_scale], f"{name}/weight_scale_dq")
    wd = g.op("DequantizeLinear", [w, ws], f"{name}/weight_dq", axis=-1, block_size=q.block_size[1])
    w16 = g.op("Cast", [wd], f"{name}/weight_fp16", to=FP16)
    return g.op("Transpose", [w16], f"{name}/weight_t", perm=[1, 0])


def recognize(dq, init, inits: dict, quantized_input: bool) -> bool:
    """A FLOAT4E2M1 weight."""
    return init.data_type == FP4
