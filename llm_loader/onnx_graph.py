"""Build `model.onnx` (contracts.md section 2) for the decoder families of `contract.families`, streaming the weights to `model.onnx.data`.

The graph is written op by op with `onnx.helper`, one function per block (RMSNorm, attention, MLP, decoder layer,
final). Weights are read from the checkpoint one tensor at a time, cast to fp16, transposed to `[in, out]` for
`MatMul`, and appended to the external data file at once; the ModelProto only ever holds their offsets. That keeps
the peak memory of an export near one copy of the weights instead of the two that building a full ModelProto and
converting it to external data would hold.

A quantized checkpoint (`Graph.quant`) changes only the linears it quantizes and the KV cache dtype; the graph forms
are contracts.md section 2.1. Quantized linears are never fused (Q|K|V and gate|up each keep their own scales), so
those blocks Concat the separate projections instead of one stacked MatMul.

An EAGLE3 base (`eagle_layers`, contracts.md 2.2) runs every attention layer in tree mode and also returns the
residual stream at those layers as `hidden_states`; the EAGLE3 draft graph (llm_loader/eagle3_draft.py) is built from
the same blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from contract.checkpoint import Checkpoint
from contract.errors import InputError
from contract.graph_io import (
    ATTENTION_MASK,
    ATTENTION_POS_ID,
    CONTEXT_LENGTHS,
    HIDDEN_STATES,
    INPUTS_EMBEDS,
    KVCACHE_START_INDEX,
    LAST_TOKEN_IDS,
    LOGITS,
    ROPE_COS_SIN,
    past_key_values,
    present_key_values,
)
from contract.kv import KvDtype
from contract.versions import IR_VERSION, ONNX_OPSET, PRODUCER
from contract.weight_formats import UNQUANTIZED, summarize_weight_formats
from llm_loader.model_config import ModelConfig
from llm_loader.quantized_checkpoint import QuantizedCheckpoint
from plugins import weight_formats
from plugins.attention import schema as attention_schema
from plugins.graph_builder import GraphBuilder, Names
from plugins.nvfp4 import schema as nvfp4_schema
from plugins.weight_formats.linear import QuantizedLinear

DATA_ALIGN = 4096  # page-aligned tensors can be memory-mapped by runtimes
FP16, FP32, INT32, INT64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


class WeightFile:
    """Appends initializers to the one external data file as they are produced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.initializers: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray, data_type: int | None = None, dims: tuple[int, ...] | None = None) -> str:
        """Append `array`; `data_type`/`dims` override numpy's for byte views (FP8 as uint8, packed FP4)."""
        array = np.ascontiguousarray(array)
        end = self.file.tell()
        offset = end + (-end % DATA_ALIGN)
        self.file.seek(offset)
        array.tofile(self.file)
        data_type = helper.np_dtype_to_tensor_dtype(array.dtype) if data_type is None else data_type
        tensor = TensorProto(name=name, data_type=data_type, dims=array.shape if dims is None else dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


class Graph(GraphBuilder):
    """The exporter's builder: nodes in order under stable names, constants and weights streamed to the weight file;
    plus the checkpoint, model config and quantization the blocks read."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, weights: WeightFile, quant: QuantizedCheckpoint | None = None,
                 tree: bool = False):
        super().__init__(Names(), lambda name, array: weights.add(name, array))
        self.ckpt, self.cfg, self.weights, self.quant = ckpt, cfg, weights, quant
        self.tree = tree  # every AttentionPlugin in tree mode, reading attention_mask / attention_pos_id
        self.shared: dict[str, str] = {}

    def shared_const(self, name: str, values, dtype) -> str:
        """A constant written once per graph (only quantized graphs use these, so fp16 bytes do not change)."""
        if name not in self.shared:
            self.shared[name] = self.const(values, dtype, name=name)
        return self.shared[name]

    def scalar(self, name: str, value: torch.Tensor | float, dtype: torch.dtype) -> str:
        """A true 0-d initializer (per-tensor Q/DQ scales; `add` would store a 0-d array as [1])."""
        array = torch.as_tensor(value).to(dtype).reshape(1).numpy()
        return self.weights.add(name, array, dims=())

    def quantized(self, module: str) -> QuantizedLinear | None:
        """The module's quantized linear, or None when it stays fp16."""
        linear = self.quant.linears.get(module) if self.quant else None
        return linear if linear is not None and linear.format != UNQUANTIZED else None

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.ckpt.tensor_fp16(name, shape)

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        return self.weights.add(name, tensor.numpy())

    def add_raw(self, name: str, array: np.ndarray, data_type: int, dims: tuple[int, ...] | None = None) -> str:
        """`array`'s bytes as an initializer of ONNX `data_type` (FP8 as uint8, packed FP4)."""
        return self.weights.add(name, array, data_type, dims)

    def linear_weight(self, name: str, parts: list[tuple[str, tuple[int, int]]]) -> str:
        """Checkpoint `[out, in]` weights stacked along out, stored transposed `[in, out]` for MatMul."""
        stacked = torch.cat([self.read(part, shape) for part, shape in parts])
        return self.weight(name, stacked.t().contiguous())


def linear(g: Graph, x: str, module: str, shape: tuple[int, int], name: str) -> str:
    """`x @ W.T` for one checkpoint linear `[out, in]`: fp16 MatMul, or its format's activation and weight forms
    (contracts.md 2.1; plugins/weight_formats)."""
    q = g.quantized(module)
    if q is None:
        return g.op("MatMul", [x, g.linear_weight(f"{module}.weight", [(f"{module}.weight", shape)])], name)
    if q.shape != tuple(shape):
        raise InputError(f"tensor {module}.weight: expected logical shape {list(shape)}, found {list(q.shape)}")
    fmt = weight_formats.get(q.format)
    act = fmt.graph_activation(g, x, q, name)
    return g.op("MatMul", [act, fmt.graph_weight(g, q, name)], name)


def kv_cache_dtype(quant: QuantizedCheckpoint | None) -> KvDtype:
    """FP8 when the checkpoint has an FP8 KV cache, else FP16; per-layer fp16 KV is refused (one KV dtype)."""
    if quant is None or str(quant.kv_cache_quant_algo or "").upper() != "FP8":
        return KvDtype.FP16
    if quant.kv_cache_fp16_layers:
        raise InputError(f"{quant.path / 'hf_quant_config.json'}: kv_cache_fp16_layers: expected none (the engine "
                         f"has one KV dtype for all layers), found {quant.kv_cache_fp16_layers}")
    return KvDtype.FP8


def kv_cache_attrs(g: Graph, i: int) -> dict:
    """AttentionPlugin attributes of layer i: FP8 KV with the checkpoint's [q, k, v] scales (q 1.0 when absent,
    like the reference exporter)."""
    if kv_cache_dtype(g.quant) is not KvDtype.FP8:
        return {}
    s = g.quant.kv_scales.get(i)
    if s is None:
        raise InputError(f"tensor {g.cfg.family.kv_scale_names(i)[1]}: expected by kv_cache_quant_algo FP8, found none")
    return {"enable_fp8_kv_cache": True, "qkv_scales": (1.0 if s.q_scale is None else s.q_scale, s.k_scale, s.v_scale)}


def weight_format_summary(quant: QuantizedCheckpoint | None) -> tuple[str, dict[str, int]]:
    """config.json `weight_format` ("fp16", the one format of the quantized linears, or "mixed") and the number of
    quantized linears of each format (`weight_formats`, written when mixed)."""
    return summarize_weight_formats(q.format for q in (quant.linears.values() if quant else ()))


def rmsnorm(g: Graph, x: str, weight: str, name: str) -> str:
    """HF LlamaRMSNorm: normalise in fp32, cast back to fp16, then scale by the fp16 weight.

    Written as the canonical Pow -> ReduceMean -> Add -> Sqrt -> Div chain: the pattern ONNX Runtime
    (SimplifiedLayerNormalization) and TensorRT fuse into one kernel (about 5% faster SmolLM2 decode on ORT).
    """
    gamma = g.weight(weight, g.read(weight, (g.cfg.hidden_size,)))
    xf = g.op("Cast", [x], f"{name}/cast_fp32", to=FP32)
    square = g.op("Pow", [xf, "const.two"], f"{name}/square")
    variance = g.op("ReduceMean", [square, "const.last_axis"], f"{name}/mean", keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [variance, "const.rms_norm_eps"], f"{name}/add_eps")], f"{name}/sqrt")
    normed = g.op("Div", [xf, std], f"{name}/normalize")
    return g.op("Mul", [g.op("Cast", [normed], f"{name}/cast_fp16", to=FP16), gamma], f"{name}/scale")


