"""EAGLE3 on the real SmolLM2-135M-Instruct with its trained draft, through the three CLIs a user runs: speculative
decoding of a batch of chat prompts of different lengths must give the same text as plain greedy decoding on the
vanilla engine, and the trained draft must win tokens (more than one emitted per verification step).

The draft is the one examples/eagle trains (`SmolLM2-135M-eagle3-draft` in $EDGELLM_CACHE, default
~/.cache/edgellm-toolchain, or the directory in EDGELLM_EAGLE_DRAFT); without it the test is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_loader.gguf_convert import default_cache_dir

pytestmark = pytest.mark.slow

DRAFT = Path(os.environ.get("EDGELLM_EAGLE_DRAFT") or default_cache_dir() / "SmolLM2-135M-eagle3-draft")
CASES = {"batch_size": 2, "top_k": 1, "max_generate_length": 32, "requests": [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Explain in two sentences why the sky looks blue during the day."}]},
]}


def cli(*args) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


@pytest.mark.skipif(not (DRAFT / "config.json").is_file(), reason=f"no trained EAGLE3 draft at {DRAFT}")
def test_trained_draft_spec_decode_matches_plain_greedy(smollm2_checkpoint, tmp_path):
    export = [sys.executable, "-m", "llm_loader.export_all_cli"]
    limits = ["--maxBatchSize", "2", "--maxInputLen", "128", "--maxKVCacheCapacity", "256"]
    cli(*export, smollm2_checkpoint, tmp_path / "base", "--eagle-base", "--eagle-draft-dir", DRAFT)
    cli(*export, DRAFT, tmp_path / "draft")
    cli(*export, smollm2_checkpoint, tmp_path / "vanilla")
    cli("llm-build", "--onnxDir", tmp_path / "base" / "llm", "--engineDir", tmp_path / "eng", "--specBase",
        "--maxVerifyTreeSize", "16", *limits)
    cli("llm-build", "--onnxDir", tmp_path / "draft" / "llm", "--engineDir", tmp_path / "eng", "--specDraft",
        "--maxDraftTreeSize", "16", *limits)
    cli("llm-build", "--onnxDir", tmp_path / "vanilla" / "llm", "--engineDir", tmp_path / "vanilla-eng", *limits)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    cli("llm-inference", "--engineDir", tmp_path / "vanilla-eng", "--inputFile", cases, "--outputFile",
        tmp_path / "plain.json")
    plain = [r["output_text"] for r in json.loads((tmp_path / "plain.json").read_text())["responses"]]
    for tree in ([], ["--specDraftTopK", "4", "--specDraftStep", "4", "--specVerifySize", "16"]):
        cli("llm-inference", "--engineDir", tmp_path / "eng", "--inputFile", cases, "--outputFile",
            tmp_path / "spec.json", "--specDecode", "--dumpProfile", *tree)
        out = json.loads((tmp_path / "spec.json").read_text())
        assert [r["output_text"] for r in out["responses"]] == plain
        assert out["profile"]["mean_accepted_tokens_per_step"] > 1.1
