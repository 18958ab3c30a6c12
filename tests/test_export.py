"""The exporter against independent references.

The graph is run with `onnx.reference.ReferenceEvaluator`, the AttentionPlugin node by the plugin's torch reference,
and compared with `transformers` on tiny Llama / Qwen2 / Qwen3 models (prefill with right padding, then a decode step
through the returned KV cache). Files are checked against plain formulas (ml_dtypes FP8) and against each other.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from contract.atomic import MARKER
from contract.checkpoint import open_checkpoint
from contract.embedding import read_embedding_sidecar
from contract.errors import InputError
from llm_loader.export_all_cli import export
from llm_loader.model_config import model_config_from_dict
from plugins.attention.reference import AttentionPlugin

REPO = Path(__file__).resolve().parents[1]


def rope_table(model, length: int) -> np.ndarray:
    """`[1, length, rotary_dim]` = [cos ‖ sin] halves, from transformers' own rotary embedding."""
    positions = torch.arange(length)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return torch.cat([cos[..., :half], sin[..., :half]], dim=-1).float().numpy()


def hf_model(ckpt: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def run_graph(session, llm_config, embeds, lengths, starts, last, pasts, rope):
    feeds = {
        "inputs_embeds": embeds,
        "context_lengths": np.array(lengths, dtype=np.int32),
        "kvcache_start_index": np.array(starts, dtype=np.int32),
        "last_token_ids": np.array(last, dtype=np.int64),
        "rope_rotary_cos_sin": rope,
    }
    feeds.update({f"past_key_values_{i}": p for i, p in enumerate(pasts)})
    names = ["logits"] + [f"present_key_values_{i}" for i in range(llm_config["num_hidden_layers"])]
    logits, *presents = session.run(names, feeds)
    return logits, presents


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"tie_word_embeddings": True}),
     ("qwen3", {"tie_word_embeddings": True, "partial_rotary_factor": 0.5})],
    ids=["llama", "qwen2", "qwen3", "llama-tied", "qwen3-tied-partial-rope"],
)
def test_graph_matches_transformers(tiny_checkpoint, tmp_path, family, overrides):
    """Prefill of a right-padded batch of 2, then one decode step through the KV cache, against HF fp32.

    Tolerance: the graph runs in fp16 (weights and activations), HF in fp32, so the max abs logit difference must be
    below 0.5% of the largest HF logit magnitude (measured: about 0.1%); the greedy token must agree wherever HF's
    top-2 margin exceeds twice the observed difference.
    """
    ckpt = tiny_checkpoint(family, **overrides)
    llm = export(ckpt, tmp_path / "out")
    config = json.loads((llm / "config.json").read_text())
    table = read_embedding_sidecar(llm / "embedding.safetensors").table
    model = hf_model(ckpt)
    session = ReferenceEvaluator(str(llm / "model.onnx"), new_ops=[AttentionPlugin])

    torch.manual_seed(1)
    seq, capacity = 6, 8
    ids = torch.randint(0, config["vocab_size"], (2, seq + 1))
    lengths = [seq, seq - 2]  # row 1 is right-padded
    kv_shape = (2, 2, config["num_key_value_heads"], capacity, config["head_dim"])
    pasts = [np.zeros(kv_shape, np.float16) for _ in range(config["num_hidden_layers"])]
    rope = rope_table(model, capacity)

    logits, presents = run_graph(session, config, table[ids[:, :seq]].numpy(), lengths, [0, 0],
                                 [list(range(seq))] * 2, pasts, rope)
    assert logits.dtype == np.float32 and logits.shape == (2, seq, config["vocab_size"])
    # decode: each row's next token goes at position lengths[b]
    next_ids = torch.stack([ids[b, lengths[b]] for b in range(2)])[:, None]
    step, _ = run_graph(session, config, table[next_ids].numpy(), [1, 1], lengths, [[0], [0]], presents, rope)

    for b, n in enumerate(lengths):
        with torch.no_grad():
            expected = model(ids[b : b + 1, : n + 1]).logits[0].numpy()
        got = np.concatenate([logits[b, :n], step[b]])
        diff = np.abs(got - expected).max()
        assert diff < 5e-3 * np.abs(expected).max()
        top2 = np.sort(expected, axis=-1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * diff
        assert decisive.sum() >= 2
        np.testing.assert_array_equal(got.argmax(-1)[decisive], expected.argmax(-1)[decisive])


def test_output_directory_contract(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen2")
    llm = export(ckpt, tmp_path / "out")
    names = sorted(p.name for p in llm.iterdir())
    assert names == sorted(["model.onnx", "model.onnx.data", "config.json", "embedding.safetensors", "tokenizer.json",
                            "tokenizer_config.json", "chat_template.jinja", MARKER])
    assert json.loads((llm / MARKER).read_text()) == {"kind": "ONNX dir", "files": sorted(names[1:])}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["llm"]  # no temp folder left behind

    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import} == {"": 23, "trt_edgellm": 1}
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(str(llm / "model.onnx"))
    attention = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    assert len(attention) == 2 and all(n.domain == "trt_edgellm" for n in attention)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs == {"inputs_embeds": 10, "context_lengths": 6, "rope_rotary_cos_sin": 1, "kvcache_start_index": 6,
                      "last_token_ids": 7, "past_key_values_0": 10, "past_key_values_1": 10}
    assert [o.name for o in model.graph.output] == ["logits", "present_key_values_0", "present_key_values_1"]

    hf = json.loads((ckpt / "config.json").read_text())
    config = json.loads((llm / "config.json").read_text())
    assert config["model"] == "qwen2" and config["kv_cache_dtype"] == "fp16" and config["contract_version"] == 1
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps"):
        assert config[key] == hf[key]
    assert config["eos_token_id"] == [hf["eos_token_id"]]
    assert config["generation_config"] == json.loads((ckpt / "generation_config.json").read_text())
    assert (llm / "chat_template.jinja").read_text() == (ckpt / "chat_template.jinja").read_text()


def test_fp8_embedding_changes_only_the_sidecar(tiny_checkpoint, tmp_path):
    """Same model.onnx bytes; FP8 table bit-exact against ml_dtypes with H=200 (blocks of 128 and 72)."""
    ckpt = tiny_checkpoint("llama", hidden_size=200, tie_word_embeddings=True)
    fp16_dir = export(ckpt, tmp_path / "fp16")
    fp8_dir = export(ckpt, tmp_path / "fp8", fp8_embedding=True)
    for name in ("model.onnx", "model.onnx.data"):
        assert (fp16_dir / name).read_bytes() == (fp8_dir / name).read_bytes()
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    payload = vocab * 200 + 4 * vocab * 2  # 1 byte per weight + 2 fp32 scales per row
    assert payload <= (fp8_dir / "embedding.safetensors").stat().st_size <= payload + 1024

    with safe_open(str(ckpt / "model.safetensors"), framework="numpy") as f:
        w = f.get_tensor("model.embed_tokens.weight").astype(np.float32)
    blocks = [w[:, j : j + 128] for j in range(0, w.shape[1], 128)]
    scale = np.stack([np.maximum(np.abs(b).max(axis=1), np.float32(1e-4)) / np.float32(448) for b in blocks], axis=1)
    q = np.clip(w / np.repeat(scale, 128, axis=1)[:, : w.shape[1]], -448, 448).astype(ml_dtypes.float8_e4m3fn)

    with safe_open(str(fp8_dir / "embedding.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "fp8_e4m3_row_block", "block_size": "128", "producer": "edgellm-toolchain"}
        table, got_scale = f.get_tensor("embedding"), f.get_tensor("embedding_scale")
    assert table.dtype == torch.float8_e4m3fn and got_scale.dtype == torch.float32
    assert got_scale.shape == (w.shape[0], math.ceil(200 / 128))
    np.testing.assert_array_equal(got_scale.numpy(), scale)
    np.testing.assert_array_equal(table.view(torch.uint8).numpy(), q.view(np.uint8))

    fp16 = read_embedding_sidecar(fp16_dir / "embedding.safetensors")
    assert fp16.format == "fp16" and fp16.scale is None
    np.testing.assert_array_equal(fp16.table.numpy(), w.astype(np.float16))


def resave(src: Path, dst: Path, dtype: torch.dtype, **save_kwargs) -> Path:
    """The same weights saved again by transformers (other dtype / sharded), with the tokenizer files."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dst, **save_kwargs)
    for p in src.iterdir():
        if p.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(p, dst / p.name)
    return dst


def test_sharded_and_fp32_checkpoints_export_the_same_weights(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3")
    sharded = resave(ckpt, tmp_path / "sharded", torch.float16, max_shard_size="1MB")
    fp32 = resave(ckpt, tmp_path / "fp32", torch.float32)  # fp16 values are exact in fp32
    assert (sharded / "model.safetensors.index.json").exists()
    reference = export(ckpt, tmp_path / "a")
    for other in (export(sharded, tmp_path / "b"), export(fp32, tmp_path / "c")):
        for name in ("model.onnx", "model.onnx.data"):
            assert (reference / name).read_bytes() == (other / name).read_bytes(), name
        tables = [read_embedding_sidecar(d / "embedding.safetensors").table for d in (reference, other)]
        assert torch.equal(*tables)  # (safetensors orders header metadata arbitrarily, so not the bytes)


def test_reexport_replaces_previous_output(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "out"
    export(ckpt, out, fp8_embedding=True)
    export(ckpt, out)
    assert read_embedding_sidecar(out / "llm" / "embedding.safetensors").format == "fp16"
    assert sorted(p.name for p in out.iterdir()) == ["llm"]


def test_missing_tensor_leaves_no_output(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.1.mlp.down_proj.weight"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # the temp sibling is gone too


def break_corrupt(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def break_architecture(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


def break_pickle(ckpt: Path) -> None:
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()


def break_remote_code(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))


@pytest.mark.parametrize(
    "breaker, needle",
    [(None, "found nothing"), (break_corrupt, "model.safetensors"), (break_architecture, "unknown architecture"),
     (break_pickle, "pytorch_model.bin"), (break_remote_code, "trust_remote_code")],
    ids=["missing-dir", "corrupt-safetensors", "unknown-architecture", "pickle-only", "remote-code"],
)
def test_bad_input_exits_2_with_one_line(tiny_checkpoint, tmp_path, breaker, needle):
    ckpt = tmp_path / "does-not-exist"
    if breaker is not None:
        ckpt = tiny_checkpoint("llama")
        breaker(ckpt)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "llm_loader.export_all_cli", str(ckpt), str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not out.exists()


def test_usage_error_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llm_loader.export_all_cli", str(tmp_path), str(tmp_path / "o"),
                             "--dtype", "fp32"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "--dtype" in result.stderr


@pytest.mark.slow
def test_smollm2_export_streams_weights(smollm2_checkpoint, tmp_path):
    """Peak RSS of the whole CLI process stays below twice the checkpoint's weight bytes; FP8 sidecar <= 52% of FP16."""
    weights = sum(p.stat().st_size for p in smollm2_checkpoint.glob("*.safetensors"))
    # VmHWM belongs to the process's own address space; ru_maxrss would carry over the pytest parent's across exec
    code = (
        "import re, sys; from llm_loader.export_all_cli import main; rc = main(sys.argv[1:]); "
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(smollm2_checkpoint), str(tmp_path / "out"),
                             "--fp8-embedding"], capture_output=True, text=True, cwd=REPO, check=True)
    peak = int(result.stdout.strip().splitlines()[-1]) * 1024
    assert peak < 2 * weights, f"peak RSS {peak / 2**20:.0f} MiB, weights {weights / 2**20:.0f} MiB"
    llm = tmp_path / "out" / "llm"
    assert (llm / "model.onnx.data").stat().st_size >= weights - 2**20
    vocab, hidden = 49152, 576
    assert (llm / "embedding.safetensors").stat().st_size <= 0.52 * vocab * hidden * 2


def test_bf16_checkpoint_is_cast_to_fp16(tiny_checkpoint, tmp_path):
    bf16 = resave(tiny_checkpoint("qwen2"), tmp_path / "bf16", torch.bfloat16)
    llm = export(bf16, tmp_path / "out")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(llm / "model.onnx")).graph.initializer}
    source = load_file(bf16 / "model.safetensors")
    expected = source["model.layers.1.mlp.down_proj.weight"].to(torch.float16).t().numpy()
    np.testing.assert_array_equal(weights["model.layers.1.mlp.down_proj.weight"], expected)
    k_bias = source["model.layers.0.self_attn.k_proj.bias"].to(torch.float16).numpy()
    q_size = source["model.layers.0.self_attn.q_proj.bias"].shape[0]
    qkv_bias = weights["model.layers.0.self_attn.qkv_proj.bias"]
    np.testing.assert_array_equal(qkv_bias[q_size : q_size + len(k_bias)], k_bias)


