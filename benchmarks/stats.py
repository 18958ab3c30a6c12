"""Per-token accuracy scores against a reference model, and bootstrap intervals over evaluation windows.

Every figure an accuracy page prints comes with a 95% interval from resampling the windows (with replacement, the
same draws for every recipe, so that differences are paired). A difference whose interval contains 0 is reported as
no difference: a perplexity delta of 1-4% on a 135M model is within what the choice of evaluation text moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAWS = 1000
LEVEL = 0.95


@dataclass
class TokenScores:
    """Per-token arrays ``[windows, tokens]``: KL(reference || model) in nats, top-1 agreement, NLL of the text."""

    kl: np.ndarray
    top1: np.ndarray
    nll: np.ndarray

    @staticmethod
    def of_window(ref_lp: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> "TokenScores":
        """Scores of one window from fp32/fp64 log-probabilities ``[tokens, vocab]``."""
        kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)
        top1 = lp.argmax(-1) == ref_lp.argmax(-1)
        nll = -lp[np.arange(len(targets)), targets]
        return TokenScores(kl[None], top1[None], nll[None])

    @staticmethod
    def stack(windows: list["TokenScores"]) -> "TokenScores":
        return TokenScores(*(np.concatenate([getattr(w, f) for w in windows]) for f in ("kl", "top1", "nll")))

    def save(self, path) -> None:
        np.savez(path, kl=self.kl, top1=self.top1, nll=self.nll)

    @staticmethod
    def load(path) -> "TokenScores":
        with np.load(path) as f:
            return TokenScores(f["kl"], f["top1"], f["nll"])


@dataclass
class Interval:
    value: float
    lo: float
    hi: float

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def fmt(self, spec: str = ".4f", scale: float = 1.0, suffix: str = "") -> str:
        v, lo, hi = (scale * x for x in (self.value, self.lo, self.hi))
        return f"{v:{spec}}{suffix} [{lo:{spec}}, {hi:{spec}}]"


def draws(num_windows: int, n: int = DRAWS, seed: int = 0) -> np.ndarray:
    """Window indices ``[n, num_windows]`` to resample with (one set shared by every recipe of a report)."""
    return np.random.default_rng(seed).integers(0, num_windows, (n, num_windows))


def interval(stat, idx: np.ndarray) -> Interval:
    """`stat(window_indices) -> float` on all windows, with the percentile interval over the resampled ones."""
    everything = np.arange(idx.shape[1])
    values = np.array([stat(i) for i in idx])
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return Interval(float(stat(everything)), float(lo), float(hi))


def kl_mean(s: TokenScores):
    return lambda i: float(s.kl[i].mean())


def kl_p99(s: TokenScores):
    return lambda i: float(np.percentile(s.kl[i], 99))


def top1(s: TokenScores):
    return lambda i: float(s.top1[i].mean())


def perplexity(s: TokenScores):
    return lambda i: float(np.exp(s.nll[i].mean()))


def ppl_increase(s: TokenScores, base: TokenScores):
    """Relative perplexity change against `base` on the same windows (paired)."""
    return lambda i: float(np.exp(s.nll[i].mean() - base.nll[i].mean()) - 1)


def difference(stat_a, stat_b):
    """Paired difference of two statistics (e.g. ``difference(kl_mean(a), kl_mean(b))``)."""
    return lambda i: stat_a(i) - stat_b(i)


def compare(d: Interval, spec: str = ".4f", scale: float = 1.0, suffix: str = "") -> str:
    """A difference, or "no difference" when its interval contains 0."""
    if d.contains(0.0):
        return f"no difference ({d.fmt(spec, scale, suffix)})"
    return d.fmt(spec, scale, suffix)


def summary(s: TokenScores, base: TokenScores, idx: np.ndarray) -> dict[str, Interval]:
    """The figures of one report row."""
    return {"kl": interval(kl_mean(s), idx), "kl_p99": interval(kl_p99(s), idx), "top1": interval(top1(s), idx),
            "ppl": interval(perplexity(s), idx), "ppl_increase": interval(ppl_increase(s, base), idx)}
