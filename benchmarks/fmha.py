"""Attention kernel benchmark: our FP8 and FP16 Triton kernels against torch SDPA (flash, fp16).

Prefill: causal, cold L2 (a 256 MB buffer is overwritten before every timed call), warm-up then the median of timed
calls, for the models of spec/fp8-kv-cache.md plus a head_dim-64 model, batch 1/4/8 x seq 512/1024/4096. Decode: one
new token over an FP8 or FP16 cache of 4096..32768 tokens (split-K kernel). Prints Markdown tables and writes JSON.

    python -m benchmarks.fmha [--out benchmarks/results/fmha.json] [--iters 100]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import click
import torch

from contract.formats import to_fp8
from plugins.attention.schema import AttentionAttrs

MODELS = {"Qwen3-0.6B": (16, 8, 128), "Qwen3-8B": (32, 8, 128), "SmolLM2-135M": (9, 3, 64)}
BATCHES = (1, 4, 8)
SEQS = (512, 1024, 4096)
DECODE_CONTEXTS = (4096, 8192, 16384, 32768)
DECODE_BATCHES = (1, 8)
SCALES = (0.02, 0.02, 0.02)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        click.echo("error: this benchmark needs a CUDA GPU (FP8 kernels need SM89 or newer); none is available here", err=True)
        sys.exit(2)


def time_cold(fn, iters: int, warmup: int = 10) -> float:
    """Median microseconds of `fn()`, with L2 flushed (256 MB written) before every call."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def attrs_for(hq: int, hkv: int, d: int, fp8: bool) -> AttentionAttrs:
    return AttentionAttrs(num_q_heads=hq, num_kv_heads=hkv, head_size=d, attention_scale=1 / math.sqrt(d),
                          enable_fp8_kv_cache=fp8, qkv_scales=SCALES if fp8 else (1.0, 1.0, 1.0))


def inputs(b: int, s: int, capacity: int, hq: int, hkv: int, d: int):
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.float16)
    cache = torch.randn(b, 2, hkv, capacity, d, device="cuda", dtype=torch.float16)
    q8, cache8 = to_fp8(q, SCALES[0]), to_fp8(cache, SCALES[1])
    return q, cache, q8, cache8


def bench_prefill(model: str, b: int, s: int, iters: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from plugins.attention.triton_kernels import prefill_attention

    hq, hkv, d = MODELS[model]
    q, cache, q8, cache8 = inputs(b, s, s, hq, hkv, d)
    ctx = torch.full((b,), s, dtype=torch.int32, device="cuda")
    start = torch.zeros(b, dtype=torch.int32, device="cuda")
    a16, a8 = attrs_for(hq, hkv, d, False), attrs_for(hq, hkv, d, True)
    # SDPA flash gets the GQA heads expanded beforehand (outside the timing)
    qt = q.transpose(1, 2).contiguous()
    kt = cache[:, 0].repeat_interleave(hq // hkv, dim=1).contiguous()
    vt = cache[:, 1].repeat_interleave(hq // hkv, dim=1).contiguous()

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    fp16_us = time_cold(lambda: prefill_attention(q, cache, ctx, start, a16), iters)
    fp8_us = time_cold(lambda: prefill_attention(q8, cache8, ctx, start, a8), iters)
    sdpa_us = time_cold(sdpa, iters)
    flops = 4 * b * hq * s * s * d / 2  # causal: half of QK^T and PV
    return dict(model=model, batch=b, seq=s, fp8_us=fp8_us, fp16_us=fp16_us, sdpa_us=sdpa_us,
                fp8_vs_fp16=fp16_us / fp8_us, fp8_vs_sdpa=sdpa_us / fp8_us, fp8_tflops=flops / fp8_us / 1e6,
                fp16_tflops=flops / fp16_us / 1e6, sdpa_tflops=flops / sdpa_us / 1e6)


def bench_decode(model: str, b: int, context: int, iters: int) -> dict:
    from plugins.attention.triton_kernels import decode_attention

    hq, hkv, d = MODELS[model]
    q, cache, q8, cache8 = inputs(b, 1, context, hq, hkv, d)
    ctx = torch.ones(b, dtype=torch.int32, device="cuda")
    start = torch.full((b,), context - 1, dtype=torch.int32, device="cuda")
    fp16_us = time_cold(lambda: decode_attention(q, cache, ctx, start, attrs_for(hq, hkv, d, False)), iters)
    fp8_us = time_cold(lambda: decode_attention(q8, cache8, ctx, start, attrs_for(hq, hkv, d, True)), iters)
    kv_bytes = b * 2 * hkv * context * d
    return dict(model=model, batch=b, context=context, fp8_us=fp8_us, fp16_us=fp16_us, fp8_vs_fp16=fp16_us / fp8_us,
                fp8_gbps=kv_bytes / fp8_us / 1e3, fp16_gbps=2 * kv_bytes / fp16_us / 1e3)


def markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def targets(prefill: list[dict], decode: list[dict]) -> dict:
    """The issue-5 targets, each True/False."""
    return {
        "fp8_faster_than_fp16_everywhere": all(r["fp8_vs_fp16"] > 1.0 for r in prefill),
        "fp8_vs_sdpa_at_4096_min": min(r["fp8_vs_sdpa"] for r in prefill if r["seq"] == 4096),
        "fp8_ge_1.3x_sdpa_at_4096": all(r["fp8_vs_sdpa"] >= 1.3 for r in prefill if r["seq"] == 4096),
        "decode_fp8_ge_1.6x_fp16_at_32768": all(r["fp8_vs_fp16"] >= 1.6 for r in decode if r["context"] == 32768),
    }


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/fmha.json"), show_default=True)
@click.option("--iters", default=100, show_default=True, help="timed calls per measurement (median reported)")
def main(out: Path, iters: int) -> None:
    require_cuda()
    prefill = [bench_prefill(m, b, s, iters) for m in MODELS for b in BATCHES for s in SEQS]
    decode = [bench_decode(m, b, c, iters) for m in MODELS for b in DECODE_BATCHES for c in DECODE_CONTEXTS]
    goals = targets(prefill, decode)
    device = torch.cuda.get_device_name()
    print(f"## Prefill attention, causal, cold L2 ({device}), microseconds (median of {iters})\n")
    print(markdown(prefill, ["model", "batch", "seq", "fp8_us", "fp16_us", "sdpa_us", "fp8_vs_fp16", "fp8_vs_sdpa",
                             "fp8_tflops", "fp16_tflops", "sdpa_tflops"]))
    print("\n## Decode attention, one token over the cache\n")
    print(markdown(decode, ["model", "batch", "context", "fp8_us", "fp16_us", "fp8_vs_fp16", "fp8_gbps", "fp16_gbps"]))
    print("\n## Targets\n\n" + "\n".join(f"- {k}: {v}" for k, v in goals.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, torch=torch.__version__, iters=iters, prefill=prefill, decode=decode,
                                   targets=goals), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
