"""`AttentionPlugin` for ONNX Runtime (CPU), under the "ORT engine" KV contract of contracts.md section 3.1.

ORT cannot alias a graph output to an input, but its `com.microsoft.GroupQueryAttention` (GQA) kernel can update
a KV buffer in place when the caller binds the same buffer as past and present. So each layer's cache becomes two
graph inputs, `{past}.key` and `{past}.value` `[B,Hkv,·,D]`, and two outputs `{present}.key`/`.value`, in one of
two forms that the runtime tells apart by the outputs' sequence dim:

- in place (`kv_capacity`), the fast path: GQA does RoPE, the KV write at `kvcache_start_index` and grouped-query
  attention in one kernel (Qwen3's Q/K norm runs before it); past and present are the whole cache, bound to the
  same buffers. `query_seqlens` = `context_lengths` handles right padding and rows that sit a call out. (The
  opset-23 `Attention` op returns past ‖ new as a new tensor, a copy of the cache per step; GQA writes in place.)
- prefix in, new K/V out (`past_len` / `seq_len`), for what GQA cannot do on CPU: an FP8 cache (its CPU kernel has
  no float8 cache, and the contract also quantizes Q), or a RoPE width that is not a multiple of 16. The runtime
  passes the filled prefix and writes the returned K/V into its cache itself. Per layer:

    qkv ─Split─► qk, v ─(RMSNorm)─► RotaryEmbedding (fp32) ─► q, k
    new k, v as [B,Hkv,S,D] = present  (FP8: QuantizeLinear; attention reads it back with DequantizeLinear)
    keys/values = fp32 [past ‖ new] ─► softmax(q·kᵀ·scale + mask)·v as fp32 MatMuls, query heads grouped per kv head

  Grouping the Hq/Hkv query heads of each kv head into the rows of one MatMul ([B,Hkv,G·S,D] against [B,Hkv,T,D])
  is GQA without repeating K/V. Slot t of `[past ‖ new]` is visible to query i of row b iff
  `t < kvcache_start_index[b]` (its own prefix) or `P <= t <= P + i` (causal among the new tokens).

Tree attention (`enable_tree_attention=1`, the EAGLE3 base and draft) keeps both forms: RoPE takes the positions
from `attention_pos_id`, and the bit-packed `attention_mask` becomes a boolean visibility over the call's slots (own
prefix, plus the new tokens the mask lets each one see), which GQA takes as its additive `attention_bias` and the
prefix form adds to its scores. Both forms zero the right-padding rows of `attn`. The tensors that depend only on shared graph inputs (RoPE tables,
masks, sequence lengths) are built once per graph and shared by every layer. The graph is written in fp16, like
the plugin's contract; `plugins.lowering.widen_to_fp32` then makes the engine compute in fp32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from contract.errors import InputError
from contract.graph_io import TREE_MASK_BITS
from contract.kv import KV_IN_PLACE, KV_PREFIX, ORT_KV_HALVES, KvDtype
from plugins.attention.schema import DOMAIN, OP_TYPE, read_attrs
from plugins.graph_builder import GraphBuilder

F16, F32, FP8 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN


def _cache_io(ctx, node: onnx.NodeProto, hkv: int, d: int, seq_dims: tuple[str, str]) -> tuple[str, str, str, str]:
    """Replace the layer's `[B,2,Hkv,T,D]` cache input and output by `.key` / `.value` halves `[B,Hkv,T,D]` whose
    sequence dims are named `seq_dims` (past, present); returns (past k, past v, present k, present v)."""
    names = []
    for io, name, dim in ((ctx.inputs, node.input[1], seq_dims[0]), (ctx.outputs, node.output[1], seq_dims[1])):
        info = io.get(name)
        if info is None:
            raise InputError(f"node {node.name!r}: expected its KV cache {name!r} to be a graph input/output, "
                             "found none")
        dtype = info.type.tensor_type.elem_type
        halves = [helper.make_tensor_value_info(f"{name}.{kind}", dtype, ["batch", hkv, dim, d])
                  for kind in ORT_KV_HALVES]
        ctx.replace_io(name, *halves)
        names += [h.name for h in halves]
    return tuple(names)


def kv_io_form(kv_dtype: KvDtype, rotary_dim: int) -> str:
    """The ORT engine's KV form (`KV_IO_FORMS`) for a layer; the builder records it in builder_config.kv_io."""
    return KV_PREFIX if kv_dtype is KvDtype.FP8 or rotary_dim % 16 else KV_IN_PLACE


