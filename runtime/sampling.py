"""Next-token choice from one row of logits: logit bias, temperature, top-k, top-p, then a seeded draw.

The order is the one Hugging Face's logits warpers use (bias, temperature, top-k, top-p), so a distribution here
can be checked against `transformers`. Greedy decoding (argmax of the biased logits) is taken when `top_k == 1` or
the temperature is below 1e-5, as the reference runtime does. Everything is float64 numpy on one row: the
vocabulary is small enough that this costs nothing next to an engine step.

Log-probabilities for `num_logprobs` are `log_softmax` of the raw engine logits (temperature 1, no bias, no
filtering), which is what the reference reports ("computed at T=1", OpenAI semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 50  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature < GREEDY_TEMPERATURE


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """A float64 copy of `logits` with `bias[token]` added to each listed token."""
    out = np.array(logits, dtype=np.float64)
    if bias:
        out[np.fromiter(bias.keys(), np.int64)] += np.fromiter(bias.values(), np.float64)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - np.max(logits))
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis (one row, or every row of a batch)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to at least `p` (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits)[order]
    mass_before = np.cumsum(probs) - probs
    keep = order[: max(1, int(np.count_nonzero(mass_before < p)))]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a non-greedy draw samples from."""
    x = apply_logit_bias(logits, params.logit_bias) / params.temperature
    return softmax(top_p_filter(top_k_filter(x, params.top_k), params.top_p))


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a [vocab] row of logits."""
    if params.greedy:
        return int(np.argmax(apply_logit_bias(logits, params.logit_bias)))
    cdf = np.cumsum(probabilities(logits, params))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The `n` most likely tokens of the raw logits as (token_id, logprob), most likely first."""
    lp = log_softmax(logits)
    top = np.argpartition(-lp, n - 1)[:n] if n < lp.shape[-1] else np.arange(lp.shape[-1])
    top = top[np.argsort(-lp[top], kind="stable")]
    return [(int(t), float(lp[t])) for t in top]
