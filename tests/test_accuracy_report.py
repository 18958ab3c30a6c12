"""benchmarks/accuracy.py --update: a run's rows replace the same recipes' earlier rows, the others are kept in the
recipe table's order with the run that scored them, and rows from other windows are refused."""

from __future__ import annotations

import json

import click
import pytest

from benchmarks.accuracy import merged


def row(recipe: str, kl: float, command: str, windows=(8, 512)) -> dict:
    return {"recipe": recipe, "kl": [kl, kl, kl], "run": {"command": command, "machine": "m", "windows": list(windows)}}


def test_update_keeps_unscored_rows_and_replaces_rescored(tmp_path):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([row("fp16", 0.0, "old"), row("fp8", 0.036, "old"), row("nvfp4", 0.29, "old")]))
    out = merged([row("fp16", 0.0, "new"), row("nvfp4", 0.25, "new")], path, 8, 512)
    assert [(r["recipe"], r["kl"][0], r["run"]["command"]) for r in out] == [
        ("fp16", 0.0, "new"), ("fp8", 0.036, "old"), ("nvfp4", 0.25, "new")]


def test_update_refuses_rows_of_other_windows(tmp_path):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([row("fp8", 0.036, "old", windows=(4, 256))]))
    with pytest.raises(click.UsageError, match="other windows than 8 x 512"):
        merged([row("fp16", 0.0, "new")], path, 8, 512)
