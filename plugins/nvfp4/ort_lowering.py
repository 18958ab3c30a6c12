"""NVFP4 for ONNX Runtime 1.32 CPU, which implements neither `trt::TRT_FP4DynamicQuantize` nor FLOAT4E2M1 DQ.

- Weights: the FLOAT4E2M1 `[out, in]` initializer becomes the same bytes typed uint8 `[out, in/2]`. Decoding starts
  with a `DequantizeLinear(bytes, 1.0)`: ORT's constant folding never folds a DequantizeLinear, so nothing after it
  is folded either and the weight stays 4-bit at rest (a BitwiseAnd/BitShift chain on the initializer would be folded
  into an fp32 `[out, in]` copy at session load). Then `hi = floor(b / 16)`, `lo = b - 16 hi` (exact in fp32), a
  16-entry E2M1 table Gather, times the DQ'd FP8 block scales (`weight_scale * weight_scale_2`, fp32). Exact.
- Activations: the quantize op and the two DequantizeLinear that read it (contracts.md 2.1) become one chain of
  standard ops with the semantics of `reference.py` (block scale `fp8(min(amax / 6 / input_scale, 448))`, E2M1 to
  nearest with ties to the even code, `level * block scale * input_scale` with the graph's roundings), written so
  that it runs in few nodes (`_activation`): it runs for every quantized linear at every step.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto

from contract import formats
from contract.errors import InputError
from plugins.graph_builder import GraphBuilder
from plugins.nvfp4 import schema

FP32, FP16, FP8, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.INT64
_LEVELS = formats.E2M1_LEVELS.numpy()


def _activation(quantize: onnx.NodeProto, dq_scale: onnx.NodeProto, dq: onnx.NodeProto, scale_type: int,
                ctx) -> list[onnx.NodeProto]:
    """`dq(quantize(x, input_scale)[0], dq_scale(quantize(...)[1], s))` (contracts.md 2.1) as standard ops that write
    `dq`'s output, the fake-quantized activation, with the semantics of `reference.py`:

    - block scale `fp8(amax / 6 / input_scale)`: the Cast to FP8 saturates at 448 as the reference's clamp does;
    - E2M1 by a magic-number add: with `c = 1.5 * 2**23 * step`, fp32 `(v + c) - c` is `v` rounded to a multiple of
      `step`, ties to the even multiple, and as `c / step` is even that is the even E2M1 code. The step is the E2M1
      spacing at |v| (0.5 below 2, 1 below 4, 2 above), then the level is clipped to +-6. A block whose FP8 scale is
      0 divides by the smallest FP8 scale instead of 1, which changes only levels that its 0 scale multiplies away;
    - dequantized as the two DQs do: `level * (scale * s)`, each product rounded to `s`'s dtype (read through
      explicit Casts: ORT CPU runs fp16 Mul/DQ in fp32 and would drop those roundings).

    About seventeen nodes once ORT has folded the constants (and the engine's fast form has merged the two
    DequantizeLinear of the scale, which read the same fp32 scale after `widen_to_fp32`): this chain runs for every
    quantized GEMM input at every step."""
    block = next(a.i for a in quantize.attribute if a.name == "block_size")
    b = ctx.builder(quantize.name)
    x, input_scale = quantize.input
    blocks = b.op("Reshape", [b.op("Cast", [x], to=FP32), b.const([0, 0, -1, block], np.int64)])
    amax = b.op("ReduceMax", [b.op("Abs", [blocks]), b.const([-1], np.int64)], keepdims=1)
    scale = b.op("Cast", [b.op("Div", [b.op("Div", [amax, b.const(formats.E2M1_MAX)]), input_scale])], to=FP8)
    # divide by scale * input_scale (fp32); a zero scale by the smallest FP8 scale's instead (ORT folds that constant)
    smallest = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).smallest_subnormal)
    divisor = b.op("Max", [b.op("DequantizeLinear", [scale, input_scale]),
                           b.op("Mul", [b.const(smallest), input_scale])])
    scaled = b.op("Div", [blocks, divisor])
    # trunc(clip(v, -4, 4)) in -4..4 picks the step; Gather reads a negative index from the table's end
    binade = b.op("Cast", [b.op("Clip", [scaled, b.const(-4.0), b.const(4.0)])], to=INT64)
    steps = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 0.5])  # trunc 0, 1, 2, 3, 4, then -4, -3, -2, -1
    magic = b.op("Gather", [b.const(1.5 * 2**23 * steps), binade], axis=0)
    level = b.op("Clip", [b.op("Sub", [b.op("Add", [scaled, magic]), magic]), b.const(-formats.E2M1_MAX),
                          b.const(formats.E2M1_MAX)])
    block_scale = b.op("DequantizeLinear", [scale, dq_scale.input[1]])  # the first DQ, in its scale's dtype
    if scale_type != FP32:
        block_scale = b.op("Cast", [block_scale], to=FP32)
    values = b.op("Reshape", [b.op("Mul", [level, block_scale]), b.const([0, 0, -1], np.int64)])
    b.op("Cast", [values], outputs=[dq.output[0]], to=scale_type)
    return b.nodes


def _weight_values(b: GraphBuilder, init: onnx.TensorProto) -> str:
    """Retype the FLOAT4E2M1 initializer as its packed uint8 bytes; return fp32 E2M1 values `[out, in/2, 2]`."""
    out, inp = init.dims
    init.data_type = TensorProto.UINT8
    del init.dims[:]
    init.dims.extend([out, inp // 2])
    byte = b.op("DequantizeLinear", [init.name, b.const(1.0)])  # not constant-folded by ORT: keeps bytes at rest
    hi = b.op("Floor", [b.op("Mul", [byte, b.const(1 / 16)])])
    lo = b.op("Sub", [byte, b.op("Mul", [hi, b.const(16.0)])])
    axis = b.const([-1], np.int64)
    codes = b.op("Concat", [b.op("Unsqueeze", [lo, axis]), b.op("Unsqueeze", [hi, axis])], axis=-1)
    table = np.concatenate([_LEVELS, -_LEVELS])
    return b.op("Gather", [b.const(table), b.op("Cast", [codes], to=INT64)], axis=0)


def _dequantize(node: onnx.NodeProto, ctx, values: str, rank: int, scale_type: int) -> list[onnx.NodeProto]:
    """Blocked DQ of decoded values: `values[..., j] * scale[..., j // block]`, rounded once to the scale's dtype.

    An fp16 scale is read through an explicit `Cast` to fp32 and the exact fp32 product is `Cast` back: ORT CPU runs
    fp16 DQ/Mul in fp32 and drops the fp16 roundings between the casts it inserts itself, which would multiply by the
    unrounded fp32 block scale; explicit casts keep the graph's (and `reference.py`'s) fp16 rounding of the scale.
    """
    block = next(a.i for a in node.attribute if a.name == "block_size")
    b = ctx.builder(node.name)
    scale = node.input[1] if scale_type == FP32 else b.op("Cast", [node.input[1]], to=FP32)
    blocks = b.op("Reshape", [values, b.const([0] * (rank - 1) + [-1, block], np.int64)])
    scaled = b.op("Mul", [blocks, b.op("Unsqueeze", [scale, b.const([-1], np.int64)])])
    shape = b.const([0] * (rank - 1) + [-1], np.int64)
    if scale_type == FP32:
        b.op("Reshape", [scaled, shape], outputs=[node.output[0]])
    else:
        b.op("Cast", [b.op("Reshape", [scaled, shape])], outputs=[node.output[0]], to=scale_type)
    return b.nodes


def _float_type(name: str, inits: dict, producers: dict) -> int:
    """The float dtype of a DQ scale: an initializer's, a Cast's `to`, or (a DQ's output) that DQ's scale's."""
    if name in inits:
        return inits[name].data_type
    node = producers[name]
    if node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to")
    if node.op_type == "DequantizeLinear":
        return _float_type(node.input[1], inits, producers)
    raise ValueError(f"cannot tell the dtype of DQ scale {name} (made by {node.op_type})")


def _activation_pattern(readers: dict[str, list[onnx.NodeProto]], quantize: onnx.NodeProto
                        ) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The two DequantizeLinear of contracts.md 2.1 that read a TRT_FP4DynamicQuantize: (DQ of its block scales, the
    blocked DQ of its values by that DQ's output); InputError for any other use of its outputs. `readers`: the nodes
    reading each value of the graph."""
    values, scales = readers.get(quantize.output[0], []), readers.get(quantize.output[1], [])
    if len(scales) == 1 and scales[0].op_type == "DequantizeLinear" and len(values) == 1:
        dq_scale, dq = scales[0], values[0]
        if (dq.op_type == "DequantizeLinear" and list(dq.input[:2]) == [quantize.output[0], dq_scale.output[0]]
                and readers.get(dq_scale.output[0]) == [dq]):
            return dq_scale, dq
    raise InputError(f"node {quantize.name!r}: expected its outputs read by DequantizeLinear(block scales) and the "
                     "blocked DequantizeLinear of its values by that (contracts.md 2.1), found another use")


def lower_fp4(graph: onnx.GraphProto, ctx) -> None:
    """Rewrite, in place, every TRT_FP4DynamicQuantize (with the two DQs that read it) and every DequantizeLinear of
    a FLOAT4E2M1 tensor."""
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):  # a node reading a value twice counts once
            readers.setdefault(name, []).append(node)
    patterns = {}  # the blocked DQ of an activation -> (its quantize node, the DQ of the block scales)
    for node in graph.node:
        if (node.domain, node.op_type) == (schema.DOMAIN, schema.OP_TYPE):
            dq_scale, dq = _activation_pattern(readers, node)
            patterns[dq.name or dq.output[0]] = (node, dq_scale)
    replaced = {n.output[0] for q, d in patterns.values() for n in (q, d)}
    nodes = []
    for node in graph.node:
        key = node.name or node.output[0]
        if node.output[0] in replaced:
            continue
        if node.op_type == "DequantizeLinear" and key in patterns:
            quantize, dq_scale = patterns[key]
            nodes += _activation(quantize, dq_scale, node, _float_type(dq_scale.input[1], inits, producers), ctx)
        elif (node.op_type == "DequantizeLinear" and node.input[0] in inits
              and inits[node.input[0]].data_type == TensorProto.FLOAT4E2M1):
            b = ctx.builder(node.name)
            values = _weight_values(b, inits[node.input[0]])
            nodes += b.nodes + _dequantize(node, ctx, values, 2, _float_type(node.input[1], inits, producers))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
