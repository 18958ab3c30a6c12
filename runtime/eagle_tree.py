"""EAGLE3 tree speculation, the parts that touch no engine: growing one row's candidate tree from the draft's
log-probabilities, choosing the nodes the base verifies, and greedy acceptance (reference 5.4).

A round starts from the root, the token the base already chose (not yet in either cache). Its K most likely draft
tokens are the depth-1 candidates, all of them expanded. Each further draft step feeds the expanded nodes, takes the
K most likely children of every frontier node (K x K candidates, score = the parent's score + the child's draft
log-prob) and expands the K best of those; after `steps` depths the tree holds `1 + K + (steps - 1) K^2` nodes, of
which the root and the `verify_size - 1` best-scoring go to the base. A child never scores above its parent (log-probs
are <= 0) and ties rank the shallower node first, so every prefix of that ranking holds its nodes' ancestors and is
in topological order, as the packed tree mask requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from contract.errors import InputError
from plugins.attention.tree_mask import ancestors_mask, pack_tree_mask


@dataclass(frozen=True)
class TreeShape:
    """`--specDraftTopK`, `--specDraftStep`, `--specVerifySize`; the defaults are the reference's (5.4)."""

    top_k: int = 10
    steps: int = 6
    verify_size: int = 60

    @staticmethod
    def default(backend: str) -> "TreeShape":
        """The tree an engine dir's backend decodes with unless flags say otherwise: the reference's on TensorRT;
        on the CPU engine a small one, because a verification call there costs about 1.23 plain steps for 4 tokens and
        1.42 for 8, each draft call about a tenth of one, while bigger trees win few extra tokens (docs/eagle.md)."""
        return CPU_TREE if backend == "onnxruntime" else TreeShape()

    def with_flags(self, top_k: int | None, steps: int | None, verify_size: int | None) -> "TreeShape":
        """This shape with the given flags (None: keep this shape's value)."""
        return TreeShape(self.top_k if top_k is None else top_k, self.steps if steps is None else steps,
                         self.verify_size if verify_size is None else verify_size)

    @property
    def candidates(self) -> int:
        """Nodes of a full tree, the root included."""
        return 1 + self.top_k + (self.steps - 1) * self.top_k ** 2

    @property
    def draft_tokens(self) -> int:
        """Tokens of the largest draft call of a round: the expanded nodes of all but the last depth."""
        return (self.steps - 1) * self.top_k

    def check(self, max_verify: int, max_draft: int, draft_vocab: int) -> None:
        """InputError unless the shape fits the engines' generation profiles (a tree larger than the build)."""
        for flag, value in (("--specDraftTopK", self.top_k), ("--specDraftStep", self.steps),
                            ("--specVerifySize", self.verify_size)):
            if value < 1:
                raise InputError(f"{flag}: expected a positive integer, found {value}")
        if self.top_k > draft_vocab:
            raise InputError(f"--specDraftTopK: expected at most the draft vocabulary ({draft_vocab}), found {self.top_k}")
        if self.verify_size > max_verify:
            raise InputError(f"--specVerifySize: expected at most {max_verify} (the base engine's max_verify_tree_size), "
                             f"found {self.verify_size}")
        if max(self.draft_tokens, 1) > max_draft:
            raise InputError(f"--specDraftStep / --specDraftTopK: a draft call takes (steps - 1) x top_k = "
                             f"{self.draft_tokens} tokens, expected at most {max_draft} (the draft engine's "
                             "max_draft_tree_size)")


