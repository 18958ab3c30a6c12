"""`python -m quantization draft` on a tiny random base + EAGLE3 draft: tensors, metadata, calibrated scales, errors.

Expected scales are recomputed here from plain formulas: weight amax/448 from the draft's own file, and the fc input
amax from HF `output_hidden_states` of the base run one text at a time (no padding at all).
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract.formats import FP8_MAX
from llm_loader.quantized_checkpoint import read_quantized_checkpoint
from quantization.cli import main
from quantization.eagle3 import target_layer_ids

TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles.",
    "Now is the winter of our discontent.",
    "All the world's a stage, and all the men and women merely players; they have their exits and their entrances.",
]
MAX_SEQ_LEN = 32
FAST = ["--num_samples", "3", "--max_seq_len", str(MAX_SEQ_LEN), "--batch_size", "3"]
BASE_LAYERS = 6
TARGET_LAYERS = [1, 3, 5]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, DRAFT_VOCAB = 64, 4, 2, 16, 128, 49152, 512
EPS = 1e-5
LINEARS = ["fc", *(f"midlayer.self_attn.{p}_proj" for p in "qkvo")]
LINEARS += [f"midlayer.mlp.{p}_proj" for p in ("gate", "up", "down")]


def make_draft(path: Path, hidden: int = HIDDEN, base_hidden: int = HIDDEN, drop: str | None = None) -> Path:
    """A random EAGLE3 draft in the SpecForge layout (fp16 safetensors + config.json)."""
    torch.manual_seed(1)
    rand = lambda *shape: (torch.randn(*shape) * 0.1).half()  # noqa: E731
    norm = lambda: (1 + 0.2 * torch.randn(hidden)).half()  # noqa: E731
    tensors = {
        "fc.weight": rand(hidden, 3 * base_hidden),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, HEADS * HEAD_DIM),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.mlp.gate_proj.weight": rand(INTER, hidden),
        "midlayer.mlp.up_proj.weight": rand(INTER, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, INTER),
        "norm.weight": norm(),
        "lm_head.weight": rand(DRAFT_VOCAB, hidden),
        "d2t": torch.randint(0, 1000, (DRAFT_VOCAB,), dtype=torch.int64),
        "t2d": torch.rand(VOCAB) < 0.01,
    }
    tensors.pop(drop, None)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "intermediate_size": INTER,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "draft_vocab_size": DRAFT_VOCAB,
        "rms_norm_eps": EPS,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": TARGET_LAYERS},
    }
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    return path


@pytest.fixture
def base(tiny_checkpoint) -> Path:
    """A tiny Llama whose pad token embeds far larger than any real one, so that a pad token leaking into an amax
    shows (HF initialises the pad row to zero, which would hide it)."""
    path = tiny_checkpoint("llama", num_hidden_layers=BASE_LAYERS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token or tokenizer.eos_token)
    weights = load_file(path / "model.safetensors")
    weights["model.embed_tokens.weight"][pad_id] = 10.0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def draft_args(base: Path, draft: Path, out: Path, texts: Path, *extra: str) -> list[str]:
    return ["draft", "--base_model_dir", str(base), "--draft_model_dir", str(draft), "--output_dir", str(out),
            "--text_dataset", str(texts), *FAST, *extra]


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def reference_amax(base: Path, draft: Path) -> tuple[float, float]:
    """amax of fc's input and of q_proj's input over all real tokens, each text run alone (nothing to mask)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    w = {k: v.float() for k, v in load_file(draft / "model.safetensors").items() if v.is_floating_point()}
    fc_amax = q_amax = 0.0
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            aux = torch.cat([states[i] for i in TARGET_LAYERS], dim=-1)
            h = aux @ w["fc.weight"].T
            x = torch.cat([rms_norm(states[0], w["midlayer.input_layernorm.weight"]),
                           rms_norm(h, w["midlayer.hidden_norm.weight"])], dim=-1)
            fc_amax = max(fc_amax, aux.abs().max().item())
            q_amax = max(q_amax, x.abs().max().item())
    return fc_amax, q_amax


