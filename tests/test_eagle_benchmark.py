"""benchmarks/eagle_cpu.py's acceptance figure: tokens emitted per verification step over the prompts, with
benchmarks/stats.py's bootstrap interval over prompts (synthetic per-prompt records; the benchmark itself is long),
and its refusal to reuse engines built from another draft."""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from benchmarks.eagle_cpu import acceptance, check_work_dir, main

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


def fake_draft(path, value: float):
    path.mkdir()
    (path / "config.json").write_text('{"draft_vocab_size": 8}')
    save_file({"fc.weight": torch.full((2, 2), value)}, path / "model.safetensors")
    return path


def test_the_work_dir_is_reused_only_for_the_draft_its_engines_were_built_from(tmp_path):
    one, other = fake_draft(tmp_path / "one", 1.0), fake_draft(tmp_path / "other", 2.0)
    work = tmp_path / "work"
    check_work_dir(work, one)  # a fresh work dir is stamped
    (work / "spec-engine").mkdir()
    check_work_dir(work, one)  # the same draft: its engines are reused
    moved = one.rename(tmp_path / "moved")
    check_work_dir(work, moved)  # also when it moved: the digest identifies it
    one = moved.rename(one)
    check_work_dir(work, one)  # the stamp names the draft where it is now
    with pytest.raises(click.BadParameter, match=f"{work}: expected a work dir of this draft .* found engines of {one}"):
        check_work_dir(work, other)
    # through the CLI: a usage error naming --work, before anything is built or written
    before = sorted(p.name for p in work.iterdir())
    text = tmp_path / "wikitext.txt"
    text.write_text(" = A passage = \n")
    args = ["--draft", str(other), "--work", str(work), "--wikitext", str(text), "--out", str(tmp_path / "o.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--work" in result.output and "delete it" in result.output
    assert sorted(p.name for p in work.iterdir()) == before and not (tmp_path / "o.json").exists()
    # engines no run of the benchmark stamped, or a stamp that is not JSON: refused as well
    (work / "draft.json").unlink()
    with pytest.raises(click.BadParameter, match="engines without a draft.json"):
        check_work_dir(work, one)
    (work / "draft.json").write_text("{not json")
    with pytest.raises(click.BadParameter, match="unreadable draft.json"):
        check_work_dir(work, one)