def lower_attention(node: onnx.NodeProto, ctx) -> list[onnx.NodeProto]:
    a = read_attrs(node)
    rotary_dim = _static_dim(ctx.inputs.get(node.input[3]), 2)
    if rotary_dim is None:
        raise InputError(f"{node.input[3]}: expected a graph input with a static last dim (rotary_dim) for node "
                         f"{node.name!r}, found none")
    if kv_io_form(a.kv_dtype, rotary_dim) == KV_PREFIX:
        return _lower_prefix_form(node, ctx, a, rotary_dim)
    return _lower_in_place(node, ctx, a)


def _lower_in_place(node: onnx.NodeProto, ctx, a) -> list[onnx.NodeProto]:
    """One GroupQueryAttention node on the whole cache, updated in place (see the module doc)."""
    qkv, _, lengths, rope, starts = node.input[:5]
    tree = tuple(node.input[-2:]) if a.enable_tree_attention else ()
    past_k, past_v, present_k, present_v = _cache_io(ctx, node, a.num_kv_heads, a.head_size, ("kv_capacity",) * 2)

    def build():
        g = ctx.builder("attention_shared", ctx.pending)
        table = g.op("Cast", [g.op("Squeeze", [rope, g.ints(0)])], to=F16)  # [R, rd]: cos | sin halves
        cos, sin = g.op("Split", [table], outputs=2, axis=-1, num_outputs=2)
        capacity = g.op("Cast", [g.op("Squeeze", [g.op("Shape", [past_k], start=2, end=3), g.ints(0)])],
                        to=TensorProto.INT32)
        seq = g.op("Cast", [g.op("Squeeze", [g.op("Shape", [qkv], start=1, end=2), g.ints(0)])], to=TensorProto.INT32)
        # seqlens_k = tokens cached after the call - 1. A row that sits the call out (context length 0) keeps its
        # cache; GQA only needs 1 <= its count <= capacity - S, and its outputs are discarded, so clamp it there.
        zero, one = g.const(0, np.int32), g.const(1, np.int32)
        idle = g.op("Max", [g.op("Min", [starts, g.op("Sub", [capacity, seq])]), one])
        total = g.op("Where", [g.op("Greater", [lengths, zero]), g.op("Add", [starts, lengths]), idle])
        seqlens_k = g.op("Sub", [total, one])
        longest = g.op("ReduceMax", [total], keepdims=0)  # GQA sizes its scratch by this bound
        steps = g.op("Range", [zero, seq, one])
        valid = g.op("Less", [steps, g.op("Unsqueeze", [lengths, g.ints(1)])])
        valid = g.op("Unsqueeze", [valid, g.ints(2)])  # [B,S,1]
        positions = bias = ""
        if tree:  # RoPE at attention_pos_id; the slots [0, longest) each token sees, as GQA's additive bias
            mask, pos_id = tree
            positions = g.op("Cast", [pos_id], to=TensorProto.INT64)
            starts64 = g.op("Cast", [starts], to=TensorProto.INT64)
            slots = g.op("Range", [g.const(0, np.int64), g.op("Cast", [longest], to=TensorProto.INT64),
                                   g.const(1, np.int64)])
            visible = _tree_visible(g, mask, qkv, slots, starts64, starts64)  # [B,S,T]
            bias = g.op("Where", [g.op("Unsqueeze", [visible, g.ints(1)]), g.const(0.0, np.float16),
                                  g.const(-np.inf, np.float16)])  # [B,1,S,T]
        return cos, sin, longest, seqlens_k, valid, positions, bias

    # every layer has the same S and capacity: the first layer's tensors give them to all
    cos, sin, longest, seqlens_k, valid, positions, bias = ctx.shared_value(
        ("attention_in_place", lengths, rope, starts, *tree), build)
    g = ctx.builder(node.name or "attention")
    query, key, value = qkv, "", ""  # packed QKV
    if a.enable_qk_norm:  # GQA's own Q/K-norm inputs are CUDA/WebGPU only in ORT 1.32: normalize before it
        hq, hkv, d = a.num_q_heads, a.num_kv_heads, a.head_size
        qk, value = g.op("Split", [qkv, g.ints((hq + hkv) * d, hkv * d)], outputs=2, axis=-1)
        qk = _qk_norm(g, g.op("Cast", [qk], to=F32), a, *node.input[5:7])
        query, key = g.op("Split", [qk, g.ints(hq * d, hkv * d)], outputs=2, axis=-1)
    # GroupQueryAttention's inputs by position (ORT 1.32): query, key, value, past_key, past_value, seqlens_k,
    # total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias, head_sink, k_scale, v_scale,
    # q_norm_weight, k_norm_weight, query_seqlens
    inputs = [query, key, value, past_k, past_v, seqlens_k, longest, cos, sin, positions, bias, "", "", "", "", "",
              lengths]
    attrs = dict(num_heads=a.num_q_heads, kv_num_heads=a.num_kv_heads, scale=a.attention_scale, do_rotary=1)
    gqa_outputs = [ctx.names.fresh(f"{node.name}/gqa"), present_k, present_v]
    out = g.op("GroupQueryAttention", inputs, outputs=gqa_outputs, domain="com.microsoft", **attrs)[0]
    out = g.op("Where", [valid, out, g.const(0, np.float16)])  # right-padding rows: zeros, as the contract says
    g.op("Reshape", [out, g.ints(0, 0, a.num_q_heads, a.head_size)], outputs=[node.output[0]])
    ctx.used_domains.add("com.microsoft")
    return g.nodes


