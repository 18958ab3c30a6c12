"""What TensorRT needs changed in an exported graph before its ONNX parser sees it; pure, so CI tests it.

Two facts of TensorRT Python plugins (`tensorrt.plugin`, docs/gpu-kernels.md) shape this:
- the ONNX parser finds a plugin by op type plus the string attribute `plugin_namespace`, so every `trt_edgellm`
  node gets `plugin_namespace="trt_edgellm"`;
- a plugin has a fixed input list, so `AttentionPlugin` always takes 9 inputs: a layer without QK-norm gets two fp16
  `[head_size]` placeholders for the gammas, and one without tree attention an int32 `[1,1,1]` mask and `[1,1]`
  positions; the kernels never read them.
The exported `model.onnx` and the ONNX Runtime path never see these changes.
"""

from __future__ import annotations

import numpy as np
import onnx

from builder.profiles import Profile
from contract.errors import InputError
from contract.versions import CUSTOM_DOMAIN
from plugins.attention import schema as attention_schema
from plugins.attention.trt_plugin import INPUT_NAMES as TRT_ATTENTION_INPUTS
from plugins.attention.trt_plugin import check_head_size
from plugins.fp8_gather import schema as fp8_gather_schema

PLUGIN_NAMESPACE = CUSTOM_DOMAIN  # the parser's plugin namespace is the custom ops' domain
PLUGIN_OPS = {attention_schema.OP_TYPE, fp8_gather_schema.OP_TYPE}


def _placeholder_name(head_size: int) -> str:
    return f"trt_unused_qk_norm_gamma_{head_size}"


TREE_PLACEHOLDERS = {"trt_unused_attention_mask": np.zeros((1, 1, 1), np.int32),
                     "trt_unused_attention_pos_id": np.zeros((1, 1), np.int32)}


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose custom nodes TensorRT can parse; `model` is left unchanged.

    Initializers are copied as they are, so a model loaded with `load_external_data=False` keeps its external data as
    references (resolved against the original file's directory); the placeholders are small inline tensors."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    graph = prepared.graph
    placeholders = {}  # head_size -> initializer name
    tree_placeholders_added = False
    for node in graph.node:
        if node.domain != PLUGIN_NAMESPACE or node.op_type not in PLUGIN_OPS:
            continue
        attrs = [a for a in node.attribute if a.name != "plugin_namespace"]
        del node.attribute[:]
        node.attribute.extend([*attrs, onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE)])
        if node.op_type != attention_schema.OP_TYPE:
            continue
        if len(node.input) == len(TRT_ATTENTION_INPUTS):  # already in TensorRT's form
            continue
        a = attention_schema.read_attrs(node)  # also checks the input count against the flags
        inputs = list(node.input)
        base, rest = inputs[:len(attention_schema.INPUTS)], inputs[len(attention_schema.INPUTS):]
        gammas, tree = (rest[:2], rest[2:]) if a.enable_qk_norm else ([], rest)
        if not gammas:
            if a.head_size not in placeholders:
                placeholders[a.head_size] = _placeholder_name(a.head_size)
                graph.initializer.append(
                    onnx.numpy_helper.from_array(np.ones(a.head_size, np.float16), placeholders[a.head_size]))
            gammas = [placeholders[a.head_size]] * len(attention_schema.QK_NORM_INPUTS)
        if not tree:
            if not tree_placeholders_added:
                graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in TREE_PLACEHOLDERS.items())
                tree_placeholders_added = True
            tree = list(TREE_PLACEHOLDERS)
        del node.input[:]
        node.input.extend(base + gammas + tree)
    return prepared


def check_gpu_support(model: onnx.ModelProto) -> None:
    """Every AttentionPlugin node has a head size the GPU kernels take; said here, not from inside TensorRT's parser.
    Reads the attributes only, so it takes the graph before or after `prepare_for_tensorrt` (9 inputs per node)."""
    for node in model.graph.node:
        if node.domain == PLUGIN_NAMESPACE and node.op_type == attention_schema.OP_TYPE:
            where = f"AttentionPlugin node {node.name!r} (--backend tensorrt; --backend onnxruntime takes any size)"
            fields = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            check_head_size(attention_schema.attrs_from_fields(fields, where).head_size, where)


def check_profiles(model: onnx.ModelProto, profiles: list[Profile]) -> None:
    """Every runtime input of `model` has a shape in every profile, and no profile names an input it lacks.

    TensorRT rejects a profile that misses a dynamic input only deep inside the build; this says which one."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = {i.name for i in model.graph.input if i.name not in initializers}
    for profile in profiles:
        missing, extra = sorted(inputs - set(profile.shapes)), sorted(set(profile.shapes) - inputs)
        if missing or extra:
            raise InputError(f"optimization profile {profile.name!r}: expected shapes for the graph inputs "
                             f"{sorted(inputs)}, found {missing} missing and {extra} not in the graph")
