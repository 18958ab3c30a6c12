"""benchmarks/eagle_cpu.py's acceptance figure: tokens emitted per verification step over the prompts, with
benchmarks/stats.py's bootstrap interval over prompts (synthetic per-prompt records; the benchmark itself is long)."""

from __future__ import annotations

import pytest

from benchmarks.eagle_cpu import acceptance

KEY = "2x2x4"


def records(pairs: list[tuple[int, int]]) -> list[dict]:
    """Per-prompt records as the benchmark writes them: (emitted tokens, verification steps) of tree KEY."""
    return [{"shapes": {KEY: {"emitted": e, "steps": s}}} for e, s in pairs]


def test_acceptance_is_the_pooled_ratio_with_a_bootstrap_interval_over_prompts():
    pairs = [(96, 40), (90, 60), (94, 50), (80, 64), (96, 30), (70, 70)]
    got = acceptance(records(pairs), KEY)
    # all emitted / all steps: a prompt with more steps weighs more (not the mean of the per-prompt ratios)
    assert got.value == pytest.approx(sum(e for e, _ in pairs) / sum(s for _, s in pairs))
    ratios = [e / s for e, s in pairs]
    assert got.value != pytest.approx(sum(ratios) / len(ratios))
    # a percentile interval of resampled pooled ratios: around the value, inside the prompts' range
    assert min(ratios) <= got.lo < got.value < got.hi <= max(ratios)
    # four times as many prompts with the same spread: a narrower interval around the same value
    more = acceptance(records(pairs * 4), KEY)
    assert more.value == pytest.approx(got.value) and more.hi - more.lo < 0.7 * (got.hi - got.lo)


def test_acceptance_of_alike_prompts_has_no_spread_and_no_steps_gives_zero():
    same = acceptance(records([(60, 30)] * 5), KEY)
    assert same.value == same.lo == same.hi == 2.0
    assert acceptance(records([(0, 0), (0, 0)]), KEY).value == 0.0
