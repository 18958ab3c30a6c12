"""AttentionPlugin: torch reference vs an independent per-token loop (HF RoPE / RMSNorm), and the ORT lowering (as
llm-build ships it: lowered, widened to fp32) vs the reference under the ORT engine KV contract, in both its forms
(the whole cache updated in place; prefix in, this call's K/V out)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from contract.errors import InputError
from contract.formats import FP8_MAX, to_fp8
from plugins.attention import schema
from plugins.attention.reference import attention_reference
from plugins.lowering import lower_for_onnxruntime, widen_to_fp32

HQ, HKV, D, CAPACITY = 4, 2, 16, 12
SCALES = (0.02, 0.03, 0.025)  # q, k, v dequant scales for FP8 KV

# (seq_len, context_lengths, kvcache_start_index): a prefill over a filled prefix and a decode step
CASES = {
    "first_prefill": (5, [5, 3], [0, 0]),
    "prefill": (5, [5, 3], [0, 4]),
    "decode": (1, [1, 1], [6, 9]),
}


def rope_table(length: int, rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = torch.arange(length).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)[None]  # [1, R, rd]


def make_attrs(fp8: bool, qk_norm: bool) -> schema.AttentionAttrs:
    node = make_node(fp8, qk_norm)
    return schema.read_attrs(node)


def make_node(fp8: bool, qk_norm: bool, tree: bool = False) -> onnx.NodeProto:
    inputs = ["qkv", "past", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index"]
    inputs += ["q_norm", "k_norm"] if qk_norm else []
    inputs += ["attention_mask", "attention_pos_id"] if tree else []
    return schema.make_node(
        inputs, ["attn", "present"], name="layer0", num_q_heads=HQ, num_kv_heads=HKV, head_size=D,
        enable_fp8_kv_cache=fp8, qkv_scales=SCALES if fp8 else (1.0, 1.0, 1.0), enable_qk_norm=qk_norm,
        rms_norm_eps=1e-6, enable_tree_attention=tree,
    )


def make_inputs(seq: int, lengths: list[int], starts: list[int], fp8: bool, rotary_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    qkv = torch.randn(b, seq, (HQ + 2 * HKV) * D, generator=gen).half()
    past = torch.randn(b, 2, HKV, CAPACITY, D, generator=gen) * 0.5
    past = to_fp8(past, 0.02) if fp8 else past.half()  # FP8 bytes whose dequant is ~N(0, .5)
    gammas = (torch.rand(D, generator=gen) + 0.5).half(), (torch.rand(D, generator=gen) + 0.5).half()
    return qkv, past, torch.tensor(lengths, dtype=torch.int32), rope_table(CAPACITY + 4, rotary_dim), torch.tensor(starts, dtype=torch.int32), gammas


@torch.no_grad()
def plain_attention(qkv, past, lengths, rope, starts, gammas, *, fp8: bool, qk_norm: bool, rotary_dim: int):
    """Token by token with HF's apply_rotary_pos_emb / Qwen3RMSNorm and ml_dtypes FP8: the independent oracle."""
    b, s, _ = qkv.shape
    q_scale, k_scale, v_scale = SCALES
    attn = torch.zeros(b, s, HQ, D, dtype=torch.float16)
    present = past.clone()

    def quant(x, scale):  # -> (fp32 value, bytes)
        q = np.clip(x.float().numpy() / np.float32(scale), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        return torch.from_numpy(q.astype(np.float32)), torch.from_numpy(q.view(np.uint8).copy())

    norms = []
    for gamma in gammas:
        norm = Qwen3RMSNorm(D, eps=1e-6).half()
        norm.weight.data = gamma
        norms.append(norm)
    for row in range(b):
        start, n = int(starts[row]), int(lengths[row])
        keys = [past[row, 0, :, j] for j in range(start)]  # each [Hkv, D], cache dtype
        values = [past[row, 1, :, j] for j in range(start)]
        for i in range(n):
            q, k, v = qkv[row, i].split([HQ * D, HKV * D, HKV * D])
            q, k, v = q.view(HQ, D), k.view(HKV, D), v.view(HKV, D)
            if qk_norm:
                q, k = norms[0](q), norms[1](k)
            cos, sin = rope[0, start + i].chunk(2)
            cos, sin = torch.cat([cos, cos])[None, None], torch.cat([sin, sin])[None, None]  # HF layout
            q_rot, k_rot = apply_rotary_pos_emb(q.float()[None, :, None, :rotary_dim], k.float()[None, :, None, :rotary_dim], cos, sin)
            q = torch.cat([q_rot[0, :, 0], q.float()[:, rotary_dim:]], -1).half()
            k = torch.cat([k_rot[0, :, 0], k.float()[:, rotary_dim:]], -1).half()
            if fp8:
                (_, k_bytes), (_, v_bytes) = quant(k, k_scale), quant(v, v_scale)
                k, v = k_bytes.view(torch.float8_e4m3fn), v_bytes.view(torch.float8_e4m3fn)
                q = (quant(q, q_scale)[0] * q_scale).half()
            present[row, 0, :, start + i], present[row, 1, :, start + i] = k, v
            keys.append(k)
            values.append(v)
            for h in range(HQ):
                kv_h = h // (HQ // HKV)
                key = torch.stack([x[kv_h].float() for x in keys]) * (k_scale if fp8 else 1.0)
                val = torch.stack([x[kv_h].float() for x in values]) * (v_scale if fp8 else 1.0)
                weights = torch.softmax(key @ q[h].float() / math.sqrt(D), dim=0)
                attn[row, i, h] = (weights @ val).half()
    return attn, present


PARAMS = [  # (fp8 KV, qk-norm, rotary_dim)
    (False, False, D),
    (False, True, D),
    (True, False, D),
    (True, True, D // 2),
    (False, False, D // 2),
]


@pytest.mark.parametrize("fp8,qk_norm,rotary_dim", PARAMS)
@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_reference_matches_plain_loop(case, fp8, qk_norm, rotary_dim):
    seq, lengths, starts = CASES[case]
    qkv, past, lens, rope, st, gammas = make_inputs(seq, lengths, starts, fp8, rotary_dim)
    attrs = make_attrs(fp8, qk_norm)
    attn, present = attention_reference(qkv, past, lens, rope, st, *(gammas if qk_norm else ()), attrs=attrs)
    want_attn, want_present = plain_attention(qkv, past, lens, rope, st, gammas, fp8=fp8, qk_norm=qk_norm, rotary_dim=rotary_dim)
    assert present.dtype == past.dtype and present.shape == past.shape
    if fp8:
        assert torch.equal(present.view(torch.uint8), want_present.view(torch.uint8))
    else:
        torch.testing.assert_close(present, want_present, atol=2e-3, rtol=0)
    torch.testing.assert_close(attn.float(), want_attn.float(), atol=2e-3, rtol=0)
    for row, n in enumerate(lengths):  # right padding rows are zeros
        assert not attn[row, n:].any()


def single_node_model(fp8: bool, qk_norm: bool, rotary_dim: int, tree: bool = False) -> onnx.ModelProto:
    """One AttentionPlugin node as a model (with the tree inputs when `tree`)."""
    kv_type = TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.FLOAT16
    vi = helper.make_tensor_value_info
    inputs = [
        vi("qkv", TensorProto.FLOAT16, ["batch", "seq_len", (HQ + 2 * HKV) * D]),
        vi("past", kv_type, ["batch", 2, HKV, "kv_len", D]),
        vi("context_lengths", TensorProto.INT32, ["batch"]),
        vi("rope_rotary_cos_sin", TensorProto.FLOAT, [1, "rope_len", rotary_dim]),
        vi("kvcache_start_index", TensorProto.INT32, ["batch"]),
    ] + ([vi("q_norm", TensorProto.FLOAT16, [D]), vi("k_norm", TensorProto.FLOAT16, [D])] if qk_norm else [])
    inputs += [vi("attention_mask", TensorProto.INT32, ["batch", "seq_len", "mask_words"]),
               vi("attention_pos_id", TensorProto.INT32, ["batch", "seq_len"])] if tree else []
    outputs = [vi("attn", TensorProto.FLOAT16, ["batch", "seq_len", HQ, D]), vi("present", kv_type, ["batch", 2, HKV, "kv_len", D])]
    graph = helper.make_graph([make_node(fp8, qk_norm, tree)], "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), schema.OPSET])


def ort_value(t: torch.Tensor) -> ort.OrtValue:
    if t.dtype == torch.float8_e4m3fn:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(), TensorProto.FLOAT8E4M3FN)
    return ort.OrtValue.ortvalue_from_numpy(t.contiguous().numpy())


def lowered_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The lowering as llm-build ships it: lowered, then widened to fp32 compute."""
    lowered = widen_to_fp32(lower_for_onnxruntime(model), {"qkv", "qkv1", "q_norm", "k_norm"})
    onnx.checker.check_model(lowered)
    return ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])


def run_lowered(session: ort.InferenceSession, feeds: dict, caches: dict[str, torch.Tensor], starts, seq: int):
    """Run under the ORT engine KV contract; returns the outputs by name plus, per cache, this call's K/V
    `[B,2,Hkv,S,D]` and the whole cache after the call (None for the prefix form, which does not hold one)."""
    kinds = {o.name: o.shape[2] for o in session.get_outputs() if o.name.endswith((".key", ".value"))}
    in_place = set(kinds.values()) == {"kv_capacity"}
    binding, held, bound = session.io_binding(), {}, []
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort_value(value))
    for past, cache in caches.items():
        present, held[past] = "present" + past[len("past"):], {}
        for j, kind in enumerate(("key", "value")):
            half = cache[:, j]
            if in_place:  # the whole cache (fp16 held as fp32), updated in the same buffer
                held[past][kind] = half.float().numpy().copy()
                value = ort.OrtValue.ortvalue_from_numpy(held[past][kind])
                binding.bind_ortvalue_input(f"{past}.{kind}", value)
                binding.bind_ortvalue_output(f"{present}.{kind}", value)
                bound.append(f"{present}.{kind}")
            else:
                prefix = half[:, :, : max(starts)].contiguous()
                binding.bind_ortvalue_input(f"{past}.{kind}", ort_value(prefix.float() if half.dtype == torch.float16 else prefix))
                binding.bind_output(f"{present}.{kind}")
                bound.append(f"{present}.{kind}")
    for o in session.get_outputs():
        if not o.name.endswith((".key", ".value")):
            binding.bind_output(o.name)
            bound.append(o.name)
    session.run_with_iobinding(binding)
    got = dict(zip(bound, (v.numpy() for v in binding.get_outputs())))
    results = {}
    for past in caches:
        present = "present" + past[len("past"):]
        if in_place:
            k, v = held[past]["key"], held[past]["value"]
            new = np.stack([np.stack([k[b, :, s:s + seq], v[b, :, s:s + seq]]) for b, s in enumerate(starts)])
            results[past] = (new, np.stack([k, v], axis=1))
        else:
            results[past] = (np.stack([got[f"{present}.key"], got[f"{present}.value"]], axis=1), None)
    return got, results


@pytest.mark.parametrize("fp8,qk_norm,rotary_dim", PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_ort_lowering_matches_reference(case, fp8, qk_norm, rotary_dim):
    seq, lengths, starts = CASES[case]
    qkv, past, lens, rope, st, gammas = make_inputs(seq, lengths, starts, fp8, rotary_dim, seed=1)
    attn, present = attention_reference(qkv, past, lens, rope, st, *(gammas if qk_norm else ()), attrs=make_attrs(fp8, qk_norm))

    session = lowered_session(single_node_model(fp8, qk_norm, rotary_dim))
    feeds = {"qkv": qkv, "context_lengths": lens, "rope_rotary_cos_sin": rope, "kvcache_start_index": st}
    if qk_norm:
        feeds.update(q_norm=gammas[0], k_norm=gammas[1])
    got, results = run_lowered(session, feeds, {"past": past}, starts, seq)
    got_new, cache_after = results["past"]
    # fp16 KV without FP8 and with a RoPE width GQA takes (a multiple of 16) runs in place; the rest as prefix form
    assert (cache_after is not None) == (not fp8 and rotary_dim % 16 == 0)
    assert got_new.shape == (len(lengths), 2, HKV, seq, D)
    for row, (n, start) in enumerate(zip(lengths, starts)):
        want_new = present[row, :, :, start : start + n]
        if fp8:  # FP8 outputs come back as their bytes; fp32 compute may round K/V across an FP8 step, rarely
            assert got_new.dtype == np.uint8
            got_bytes, want_bytes = got_new[row, :, :, :n], want_new.view(torch.uint8).numpy()
            decode = lambda a: a.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            np.testing.assert_allclose(decode(got_bytes), decode(want_bytes), rtol=0.13, atol=2**-9)
            assert (got_bytes != want_bytes).mean() < 0.02
        else:
            # the reference rounds K/V to fp16 after the norm and after RoPE; the engine keeps them fp32
            np.testing.assert_allclose(got_new[row, :, :, :n], want_new.float().numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(got["attn"][row, :n], attn[row, :n].float().numpy(), atol=2e-2 if fp8 else 1e-2, rtol=0)
        assert not got["attn"][row, n:].any()
    if cache_after is not None:  # in place: every slot but this call's is untouched
        untouched = np.ones(cache_after.shape, bool)
        for row, (n, start) in enumerate(zip(lengths, starts)):
            untouched[row, :, :, start : start + n] = False
        np.testing.assert_array_equal(cache_after[untouched], past.float().numpy()[untouched])


def test_in_place_form_with_an_idle_row_at_full_capacity():
    """A row that sits a decode step out with a full cache: the other row decodes, the idle row's cache stays."""
    seq, lengths, starts = 1, [1, 0], [5, CAPACITY]
    qkv, past, lens, rope, st, _ = make_inputs(seq, lengths, starts, False, D, seed=4)
    attn, _ = attention_reference(qkv, past, lens, rope, st, attrs=make_attrs(False, False))
    session = lowered_session(single_node_model(False, False, D))
    feeds = {"qkv": qkv, "context_lengths": lens, "rope_rotary_cos_sin": rope, "kvcache_start_index": st}
    got, results = run_lowered(session, feeds, {"past": past}, [5, 0], seq)  # (where to read each row's new K/V)
    np.testing.assert_allclose(got["attn"][0], attn[0].float().numpy(), atol=1e-2, rtol=0)
    np.testing.assert_array_equal(results["past"][1][1], past[1].float().numpy())


def test_quantize_linear_saturate_matches_to_fp8_bit_exactly():
    """The lowering's QuantizeLinear(saturate=1) is the contract's fp8(clamp(x / scale, ±448))."""
    x = torch.cat([torch.randn(4096) * 30, torch.tensor([1e6, -1e6, 448.0 * 0.03, 0.0, -0.0, 1e-9])])
    scale = 0.03
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["y"], output_dtype=TensorProto.FLOAT8E4M3FN, saturate=1)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [None])],
                              initializer=[onnx.numpy_helper.from_array(np.float32(scale), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got.view(np.uint8), to_fp8(x, scale).view(torch.uint8).numpy())


@pytest.mark.parametrize("fp8", [False, True])
def test_lowering_rewrites_kv_io_and_opsets(fp8):
    lowered = lower_for_onnxruntime(single_node_model(fp8, False, D))
    assert {o.domain for o in lowered.opset_import} == {"", "com.microsoft"}
    assert not any(n.domain == schema.DOMAIN for n in lowered.graph.node)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*lowered.graph.input, *lowered.graph.output]}
    past, present = ("past_len", "seq_len") if fp8 else ("kv_capacity", "kv_capacity")
    for kind in ("key", "value"):
        assert dims[f"past.{kind}"] == ["batch", HKV, past, D]
        assert dims[f"present.{kind}"] == ["batch", HKV, present, D]
    assert "past" not in dims and "present" not in dims