def _tree_visible(g: GraphBuilder, mask: str, qkv: str, slots: str, starts64: str, new_base: str) -> str:
    """bool `[B,S,T]` over `slots` (int64 `[T]`): slot t is visible to new token i of row b when it is in the row's
    own prefix (`t < starts64[b]`), or it holds new token `j = t - new_base[b]` (`0 <= j < S`) with `j <= i` and
    bit j of row i of the packed `attention_mask` set (contracts.md 3.1, step 6t)."""
    seq = g.op("Shape", [qkv], start=1, end=2)  # [1] int64
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    steps = g.op("Range", [zero, g.op("Squeeze", [seq]), one])  # [S]
    # unpack: word [B,S,W] & 2^k for k < 32 -> flags [B,S,W*32], the first S of them
    powers = np.array([1 << k for k in range(TREE_MASK_BITS)], np.int64).astype(np.uint32).view(np.int32)
    flags = g.op("BitwiseAnd", [g.op("Unsqueeze", [mask, g.ints(3)]), g.const(powers, np.int32)])
    flags = g.op("Reshape", [g.op("Not", [g.op("Equal", [flags, g.const(0, np.int32)])]), g.ints(0, 0, -1)])
    flags = g.op("Slice", [flags, g.ints(0), seq, g.ints(2)])  # [B,S,S]
    earlier = g.op("LessOrEqual", [steps, g.op("Unsqueeze", [steps, g.ints(1)])])  # [S,S]: j <= i
    tree = g.op("And", [flags, earlier])
    # slot t -> new token j = t - new_base[b]
    rel = g.op("Sub", [g.op("Unsqueeze", [slots, g.ints(0)]), g.op("Unsqueeze", [new_base, g.ints(1)])])  # [B,T]
    is_new = g.op("And", [g.op("GreaterOrEqual", [rel, zero]), g.op("Less", [rel, seq])])
    index = g.op("Clip", [rel, zero, g.op("Squeeze", [g.op("Sub", [seq, one])])])
    batch = g.op("Shape", [mask], start=0, end=1)  # (rel has batch 1 when new_base is one shared offset)
    index = g.op("Expand", [g.op("Unsqueeze", [index, g.ints(1)]), g.op("Concat", [batch, seq, g.ints(1)], axis=0)])
    seen = g.op("And", [g.op("Unsqueeze", [is_new, g.ints(1)]), g.op("GatherElements", [tree, index], axis=2)])
    own_prefix = g.op("Less", [g.op("Unsqueeze", [slots, g.ints(0)]), g.op("Unsqueeze", [starts64, g.ints(1)])])
    return g.op("Or", [g.op("Unsqueeze", [own_prefix, g.ints(1)]), seen])


