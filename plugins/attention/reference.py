"""Torch reference of `AttentionPlugin`: the executable form of contracts.md section 3.1, steps 1-7 (and 3t/6t for
tree attention).

Full-cache semantics, as TensorRT runs it: `present` is `past` with this call's K/V written at each row's
`[kvcache_start_index, kvcache_start_index + context_lengths)`. Written for clarity, not speed.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx.reference.op_run import OpRun

from contract.errors import InputError
from contract.formats import to_fp8
from plugins.attention.schema import AttentionAttrs, read_attrs
from plugins.attention.tree_mask import unpack_tree_mask


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: normalize in fp32, cast to fp16, times the fp16 gamma."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(torch.float16) * gamma.to(torch.float16)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first `2 * cos.shape[-1]` dims of `x [B,S,H,D]`; cos/sin `[B,S,rd/2]`, fp32 math."""
    half = cos.shape[-1]
    x32 = x.float()
    x1, x2, rest = x32[..., :half], x32[..., half : 2 * half], x32[..., 2 * half :]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(torch.float16)


def attention_reference(
    qkv: torch.Tensor,
    past_key_value: torch.Tensor,
    context_lengths: torch.Tensor,
    rope_cos_sin: torch.Tensor,
    kvcache_start_index: torch.Tensor,
    q_norm_gamma: torch.Tensor | None = None,
    k_norm_gamma: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    attention_pos_id: torch.Tensor | None = None,
    *,
    attrs: AttentionAttrs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `attn` fp16 `[B,S,Hq,D]` and `present` (dtype and shape of `past_key_value`). `attention_mask` (int32
    `[B,S,W]`, bit-packed) and `attention_pos_id` (int32 `[B,S]`) are read only with `enable_tree_attention`."""
    b, s, _ = qkv.shape
    hq, hkv, d = attrs.num_q_heads, attrs.num_kv_heads, attrs.head_size
    capacity = past_key_value.shape[3]
    lengths, starts = context_lengths.long(), kvcache_start_index.long()
    if bool(((starts + lengths) > capacity).any()):
        raise InputError(f"kvcache_start_index + context_lengths: expected <= kv capacity {capacity}, found {(starts + lengths).tolist()}")
    q_scale, k_scale, v_scale = attrs.qkv_scales

    # 1. split
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.reshape(b, s, hq, d), k.reshape(b, s, hkv, d), v.reshape(b, s, hkv, d)
    # 2. Qwen3 q/k norm
    if attrs.enable_qk_norm:
        q = rms_norm(q, q_norm_gamma, attrs.rms_norm_eps)
        k = rms_norm(k, k_norm_gamma, attrs.rms_norm_eps)
    # 3. RoPE at positions start + i (3t. tree attention: at attention_pos_id); padded rows clamp into the table,
    # their results are discarded
    positions = attention_pos_id.long() if attrs.enable_tree_attention else starts[:, None] + torch.arange(s)[None, :]
    rows = rope_cos_sin[0, positions.clamp(0, rope_cos_sin.shape[1] - 1)].float()
    cos, sin = rows.chunk(2, dim=-1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # 4. write the valid new K/V into a copy of the cache
    present = past_key_value.clone()
    for row in range(b):
        n, start = int(lengths[row]), int(starts[row])
        new_k, new_v = k[row, :n].transpose(0, 1), v[row, :n].transpose(0, 1)  # [Hkv, n, D]
        if attrs.enable_fp8_kv_cache:
            new_k, new_v = to_fp8(new_k, k_scale), to_fp8(new_v, v_scale)
        present[row, 0, :, start : start + n] = new_k.to(present.dtype)
        present[row, 1, :, start : start + n] = new_v.to(present.dtype)

    # 5. with FP8 KV, Q is fake-quantized with q_scale; the cache reads back as fp8 * scale
    if attrs.enable_fp8_kv_cache:
        q = (to_fp8(q, q_scale).float() * q_scale).to(torch.float16)
        keys, values = present[:, 0].float() * k_scale, present[:, 1].float() * v_scale
    else:
        keys, values = present[:, 0].float(), present[:, 1].float()

    # 6. causal GQA attention over the cache, fp32 math
    keys = keys.repeat_interleave(attrs.group_size, dim=1)  # [B,Hq,T,D]
    values = values.repeat_interleave(attrs.group_size, dim=1)
    scores = torch.einsum("bshd,bhtd->bhst", q.float(), keys) * attrs.attention_scale
    visible = visible_slots(starts, s, capacity, attention_mask if attrs.enable_tree_attention else None)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    attn = torch.einsum("bhst,bhtd->bshd", scores.softmax(dim=-1), values)

    # 7. right-padding rows output zeros
    valid = torch.arange(s)[None, :] < lengths[:, None]
    attn = torch.where(valid[:, :, None, None], attn, 0.0)
    return attn.to(torch.float16), present


def visible_slots(starts: torch.Tensor, seq_len: int, capacity: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """bool `[B,S,T]`: which cache slots new token i of row b attends to. Causal: slots `<= start + i`. Tree (6t):
    the row's prefix (slots `< start`) plus new token j (slot `start + j`) when `j <= i` and bit j of row i is set."""
    slots = torch.arange(capacity)[None, :] - starts[:, None]  # [B,T]: slot - start = index among the new tokens
    steps = torch.arange(seq_len)
    if attention_mask is None:
        return slots[:, None, :] <= steps[None, :, None]
    tree = torch.from_numpy(unpack_tree_mask(attention_mask.numpy(), seq_len))  # [B,S,S]
    tree &= steps[None, :, None] >= steps[None, None, :]  # only earlier tokens (and itself) count
    new = (slots >= 0) & (slots < seq_len)
    index = slots.clamp(0, seq_len - 1)[:, None, :].expand(-1, seq_len, -1)
    return (slots < 0)[:, None, :] | (new[:, None, :] & tree.gather(2, index))


class AttentionPlugin(OpRun):
    """This reference as `trt_edgellm::AttentionPlugin` for `onnx.reference.ReferenceEvaluator(new_ops=[...])`, so the
    exported (un-lowered) graph can be run as TensorRT would run it. The evaluator matches ops by class name."""

    op_domain = "trt_edgellm"

    def _run(self, qkv, past, context_lengths, rope, kvcache_start_index, *optional, **_attrs):
        attrs = read_attrs(self.onnx_node)
        optional = [None if a is None else torch.from_numpy(np.array(a)) for a in optional]
        norms = optional[:2] if attrs.enable_qk_norm else [None, None]
        tree = optional[-2:] if attrs.enable_tree_attention else [None, None]
        attn, present = attention_reference(
            torch.from_numpy(qkv), torch.from_numpy(past), torch.from_numpy(context_lengths), torch.from_numpy(rope),
            torch.from_numpy(kvcache_start_index), *norms, *tree, attrs=attrs,
        )
        return attn.numpy(), present.numpy()