def test_unsupported_attributes_raise_input_error():
    node = make_node(False, False)
    for attr, value in (("sliding_window_size", 128), ("enable_tree_attention", 1)):
        bad = onnx.NodeProto.FromString(node.SerializeToString())
        next(a for a in bad.attribute if a.name == attr).i = value
        with pytest.raises(InputError, match=f"layer0.*{attr}"):
            schema.read_attrs(bad)


def test_widen_to_fp32_computes_the_fp16_graph_in_fp32():
    """fp16 input kept (cast on entry), fp16 weight cast once, Cast-to-fp16 retargeted, fp16 outputs retyped: the
    result is the fp32 product of the fp16 values, which the fp16 graph would have rounded."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 64)).astype(np.float16), rng.standard_normal((64, 5)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y16"]), helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, 5])],
                              initializer=[onnx.numpy_helper.from_array(w, "w")])
    widened = widen_to_fp32(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), {"x"})
    onnx.checker.check_model(widened, full_check=True)
    assert widened.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert widened.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    got = ReferenceEvaluator(widened).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want.astype(np.float16) - want).max() > 1e-3  # so fp16 rounding would have been visible


def test_unknown_custom_op_raises_input_error():
    node = helper.make_node("Mystery", ["x"], ["y"], name="m0", domain=schema.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(InputError, match="Mystery"):
        lower_for_onnxruntime(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), schema.OPSET]))


@pytest.mark.parametrize("fp8", [False, True])
def test_layers_share_the_per_graph_tensors(fp8):
    """Two layers in one graph: the per-graph tensors (RoPE tables, masks) are built once; both layers stay exact."""
    model = single_node_model(fp8, False, D)
    second = make_node(fp8, False)
    second.name = "layer1"
    second.input[0], second.input[1], second.output[0], second.output[1] = "qkv1", "past1", "attn1", "present1"
    model.graph.node.append(second)
    for source, name in ((0, "qkv1"), (1, "past1")):  # each layer its own qkv and cache, as in a real graph
        model.graph.input.append(onnx.ValueInfoProto.FromString(model.graph.input[source].SerializeToString()))
        model.graph.input[-1].name = name
    for name in ("attn1", "present1"):
        model.graph.output.append(onnx.ValueInfoProto.FromString(model.graph.output[0 if name == "attn1" else 1].SerializeToString()))
        model.graph.output[-1].name = name
    lowered = lower_for_onnxruntime(model)
    shared = [n for n in lowered.graph.node if n.name.startswith("attention_shared/")]
    assert sum(n.op_type == "Range" for n in shared) == (2 if fp8 else 1)
    assert sum(n.op_type == ("RotaryEmbedding" if fp8 else "GroupQueryAttention") for n in lowered.graph.node) == 2

    seq, lengths, starts = CASES["prefill"]
    qkv, past, lens, rope, st, _ = make_inputs(seq, lengths, starts, fp8, D, seed=2)
    past1 = make_inputs(seq, lengths, starts, fp8, D, seed=3)[1]
    session = lowered_session(model)
    feeds = {"qkv": qkv, "qkv1": qkv, "context_lengths": lens, "rope_rotary_cos_sin": rope, "kvcache_start_index": st}
    got, _ = run_lowered(session, feeds, {"past": past, "past1": past1}, starts, seq)
    for attn_name, cache in (("attn", past), ("attn1", past1)):
        want, _ = attention_reference(qkv, cache, lens, rope, st, attrs=make_attrs(fp8, False))
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(got[attn_name][row, :n], want[row, :n].float().numpy(), atol=2e-2 if fp8 else 1e-2,
                                       rtol=0)
