"""The TensorRT build path's pure logic (builder/trt_graph.py), on real exports; TensorRT itself is not needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.detect import detect
from builder.onnxruntime_backend import embedding_model
from builder.profiles import Limits, ModelDims, Profile, llm_profiles
from builder.trt_graph import PLUGIN_NAMESPACE, check_profiles, prepare_for_tensorrt
from conftest import make_tiny_checkpoint
from llm_loader.embedding import read_embedding_sidecar
from llm_loader.errors import InputError
from llm_loader.export_all_cli import export
from plugins.attention.trt_plugin import INPUT_NAMES as TRT_ATTENTION_INPUTS


@pytest.fixture(scope="module")
def exports(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """Tiny llama (no QK-norm, FP8 embedding) and qwen3 (QK-norm) exports."""
    root = tmp_path_factory.mktemp("trt")
    llama = make_tiny_checkpoint("llama", root / "llama", smollm2_checkpoint)
    qwen3 = make_tiny_checkpoint("qwen3", root / "qwen3", smollm2_checkpoint)
    return {"llama": export(llama, root / "llama-onnx", fp8_embedding=True),
            "qwen3": export(qwen3, root / "qwen3-onnx")}


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
def test_every_attention_node_gets_seven_inputs_and_the_namespace(exports, family):
    original = load_graph(exports[family])
    before = original.SerializeToString()
    prepared = prepare_for_tensorrt(original)
    assert original.SerializeToString() == before, "the input model must stay unchanged"

    nodes, old_nodes = custom_nodes(prepared, "AttentionPlugin"), custom_nodes(original, "AttentionPlugin")
    assert len(nodes) == len(old_nodes) > 0
    inits = {t.name: t for t in prepared.graph.initializer}
    for node, old in zip(nodes, old_nodes, strict=True):
        assert len(node.input) == len(TRT_ATTENTION_INPUTS) == 7
        assert list(node.input[:len(old.input)]) == list(old.input)
        assert attribute(node, "plugin_namespace") == PLUGIN_NAMESPACE.encode()
        if family == "llama":  # no QK-norm: two fp16 [head_size] placeholders
            assert attribute(node, "enable_qk_norm") == 0 and len(old.input) == 5
            for name in node.input[5:]:
                gamma = numpy_helper.to_array(inits[name])
                assert gamma.dtype == np.float16 and gamma.shape == (attribute(node, "head_size"),)
        else:
            assert attribute(node, "enable_qk_norm") == 1 and len(old.input) == 7

    # the weights stay where they were: same external references, nothing loaded inline; they resolve against the
    # export's directory, which is how TensorRT reads them (build_engine passes it the original model path)
    assert external_locations(prepared) == external_locations(original) != []
    checked = exports[family] / "prepared-for-check.onnx"
    onnx.save_model(prepared, str(checked))
    try:
        onnx.checker.check_model(str(checked))
    finally:
        checked.unlink()


def test_prepare_is_idempotent(exports):
    once = prepare_for_tensorrt(load_graph(exports["llama"]))
    assert prepare_for_tensorrt(once).SerializeToString() == once.SerializeToString()


def test_an_attention_node_with_six_inputs_is_rejected(exports):
    model = load_graph(exports["llama"])
    node = custom_nodes(model, "AttentionPlugin")[0]
    node.input.append(node.input[0])
    with pytest.raises(InputError, match=f"{node.name}.*expected 5 or 7 inputs, found 6"):
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
