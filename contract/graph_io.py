"""The graph I/O names of model.onnx and of every engine (contracts.md 2, 2.2, 2.3): what the exporter writes, the
builder profiles and the runtime binds."""

from __future__ import annotations

# --- graph I/O names (contracts.md section 2) ---------------------------------------------------------------------
INPUTS_EMBEDS = "inputs_embeds"
CONTEXT_LENGTHS = "context_lengths"
ROPE_COS_SIN = "rope_rotary_cos_sin"
KVCACHE_START_INDEX = "kvcache_start_index"
LAST_TOKEN_IDS = "last_token_ids"
LOGITS = "logits"
INPUT_IDS = "input_ids"  # the embedding engine's input; its output is INPUTS_EMBEDS
PAST_PREFIX, PRESENT_PREFIX = "past_key_values_", "present_key_values_"


# EAGLE3 (contracts.md sections 2.2 and 2.3): the base's tree inputs and hidden-state output, the draft's inputs
ATTENTION_MASK = "attention_mask"  # int32 [batch, seq_len, ceil(seq_len / 32)]: the bit-packed tree mask
ATTENTION_POS_ID = "attention_pos_id"  # int32 [batch, seq_len]: each new token's RoPE position
HIDDEN_STATES = "hidden_states"  # base: fp16 [batch, seq_len, k * hidden]; draft: fp16 [batch, seq_len, hidden]
HIDDEN_STATES_INPUT = "hidden_states_input"  # draft input: the base's hidden_states
HIDDEN_STATES_FROM_DRAFT = "hidden_states_from_draft"  # draft input: the draft's own previous hidden_states
TREE_MASK_BITS = 32  # tree-mask flags per int32 word: bit j % 32 of word j // 32 of row i = node i sees node j


def tree_mask_words(tree_size: int) -> int:
    """int32 words per row of the packed tree mask of `tree_size` tokens."""
    return -(-tree_size // TREE_MASK_BITS)


def past_key_values(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}"


def present_key_values(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}"
