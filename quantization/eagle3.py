"""EAGLE3 draft checkpoints: load one, run its single-step forward, and calibrate it on the base's hidden states.

The draft (SpecForge / EAGLE3 reference layout) is one decoder layer fed by the base model:

    aux = cat(base hidden states at the target layers)          # [B, S, 3 * H_base]
    h   = fc(aux)                                               # [B, S, H]
    x   = cat(input_layernorm(embed_tokens(ids)), hidden_norm(h))  # [B, S, 2H]; embed_tokens is the BASE table
    h   = h + o_proj(attention(q/k/v_proj(x)))                  # causal, RoPE
    h   = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                                   # [B, S, draft_vocab]

Hidden-state convention (spec 2.8, the same as the EAGLE3 base export): target layer `i` means the INPUT of decoder
layer `i`, which is HF's `output_hidden_states[i]` (index 0 = the embeddings). The ids come from the draft config's
`eagle_config.eagle_aux_hidden_state_layer_ids` or `target_layer_ids`, else the default `[2, N//2, N-4]`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from contract.eagle3 import default_eagle_layers, draft_target_layers, is_eagle3_config
from contract.errors import InputError
from contract.fields import is_int
from contract.jsonfile import read_json
from quantization.calibrate import Calibration
from quantization.datasets import Batch

REQUIRED_TENSORS = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
)


def target_layer_ids(config: dict, num_base_layers: int) -> list[int]:
    """Which base hidden states (inputs of these decoder layers) the draft's `fc` consumes."""
    n = num_base_layers
    ids = draft_target_layers(config) or default_eagle_layers(n)
    bad = [i for i in ids if not (is_int(i) and 0 <= i < n)]
    if bad:
        raise InputError(
            f"draft config.json target layers {ids}: expected decoder-layer indices in [0, {n}) of the base "
            f"({n} layers), found {bad}; set eagle_config.eagle_aux_hidden_state_layer_ids"
        )
    return ids


class Eagle3Attention(torch.nn.Module):
    """Causal GQA attention whose q/k/v read the 2H-wide [embeds ‖ hidden] input and whose output is H wide."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = torch.nn.Linear(2 * hidden, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.v_proj = torch.nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Eagle3MLP(torch.nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3MidLayer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = torch.nn.RMSNorm(hidden, eps=eps)
        self.hidden_norm = torch.nn.RMSNorm(hidden, eps=eps)
        self.self_attn = Eagle3Attention(hidden, heads, kv_heads, head_dim)
        self.post_attention_layernorm = torch.nn.RMSNorm(hidden, eps=eps)
        self.mlp = Eagle3MLP(hidden, intermediate)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = hidden + self.self_attn(x, cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Draft(torch.nn.Module):
    """One draft step without a tree: what calibration needs. Module names match the checkpoint's tensor names."""

    def __init__(self, config: dict, fc_in: int) -> None:
        super().__init__()
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        eps = config.get("rms_norm_eps", 1e-6)
        self.fc = torch.nn.Linear(fc_in, hidden, bias=False)
        self.midlayer = Eagle3MidLayer(
            hidden, heads, config.get("num_key_value_heads", heads), head_dim, config["intermediate_size"], eps
        )
        self.norm = torch.nn.RMSNorm(hidden, eps=eps)
        self.lm_head = torch.nn.Linear(hidden, config.get("draft_vocab_size") or config["vocab_size"], bias=False)
        # HF's rotary embedding reads rope_theta / rope_scaling / rope_parameters the way the draft's trainer wrote them
        self.rotary = LlamaRotaryEmbedding(LlamaConfig.from_dict({**config, "head_dim": head_dim}))

    def forward(self, embeds: torch.Tensor, aux_hidden: torch.Tensor) -> torch.Tensor:
        """`embeds` [B, S, H] from the base table, `aux_hidden` [B, S, fc_in] -> draft logits [B, S, draft_vocab]."""
        hidden = self.fc(aux_hidden)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        cos, sin = self.rotary(hidden, positions)
        hidden = self.midlayer(embeds, hidden, cos.to(hidden.dtype), sin.to(hidden.dtype))
        return self.lm_head(self.norm(hidden))


