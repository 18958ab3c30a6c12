"""Draft trees for EAGLE3 greedy speculative decoding: the verify-tree selection, its packed attention mask and
positions, greedy acceptance, and the draft-vocab map. Pure bookkeeping (no model), written as plainly as the
runtime's reference needs it.

Conventions (spec section 5.4; they match the reference runtime's kernels):
- A full tree table holds the root (the last token already emitted, score 0, parent -1), then `top_k` depth-1
  candidates, then `top_k**2` candidates per further proposal round: 1 + K + (steps - 1) * K^2 entries. A
  candidate's score is its cumulative draft log-probability (the sum along its path), so a child never outranks
  its parent.
- The verify tree is the `verify` best table entries by score (ties: lower table index first, so every selected
  node's parent is selected too), listed in table order. `verify` counts the root: a 1/5/5 chain verifies the root
  plus 4 draft tokens.
- Attention mask, bit-packed int32 [batch, tree, ceil(tree / 32)]: bit (j % 32) of word j // 32 in row i is set when
  tree node i may attend to tree node j (itself and its ancestors). Bit 31 is the int32 sign bit. Everything before
  the tree (the KV cache) is visible to every node and is not in the mask.
- attention_pos_id of node i = prefix length + depth(i) (the root has depth 0 and sits right after the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeShape:
    """The runtime's --specDraftTopK / --specDraftStep / --specVerifySize."""

    top_k: int
    steps: int
    verify: int

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.steps < 1 or not 1 <= self.verify <= self.full_size:
            raise ValueError(
                f"tree shape {self}: expected top_k >= 1, steps >= 1 and 1 <= verify <= {self.full_size} (the full "
                f"tree 1 + K + (steps - 1) * K^2)"
            )

    @property
    def full_size(self) -> int:
        return 1 + self.top_k + (self.steps - 1) * self.top_k**2

    def __str__(self) -> str:
        return f"{self.top_k}/{self.steps}/{self.verify}"

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """'10/6/60' -> TreeShape(10, 6, 60)."""
        k, s, v = (int(x) for x in text.split("/"))
        return cls(k, s, v)


@dataclass
class Tree:
    """A token tree: node 0 is the root, `parents[i] < i` for every other node."""

    tokens: list[int]
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        depths = []
        for p in self.parents:
            depths.append(0 if p < 0 else depths[p] + 1)
        return depths

    def ancestors(self) -> torch.Tensor:
        """bool [T, T]: row i is True at i and at every ancestor of i."""
        t = len(self)
        mask = torch.zeros(t, t, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def positions(self, prefix_len: int) -> torch.Tensor:
        """attention_pos_id: int32 [T]."""
        return torch.tensor(self.depths, dtype=torch.int32) + prefix_len

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]