def _shared_prefix_inputs(ctx, qkv: str, past: str, lengths: str, rope: str, starts: str, group: int,
                          tree: tuple[str, ...] = ()):
    """Per-graph tensors of the prefix form: RoPE cos/sin rows [B,S,rd/2], the additive mask [B,1,G·S,P+S], valid
    rows [B,S,1,1]; `tree` = (attention_mask, attention_pos_id) with tree attention."""

    def build():
        g = ctx.builder("attention_shared", ctx.pending)
        seq = g.op("Squeeze", [g.op("Shape", [qkv], start=1, end=2)])  # S
        past_len = g.op("Squeeze", [g.op("Shape", [past], start=2, end=3)])  # P
        zero, one = g.const(0, np.int64), g.const(1, np.int64)
        steps = g.op("Range", [zero, seq, one])  # [S]
        starts64 = g.op("Cast", [starts], to=TensorProto.INT64)
        # RoPE rows at positions start + i (tree: attention_pos_id), clamped into the table (padded rows only;
        # their outputs are discarded)
        if tree:
            positions = g.op("Cast", [tree[1]], to=TensorProto.INT64)
        else:
            positions = g.op("Add", [g.op("Unsqueeze", [starts64, g.ints(1)]), steps])  # [B,S]
        table = g.op("Squeeze", [rope, g.ints(0)])  # [R, rd]
        last_row = g.op("Sub", [g.op("Shape", [table], start=0, end=1), one])
        rows = g.op("Gather", [table, g.op("Clip", [positions, zero, g.op("Squeeze", [last_row])])], axis=0)
        cos, sin = g.op("Split", [rows], outputs=2, axis=-1, num_outputs=2)
        # mask over the slots t of [past ‖ new]
        slots = g.op("Range", [zero, g.op("Add", [seq, past_len]), one])  # [P+S]
        if tree:
            new_base = g.op("Shape", [past], start=2, end=3)  # [1]: the new tokens follow the P prefix slots
            visible = g.op("Unsqueeze", [_tree_visible(g, tree[0], qkv, slots, starts64, new_base), g.ints(1)])
        else:
            own_prefix = g.op("Less", [slots, g.op("Unsqueeze", [starts64, g.ints(1, 2)])])  # [B,1,P+S]
            new_slot = g.op("GreaterOrEqual", [slots, past_len])  # [P+S]
            causal = g.op("LessOrEqual", [slots, g.op("Add", [g.op("Unsqueeze", [steps, g.ints(1)]), past_len])])
            visible = g.op("Unsqueeze", [g.op("Or", [own_prefix, g.op("And", [new_slot, causal])]), g.ints(1)])
        additive = g.op("Where", [visible, g.const(0.0, np.float32), g.const(-np.inf, np.float32)])  # [B,1,S,P+S]
        mask = g.op("Tile", [additive, g.ints(1, 1, group, 1)])  # rows ordered (g, i), like the grouped queries
        lengths64 = g.op("Cast", [lengths], to=TensorProto.INT64)
        valid = g.op("Less", [steps, g.op("Unsqueeze", [lengths64, g.ints(1)])])  # [B,S]
        valid = g.op("Unsqueeze", [valid, g.ints(2, 3)])  # [B,S,1,1]
        return cos, sin, mask, valid

    return ctx.shared_value(("attention_prefix", lengths, rope, starts, group, *tree), build)


