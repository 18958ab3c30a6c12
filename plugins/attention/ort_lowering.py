"""`AttentionPlugin` for ONNX Runtime (CPU), under the "ORT engine" KV contract of contracts.md section 3.1.

ORT cannot alias an output to an input, so the lowered graph takes only the filled cache prefix
`past [B,2,Hkv,P,D]` (P = max(kvcache_start_index), may be 0) and returns only this call's K/V
`present [B,2,Hkv,S,D]` in the cache dtype; the runtime writes them into its own cache. Per layer:

    qkv ─Split─► qk, v ─(RMSNorm)─► RotaryEmbedding (fp32) ─► q, k
    new kv = [k ‖ v] as [B,2,Hkv,S,D] = present  (FP8: QuantizeLinear; attention reads it back with DequantizeLinear)
    keys/values = fp32 [past ‖ new] ─► softmax(q·kᵀ·scale + mask)·v as fp32 MatMuls, query heads grouped per kv head
    padded query rows ─Where─► 0

Why not the opset-23 `Attention` op: it runs in ORT 1.32 (with GQA) and gives the same numbers, but measured on a
30-layer SmolLM2-shaped decode step its fp16 kernel took about twice the CPU time of these fp32 MatMuls (MLAS).
Grouping the Hq/Hkv query heads of each kv head into the rows of one MatMul ([B,Hkv,G·S,D] against [B,Hkv,T,D])
is GQA without repeating K/V.

The mask, the RoPE cos/sin rows and the valid-row mask depend only on the shared graph inputs, so they are built
once per graph and shared by every layer: slot t of `[past ‖ new]` is visible to query i of row b iff
`t < kvcache_start_index[b]` (its own prefix) or `P <= t <= P + i` (causal among the new tokens).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llm_loader.errors import InputError
from plugins.attention.schema import DOMAIN, OP_TYPE, read_attrs

F16, F32, FP8 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN


class _Builder:
    """Appends nodes with fresh names; `op(...)` returns the output name(s)."""

    def __init__(self, ctx, prefix: str, sink: list):
        self.ctx, self.prefix, self.nodes = ctx, prefix, sink

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: str | None = None, domain: str = "", **attrs):
        outs = [out] if out else [self.ctx.name(f"{self.prefix}/{op_type}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.ctx.name(f"{self.prefix}/{op_type}"), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, values, dtype) -> str:
        return self.ctx.const(f"{self.prefix}/const", numpy_helper.from_array(np.asarray(values, dtype=dtype)))

    def ints(self, *values: int) -> str:
        """An int64 vector (shapes, axes; 0 in a Reshape shape copies that dim)."""
        return self.const(list(values), np.int64)


def _shared_inputs(ctx, qkv: str, past: str, lengths: str, rope: str, starts: str, group: int):
    """Per-graph tensors: RoPE cos/sin rows [B,S,rd/2], the additive mask [B,1,G·S,P+S], valid rows [B,S,1,1]."""

    def build():
        g = _Builder(ctx, "attention_shared", ctx.pending)
        seq = g.op("Squeeze", [g.op("Shape", [qkv], start=1, end=2)])  # S
        past_len = g.op("Squeeze", [g.op("Shape", [past], start=3, end=4)])  # P
        zero, one = g.const(0, np.int64), g.const(1, np.int64)
        steps = g.op("Range", [zero, seq, one])  # [S]
        starts64 = g.op("Cast", [starts], to=TensorProto.INT64)
        # RoPE rows at positions start + i, clamped into the table (padded rows only; their outputs are discarded)
        positions = g.op("Add", [g.op("Unsqueeze", [starts64, g.ints(1)]), steps])  # [B,S]
        table = g.op("Squeeze", [rope, g.ints(0)])  # [R, rd]
        last_row = g.op("Sub", [g.op("Shape", [table], start=0, end=1), one])
        rows = g.op("Gather", [table, g.op("Min", [positions, last_row])], axis=0)  # [B,S,rd]
        cos, sin = g.op("Split", [rows], n_out=2, axis=-1, num_outputs=2)
        # mask over the slots t of [past ‖ new]
        slots = g.op("Range", [zero, g.op("Add", [seq, past_len]), one])  # [P+S]
        own_prefix = g.op("Less", [slots, g.op("Unsqueeze", [starts64, g.ints(1, 2)])])  # [B,1,P+S]
        new_slot = g.op("GreaterOrEqual", [slots, past_len])  # [P+S]
        causal = g.op("LessOrEqual", [slots, g.op("Add", [g.op("Unsqueeze", [steps, g.ints(1)]), past_len])])  # [S,P+S]
        visible = g.op("Unsqueeze", [g.op("Or", [own_prefix, g.op("And", [new_slot, causal])]), g.ints(1)])  # [B,1,S,P+S]
        additive = g.op("Where", [visible, g.const(0.0, np.float32), g.const(-np.inf, np.float32)])
        mask = g.op("Tile", [additive, g.ints(1, 1, group, 1)])  # rows ordered (g, i), like the grouped queries
        lengths64 = g.op("Cast", [lengths], to=TensorProto.INT64)
        valid = g.op("Less", [steps, g.op("Unsqueeze", [lengths64, g.ints(1)])])  # [B,S]
        valid = g.op("Unsqueeze", [valid, g.ints(2, 3)])  # [B,S,1,1]
        return cos, sin, mask, valid

    return ctx.shared_value(("attention", lengths, rope, starts, group), build)


def lower_attention(node: onnx.NodeProto, ctx) -> list[onnx.NodeProto]:
    a = read_attrs(node)
    qkv, past, lengths, rope, starts = node.input[:5]
    attn_out, present_out = node.output
    hq, hkv, d, group = a.num_q_heads, a.num_kv_heads, a.head_size, a.group_size
    rotary_dim = _static_dim(ctx.inputs.get(rope), 2)
    if rotary_dim is None:
        raise InputError(f"{rope}: expected a graph input with a static last dim (rotary_dim) for node {node.name!r}, found none")
    cos, sin, mask, valid = _shared_inputs(ctx, qkv, past, lengths, rope, starts, group)

    nodes: list[onnx.NodeProto] = []
    g = _Builder(ctx, node.name or "attention", nodes)
    # 1-3: split, Qwen3 q/k norm, RoPE (q and k side by side as Hq+Hkv heads)
    qk, v = g.op("Split", [qkv, g.ints((hq + hkv) * d, hkv * d)], n_out=2, axis=-1)
    qk = g.op("Cast", [qk], to=F32)
    if a.enable_qk_norm:
        q_gamma, k_gamma = node.input[5:7]
        gamma = g.op("Concat", [g.op("Expand", [q_gamma, g.ints(hq, d)]), g.op("Expand", [k_gamma, g.ints(hkv, d)])], axis=0)
        heads = g.op("Reshape", [qk, g.ints(0, 0, hq + hkv, d)])
        normed = g.op("RMSNormalization", [heads, g.const(np.ones(d), np.float32)], axis=-1, epsilon=a.rms_norm_eps)
        # as HF: the normalized value is rounded to fp16 before the fp16 gamma multiplies it
        heads = g.op("Mul", [g.op("Cast", [normed], to=F16), gamma])
        qk = g.op("Cast", [g.op("Reshape", [heads, g.ints(0, 0, (hq + hkv) * d)])], to=F32)
    qk = g.op("RotaryEmbedding", [qk, cos, sin], num_heads=hq + hkv, rotary_embedding_dim=rotary_dim)
    q, k = g.op("Split", [g.op("Cast", [qk], to=F16), g.ints(hq * d, hkv * d)], n_out=2, axis=-1)

    # 4-5: this call's K/V in the cache dtype (= present), and what attention reads: fp32 [past ‖ new]
    new_kv = g.op("Reshape", [g.op("Concat", [k, v], axis=-1), g.ints(0, 0, 2, hkv, d)])
    new_kv = g.op("Transpose", [new_kv], perm=[0, 2, 3, 1, 4])  # [B,S,2,Hkv,D] -> [B,2,Hkv,S,D]
    if a.enable_fp8_kv_cache:
        q_scale, k_scale, v_scale = a.qkv_scales
        kv_scales = g.const([k_scale, v_scale], np.float32)
        g.op("QuantizeLinear", [g.op("Cast", [new_kv], to=F32), kv_scales], out=present_out, axis=1, output_dtype=FP8, saturate=1)
        new_kv = g.op("DequantizeLinear", [present_out, kv_scales], axis=1)
        kv = g.op("Concat", [g.op("DequantizeLinear", [past, kv_scales], axis=1), new_kv], axis=3)
        qs = g.const(q_scale, np.float32)
        q = g.op("QuantizeLinear", [g.op("Cast", [q], to=F32), qs], output_dtype=FP8, saturate=1)
        q = g.op("DequantizeLinear", [q, qs])
    else:
        g.op("Identity", [new_kv], out=present_out)
        kv = g.op("Cast", [g.op("Concat", [past, present_out], axis=3)], to=F32)
    keys, values = g.op("Split", [kv], n_out=2, axis=1, num_outputs=2)
    keys, values = (g.op("Squeeze", [t, g.ints(1)]) for t in (keys, values))  # [B,Hkv,P+S,D]

    # 6: grouped-query attention; query head h = kv_head * G + g, rows of a kv head ordered (g, i)
    q = g.op("Transpose", [g.op("Reshape", [q, g.ints(0, 0, hkv, group, d)])], perm=[0, 2, 3, 1, 4])
    q = g.op("Cast", [g.op("Reshape", [q, g.ints(0, hkv, -1, d)])], to=F32)  # [B,Hkv,G*S,D]
    scores = g.op("FusedMatMul", [q, keys], domain="com.microsoft", transB=1, alpha=a.attention_scale)
    out = g.op("MatMul", [g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1), values])  # [B,Hkv,G*S,D]
    out = g.op("Transpose", [g.op("Reshape", [out, g.ints(0, hkv, group, -1, d)])], perm=[0, 3, 1, 2, 4])
    out = g.op("Cast", [g.op("Reshape", [out, g.ints(0, 0, hq, d)])], to=F16)  # [B,S,Hq,D]
    # 7: right-padding rows are zeros
    g.op("Where", [valid, out, g.const(0, np.float16)], out=attn_out)
    ctx.used_domains.add("com.microsoft")

    ctx.set_dim(past, 3, "past_len")
    ctx.set_dim(present_out, 3, "seq_len")
    return nodes


def _static_dim(info: onnx.ValueInfoProto | None, axis: int) -> int | None:
    if info is None:
        return None
    dims = info.type.tensor_type.shape.dim
    return dims[axis].dim_value if len(dims) > axis and dims[axis].HasField("dim_value") else None


ORT_LOWERING = {(DOMAIN, OP_TYPE): lower_attention}
