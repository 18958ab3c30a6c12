"""Model families: what differs between the decoder-only architectures this project reads, as one row per family.

The exporter's graph blocks, the calibration hooks, the smoothing / AWQ mappings, the fusion groups, the FP8 KV
scale names and both pre-load checks (the quantizer's and the exporter's) read a family's row; nothing else names a
`model_type`. The module names are Hugging Face's, so the same row describes the checkpoint, the `transformers`
model the quantizer calibrates, and the names model.onnx gives its weights.

Adding a family: its row here (and, where its structure needs what no row field says yet, the field and the code
that reads it), a tiny random model of it in tests/helpers.py, and the tests parametrized over families.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import InputError


@dataclass(frozen=True)
class Family:
    """One decoder-only architecture (pre-norm RMSNorm blocks, RoPE attention with GQA, gated MLP)."""

    model_type: str  # HF config.json `model_type`
    architecture: str  # HF `architectures[0]`
    # structure
    attention_bias: bool | None = None  # q/k/v biases: True always (Qwen2), None = config.json `attention_bias`
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    activation: str = "silu"  # config.json `hidden_act` the MLP's gate takes (the only one the graph writes)
    # Hugging Face module names
    layers: str = "model.layers"  # decoder layer i is f"{layers}.{i}"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"  # relative to the decoder layer
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    q_proj: str = "q_proj"  # relative to `attention`
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"  # relative to `mlp`
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def attention_of(self, i: int) -> str:
        return f"{self.layer(i)}.{self.attention}"

    def linears(self) -> dict[str, str]:
        """The decoder layer's linears, by role, as paths relative to the layer."""
        a, m = self.attention, self.mlp
        return {"q": f"{a}.{self.q_proj}", "k": f"{a}.{self.k_proj}", "v": f"{a}.{self.v_proj}",
                "o": f"{a}.{self.o_proj}", "gate": f"{m}.{self.gate_proj}", "up": f"{m}.{self.up_proj}",
                "down": f"{m}.{self.down_proj}"}

    def fusion_groups(self) -> dict[str, tuple[str, ...]]:
        """Linears that read one input and that a runtime fuses into one GEMM (relative leaf names -> group key)."""
        return {"qkv": (self.q_proj, self.k_proj, self.v_proj), "gate_up": (self.gate_proj, self.up_proj)}

    def smoothing_sources(self) -> dict[str, str]:
        """What produces each linear's input (both relative to the decoder layer): a norm whose weight, or a linear
        whose output rows, a per-channel input scale can be folded into (quantization/smoothing.py)."""
        r = self.linears()
        return {r["q"]: self.input_norm, r["k"]: self.input_norm, r["v"]: self.input_norm, r["o"]: r["v"],
                r["gate"]: self.post_attention_norm, r["up"]: self.post_attention_norm, r["down"]: r["up"]}

    def kv_scale_names(self, i: int) -> tuple[str, str, str]:
        """The FP8 KV cache's q, k, v scale tensors of layer i (ModelOpt's names)."""
        p = self.attention_of(i)
        return f"{p}.{self.q_proj}.q_scale", f"{p}.{self.k_proj}.k_scale", f"{p}.{self.v_proj}.v_scale"

    def has_attention_bias(self, config: dict) -> bool:
        return self.attention_bias if self.attention_bias is not None else bool(config.get("attention_bias", False))


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM"),  # Llama 2/3/3.x, SmolLM2, TinyLlama
    Family("qwen2", "Qwen2ForCausalLM", attention_bias=True),  # Qwen2, Qwen2.5
    Family("qwen3", "Qwen3ForCausalLM", qk_norm=True),
)}


def family_of(config: dict, where: str) -> Family:
    """The family of an HF config.json (`model_type`); InputError naming `where` for one this project cannot read."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise InputError(f"{where}: unknown architecture: model_type expected one of {list(FAMILIES)}, found "
                         f"{model_type!r}")
    return FAMILIES[model_type]


def family_of_model(model) -> Family:
    """The family of a loaded `transformers` model (its config's `model_type`)."""
    return family_of({"model_type": getattr(model.config, "model_type", None)}, "the model's config")
