"""The runtime `config.json` of an ONNX directory (contracts.md section 1.1).

The reference's keys that apply to Llama / Qwen2 / Qwen3, plus our own versioning keys. The builder and runtime read
only this file, never the HF config, so everything they need about the model is spelled out here.
"""

from __future__ import annotations

from pathlib import Path

from contract.eagle3 import ROLE_LLM, SPEC_NONE
from contract.errors import InputError
from contract.fields import is_int
from contract.jsonfile import read_json
from contract.paths import checked_file
from contract.versions import CONTRACT_VERSION, EDGELLM_VERSION, producer
from contract.weight_formats import weight_format_fields
from llm_loader.model_config import ModelConfig


def _eos_list(value, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not all(is_int(v) for v in values):
        raise InputError(f"{where}: field 'eos_token_id' expected an int or a list of ints, found {value!r}")
    return values


def runtime_config(cfg: ModelConfig, hf_config: dict, checkpoint_dir: Path, kv_cache_dtype: str = "fp16",
                   weight_format: str = "fp16", weight_format_counts: dict[str, int] | None = None) -> dict:
    """The runtime config dict; `eos_token_id` comes from config.json, else from generation_config.json; the weight
    format fields as `weight_format_fields` writes them."""
    gen_path = checked_file(checkpoint_dir, "generation_config.json", "the generation config", required=False)
    generation_config = read_json(gen_path, "the generation config") if gen_path else {}
    if hf_config.get("eos_token_id") is not None:
        eos = _eos_list(hf_config["eos_token_id"], str(Path(checkpoint_dir) / "config.json"))
    elif generation_config.get("eos_token_id") is not None:
        eos = _eos_list(generation_config["eos_token_id"], str(gen_path))
    else:
        eos = []
    config = {
        "model": cfg.model_type,
        "spec_decode_type": SPEC_NONE,
        "engine_role": ROLE_LLM,
        "edgellm_version": EDGELLM_VERSION,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rms_norm_eps": cfg.rms_norm_eps,
        "kv_cache_dtype": kv_cache_dtype,
        "eos_token_id": eos,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "producer": producer(),
        "contract_version": CONTRACT_VERSION,
        "weight_format": weight_format,
        "generation_config": generation_config,
    }
    config.update(weight_format_fields(weight_format, weight_format_counts))  # counts last, when mixed
    return config
