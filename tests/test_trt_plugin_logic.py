"""What the TensorRT plugins decide, without TensorRT: attributes, dtypes and output shapes.

The registered `tensorrt.plugin` functions only translate TensorRT descriptors into calls of these functions, so
this file covers every decision they make. Registration itself needs TensorRT and a GPU (docs/gpu-kernels.md).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import onnx
import pytest
import torch

from contract.errors import InputError
from plugins import trt_tensors
from plugins.attention import schema
from plugins.attention import trt_plugin as attn_plugin
from plugins.fp8_gather import schema as gather_schema
from plugins.fp8_gather import trt_plugin as gather_plugin

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def node_fields(node: onnx.NodeProto) -> dict:
    """The attributes as TensorRT's ONNX parser hands them to the plugin (FLOATS become a float32 array)."""
    fields = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    fields["qkv_scales"] = np.asarray(fields["qkv_scales"], dtype=np.float32)
    return fields


def plugin_fields(num_q_heads=8, num_kv_heads=2, head_size=64, enable_fp8_kv_cache=0, **changes) -> dict:
    """Plugin fields as TensorRT hands them over (the registered functions pass them by name)."""
    return dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, attention_scale=0.125,
                enable_fp8_kv_cache=enable_fp8_kv_cache, qkv_scales=np.ones(3, np.float32), enable_qk_norm=0,
                rms_norm_eps=1e-6, **changes)


