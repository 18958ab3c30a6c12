"""The TensorRT backend end to end: `llm-build --backend tensorrt`, then greedy generation on the TensorRT backend.

Needs a CUDA GPU (Ada or newer for FP8) and TensorRT >= 10.6, so it is skipped wherever this project's CI runs and has
not run yet (docs/gpu-kernels.md). Head size 64: the GPU kernels' smallest tile.
"""

import pytest
import torch
from helpers import (
    PROMPTS,
    assert_logits_close,
    export_and_build,
    forward_rows,
    jobs_for,
    make_tiny_checkpoint,
    quantize,
    tokens,
    transformers_greedy,
)

from builder import tensorrt_backend
from builder.cli import build
from llm_loader.export_all_cli import export
from runtime.chat import load_tokenizer
from runtime.engine import Engine
from runtime.generate import generate
from runtime.tensorrt_backend import TensorRTBackend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(tensorrt_backend.missing() is not None, reason="needs TensorRT and a CUDA GPU")]
LIMITS = dict(max_batch_size=4, max_input_len=64, max_kv_cache_capacity=128)


def test_qwen3_matches_transformers(tmp_path, smollm2_checkpoint):
    from transformers import AutoModelForCausalLM

    ckpt = make_tiny_checkpoint("qwen3", tmp_path / "ckpt", smollm2_checkpoint, head_dim=64)
    _, engine_dir = export_and_build(ckpt, tmp_path, backend="tensorrt", **LIMITS)
    engine, tokenizer = Engine.load(engine_dir), load_tokenizer(engine_dir)
    assert isinstance(engine.backend, TensorRTBackend)
    jobs = jobs_for(tokenizer, PROMPTS)
    generations, _ = generate(engine, tokenizer, jobs, 24)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    for job, gen in zip(jobs, generations):
        assert gen.token_ids == transformers_greedy(model, job.prompt_ids, 24, engine.eos_token_ids).tolist()


@pytest.mark.parametrize("variant", ["fp8-embedding", "fp8-kv"])
def test_fp8_variants_match_the_onnxruntime_engine(tmp_path, smollm2_checkpoint, variant):
    """The same export on both backends: the logits of a padded two-row prefill and of three decode steps agree
    (fp16 against the CPU engine's fp32 compute, so within test_engine's tolerance, not bit for bit)."""
    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", smollm2_checkpoint, head_dim=64)
    if variant == "fp8-kv":
        ckpt = quantize(ckpt, tmp_path / "quantized", "fp8", kv=True)
    onnx_dir = export(ckpt, tmp_path / "onnx", fp8_embedding=variant == "fp8-embedding")
    trt, ort = (Engine.load(build(onnx_dir, tmp_path / backend, backend=backend, **LIMITS))
                for backend in ("tensorrt", "onnxruntime"))
    caches = trt.new_cache(2), ort.new_cache(2)
    calls = [[tokens(9, seed=1), tokens(5, seed=2)]] + [[tokens(1, seed=s), tokens(1, seed=10 + s)] for s in range(3)]
    for rows in calls:
        ours, ref = (forward_rows(engine, cache, rows) for engine, cache in zip((trt, ort), caches))
        assert_logits_close(ours, ref)
