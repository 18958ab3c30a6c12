"""Quantized checkpoints through export -> llm-build -> Engine, against a torch fake-quant reference.

The reference is the `transformers` model of the source checkpoint in fp16 (like the engine's activations) with every
quantized linear's weight replaced by what the graph's DequantizeLinear yields (`graph_weight`: FP8 weight scales
rounded to fp16 like the initializers), its inputs fake-quantized by forward pre-hooks with the activation semantics
of contracts.md 2.1, and, with FP8 KV, post-RoPE Q/K/V fake-quantized with the checkpoint's scales by a registered
attention function. The first quantized linear (layer 0 q_proj) is bit-exact against the engine for FP8. The math is
not identical past it: ONNX Runtime CPU computes most fp16 nodes in fp32 and drops the fp16 roundings between them
(its InsertCastTransformer; the o_proj MatMul, the residual Adds and the fused RMSNorm stay fp32), and the attention
lowering does RoPE and softmax in fp32, so quantizer inputs differ from the fp16 reference by about one fp16 ulp; one
in ~100 such elements crosses an FP8 rounding boundary (21 of 1536 gate/up input codes in layer 0 of the fp8 recipe)
and a network amplifies every flipped code. The tiny models here use HF's default init (0.02), which amplifies as
little as a trained model does; with it the bounds, from measurement with a margin for other CPUs' MLAS kernels, are
min cosine >= 0.999 for FP8 weights (measured 0.9994-0.9997), >= 0.998 with the FP8 KV cache as well (0.9988: K/V
codes flip too), >= 0.99 for NVFP4 (0.9950-0.9959); max-abs <= 5% / 6% / 12% of the logit range (measured 3.5% /
4.3% / 9.6%). With init 0.1 the same flips give cosines of 0.994-0.997 (FP8) and 0.93-0.97 (NVFP4).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import CALIBRATION_TEXT, export_and_build, quantize, run_cli
from safetensors.torch import load_file, save_file

from builder.cli import build
from builder.detect import detect
from contract import formats
from contract.embedding import read_embedding_sidecar
from contract.errors import InputError
from contract.weight_formats import WEIGHTS_QUANTIZED
from llm_loader.export_all_cli import export
from llm_loader.export_all_cli import main as export_main
from llm_loader.quantized_checkpoint import dequantize_linear, read_quantized_checkpoint
from plugins.nvfp4.reference import nvfp4_activation_qdq
from plugins.weight_formats.fp8_graph import MIN_ACT_AMAX
from runtime.engine import Engine
from runtime.onnxruntime_backend import session_options

NUM_TOKENS = 12


def dynamic_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per token per `block` channels: fp8(x / s) * s with s = max(amax, MIN_ACT_AMAX) / 448, fp32."""
    size = x.shape[-1]
    nblocks = -(-size // block)
    padded = torch.nn.functional.pad(x.float(), (0, nblocks * block - size))
    amax = padded.unflatten(-1, (nblocks, block)).abs().amax(-1)
    scale = formats.expand_row_block_scale(amax.clamp_min(MIN_ACT_AMAX) / formats.FP8_MAX, size, block)
    return formats.to_fp8(x, scale).float() * scale


def activation_qdq(linear):
    """The activation fake-quant of a QuantizedLinear, as a function of its fp32 input."""
    if linear.format == "fp8":
        scale = linear.input_scale.float().half().float()
        return lambda x: formats.to_fp8(x, scale).float() * scale
    if linear.format == "fp8_pc":
        return lambda x: dynamic_fp8(x, x.shape[-1])
    if linear.format == "fp8_block":
        return lambda x: dynamic_fp8(x, linear.block_size[1])
    if linear.format == "nvfp4":
        scale = float(linear.input_scale)
        return lambda x: nvfp4_activation_qdq(x.half(), scale).float()
    return None


def graph_scales(linear):
    """The linear with the weight scales the graph holds: FP8 weight scales are fp16 initializers (contracts.md 2.1)."""
    if linear.format in ("fp8", "fp8_pc", "fp8_block", "fp8_pb_wo"):
        return dataclasses.replace(linear, weight_scale=linear.weight_scale.half().float())
    return linear


def graph_weight(linear) -> torch.Tensor:
    """The fp16 `[out, in]` weight the graph's DequantizeLinear produces: fp16-rounded scales (`graph_scales`), the
    fp32 multiply, and the one rounding to fp16 (which the CPU engine, computing in fp32, leaves out)."""
    return dequantize_linear(graph_scales(linear)).half()


def fp8_kv_attention(kv_scales):
    """An attention function that fake-quantizes post-RoPE Q, K, V with the layer's checkpoint scales."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, *args, **kwargs):
        s = kv_scales[module.layer_idx]
        q_scale = 1.0 if s.q_scale is None else s.q_scale
        qdq = [(formats.to_fp8(t, sc).float() * sc).to(t.dtype)
               for t, sc in ((query, q_scale), (key, s.k_scale), (value, s.v_scale))]
        return sdpa_attention_forward(module, *qdq, *args, **kwargs)

    return attention


def reference_logits(src: Path, qckpt: Path, ids: torch.Tensor, embedding: torch.Tensor | None = None) -> np.ndarray:
    from transformers import AttentionInterface, AutoModelForCausalLM

    q = read_quantized_checkpoint(qckpt)
    attn = "sdpa"
    if str(q.kv_cache_quant_algo or "").upper() == "FP8":
        AttentionInterface.register("fp8_kv_reference", fp8_kv_attention(q.kv_scales))
        attn = "fp8_kv_reference"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16, attn_implementation=attn).eval()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name, t in q.tensors.items():  # norms and embeddings as the checkpoint holds them (smoothing folds into norms)
        if name in params and params[name].shape == t.shape:
            params[name].data = t.half()
    for name, linear in q.linears.items():
        modules[name].weight.data = graph_weight(linear)
        if linear.bias is not None:
            modules[name].bias.data = linear.bias.half()
        qdq = activation_qdq(linear)
        if qdq is not None:
            modules[name].register_forward_pre_hook(lambda m, args, f=qdq: (f(args[0].float()).half(),))
    if embedding is not None:
        model.model.embed_tokens.weight.data = embedding.half()
    with torch.no_grad():
        return model(ids).logits.float().numpy()


def engine_logits(engine_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, Engine]:
    engine = Engine.load(engine_dir)
    cache = engine.new_cache(ids.shape[0])
    last = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    logits = engine.forward(cache, ids, np.full(ids.shape[0], ids.shape[1], np.int32), last)
    return logits, cache


def compare(ours: np.ndarray, ref: np.ndarray, label: str, min_cos: float, max_abs_rel: float) -> None:
    a, b = ours.reshape(-1, ours.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    max_abs = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    print(f"{label}: min cosine {cos.min():.6f}, max-abs {max_abs:.4f} (logit range {scale:.2f})")
    assert cos.min() >= min_cos, f"{label}: cosine {cos.min()}"
    assert max_abs <= max_abs_rel * scale, f"{label}: max-abs {max_abs} vs logit range {scale}"


RECIPES = [  # (id, family, --quantization, FP8 KV, --fp8-embedding)
    ("fp8", "llama", "fp8", False, False),
    ("fp8_pc", "llama", "fp8_pc", False, False),
    ("fp8_block", "llama", "fp8_block", False, False),
    ("nvfp4", "llama", "nvfp4", False, False),
    ("fp8+fp8kv-qwen3", "qwen3", "fp8", True, False),
    ("nvfp4+fp8kv+fp8emb", "llama", "nvfp4", True, True),
]


@pytest.mark.parametrize("label,family,method,kv,fp8_emb", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_engine_matches_fake_quant_reference(tiny_checkpoint, tmp_path, label, family, method, kv, fp8_emb):
    """Both CPU forms of each recipe's engine: the default (weights dequantized once at build) and the low-memory
    one (`--cpuWeights quantized`, weights FP8/FP4 at rest) give the same logits up to float rounding, and both
    match the fake-quant reference."""
    src = tiny_checkpoint(family, initializer_range=0.02)  # HF's default init: a network that does not amplify flips
    qckpt = quantize(src, tmp_path / "q", method, kv=kv)
    onnx_dir, engine_dir = export_and_build(qckpt, tmp_path, fp8_embedding=fp8_emb, max_input_len=32)
    low_memory = build(onnx_dir, tmp_path / "engine-low-memory", max_batch_size=2, max_input_len=32,
                       max_kv_cache_capacity=64, backend="onnxruntime", cpu_weights="quantized")

    config = json.loads((engine_dir / "config.json").read_text())
    assert config["weight_format"] == method == config["builder_config"]["weight_format"]
    assert config["builder_config"]["weight_storage"] == "fp32"
    assert json.loads((low_memory / "config.json").read_text())["builder_config"]["weight_storage"] == "quantized"
    assert config["kv_cache_dtype"] == ("fp8" if kv else "fp16")
    found = detect(onnx_dir)
    assert (found.weight_format, found.kv_cache_dtype) == (method, config["kv_cache_dtype"])

    ids = np.random.default_rng(0).integers(0, 49152, (2, NUM_TOKENS))
    ours, cache = engine_logits(engine_dir, ids)
    slow, _ = engine_logits(low_memory, ids)
    # the same fp32 weights and the same activation quantizers; only where the weights are computed (and the GEMM
    # blocking of the fused q|k|v and gate|up) differs
    np.testing.assert_allclose(ours, slow, rtol=0, atol=1e-4 * float(np.abs(slow).max()))
    embedding = None
    if fp8_emb:
        sidecar = read_embedding_sidecar(onnx_dir / "embedding.safetensors")
        embedding = formats.dequantize_fp8_row_block(sidecar.table, sidecar.scale).half().float()
    # quantization codes at rounding boundaries flip between ORT's fp32-computed fp16 graph and the fp16 reference
    # (module docstring), and the tiny random model amplifies each flip; hence the bounds
    bounds = {"nvfp4": (0.99, 0.12)}.get(method, (0.998, 0.06) if kv else (0.999, 0.05))
    reference = reference_logits(src, qckpt, torch.from_numpy(ids), embedding)
    compare(ours, reference, label, *bounds)
    compare(slow, reference, f"{label} low-memory", *bounds)

    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    plugins = [n for n in graph.node if n.op_type == "AttentionPlugin"]
    if kv:
        q = read_quantized_checkpoint(qckpt)
        # K and V of every layer, row and slot at 2 bytes an element
        fp16_bytes = 2 * 2 * found.num_layers * cache.batch * found.num_kv_heads * cache.capacity * found.head_dim
        assert cache.dtype == "fp8" and cache.nbytes * 2 == fp16_bytes
        for i, node in enumerate(plugins):
            attrs = {a.name: a for a in node.attribute}
            assert attrs["enable_fp8_kv_cache"].i == 1
            s = q.kv_scales[i]
            assert list(attrs["qkv_scales"].floats) == pytest.approx([s.q_scale, s.k_scale, s.v_scale], rel=1e-6)
    # excluded modules (lm_head) stay fp16; quantized weights are FP8 / FP4 initializers
    inits = {t.name: t.data_type for t in graph.initializer}
    assert inits["lm_head.weight"] == onnx.TensorProto.FLOAT16
    wanted = onnx.TensorProto.FLOAT4E2M1 if method == "nvfp4" else onnx.TensorProto.FLOAT8E4M3FN
    assert inits["model.layers.0.self_attn.q_proj.weight"] == wanted


@pytest.mark.parametrize("method", ["fp8", "fp8_pc", "fp8_block", "nvfp4"])
def test_default_engine_holds_the_dequantized_weights_in_fused_gemms(tiny_checkpoint, tmp_path, method):
    """The default CPU engine: each weight is the fp32 value of its dequantization (against contract.formats),
    q|k|v and gate|up are one MatMul each, and no quantized weight or weight DequantizeLinear is left; the
    activation quantizers of q, k and v (one input, one calibrated scale) are one."""
    qckpt = quantize(tiny_checkpoint("llama"), tmp_path / "q", method)
    _, engine_dir = export_and_build(qckpt, tmp_path, max_input_len=32)
    model = onnx.load(str(engine_dir / "llm.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    assert not [t.name for t in inits.values() if t.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8,
                                                                  onnx.TensorProto.FLOAT4E2M1)]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 * 4 + 1  # per layer q|k|v, o, gate|up, down; lm_head
    q = read_quantized_checkpoint(qckpt)
    layer = {n: q.linears[f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    expected = torch.cat([dequantize_linear(graph_scales(lin)) for lin in layer.values()]).t()
    qkv = next(n for n in matmuls if n.name.startswith("layers.0/q_proj"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[qkv.input[1]]), expected.numpy())
    if method in ("fp8", "nvfp4"):  # static scales: q, k and v share one calibrated input scale, hence one quantizer
        quantizers = {"fp8": "QuantizeLinear", "nvfp4": "Gather"}[method]
        assert sum(n.op_type == quantizers and n.name.startswith("layers.0/") for n in model.graph.node) == 4


@pytest.mark.parametrize("method", ["fp8", "nvfp4"])
def test_ort_keeps_quantized_weights_low_precision_at_rest(tiny_checkpoint, tmp_path, method):
    """The low-memory form: ORT's optimized graph (ORT_ENABLE_ALL, the runtime's options for that form) still holds
    the FP8 / packed FP4 weights."""
    qckpt = quantize(tiny_checkpoint("llama"), tmp_path / "q", method)
    _, engine_dir = export_and_build(qckpt, tmp_path, max_input_len=32, cpu_weights="quantized")
    opts = session_options(WEIGHTS_QUANTIZED)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(engine_dir / "llm.onnx"), opts, providers=["CPUExecutionProvider"])
    inits = {t.name: t for t in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.initializer}
    name = "model.layers.0.mlp.down_proj.weight"
    expected = onnx.TensorProto.FLOAT8E4M3FN if method == "fp8" else onnx.TensorProto.UINT8
    assert inits[name].data_type == expected
    widened = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 64 * 64]
    assert not [n for n in widened if "layers" in n], f"weights folded to fp32: {widened}"


def test_modelopt_fp8_pb_wo_checkpoint_exports_weight_only(tiny_checkpoint, tmp_path):
    """ModelOpt's weight-only 128x128 FP8 (weight_scale [out/128, 1, in/128, 1]), hand-written as ModelOpt lays it out."""
    dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                initializer_range=0.02)
    src = tiny_checkpoint("llama", **dims)
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        q, scale = formats.quantize_fp8_block(tensors[name].float())
        tensors[name] = q
        tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(scale.shape[0], 1, scale.shape[1], 1)
    ckpt = tmp_path / "pb_wo"
    shutil.copytree(src, ckpt)
    save_file(tensors, str(ckpt / "model.safetensors"))
    quant = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8_PB_WO", "exclude_modules": ["lm_head"]}}
    (ckpt / "hf_quant_config.json").write_text(json.dumps(quant))

    onnx_dir, engine_dir = export_and_build(ckpt, tmp_path, max_input_len=32)
    assert detect(onnx_dir).weight_format == "fp8_pb_wo"
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node)  # weight-only: activations stay fp16
    ids = np.random.default_rng(0).integers(0, 49152, (2, NUM_TOKENS))
    ours, _ = engine_logits(engine_dir, ids)
    compare(ours, reference_logits(src, ckpt, torch.from_numpy(ids)), "fp8_pb_wo", 0.9999, 0.02)


