"""Greedy EAGLE3 tree speculative decoding in torch: the independent reference for the runtime's `--specDecode`.

The base is a Hugging Face causal LM (its KV cache a `DynamicCache`), the draft `quantization.eagle3.Eagle3Draft`
run through `draft_model.draft_step`. One round (spec section 5.4), batch 1:

1. The draft's latest output (prefill or accept pass) gives `top_k` depth-1 candidates; `steps - 1` proposal passes
   each expand the `top_k` best nodes of the newest level into `top_k` children each (cumulative log-prob scores),
   feeding every node the draft's own output hidden state of its parent. Draft tokens map to base ids through d2t.
2. The `verify` best nodes (root included) go through the base in one pass: packed tree mask, attention_pos_id =
   prefix length + depth, logits and 3-layer features at every node.
3. Greedy acceptance: follow the base's argmax down the tree while it matches a child; the base's token at the last
   matched node is the bonus. The base KV of the accepted nodes is kept (compacted after the prefix), the rest
   dropped.
4. The draft accept pass: the emitted tokens paired with the base features of the accepted nodes, appended to the
   draft's KV cache; its last output seeds the next round.

Because every emitted token is the base's argmax given everything before it, the output equals plain greedy
decoding of the base, whatever the draft proposes: `acceptance.py` and the tests check that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from examples.eagle.draft_model import DraftKV, cache_kwargs, draft_logprobs, draft_step
from examples.eagle.tree import (
    Tree,
    TreeShape,
    build_tree,
    greedy_accept,
    pack_mask,
    unpack_mask,
)
from quantization.eagle3 import Eagle3Draft


@dataclass
class SpecResult:
    tokens: list[int]  # generated tokens (the prefill's token first), cut at max_new_tokens / after end-of-sequence
    accepted: list[int] = field(default_factory=list)  # tokens emitted by each base verification pass, bonus included


def base_features(hidden_states: tuple[torch.Tensor, ...], layer_ids: list[int]) -> torch.Tensor:
    """The EAGLE base output `hidden_states`: HF's output_hidden_states at the target layers, concatenated, rounded to
    fp16 as the exported base emits them."""
    return torch.cat([hidden_states[i] for i in layer_ids], dim=-1).half().float()


def causal(n: int, past: int = 0) -> torch.Tensor:
    """bool [n, past + n]: everything cached before, causal among the n new entries."""
    return torch.cat([torch.ones(n, past, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], dim=1)


@dataclass
class DraftState:
    """What the draft carries between rounds: its committed KV cache, and the output (hidden state, log-probs) of
    the last committed position, which proposes the depth-1 candidates."""

    kv: DraftKV
    hidden: torch.Tensor  # [H]
    logprobs: torch.Tensor  # [draft_vocab]


def draft_commit(draft: Eagle3Draft, embed, tokens: list[int], features: torch.Tensor, state: DraftState | None):
    """Draft prefill (state None) or accept pass: entries (tokens[j], features[j]) at the next positions."""
    past = 0 if state is None else len(state.kv)
    n = len(tokens)
    hidden, kv = draft_step(draft, embed(torch.tensor([tokens])), draft.fc(features[None]),
                            torch.arange(past, past + n)[None], causal(n, past)[None],
                            None if state is None else state.kv)
    kv = kv if state is None else state.kv.cat(kv)
    return DraftState(kv, hidden[0, -1], draft_logprobs(draft, hidden[0, -1]))


def propose(draft: Eagle3Draft, embed, state: DraftState, root: int, shape: TreeShape, to_base: torch.Tensor) -> Tree:
    """The draft's proposal passes: every pass runs the whole draft-side tree after the draft's KV cache (mask: the
    cache plus each node's ancestors; position: cache length + depth - 1, a depth-1 node standing at the position
    right after the cache) and reads the newest level's outputs."""
    past = len(state.kv)

    def expand(nodes: Tree, states: list[torch.Tensor], level: list[int]):
        attend = torch.cat([torch.ones(len(nodes), past, dtype=torch.bool), nodes.ancestors()], dim=1)
        hidden, _ = draft_step(draft, embed(torch.tensor([nodes.tokens])), torch.stack(states)[None],
                               nodes.positions(past)[None].long(), attend[None], state.kv)
        out = hidden[0, level]
        return draft_logprobs(draft, out), list(out)

    return build_tree(state.logprobs, root, shape, to_base, state.hidden, expand)


def verify(base, cache: DynamicCache, tree: Tree, prefix_len: int, layer_ids: list[int]):
    """One base pass over the tree: returns the base's argmax after each node [T] and its features [T, fc_in].

    The mask goes through the packed int32 form the engines take, and back."""
    t = len(tree)
    packed = pack_mask(tree.ancestors()[None])  # attention_mask input [1, T, ceil(T/32)]
    allowed = torch.cat([torch.ones(t, prefix_len, dtype=torch.bool), unpack_mask(packed, t)[0]], dim=1)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = base(input_ids=torch.tensor([tree.tokens]), position_ids=tree.positions(prefix_len)[None].long(),
               attention_mask=mask[None, None], **cache_kwargs(base, cache), output_hidden_states=True)
    return out.logits[0].argmax(-1).tolist(), base_features(out.hidden_states, layer_ids)[0]


def keep_accepted(cache: DynamicCache, prefix_len: int, path: list[int]) -> None:
    """Drop the rejected tree nodes' KV: keep the prefix, then the accepted nodes in path order."""
    keep = torch.tensor(list(range(prefix_len)) + [prefix_len + i for i in path])
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, keep]
        layer.values = layer.values[:, :, keep]


@torch.no_grad()
def spec_generate(base, draft: Eagle3Draft, prompt: list[int], shape: TreeShape, max_new_tokens: int,
                  eos_token_ids: set[int], layer_ids: list[int], to_base: torch.Tensor) -> SpecResult:
    """Greedy tree speculative decoding of one prompt (fp32 base and draft). `to_base` [draft_vocab] is the base id
    of each draft id (`tree.draft_to_target` of the checkpoint's d2t)."""
    embed = base.get_input_embeddings()
    cache = DynamicCache(config=base.config)
    out = base(input_ids=torch.tensor([prompt]), **cache_kwargs(base, cache), output_hidden_states=True)
    first = int(out.logits[0, -1].argmax())
    result = SpecResult([first])
    state = draft_commit(draft, embed, prompt[1:] + [first], base_features(out.hidden_states, layer_ids)[0], None)
    prefix_len = len(prompt)
    while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos_token_ids:
        tree = propose(draft, embed, state, result.tokens[-1], shape, to_base)
        base_next, features = verify(base, cache, tree, prefix_len, layer_ids)
        path, emitted = greedy_accept(tree, base_next, eos_token_ids)
        keep_accepted(cache, prefix_len, path)
        state = draft_commit(draft, embed, emitted, features[path], state)
        prefix_len += len(path)
        result.accepted.append(len(emitted))
        result.tokens += emitted
    del result.tokens[max_new_tokens:]
    return result
