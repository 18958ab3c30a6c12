"""runtime.sampling against plain formulas and the `transformers` logits warpers."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime.sampling import (
    SamplingParams,
    apply_logit_bias,
    log_softmax,
    probabilities,
    sample,
    top_k_filter,
    top_logprobs,
    top_p_filter,
)


def logits_row(n=64, seed=0):
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def test_top_k_keeps_exactly_the_k_largest():
    x = logits_row().astype(np.float64)
    for k in (1, 5, 63):
        kept = set(np.flatnonzero(np.isfinite(top_k_filter(x, k))))
        assert kept == set(np.argsort(-x)[:k].tolist())
    assert np.array_equal(top_k_filter(x, 0), x)  # 0 = off


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 0.999])  # 0: requests accept it; keeps the top token
def test_top_p_keeps_the_smallest_prefix_reaching_p(p):
    x = logits_row(seed=1).astype(np.float64)
    probs = np.exp(x) / np.exp(x).sum()
    # straightforward: walk tokens from most to least likely until the mass reaches p
    kept, mass = set(), 0.0
    for t in sorted(range(len(x)), key=lambda t: -probs[t]):
        kept.add(t)
        mass += probs[t]
        if mass >= p:
            break
    assert set(np.flatnonzero(np.isfinite(top_p_filter(x, p)))) == kept


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 0.9), (1.3, 0, 0.6), (1.0, 40, 1.0)])
def test_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    x = logits_row(seed=2)
    bias = {3: 2.5, 7: -4.0}
    ours = probabilities(x, SamplingParams(temperature, top_k, top_p, bias))
    t = torch.tensor(x, dtype=torch.float64)[None]
    t[0, 3] += 2.5
    t[0, 7] -= 4.0
    t = TemperatureLogitsWarper(temperature)(None, t)
    if top_k:
        t = TopKLogitsWarper(top_k)(None, t)
    if top_p < 1.0:
        t = TopPLogitsWarper(top_p)(None, t)
    np.testing.assert_allclose(ours, torch.softmax(t, -1)[0].numpy(), rtol=1e-9, atol=1e-12)


def test_greedy_is_argmax_of_biased_logits():
    x = logits_row(seed=3)
    rng = np.random.default_rng(0)
    assert sample(x, SamplingParams(temperature=1.0, top_k=1), rng) == int(np.argmax(x))
    assert sample(x, SamplingParams(temperature=0.0, top_k=50), rng) == int(np.argmax(x))
    low = int(np.argmin(x))
    assert sample(x, SamplingParams(temperature=0.0, logit_bias={low: 100.0}), rng) == low


def test_seeded_draws_follow_the_distribution():
    x = logits_row(8, seed=4)
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    expected = probabilities(x, params)
    n = 20000
    rng = np.random.default_rng(123)
    counts = np.bincount([sample(x, params, rng) for _ in range(n)], minlength=8)
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    support = expected > 0
    chi2 = (((counts - n * expected)[support]) ** 2 / (n * expected[support])).sum()
    assert chi2 < 30  # dof <= 5; p(chi2 > 30) < 1e-4


def test_same_seed_same_draws():
    x = logits_row(seed=5)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    draws = lambda seed: [sample(x, params, g) for g in [np.random.default_rng(seed)] for _ in range(50)]  # noqa
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_logit_bias_forces_a_token_under_sampling():
    x = logits_row(seed=6)
    target = int(np.argmin(x))
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logit_bias={target: 100.0})
    assert {sample(x, params, rng) for _ in range(100)} == {target}
    biased = apply_logit_bias(x, {target: 100.0})
    assert biased[target] == pytest.approx(float(x[target]) + 100.0)


def test_top_logprobs_are_log_softmax_of_raw_logits():
    x = logits_row(seed=7)
    ref = torch.log_softmax(torch.tensor(x, dtype=torch.float64), -1)
    values, ids = ref.topk(5)
    got = top_logprobs(x, 5)
    assert [t for t, _ in got] == ids.tolist()
    np.testing.assert_allclose([lp for _, lp in got], values.numpy(), rtol=1e-12)


def test_log_softmax_normalizes_each_row_of_a_batch():
    """Spec decoding scores whole [rows, vocab] arrays at once: every row is its own distribution."""
    x = np.random.default_rng(0).standard_normal((3, 50)) * 5
    x[1] += 40  # one row far above the others: a whole-array normalization would give the rest almost nothing
    np.testing.assert_allclose(log_softmax(x), torch.log_softmax(torch.tensor(x), -1).numpy(), rtol=1e-12)
