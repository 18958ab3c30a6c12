"""TensorRT optimization profiles for the LLM and embedding engines, as pure functions CI can test.

Two profiles, like the reference builder: "context" (prefill, up to max_input_len new tokens) and "generation" (one
token per row; more with speculative decoding, which this build does not implement). The KV cache is one contiguous
tensor of `max_kv_cache_capacity` tokens per row (contracts.md section 2), so its shape is fixed except for batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import InputError
from contract.stage import LIMIT_BOUNDS

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_kv_cache_capacity: int


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def llm_profiles(limits: Limits, dims: ModelDims, gen_tokens: int = 1) -> list[Profile]:
    """[context, generation] profiles for every input of `model.onnx`."""
    b, length, cap = limits.max_batch_size, limits.max_input_len, limits.max_kv_cache_capacity
    kv = (2, dims.num_kv_heads, cap, dims.head_dim)

    def common(seq_min: Shape, seq_opt: int, seq_max: int) -> dict[str, tuple[Shape, Shape, Shape]]:
        shapes = {
            "inputs_embeds": ((1, seq_min[0], dims.hidden_size), (b, seq_opt, dims.hidden_size),
                              (b, seq_max, dims.hidden_size)),
            "context_lengths": ((1,), (b,), (b,)),
            "kvcache_start_index": ((1,), (b,), (b,)),
            "rope_rotary_cos_sin": ((1, cap, dims.rotary_dim),) * 3,
            "last_token_ids": ((1, 1), (b, 1), (b, 1)),
        }
        for i in range(dims.num_layers):
            shapes[f"past_key_values_{i}"] = ((1, *kv), (b, *kv), (b, *kv))
        return shapes

    return [Profile("context", common((1,), max(1, length // 2), length)),
            Profile("generation", common((1,), gen_tokens, gen_tokens))]


def embedding_profiles(limits: Limits) -> list[Profile]:
    """The embedding engine serves both phases with one profile: input_ids [1..B, 1..max_input_len]."""
    b, length = limits.max_batch_size, limits.max_input_len
    return [Profile("lookup", {"input_ids": ((1, 1), (b, max(1, length // 2)), (b, length))})]


def validate_limits(limits: Limits) -> None:
    """Raise InputError for limits no engine can satisfy."""
    for flag, key in (("--maxBatchSize", "max_batch_size"), ("--maxInputLen", "max_input_len"),
                      ("--maxKVCacheCapacity", "max_kv_cache_capacity")):
        value, bound = getattr(limits, key), LIMIT_BOUNDS[key]
        if not 1 <= value <= bound:
            raise InputError(f"{flag}: expected an integer in [1, {bound}], found {value}")
    if limits.max_kv_cache_capacity < limits.max_input_len:
        raise InputError(f"--maxKVCacheCapacity: expected at least --maxInputLen ({limits.max_input_len}), "
                         f"found {limits.max_kv_cache_capacity}")