@pytest.mark.parametrize("fp8,qk_norm", [(False, False), (True, True)])
def test_plugin_attrs_agree_with_the_onnx_node(fp8, qk_norm):
    inputs = list(schema.INPUTS) + (list(schema.QK_NORM_INPUTS) if qk_norm else [])
    node = schema.make_node(inputs, list(schema.OUTPUTS), name="layer0", num_q_heads=16, num_kv_heads=8, head_size=128,
                            enable_fp8_kv_cache=fp8, qkv_scales=(0.5, 0.25, 0.125), enable_qk_norm=qk_norm, rms_norm_eps=1e-5)
    got = attn_plugin.plugin_attrs(**node_fields(node))
    want = schema.read_attrs(node)
    assert got.num_q_heads == want.num_q_heads and got.num_kv_heads == want.num_kv_heads
    assert got.head_size == want.head_size and got.enable_fp8_kv_cache == want.enable_fp8_kv_cache
    assert got.enable_qk_norm == want.enable_qk_norm
    assert got.qkv_scales == pytest.approx(want.qkv_scales) and got.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert got.attention_scale == pytest.approx(1 / math.sqrt(128))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(sliding_window_size=512), "sliding_window_size"),
        (dict(enable_tree_attention=2), "enable_tree_attention"),
        (dict(num_q_heads=10, num_kv_heads=4), "multiple of num_kv_heads"),
        (dict(head_size=96), "head_size 64 or 128"),
        (dict(qkv_scales=np.array([1.0, 0.0, 1.0], np.float32)), "qkv_scales"),
        (dict(qkv_scales=np.array([1.0, 1.0], np.float32)), "qkv_scales"),
        (dict(qkv_scales=np.array([1.0, np.inf, 1.0], np.float32)), "qkv_scales"),
        (dict(qkv_scales=np.array([1.0, np.nan, 1.0], np.float32)), "qkv_scales"),
    ],
)
def test_plugin_attrs_rejects(change, message):
    node = schema.make_node(list(schema.INPUTS), list(schema.OUTPUTS), name="l", num_q_heads=8, num_kv_heads=2, head_size=64)
    with pytest.raises(InputError, match=message):
        attn_plugin.plugin_attrs(**{**node_fields(node), **change})


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(sliding_window_size=512), "sliding_window_size"),
        (dict(num_q_heads=10, num_kv_heads=4), "multiple of num_kv_heads"),
        (dict(num_q_heads=0), "multiple of num_kv_heads"),
        (dict(head_size=0), "positive head_size"),
        (dict(head_size=64.0), "expected an int head_size"),
        (dict(enable_fp8_kv_cache=2), "enable_fp8_kv_cache 0 or 1"),
        (dict(attention_scale=float("nan")), "attention_scale"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (dict(qkv_scales=[1.0, float("inf"), 1.0]), "qkv_scales"),
        (dict(qkv_scales="abc"), "qkv_scales"),
    ],
)
def test_onnx_node_and_plugin_share_one_validator(change, message):
    """The ONNX path (`read_attrs`, used by the reference and the ORT lowering) refuses what the plugin refuses."""
    node = schema.make_node(list(schema.INPUTS), list(schema.OUTPUTS), name="l", num_q_heads=8, num_kv_heads=2, head_size=64)
    bad = onnx.helper.make_node(node.op_type, node.input, node.output, name="l", domain=node.domain,
                                **{**{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, **change})
    with pytest.raises(InputError, match=f"AttentionPlugin node 'l'.*{message}"):
        schema.read_attrs(bad)
    with pytest.raises(InputError, match=f"AttentionPlugin attributes.*{message}"):
        attn_plugin.plugin_attrs(**{**node_fields(node), **change})


def test_only_the_plugin_needs_a_gpu_head_size():
    node = schema.make_node(list(schema.INPUTS), list(schema.OUTPUTS), name="l", num_q_heads=8, num_kv_heads=2, head_size=96)
    assert schema.read_attrs(node).head_size == 96
    with pytest.raises(InputError, match="head_size 64 or 128"):
        attn_plugin.plugin_attrs(**node_fields(node))


def test_attention_dtypes_follow_the_cache_format():
    attrs = attn_plugin.plugin_attrs(**plugin_fields(enable_fp8_kv_cache=1))
    attn_plugin.check_input_dtypes(["HALF", "FP8", "INT32", "FLOAT", "INT32", "HALF", "HALF", "INT32", "INT32"], attrs)
    with pytest.raises(InputError, match="past_key_value: expected FP8, found HALF"):
        attn_plugin.check_input_dtypes(["HALF", "HALF", "INT32", "FLOAT", "INT32", "HALF", "HALF", "INT32", "INT32"],
                                       attrs)
    fp16 = attn_plugin.plugin_attrs(**plugin_fields())
    with pytest.raises(InputError, match="context_lengths: expected INT32, found INT64"):
        attn_plugin.check_input_dtypes(["HALF", "HALF", "INT64", "FLOAT", "INT32", "HALF", "HALF", "INT32", "INT32"],
                                       fp16)
    with pytest.raises(InputError, match="attention_mask: expected INT32, found INT64"):
        attn_plugin.check_input_dtypes(["HALF", "HALF", "INT32", "FLOAT", "INT32", "HALF", "HALF", "INT64", "INT32"],
                                       fp16)


def test_attention_output_shape_keeps_symbolic_batch_and_seq():
    attrs = attn_plugin.plugin_attrs(**plugin_fields(num_q_heads=9, num_kv_heads=3))
    batch, seq = object(), object()  # stand-ins for TensorRT shape expressions: passed through untouched
    shape = attn_plugin.attn_output_shape((batch, seq, (9 + 2 * 3) * 64), attrs)
    assert shape[0] is batch and shape[1] is seq and shape[2:] == (9, 64)


def test_plugin_inputs_are_the_contract_inputs_plus_both_optional_groups():
    assert attn_plugin.INPUT_NAMES == schema.INPUTS + schema.QK_NORM_INPUTS + schema.TREE_INPUTS


def test_tree_plugin_attrs():
    inputs = list(schema.INPUTS) + list(schema.TREE_INPUTS)
    node = schema.make_node(inputs, list(schema.OUTPUTS), name="l", num_q_heads=8, num_kv_heads=2, head_size=64,
                            enable_tree_attention=True)
    assert attn_plugin.plugin_attrs(**node_fields(node)).enable_tree_attention


def test_cuda_views_have_the_torch_itemsize():
    """`as_torch` reads bytes with one typestr and views them as a torch dtype: both must agree on the width."""
    assert trt_tensors.CUDA_TYPESTR.keys() == trt_tensors.TORCH_DTYPE_NAMES.keys()
    for name, typestr in trt_tensors.CUDA_TYPESTR.items():
        torch_dtype = getattr(torch, trt_tensors.TORCH_DTYPE_NAMES[name])
        assert np.dtype(typestr).itemsize == torch.empty(0, dtype=torch_dtype).element_size(), name


def test_fp8_gather_logic():
    gather_plugin.check_input_dtypes(["FP8", "FLOAT", "INT32"])
    with pytest.raises(InputError, match="table: expected FP8, found HALF"):
        gather_plugin.check_input_dtypes(["HALF", "FLOAT", "INT32"])
    for bad in (0, -128, 128.0):
        with pytest.raises(InputError, match="Fp8Gather attributes: expected a positive int block_size"):
            gather_schema.block_size_from_fields({"block_size": bad}, gather_plugin.WHERE)
        node = onnx.helper.make_node("Fp8Gather", ["t", "s", "i"], ["o"], name="embed", domain="trt_edgellm", block_size=bad)
        with pytest.raises(InputError, match="Fp8Gather node 'embed': expected a positive int block_size"):
            gather_schema.read_block_size(node)
    gather_plugin.check_scale_shape((49152, 576), (49152, 5), 128)  # SmolLM2: the short last block has a scale
    with pytest.raises(InputError, match=r"expected shape \[49152, 5\], found \[49152, 4\]"):
        gather_plugin.check_scale_shape((49152, 576), (49152, 4), 128)
    batch, seq = object(), object()
    shape = gather_plugin.output_shape((batch, seq), (49152, 576))
    assert shape[0] is batch and shape[1] is seq and shape[2] == 576


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_register_without_tensorrt_is_a_no_op():
    assert attn_plugin.register() is False
    assert gather_plugin.register() is False


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_register_with_tensorrt():
    assert attn_plugin.register() is True and gather_plugin.register() is True
    assert attn_plugin.register() is True  # idempotent