def test_fp8_draft(base, tmp_path, texts_file):
    draft = make_draft(tmp_path / "draft")
    out = tmp_path / "q"
    code, _, err = run_cli(main, *draft_args(base, draft, out, texts_file))
    assert code == 0, err
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "quantization_report.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text()) == json.loads((draft / "config.json").read_text())
    meta = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert meta["quant_algo"] == "FP8" and meta["kv_cache_quant_algo"] is None
    assert meta["exclude_modules"] == ["lm_head"]

    original, q = load_file(draft / "model.safetensors"), load_file(out / "model.safetensors")
    for name in LINEARS:
        assert q[f"{name}.weight"].dtype == torch.float8_e4m3fn
        expected = original[f"{name}.weight"].float().abs().max() / FP8_MAX
        torch.testing.assert_close(q[f"{name}.weight_scale"], expected)
        assert q[f"{name}.input_scale"].shape == () and q[f"{name}.input_scale"] > 0
    for name in ("lm_head.weight", "norm.weight", "midlayer.hidden_norm.weight"):
        assert q[name].dtype == torch.float16 and torch.equal(q[name], original[name])
    assert torch.equal(q["d2t"], original["d2t"]) and torch.equal(q["t2d"], original["t2d"])
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in q)
    formats = {name: lin.format for name, lin in read_quantized_checkpoint(out).linears.items()}
    assert formats == {**dict.fromkeys(LINEARS, "fp8"), "lm_head": "fp16"}

    fc_amax, q_amax = reference_amax(base, draft)
    torch.testing.assert_close(q["fc.input_scale"], torch.tensor(fc_amax / FP8_MAX), rtol=1e-4, atol=0)
    q_scale = q["midlayer.self_attn.q_proj.input_scale"]
    torch.testing.assert_close(q_scale, torch.tensor(q_amax / FP8_MAX), rtol=1e-4, atol=0)
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["target_layer_ids"] == TARGET_LAYERS
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert report["num_tokens"] == sum(min(len(tokenizer(t)["input_ids"]), MAX_SEQ_LEN) for t in TEXTS)


@pytest.mark.parametrize("method, weight_dtype", [("nvfp4", torch.uint8), ("fp8_block", torch.float8_e4m3fn)])
def test_other_formats(base, tmp_path, texts_file, method, weight_dtype):
    draft = make_draft(tmp_path / "draft")
    out = tmp_path / "q"
    lm_head = ["--lm_head_quantization", "fp8"] if method == "nvfp4" else []
    code, _, err = run_cli(main, *draft_args(base, draft, out, texts_file, "--quantization", method, *lm_head))
    assert code == 0, err
    q = load_file(out / "model.safetensors")
    for name in LINEARS:
        assert q[f"{name}.weight"].dtype == weight_dtype
    meta = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    if method == "nvfp4":  # lm_head in fp8, the rest in nvfp4
        assert meta["quant_algo"] == "MIXED_PRECISION" and meta["exclude_modules"] == []
        assert meta["quantized_layers"]["lm_head"] == {"quant_algo": "FP8"}
        assert q["lm_head.weight"].dtype == torch.float8_e4m3fn
        fc_amax, _ = reference_amax(base, draft)
        torch.testing.assert_close(q["fc.input_scale"], torch.tensor(fc_amax / (6 * FP8_MAX)), rtol=1e-4, atol=0)
    else:  # dynamic activations: no calibration, no input scales
        assert meta["quant_algo"] is None and "fc.input_scale" not in q
        assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]


def test_default_target_layers():
    n = 32
    assert target_layer_ids({}, n) == [2, n // 2, n - 4]
    assert target_layer_ids({"target_layer_ids": [0, 5, 31]}, n) == [0, 5, 31]


def _not_eagle(base, tmp_path):
    return base  # a plain Llama checkpoint is not a draft


def _hidden_mismatch(base, tmp_path):
    return make_draft(tmp_path / "draft", hidden=32, base_hidden=32)


def _missing_tensor(base, tmp_path):
    return make_draft(tmp_path / "draft", drop="d2t")


def _pickle_only(base, tmp_path):
    draft = make_draft(tmp_path / "draft")
    torch.save(load_file(draft / "model.safetensors"), draft / "pytorch_model.bin")
    (draft / "model.safetensors").unlink()
    return draft


def _bad_layers(base, tmp_path):
    draft = make_draft(tmp_path / "draft")
    config = json.loads((draft / "config.json").read_text())
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 3, BASE_LAYERS]
    (draft / "config.json").write_text(json.dumps(config))
    return draft


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (_not_eagle, [], "expected an EAGLE3 draft"),
        (_hidden_mismatch, [], "fc.weight: expected [64, 3 * 64]"),
        (_missing_tensor, [], "expected EAGLE3 draft tensors ['d2t']"),
        (_pickle_only, [], "only pickled weights ['pytorch_model.bin']"),
        (_bad_layers, [], f"expected decoder-layer indices in [0, {BASE_LAYERS})"),
        (lambda b, t: make_draft(t / "draft"), ["--kv_cache_quantization", "fp8"], "expected none for a draft"),
    ],
)
def test_errors(base, tmp_path, texts_file, make, extra, message):
    draft = make(base, tmp_path)
    out = tmp_path / "q"
    code, _, err = run_cli(main, *draft_args(base, draft, out, texts_file, *extra))
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q")] == []
