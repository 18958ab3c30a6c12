"""The TensorRT path's pure logic on real exports: what the builder changes in the graph (builder/trt_graph.py) and
what the runtime binds (runtime/tensorrt_backend.py under runtime/engine.py). TensorRT itself is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_logits_close, hf_model, make_tiny_checkpoint, quantize
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from transformers import DynamicCache

from builder.detect import detect
from builder.embedding_graph import embedding_model
from builder.profiles import Limits, ModelDims, Profile, llm_profiles
from builder.trt_graph import (
    PLUGIN_NAMESPACE,
    check_gpu_support,
    check_profiles,
    prepare_for_tensorrt,
)
from contract.embedding import read_embedding_sidecar
from contract.errors import InputError
from contract.graph_io import ROPE_COS_SIN
from contract.kv import KvDtype
from examples.eagle.draft_model import cache_kwargs
from llm_loader.export_all_cli import export
from plugins.attention.reference import AttentionPlugin
from plugins.attention.trt_plugin import INPUT_NAMES as TRT_ATTENTION_INPUTS
from runtime.engine import llm_inputs
from runtime.kv_cache import KvLayout
from runtime.rope import rope_cos_sin
from runtime.tensorrt_backend import (
    CONTEXT,
    GENERATION,
    check_kv_binding,
    llm_bindings,
    new_cache_layers,
    profile_for,
    read_layers,
    write_layers,
)

ONNX_TYPES = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT, torch.int32: TensorProto.INT32,
              torch.int64: TensorProto.INT64, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """Tiny llama (no QK-norm, FP8 embedding), qwen3 (QK-norm) and llama with an FP8 KV cache exports, and the
    qwen3 checkpoint."""
    root = tmp_path_factory.mktemp("trt")
    llama = make_tiny_checkpoint("llama", root / "llama", smollm2_checkpoint)
    qwen3 = make_tiny_checkpoint("qwen3", root / "qwen3", smollm2_checkpoint)
    fp8kv = quantize(llama, root / "llama-fp8kv", "fp8", kv=True)
    return {"llama": export(llama, root / "llama-onnx", fp8_embedding=True),
            "qwen3": export(qwen3, root / "qwen3-onnx"),
            "llama-fp8kv": export(fp8kv, root / "llama-fp8kv-onnx"), "qwen3-checkpoint": qwen3}


def load_graph(onnx_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)


def custom_nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "trt_edgellm" and n.op_type == op_type]


def attribute(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def external_locations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(t.name, {e.key: e.value for e in t.external_data}["location"]) for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_attention_node_gets_nine_inputs_and_the_namespace(exports, family):
    original = load_graph(exports[family])
    before = original.SerializeToString()
    prepared = prepare_for_tensorrt(original)
    assert original.SerializeToString() == before, "the input model must stay unchanged"

    nodes, old_nodes = custom_nodes(prepared, "AttentionPlugin"), custom_nodes(original, "AttentionPlugin")
    assert len(nodes) == len(old_nodes) > 0
    inits = {t.name: t for t in prepared.graph.initializer}
    for node, old in zip(nodes, old_nodes, strict=True):
        assert len(node.input) == len(TRT_ATTENTION_INPUTS) == 9
        assert list(node.input[:len(old.input)]) == list(old.input)
        assert attribute(node, "plugin_namespace") == PLUGIN_NAMESPACE.encode()
        if family == "llama":  # no QK-norm: two fp16 [head_size] placeholders
            assert attribute(node, "enable_qk_norm") == 0 and len(old.input) == 5
            for name in node.input[5:7]:
                gamma = numpy_helper.to_array(inits[name])
                assert gamma.dtype == np.float16 and gamma.shape == (attribute(node, "head_size"),)
        else:
            assert attribute(node, "enable_qk_norm") == 1 and len(old.input) == 7
        # no tree attention: an int32 [1,1,1] mask and [1,1] positions
        assert attribute(node, "enable_tree_attention") == 0
        mask, pos = (numpy_helper.to_array(inits[name]) for name in node.input[7:])
        assert (mask.dtype, mask.shape, pos.dtype, pos.shape) == (np.int32, (1, 1, 1), np.int32, (1, 1))

    # the weights stay where they were: same external references, nothing loaded inline; they resolve against the
    # export's directory, which is how TensorRT reads them (build_engine passes it the original model path)
    assert external_locations(prepared) == external_locations(original) != []
    checked = exports[family] / "prepared-for-check.onnx"
    onnx.save_model(prepared, str(checked))
    try:
        onnx.checker.check_model(str(checked))
    finally:
        checked.unlink()


def test_head_sizes_the_gpu_kernels_lack_are_refused_before_parsing(exports):
    model = load_graph(exports["llama"])  # the tiny models have head_dim 16
    first = custom_nodes(model, "AttentionPlugin")[0]
    with pytest.raises(InputError, match=rf"{first.name}.*expected head_size 64 or 128.*found 16"):
        check_gpu_support(model)
    for node in custom_nodes(model, "AttentionPlugin"):
        next(a for a in node.attribute if a.name == "head_size").i = 64
    check_gpu_support(model)
    check_gpu_support(prepare_for_tensorrt(model))  # as build_llm calls it: placeholders make 7 inputs per node


def test_prepare_is_idempotent(exports):
    once = prepare_for_tensorrt(load_graph(exports["llama"]))
    assert prepare_for_tensorrt(once).SerializeToString() == once.SerializeToString()


def test_an_attention_node_with_six_inputs_is_rejected(exports):
    model = load_graph(exports["llama"])
    node = custom_nodes(model, "AttentionPlugin")[0]
    node.input.append(node.input[0])
    with pytest.raises(InputError, match=f"{node.name}.*expected 5 inputs .*found 6"):
        prepare_for_tensorrt(model)


def test_fp8_embedding_graph_gets_the_namespace_and_fp16_gather_is_untouched(exports):
    sidecar = read_embedding_sidecar(exports["llama"] / "embedding.safetensors")
    (gather,) = custom_nodes(prepare_for_tensorrt(embedding_model(sidecar)), "Fp8Gather")
    assert attribute(gather, "plugin_namespace") == PLUGIN_NAMESPACE.encode()
    assert list(gather.input) == ["embedding", "embedding_scale", "input_ids"]

    fp16 = embedding_model(read_embedding_sidecar(exports["qwen3"] / "embedding.safetensors"))
    assert prepare_for_tensorrt(fp16).SerializeToString() == fp16.SerializeToString()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llm_profiles_name_exactly_the_graph_inputs(exports, family):
    found = detect(exports[family])
    dims = ModelDims(found.num_layers, found.hidden_size, found.num_kv_heads, found.head_dim, found.rotary_dim)
    model = prepare_for_tensorrt(load_graph(exports[family]))
    profiles = llm_profiles(Limits(2, 16, 64), dims)
    check_profiles(model, profiles)

    first = profiles[0]
    shapes = dict(first.shapes)
    del shapes["past_key_values_0"]
    with pytest.raises(InputError, match=r"'context'.*\['past_key_values_0'\] missing"):
        check_profiles(model, [Profile(first.name, shapes)])
    shapes = {**first.shapes, "input_ids": first.shapes["context_lengths"]}
    with pytest.raises(InputError, match=r"\['input_ids'\] not in the graph"):
        check_profiles(model, [Profile(first.name, shapes)])


LIMITS = Limits(max_batch_size=2, max_input_len=16, max_kv_cache_capacity=32)


def runtime_bindings(onnx_dir: Path, embeds: torch.Tensor, layers: list, context_lengths, start,
                     last) -> tuple[dict, dict]:
    """The inputs and cache outputs TensorRTBackend.run binds for Engine.forward (its numpy arrays become tensors),
    on the CPU."""
    config = json.loads((onnx_dir / "config.json").read_text())
    rope = torch.from_numpy(rope_cos_sin(config, LIMITS.max_kv_cache_capacity))
    step = llm_inputs(embeds, *(torch.from_numpy(np.asarray(a)) for a in (context_lengths, start, last)))
    return llm_bindings({ROPE_COS_SIN: rope}, step, layers)


def cache_layers(batch: int, num_layers: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str) -> list:
    return new_cache_layers(batch, KvLayout(num_layers, num_kv_heads, LIMITS.max_kv_cache_capacity, head_dim,
                                            KvDtype(kv_cache_dtype)), "cpu")


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-fp8kv"])
@pytest.mark.parametrize("batch, seq", [(2, 5), (2, 1), (1, 16), (1, 1)])
def test_runtime_bindings_fit_the_graph_and_the_profile_they_run_in(exports, family, batch, seq):
    """Every binding TensorRTBackend makes: the graph's name, dtype and static dims, and within the min/max of the
    profile it selects; each present output is the tensor of the past it aliases, typed and shaped like it."""
    found = detect(exports[family])
    dims = ModelDims(found.num_layers, found.hidden_size, found.num_kv_heads, found.head_dim, found.rotary_dim)
    layers = cache_layers(batch, dims.num_layers, dims.num_kv_heads, dims.head_dim, found.kv_cache_dtype)
    inputs, presents = runtime_bindings(exports[family], torch.zeros(batch, seq, dims.hidden_size, dtype=torch.float16),
                                        layers, np.full(batch, seq, np.int32), np.zeros(batch, np.int32),
                                        np.zeros((batch, 1), np.int64))
    graph = load_graph(exports[family]).graph
    assert set(inputs) == {i.name for i in graph.input}
    assert set(presents) | {"logits"} == {o.name for o in graph.output}
    assert all(presents[f"present_key_values_{i}"] is inputs[f"past_key_values_{i}"] for i in range(len(layers)))
    profile = llm_profiles(LIMITS, dims)[profile_for(seq)]
    assert profile.name == ("generation" if seq == 1 else "context")
    for value in graph.input:
        tensor, (lo, _, hi) = inputs[value.name], profile.shapes[value.name]
        assert ONNX_TYPES[tensor.dtype] == value.type.tensor_type.elem_type, value.name
        static = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        assert len(static) == tensor.dim() and all(s in (None, n) for s, n in zip(static, tensor.shape)), value.name
        assert all(a <= n <= b for a, n, b in zip(lo, tensor.shape, hi, strict=True)), (value.name, tensor.shape)
    outputs = {o.name: o for o in graph.output}
    for i in range(dims.num_layers):
        past = next(v for v in graph.input if v.name == f"past_key_values_{i}")
        assert outputs[f"present_key_values_{i}"].type == past.type


def test_runtime_bindings_run_the_graph_to_transformers_logits(exports):
    """A right-padded prefill of two rows and two decode steps, with the runtime's bindings fed to the exported graph
    (the attention op by its torch reference, each present copied into its cache tensor as TensorRT's aliasing does),
    against each row run alone through `transformers`."""
    onnx_dir = exports["qwen3"]
    config = json.loads((onnx_dir / "config.json").read_text())
    table = read_embedding_sidecar(onnx_dir / "embedding.safetensors").table
    session = ReferenceEvaluator(str(onnx_dir / "model.onnx"), new_ops=[AttentionPlugin])
    layers = cache_layers(2, config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"], "fp16")
    lengths = np.zeros(2, np.int32)
    outputs = ["logits"] + [f"present_key_values_{i}" for i in range(len(layers))]

    def step(ids: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        last = np.maximum(ctx - 1, 0).astype(np.int64)[:, None]
        inputs, _ = runtime_bindings(onnx_dir, table[torch.from_numpy(ids).long()], layers, ctx, lengths.copy(), last)
        logits, *presents = session.run(outputs, {name: t.numpy() for name, t in inputs.items()})
        for layer, present in zip(layers, presents):
            layer.copy_(torch.from_numpy(present))
        lengths[:] += ctx
        return logits[:, 0]

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config["vocab_size"], n).astype(np.int32) for n in (8, 5)]
    ids = np.zeros((2, 8), np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    ours = [step(ids, np.array([8, 5], np.int32))]
    steps = rng.integers(0, config["vocab_size"], (2, 2)).astype(np.int32)
    ours += [step(steps[:, t:t + 1], np.array([1, 1], np.int32)) for t in range(2)]

    hf = hf_model(exports["qwen3-checkpoint"])
    for b, prompt in enumerate(prompts):
        past = DynamicCache(config=hf.config)  # transformers' own cache, filled in place
        with torch.no_grad():
            out = hf(torch.tensor(prompt[None], dtype=torch.long), use_cache=True, **cache_kwargs(hf, past))
            ref = [out.logits[0, -1]]
            for t in range(2):
                out = hf(torch.tensor([[steps[b, t]]], dtype=torch.long), use_cache=True, **cache_kwargs(hf, past))
                ref.append(out.logits[0, -1])
        assert_logits_close(np.stack([o[b] for o in ours]), torch.stack(ref).numpy())
        # what the backend's read_kv gives for the row: transformers' post-RoPE K and V (fp16 against fp32)
        cached = read_layers(layers, b, torch.arange(int(lengths[b]))).float().numpy()
        want = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in past.layers])
        np.testing.assert_allclose(cached, want.numpy(), rtol=0, atol=0.005 * float(want.abs().max()))
    assert lengths.tolist() == [10, 7]
    # write_layers (the backend's write_kv) puts a read row at any offset of another row, and touches nothing else
    other = cache_layers(2, config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"], "fp16")
    moved = read_layers(layers, 1, torch.arange(7))
    write_layers(other, 0, 3, moved)
    assert torch.equal(read_layers(other, 0, torch.arange(3, 10)), moved)
    assert not read_layers(other, 0, torch.arange(3)).any()
    assert not read_layers(other, 1, torch.arange(LIMITS.max_kv_cache_capacity)).any()


def test_runtime_refuses_an_engine_whose_kv_binding_disagrees_with_the_config(tmp_path):
    check_kv_binding("HALF", "fp16", tmp_path / "llm.engine")
    check_kv_binding("FP8", "fp8", tmp_path / "llm.engine")
    with pytest.raises(InputError, match=r"llm\.engine: past_key_values_0 is fp8 but config.json says kv_cache_dtype 'fp16'"):
        check_kv_binding("FP8", "fp16", tmp_path / "llm.engine")
    assert (CONTEXT, GENERATION) == (0, 1)
