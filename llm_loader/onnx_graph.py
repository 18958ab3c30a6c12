"""Build `model.onnx` (contracts.md section 2) for Llama / Qwen2 / Qwen3, streaming the weights to `model.onnx.data`.

The graph is written op by op with `onnx.helper`, one function per block (RMSNorm, attention, MLP, decoder layer,
final). Weights are read from the checkpoint one tensor at a time, cast to fp16, transposed to `[in, out]` for
`MatMul`, and appended to the external data file at once; the ModelProto only ever holds their offsets. That keeps
the peak memory of an export near one copy of the weights instead of the two that building a full ModelProto and
converting it to external data would hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from llm_loader.checkpoint import Checkpoint
from llm_loader.model_config import ModelConfig
from plugins.attention import schema as attention_schema

OPSET = 23
IR_VERSION = 11  # the IR that introduced opset 23
DATA_ALIGN = 4096  # page-aligned tensors can be memory-mapped by runtimes
FP16, FP32, INT32, INT64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


class WeightFile:
    """Appends initializers to the one external data file as they are produced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.initializers: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        end = self.file.tell()
        offset = end + (-end % DATA_ALIGN)
        self.file.seek(offset)
        array.tofile(self.file)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


class Graph:
    """Nodes in order plus the weight file; `op` returns the name of the node's (first) output."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, weights: WeightFile):
        self.ckpt, self.cfg, self.weights = ckpt, cfg, weights
        self.nodes: list[onnx.NodeProto] = []
        self.names: set[str] = set()

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, **attrs):
        if name in self.names:
            raise ValueError(f"duplicate node name {name}")
        self.names.add(name)
        outs = [f"{name}/out{j}" for j in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def constant(self, name: str, array: np.ndarray) -> str:
        return self.weights.add(name, array)

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.ckpt.tensor_fp16(name, shape)

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        return self.weights.add(name, tensor.numpy())

    def linear_weight(self, name: str, parts: list[tuple[str, tuple[int, int]]]) -> str:
        """Checkpoint `[out, in]` weights stacked along out, stored transposed `[in, out]` for MatMul."""
        stacked = torch.cat([self.read(part, shape) for part, shape in parts])
        return self.weight(name, stacked.t().contiguous())


def rmsnorm(g: Graph, x: str, weight: str, name: str) -> str:
    """HF LlamaRMSNorm: normalise in fp32, cast back to fp16, then scale by the fp16 weight."""
    gamma = g.weight(weight, g.read(weight, (g.cfg.hidden_size,)))
    xf = g.op("Cast", [x], f"{name}/cast_fp32", to=FP32)
    square = g.op("Mul", [xf, xf], f"{name}/square")
    variance = g.op("ReduceMean", [square, "const.last_axis"], f"{name}/mean", keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [variance, "const.rms_norm_eps"], f"{name}/add_eps")], f"{name}/sqrt")
    normed = g.op("Mul", [xf, g.op("Reciprocal", [std], f"{name}/rsqrt")], f"{name}/normalize")
    return g.op("Mul", [g.op("Cast", [normed], f"{name}/cast_fp16", to=FP16), gamma], f"{name}/scale")


def attention_block(g: Graph, x: str, i: int) -> str:
    """RMSNorm -> fused QKV (+bias) -> AttentionPlugin (RoPE, KV write, GQA) -> o_proj -> residual."""
    cfg, p = g.cfg, f"model.layers.{i}.self_attn"
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    normed = rmsnorm(g, x, f"model.layers.{i}.input_layernorm.weight", f"layers.{i}/input_layernorm")
    projections = [("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)]
    qkv_w = g.linear_weight(f"{p}.qkv_proj.weight", [(f"{p}.{n}.weight", (heads * d, h)) for n, heads in projections])
    qkv = g.op("MatMul", [normed, qkv_w], f"layers.{i}/qkv_proj")
    if cfg.attention_bias:
        bias = torch.cat([g.read(f"{p}.{n}.bias", (heads * d,)) for n, heads in projections])
        qkv = g.op("Add", [qkv, g.weight(f"{p}.qkv_proj.bias", bias)], f"layers.{i}/qkv_bias")

    inputs = [qkv, f"past_key_values_{i}", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index"]
    if cfg.qk_norm:
        inputs += [g.weight(f"{p}.{n}.weight", g.read(f"{p}.{n}.weight", (d,))) for n in ("q_norm", "k_norm")]
    attn = f"layers.{i}/attention/out0"
    g.nodes.append(attention_schema.make_node(
        inputs, [attn, f"present_key_values_{i}"], name=f"layers.{i}/attention",
        num_q_heads=hq, num_kv_heads=hkv, head_size=d, enable_qk_norm=cfg.qk_norm, rms_norm_eps=cfg.rms_norm_eps,
    ))
    flat = g.op("Reshape", [attn, "const.attn_flat_shape"], f"layers.{i}/attn_flatten")
    o_w = g.linear_weight(f"{p}.o_proj.weight", [(f"{p}.o_proj.weight", (h, hq * d))])
    out = g.op("MatMul", [flat, o_w], f"layers.{i}/o_proj")
    return g.op("Add", [x, out], f"layers.{i}/attn_residual")


def mlp_block(g: Graph, x: str, i: int) -> str:
    """RMSNorm -> fused gate|up -> SiLU(gate) * up -> down_proj -> residual."""
    cfg, p = g.cfg, f"model.layers.{i}.mlp"
    h, inter = cfg.hidden_size, cfg.intermediate_size
    normed = rmsnorm(g, x, f"model.layers.{i}.post_attention_layernorm.weight", f"layers.{i}/post_attention_layernorm")
    parts = [(f"{p}.{n}.weight", (inter, h)) for n in ("gate_proj", "up_proj")]
    gate_up = g.op("MatMul", [normed, g.linear_weight(f"{p}.gate_up_proj.weight", parts)], f"layers.{i}/gate_up_proj")
    gate, up = g.op("Split", [gate_up], f"layers.{i}/split", outputs=2, axis=-1, num_outputs=2)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"layers.{i}/sigmoid")], f"layers.{i}/silu")
    act = g.op("Mul", [silu, up], f"layers.{i}/gate_mul_up")
    down_w = g.linear_weight(f"{p}.down_proj.weight", [(f"{p}.down_proj.weight", (h, inter))])
    out = g.op("MatMul", [act, down_w], f"layers.{i}/down_proj")
    return g.op("Add", [x, out], f"layers.{i}/mlp_residual")


def decoder_layer(g: Graph, x: str, i: int) -> str:
    return mlp_block(g, attention_block(g, x, i), i)


def final(g: Graph, x: str) -> str:
    """Final RMSNorm, the hidden states at `last_token_ids`, lm_head (the embedding table when tied), fp32 logits."""
    cfg = g.cfg
    normed = rmsnorm(g, x, "model.norm.weight", "final_norm")
    index = g.op("Unsqueeze", ["last_token_ids", "const.last_axis"], "select/unsqueeze")
    selected = g.op("GatherND", [normed, index], "select/gather", batch_dims=1)
    source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    lm_head = g.linear_weight("lm_head.weight", [(source, (cfg.vocab_size, cfg.hidden_size))])
    logits = g.op("MatMul", [selected, lm_head], "lm_head")
    return g.op("Cast", [logits], "logits_fp32", outputs=["logits"], to=FP32)


def io_specs(cfg: ModelConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs with their symbolic dimensions (contracts.md section 2)."""
    kv = ["batch", 2, cfg.num_key_value_heads, "kv_len", cfg.head_dim]
    vi = helper.make_tensor_value_info
    inputs = [
        vi("inputs_embeds", FP16, ["batch", "seq_len", cfg.hidden_size]),
        vi("context_lengths", INT32, ["batch"]),
        vi("rope_rotary_cos_sin", FP32, [1, "rope_len", cfg.rotary_dim]),
        vi("kvcache_start_index", INT32, ["batch"]),
        vi("last_token_ids", INT64, ["batch", "num_selected"]),
    ] + [vi(f"past_key_values_{i}", FP16, kv) for i in range(cfg.num_hidden_layers)]
    outputs = [vi("logits", FP32, ["batch", "num_selected", cfg.vocab_size])]
    outputs += [vi(f"present_key_values_{i}", FP16, kv) for i in range(cfg.num_hidden_layers)]
    return inputs, outputs


