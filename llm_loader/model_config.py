"""The architecture facts the exporter needs, read from a Hugging Face `config.json`.

One dataclass for every supported family (`contract.families`: Llama, SmolLM2 included; Qwen2, Q/K/V bias; Qwen3,
Q/K RMSNorm): the family's row says what differs, the config's fields say the sizes. It accepts both the transformers-5 layout (`rope_parameters`) and the older one (top-level `rope_theta`/`rope_scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import InputError
from contract.families import FAMILIES, Family, family_of
from contract.fields import positive_int, positive_number
from contract.runtime_config import check_rope


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE, else the HF dict (rope_type, factor, ...)
    partial_rotary_factor: float
    tie_word_embeddings: bool
    attention_bias: bool  # fused Q/K/V bias (always on for Qwen2)
    qk_norm: bool  # per-head Q/K RMSNorm inside attention (Qwen3)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def _flag(config: dict, key: str, path: Path) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{path}: {key}: expected true or false, found {value!r:.60}")
    return value


def _rope(config: dict, path: Path) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from either config layout."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5
        theta = params.get("rope_theta", config.get("rope_theta"))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        partial = config.get("partial_rotary_factor", 1.0)
    if theta is None:
        raise InputError(f"{path}: expected field 'rope_theta' (or rope_parameters.rope_theta), found none")
    check_rope({"rope_theta": theta, "rope_scaling": scaling}, str(path))
    theta = float(theta)
    partial = positive_number({"partial_rotary_factor": partial}, "partial_rotary_factor", str(path))
    return theta, scaling or None, partial


def model_config_from_dict(config: dict, path: Path) -> ModelConfig:
    """Validate and normalise a parsed HF config; `path` names the file in error messages."""
    family = family_of(config, str(path))
    if config.get("hidden_act", family.activation) != family.activation:
        raise InputError(f"{path}: field 'hidden_act' expected {family.activation!r}, found {config['hidden_act']!r}")
    if config.get("mlp_bias"):
        raise InputError(f"{path}: field 'mlp_bias' expected false (MLP biases are not supported), found true")
    if config.get("use_sliding_window"):
        raise InputError(f"{path}: field 'use_sliding_window' expected false (sliding window unsupported), found true")

    where = str(path)
    hidden = positive_int(config, "hidden_size", where)
    heads = positive_int(config, "num_attention_heads", where)
    theta, scaling, partial = _rope(config, path)
    cfg = ModelConfig(
        model_type=family.model_type,
        vocab_size=positive_int(config, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=positive_int(config, "intermediate_size", where),
        num_hidden_layers=positive_int(config, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=heads if config.get("num_key_value_heads") is None
        else positive_int(config, "num_key_value_heads", where),
        head_dim=positive_int(config, "head_dim", where, required=False) or hidden // heads,
        max_position_embeddings=positive_int(config, "max_position_embeddings", where),
        rms_norm_eps=positive_number(config, "rms_norm_eps", where, default=1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        tie_word_embeddings=_flag(config, "tie_word_embeddings", path),
        attention_bias=family.attention_bias or _flag(config, "attention_bias", path),
        qk_norm=family.qk_norm,
    )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(
            f"{path}: num_attention_heads ({heads}) expected a multiple of num_key_value_heads, "
            f"found {cfg.num_key_value_heads}"
        )
    if cfg.head_dim <= 0:
        raise InputError(f"{path}: head_dim (hidden_size // num_attention_heads) expected positive, found "
                         f"{cfg.head_dim}")
    if cfg.rotary_dim % 2 or not 0 < cfg.rotary_dim <= cfg.head_dim:
        raise InputError(f"{path}: rotary dim head_dim*partial_rotary_factor expected even, found {cfg.rotary_dim}")
    return cfg