def attention_block(g: Graph, x: str, i: int) -> str:
    """RMSNorm -> fused QKV (+bias) -> AttentionPlugin (RoPE, KV write, GQA) -> o_proj -> residual."""
    f = g.cfg.family
    normed = rmsnorm(g, x, f"{f.layer(i)}.{f.input_norm}.weight", f"layers.{i}/input_layernorm")
    return attention(g, normed, x, i, f.attention_of(i), g.cfg.hidden_size)


def attention(g: Graph, normed: str, residual: str, i: int, p: str, in_features: int) -> str:
    """Q/K/V of `normed` (`in_features` wide) -> AttentionPlugin on cache i -> `p.o_proj` -> added to `residual`."""
    cfg, f = g.cfg, g.cfg.family
    h, d, hq, hkv = in_features, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    projections = [(f.q_proj, hq), (f.k_proj, hkv), (f.v_proj, hkv)]
    if any(g.quantized(f"{p}.{n}") for n, _ in projections):
        parts = [linear(g, normed, f"{p}.{n}", (heads * d, h), f"layers.{i}/{n}") for n, heads in projections]
        qkv = g.op("Concat", parts, f"layers.{i}/qkv_concat", axis=-1)
    else:
        qkv_w = g.linear_weight(f"{p}.qkv_proj.weight",
                                [(f"{p}.{n}.weight", (heads * d, h)) for n, heads in projections])
        qkv = g.op("MatMul", [normed, qkv_w], f"layers.{i}/qkv_proj")
    if cfg.attention_bias:
        bias = torch.cat([g.read(f"{p}.{n}.bias", (heads * d,)) for n, heads in projections])
        qkv = g.op("Add", [qkv, g.weight(f"{p}.qkv_proj.bias", bias)], f"layers.{i}/qkv_bias")

    inputs = [qkv, past_key_values(i), CONTEXT_LENGTHS, ROPE_COS_SIN, KVCACHE_START_INDEX]
    if cfg.qk_norm:
        inputs += [g.weight(f"{p}.{n}.weight", g.read(f"{p}.{n}.weight", (d,))) for n in (f.q_norm, f.k_norm)]
    if g.tree:
        inputs += [ATTENTION_MASK, ATTENTION_POS_ID]
    attn = f"layers.{i}/attention/out0"
    g.nodes.append(attention_schema.make_node(
        inputs, [attn, present_key_values(i)], name=g.names.claim(f"layers.{i}/attention"),
        num_q_heads=hq, num_kv_heads=hkv, head_size=d, enable_qk_norm=cfg.qk_norm, rms_norm_eps=cfg.rms_norm_eps,
        enable_tree_attention=g.tree, **kv_cache_attrs(g, i),
    ))
    flat = g.op("Reshape", [attn, "const.attn_flat_shape"], f"layers.{i}/attn_flatten")
    out = linear(g, flat, f"{p}.{f.o_proj}", (cfg.hidden_size, hq * d), f"layers.{i}/o_proj")
    return g.op("Add", [residual, out], f"layers.{i}/attn_residual")


