"""The weight-format registry (contract.weight_formats rows, plugins/weight_formats modules) and the model-family
registry (contract.families) are complete and agree with themselves, with `transformers` and with ONNX's reference
evaluator: a format missing an operation, a `holds` that claims another format's tensors, a graph form that detection
would not recognise, or a family naming a module transformers' model lacks fails here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from contract.errors import InputError
from contract.families import FAMILIES, family_of
from contract.weight_formats import (
    LM_HEAD_FORMATS,
    UNQUANTIZED,
    WEIGHT_FORMATS,
    WRITABLE_FORMATS,
)
from plugins import weight_formats
from plugins.graph_builder import GraphBuilder, Names
from plugins.weight_formats import CAPABILITY_OPERATIONS, MODULES, OPERATIONS
from quantization.options import AUTO, LlmOptions, check_llm_flags

M = "model.layers.0.mlp.down_proj"


def test_every_row_has_its_module_with_every_operation():
    assert set(MODULES) == set(WEIGHT_FORMATS)
    for name, row in WEIGHT_FORMATS.items():
        module = MODULES[name]
        assert module.FORMAT is row, name
        needed = [*OPERATIONS, *(op for flag, ops in CAPABILITY_OPERATIONS.items() if getattr(row, flag) for op in ops)]
        missing = [op for op in needed if not hasattr(module, op)]
        assert missing == [], f"{name} lacks {missing}"
        for op in needed:
            assert op == "ort_lowering" or callable(getattr(module, op)), (name, op)
        assert module.ort_lowering is None or callable(module.ort_lowering)


def test_cli_choices_come_from_the_rows(tmp_path):
    for name in (*WRITABLE_FORMATS, AUTO):
        o = LlmOptions(tmp_path, tmp_path / "q", quantization=name, effective_bits=6.0 if name == AUTO else None)
        check_llm_flags(o)
    for name in set(WEIGHT_FORMATS) - set(WRITABLE_FORMATS):
        with pytest.raises(InputError, match="--quantization: expected one of"):
            check_llm_flags(LlmOptions(tmp_path, tmp_path / "q", quantization=name))
    assert LlmOptions(tmp_path, tmp_path / "q", quantization="none").quantization == UNQUANTIZED
    assert set(LM_HEAD_FORMATS) <= set(WRITABLE_FORMATS)
    with pytest.raises(InputError, match="--lm_head_quantization"):
        check_llm_flags(LlmOptions(tmp_path, tmp_path / "q", lm_head_quantization="fp8_pc"))


def stored(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `M` in format `name` (fp8_pb_wo, which the writer does not write, by its layout)."""
    if name == "fp8_pb_wo":
        q, tiles = MODULES["fp8_block"].quantize(w)["weight"], MODULES["fp8_block"].quantize(w)["weight_scale_inv"]
        return {f"{M}.weight": q, f"{M}.weight_scale": tiles[:, None, :, None].contiguous()}
    out = MODULES[name].quantize(w, input_amax=3.0)
    return {f"{M}.{k}": v for k, v in out.items()}


def weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 256, generator=g) * torch.rand(256, generator=g)


@pytest.mark.parametrize("name", sorted(WEIGHT_FORMATS))
def test_stored_tensors_are_held_by_exactly_their_format_and_read_back(name):
    tensors = stored(name, weight())
    holders = [n for n, m in MODULES.items() if m.holds(M, tensors)]
    assert holders == [name]
    assert weight_formats.classify(M, tensors) == name
    linear = MODULES[name].read(M, tensors, {})
    assert linear.format == name and linear.shape == (256, 256)
    deq = weight_formats.get(name).dequantize(linear)
    # the stored form dequantizes to what the searches' fake quantization assumes (fp16: the searches' reference is
    # the fp32 weight itself, the checkpoint rounds it to fp16)
    expected = MODULES[name].weight_qdq(weight())
    torch.testing.assert_close(deq, expected.half().float() if name == UNQUANTIZED else expected, rtol=0, atol=0)


class Builder(GraphBuilder):
    """The exporter's graph-building surface (plugins.weight_formats.linear.ExportGraph) with inline initializers."""

    def __init__(self):
        self.inits: list[onnx.TensorProto] = []
        super().__init__(Names(), self._init)
        self.shared: dict[str, str] = {}
        self.const([-1], np.int64, name="const.last_axis")

    def _init(self, name, array):
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, name, value, dtype):
        self.inits.append(numpy_helper.from_array(torch.as_tensor(value).to(dtype).reshape(()).numpy(), name))
        return name

    def weight(self, name, tensor):
        return self._init(name, tensor.numpy())

    def add_raw(self, name, array, data_type, dims=None):
        array = np.ascontiguousarray(array)
        self.inits.append(helper.make_tensor(name, data_type, array.shape if dims is None else dims,
                                             array.tobytes(), raw=True))
        return name

    def shared_const(self, name, values, dtype):
        if name not in self.shared:
            self.shared[name] = self.const(values, dtype, name=name)
        return self.shared[name]


