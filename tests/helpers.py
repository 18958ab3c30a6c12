"""What several test modules build and compare: tiny checkpoints, the quantize -> export -> build pipeline, CLI runs,
and engine outputs against `transformers`. Fixtures live in conftest.py; tests import these from here.

Tiny models are built from `transformers` configs with the SmolLM2 tokenizer (so chat templates and text work) and
saved as fp16 safetensors, like real checkpoints. Their weights use a larger init than HF's 0.02 so that logits are
decisive: greedy generation then compares token for token against `transformers` without coin-flip ties.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_TEXT = REPO / "quantization" / "data" / "tinyshakespeare.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


# --- checkpoints and the pipeline -------------------------------------------------------------------------------------


def make_tiny_checkpoint(family: str, out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random `family` ("llama", "qwen2", "qwen3") checkpoint to `out` and return it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(TINY, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "llama":
        kwargs["attention_bias"] = False
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":  # HF initialises biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    if family == "qwen3":  # and norm weights to one
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    model = model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def quantize(src: Path, out: Path, method: str, *flags: str, kv: bool = False) -> Path:
    """`llm-quantize llm` with a short calibration on the built-in text; `kv` adds the FP8 KV cache."""
    from quantization.cli import main

    result = run_cli(main, "llm", "--model_dir", src, "--output_dir", out, "--quantization", method,
                     "--text_dataset", CALIBRATION_TEXT, "--num_samples", "8", "--max_seq_len", "32",
                     *(["--kv_cache_quantization", "fp8"] if kv else []), *flags)
    assert result.exit_code == 0, f"quantization failed: {result.stderr}"
    return out


def export_and_build(ckpt: Path, out: Path, *, fp8_embedding: bool = False, edit: Callable[[Path], None] | None = None,
                     backend: str = "onnxruntime", max_batch_size: int = 2, max_input_len: int = 16,
                     max_kv_cache_capacity: int = 64, cpu_weights: str | None = None) -> tuple[Path, Path]:
    """Export `ckpt` to `out/onnx/llm`, let `edit` change that ONNX dir, build `out/engine`; returns both dirs."""
    from builder.cli import build
    from llm_loader.export_all_cli import export

    onnx_dir = export(ckpt, out / "onnx", fp8_embedding=fp8_embedding)
    if edit:
        edit(onnx_dir)
    engine_dir = build(onnx_dir, out / "engine", max_batch_size=max_batch_size, max_input_len=max_input_len,
                       max_kv_cache_capacity=max_kv_cache_capacity, backend=backend, cpu_weights=cpu_weights)
    return onnx_dir, engine_dir


def make_fp8_kv(onnx_dir: Path, inputs: bool = True, plugins: bool = True, config: bool = True) -> None:
    """Edit an export's KV-cache witnesses to FP8, each on request (graph only; the weights file is untouched)."""
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if inputs and "key_values_" in value.name:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT8E4M3FN
    for node in model.graph.node:
        if plugins and node.op_type == "AttentionPlugin":
            for attr in node.attribute:
                if attr.name == "enable_fp8_kv_cache":
                    attr.i = 1
    onnx.save(model, str(path))
    if config:
        edit_config(onnx_dir, kv_cache_dtype="fp8")


def edit_config(onnx_dir: Path, **changes) -> None:
    path = onnx_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- running a command ------------------------------------------------------------------------------------------------


class CliResult(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


def run_cli(main: Callable[[list[str]], int], *args) -> CliResult:
    """A command's `main(argv)` in this process, as a user runs it (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


# --- engine outputs against transformers ------------------------------------------------------------------------------


PROMPTS = ["Hello there, how are", "The capital of France is a city that", "a",
           "One two three four five six seven eight nine ten eleven"]


def hf_model(ckpt: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """fp16 activations against an fp32 reference: within 0.5% of the logit range, and the same top-1 token at
    nearly every position (random tokens give flat distributions where a near-tie may flip)."""
    np.testing.assert_allclose(ours, ref, rtol=0, atol=0.005 * float(np.abs(ref).max()))
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 49152, n).astype(np.int32)


def forward_rows(engine, cache, rows: list[np.ndarray], all_logits: bool = False) -> np.ndarray:
    """One forward over right-padded `rows`; logits of every position (all_logits) or of each row's last token."""
    seq = max(len(r) for r in rows)
    ids = np.zeros((len(rows), seq), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    ctx = np.array([len(r) for r in rows], np.int32)
    last = np.tile(np.arange(seq), (len(rows), 1)) if all_logits else np.maximum(ctx - 1, 0)[:, None]
    return engine.forward(cache, ids, ctx, last.astype(np.int64))


def jobs_for(tokenizer, prompts, **kw):
    from runtime.generate import Job
    from runtime.sampling import SamplingParams

    sampling = kw.pop("sampling", SamplingParams(top_k=1))
    return [Job(tokenizer.encode(p), sampling, **kw) for p in prompts]


def transformers_greedy(model, prompt_ids: list[int], n: int, eos_token_ids: list[int]) -> torch.Tensor:
    """The new tokens of `transformers`' own greedy generate (the reference for engine generations)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, top_k=None, top_p=None,
                         eos_token_id=eos_token_ids, pad_token_id=0)
    return out[0, len(prompt_ids):]


def sigint_as_from_a_terminal() -> None:
    """`preexec_fn` for a child that must see Ctrl-C: a job started in the background of a non-interactive shell
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt; a terminal's child has it at default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