def mlp_block(g: Graph, x: str, i: int, layer: str | None = None) -> str:
    """RMSNorm -> fused gate|up -> SiLU(gate) * up -> down_proj -> residual; `layer` = the checkpoint's name of the
    decoder layer (the family's `layer(i)`, or the EAGLE3 draft's `midlayer`)."""
    cfg, f = g.cfg, g.cfg.family
    layer = layer or f.layer(i)
    p = f"{layer}.{f.mlp}"
    h, inter = cfg.hidden_size, cfg.intermediate_size
    normed = rmsnorm(g, x, f"{layer}.{f.post_attention_norm}.weight", f"layers.{i}/post_attention_layernorm")
    if g.quantized(f"{p}.{f.gate_proj}") or g.quantized(f"{p}.{f.up_proj}"):
        gate, up = (linear(g, normed, f"{p}.{n}", (inter, h), f"layers.{i}/{n}") for n in (f.gate_proj, f.up_proj))
    else:
        parts = [(f"{p}.{n}.weight", (inter, h)) for n in (f.gate_proj, f.up_proj)]
        gate_up = g.op("MatMul", [normed, g.linear_weight(f"{p}.gate_up_proj.weight", parts)],
                       f"layers.{i}/gate_up_proj")
        gate, up = g.op("Split", [gate_up], f"layers.{i}/split", outputs=2, axis=-1, num_outputs=2)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"layers.{i}/sigmoid")], f"layers.{i}/silu")
    act = g.op("Mul", [silu, up], f"layers.{i}/gate_mul_up")
    out = linear(g, act, f"{p}.{f.down_proj}", (h, inter), f"layers.{i}/down_proj")
    return g.op("Add", [x, out], f"layers.{i}/mlp_residual")


