"""TensorRT optimization profiles for the LLM and embedding engines, as pure functions CI can test.

Two profiles, like the reference builder: "context" (prefill, up to max_input_len new tokens) and "generation" (one
token per row; an EAGLE3 base or draft takes up to its tree size, with the packed tree mask of ceil(tree/32) words
per row). The KV cache is one contiguous tensor of `max_kv_cache_capacity` tokens per row (contracts.md section 2),
so its shape is fixed except for batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import InputError
from contract.graph_io import (
    ATTENTION_MASK,
    ATTENTION_POS_ID,
    CONTEXT_LENGTHS,
    HIDDEN_STATES_FROM_DRAFT,
    HIDDEN_STATES_INPUT,
    INPUTS_EMBEDS,
    KVCACHE_START_INDEX,
    LAST_TOKEN_IDS,
    ROPE_COS_SIN,
    past_key_values,
    tree_mask_words,
)
from contract.runtime_config import LIMIT_BOUNDS

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
    tree: bool = False  # EAGLE3 base or draft: attention_mask / attention_pos_id inputs
    draft_hidden_input: int | None = None  # EAGLE3 draft: width of hidden_states_input (base_model_hidden_size)


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def llm_profiles(limits: Limits, dims: ModelDims, gen_tokens: int = 1) -> list[Profile]:
    """[context, generation] profiles for every input of `model.onnx`; `gen_tokens` is the generation profile's
    tokens per row (1, or an EAGLE3 base's / draft's tree size, which also selects that many logits)."""
    b, length, cap = limits.max_batch_size, limits.max_input_len, limits.max_kv_cache_capacity
    kv = (2, dims.num_kv_heads, cap, dims.head_dim)

    def common(seq_opt: int, seq_max: int, selected: int) -> dict[str, tuple[Shape, Shape, Shape]]:
        def per_token(width: int) -> tuple[Shape, Shape, Shape]:
            return (1, 1, width), (b, seq_opt, width), (b, seq_max, width)

        shapes = {
            INPUTS_EMBEDS: per_token(dims.hidden_size),
            CONTEXT_LENGTHS: ((1,), (b,), (b,)),
            KVCACHE_START_INDEX: ((1,), (b,), (b,)),
            ROPE_COS_SIN: ((1, cap, dims.rotary_dim),) * 3,
            LAST_TOKEN_IDS: ((1, 1), (b, selected), (b, selected)),
        }
        if dims.tree:  # the mask has ceil(seq/32) words per row; a prefill passes the causal mask (contracts.md 2.2)
            shapes[ATTENTION_MASK] = ((1, 1, 1), (b, seq_opt, tree_mask_words(seq_opt)),
                                            (b, seq_max, tree_mask_words(seq_max)))
            shapes[ATTENTION_POS_ID] = ((1, 1), (b, seq_opt), (b, seq_max))
        if dims.draft_hidden_input:
            shapes[HIDDEN_STATES_INPUT] = per_token(dims.draft_hidden_input)
            shapes[HIDDEN_STATES_FROM_DRAFT] = per_token(dims.hidden_size)
        for i in range(dims.num_layers):
            shapes[past_key_values(i)] = ((1, *kv), (b, *kv), (b, *kv))
        return shapes

    return [Profile("context", common(max(1, length // 2), length, 1)),
            Profile("generation", common(gen_tokens, gen_tokens, gen_tokens))]


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


def validate_tree_size(flag: str, tree_size: int, limits: Limits) -> None:
    """A spec engine's generation profile takes `tree_size` tokens per row: at least 1, at most the cache."""
    if not 1 <= tree_size <= limits.max_kv_cache_capacity:
        raise InputError(f"{flag}: expected 1..{limits.max_kv_cache_capacity} (at most --maxKVCacheCapacity), "
                         f"found {tree_size}")