def write_model(
    ckpt: Checkpoint, cfg: ModelConfig, out_dir: Path, wrap_layers: Callable[[Iterable[int]], Iterable[int]] = iter
) -> Path:
    """Write `model.onnx` + `model.onnx.data` into `out_dir`; `wrap_layers` can add a progress bar."""
    weights = WeightFile(Path(out_dir) / "model.onnx.data")
    try:
        g = Graph(ckpt, cfg, weights)
        g.constant("const.last_axis", np.array([-1], dtype=np.int64))
        g.constant("const.rms_norm_eps", np.array(cfg.rms_norm_eps, dtype=np.float32))
        g.constant("const.attn_flat_shape", np.array([0, 0, cfg.num_attention_heads * cfg.head_dim], dtype=np.int64))
        x = "inputs_embeds"
        for i in wrap_layers(range(cfg.num_hidden_layers)):
            x = decoder_layer(g, x, i)
        final(g, x)
    finally:
        weights.close()
    inputs, outputs = io_specs(cfg)
    graph = helper.make_graph(g.nodes, f"{cfg.model_type}_llm", inputs, outputs, initializer=weights.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), attention_schema.OPSET],
        ir_version=IR_VERSION,
        producer_name="edgellm-toolchain",
    )
    path = Path(out_dir) / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path
