"""Triton GPU kernels of `trt_edgellm::AttentionPlugin` (contracts.md section 3.1).

Three kernels, each in an FP16 and an FP8 variant chosen by the `FP8` constexpr:

1. `_rope_kv_write_kernel`: Q/K RMSNorm (Qwen3), RoPE, then writes this call's K/V into the contiguous cache
   `[B,2,Hkv,T,D]` at `kvcache_start_index[b] + i` (i < context_lengths[b]) and Q into a scratch buffer. With FP8 the
   K/V and Q are quantized here (`fp8(clamp(x / scale, +-448))`), so the attention kernels only ever *load* FP8.
   Tree attention (`TREE`): RoPE at `attention_pos_id[b, i]` instead of the slot's position.
2. `_prefill_kernel`: flash attention, causal, GQA, keys read back from the cache (so a prefill that continues an
   existing cache works too). FP8: `q8 . k8` on FP8 tensor cores with `q_scale * k_scale` folded into the softmax
   scale; P stays fp16 and V is widened to fp16 (exact), `v_scale` is applied to the output. fp32 accumulation.
   Tree attention (`TREE`): a new key j is visible to row i only when bit j of the row's packed `attention_mask` is
   set too, so only the prefix runs unmasked; a tree call of any length (one token included) runs here.
3. `_decode_kernel` + `_decode_reduce_kernel`: flash-decoding for one new token per row. The cache is split along T
   into chunks so a long context fills the GPU; each program handles one kv head and all its GQA query heads, and a
   second kernel merges the chunks' partial softmax results.

`attention_forward` runs the whole op; `present` is `past_key_value` updated in place (TensorRT aliases the two).
Every launch states `enable_fp_fusion` (FMA contraction): Triton 3.9 warns when a launch leaves it to its default,
which 3.10 turns off. Off for kernel 1 (it rounds like torch), on for the attention kernels, as they were measured.
The quantizing step lives only in kernel 1, which the tests check on its own against torch (the Triton CPU
interpreter rounds fp32 -> fp8 wrongly, see docs/gpu-kernels.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from contract import formats
from contract.errors import InputError
from contract.graph_io import TREE_MASK_BITS, tree_mask_words

LOG2E = 1.4426950408889634
FP8_MAX = tl.constexpr(formats.FP8_MAX)
MASK_BITS = tl.constexpr(TREE_MASK_BITS)  # tree-mask flags per int32 word


@triton.jit
def _rope_kv_write_kernel(
    qkv_ptr, cache_ptr, q_out_ptr, ctx_ptr, start_ptr, cos_sin_ptr, q_gamma_ptr, k_gamma_ptr, pos_id_ptr,
    S, T, q_scale, k_scale, v_scale, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROT: tl.constexpr,
    QK_NORM: tl.constexpr, FP8: tl.constexpr, TREE: tl.constexpr,
):
    """Grid (B, S, HQ + HKV): program (b, i, h) handles Q head h (h < HQ) or K and V of kv head h - HQ."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    h = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    d = tl.arange(0, BLOCK_D)
    in_head = d < D
    q_dst = q_out_ptr + ((b * S + i) * HQ + h) * D + d  # only used by Q programs (h < HQ)
    if h < HQ:
        if i >= ctx:  # right padding: zeros keep the attention kernels free of garbage
            tl.store(q_dst, tl.zeros([BLOCK_D], tl.float32).to(q_out_ptr.dtype.element_ty), mask=in_head)
            return
    elif i >= ctx:
        return
    slot = tl.load(start_ptr + b) + i
    if TREE:  # RoPE at the tree position; the K/V still go to the next slot
        pos = tl.load(pos_id_ptr + b * S + i)
    else:
        pos = slot
    if h >= HQ:
        if slot >= T:  # never write past the cache capacity
            return
    row = qkv_ptr + (b * S + i) * (HQ + 2 * HKV) * D + h * D
    half: tl.constexpr = ROT // 2
    rotated = d < ROT
    partner = tl.where(d < half, d + half, d - half)  # rotate-half: dims d and d +- rd/2 form a pair
    x = tl.load(row + d, mask=in_head, other=0.0).to(tl.float32)
    xp = tl.load(row + partner, mask=rotated, other=0.0).to(tl.float32)
    if QK_NORM:  # HF RMSNorm: fp32 math, fp16 result times the fp16 gamma (rounded to fp16)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        if h < HQ:
            g = tl.load(q_gamma_ptr + d, mask=in_head, other=0.0).to(tl.float32)
            gp = tl.load(q_gamma_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
        else:
            g = tl.load(k_gamma_ptr + d, mask=in_head, other=0.0).to(tl.float32)
            gp = tl.load(k_gamma_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
        x = ((x * rstd).to(tl.float16).to(tl.float32) * g).to(tl.float16).to(tl.float32)
        xp = ((xp * rstd).to(tl.float16).to(tl.float32) * gp).to(tl.float16).to(tl.float32)
    j = tl.where(d < half, d, d - half)
    cos = tl.load(cos_sin_ptr + pos * ROT + j, mask=rotated, other=1.0)
    sin = tl.load(cos_sin_ptr + pos * ROT + half + j, mask=rotated, other=0.0)
    sin = tl.where(d < half, -sin, sin)  # [x1 cos - x2 sin, x2 cos + x1 sin]
    y = tl.where(rotated, x * cos + xp * sin, x).to(tl.float16)

    if h < HQ:
        if FP8:
            qv = tl.clamp(tl.div_rn(y.to(tl.float32), q_scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
            tl.store(q_dst, qv, mask=in_head)
        else:
            tl.store(q_dst, y, mask=in_head)
    else:
        kh = h - HQ
        k_dst = cache_ptr + (((b * 2 + 0) * HKV + kh) * T + slot) * D + d
        v_dst = cache_ptr + (((b * 2 + 1) * HKV + kh) * T + slot) * D + d
        v = tl.load(row + HKV * D + d, mask=in_head, other=0.0)  # V of kv head kh sits HKV heads after its K
        if FP8:
            kq = tl.clamp(tl.div_rn(y.to(tl.float32), k_scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
            vq = tl.clamp(tl.div_rn(v.to(tl.float32), v_scale), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
            tl.store(k_dst, kq, mask=in_head)
            tl.store(v_dst, vq, mask=in_head)
        else:
            tl.store(k_dst, y, mask=in_head)
            tl.store(v_dst, v, mask=in_head)


@triton.jit
def _attend_block(q, k_ptrs, v_ptrs, kv_ok, visible, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    """One key block of the online softmax (log2 domain). `visible` is only used when MASKED."""
    if MASKED:
        k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, out_ptr, ctx_ptr, start_ptr, mask_ptr, S, T, W, qk_scale, out_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TREE: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M), B * HQ). Query row i sits in slot start + i and sees keys j <= start + i; in a TREE
    call a new key (j >= start) also needs bit j - start of row i of the packed mask `[B, S, W]` int32."""
    mb = tl.program_id(0)
    b = (tl.program_id(1) // HQ).to(tl.int64)
    h = tl.program_id(1) % HQ
    kh = h // (HQ // HKV)
    ctx = tl.load(ctx_ptr + b)
    start = tl.load(start_ptr + b)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + ((b * S + rows[:, None]) * HQ + h) * D + d[None, :]
    if mb * BLOCK_M >= ctx:  # the whole block is right padding
        tl.store(out_ptrs, tl.zeros([BLOCK_M, D], tl.float16), mask=rows[:, None] < S)
        return
    q = tl.load(q_ptr + ((b * S + rows[:, None]) * HQ + h) * D + d[None, :], mask=rows[:, None] < ctx, other=0.0)
    k_base = cache_ptr + ((b * 2 + 0) * HKV + kh) * T * D
    v_base = cache_ptr + ((b * 2 + 1) * HKV + kh) * T * D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # keys before start + mb * BLOCK_M (tree: before start) are visible to every row of the block: no mask there
    if TREE:
        unmasked_end = start // BLOCK_N * BLOCK_N
    else:
        unmasked_end = (start + mb * BLOCK_M) // BLOCK_N * BLOCK_N
    for lo in range(0, unmasked_end, BLOCK_N):
        offs = (lo + n)[:, None] * D + d[None, :]
        m_i, l_i, acc = _attend_block(q, k_base + offs, v_base + offs, n, n, m_i, l_i, acc, qk_scale, False)
    kv_end = start + tl.minimum(mb * BLOCK_M + BLOCK_M, ctx)
    q_pos = start + rows
    for lo in range(unmasked_end, kv_end, BLOCK_N):
        keys = lo + n
        offs = keys[:, None] * D + d[None, :]
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < kv_end)
        if TREE:
            rel = tl.maximum(keys - start, 0)  # index of the key among this call's tokens
            new = (keys >= start)[None, :] & visible & (rows[:, None] < ctx)
            words = tl.load(mask_ptr + (b * S + rows[:, None]) * W + rel[None, :] // MASK_BITS, mask=new, other=0)
            visible = visible & ((keys < start)[None, :] | (((words >> (rel[None, :] % MASK_BITS)) & 1) != 0))
        m_i, l_i, acc = _attend_block(
            q, k_base + offs, v_base + offs, keys < kv_end, visible, m_i, l_i, acc, qk_scale, True
        )
    out = acc * (out_scale / l_i)[:, None]
    out = tl.where(rows[:, None] < ctx, out, 0.0)
    tl.store(out_ptrs, out.to(tl.float16), mask=rows[:, None] < S)


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, part_o_ptr, part_m_ptr, part_l_ptr, ctx_ptr, start_ptr, T, CHUNK, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * HKV, NUM_SPLITS): the GQA group of kv head kh against keys [split * CHUNK, (split + 1) * CHUNK)."""
    b = (tl.program_id(0) // HKV).to(tl.int64)
    kh = tl.program_id(0) % HKV
    split = tl.program_id(1)
    GROUP: tl.constexpr = HQ // HKV
    kv_len = tl.load(start_ptr + b) + tl.minimum(tl.load(ctx_ptr + b), 1)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, kv_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    heads = kh * GROUP + g
    q = tl.load(q_ptr + (b * HQ + heads[:, None]) * D + d[None, :], mask=g[:, None] < GROUP, other=0.0)
    k_base = cache_ptr + ((b * 2 + 0) * HKV + kh) * T * D
    v_base = cache_ptr + ((b * 2 + 1) * HKV + kh) * T * D
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + n
        offs = keys[:, None] * D + d[None, :]
        kv_ok = keys < hi
        m_i, l_i, acc = _attend_block(
            q, k_base + offs, v_base + offs, kv_ok, kv_ok[None, :], m_i, l_i, acc, qk_scale, True
        )
    part = (b * HQ + heads) * NUM_SPLITS + split
    tl.store(part_o_ptr + part[:, None] * D + d[None, :], acc, mask=g[:, None] < GROUP)
    tl.store(part_m_ptr + part, m_i, mask=g < GROUP)
    tl.store(part_l_ptr + part, l_i, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, ctx_ptr, out_scale,
    HQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B * HQ): merge the chunks' partial softmax sums of one query head."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    ok = s < NUM_SPLITS
    m = tl.load(part_m_ptr + bh * NUM_SPLITS + s, mask=ok, other=float("-inf"))
    l = tl.load(part_l_ptr + bh * NUM_SPLITS + s, mask=ok, other=0.0)
    o = tl.load(part_o_ptr + (bh * NUM_SPLITS + s[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    out = tl.sum(o * w[:, None], axis=0) * (out_scale / tl.sum(l * w, axis=0))
    valid = tl.load(ctx_ptr + bh // HQ) > 0
    out = tl.where(valid, out, 0.0)
    tl.store(out_ptr + bh * D + d, out.to(tl.float16))


def _scales(attrs) -> tuple[float, float, float]:
    return tuple(float(s) for s in attrs.qkv_scales) if attrs.enable_fp8_kv_cache else (1.0, 1.0, 1.0)


def rope_kv_write(qkv, past_key_value, context_lengths, rope_cos_sin, kvcache_start_index, q_norm_gamma, k_norm_gamma, attrs,
                  attention_pos_id=None):
    """Steps 1-5 of the contract (3t with tree attention: RoPE at `attention_pos_id`): returns Q `[B,S,Hq,D]` after
    norm + RoPE (FP8 codes with FP8 KV, padding rows zero) and writes this call's K/V into `past_key_value` in
    place."""
    cache = past_key_value
    b, s, _ = qkv.shape
    hq, hkv, d = attrs.num_q_heads, attrs.num_kv_heads, attrs.head_size
    q_scale, k_scale, v_scale = _scales(attrs)
    q_out = torch.empty(b, s, hq, d, device=qkv.device, dtype=cache.dtype)
    gammas = (q_norm_gamma, k_norm_gamma) if attrs.enable_qk_norm else (qkv, qkv)  # unused pointers otherwise
    tree = bool(attrs.enable_tree_attention)
    _rope_kv_write_kernel[(b, s, hq + hkv)](
        qkv, cache, q_out, context_lengths, kvcache_start_index, rope_cos_sin, *gammas,
        attention_pos_id if tree else kvcache_start_index,  # an unused pointer otherwise
        s, cache.shape[3], q_scale, k_scale, v_scale, float(attrs.rms_norm_eps),
        HQ=hq, HKV=hkv, D=d, BLOCK_D=triton.next_power_of_2(d), ROT=rope_cos_sin.shape[-1],
        QK_NORM=bool(attrs.enable_qk_norm), FP8=bool(attrs.enable_fp8_kv_cache), TREE=tree,
        enable_fp_fusion=False,  # no FMA: RoPE rounds like torch, FP8 codes match
    )
    return q_out


def _softmax_scales(attrs) -> tuple[float, float]:
    """(scale of q.k in the log2 domain, output multiplier): q_scale * k_scale fold into the first, v_scale the second."""
    q_scale, k_scale, v_scale = _scales(attrs)
    return float(attrs.attention_scale) * q_scale * k_scale * LOG2E, v_scale


def prefill_attention(q, cache, context_lengths, kvcache_start_index, attrs, block_m=None, block_n=None, out=None,
                      attention_mask=None):
    """Causal GQA flash attention of Q `[B,S,Hq,D]` (fp16 or FP8 codes) over the cache -> fp16 `[B,S,Hq,D]`; with
    tree attention, new keys are filtered by the packed `attention_mask` `[B,S,W]` int32 as well."""
    b, s, hq, d = q.shape
    on_gpu = q.is_cuda
    tree = bool(attrs.enable_tree_attention)
    if tree:  # the mask words take registers: 64 x 32 tiles on 4 warps keep a d-128 tile free of spills on Hopper
        block_m, block_n = block_m or (64 if on_gpu else 16), block_n or (32 if on_gpu else 16)
    block_m = block_m or (128 if on_gpu and s >= 128 else 64 if on_gpu else 16)
    block_n = block_n or (64 if on_gpu else 16)
    out = torch.empty(b, s, hq, d, device=q.device, dtype=torch.float16) if out is None else out
    qk_scale, out_scale = _softmax_scales(attrs)
    extra = dict(num_warps=8 if block_m >= 128 else 4, num_stages=3) if on_gpu else {}
    mask = attention_mask if tree else context_lengths  # an unused pointer otherwise
    _prefill_kernel[(triton.cdiv(s, block_m), b * hq)](
        q, cache, out, context_lengths, kvcache_start_index, mask, s, cache.shape[3], mask.shape[-1] if tree else 1,
        qk_scale, out_scale, HQ=hq, HKV=attrs.num_kv_heads, D=d, BLOCK_M=block_m, BLOCK_N=block_n, TREE=tree,
        enable_fp_fusion=True, **extra,
    )
    return out


def decode_splits(batch: int, num_kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Chunks along T so that about two programs per SM run (flash-decoding); one chunk is at least one key block."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = max(1, math.ceil(2 * sms / (batch * num_kv_heads)))
    return max(1, min(wanted, triton.cdiv(capacity, block_n), 128))


def decode_attention(q, cache, context_lengths, kvcache_start_index, attrs, num_splits=None, block_n=None, out=None):
    """One new token per row: Q `[B,1,Hq,D]` over the cache -> fp16 `[B,1,Hq,D]`, split-K over the cache length."""
    b, s, hq, d = q.shape
    if s != 1:
        raise InputError(f"decode_attention: expected seq_len 1, found {s}")
    hkv, capacity = attrs.num_kv_heads, cache.shape[3]
    block_n = block_n or (64 if q.is_cuda else 16)
    splits = num_splits or decode_splits(b, hkv, capacity, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    part_o = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    part_m = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    qk_scale, out_scale = _softmax_scales(attrs)
    _decode_kernel[(b * hkv, splits)](
        q, cache, part_o, part_m, part_l, context_lengths, kvcache_start_index, capacity, chunk, qk_scale,
        HQ=hq, HKV=hkv, D=d, NUM_SPLITS=splits, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_N=block_n,
        enable_fp_fusion=True,
    )
    out = torch.empty(b, 1, hq, d, device=q.device, dtype=torch.float16) if out is None else out
    _decode_reduce_kernel[(b * hq,)](
        part_o, part_m, part_l, out, context_lengths, out_scale,
        HQ=hq, D=d, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), enable_fp_fusion=True,
    )
    return out


def check_tree_inputs(qkv, attention_mask, attention_pos_id) -> None:
    """The packed mask covers the call's tokens (`[B,S,>=ceil(S/32)]` int32) and the positions are `[B,S]` int32."""
    b, s, _ = qkv.shape
    words = tree_mask_words(s)
    if attention_mask is None or attention_mask.dtype != torch.int32 or attention_mask.dim() != 3 \
            or tuple(attention_mask.shape[:2]) != (b, s) or attention_mask.shape[2] < words:
        found = None if attention_mask is None else f"{attention_mask.dtype} {list(attention_mask.shape)}"
        raise InputError(f"attention_mask: expected int32 [{b},{s},>={words}], found {found}")
    if attention_pos_id is None or attention_pos_id.dtype != torch.int32 or tuple(attention_pos_id.shape) != (b, s):
        found = None if attention_pos_id is None else f"{attention_pos_id.dtype} {list(attention_pos_id.shape)}"
        raise InputError(f"attention_pos_id: expected int32 [{b},{s}], found {found}")
    if not (attention_mask.is_contiguous() and attention_pos_id.is_contiguous()):
        raise InputError("attention_mask / attention_pos_id: expected contiguous tensors, found strided views")


def check_inputs(qkv, past_key_value, attrs) -> None:
    """Shapes and dtypes the kernels rely on; an engine's bindings guarantee them, a direct caller may not."""
    hq, hkv, d = attrs.num_q_heads, attrs.num_kv_heads, attrs.head_size
    want_cache = attrs.kv_dtype.torch
    if qkv.dtype != torch.float16 or qkv.dim() != 3 or qkv.shape[-1] != (hq + 2 * hkv) * d:
        raise InputError(f"qkv: expected fp16 [B,S,{(hq + 2 * hkv) * d}], found {qkv.dtype} {list(qkv.shape)}")
    if past_key_value.dtype != want_cache or list(past_key_value.shape[1:3]) != [2, hkv] or past_key_value.shape[4] != d:
        raise InputError(
            f"past_key_value: expected {want_cache} [B,2,{hkv},T,{d}], found {past_key_value.dtype} {list(past_key_value.shape)}"
        )
    if d & (d - 1):
        raise InputError(f"head_size: expected a power of two (64 or 128), found {d}")
    if not (qkv.is_contiguous() and past_key_value.is_contiguous()):
        raise InputError("qkv / past_key_value: expected contiguous tensors, found strided views")


def attention_forward(
    qkv, past_key_value, context_lengths, rope_cos_sin, kvcache_start_index, q_norm_gamma, k_norm_gamma, attrs, out=None,
    attention_mask=None, attention_pos_id=None,
):
    """The whole AttentionPlugin on the GPU: `(attn [B,S,Hq,D] fp16, present)` where `present is past_key_value`,
    updated in place. seq_len 1 runs the split-K decode kernel, longer inputs and every tree call the prefill kernel.
    `out` (fp16 `[B,S,Hq,D]`) receives attn when given, e.g. a TensorRT output binding."""
    check_inputs(qkv, past_key_value, attrs)
    if attrs.enable_tree_attention:
        check_tree_inputs(qkv, attention_mask, attention_pos_id)
    q = rope_kv_write(qkv, past_key_value, context_lengths, rope_cos_sin, kvcache_start_index, q_norm_gamma, k_norm_gamma, attrs,
                      attention_pos_id)
    if qkv.shape[1] == 1 and not attrs.enable_tree_attention:
        attn = decode_attention(q, past_key_value, context_lengths, kvcache_start_index, attrs, out=out)
    else:
        attn = prefill_attention(q, past_key_value, context_lengths, kvcache_start_index, attrs, out=out,
                                 attention_mask=attention_mask)
    return attn, past_key_value
