"""NVFP4 for ONNX Runtime 1.32 CPU, which implements neither `trt::TRT_FP4DynamicQuantize` nor FLOAT4E2M1 DQ.

- Weights: the FLOAT4E2M1 `[out, in]` initializer becomes the same bytes typed uint8 `[out, in/2]`. Decoding starts
  with a `DequantizeLinear(bytes, 1.0)`: ORT's constant folding never folds a DequantizeLinear, so nothing after it
  is folded either and the weight stays 4-bit at rest (a BitwiseAnd/BitShift chain on the initializer would be folded
  into an fp32 `[out, in]` copy at session load). Then `hi = floor(b / 16)`, `lo = b - 16 hi` (exact in fp32), a
  16-entry E2M1 table Gather, times the DQ'd FP8 block scales (`weight_scale * weight_scale_2`, fp32). Exact.
- Activations: the quantize op becomes standard ops with the semantics of `reference.py` (block scale
  `fp8(min(amax / 6 / input_scale, 448))`, zero scale -> 1, E2M1 by midpoints, ties to the even code); its first output
  then carries the decoded E2M1 values (fp32) instead of FLOAT4 codes, and the blocked DQ that reads it becomes a Mul
  by the block scales. The FP8 block-scale output and its DQ stay as they are (ORT runs FP8 DQ).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from contract import formats
from plugins.graph_builder import GraphBuilder
from plugins.nvfp4 import schema

FP32, FP16, FP8, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.INT64
_LEVELS = formats.E2M1_LEVELS.numpy()


def _activation(node: onnx.NodeProto, ctx) -> list[onnx.NodeProto]:
    """TRT_FP4DynamicQuantize(x, input_scale) -> (fp32 E2M1 values [..., K], FP8 block scales [..., K/block])."""
    block = next(a.i for a in node.attribute if a.name == "block_size")
    b = ctx.builder(node.name)
    x, input_scale = node.input
    blocks = b.op("Reshape", [b.op("Cast", [x], to=FP32), b.const([0, 0, -1, block], np.int64)])
    amax = b.op("ReduceMax", [b.op("Abs", [blocks]), b.const([-1], np.int64)], keepdims=1)
    ratio = b.op("Div", [b.op("Div", [amax, b.const(formats.E2M1_MAX)]), input_scale])
    scale = b.op("Min", [ratio, b.const(formats.FP8_MAX)])
    b.op("Cast", [b.op("Squeeze", [scale, b.const([-1], np.int64)])], outputs=[node.output[1]], to=FP8)
    scale32 = b.op("Unsqueeze", [b.op("Cast", [node.output[1]], to=FP32), b.const([-1], np.int64)])
    safe = b.op("Where", [b.op("Equal", [scale32, b.const(0.0)]), b.const(1.0), scale32])
    scaled = b.op("Div", [blocks, b.op("Mul", [safe, input_scale])])
    # |v| against the 7 midpoints: a tie goes up only when the lower code is odd (ties to the even code)
    mids = (_LEVELS[1:] + _LEVELS[:-1]) / 2
    magnitude = b.op("Unsqueeze", [b.op("Abs", [scaled]), b.const([-1], np.int64)])
    tie_up = b.op("And", [b.op("Equal", [magnitude, b.const(mids)]), b.const(np.arange(7) % 2 == 1, np.bool_)])
    above = b.op("Or", [b.op("Greater", [magnitude, b.const(mids)]), tie_up])
    steps = b.op("Mul", [b.op("Cast", [above], to=FP32), b.const(np.diff(_LEVELS))])
    level = b.op("ReduceSum", [steps, b.const([-1], np.int64)], keepdims=0)
    signed = b.op("Where", [b.op("Less", [scaled, b.const(0.0)]), b.op("Neg", [level]), level])
    b.op("Reshape", [signed, b.const([0, 0, -1], np.int64)], outputs=[node.output[0]])
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


def lower_fp4(graph: onnx.GraphProto, ctx) -> None:
    """Rewrite, in place, every TRT_FP4DynamicQuantize and every DequantizeLinear of a FLOAT4E2M1 tensor."""
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    quantized = {n.output[0] for n in graph.node if (n.domain, n.op_type) == (schema.DOMAIN, schema.OP_TYPE)}
    nodes = []
    for node in graph.node:
        if (node.domain, node.op_type) == (schema.DOMAIN, schema.OP_TYPE):
            nodes += _activation(node, ctx)
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and node.input[0] in quantized:
            scale_type = _float_type(node.input[1], inits, producers)
            nodes += _dequantize(node, ctx, node.input[0], 3, scale_type)
        elif (node.op_type == "DequantizeLinear" and node.input[0] in inits
              and inits[node.input[0]].data_type == TensorProto.FLOAT4E2M1):
            b = ctx.builder(node.name)
            values = _weight_values(b, inits[node.input[0]])
            nodes += b.nodes + _dequantize(node, ctx, values, 2, _float_type(node.input[1], inits, producers))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