def pack_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [B, T, T] -> int32 [B, T, ceil(T / 32)], bit j % 32 of word j // 32 = allowed[..., j]."""
    b, t, _ = allowed.shape
    words = -(-t // 32)
    padded = torch.zeros(b, t, words * 32, dtype=torch.int64)
    padded[..., :t] = allowed.to(torch.int64)
    weights = torch.tensor([1 << k for k in range(32)], dtype=torch.int64)
    packed = (padded.view(b, t, words, 32) * weights).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_mask(packed: torch.Tensor, tree_size: int) -> torch.Tensor:
    """int32 [B, T, W] -> bool [B, T, tree_size]: the inverse of `pack_mask`."""
    bits = torch.arange(32, dtype=torch.int64)
    flags = (packed.to(torch.int64)[..., None] >> bits) & 1  # the sign-extended high bits are ignored
    return flags.flatten(-2)[..., :tree_size].bool()


def select_verify_tree(tokens: list[int], scores: list[float], parents: list[int], verify: int) -> Tree:
    """The `verify` best entries of a full tree table (see the module docstring), as a `Tree` in table order."""
    order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
    chosen = sorted(order[:verify])
    index = {full: i for i, full in enumerate(chosen)}
    if chosen[0] != 0 or any(parents[c] >= 0 and parents[c] not in index for c in chosen):
        raise ValueError("verify tree: expected the root and every selected node's parent to be selected")
    return Tree([tokens[c] for c in chosen], [index[parents[c]] if parents[c] >= 0 else -1 for c in chosen])


def build_tree(first_logprobs: torch.Tensor, root: int, shape: TreeShape, to_base: torch.Tensor, first_state,
               expand) -> Tree:
    """The proposal of spec section 5.4: the full tree table, then the verify tree.

    `first_logprobs` [draft_vocab] and `first_state` come from the draft's last committed position. Depth-1
    candidates are its `top_k` tokens. Each of the `steps - 1` proposal rounds calls
    `expand(nodes, states, level) -> (logprobs [len(level), draft_vocab], new_states)`: `nodes` is the draft-side
    tree so far (every node selected for expansion, depth-1 nodes are its roots), `states[i]` what node i's draft
    input carries (its parent's output; `first_state` for depth-1 nodes), `level` the newest level's node indices.
    Each level node gets `top_k` children (K^2 candidates, all entering the table with their cumulative scores), and
    the `top_k` best candidates become the next level. `to_base` [draft_vocab] is the base id of each draft id
    (`draft_to_target`)."""
    k = shape.top_k
    lp, idx = first_logprobs.topk(k)
    tokens, scores, parents = [root] + to_base[idx].tolist(), [0.0] + lp.tolist(), [-1] + [0] * k
    nodes, states = Tree(to_base[idx].tolist(), [-1] * k), [first_state] * k
    level, level_full, level_scores = list(range(k)), list(range(1, k + 1)), lp
    for _ in range(shape.steps - 1):
        logprobs, out_states = expand(nodes, states, level)
        top_lp, top_idx = logprobs.topk(k, dim=-1)  # [K, K]: K children of each level node
        cum = (level_scores[:, None] + top_lp).flatten()
        first = len(tokens)
        tokens += to_base[top_idx.flatten()].tolist()
        scores += cum.tolist()
        parents += [level_full[r] for r in range(k) for _ in range(k)]
        best = torch.sort(-cum, stable=True).indices[:k].tolist()  # ties: lower table index first
        t = len(nodes)
        for f in best:
            nodes.tokens.append(tokens[first + f])
            nodes.parents.append(level[f // k])
            states.append(out_states[f // k])
        level, level_full, level_scores = list(range(t, t + k)), [first + f for f in best], cum[best]
    return select_verify_tree(tokens, scores, parents, shape.verify)


def greedy_accept(tree: Tree, base_next: list[int], eos_token_ids: set[int]) -> tuple[list[int], list[int]]:
    """Walk down from the root while the base's greedy token at a node is the token of one of its children.

    `base_next[i]` is the base's argmax after node i. Returns the accepted path (tree indices, root first) and the
    emitted tokens: the base's token at every node of the path, i.e. the accepted draft tokens plus the bonus token.
    An emitted end-of-sequence token ends the walk."""
    node, path, emitted = 0, [0], []
    while True:
        token = base_next[node]
        emitted.append(token)
        if token in eos_token_ids:
            break
        child = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if child is None:
            break
        node = child
        path.append(node)
    return path, emitted


def draft_to_target(d2t: torch.Tensor, base_vocab: int) -> torch.Tensor:
    """int64 [draft_vocab] target ids from a checkpoint's `d2t`, read the way the reference runtime reads it: an
    EAGLE offset map (target = id + d2t[id]) or a direct map (target = d2t[id]); when both are valid, the one with
    more distinct targets."""
    d2t = d2t.to(torch.int64)
    offset = d2t + torch.arange(len(d2t))
    offset_ok = bool(((offset >= 0) & (offset < base_vocab)).all())
    direct_ok = bool(((d2t >= 0) & (d2t < base_vocab)).all())
    if not offset_ok and not direct_ok:
        raise ValueError(f"d2t: expected an offset or a direct map into [0, {base_vocab}), found neither")
    if offset_ok and (not direct_ok or len(offset.unique()) > len(d2t.unique())):
        return offset
    return d2t
