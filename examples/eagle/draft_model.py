"""The EAGLE3 draft's forward in the two forms speculative decoding and training need, on `quantization.eagle3`'s
`Eagle3Draft` weights (the module names are the checkpoint's tensor names, so what trains here is what gets saved,
quantized and exported).

One draft entry at sequence position `p` pairs the token x[p+1] with a hidden state that stands for the base's h[p]
(the base's 3-layer features through `fc` in a prefill or accept pass, the draft's own previous output in a
proposal pass; the reference graph adds the two inputs, `h = hidden_states_from_draft + fc(hidden_states_input)`,
and zeroes the unused one). Its output predicts the base's next token after x[p+1].

- `draft_step`: S new entries against a KV cache with an explicit boolean attention mask. Prefill, accept and
  tree-proposal passes of speculative decoding are all this call with different masks and positions.
- `unrolled_forward`: training-time test. Step 0 is the prefill over a whole sequence; step k feeds every position's
  step k-1 output back as its hidden input, with the token k positions further on, at RoPE position t + k; the query
  at t sees step-0 keys at positions <= t plus its own keys of steps 1..k, exactly what the tree node at depth k+1
  below a prefix ending at t sees at inference. tests/test_eagle_draft.py checks the two forms agree.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantization.eagle3 import Eagle3Draft


def cache_kwargs(model, cache) -> dict:
    """The keyword a transformers model's forward takes its KV cache by: `cache` in transformers 5.2x, which
    deprecates the older `past_key_values` (removal announced for 5.40), and `past_key_values` before it. The cache
    object is updated in place either way."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@dataclass
class DraftKV:
    """The draft layer's cached keys (RoPE applied) and values, [B, kv_heads, T, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return self.keys.shape[2]

    def cat(self, other: DraftKV) -> DraftKV:
        return DraftKV(torch.cat([self.keys, other.keys], 2), torch.cat([self.values, other.values], 2))


def _qkv(draft: Eagle3Draft, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
    layer, attn = draft.midlayer, draft.midlayer.self_attn
    x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, attn.kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = draft.rotary(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
    return q, k, v


def _finish(draft: Eagle3Draft, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """o_proj + residual, then the MLP block: the pre-norm hidden state the next proposal pass reads."""
    layer = draft.midlayer
    b, _, s, _ = attn_out.shape
    hidden = hidden + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, s, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def draft_logprobs(draft: Eagle3Draft, hidden: torch.Tensor) -> torch.Tensor:
    """Draft-vocab log-probabilities (the reference graph ends in LogSoftmax; tree scores add these)."""
    return torch.log_softmax(draft.lm_head(draft.norm(hidden)).float(), dim=-1)


def draft_step(
    draft: Eagle3Draft,
    embeds: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    attend: torch.Tensor,
    past: DraftKV | None = None,
) -> tuple[torch.Tensor, DraftKV]:
    """Run S new entries: `embeds` [B, S, H] (base embedding table), `hidden` [B, S, H] (fc(features) or the draft's
    own output), `positions` [B, S] RoPE positions, `attend` bool [B, S, len(past) + S] (True: may attend; every row
    must allow at least itself). Returns the output hidden states [B, S, H] and the S new KV entries (not cached
    here: the caller decides what to keep)."""
    q, k, v = _qkv(draft, embeds, hidden, positions)
    keys, values = (k, v) if past is None else (torch.cat([past.keys, k], 2), torch.cat([past.values, v], 2))
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend[:, None], enable_gqa=True)
    return _finish(draft, hidden, out), DraftKV(k, v)


def unrolled_forward(draft: Eagle3Draft, embeds: torch.Tensor, aux: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Training-time test over S positions: `aux` [B, S, fc_in] holds the base features h[0..S-1], `embeds`
    [B, S + steps - 1, H] the embeddings of x[1..S+steps-1] (zeros past a sequence's end). Returns the output hidden
    states of each step, [B, S, H] each; step k at position t predicts the base's token after x[t+k+1].

    Attention is computed densely against the step-0 keys (causal) plus, per query, its own keys of the later steps
    (one dot product each), so memory stays O(S^2) whatever the number of steps."""
    attn = draft.midlayer.self_attn
    b, s, _ = aux.shape
    scale = attn.head_dim**-0.5
    group = attn.heads // attn.kv_heads
    causal = torch.ones(s, s, dtype=torch.bool, device=aux.device).tril()
    hidden = draft.fc(aux)
    keys, values, outputs = [], [], []
    for step in range(steps):
        positions = torch.arange(step, step + s, device=aux.device)[None]
        q, k, v = _qkv(draft, embeds[:, step : step + s], hidden, positions)
        keys.append(k.repeat_interleave(group, 1))
        values.append(v.repeat_interleave(group, 1))
        scores = (q @ keys[0].transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~causal, float("-inf"))
        own = [(q * kk).sum(-1, keepdim=True).float() * scale for kk in keys[1:]]  # [B, heads, S, 1] each
        probs = torch.softmax(torch.cat([scores, *own], dim=-1), dim=-1).to(q.dtype)
        out = probs[..., :s] @ values[0]
        for i, vv in enumerate(values[1:]):
            out = out + probs[..., s + i : s + i + 1] * vv
        hidden = _finish(draft, hidden, out)
        outputs.append(hidden)
    return outputs
