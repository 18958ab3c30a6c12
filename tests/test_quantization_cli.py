"""`python -m quantization llm` end to end on tiny models: files, formats read back, calibrated KV scales, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CliResult, run_cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_loader.quantized_checkpoint import dequantize_linear, read_quantized_checkpoint
from quantization.cli import main
from quantization.options import LlmOptions
from quantization.pipeline import quantize_llm

TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles.",
    "Now is the winter of our discontent.",
    "All the world's a stage, and all the men and women merely players; they have their exits and their entrances.",
]
FAST = ["--num_samples", "3", "--max_seq_len", "32", "--batch_size", "3"]


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    return path


def quantize(ckpt: Path, out: Path, texts: Path, *extra: str) -> Path:
    code, _, err = run_cli(main, "llm", "--model_dir", ckpt, "--output_dir", out, "--text_dataset", texts, *FAST,
                           *extra)
    assert code == 0, err
    return out


# relative error bound of each format's dequantized weight, against the tile/row/tensor amax
BOUNDS = {"fp8": 2**-4, "fp8_pc": 2**-4, "fp8_block": 2**-4, "nvfp4": 1 / 6}


@pytest.mark.parametrize("method", ["fp8", "fp8_pc", "fp8_block", "nvfp4"])
def test_quantize_and_read_back(tiny_checkpoint, tmp_path, texts_file, method):
    ckpt = tiny_checkpoint("llama")
    # the format round trip, without the methods that change the weights on purpose (tests/test_quantization_methods)
    out = quantize(ckpt, tmp_path / "q", texts_file, "--quantization", method, "--smoothing", "none", "--no-gptq")
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json", "quantization_report.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp sibling left

    original = load_file(ckpt / "model.safetensors")
    qc = read_quantized_checkpoint(out)
    expected_format = {"fp8": "fp8", "fp8_pc": "fp8_pc", "fp8_block": "fp8_block", "nvfp4": "nvfp4"}[method]
    layer_linears = [n for n in qc.linears if ".layers." in n]
    assert len(layer_linears) == 2 * 7
    for name in layer_linears:
        lin = qc.linears[name]
        assert lin.format == expected_format
        w = original[f"{name}.weight"].float()
        deq = dequantize_linear(lin)
        assert deq.shape == w.shape
        err = (deq - w).abs().max() / w.abs().max()
        assert 0 < err <= BOUNDS[method], (name, float(err))
    assert qc.linears["lm_head"].format == "fp16"
    assert torch.equal(qc.tensors["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert qc.kv_scales == {}

    meta = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert "lm_head" in meta["exclude_modules"]
    config = json.loads((out / "config.json").read_text())
    if method == "fp8_block":
        assert meta["quant_algo"] is None
        assert config["quantization_config"] == {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"],
        }
    else:
        assert meta["quant_algo"] == {"fp8": "FP8", "fp8_pc": "FP8_PER_CHANNEL_PER_TOKEN", "nvfp4": "NVFP4"}[method]
        assert "quantization_config" not in config
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    if method in ("fp8", "nvfp4"):  # static activation scale from calibration
        assert tensors[f"{name}.input_scale"].shape == () and float(tensors[f"{name}.input_scale"]) > 0
    else:
        assert f"{name}.input_scale" not in tensors


def reference_qkv_amax(ckpt: Path, texts: list[str], max_len: int) -> dict[int, torch.Tensor]:
    """Post-RoPE q/k/v amax per layer, recomputed from forward hooks and HF's own apply_rotary_pos_emb."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    modeling = sys.modules[type(model).__module__]
    captured, amax = {}, {}

    def save(key):
        return lambda _m, _i, out: captured.__setitem__(key, out)

    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q_src, k_src = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else (attn.q_proj, attn.k_proj)
        for key, m in (("q", q_src), ("k", k_src), ("v", attn.v_proj)):
            m.register_forward_hook(save((i, key)))
    d = model.config.head_dim
    with torch.no_grad():
        for text in texts:  # one unpadded sequence at a time: nothing to mask
            ids = tok(text, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
            model(input_ids=ids, use_cache=False)
            cos, sin = model.model.rotary_emb(ids.float(), torch.arange(ids.shape[1])[None])
            for i in range(len(model.model.layers)):
                q, k, v = (captured[(i, key)].view(1, ids.shape[1], -1, d).transpose(1, 2) for key in "qkv")
                q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
                new = torch.stack([q.abs().max(), k.abs().max(), v.abs().max()])
                amax[i] = new if i not in amax else torch.maximum(amax[i], new)
    return amax


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_kv_scales_are_post_rope_amax_over_real_tokens(tiny_checkpoint, tmp_path, texts_file, family):
    ckpt = tiny_checkpoint(family)
    out = quantize(ckpt, tmp_path / "q", texts_file, "--quantization", "none", "--kv_cache_quantization", "fp8")
    qc = read_quantized_checkpoint(out)
    assert qc.kv_cache_quant_algo == "FP8" and qc.quant_algo is None
    reference = reference_qkv_amax(ckpt, TEXTS, 32)
    assert sorted(qc.kv_scales) == sorted(reference)
    for i, ref in reference.items():
        got = qc.kv_scales[i]
        torch.testing.assert_close(torch.tensor([got.q_scale, got.k_scale, got.v_scale]), ref / 448, rtol=1e-5, atol=0)
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["kv_layers"][0]["k_amax"] == pytest.approx(float(reference[0][1]), rel=1e-5)
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.k_scale"].shape == ()
    assert tensors["model.layers.0.self_attn.q_proj.q_scale"].shape == (1,)
    assert all(t.dtype == torch.float16 for n, t in tensors.items() if not n.endswith("_scale"))


def test_outlier_layer_warning_and_fp16_kv_layers(tiny_checkpoint, tmp_path, texts_file):
    ckpt = tiny_checkpoint("qwen2", num_hidden_layers=4)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.3.self_attn.k_proj.bias"] *= 100  # the Qwen2.5 last-layer k bias, exaggerated
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})

    code, out, err = run_cli(main, "llm", "--model_dir", ckpt, "--output_dir", tmp_path / "a", "--text_dataset",
                             texts_file, *FAST, "--kv_cache_quantization", "fp8")
    assert code == 0, err
    assert "layer 3" in out and "--kv_cache_fp16_layers 3" in out
    report = json.loads((tmp_path / "a" / "quantization_report.json").read_text())
    assert report["kv_outlier_layers"] == [3]

    code, out, err = run_cli(main, "llm", "--model_dir", ckpt, "--output_dir", tmp_path / "b", "--text_dataset",
                             texts_file, *FAST, "--kv_cache_quantization", "fp8", "--kv_cache_fp16_layers", "3")
    assert code == 0, err
    assert "consider" not in out
    qc = read_quantized_checkpoint(tmp_path / "b")
    assert sorted(qc.kv_scales) == [0, 1, 2] and qc.kv_cache_fp16_layers == [3]
    assert "model.layers.3.self_attn.k_proj.k_scale" not in load_file(tmp_path / "b" / "model.safetensors")


