"""The fast form's graph passes (plugins/weight_folding.py) on a small graph, against `onnx.reference`: the folded,
merged and fused graph computes what the original computes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from plugins.weight_folding import fast_form

FP8 = TensorProto.FLOAT8E4M3FN


def fp8_initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    q = array.astype(ml_dtypes.float8_e4m3fn)
    return helper.make_tensor(name, FP8, q.shape, q.view(np.uint8).tobytes(), raw=True)


def quantized_projections(fourth: bool = True) -> onnx.ModelProto:
    """x -> static FP8 fake-quant (one per projection, scales equal in value) -> three MatMuls on DQ'd FP8 weights
    (one with a per-channel scale) -> Concat, like the exporter's q|k|v; a fourth MatMul reads the same input but its
    output is a graph output of its own (`fourth`)."""
    rng = np.random.default_rng(0)
    inits, nodes, parts = [], [], []
    for i, width in enumerate((8, 4, 4, 6) if fourth else (8, 4, 4)):
        inits.append(fp8_initializer(f"w{i}", rng.normal(size=(16, width)) * 4))
        scale = np.array(0.01 * (i + 1), np.float32) if i != 1 else rng.uniform(0.01, 0.02, width).astype(np.float32)
        inits += [numpy_helper.from_array(scale, f"ws{i}"),
                  numpy_helper.from_array(np.array(0.05, np.float32), f"s{i}")]
        nodes += [helper.make_node("QuantizeLinear", ["x", f"s{i}"], [f"xq{i}"], output_dtype=FP8),
                  helper.make_node("DequantizeLinear", [f"xq{i}", f"s{i}"], [f"xdq{i}"]),
                  helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}"], [f"wdq{i}"], axis=1),
                  helper.make_node("MatMul", [f"xdq{i}", f"wdq{i}"], [f"y{i}"])]
        parts.append(f"y{i}")
    nodes += [helper.make_node("Concat", parts[:3], ["qkv"], axis=-1), helper.make_node("Neg", ["qkv"], ["out"])]
    graph = helper.make_graph(nodes, "projections", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 16])]
                              + [helper.make_tensor_value_info("y3", TensorProto.FLOAT, [2, 3, 6])] * fourth, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


def test_fast_form_computes_what_the_graph_computes_with_fp32_weights_and_one_gemm():
    model = quantized_projections()
    x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32) * 3
    expected = ReferenceEvaluator(model).run(None, {"x": x})
    fast = onnx.ModelProto()
    fast.CopyFrom(model)
    fast_form(fast)
    got = ReferenceEvaluator(fast).run(None, {"x": x})
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    ops = [n.op_type for n in fast.graph.node]
    # one activation quantizer (the four scales are equal), one MatMul for all four, its Split; the Concat of three
    # of the pieces stays a Concat because the fourth piece is a graph output of its own
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1 and ops.count("MatMul") == 1
    inits = {t.name: t for t in fast.graph.initializer}
    assert not [t for t in inits.values() if t.data_type == FP8]
    weight = numpy_helper.to_array(inits[next(n for n in fast.graph.node if n.op_type == "MatMul").input[1]])
    w0 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32) * np.float32(0.01)
    np.testing.assert_array_equal(weight[:, :8], w0)  # the fold is exact: fp8 * scale in fp32


def test_concat_of_all_fused_pieces_is_the_fused_output():
    model = quantized_projections(fourth=False)
    fast = onnx.ModelProto()
    fast.CopyFrom(model)
    fast_form(fast)
    ops = [n.op_type for n in fast.graph.node]
    assert "Concat" not in ops and "Split" not in ops and ops.count("MatMul") == 1
    x = np.ones((2, 3, 16), np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(fast).run(None, {"x": x})[0],
                               ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_activation_quantizers_with_different_scales_stay_apart():
    model = quantized_projections()
    for t in model.graph.initializer:
        if t.name == "s1":
            t.CopyFrom(numpy_helper.from_array(np.array(0.07, np.float32), "s1"))
    fast_form(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("MatMul") == 2