@pytest.mark.parametrize("name", sorted(WEIGHT_FORMATS))
def test_graph_weight_is_the_dequantized_weight_and_detection_recognises_it(name):
    """onnx.reference runs the format's graph weight: `[in, out]` = the format's dequantized weight, transposed, in
    fp16; and the format recognised from that DequantizeLinear is the format itself."""
    module = MODULES[name]
    linear = module.read(M, stored(name, weight()), {})
    g = Builder()
    out = module.graph_weight(g, linear, "lin")
    graph = helper.make_graph(g.nodes, "w", [], [helper.make_value_info(out, onnx.TypeProto())], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    (value,) = ReferenceEvaluator(model).run([out], {})
    expected = module.dequantize(linear).t().half().float().numpy()
    np.testing.assert_allclose(value.astype(np.float32), expected, rtol=1e-3, atol=1e-6)

    inits = {t.name: t for t in g.inits}
    dqs = [n for n in g.nodes if n.op_type == "DequantizeLinear" and n.input[0] == f"{M}.weight"]
    quantized_input = WEIGHT_FORMATS[name].act_dtype is not None
    found = weight_formats.recognize(dqs[0], inits[f"{M}.weight"], inits, quantized_input) if dqs else None
    assert found == (None if name == UNQUANTIZED else name)


@pytest.mark.parametrize("name", sorted(n for n, r in WEIGHT_FORMATS.items() if r.act_dtype == "fp8"))
def test_fp8_graph_activation_matches_input_qdq(name):
    """The FP8 activation forms (static, per token, per 128 channels) under onnx.reference against the fake
    quantization the searches use."""
    module = MODULES[name]
    x = (torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1)) * 3).half()
    linear = module.read(M, stored(name, weight()), {})
    g = Builder()
    out = module.graph_activation(g, "x", linear, "lin")
    graph = helper.make_graph(g.nodes, "a", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, 256])],
                              [helper.make_value_info(out, onnx.TypeProto())], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    (value,) = ReferenceEvaluator(model).run([out], {"x": x.numpy()})
    if linear.input_scale is None:  # dynamic: fp32 in the graph, as in the fake quantization
        expected = module.input_qdq(x.float()).half().float().numpy()
    else:  # static: the graph quantizes the fp16 input with an fp16 scale, in fp16 (plain formula)
        s16 = linear.input_scale.half()
        codes = (x / s16).float().clamp(-448, 448).to(torch.float8_e4m3fn)
        expected = (codes.half() * s16).float().numpy()
        # and the searches' fp32 proxy differs from it by at most one FP8 code on a few ties
        proxy = module.input_qdq(x.float(), float(s16) * 448).numpy()
        assert np.mean(np.abs(proxy - expected) > 1e-3) < 0.01
    np.testing.assert_allclose(value.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_rows_name_the_modules_transformers_builds(model_type):
    """Every module a family's row names exists in the `transformers` model of that family (built on the meta
    device), so calibration hooks, smoothing, fusion groups and the exporter find what they look for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family = FAMILIES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == family.architecture
    names = {n for n, _ in model.named_modules()}
    layer = family.layer(1)
    expected = {family.embed_tokens, family.final_norm, family.lm_head, f"{layer}.{family.input_norm}",
                f"{layer}.{family.post_attention_norm}", *(f"{layer}.{p}" for p in family.linears().values())}
    if family.qk_norm:
        expected |= {f"{family.attention_of(1)}.{family.q_norm}", f"{family.attention_of(1)}.{family.k_norm}"}
    assert expected <= names, expected - names
    assert (f"{family.attention_of(1)}.{family.q_norm}" in names) == family.qk_norm
    bias = model.get_submodule(f"{layer}.{family.linears()['q']}").bias is not None
    assert bias == family.has_attention_bias(config.to_dict())
    for source in family.smoothing_sources().values():
        assert f"{layer}.{source}" in names


def test_an_unknown_family_is_refused_by_name():
    with pytest.raises(InputError, match=r"x/config.json: unknown architecture: model_type expected one of .*found "
                                         r"'gemma9'"):
        family_of({"model_type": "gemma9"}, "x/config.json")