def read_draft_config(draft_dir: Path) -> dict:
    """The draft's config.json, refused unless it is an EAGLE3 draft."""
    path = draft_dir / "config.json"
    config = read_json(path, "the EAGLE3 draft's config.json")
    if "dflash_config" in config:
        raise InputError(f"{path}: expected an EAGLE3 draft, found a DFlash draft (dflash_config), not supported")
    if not is_eagle3_config(config):
        raise InputError(
            f"{path}: expected an EAGLE3 draft (architectures *Eagle3*, draft_vocab_size or ttt_length), "
            f"found architectures {config.get('architectures')}"
        )
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise InputError(f"{path}: expected integer {key!r}, found {config.get(key)!r}")
    if "quantization_config" in config or (draft_dir / "hf_quant_config.json").exists():
        raise InputError(f"{draft_dir}: expected an unquantized draft, found a quantization config")
    return config


def read_draft_tensors(draft_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the draft's *.safetensors files. Pickled weights are refused: loading them can run code."""
    files = sorted(draft_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in draft_dir.glob("*.bin")) + sorted(p.name for p in draft_dir.glob("*.pt"))
        found = f"only pickled weights {pickles} (not loaded)" if pickles else "none"
        raise InputError(f"{draft_dir}: expected *.safetensors draft weights, found {found}")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    missing = [n for n in REQUIRED_TENSORS if n not in tensors]
    if missing:
        raise InputError(f"{draft_dir}: expected EAGLE3 draft tensors {missing}, found none of them")
    return tensors


def build_draft(config: dict, tensors: dict[str, torch.Tensor], base_hidden: int, num_aux: int, draft_dir: Path):
    """An `Eagle3Draft` holding the checkpoint's weights (fp32), after checking its shapes against the base."""
    hidden = config["hidden_size"]
    fc = tensors["fc.weight"]
    if hidden != base_hidden or tuple(fc.shape) != (hidden, num_aux * base_hidden):
        raise InputError(
            f"{draft_dir}: fc.weight: expected [{base_hidden}, {num_aux} * {base_hidden}] (draft hidden_size = base "
            f"hidden_size, {num_aux} base hidden states), found {list(fc.shape)} with hidden_size {hidden}"
        )
    draft = Eagle3Draft(config, fc.shape[1])
    expected = draft.state_dict()
    weights = {name: tensors[name].float() for name in expected}
    for name, t in weights.items():
        if t.shape != expected[name].shape:
            raise InputError(
                f"{draft_dir}: tensor {name}: expected shape {list(expected[name].shape)} from config.json, "
                f"found {list(t.shape)}"
            )
    draft.load_state_dict(weights)
    return draft.eval()


@torch.no_grad()
def calibrate_draft(base, draft: Eagle3Draft, batches: list[Batch], layer_ids: list[int], linears: list[str]):
    """Run each batch through the base (hidden states) and the draft; amax of the named draft linears' inputs.

    Only real tokens count: right padding is dropped from every amax with the batch's attention mask.
    """
    modules = dict(draft.named_modules())
    amax: dict[str, torch.Tensor] = {}
    mask = None

    def observe(name):
        def hook(_module, args):
            value = args[0][mask].abs().amax().float()
            amax[name] = value if name not in amax else torch.maximum(amax[name], value)

        return hook

    handles = [modules[name].register_forward_pre_hook(observe(name)) for name in linears]
    device = next(draft.parameters()).device
    num_tokens = 0
    try:
        for batch in tqdm(batches, desc="calibrating draft", unit="batch"):
            ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
            mask = attention.bool()
            num_tokens += int(mask.sum())
            out = base(input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
            aux = torch.cat([out.hidden_states[i] for i in layer_ids], dim=-1)
            draft(base.get_input_embeddings()(ids), aux)
    finally:
        for h in handles:
            h.remove()
    return Calibration(input_amax={k: float(v) for k, v in amax.items()}, num_tokens=num_tokens)