def decoder_layer(g: Graph, x: str, i: int) -> str:
    return mlp_block(g, attention_block(g, x, i), i)


def final(g: Graph, x: str, norm: str | None = None, vocab_size: int | None = None) -> str:
    """Final RMSNorm, the hidden states at `last_token_ids`, lm_head (the embedding table when tied), fp32 logits;
    the EAGLE3 draft passes its own norm name and draft vocabulary size."""
    cfg, f = g.cfg, g.cfg.family
    vocab = vocab_size or cfg.vocab_size
    normed = rmsnorm(g, x, norm or f"{f.final_norm}.weight", "final_norm")
    index = g.op("Unsqueeze", [LAST_TOKEN_IDS, "const.last_axis"], "select/unsqueeze")
    selected = g.op("GatherND", [normed, index], "select/gather", batch_dims=1)
    if g.quantized(f.lm_head):
        logits = linear(g, selected, f.lm_head, (vocab, cfg.hidden_size), "lm_head")
    else:
        source = f"{f.embed_tokens}.weight" if cfg.tie_word_embeddings else f"{f.lm_head}.weight"
        lm_head = g.linear_weight("lm_head.weight", [(source, (vocab, cfg.hidden_size))])
        logits = g.op("MatMul", [selected, lm_head], "lm_head")
    return g.op("Cast", [logits], "logits_fp32", outputs=["logits"], to=FP32)


