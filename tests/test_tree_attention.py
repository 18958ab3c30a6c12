"""Tree attention (`enable_tree_attention=1`, the EAGLE3 base and draft): the packed mask against its formula, the
torch reference against a per-token loop that attends to each token's prefix and ancestors only (HF RoPE at
`attention_pos_id`), and the ORT lowering (both KV forms, fp16 and FP8 KV, Qwen3 norm) against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_attention_plugin import (
    lowered_session,
    make_node,
    rope_table,
    run_lowered,
    single_node_model,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from contract.formats import to_fp8
from plugins.attention import schema
from plugins.attention.reference import attention_reference
from plugins.attention.tree_mask import (
    ancestors_mask,
    causal_mask,
    pack_tree_mask,
    unpack_tree_mask,
)

HQ, HKV, D = 4, 2, 16
# row 0: a tree of 6 nodes over a 5-token prefix; row 1: another tree of 4 nodes (2 padding slots) over 2 tokens
PARENTS = ([-1, 0, 0, 1, 1, 2], [-1, 0, 1, 0])
STARTS = [5, 2]


def depths(parents: list[int]) -> list[int]:
    out = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def tree_inputs(parents_per_row, starts, seq: int):
    """(attention_mask int32 [B,S,W], attention_pos_id int32 [B,S], context_lengths) for right-padded trees."""
    b = len(parents_per_row)
    visible = np.zeros((b, seq, seq), bool)
    pos = np.zeros((b, seq), np.int32)
    for row, parents in enumerate(parents_per_row):
        n = len(parents)
        visible[row, :n, :n] = ancestors_mask(parents)
        pos[row, :n] = starts[row] + np.array(depths(parents))
    lengths = [len(p) for p in parents_per_row]
    return torch.from_numpy(pack_tree_mask(visible)), torch.from_numpy(pos), torch.tensor(lengths, dtype=torch.int32)


def random_inputs(batch: int, seq: int, capacity: int, fp8: bool, rotary_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, (HQ + 2 * HKV) * D, generator=gen).half()
    past = torch.randn(batch, 2, HKV, capacity, D, generator=gen) * 0.5
    past = to_fp8(past, 0.02) if fp8 else past.half()
    gammas = (torch.rand(D, generator=gen) + 0.5).half(), (torch.rand(D, generator=gen) + 0.5).half()
    return qkv, past, rope_table(capacity + 4, rotary_dim), gammas


def attrs(fp8: bool = False, qk_norm: bool = False, tree: bool = True) -> schema.AttentionAttrs:
    return schema.read_attrs(make_node(fp8, qk_norm, tree))


def test_packed_mask_follows_the_bit_convention():
    """Bit j % 32 of word j // 32 of row i, bit 31 included (it makes the int32 word negative)."""
    rng = np.random.default_rng(0)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, 70)]
    visible = ancestors_mask(parents)
    packed = pack_tree_mask(visible)
    assert packed.dtype == np.int32 and packed.shape == (70, 3)
    for i in range(70):
        for j in range(70):
            bit = (int(packed[i, j // 32]) >> (j % 32)) & 1
            assert bit == visible[i, j]
        assert visible[i, i] and (parents[i] < 0 or visible[i, parents[i]])
    assert (packed < 0).any()  # some row sees a token j with j % 32 == 31
    np.testing.assert_array_equal(unpack_tree_mask(packed, 70), visible)
    np.testing.assert_array_equal(unpack_tree_mask(causal_mask(2, 40), 40)[1], np.tril(np.ones((40, 40), bool)))


@torch.no_grad()
def plain_tree_attention(qkv, past, lengths, rope, starts, pos, parents_per_row):
    """Token by token: token i attends to its row's prefix and to its ancestors and itself, each key rotated by HF's
    apply_rotary_pos_emb at that token's attention_pos_id; the new K/V go to slot start + i."""
    attn = torch.zeros(qkv.shape[0], qkv.shape[1], HQ, D, dtype=torch.float16)
    present = past.clone()
    for row, parents in enumerate(parents_per_row):
        start = starts[row]
        rotated = []
        for i in range(len(parents)):
            q, k, v = qkv[row, i].split([HQ * D, HKV * D, HKV * D])
            cos, sin = rope[0, int(pos[row, i])].chunk(2)
            cos, sin = torch.cat([cos, cos])[None, None], torch.cat([sin, sin])[None, None]
            q, k = apply_rotary_pos_emb(q.float().view(1, HQ, 1, D), k.float().view(1, HKV, 1, D), cos, sin)
            rotated.append((q[0, :, 0].half(), k[0, :, 0].half(), v.view(HKV, D)))
            present[row, 0, :, start + i], present[row, 1, :, start + i] = rotated[i][1], rotated[i][2]
        for i in range(len(parents)):
            path, j = [], i
            while j >= 0:
                path.append(j)
                j = parents[j]
            keys = torch.cat([past[row, 0, :, :start].float(), torch.stack([rotated[j][1] for j in path], 1).float()], 1)
            values = torch.cat([past[row, 1, :, :start].float(), torch.stack([rotated[j][2] for j in path], 1).float()], 1)
            for h in range(HQ):
                weights = torch.softmax(keys[h // (HQ // HKV)] @ rotated[i][0][h].float() / math.sqrt(D), dim=0)
                attn[row, i, h] = (weights @ values[h // (HQ // HKV)]).half()
    return attn, present


def test_reference_matches_plain_tree_loop():
    seq, capacity = 6, 16
    mask, pos, lengths = tree_inputs(PARENTS, STARTS, seq)
    qkv, past, rope, _ = random_inputs(2, seq, capacity, False, D)
    starts = torch.tensor(STARTS, dtype=torch.int32)
    attn, present = attention_reference(qkv, past, lengths, rope, starts, None, None, mask, pos, attrs=attrs())
    want_attn, want_present = plain_tree_attention(qkv, past, lengths, rope, STARTS, pos, PARENTS)
    torch.testing.assert_close(attn.float(), want_attn.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(present.float(), want_present.float(), atol=2e-3, rtol=0)
    assert not attn[1, 4:].any()  # right padding


def test_mask_bits_of_later_tokens_are_ignored():
    """Step 6t: token i sees new token j only when j <= i, so bits above the diagonal (a hostile or sloppy mask) change
    nothing: the result is still the plain loop over each node's ancestors."""
    seq, capacity = 6, 16
    mask, pos, lengths = tree_inputs(PARENTS, STARTS, seq)
    upper = np.triu(np.ones((seq, seq), bool), 1)
    noisy = torch.from_numpy(pack_tree_mask(unpack_tree_mask(mask.numpy(), seq) | upper[None]))
    qkv, past, rope, _ = random_inputs(2, seq, capacity, False, D)
    starts = torch.tensor(STARTS, dtype=torch.int32)
    attn, _ = attention_reference(qkv, past, lengths, rope, starts, None, None, noisy, pos, attrs=attrs())
    want_attn, _ = plain_tree_attention(qkv, past, lengths, rope, STARTS, pos, PARENTS)
    torch.testing.assert_close(attn.float(), want_attn.float(), atol=2e-3, rtol=0)


def test_causal_mask_is_ordinary_attention():
    """A packed causal mask with positions start + i gives exactly what the plugin gives without tree attention."""
    seq, capacity, starts = 5, 12, torch.tensor([0, 4], dtype=torch.int32)
    lengths = torch.tensor([5, 3], dtype=torch.int32)
    qkv, past, rope, _ = random_inputs(2, seq, capacity, False, D, seed=3)
    pos = (starts[:, None] + torch.arange(seq)[None]).int()
    tree = attention_reference(qkv, past, lengths, rope, starts, None, None, torch.from_numpy(causal_mask(2, seq)), pos,
                               attrs=attrs())
    plain = attention_reference(qkv, past, lengths, rope, starts, attrs=attrs(tree=False))
    assert torch.equal(tree[0], plain[0]) and torch.equal(tree[1], plain[1])


def big_tree(rng, size: int) -> list[int]:
    return [-1] + [int(rng.integers(max(0, i - 8), i)) for i in range(1, size)]


@pytest.mark.parametrize("fp8,qk_norm,rotary_dim", [(False, False, D), (False, True, D), (True, False, D),
                                                     (True, True, D // 2), (False, False, D // 2)])
@pytest.mark.parametrize("shape", ["small", "wide"])
def test_ort_lowering_matches_reference(fp8, qk_norm, rotary_dim, shape):
    """Both ORT KV forms against the reference; "wide" is a 40-token tree (two mask words) over a long prefix."""
    if shape == "small":
        parents, starts, seq, capacity = PARENTS, STARTS, 6, 16
    else:
        rng = np.random.default_rng(1)
        parents, starts, seq, capacity = (big_tree(rng, 40), big_tree(rng, 33)), [20, 3], 40, 64
    mask, pos, lengths = tree_inputs(parents, starts, seq)
    qkv, past, rope, gammas = random_inputs(2, seq, capacity, fp8, rotary_dim, seed=5)
    st = torch.tensor(starts, dtype=torch.int32)
    norms = gammas if qk_norm else (None, None)
    attn, present = attention_reference(qkv, past, lengths, rope, st, *norms, mask, pos, attrs=attrs(fp8, qk_norm))

    session = lowered_session(single_node_model(fp8, qk_norm, rotary_dim, tree=True))
    feeds = {"qkv": qkv, "context_lengths": lengths, "rope_rotary_cos_sin": rope, "kvcache_start_index": st,
             "attention_mask": mask, "attention_pos_id": pos}
    if qk_norm:
        feeds.update(q_norm=gammas[0], k_norm=gammas[1])
    got, results = run_lowered(session, feeds, {"past": past}, starts, seq)
    got_new, cache_after = results["past"]
    assert (cache_after is not None) == (not fp8 and rotary_dim % 16 == 0)
    for row, (n, start) in enumerate(zip(lengths.tolist(), starts)):
        want_new = present[row, :, :, start : start + n]
        if fp8:
            decoded = torch.from_numpy(got_new[row, :, :, :n].copy()).view(torch.float8_e4m3fn).float()
            torch.testing.assert_close(decoded, want_new.float(), rtol=0.13, atol=2**-9)
        else:
            np.testing.assert_allclose(got_new[row, :, :, :n], want_new.float().numpy(), atol=2e-3, rtol=2e-3)
        # FP8: fp32 compute may round a K/V element across an FP8 step (rarely), which moves a few outputs further
        np.testing.assert_allclose(got["attn"][row, :n], attn[row, :n].float().numpy(), atol=5e-2 if fp8 else 1e-2,
                                   rtol=0)
        assert not got["attn"][row, n:].any()


def test_node_input_count_follows_the_tree_flag():
    node = make_node(False, False, tree=True)
    assert list(node.input[-2:]) == ["attention_mask", "attention_pos_id"] and attrs().enable_tree_attention
    del node.input[-1]
    with pytest.raises(Exception, match="enable_tree_attention=1"):
        schema.read_attrs(node)