def test_pickled_weights_load_only_when_allowed(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    state = load_file(ckpt / "model.safetensors")
    break_pickle(ckpt)
    with pytest.raises(InputError, match="refused"):
        open_checkpoint(ckpt)
    loaded = open_checkpoint(ckpt, allow_pickle=True)
    assert torch.equal(loaded.tensor("model.norm.weight"), state["model.norm.weight"])


def test_quantized_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    with pytest.raises(InputError, match="quantized"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


HF_BASE = dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=4, max_position_embeddings=32)


def test_model_config_reads_both_rope_layouts(tmp_path):
    """transformers-5 `rope_parameters` and the older top-level `rope_theta` / `rope_scaling` give the same config."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    new = model_config_from_dict({**HF_BASE, "rope_parameters": {"rope_theta": 5e5, **llama3}}, tmp_path)
    old = model_config_from_dict({**HF_BASE, "rope_theta": 5e5, "rope_scaling": llama3}, tmp_path)
    assert new == old and new.rope_scaling == llama3 and new.rope_theta == 5e5
    assert new.head_dim == 16 and new.num_key_value_heads == 4 and not new.attention_bias
    plain = model_config_from_dict({**HF_BASE, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"},
                                    "partial_rotary_factor": 0.5}, tmp_path)
    assert plain.rope_scaling is None and plain.rotary_dim == 8
    assert model_config_from_dict({**HF_BASE, "model_type": "qwen2"}, tmp_path).attention_bias
    with pytest.raises(InputError, match="unknown architecture.*'mistral'"):
        model_config_from_dict({**HF_BASE, "model_type": "mistral"}, tmp_path)
    with pytest.raises(InputError, match="num_key_value_heads"):
        model_config_from_dict({**HF_BASE, "num_key_value_heads": 3}, tmp_path)


def test_eos_and_chat_template_fallbacks(tiny_checkpoint, tmp_path):
    """eos_token_id from generation_config.json and the chat template from tokenizer_config.json, as older
    checkpoints keep them."""
    ckpt = tiny_checkpoint("llama")
    config = json.loads((ckpt / "config.json").read_text())
    del config["eos_token_id"]
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    template = (ckpt / "chat_template.jinja").read_text()
    (ckpt / "chat_template.jinja").unlink()
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": template}))

    llm = export(ckpt, tmp_path / "out")
    runtime = json.loads((llm / "config.json").read_text())
    assert runtime["eos_token_id"] == [2, 7] and runtime["generation_config"] == {"eos_token_id": [2, 7]}
    assert (llm / "chat_template.jinja").read_text() == template
