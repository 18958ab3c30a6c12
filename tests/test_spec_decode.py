"""EAGLE3 speculative decoding end to end on tiny engines (export -> llm-build --specBase/--specDraft -> runtime).

Greedy speculative decoding must emit exactly the base's greedy tokens whatever the draft proposes, so a random
draft and a "constant" draft (its output ignores its input and always proposes the tokens the base emits most
often, so the base accepts many of them: the paths that move accepted K/V together and feed hidden states back)
both give strong tests against plain greedy decoding on a vanilla engine of the same checkpoint. Batches mix prompt
lengths; FP16 and FP8 KV caches; several tree shapes. Then the CLI, its fallbacks and its bad input.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_checkpoint, quantize, run_cli
from safetensors.torch import load_file, save_file
from test_builder import assert_one_line_error
from test_quantization_draft import DRAFT_VOCAB, make_draft

from builder.cli import build
from llm_loader.export_all_cli import export
from runtime.chat import load_tokenizer
from runtime.cli import main as llm_inference
from runtime.eagle_tree import TreeShape
from runtime.engine import Engine
from runtime.generate import Job, generate
from runtime.sampling import SamplingParams
from runtime.spec_decode import SpecEngines, generate_spec

PROMPTS = ["The quick brown fox jumps over the lazy dog and", "Hello there, how are you", "a",
           "One two three four five six seven eight nine ten"]
LIMITS = dict(backend="onnxruntime", max_batch_size=4, max_input_len=64, max_kv_cache_capacity=160)
TREE = dict(max_verify_tree_size=16, max_draft_tree_size=16)
MAX_NEW = 32
SHAPES = [TreeShape(3, 4, 12), TreeShape(1, 5, 6), TreeShape(4, 2, 16), TreeShape(2, 1, 3)]


def constant_draft(path: Path, tokens: list[int]) -> Path:
    """A draft whose hidden state stays zero (fc, o_proj and down_proj zero): flat logits, so it proposes its first
    draft ids, which d2t maps to `tokens`."""
    draft = make_draft(path)
    weights = load_file(draft / "model.safetensors")
    for name in ("fc.weight", "midlayer.self_attn.o_proj.weight", "midlayer.mlp.down_proj.weight"):
        weights[name] = torch.zeros_like(weights[name])
    targets = list(tokens) + [t for t in range(2000, 2000 + DRAFT_VOCAB) if t not in tokens][: DRAFT_VOCAB - len(tokens)]
    weights["d2t"] = torch.tensor(targets) - torch.arange(DRAFT_VOCAB)
    save_file(weights, draft / "model.safetensors")
    return draft


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_checkpoint):
    """Engine dirs per (KV dtype, draft): an EAGLE3 dir and the vanilla engine of the same checkpoint."""
    root = tmp_path_factory.mktemp("spec")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint, num_hidden_layers=6)
    fp8 = quantize(ckpt, root / "fp8kv", "fp8", kv=True)
    built = {}
    for kv, source in (("fp16", ckpt), ("fp8", fp8)):
        vanilla = build(export(source, root / f"{kv}-vanilla"), root / f"{kv}-vanilla-eng", **LIMITS)
        tokenizer = load_tokenizer(vanilla)
        jobs = [Job(tokenizer.encode(p), SamplingParams(top_k=1)) for p in PROMPTS]
        plain, _ = generate(Engine.load(vanilla), tokenizer, jobs, MAX_NEW)
        common = [t for t, _ in Counter(t for g in plain for t in g.token_ids).most_common(4)]
        drafts = {"random": make_draft(root / f"{kv}-random"), "constant": constant_draft(root / f"{kv}-const", common)}
        for name, draft in drafts.items():
            eng = root / f"{kv}-{name}-eng"
            base_onnx = export(source, root / f"{kv}-{name}-base", eagle_base=True, eagle_draft_dir=draft)
            build(base_onnx, eng, spec_base=True, **LIMITS, **TREE)
            build(export(draft, root / f"{kv}-{name}-draft"), eng, spec_draft=True, **LIMITS, **TREE)
            built[kv, name] = eng
        built[kv, "vanilla"] = vanilla
    return built, tokenizer


def jobs(tokenizer, prompts=PROMPTS, **kw):
    return [Job(tokenizer.encode(p), SamplingParams(top_k=1), **kw) for p in prompts]


@pytest.mark.parametrize("kv, draft", [("fp16", "random"), ("fp16", "constant"), ("fp8", "random"),
                                       ("fp8", "constant")])
def test_spec_decode_is_token_identical_to_greedy(setup, kv, draft):
    built, tokenizer = setup
    engines = SpecEngines.load(built[kv, draft])
    want, _ = generate(Engine.load(built[kv, "vanilla"]), tokenizer, jobs(tokenizer), MAX_NEW)
    for shape in SHAPES if (kv, draft) == ("fp16", "constant") else SHAPES[:2]:
        got, timing = generate_spec(engines, tokenizer, jobs(tokenizer), MAX_NEW, shape)
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason, shape
        assert timing.spec_steps > 0 and timing.decode_tokens == sum(len(w.token_ids) - 1 for w in want)
        if draft == "constant" and shape.top_k > 1:  # the base accepted draft tokens: K/V moved, hidden fed back
            assert timing.spec_tokens > timing.spec_steps, shape
    single, _ = generate_spec(engines, tokenizer, jobs(tokenizer, PROMPTS[:1]), MAX_NEW, SHAPES[0])
    assert single[0].token_ids == want[0].token_ids


def test_base_engine_decodes_plainly_like_the_vanilla_engine(setup):
    built, tokenizer = setup
    got, _ = generate(SpecEngines.load(built["fp16", "random"]).base, tokenizer, jobs(tokenizer), MAX_NEW)
    want, _ = generate(Engine.load(built["fp16", "vanilla"]), tokenizer, jobs(tokenizer), MAX_NEW)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_a_nearly_full_cache_finishes_plainly(setup):
    """Prompts near the capacity: rounds stop fitting and the batch finishes with plain steps, same tokens."""
    built, tokenizer = setup
    long = ["word " * 45 + p for p in PROMPTS[:2]]
    engines = SpecEngines.load(built["fp16", "constant"])
    got, timing = generate_spec(engines, tokenizer, jobs(tokenizer, long), 200, TreeShape(3, 4, 12))
    want, _ = generate(Engine.load(built["fp16", "vanilla"]), tokenizer, jobs(tokenizer, long), 200)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert {g.finish_reason for g in got} <= {"max-length", "end-of-sequence"}
    assert timing.decode_tokens > timing.spec_tokens  # some tokens came from plain steps


def run_inference(engine_dir: Path, cases: dict, out: Path, *flags):
    path = out.with_suffix(".in.json")
    path.write_text(json.dumps(cases))
    return run_cli(llm_inference, "--engineDir", engine_dir, "--inputFile", path, "--outputFile", out, *flags)


CASES = {"batch_size": 2, "top_k": 1, "max_generate_length": 24, "apply_chat_template": False,
         "requests": [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS[:3]]}
SMALL_TREE = ("--specDraftTopK", "3", "--specDraftStep", "4", "--specVerifySize", "12")


def test_cli_spec_decode_matches_vanilla_and_reports_acceptance(setup, tmp_path):
    built, _ = setup
    vanilla = run_inference(built["fp16", "vanilla"], CASES, tmp_path / "vanilla.json")
    assert vanilla.exit_code == 0, vanilla.stderr
    spec = run_inference(built["fp16", "constant"], {**CASES, "num_logprobs": 2}, tmp_path / "spec.json", "--specDecode",
                   *SMALL_TREE, "--dumpProfile")
    assert spec.exit_code == 0, spec.stderr
    want = json.loads((tmp_path / "vanilla.json").read_text())["responses"]
    got = json.loads((tmp_path / "spec.json").read_text())
    assert [r["output_text"] for r in got["responses"]] == [r["output_text"] for r in want]
    assert got["profile"]["mean_accepted_tokens_per_step"] > 1.0
    assert "mean_accepted_tokens_per_step" in spec.stderr
    for response in got["responses"]:  # logprobs from the verified nodes' logits, one entry per emitted token
        assert all(len(step) == 2 for step in response["logprobs"]) and response["logprobs"]
    default_tree = run_inference(built["fp16", "constant"], CASES, tmp_path / "default.json", "--specDecode")
    assert default_tree.exit_code == 0, default_tree.stderr  # the CPU engine's default tree fits this build
    got = json.loads((tmp_path / "default.json").read_text())["responses"]
    assert [r["output_text"] for r in got] == [r["output_text"] for r in want]


@pytest.mark.parametrize("change", [{"logit_bias": {"13": -5.0}}, {"top_k": 50, "temperature": 0.7},
                                    {"requests": [{**r, "disable_spec_decode": i == 1}
                                                  for i, r in enumerate(CASES["requests"])]}])
def test_cli_falls_back_to_plain_decoding(setup, tmp_path, change):
    """logit_bias, sampling, or disable_spec_decode in a batch: that batch decodes plainly (no spec steps)."""
    built, _ = setup
    cases = {**CASES, **change}
    plain = run_inference(built["fp16", "vanilla"], cases, tmp_path / "plain.json")
    spec = run_inference(built["fp16", "constant"], cases, tmp_path / "spec.json", "--specDecode", *SMALL_TREE,
                   "--dumpProfile")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.stderr
    got = json.loads((tmp_path / "spec.json").read_text())
    want = json.loads((tmp_path / "plain.json").read_text())["responses"]
    assert [r["output_text"] for r in got["responses"]] == [r["output_text"] for r in want]
    if "requests" in change:  # only the batch holding the request falls back
        assert got["profile"]["spec_decode_steps"] > 0
    else:
        assert "spec_decode_steps" not in got["profile"]


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_cli_errors(setup, tmp_path):
    built, _ = setup
    out = tmp_path / "out.json"
    assert_one_line_error(run_inference(built["fp16", "vanilla"], CASES, out, "--specDecode"),
                          "--specDecode: expected an EAGLE3 engine dir", "found a vanilla engine")
    assert_one_line_error(run_inference(built["fp16", "random"], CASES, out), "run it with --specDecode")
    assert_one_line_error(run_inference(built["fp16", "random"], CASES, out, "--specDecode", "--specVerifySize", "17"),
                          "--specVerifySize: expected at most 16")
    assert_one_line_error(run_inference(built["fp16", "random"], CASES, out, "--specDecode", "--specDraftStep", "7",
                                  "--specDraftTopK", "3", "--specVerifySize", "12"), "18 tokens, expected at most 16")
    assert not out.exists()


def test_mismatched_or_missing_engines(setup, tmp_path):
    built, _ = setup
    out = tmp_path / "out.json"
    eng = Path(shutil.copytree(built["fp16", "random"], tmp_path / "eng"))
    config = json.loads((eng / "draft_config.json").read_text())
    _edit(eng / "draft_config.json", eagle3_config={**config["eagle3_config"], "target_layer_ids": [0, 1, 2]})
    assert_one_line_error(run_inference(eng, CASES, out, "--specDecode"), "draft target layers [0, 1, 2]")
    _edit(eng / "draft_config.json", eagle3_config=config["eagle3_config"], vocab_size=100)
    assert_one_line_error(run_inference(eng, CASES, out, "--specDecode"), "draft vocab_size 100")
    # a consistent draft engine of another base (hidden 32), its files put next to this base by hand
    other = tmp_path / "other"
    build(export(make_draft(tmp_path / "draft32", hidden=32, base_hidden=32), tmp_path / "d32"), other,
          spec_draft=True, **LIMITS, **TREE)
    for name in ("draft_config.json", "spec_draft.onnx", "spec_draft.onnx.data", "d2t.safetensors"):
        shutil.copy(other / name, eng / name)
    assert_one_line_error(run_inference(eng, CASES, out, "--specDecode"), "draft hidden_size 32")
    (eng / "base_config.json").unlink()  # a draft engine without a base
    assert_one_line_error(run_inference(eng, CASES, out, "--specDecode"), "expected an EAGLE3 base engine")
    assert not out.exists()


def test_nvfp4_base_with_fp8_embedding(tmp_path, smollm2_checkpoint):
    """An NVFP4 base exported with --eagle-base and --fp8-embedding: speculative decoding gives plain greedy's
    tokens of the vanilla NVFP4 engine (same checkpoint, same embedding)."""
    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", smollm2_checkpoint, num_hidden_layers=6)
    nvfp4 = quantize(ckpt, tmp_path / "nvfp4", "nvfp4")
    draft = make_draft(tmp_path / "draft")
    eng = tmp_path / "eng"
    build(export(nvfp4, tmp_path / "base", eagle_base=True, eagle_draft_dir=draft, fp8_embedding=True), eng,
          spec_base=True, **LIMITS, **TREE)
    build(export(draft, tmp_path / "draft-onnx"), eng, spec_draft=True, **LIMITS, **TREE)
    vanilla = build(export(nvfp4, tmp_path / "vanilla", fp8_embedding=True), tmp_path / "vanilla-eng", **LIMITS)
    tokenizer = load_tokenizer(vanilla)
    engines = SpecEngines.load(eng)
    assert engines.base.config["weight_format"] == "nvfp4"
    got, _ = generate_spec(engines, tokenizer, jobs(tokenizer, PROMPTS[:2]), 16, TreeShape(2, 3, 6))
    want, _ = generate(Engine.load(vanilla), tokenizer, jobs(tokenizer, PROMPTS[:2]), 16)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
