"""The runtime config.json of an ONNX dir and an engine dir (contracts.md 1.1): the model fields by type and range,
the RoPE fields, and the build limits' upper bounds. The exporter writes it (llm_loader/runtime_config.py); the
builder and the runtime read it through `check_runtime_config`."""

from __future__ import annotations

from contract.eagle3 import check_spec_config
from contract.errors import InputError
from contract.fields import is_int, positive_int, positive_number
from contract.kv import KvDtype
from contract.weight_formats import check_weight_formats

# --- the runtime config.json of an ONNX dir and an engine dir (contracts.md 1.1) ------------------------------------

# Upper bounds of the build limits (llm-build flags, builder_config): far past any real engine, low enough that a
# typo or a hand-edited config cannot make the runtime size a RoPE table or a cache of terabytes.
MAX_BATCH_SIZE = 4096
MAX_KV_CACHE_CAPACITY = 1 << 24
LIMIT_BOUNDS = {"max_batch_size": MAX_BATCH_SIZE, "max_input_len": MAX_KV_CACHE_CAPACITY,
                "max_kv_cache_capacity": MAX_KV_CACHE_CAPACITY}

MODEL_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


def head_dim(config: dict) -> int:
    """`head_dim`, or `hidden_size // num_attention_heads` for configs that leave it out (as HF does)."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rotary_dim(config: dict) -> int:
    """Channels of each head that RoPE rotates: `head_dim * partial_rotary_factor`."""
    return int(head_dim(config) * (config.get("partial_rotary_factor") or 1.0))


def check_rope(config: dict, where: str) -> None:
    """`rope_theta` and `rope_scaling` of a config: a base above 1 (a base at or below 1 gives no rotation, and one
    near 0 a table of NaN), and a scaling that is null or an object with a rope_type name whose `factor`, if any, is
    at least 1 (transformers' own rule: a smaller one only warns there, and gives NaN or a wrong table)."""
    if positive_number(config, "rope_theta", where) <= 1:
        raise InputError(f"{where}: rope_theta: expected a RoPE base greater than 1, found {config['rope_theta']!r:.60}")
    scaling = config.get("rope_scaling")
    if scaling is not None and not (isinstance(scaling, dict) and isinstance(scaling.get("rope_type", ""), str)):
        raise InputError(f"{where}: rope_scaling: expected null or an object with a rope_type, found {scaling!r:.60}")
    if scaling and "factor" in scaling and positive_number(scaling, "factor", f"{where}: rope_scaling") < 1:
        raise InputError(f"{where}: rope_scaling: factor: expected a number of at least 1, found {scaling['factor']!r}")


def check_runtime_config(config: dict, where: str) -> None:
    """The model fields of a runtime config.json (section 1.1) by type and range, before anything sizes a graph,
    a cache or a table from them: a positive int is an int, eos ids are token ids, and the head counts divide."""
    for key in MODEL_INTS:
        positive_int(config, key, where)
    positive_int(config, "head_dim", where, required=False)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads ({heads}) expected a multiple of num_key_value_heads, found "
                         f"{kv_heads}")
    check_rope(config, where)
    positive_number(config, "rms_norm_eps", where)
    factor = positive_number(config, "partial_rotary_factor", where, default=1.0)
    if factor > 1 or rotary_dim(config) % 2 or rotary_dim(config) == 0:
        raise InputError(f"{where}: partial_rotary_factor: expected a factor in (0, 1] giving an even rotary dim, "
                         f"found {factor} (rotary dim {rotary_dim(config)})")
    KvDtype.parse(config.get("kv_cache_dtype"), where)
    eos = config.get("eos_token_id", [])
    vocab = config["vocab_size"]
    if not isinstance(eos, list) or not all(is_int(e) and 0 <= e < vocab
                                            for e in eos):
        raise InputError(f"{where}: eos_token_id: expected a list of token ids in [0, {vocab}), found {eos!r:.60}")
    check_weight_formats(config, where)
    check_spec_config(config, where)