def test_nvfp4_excludes_unfit_linear_and_lm_head_mixed(tiny_checkpoint, tmp_path, texts_file):
    ckpt = tiny_checkpoint("llama", intermediate_size=72, tie_word_embeddings=True)  # down_proj in=72 is not a multiple of 16
    out = quantize(ckpt, tmp_path / "q", texts_file, "--quantization", "nvfp4", "--lm_head_quantization", "fp8")
    meta = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert "model.layers.0.mlp.down_proj" in meta["exclude_modules"]
    assert meta["quant_algo"] == "MIXED_PRECISION"
    assert meta["quantized_layers"]["lm_head"] == {"quant_algo": "FP8"}
    assert meta["quantized_layers"]["model.layers.0.mlp.up_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    qc = read_quantized_checkpoint(out)
    assert qc.linears["model.layers.1.mlp.down_proj"].format == "fp16"
    assert qc.linears["lm_head"].format == "fp8"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    report = json.loads((out / "quantization_report.json").read_text())
    assert "model.layers.0.mlp.down_proj" in report["excluded_modules"]


def test_sharded_output_has_index(tiny_checkpoint, tmp_path, texts_file):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "q"
    quantize_llm(LlmOptions(ckpt, out, quantization="fp8_pc", max_shard_bytes=2**20))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert read_quantized_checkpoint(out).linears["model.layers.1.self_attn.o_proj"].format == "fp8_pc"


def assert_failed(result: CliResult, out_dir: Path, *words):
    code, _, err = result
    assert code == 2
    last = err.strip().splitlines()[-1]  # progress bars may precede it on stderr
    assert last.startswith("error: "), err
    for w in words:
        assert w in last, err
    assert not out_dir.exists()
    assert [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")] == []


def test_nan_weight_is_named(tiny_checkpoint, tmp_path, texts_file):
    ckpt = tiny_checkpoint("llama")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.1.mlp.gate_proj.weight"][3, 4] = float("nan")
    save_file(weights, ckpt / "model.safetensors")
    out = tmp_path / "q"
    result = run_cli(main, "llm", "--model_dir", ckpt, "--output_dir", out, "--text_dataset", texts_file, *FAST)
    assert_failed(result, out, "model.layers.1.mlp.gate_proj.weight", "NaN")


def test_bad_inputs_exit_2_without_output(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "q"
    base = ["llm", "--model_dir", str(ckpt), "--output_dir", str(out), *FAST]
    assert_failed(run_cli(main, *base, "--quantization", "int3"), out, "--quantization", "int3")
    assert_failed(run_cli(main, *base, "--text_dataset", str(tmp_path / "missing.txt")), out, "missing.txt")
    assert_failed(run_cli(main, *base, "--kv_cache_fp16_layers", "0"), out, "--kv_cache_fp16_layers")
    assert_failed(run_cli(main, *base, "--kv_cache_quantization", "fp8", "--kv_cache_fp16_layers", "9"), out, "[9]")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((ckpt / "config.json").read_text())
    assert_failed(run_cli(main, "llm", "--model_dir", str(empty), "--output_dir", str(out)), out, "safetensors")
    assert_failed(run_cli(main, "draft", "--base_model_dir", str(ckpt)), out, "--draft_model_dir")


def _edit_weights(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _edit_config(ckpt: Path, **changes) -> None:
    (ckpt / "config.json").write_text(json.dumps({**json.loads((ckpt / "config.json").read_text()), **changes}))


def _pickle_only(ckpt):
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("edit, words", [
    (_pickle_only, ["only pickled weights (pytorch_model.bin)"]),
    (lambda c: _edit_config(c, auto_map={"AutoModelForCausalLM": "modeling_x.X"}), ["config.json", "auto_map"]),
    (lambda c: _edit_weights(c, lambda t: t.pop(UP)), [UP, "found none in the weights"]),
    (lambda c: _edit_weights(c, lambda t: t.update({UP: t[UP].to(torch.int8)})), [UP, "found I8 [128, 64]"]),
    (lambda c: _edit_weights(c, lambda t: t.update({UP: t[UP][:, :3].clone()})), [UP, "[128, 64]", "[128, 3]"]),
    (lambda c: _edit_weights(c, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})),
     ["q_proj.bias", "found it unused"]),
    (lambda c: _edit_config(c, hidden_size=10**6), ["model.embed_tokens.weight", "[49152, 1000000]"]),
    (lambda c: _edit_config(c, num_hidden_layers=10**5), ["num_hidden_layers: expected 2", "found 100000"]),
    (lambda c: _edit_config(c, num_hidden_layers="2"), ["num_hidden_layers: expected a positive integer"]),
    (lambda c: _edit_config(c, model_type="nosuch"), ["config.json", "unknown architecture", "found 'nosuch'"]),
], ids=["pickle", "auto_map", "missing", "int8", "shape", "unused", "huge_hidden", "huge_layers", "str", "type"])
def test_checkpoint_that_is_not_the_model_its_config_describes_is_refused_before_loading(
        tiny_checkpoint, tmp_path, texts_file, edit, words):
    """transformers would load pickles, fill a missing tensor with random values, cast int8, drop an unused one, run
    the built-in class for an auto_map model, or allocate a huge config's model: each is one error line instead."""
    ckpt = tiny_checkpoint("llama")
    edit(ckpt)
    out = tmp_path / "q"
    result = run_cli(main, "llm", "--model_dir", ckpt, "--output_dir", out, "--text_dataset", texts_file, *FAST)
    assert_failed(result, out, *words)
    assert "Traceback" not in result.stderr


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "quantization", "llm", "--model_dir", str(tmp_path), "--output_dir", str(tmp_path / "q")],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "config.json" in proc.stderr


def test_calibration_presets_and_explicit_sizes(tmp_path):
    from quantization.options import CALIBRATION_PRESETS

    def options(**kw):
        return LlmOptions(tmp_path, tmp_path / "q", **kw)

    quick, full = CALIBRATION_PRESETS["quick"], CALIBRATION_PRESETS["full"]
    assert full == (512, 512)  # the reference's defaults, one flag away
    assert (options().num_samples, options().max_seq_len) == quick
    assert (options(calibration="full").num_samples, options(calibration="full").max_seq_len) == full
    assert options(calibration="full", num_samples=7).num_samples == 7  # an explicit size wins over the preset
    code, _, err = run_cli(main, "llm", "--model_dir", tmp_path, "--output_dir", tmp_path / "q", "--calibration", "x")
    assert code == 2 and "--calibration" in err


def test_calibration_size_said_up_front_and_a_short_data_set_warns(tiny_checkpoint, tmp_path, texts_file):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "q"
    code, _, err = run_cli(main, "llm", "--model_dir", ckpt, "--output_dir", out, "--text_dataset", texts_file,
                           "--num_samples", "10", "--max_seq_len", "32", "--batch_size", "2")
    assert code == 0, err
    report = json.loads((out / "quantization_report.json").read_text())
    lines = err.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("calibration: "))
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    tokens = sum(min(len(tokenizer(t)["input_ids"]), 32) for t in TEXTS)
    assert lines[said].startswith(f"calibration: 3 samples, {tokens} tokens (up to 32 per sample) from {texts_file}")
    assert tokens == report["num_tokens"]  # what calibration then saw
    # before the model loads and calibrates (the progress bars come after)
    assert not any("calibrating" in line for line in lines[:said])
    warning = (f"--text_dataset {texts_file}: 3 samples of up to 32 tokens, fewer than the 10 asked for "
               "(--num_samples)")
    assert lines[said + 1] == f"warning: {warning}"
    assert report["warnings"][0] == warning
    assert report["calibration"] == {"preset": "quick", "samples_asked": 10, "max_seq_len": 32, "samples": 3,
                                     "tokens": tokens}
