"""The EAGLE3 draft: its checkpoint facts, `model.onnx` (contracts.md 2.3), `d2t.safetensors` and its config keys.

A draft checkpoint (SpecForge / EAGLE3 layout, plain or written by `python -m quantization draft`) is one decoder
layer named `midlayer.*` plus `fc`, `norm`, `lm_head` and the `d2t` vocabulary map. Its graph, built from the base
exporter's blocks:

    h = hidden_states_from_draft + fc(hidden_states_input)           # one of the two is zero in any call
    x = [input_layernorm(inputs_embeds) ‖ hidden_norm(h)]             # 2H wide; embeddings from the BASE table
    h = h + o_proj(AttentionPlugin(qkv_proj(x)))                      # tree attention, fp16 KV cache
    h = h + mlp(post_attention_layernorm(h))
    hidden_states = h                                                # every token, before the final norm
    logits = lm_head(norm(h[last_token_ids]))                         # draft vocabulary, fp32

The reference's 0.11 wheel adds a LogSoftmax and gathers the hidden state; this keeps the 0.10 batch-major outputs
(raw logits, the full hidden sequence) and leaves the log-softmax to the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from onnx import helper
from safetensors.torch import save_file

from contract.checkpoint import Checkpoint
from contract.eagle3 import (
    D2T_OFFSET,
    D2T_TENSOR,
    ROLE_DRAFT,
    SPEC_EAGLE3,
    check_d2t,
    draft_target_layers,
)
from contract.errors import InputError
from contract.fields import is_int
from contract.graph_io import (
    HIDDEN_STATES,
    HIDDEN_STATES_FROM_DRAFT,
    HIDDEN_STATES_INPUT,
    INPUTS_EMBEDS,
)
from contract.kv import KvDtype
from llm_loader.model_config import ModelConfig
from llm_loader.onnx_graph import (
    FP16,
    WeightFile,
    attention,
    final,
    io_specs,
    linear,
    mlp_block,
    new_graph,
    rmsnorm,
    save_model,
)
from llm_loader.quantized_checkpoint import QuantizedCheckpoint


@dataclass(frozen=True)
class DraftFacts:
    """What the draft's graph and config need beyond its ModelConfig."""

    draft_vocab_size: int
    base_model_hidden_size: int  # fc's input width = base hidden x number of target layers
    num_target_layers: int
    target_layer_ids: list[int] | None  # None: the draft names none and reads its base's default layers


def draft_facts(ckpt: Checkpoint, cfg: ModelConfig, quant: QuantizedCheckpoint | None) -> DraftFacts:
    """Check the draft's tensors against its config.json and return the facts its export needs."""
    where = ckpt.path / "config.json"
    draft_vocab = ckpt.config.get("draft_vocab_size") or cfg.vocab_size
    if not isinstance(draft_vocab, int) or not 0 < draft_vocab <= cfg.vocab_size:
        raise InputError(f"{where}: draft_vocab_size: expected an integer in [1, vocab_size {cfg.vocab_size}], "
                         f"found {draft_vocab!r}")
    for name in ("fc.weight", "lm_head.weight", "norm.weight", "midlayer.hidden_norm.weight", "d2t"):
        if name not in ckpt:
            raise InputError(f"{ckpt.path}: expected EAGLE3 draft tensor {name!r}, found none "
                             f"(an EAGLE3 draft has midlayer.*, fc, norm, lm_head and d2t)")
    linear_fc = quant.linears.get("fc") if quant else None
    fc_shape = tuple(linear_fc.shape) if linear_fc is not None else tuple(ckpt.tensor("fc.weight").shape)
    if len(fc_shape) != 2 or fc_shape[0] != cfg.hidden_size or fc_shape[1] % cfg.hidden_size or not fc_shape[1]:
        raise InputError(f"{ckpt.path}: tensor fc.weight: expected [{cfg.hidden_size}, k * {cfg.hidden_size}] (the "
                         f"draft's hidden_size, k >= 1 base hidden states of the same width), found {list(fc_shape)}")
    base_total = fc_shape[1]
    count = base_total // cfg.hidden_size
    ids = draft_target_layers(ckpt.config)
    if ids is not None and (len(ids) != count or not all(is_int(i) and i >= 0 for i in ids)):
        raise InputError(f"{where}: target layer ids: expected {count} non-negative integers (fc.weight reads {count} "
                         f"base hidden states), found {ids}")
    return DraftFacts(draft_vocab, base_total, count, ids)


