"""Fp8Gather: the ORT lowering vs the torch reference (bit-exact) and vs onnx's ReferenceEvaluator on a plain
decoded graph; the FP8 table stays 1 byte per element in the lowered model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from contract.errors import InputError
from contract.formats import expand_row_block_scale, quantize_fp8_row_block
from plugins.fp8_gather import schema
from plugins.fp8_gather.reference import fp8_gather_reference
from plugins.lowering import lower_for_onnxruntime

VOCAB = 40


def fp8_table(hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, hidden, generator=gen) * torch.logspace(-3, 1, hidden)  # blocks of very different amax
    weight[3] = 0.0  # an all-zero row: the smallest scale
    return quantize_fp8_row_block(weight)


def fp8_initializer(name: str, table: torch.Tensor) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(table.shape), table.view(torch.uint8).numpy().tobytes(), raw=True)


def gather_model(table: torch.Tensor, scale: torch.Tensor) -> onnx.ModelProto:
    hidden = table.shape[1]
    node = schema.make_node("embedding", "embedding_scale", "input_ids", "inputs_embeds", name="embed")
    graph = helper.make_graph(
        [node], "embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq_len"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", hidden])],
        initializer=[fp8_initializer("embedding", table), numpy_helper.from_array(scale.numpy(), "embedding_scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), schema.OPSET])


def decoded_model(table: torch.Tensor, scale: torch.Tensor) -> onnx.ModelProto:
    """The same lookup in plain ONNX (Gather on FP8, Cast, Mul): runnable by ReferenceEvaluator, not by ORT."""
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["rows"], axis=0),
        helper.make_node("Cast", ["rows"], ["rows32"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["scale_full", "input_ids"], ["scales"], axis=0),
        helper.make_node("Mul", ["rows32", "scales"], ["product"]),
        helper.make_node("Cast", ["product"], ["inputs_embeds"], to=TensorProto.FLOAT16),
    ]
    full = expand_row_block_scale(scale, table.shape[1]).numpy()
    graph = helper.make_graph(
        nodes, "decoded",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [None, None])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16, None)],
        initializer=[fp8_initializer("embedding", table), numpy_helper.from_array(full, "scale_full")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("hidden", [256, 576])  # 576 = SmolLM2: a short last block of 64
def test_lowered_matches_reference_and_evaluator(hidden):
    table, scale = fp8_table(hidden)
    ids = torch.tensor([[0, 3, 39, 7], [5, 5, 12, 0]], dtype=torch.int32)
    lowered = lower_for_onnxruntime(gather_model(table, scale))
    onnx.checker.check_model(lowered)
    session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    assert got.dtype == np.float16 and got.shape == (2, 4, hidden)

    want = fp8_gather_reference(table, scale, ids).numpy()
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    oracle = ReferenceEvaluator(decoded_model(table, scale)).run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_array_equal(got.view(np.uint16), oracle.view(np.uint16))


def test_table_stays_fp8_in_lowered_model():
    table, scale = fp8_table(576)
    lowered = lower_for_onnxruntime(gather_model(table, scale))
    inits = {t.name: t for t in lowered.graph.initializer}
    assert inits["embedding"].data_type == TensorProto.FLOAT8E4M3FN
    assert len(inits["embedding"].raw_data) == VOCAB * 576  # one byte per element
    assert not any(n.domain == schema.DOMAIN for n in lowered.graph.node)


def test_reference_rejects_out_of_range_ids():
    table, scale = fp8_table(128)
    with pytest.raises(InputError, match="input_ids"):
        fp8_gather_reference(table, scale, torch.tensor([[0, VOCAB]]))


@pytest.mark.parametrize("block", [32, 128])
def test_reference_uses_the_block_size(block):
    """`fp16(float(table[id, j]) * scale[id, j // block])`, element by element, a short last block included."""
    table, scale = quantize_fp8_row_block(torch.randn(6, 80) * torch.logspace(-2, 1, 80), block)
    ids = torch.tensor([[4, 0, 4], [1, 5, 2]], dtype=torch.int32)
    got = fp8_gather_reference(table, scale, ids, block)
    expected = torch.empty(2, 3, 80, dtype=torch.float16)
    for b in range(2):
        for s in range(3):
            row = int(ids[b, s])
            for j in range(80):
                expected[b, s, j] = table[row, j].float() * scale[row, j // block]  # fp32 product, then fp16
    assert torch.equal(got, expected)


def test_node_schema():
    node = schema.make_node("t", "s", "i", "o", name="embed", block_size=128)
    assert (node.domain, node.op_type, list(node.input)) == ("trt_edgellm", "Fp8Gather", ["t", "s", "i"])
    assert schema.read_block_size(node) == 128


def test_lowering_keeps_external_data(tmp_path):
    """The builder lowers a model whose initializers live in a `.data` file, without loading them."""
    table, scale = fp8_table(576)
    onnx.save(gather_model(table, scale), tmp_path / "embedding.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="embedding.onnx.data", size_threshold=0)
    model = onnx.load(tmp_path / "embedding.onnx", load_external_data=False)
    lowered = lower_for_onnxruntime(model)
    onnx.save(lowered, tmp_path / "lowered.onnx")  # next to embedding.onnx.data, which it still references
    assert (tmp_path / "lowered.onnx").stat().st_size < VOCAB * 576
    session = ort.InferenceSession(str(tmp_path / "lowered.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.tensor([[1, 2], [38, 3]], dtype=torch.int32)
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_array_equal(got.view(np.uint16), fp8_gather_reference(table, scale, ids).numpy().view(np.uint16))