def test_lowered_fp4_activation_matches_reference(tiny_checkpoint, tmp_path):
    """The lowered TRT_FP4DynamicQuantize + DQs on awkward inputs (zero blocks, ties, saturation) = reference.py."""
    from onnx import helper

    from llm_loader.onnx_graph import FP16
    from plugins.lowering import lower_for_onnxruntime
    from plugins.nvfp4 import schema

    input_scale = 0.0625
    x = torch.randn(2, 3, 64) * 3
    x[0, 0, :16] = 0  # an all-zero block
    # amax 3 = 6 * step with block scale 8, step 8 * 0.0625 = 0.5: the other values sit exactly on the midpoints
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x[1, 2, 16:32] = torch.tensor([6.0, *mids, -6.0, *[-m for m in mids]]) * 0.5
    x[1, 1, :16] *= 1000  # block scale saturates at 448
    x = x.half()
    # every multiple of 1/8 in [-6, 6] in units of the quantization step (block scale 8 x 0.0625): each E2M1 level and
    # each tie between two levels; one +-3 per block of 16 sets the block scale
    grid = torch.arange(-48, 49) / 16
    grid = torch.cat([grid, torch.zeros(15 * 8 - len(grid) % (15 * 8))]).view(-1, 15)
    signs = torch.where(torch.arange(len(grid)) % 2 == 0, 3.0, -3.0)[:, None]
    exhaustive = torch.cat([signs, grid], dim=1).reshape(2, -1, 64).half()
    cases = [(x, input_scale), (exhaustive, input_scale),
             (torch.randn(2, 3, 64).half() * 2, 0.00137)]  # a scale that is not a power of two
    nodes = [
        helper.make_node(schema.OP_TYPE, ["x", "s"], ["xq", "sq"], domain=schema.DOMAIN, **schema.attrs(16)),
        helper.make_node("Cast", ["s"], ["s16"], to=FP16),
        helper.make_node("DequantizeLinear", ["sq", "s16"], ["sdq"]),
        helper.make_node("DequantizeLinear", ["xq", "sdq"], ["y"], axis=-1, block_size=16),
    ]
    for x, input_scale in cases:
        graph = helper.make_graph(nodes, "fp4", [helper.make_tensor_value_info("x", FP16, [2, None, 64])],
                                  [helper.make_tensor_value_info("y", FP16, [2, None, 64])],
                                  [onnx.numpy_helper.from_array(np.array(input_scale, np.float32), "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), schema.OPSET], ir_version=11)
        session = ort.InferenceSession(lower_for_onnxruntime(model).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        (y,) = session.run(["y"], {"x": x.numpy()})
        # bit-exact under the session's default ORT_ENABLE_ALL, which must not drop the fp16 rounding of the block scales
        np.testing.assert_array_equal(y, nvfp4_activation_qdq(x, input_scale).numpy())


def test_fp4_activation_with_another_reader_is_refused():
    """A TRT_FP4DynamicQuantize whose block scales' DQ has a second reader is not the pattern of contracts.md 2.1."""
    from onnx import helper

    from llm_loader.onnx_graph import FP16
    from plugins.lowering import lower_for_onnxruntime
    from plugins.nvfp4 import schema

    nodes = [
        helper.make_node(schema.OP_TYPE, ["x", "s"], ["xq", "sq"], domain=schema.DOMAIN, **schema.attrs(16)),
        helper.make_node("Cast", ["s"], ["s16"], to=FP16),
        helper.make_node("DequantizeLinear", ["sq", "s16"], ["sdq"]),
        helper.make_node("DequantizeLinear", ["xq", "sdq"], ["y"], axis=-1, block_size=16),
        helper.make_node("Identity", ["sdq"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "fp4", [helper.make_tensor_value_info("x", FP16, [2, None, 64])],
                              [helper.make_tensor_value_info("y", FP16, [2, None, 64]),
                               helper.make_tensor_value_info("z", FP16, None)],
                              [onnx.numpy_helper.from_array(np.array(0.0625, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), schema.OPSET], ir_version=11)
    with pytest.raises(InputError, match="found another use"):
        lower_for_onnxruntime(model)


def test_missing_kv_scale_is_an_export_error(tiny_checkpoint, tmp_path):
    qckpt = quantize(tiny_checkpoint("llama"), tmp_path / "q", "fp8", kv=True)
    for file in qckpt.glob("*.safetensors"):
        tensors = load_file(file)
        if tensors.pop("model.layers.1.self_attn.v_proj.v_scale", None) is not None:
            save_file(tensors, file)
    code, _, err = run_cli(export_main, qckpt, tmp_path / "out")
    assert code == 2
    assert "error: " in err and "model.layers.1.self_attn.v_proj.v_scale" in err.split("error: ")[-1]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """Tiny llama checkpoints quantized fp8 with an FP8 KV cache, nvfp4 and fp8_block: never edited."""
    from helpers import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("quantized")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint)
    return {"fp8": quantize(ckpt, root / "fp8", "fp8", kv=True), "nvfp4": quantize(ckpt, root / "nvfp4", "nvfp4"),
            "fp8_block": quantize(ckpt, root / "fp8_block", "fp8_block")}


UP = "model.layers.0.mlp.up_proj"


def _tensor(name: str, edit):
    def apply(ckpt: Path) -> None:
        tensors = load_file(ckpt / "model.safetensors")
        tensors[name] = edit(tensors[name])
        save_file(tensors, ckpt / "model.safetensors")
    return apply


def _quant_config(**changes):
    def apply(ckpt: Path) -> None:
        path = ckpt / "hf_quant_config.json"
        data = json.loads(path.read_text())
        data["quantization"] = {**data["quantization"], **changes} if changes else 5
        path.write_text(json.dumps(data))
    return apply


def _nan_fp8(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w.view(torch.uint8)[0, 0] = 0x7F  # E4M3FN's NaN
    return w


@pytest.mark.parametrize("recipe, edit, words", [
    ("fp8", _tensor(f"{UP}.weight_scale", lambda t: torch.full_like(t, float("nan"))), f"{UP}.weight_scale: expected "
     "positive finite scales of at most 65504, found nan"),
    ("fp8", _tensor(f"{UP}.weight_scale", lambda t: -t), f"{UP}.weight_scale: expected positive"),
    ("fp8", _tensor(f"{UP}.weight_scale", lambda t: torch.full_like(t, 1e6)), "at most 65504, found 1000000.0"),
    ("fp8", _tensor(f"{UP}.input_scale", torch.zeros_like), f"{UP}.input_scale: expected positive finite scales"),
    ("fp8", _tensor(f"{UP}.input_scale", lambda t: torch.full_like(t, float("inf"))), f"{UP}.input_scale"),
    ("fp8", _tensor(f"{UP}.input_scale", lambda t: t.reshape(1).repeat(5)), "input_scale: expected one scale value"),
    ("fp8", _tensor(f"{UP}.weight", _nan_fp8), f"{UP}.weight: expected finite FP8 values, found NaN"),
    ("fp8", _tensor("model.layers.1.self_attn.v_proj.v_scale", torch.zeros_like), "v_proj.v_scale: expected positive"),
    ("fp8", _tensor("model.layers.1.self_attn.k_proj.k_scale", lambda t: t.reshape(1).repeat(3)),
     "k_proj.k_scale: expected one scale value, found shape [3]"),
    ("nvfp4", _tensor(f"{UP}.weight_scale_2", lambda t: torch.full_like(t, float("nan"))), f"{UP}.weight_scale_2"),
    ("nvfp4", _tensor(f"{UP}.weight_scale", _nan_fp8), f"{UP}.weight_scale: expected non-negative finite scales"),
    ("fp8", _quant_config(), "hf_quant_config.json: quantization: expected an object, found 5"),
    ("fp8", _quant_config(quant_algo=["FP8"]), "quantization.quant_algo: expected a name or null"),
    ("fp8", _quant_config(kv_cache_quant_algo="NVFP4"), "quantization.kv_cache_quant_algo: expected FP8 or null"),
    ("fp8", _quant_config(exclude_modules=[5]), "quantization.exclude_modules: expected a list of module names"),
    ("fp8", _quant_config(kv_cache_fp16_layers=[0, "a"]), "quantization.kv_cache_fp16_layers: expected a list"),
    ("fp8", _quant_config(quantized_layers=[1]), "quantization.quantized_layers: expected an object"),
    ("nvfp4", _quant_config(group_size="16"), "quantization: group_size: expected a positive integer"),
    ("fp8_block", lambda c: edit_json(c / "config.json", quantization_config={
        **json.loads((c / "config.json").read_text())["quantization_config"], "weight_block_size": [0, 128]}),
     "quantization_config: weight_block_size[0]: expected a positive integer, found 0"),
    ("nvfp4", _quant_config(group_size=48), "in groups of group_size 48"),
    ("nvfp4", lambda c: edit_json(c / "config.json", num_hidden_layers=10**12), "found none"),  # not 10^12 loops
    ("fp8", lambda c: edit_json(c / "config.json", num_hidden_layers="x"), "num_hidden_layers: expected a positive"),
    ("fp8", lambda c: edit_json(c / "config.json", quantization_config="fp8"), "quantization_config: expected an obj"),
])
def test_quantized_checkpoint_that_lies_is_one_error_line(quantized, tmp_path, recipe, edit, words):
    """Scales the graph would multiply or divide by that are NaN, infinite, negative, zero, past fp16 or not one
    value, an FP8 NaN, and metadata of the wrong type: one error line naming the tensor or field, nothing written
    (before, most exported an engine that answered noise, the rest were tracebacks or ran for ever)."""
    ckpt = tmp_path / "q"
    shutil.copytree(quantized[recipe], ckpt)
    edit(ckpt)
    code, _, err = run_cli(export_main, ckpt, tmp_path / "out")
    assert code == 2 and "Traceback" not in err, err
    assert err.count("error: ") == 1 and words in err.split("error: ")[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_edited_kv_dtype_or_weight_format_is_refused(tiny_checkpoint, tmp_path):
    qckpt = quantize(tiny_checkpoint("llama"), tmp_path / "q", "fp8", kv=True)
    onnx_dir, engine_dir = export_and_build(qckpt, tmp_path, max_input_len=32)
    for key, value, words in (("kv_cache_dtype", "fp16", "KV cache dtype disagrees"),
                              ("weight_format", "fp16", "weight format disagrees")):
        edited = tmp_path / f"edited-{key}"
        shutil.copytree(onnx_dir, edited)
        config = json.loads((edited / "config.json").read_text())
        (edited / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(InputError, match=words):
            build(edited, tmp_path / f"never-{key}", backend="onnxruntime", max_input_len=32, max_kv_cache_capacity=64)
        assert not (tmp_path / f"never-{key}").exists()
    config = json.loads((engine_dir / "config.json").read_text())
    config["kv_cache_dtype"] = config["builder_config"]["kv_cache_dtype"] = "fp16"
    (engine_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="past_key_values dtype is 'fp8'"):
        Engine.load(engine_dir)


def test_per_layer_fp16_kv_is_refused_at_export(tiny_checkpoint, tmp_path):
    out = quantize(tiny_checkpoint("llama"), tmp_path / "q", "fp8", "--kv_cache_fp16_layers", "0", kv=True)
    with pytest.raises(InputError, match="kv_cache_fp16_layers"):
        export(out, tmp_path / "onnx")


def modelopt_mixed_checkpoint(src: Path, out: Path, algos: dict[str, str]) -> Path:
    """A checkpoint laid out as ModelOpt's mixed-precision export writes it (`auto_quantize`): `quant_algo`
    MIXED_PRECISION, a `quantized_layers` entry per quantized module, no `exclude_modules`; module -> "FP8" | "NVFP4"
    in `algos`, every other linear fp16. Input scales from a calibration pass over a few texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantization.calibrate import calibrate
    from quantization.datasets import make_batches

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    texts = CALIBRATION_TEXT.read_text().split("\n\n")[:4]
    batches = list(make_batches(AutoTokenizer.from_pretrained(src), texts, 32, 2))
    input_amax = calibrate(model, batches, list(algos), kv=False).input_amax
    tensors = load_file(str(src / "model.safetensors"))
    for module, algo in algos.items():
        w = tensors.pop(f"{module}.weight").float()
        if algo == "FP8":
            q, scale = formats.quantize_fp8_per_tensor(w)
            tensors.update({f"{module}.weight": q, f"{module}.weight_scale": scale,
                            f"{module}.input_scale": torch.tensor(input_amax[module] / 448)})
        else:
            packed, block, global_scale = formats.quantize_nvfp4(w)
            tensors.update({f"{module}.weight": packed, f"{module}.weight_scale": block,
                            f"{module}.weight_scale_2": global_scale,
                            f"{module}.input_scale": torch.tensor(input_amax[module] / (6 * 448))})
    shutil.copytree(src, out)
    save_file(tensors, str(out / "model.safetensors"))
    layers = {m: {"quant_algo": a, **({"group_size": 16} if a == "NVFP4" else {})} for m, a in algos.items()}
    quant = {"producer": {"name": "modelopt", "version": "0.47.0"},
             "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}}
    (out / "hf_quant_config.json").write_text(json.dumps(quant))
    return out


def test_modelopt_mixed_precision_checkpoint_exports_builds_and_matches(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama", initializer_range=0.02)
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    algos = {f"model.layers.0.{k}": "NVFP4" for k in kinds}
    algos.update({f"model.layers.1.{k}": "FP8" for k in kinds if k != "mlp.down_proj"})  # down_proj stays fp16
    ckpt = modelopt_mixed_checkpoint(src, tmp_path / "mixed", algos)

    onnx_dir, engine_dir = export_and_build(ckpt, tmp_path, max_input_len=32)
    found = detect(onnx_dir)
    assert found.weight_format == "mixed" and found.weight_formats == {"fp8": 6, "nvfp4": 7}
    assert "mixed: fp8 6 linears, nvfp4 7 linears" in found.summary()
    config = json.loads((engine_dir / "config.json").read_text())
    assert config["weight_formats"] == config["builder_config"]["weight_formats"] == {"fp8": 6, "nvfp4": 7}
    inits = {t.name: t.data_type for t in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.initializer}
    assert inits["model.layers.0.mlp.down_proj.weight"] == onnx.TensorProto.FLOAT4E2M1
    assert inits["model.layers.1.self_attn.q_proj.weight"] == onnx.TensorProto.FLOAT8E4M3FN
    assert inits["model.layers.1.mlp.down_proj.weight"] == onnx.TensorProto.FLOAT16

    ids = np.random.default_rng(0).integers(0, 49152, (2, NUM_TOKENS))
    ours, _ = engine_logits(engine_dir, ids)
    compare(ours, reference_logits(src, ckpt, torch.from_numpy(ids)), "modelopt mixed", 0.99, 0.12)

    # a hand-edited config that drops a format is caught before the build
    edited = tmp_path / "edited"
    shutil.copytree(onnx_dir, edited)
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, "weight_formats": {"nvfp4": 13}}))
    with pytest.raises(InputError, match="weight format disagrees.*fp8 6 linears, nvfp4 7 linears"):
        build(edited, tmp_path / "never", backend="onnxruntime", max_input_len=32, max_kv_cache_capacity=64)


def test_modelopt_mixed_precision_with_int8_smoothquant_is_refused_by_name(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("llama")
    ckpt = modelopt_mixed_checkpoint(src, tmp_path / "mixed", {"model.layers.0.self_attn.q_proj": "FP8"})
    tensors = load_file(str(ckpt / "model.safetensors"))  # down_proj as ModelOpt's INT8 SmoothQuant writes it
    name = "model.layers.1.mlp.down_proj"
    w = tensors[f"{name}.weight"].float()
    scale = w.abs().amax(1) / 127
    tensors[f"{name}.weight"] = torch.round(w / scale[:, None]).to(torch.int8)
    tensors[f"{name}.weight_scale"] = scale
    tensors[f"{name}.pre_quant_scale"] = torch.ones(w.shape[1])
    save_file(tensors, str(ckpt / "model.safetensors"))
    quant = json.loads((ckpt / "hf_quant_config.json").read_text())
    quant["quantization"]["quantized_layers"][name] = {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    (ckpt / "hf_quant_config.json").write_text(json.dumps(quant))
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "INT8 SmoothQuant layers are not supported" in err and name in err and "found int8" not in err
    assert not (tmp_path / "out").exists()