def _lower_prefix_form(node: onnx.NodeProto, ctx, a, rotary_dim: int) -> list[onnx.NodeProto]:
    """Standard ops on [filled prefix ‖ this call's K/V]; returns only this call's K/V (see the module doc)."""
    qkv, _, lengths, rope, starts = node.input[:5]
    hq, hkv, d, group = a.num_q_heads, a.num_kv_heads, a.head_size, a.group_size
    past_k, past_v, present_k, present_v = _cache_io(ctx, node, hkv, d, ("past_len", "seq_len"))
    tree = tuple(node.input[-2:]) if a.enable_tree_attention else ()
    cos, sin, mask, valid = _shared_prefix_inputs(ctx, qkv, past_k, lengths, rope, starts, group, tree)

    g = ctx.builder(node.name or "attention")
    # 1-3: split, Qwen3 q/k norm, RoPE (q and k side by side as Hq+Hkv heads)
    qk, v = g.op("Split", [qkv, g.ints((hq + hkv) * d, hkv * d)], outputs=2, axis=-1)
    qk = g.op("Cast", [qk], to=F32)
    if a.enable_qk_norm:
        qk = g.op("Cast", [_qk_norm(g, qk, a, *node.input[5:7])], to=F32)
    qk = g.op("RotaryEmbedding", [qk, cos, sin], num_heads=hq + hkv, rotary_embedding_dim=rotary_dim)
    q, k = g.op("Split", [g.op("Cast", [qk], to=F16), g.ints(hq * d, hkv * d)], outputs=2, axis=-1)

    # 4-5: this call's K and V in the cache dtype (= present), and what attention reads: fp32 [past ‖ new]
    def heads_first(x: str) -> str:  # [B,S,Hkv·D] -> [B,Hkv,S,D]
        return g.op("Transpose", [g.op("Reshape", [x, g.ints(0, 0, hkv, d)])], perm=[0, 2, 1, 3])

    keys_values = []
    for new, past, present, scale in ((k, past_k, present_k, a.qkv_scales[1]), (v, past_v, present_v, a.qkv_scales[2])):
        new = heads_first(new)
        if a.enable_fp8_kv_cache:
            s = g.const(scale, np.float32)
            g.op("QuantizeLinear", [g.op("Cast", [new], to=F32), s], outputs=[present], output_dtype=FP8, saturate=1)
            keys_values.append(g.op("Concat", [g.op("DequantizeLinear", [past, s]), g.op("DequantizeLinear", [present, s])], axis=2))
        else:
            g.op("Identity", [new], outputs=[present])
            keys_values.append(g.op("Cast", [g.op("Concat", [past, present], axis=2)], to=F32))
    keys, values = keys_values  # [B,Hkv,P+S,D]
    if a.enable_fp8_kv_cache:
        qs = g.const(a.qkv_scales[0], np.float32)
        q = g.op("DequantizeLinear", [g.op("QuantizeLinear", [g.op("Cast", [q], to=F32), qs], output_dtype=FP8, saturate=1), qs])

    # 6: grouped-query attention; query head h = kv_head * G + g, rows of a kv head ordered (g, i)
    q = g.op("Transpose", [g.op("Reshape", [q, g.ints(0, 0, hkv, group, d)])], perm=[0, 2, 3, 1, 4])
    q = g.op("Cast", [g.op("Reshape", [q, g.ints(0, hkv, -1, d)])], to=F32)  # [B,Hkv,G*S,D]
    scores = g.op("FusedMatMul", [q, keys], domain="com.microsoft", transB=1, alpha=a.attention_scale)
    out = g.op("MatMul", [g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1), values])  # [B,Hkv,G*S,D]
    out = g.op("Transpose", [g.op("Reshape", [out, g.ints(0, hkv, group, -1, d)])], perm=[0, 3, 1, 2, 4])
    out = g.op("Cast", [g.op("Reshape", [out, g.ints(0, 0, hq, d)])], to=F16)  # [B,S,Hq,D]
    # 7: right-padding rows are zeros
    g.op("Where", [valid, out, g.const(0, np.float16)], outputs=[node.output[0]])
    ctx.used_domains.add("com.microsoft")
    return g.nodes


def _qk_norm(g: GraphBuilder, qk: str, a, q_gamma: str, k_gamma: str) -> str:
    """Qwen3's per-head RMSNorm of the fp32 `[B,S,(Hq+Hkv)·D]` q|k, fp16 result; as HF, the normalized value is
    rounded to fp16 before the fp16 gamma multiplies it."""
    hq, hkv, d = a.num_q_heads, a.num_kv_heads, a.head_size
    gamma = g.op("Concat", [g.op("Expand", [q_gamma, g.ints(hq, d)]), g.op("Expand", [k_gamma, g.ints(hkv, d)])], axis=0)
    heads = g.op("Reshape", [qk, g.ints(0, 0, hq + hkv, d)])
    normed = g.op("RMSNormalization", [heads, g.const(np.ones(d), np.float32)], axis=-1, epsilon=a.rms_norm_eps)
    heads = g.op("Mul", [g.op("Cast", [normed], to=F16), gamma])
    return g.op("Reshape", [heads, g.ints(0, 0, (hq + hkv) * d)])


def _static_dim(info: onnx.ValueInfoProto | None, axis: int) -> int | None:
    if info is None:
        return None
    dims = info.type.tensor_type.shape.dim
    return dims[axis].dim_value if len(dims) > axis and dims[axis].HasField("dim_value") else None


ORT_LOWERING = {(DOMAIN, OP_TYPE): lower_attention}