def read_d2t(ckpt: Checkpoint, facts: DraftFacts, vocab_size: int) -> torch.Tensor:
    """The checkpoint's `d2t` as int32 `[draft_vocab]`, checked: every draft id maps into the base vocabulary."""
    d2t = ckpt.tensor("d2t")
    check_d2t(d2t, facts.draft_vocab_size, ckpt.path)
    targets = torch.arange(len(d2t)) + d2t.long()
    if not ((targets >= 0) & (targets < vocab_size)).all():
        bad = int(torch.nonzero((targets < 0) | (targets >= vocab_size))[0])
        raise InputError(f"{ckpt.path}: tensor d2t: expected offsets with id + d2t[id] in [0, {vocab_size}), found "
                         f"id {bad} -> {int(targets[bad])}")
    return d2t.to(torch.int32)


def write_d2t(path: Path, d2t: torch.Tensor) -> None:
    """`d2t.safetensors`: tensor `d2t` int32 `[draft_vocab]`, the checkpoint's offsets unchanged (reference 2.8b)."""
    save_file({D2T_TENSOR: d2t.contiguous()}, str(path), metadata={"form": D2T_OFFSET})


def draft_config_keys(facts: DraftFacts) -> dict:
    """The EAGLE3 keys of the draft's runtime config.json (reference 2.3)."""
    return {
        "spec_decode_type": SPEC_EAGLE3,
        "engine_role": ROLE_DRAFT,
        "draft_vocab_size": facts.draft_vocab_size,
        "base_model_hidden_size": facts.base_model_hidden_size,
        "eagle3_config": {"target_layer_ids": facts.target_layer_ids, "num_target_layers": facts.num_target_layers},
    }


def write_draft_model(ckpt: Checkpoint, cfg: ModelConfig, facts: DraftFacts, out_dir: Path,
                      quant: QuantizedCheckpoint | None = None) -> Path:
    """`out_dir/model.onnx` + `.data` of the draft (module doc); its one KV cache layer is always fp16."""
    weights = WeightFile(Path(out_dir) / "model.onnx.data")
    h = cfg.hidden_size
    try:
        g = new_graph(ckpt, cfg, weights, quant, tree=True)
        fc = linear(g, HIDDEN_STATES_INPUT, "fc", (h, facts.base_model_hidden_size), "fc")
        hidden = g.op("Add", [HIDDEN_STATES_FROM_DRAFT, fc], "draft_hidden")
        embeds = rmsnorm(g, INPUTS_EMBEDS, "midlayer.input_layernorm.weight", "layers.0/input_layernorm")
        normed = rmsnorm(g, hidden, "midlayer.hidden_norm.weight", "layers.0/hidden_norm")
        x = g.op("Concat", [embeds, normed], "layers.0/embeds_hidden", axis=-1)
        hidden = attention(g, x, hidden, 0, "midlayer.self_attn", 2 * h)
        hidden = mlp_block(g, hidden, 0, layer="midlayer")
        g.op("Identity", [hidden], "draft_hidden_out", outputs=[HIDDEN_STATES])
        final(g, hidden, norm="norm.weight", vocab_size=facts.draft_vocab_size)
    finally:
        weights.close()
    inputs, outputs = io_specs(cfg, KvDtype.FP16.onnx, tree=True, vocab_size=facts.draft_vocab_size)
    vi = helper.make_tensor_value_info
    inputs[1:1] = [vi(HIDDEN_STATES_INPUT, FP16, ["batch", "seq_len", facts.base_model_hidden_size]),
                   vi(HIDDEN_STATES_FROM_DRAFT, FP16, ["batch", "seq_len", h])]
    outputs.insert(1, vi(HIDDEN_STATES, FP16, ["batch", "seq_len", h]))
    return save_model(g, "eagle3_draft", inputs, outputs, out_dir)