CPU_TREE = TreeShape(2, 2, 4)  # the CPU engine's default tree: benchmarks/eagle_cpu.py, docs/eagle.md


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, values) of the k largest entries of each row of a 2-D array, largest first; ties go to the smaller id
    (so a draft with flat log-probs proposes its first ids, deterministically)."""
    logp = np.asarray(logp)
    if k >= logp.shape[-1]:
        ids = np.argsort(-logp, axis=-1, kind="stable")
    else:
        kth = -np.partition(-logp, k - 1, axis=-1)[:, k - 1]  # the k-th largest value of each row
        ids = np.empty((logp.shape[0], k), np.int64)
        for r in range(logp.shape[0]):
            candidates = np.nonzero(logp[r] >= kth[r])[0]  # ascending ids; usually exactly k of them
            ids[r] = candidates[np.argsort(-logp[r, candidates], kind="stable")][:k]
    return ids, np.take_along_axis(logp, ids, axis=-1)


@dataclass
class DraftCall:
    """One row's part of a draft proposal call: the expanded nodes in feed order, their parents within the call
    (-1: the root, which is not fed), depths and tokens."""

    nodes: list[int]
    parents: list[int]
    depths: np.ndarray
    tokens: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """The packed tree mask of the call (contracts.md 3.1), int32 `[n, ceil(n/32)]`."""
        return pack_tree_mask(ancestors_mask(self.parents))


@dataclass
class VerifyTree:
    """The nodes the base verifies, root first, in topological order: tokens (base ids), parents within this tree
    (-1 for the root) and depths (0 for the root)."""

    tokens: np.ndarray
    parents: list[int]
    depths: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return pack_tree_mask(ancestors_mask(self.parents))

    def accept(self, base_top1: np.ndarray) -> tuple[list[int], int]:
        """Greedy acceptance: from the root, follow the child whose token is the base's top-1 at the current node.
        Returns the accepted path (tree indices, root first) and the base's top-1 after its last node (the bonus
        token, always emitted)."""
        children: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            children.setdefault(p, []).append(i)
        path = [0]
        while True:
            want = int(base_top1[path[-1]])
            nxt = next((c for c in children.get(path[-1], []) if int(self.tokens[c]) == want), None)
            if nxt is None:
                return path, want
            path.append(nxt)


@dataclass
class CandidateTree:
    """One row's candidates for one round. Node 0 is the root; `targets` maps draft ids to base ids (d2t)."""

    shape: TreeShape
    targets: np.ndarray
    tokens: list[int] = field(default_factory=list)  # base ids
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # cumulative draft log-prob
    expanded: list[int] = field(default_factory=list)  # nodes fed to the draft, in feed order (depth-major)
    frontier: list[int] = field(default_factory=list)  # the expanded nodes of the deepest level

    @classmethod
    def start(cls, shape: TreeShape, targets: np.ndarray, root: int, root_logp: np.ndarray) -> "CandidateTree":
        """The root and its top-K children (all expanded) from the draft's log-probs after the committed tokens."""
        tree = cls(shape, targets, [int(root)], [-1], [0], [0.0])
        ids, values = top_k(root_logp[None], shape.top_k)
        tree.frontier = [tree._add(0, int(t), float(v)) for t, v in zip(ids[0], values[0])]
        tree.expanded = list(tree.frontier)
        return tree

    def _add(self, parent: int, draft_id: int, logp: float) -> int:
        self.tokens.append(int(self.targets[draft_id]))
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(self.scores[parent] + logp)
        return len(self.tokens) - 1

    def draft_call(self) -> DraftCall:
        """The next proposal call: every expanded node; the draft's logits are needed for the frontier (the last
        `len(frontier)` of them)."""
        index = {n: i for i, n in enumerate(self.expanded)}
        parents = [index.get(self.parents[n], -1) for n in self.expanded]
        return DraftCall(list(self.expanded), parents, np.array([self.depths[n] for n in self.expanded]),
                         np.array([self.tokens[n] for n in self.expanded], np.int64))

    def grow(self, frontier_logp: np.ndarray) -> None:
        """Add the top-K children of every frontier node (`frontier_logp` [len(frontier), draft_vocab]) and expand
        the K best-scoring of them."""
        ids, values = top_k(frontier_logp, self.shape.top_k)
        children = [self._add(node, int(t), float(v))
                    for node, row_ids, row_values in zip(self.frontier, ids, values)
                    for t, v in zip(row_ids, row_values)]
        ranked = sorted(children, key=self._rank)
        self.frontier = ranked[: self.shape.top_k]
        self.expanded += self.frontier

    def _rank(self, node: int) -> tuple:
        return (-self.scores[node], self.depths[node], node)

    def select(self) -> tuple[VerifyTree, list[int]]:
        """The root and the `verify_size - 1` best candidates, topologically ordered; also their node ids."""
        best = sorted(range(1, len(self.tokens)), key=self._rank)[: self.shape.verify_size - 1]
        nodes = [0, *best]
        index = {n: i for i, n in enumerate(nodes)}
        parents = [-1] + [index[self.parents[n]] for n in best]  # KeyError would mean a broken ancestor closure
        return VerifyTree(np.array([self.tokens[n] for n in nodes], np.int64), parents,
                          np.array([self.depths[n] for n in nodes])), nodes
