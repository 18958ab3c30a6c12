"""The `rope_rotary_cos_sin` table the LLM engine reads (contracts.md section 2).

The graph does not compute RoPE frequencies itself: the runtime fills one table per engine from `config.json`, so
every scaling variant `transformers` knows (linear, llama3, yarn, longrope, ...) works without touching the graph.
Frequencies come from `transformers`' own init functions, so the table matches HF's rotary embedding by construction.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import CONFIG_MAPPING
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from contract.errors import InputError
from contract.runtime_config import head_dim

_HF_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "partial_rotary_factor")


def hf_config(config: dict):
    """A `transformers` config of the model's own class, built from the runtime config's RoPE-relevant keys.

    The runtime config keeps the reference's `rope_theta` / `rope_scaling` keys; a transformers that has
    `rope_parameters` (5.x) gets them in that layout (its `rope_scaling` setter is deprecated and warns)."""
    kwargs = {k: config[k] for k in _HF_KEYS if config.get(k) is not None}
    try:
        config_class = CONFIG_MAPPING[config["model"]]
        scaling = dict(config.get("rope_scaling") or {})
        if hasattr(config_class, "rope_parameters"):
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            kwargs["rope_parameters"] = {**scaling, "rope_theta": config["rope_theta"]}
        else:
            kwargs.update(rope_theta=config["rope_theta"], **({"rope_scaling": scaling} if scaling else {}))
        return config_class(**kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"config.json: cannot build a transformers config for model {config.get('model')!r}: "
                         f"{e}") from e


def inverse_frequencies(config: dict) -> tuple[torch.Tensor, float, int]:
    """(inv_freq [rotary_dim/2], attention_scaling, rotary_dim) for `config`, as HF's rotary embedding computes them."""
    hf = hf_config(config)
    params = getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config["rope_theta"]}
    rope_type = params.get("rope_type", "default")
    rotary_dim = int(head_dim(config) * (config.get("partial_rotary_factor") or 1.0))
    if rope_type == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0, rotary_dim
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise InputError(f"config.json rope_scaling: expected a rope_type in {sorted(ROPE_INIT_FUNCTIONS)} "
                         f"or 'default', found {rope_type!r}")
    # "dynamic" rescales with the sequence length; a fixed table uses its base frequencies (seq_len=None).
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    return inv_freq.float(), float(scaling), 2 * inv_freq.numel()


def rope_cos_sin(config: dict, length: int) -> np.ndarray:
    """float32 [1, length, rotary_dim]: row p = [cos(p*f) || sin(p*f)] * attention_scaling.

    The angles are computed in float64: at p in the thousands an fp32 angle is off by several 1e-4 radians.
    """
    inv_freq, scaling, _ = inverse_frequencies(config)
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scaling
    return table[None].numpy().astype(np.float32)
