"""The bit-packed tree mask of `AttentionPlugin` with `enable_tree_attention=1` (contracts.md 3.1).

Row i of `attention_mask` int32 `[B, S, ceil(S/32)]` says which of this call's S tokens token i may attend to: bit
`j % 32` of word `j // 32` is set when it may see token j (itself and its ancestors in a tree; every earlier token for
an ordinary causal call). Tokens come in topological order (a parent before its children), so only bits j <= i count.
Numpy, because the runtime builds these masks on the host and the tests read them back.
"""

from __future__ import annotations

import numpy as np

from contract.graph_io import TREE_MASK_BITS, tree_mask_words


def pack_tree_mask(visible: np.ndarray) -> np.ndarray:
    """bool `[..., S, S]` (row i: the tokens i sees) -> int32 `[..., S, ceil(S/32)]`."""
    visible = np.asarray(visible, dtype=bool)
    s = visible.shape[-1]
    padded = np.zeros((*visible.shape[:-1], tree_mask_words(s) * TREE_MASK_BITS), bool)
    padded[..., :s] = visible
    return np.ascontiguousarray(np.packbits(padded, axis=-1, bitorder="little")).view("<i4").astype(np.int32)


def unpack_tree_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """int32 `[..., S, W]` -> bool `[..., S, size]` (the first `size` flags of each row)."""
    words = np.ascontiguousarray(np.asarray(mask, dtype="<i4"))
    return np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[..., :size].astype(bool)


def ancestors_mask(parents: list[int]) -> np.ndarray:
    """bool `[S, S]` of a tree given each node's parent index (-1 for a root; parents come before children):
    row i is node i and its ancestors."""
    s = len(parents)
    visible = np.zeros((s, s), bool)
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"tree node {i}: expected a parent in [-1, {i}), found {parent}")
        if parent >= 0:
            visible[i] = visible[parent]
        visible[i, i] = True
    return visible


def causal_mask(batch: int, seq_len: int) -> np.ndarray:
    """The packed mask of an ordinary causal call: int32 `[batch, seq_len, ceil(seq_len/32)]`."""
    packed = pack_tree_mask(np.tril(np.ones((seq_len, seq_len), bool)))
    return np.ascontiguousarray(np.broadcast_to(packed, (batch, *packed.shape)))
