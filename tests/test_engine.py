"""runtime.rope and runtime.engine against transformers (the independent reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import (
    assert_logits_close,
    export_and_build,
    forward_rows,
    hf_model,
    make_fp8_kv,
    make_tiny_checkpoint,
    tokens,
)
from safetensors.torch import load_file
from transformers import DynamicCache

from contract.errors import InputError
from contract.formats import dequantize_fp8_row_block
from examples.eagle.draft_model import cache_kwargs
from runtime.engine import Engine
from runtime.rope import rope_cos_sin

ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: s["rope_type"] if s else "default")
def test_rope_table_matches_hf_rotary_embedding(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    runtime = dict(model="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=512, rope_theta=5000.0, rope_scaling=scaling, partial_rotary_factor=1.0)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=512, rope_parameters={"rope_theta": 5000.0, **(scaling or {"rope_type": "default"})})
    length = 300
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    table = rope_cos_sin(runtime, length)
    assert table.shape == (1, length, 16) and table.dtype == np.float32
    # HF computes the angles in fp32 (error ~ulp(300 rad) = 3e-5, times a few in cos/sin); ours in fp64
    np.testing.assert_allclose(table[0, :, :8], cos[0, :, :8].numpy(), rtol=0, atol=3e-4)
    np.testing.assert_allclose(table[0, :, 8:], sin[0, :, :8].numpy(), rtol=0, atol=3e-4)
    if scaling and scaling["rope_type"] == "yarn":  # attention_scaling is folded in
        assert abs(table[0, 0, 0] - 1.0) > 1e-3


# --- Engine on tiny exports, against transformers -------------------------------------------------------------------


FAMILIES = ("llama", "qwen2", "qwen3")
CAPACITY = 64


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_checkpoint) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, engine dir) for each family, plus llama with an FP8 embedding table."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for family in FAMILIES:
        ckpt = make_tiny_checkpoint(family, root / f"ckpt-{family}", smollm2_checkpoint)
        out[family] = (ckpt, export_and_build(ckpt, root / family, max_kv_cache_capacity=CAPACITY)[1])
    llama = out["llama"][0]
    out["llama-fp8emb"] = (llama, export_and_build(llama, root / "llama-fp8emb", fp8_embedding=True,
                                                   max_kv_cache_capacity=CAPACITY)[1])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_transformers(built, family):
    ckpt, eng = built[family]
    engine, hf = Engine.load(eng), hf_model(ckpt)
    ids = tokens(12)
    cache = engine.new_cache(1)
    prefill = forward_rows(engine, cache, [ids[:5]], all_logits=True)
    past = DynamicCache(config=hf.config)  # transformers' own cache, filled in place
    with torch.no_grad():
        out = hf(torch.tensor(ids[None, :5], dtype=torch.long), use_cache=True, **cache_kwargs(hf, past))
    assert_logits_close(prefill, out.logits.numpy())
    for t in range(5, 12):
        step = forward_rows(engine, cache, [ids[t:t + 1]])
        with torch.no_grad():
            out = hf(torch.tensor([[ids[t]]], dtype=torch.long), use_cache=True, **cache_kwargs(hf, past))
        assert_logits_close(step, out.logits.numpy())
    assert cache.lengths.tolist() == [12]
    # the cache holds transformers' post-RoPE keys and values, K first
    ours = engine.read_kv(cache, 0, np.arange(12))
    ref = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in past.layers]).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=0.005 * float(np.abs(ref).max()))


def test_batch_of_two_lengths_equals_each_row_alone(built):
    engine = Engine.load(built["llama"][1])
    a, b = tokens(9, seed=1), tokens(6, seed=2)
    batch = engine.new_cache(2)
    got = [forward_rows(engine, batch, [a[:7], b[:3]])]
    got += [forward_rows(engine, batch, [a[t:t + 1], b[t - 4:t - 3]]) for t in (7, 8)]  # rows at different positions
    for row, (prompt, rest) in enumerate(((a[:7], a[7:9]), (b[:3], b[3:5]))):
        alone = engine.new_cache(1)
        expected = [forward_rows(engine, alone, [prompt])] + [forward_rows(engine, alone, [rest[i:i + 1]]) for i in range(2)]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g[row], e[0], rtol=0, atol=1e-2 * float(np.abs(e).max()))
        cached = np.arange(alone.lengths[0])
        np.testing.assert_array_equal(engine.read_kv(batch, row, cached), engine.read_kv(alone, 0, cached))
    assert batch.lengths.tolist() == [9, 5]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunks_on_top_of_a_prefix_equal_one_prefill(built, family):
    """Rows of different lengths sent in two right-padded chunks (the second on top of each row's own prefix)
    give the same logits and cache as each whole prompt in one call."""
    engine = Engine.load(built[family][1])
    a, b = tokens(11, seed=6), tokens(7, seed=7)
    chunked = engine.new_cache(2)
    forward_rows(engine, chunked, [a[:6], b[:2]])
    got = forward_rows(engine, chunked, [a[6:], b[2:]], all_logits=True)
    whole = engine.new_cache(2)
    want = forward_rows(engine, whole, [a, b], all_logits=True)
    for row, (done, n) in enumerate(((6, 11), (2, 7))):
        np.testing.assert_allclose(got[row, :n - done], want[row, done:n], rtol=0, atol=1e-3 * float(np.abs(want).max()))
        np.testing.assert_allclose(engine.read_kv(chunked, row, np.arange(n)), engine.read_kv(whole, row, np.arange(n)),
                                   rtol=0, atol=1e-4)
    assert chunked.lengths.tolist() == [11, 7]


def test_a_padded_call_that_does_not_fit_the_cache_is_refused(built):
    engine = Engine.load(built["llama"][1])
    cache = engine.new_cache(2)
    forward_rows(engine, cache, [tokens(1), tokens(2)])
    cache.lengths[:] = [CAPACITY - 1, 2]  # row 0 has room for one more token only
    with pytest.raises(InputError, match="row 0 holds 63 tokens; a call padded to 3 tokens"):
        engine.forward(cache, np.zeros((2, 3), np.int32), np.array([1, 3], np.int32), np.zeros((2, 1), np.int64))
    assert cache.lengths.tolist() == [CAPACITY - 1, 2]


def test_a_finished_row_sits_a_step_out(built):
    engine = Engine.load(built["llama"][1])
    cache = engine.new_cache(2)
    forward_rows(engine, cache, [tokens(4), tokens(4, seed=3)])
    everywhere = np.arange(CAPACITY)
    before = engine.read_kv(cache, 1, everywhere)
    ids = np.array([[5], [0]], np.int32)
    engine.forward(cache, ids, np.array([1, 0], np.int32), np.zeros((2, 1), np.int64))
    assert cache.lengths.tolist() == [5, 4]
    np.testing.assert_array_equal(engine.read_kv(cache, 1, everywhere), before)


def test_kv_written_into_another_row_continues_like_the_original(built):
    """write_kv of one row's K/V (as read_kv gives them) into a row of another cache: that row then decodes as the
    original does, since the cache is all the state a row has (what moving accepted tokens' K/V relies on)."""
    engine = Engine.load(built["llama"][1])
    a, b = tokens(7, seed=8), tokens(3, seed=9)
    src = engine.new_cache(1)
    forward_rows(engine, src, [a[:6]])
    kv = engine.read_kv(src, 0, np.arange(6))
    np.testing.assert_array_equal(engine.read_kv(src, 0, [4, 1]), kv[:, :, :, [4, 1]])
    dst = engine.new_cache(2)
    forward_rows(engine, dst, [b, b])  # row 1 holds other tokens, overwritten below
    row0 = engine.read_kv(dst, 0, np.arange(CAPACITY))
    engine.write_kv(dst, 1, 0, kv)
    dst.lengths[1] = 6
    np.testing.assert_array_equal(engine.read_kv(dst, 1, np.arange(6)), kv)
    np.testing.assert_array_equal(engine.read_kv(dst, 0, np.arange(CAPACITY)), row0)
    want, got = forward_rows(engine, src, [a[6:]]), forward_rows(engine, dst, [b[:1], a[6:]])
    np.testing.assert_allclose(got[1], want[0], rtol=0, atol=1e-3 * float(np.abs(want).max()))
    with pytest.raises(InputError, match=r"row: expected 0\.\.1, found 2"):
        engine.read_kv(dst, 2, [0])
    with pytest.raises(InputError, match=rf"positions: expected indices in \[0, {CAPACITY}\)"):
        engine.read_kv(dst, 0, [CAPACITY])
    with pytest.raises(InputError, match=r"values: expected \[2, 2, 2, n, 16\], found \[2, 2, 2, 6\]"):
        engine.write_kv(dst, 0, 0, kv[..., 0])
    with pytest.raises(InputError, match="start: expected 6 positions from start within the capacity"):
        engine.write_kv(dst, 0, CAPACITY - 5, kv)


def test_fp16_embedding_lookup_is_the_table_row(built):
    engine = Engine.load(built["llama"][1])
    table = load_file(engine.engine_dir / "embedding.safetensors")["embedding"]
    ids = np.array([[0, 5, 49151], [17, 17, 3]], np.int32)
    np.testing.assert_array_equal(engine.embed(ids), table[torch.from_numpy(ids).long()].numpy())


def test_fp8_embedding_lookup_is_the_dequant_formula(built):
    engine = Engine.load(built["llama-fp8emb"][1])
    sidecar = load_file(engine.engine_dir / "embedding.safetensors")
    ids = np.array([[0, 5, 49151], [17, 17, 3]], np.int32)
    rows = torch.from_numpy(ids.reshape(-1)).long()
    expected = dequantize_fp8_row_block(sidecar["embedding"][rows], sidecar["embedding_scale"][rows]).half()
    np.testing.assert_array_equal(engine.embed(ids), expected.reshape(2, 3, -1).numpy())
    graph = onnx.load(str(engine.engine_dir / "embedding.onnx"), load_external_data=False).graph
    tables = [t for t in graph.initializer if list(t.dims) == [49152, 64]]  # the table stays FP8 at rest
    assert [t.data_type for t in tables] == [onnx.TensorProto.FLOAT8E4M3FN]


def test_out_of_range_ids_and_overfull_cache_are_input_errors(built):
    engine = Engine.load(built["llama"][1])
    with pytest.raises(InputError, match="49152"):
        engine.embed(np.array([[1, 49152]], np.int32))
    with pytest.raises(InputError, match="-1"):
        engine.embed(np.array([[-1]], np.int32))
    cache = engine.new_cache(1)
    cache.lengths[:] = CAPACITY - 2
    with pytest.raises(InputError, match="capacity"):
        forward_rows(engine, cache, [tokens(3)])
    with pytest.raises(InputError, match="max_batch_size"):
        engine.new_cache(3)


def test_load_rejects_what_is_not_a_complete_matching_engine_dir(built, tmp_path):
    eng = built["llama"][1]
    with pytest.raises(InputError, match="not an engine directory"):
        Engine.load(tmp_path)
    onnx_dir = eng.parent / "onnx" / "llm"
    with pytest.raises(InputError, match="builder_config"):
        Engine.load(onnx_dir)
    copy = Path(shutil.copytree(eng, tmp_path / "eng"))
    (copy / "llm.onnx").unlink()
    with pytest.raises(InputError, match="llm.onnx is missing"):
        Engine.load(copy)
    copy = Path(shutil.copytree(eng, tmp_path / "eng2"))
    config = json.loads((copy / "config.json").read_text())
    config["kv_cache_dtype"] = config["builder_config"]["kv_cache_dtype"] = "fp8"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="past_key_values dtype is 'fp16'"):
        Engine.load(copy)
    config["builder_config"]["contract_version"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="contract_version"):
        Engine.load(copy)


def test_fp8_kv_cache_holds_fp8_of_the_fp16_engines_keys(built, tmp_path):
    ckpt, fp16_eng = built["llama"]
    _, fp8_eng = export_and_build(ckpt, tmp_path, edit=make_fp8_kv, max_kv_cache_capacity=CAPACITY)
    fp8, fp16 = Engine.load(fp8_eng), Engine.load(fp16_eng)
    c8, c16 = fp8.new_cache(2), fp16.new_cache(2)
    assert c8.dtype == "fp8" and fp8.read_kv(c8, 0, [0]).dtype == np.uint8
    assert c8.nbytes * 4 == c16.nbytes  # one byte per value; the CPU engine holds an fp16 cache in fp32
    rows = [tokens(6), tokens(4, seed=5)]
    l8, l16 = forward_rows(fp8, c8, rows), forward_rows(fp16, c16, rows)
    # layer 0's K/V do not depend on the cache, so they are exactly fp8(the fp16 engine's value / 1.0) (scales are 1)
    for row in range(2):
        first = np.arange(6)
        expected = torch.from_numpy(fp16.read_kv(c16, row, first)[0]).clamp(-448, 448).to(torch.float8_e4m3fn)
        np.testing.assert_array_equal(fp8.read_kv(c8, row, first)[0], expected.view(torch.uint8).numpy())
    np.testing.assert_allclose(l8, l16, rtol=0, atol=0.1 * float(np.abs(l16).max()))


@pytest.mark.slow
def test_smollm2_prefill_and_decode_match_transformers(smollm2_checkpoint, tmp_path):
    _, engine_dir = export_and_build(smollm2_checkpoint, tmp_path, max_batch_size=1, max_input_len=64,
                                     max_kv_cache_capacity=128)
    engine = Engine.load(engine_dir)
    hf = hf_model(smollm2_checkpoint)
    ids = tokens(24, seed=7)
    cache = engine.new_cache(1)
    got = [forward_rows(engine, cache, [ids[:16]], all_logits=True)] + [forward_rows(engine, cache, [ids[t:t + 1]]) for t in range(16, 24)]
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
    assert_logits_close(np.concatenate(got, axis=1), ref)
