"""EAGLE3 tree logic without engines: growth, selection and greedy acceptance against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import InputError
from plugins.attention.tree_mask import ancestors_mask, unpack_tree_mask
from runtime.eagle_tree import CandidateTree, TreeShape, VerifyTree, top_k
from runtime.sampling import log_softmax

DRAFT_VOCAB = 50


def random_logp(rng, rows: int) -> np.ndarray:
    return log_softmax(rng.standard_normal((rows, DRAFT_VOCAB)) * 3)


def grow_full(shape: TreeShape, seed: int = 0) -> tuple[CandidateTree, dict]:
    """A tree grown with random draft log-probs; returns it and the log-probs each expanded node was given."""
    rng = np.random.default_rng(seed)
    targets = rng.permutation(1000)[:DRAFT_VOCAB]  # an injective draft -> base map
    given = {0: random_logp(rng, 1)[0]}
    tree = CandidateTree.start(shape, targets, root=7, root_logp=given[0])
    for _ in range(shape.steps - 1):
        logp = random_logp(rng, len(tree.frontier))
        given.update(zip(tree.frontier, logp))
        tree.grow(logp)
    return tree, given


def path_of(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def test_top_k_orders_and_breaks_ties_by_id():
    logp = np.array([[0.0, -1.0, 0.0, -0.5, -3.0]])
    ids, values = top_k(logp, 3)
    assert ids.tolist() == [[0, 2, 3]] and values.tolist() == [[0.0, 0.0, -0.5]]
    flat = np.zeros((2, 1000))
    flat[1, 700] = 1.0
    assert top_k(flat, 4)[0].tolist() == [[0, 1, 2, 3], [700, 0, 1, 2]]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 300))
    ids, values = top_k(x, 7)
    np.testing.assert_array_equal(ids, np.argsort(-x, axis=-1)[:, :7])


@pytest.mark.parametrize("shape", [TreeShape(3, 4, 12), TreeShape(4, 1, 4), TreeShape(2, 6, 60), TreeShape(10, 6, 60)])
def test_growth_follows_the_reference_sizes_and_scores(shape):
    tree, given = grow_full(shape)
    assert len(tree.tokens) == shape.candidates
    assert len(tree.expanded) == shape.top_k * shape.steps
    for node in range(1, len(tree.tokens)):
        parent = tree.parents[node]
        assert parent in given  # only expanded nodes have children
        draft_id = int(np.nonzero(tree.targets == tree.tokens[node])[0][0])
        assert tree.scores[node] == pytest.approx(tree.scores[parent] + given[parent][draft_id])
        assert tree.depths[node] == tree.depths[parent] + 1
    # each level's expanded nodes are the K best of that level
    for depth in range(1, shape.steps + 1):
        level = [n for n in range(len(tree.tokens)) if tree.depths[n] == depth]
        chosen = [n for n in tree.expanded if tree.depths[n] == depth]
        assert sorted(tree.scores[n] for n in chosen) == sorted(tree.scores[n] for n in level)[-shape.top_k:]


@pytest.mark.parametrize("shape", [TreeShape(3, 4, 12), TreeShape(10, 6, 60), TreeShape(4, 3, 200), TreeShape(1, 5, 4)])
def test_selection_is_the_best_scores_ancestor_closed_and_topological(shape):
    tree, _ = grow_full(shape, seed=3)
    verify, nodes = tree.select()
    size = min(shape.verify_size, shape.candidates)
    assert len(nodes) == size and nodes[0] == 0 and len(set(nodes)) == size
    rest = sorted(tree.scores[n] for n in range(1, len(tree.tokens)))
    assert sorted(tree.scores[n] for n in nodes[1:]) == rest[len(rest) - (size - 1):]
    for i, node in enumerate(nodes):
        p = verify.parents[i]
        assert p < i  # topological
        assert (p == -1) == (i == 0) and (i == 0 or nodes[p] == tree.parents[node])
        assert verify.tokens[i] == tree.tokens[node] and verify.depths[i] == tree.depths[node]
    np.testing.assert_array_equal(unpack_tree_mask(verify.mask, size), ancestors_mask(verify.parents))


def test_draft_call_feeds_the_expanded_nodes_with_their_ancestors():
    shape = TreeShape(3, 4, 12)
    rng = np.random.default_rng(1)
    tree = CandidateTree.start(shape, np.arange(DRAFT_VOCAB), root=5, root_logp=random_logp(rng, 1)[0])
    for depth in range(1, shape.steps):
        call = tree.draft_call()
        assert len(call.nodes) == depth * shape.top_k and call.nodes[-shape.top_k:] == tree.frontier
        visible = unpack_tree_mask(call.mask, len(call.nodes))
        for i, node in enumerate(call.nodes):
            seen = {call.nodes[j] for j in np.nonzero(visible[i])[0]}
            assert seen == set(path_of(tree.parents, node)) - {0}  # ancestors and itself; the root is not fed
        assert call.depths.tolist() == [tree.depths[n] for n in call.nodes]
        tree.grow(random_logp(rng, len(tree.frontier)))


def brute_force_accept(tokens, parents, top1):
    """The longest root path whose every token is the base's top-1 after its parent's path."""
    best = [0]
    for i in range(len(tokens)):
        path = path_of(parents, i)
        if all(tokens[path[j + 1]] == top1[path[j]] for j in range(len(path) - 1)) and len(path) > len(best):
            best = path
    return best, int(top1[best[-1]])


def test_acceptance_matches_brute_force_on_random_trees():
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        tokens = rng.integers(0, 4, n)
        for node in range(n):  # siblings carry distinct tokens, as draft top-K children do
            siblings = [c for c in range(node) if parents[c] == parents[node] and node > 0]
            while any(tokens[c] == tokens[node] for c in siblings):
                tokens[node] += 4
        top1 = rng.integers(0, 4, n)
        verify = VerifyTree(tokens, parents, np.zeros(n, int))
        assert verify.accept(top1) == brute_force_accept(tokens, parents, top1)


def test_acceptance_examples():
    verify = VerifyTree(np.array([9, 1, 2, 3, 4]), [-1, 0, 0, 1, 1], np.array([0, 1, 1, 2, 2]))
    assert verify.accept(np.array([2, 0, 8, 0, 0])) == ([0, 2], 8)  # root -> token 2 accepted, then bonus 8
    assert verify.accept(np.array([1, 4, 0, 0, 6])) == ([0, 1, 4], 6)
    assert verify.accept(np.array([5, 0, 0, 0, 0])) == ([0], 5)  # nothing accepted: the bonus alone


@pytest.mark.parametrize("shape, limits, flag", [
    (TreeShape(10, 6, 61), (60, 60), "--specVerifySize"),
    (TreeShape(10, 8, 60), (60, 60), "max_draft_tree_size"),
    (TreeShape(0, 6, 60), (60, 60), "--specDraftTopK"),
    (TreeShape(60, 2, 60), (60, 60), "draft vocabulary"),
])
def test_shapes_larger_than_the_build_are_refused(shape, limits, flag):
    with pytest.raises(InputError, match=flag):
        shape.check(*limits, draft_vocab=DRAFT_VOCAB)


def test_default_shapes():
    """The reference's tree on TensorRT (it fits the default build); a small one on the CPU engine; flags win."""
    assert TreeShape.default("tensorrt") == TreeShape(10, 6, 60) and TreeShape().candidates == 1 + 10 + 5 * 100
    TreeShape.default("tensorrt").check(60, 60, draft_vocab=32000)
    cpu = TreeShape.default("onnxruntime")
    assert cpu.verify_size <= 8 and cpu.draft_tokens <= 8
    assert cpu.with_flags(None, 5, None) == TreeShape(cpu.top_k, 5, cpu.verify_size)