def io_specs(cfg: ModelConfig, kv_dtype: int = FP16, tree: bool = False, vocab_size: int | None = None
             ) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs with their symbolic dimensions (contracts.md section 2); `tree` adds the tree inputs
    of an EAGLE3 base or draft (2.2)."""
    kv = ["batch", 2, cfg.num_key_value_heads, "kv_len", cfg.head_dim]
    vi = helper.make_tensor_value_info
    inputs = [
        vi(INPUTS_EMBEDS, FP16, ["batch", "seq_len", cfg.hidden_size]),
        vi(CONTEXT_LENGTHS, INT32, ["batch"]),
        vi(ROPE_COS_SIN, FP32, [1, "rope_len", cfg.rotary_dim]),
        vi(KVCACHE_START_INDEX, INT32, ["batch"]),
        vi(LAST_TOKEN_IDS, INT64, ["batch", "num_selected"]),
    ]
    if tree:
        inputs += [vi(ATTENTION_MASK, INT32, ["batch", "seq_len", "mask_words"]),
                   vi(ATTENTION_POS_ID, INT32, ["batch", "seq_len"])]
    inputs += [vi(past_key_values(i), kv_dtype, kv) for i in range(cfg.num_hidden_layers)]
    outputs = [vi(LOGITS, FP32, ["batch", "num_selected", vocab_size or cfg.vocab_size])]
    outputs += [vi(present_key_values(i), kv_dtype, kv) for i in range(cfg.num_hidden_layers)]
    return inputs, outputs


def new_graph(ckpt: Checkpoint, cfg: ModelConfig, weights: WeightFile, quant: QuantizedCheckpoint | None,
              tree: bool) -> Graph:
    """A Graph with the shared constants every block uses."""
    g = Graph(ckpt, cfg, weights, quant, tree)
    g.const([-1], np.int64, name="const.last_axis")
    g.const(cfg.rms_norm_eps, np.float32, name="const.rms_norm_eps")
    g.const(2.0, np.float32, name="const.two")
    g.const([0, 0, cfg.num_attention_heads * cfg.head_dim], np.int64, name="const.attn_flat_shape")
    return g


def save_model(g: Graph, name: str, inputs: list, outputs: list, out_dir: Path) -> Path:
    """`out_dir/model.onnx` from the graph's nodes and the (closed) weight file's initializers."""
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.weights.initializers)
    opsets = [helper.make_opsetid("", ONNX_OPSET), attention_schema.OPSET]
    if any(n.domain == nvfp4_schema.DOMAIN for n in g.nodes):
        opsets.append(nvfp4_schema.OPSET)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name=PRODUCER)
    path = Path(out_dir) / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def write_model(
    ckpt: Checkpoint, cfg: ModelConfig, out_dir: Path, wrap_layers: Callable[[Iterable[int]], Iterable[int]] = iter,
    quant: QuantizedCheckpoint | None = None, eagle_layers: list[int] | None = None,
) -> Path:
    """Write `model.onnx` + `model.onnx.data` into `out_dir`; `wrap_layers` can add a progress bar; `quant` (read
    with `read_quantized_checkpoint`) supplies quantized linears and FP8 KV scales. `eagle_layers` makes an EAGLE3
    base: tree attention in every layer, and `hidden_states` = the inputs of those decoder layers, concatenated."""
    weights = WeightFile(Path(out_dir) / "model.onnx.data")
    tree = eagle_layers is not None
    try:
        g = new_graph(ckpt, cfg, weights, quant, tree)
        x, layer_inputs = INPUTS_EMBEDS, []
        for i in wrap_layers(range(cfg.num_hidden_layers)):
            layer_inputs.append(x)
            x = decoder_layer(g, x, i)
        final(g, x)
        if tree:  # HF output_hidden_states[i] = the input of decoder layer i (index 0: the embeddings)
            g.op("Concat", [layer_inputs[i] for i in eagle_layers], "eagle_hidden_states",
                 outputs=[HIDDEN_STATES], axis=-1)
    finally:
        weights.close()
    inputs, outputs = io_specs(cfg, kv_cache_dtype(quant).onnx, tree)
    if tree:
        outputs.insert(1, helper.make_tensor_value_info(HIDDEN_STATES, FP16, [
            "batch", "seq_len", len(eagle_layers) * cfg.hidden_size]))
    return save_model(g, f"{cfg.model_type}_llm", inputs, outputs, out_dir)
