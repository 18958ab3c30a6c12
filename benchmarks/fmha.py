"""Attention kernel benchmark: our FP8 and FP16 Triton kernels against torch SDPA fp16 (flash; cuDNN too at the
target length).

Prefill: causal, for the models of spec/fp8-kv-cache.md plus a head_dim-64 model, batch 1/4/8 x seq 4096/1024/512
(the target length first, so a run cut short still measures it). Decode: one new token over an FP8 or FP16 cache of
32768..4096 tokens (split-K kernel). Every configuration is first checked against a reference (prefill: SDPA over
the same, dequantized, inputs; decode: fp32 torch), and the row carries that relative error. Timing: CUDA graph
replay under `triton.testing.do_bench`, cold L2 (benchmarks/measure.py). Prints Markdown tables and writes JSON.

    python -m benchmarks.fmha [--phase all|prefill|decode] [--out benchmarks/results/fmha.json] [--rows FILE.jsonl]
    python -m benchmarks.fmha --dry-run   # tiny sizes on the Triton CPU interpreter, host-clock "timings"
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import torch

from benchmarks.measure import (
    REP_MS,
    emit,
    input_sets,
    markdown,
    rel_err,
    require_device,
    time_us,
)
from contract.formats import to_fp8
from plugins.attention.schema import AttentionAttrs

MODELS = {"Qwen3-0.6B": (16, 8, 128), "Qwen3-8B": (32, 8, 128), "SmolLM2-135M": (9, 3, 64)}  # (Hq, Hkv, D)
SCALES = (0.02, 0.02, 0.02)
MAX_REL_ERR = 2e-2  # a row above this is reported as a wrong result, not as a speed


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]
    seqs: tuple[int, ...]  # the first is the target length of the SDPA goal
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]  # the first is the target length of the decode goal


FULL = Grid(batches=(1, 4, 8), seqs=(4096, 1024, 512), decode_batches=(1, 8), contexts=(32768, 16384, 8192, 4096))
DRY = Grid(batches=(1,), seqs=(32,), decode_batches=(1,), contexts=(48,))  # interpreter-sized: plumbing only

PREFILL_COLUMNS = ["model", "batch", "seq", "fp8_us", "fp16_us", "sdpa_us", "cudnn_us", "fp8_vs_fp16", "fp8_vs_sdpa",
                   "fp8_vs_cudnn", "fp8_tflops", "fp16_tflops", "sdpa_tflops", "fp8_err", "fp16_err", "timing"]
DECODE_COLUMNS = ["model", "batch", "context", "fp8_us", "fp16_us", "fp8_vs_fp16", "fp8_gbps", "fp16_gbps",
                  "fp8_err", "fp16_err", "timing"]


def attrs_for(hq: int, hkv: int, d: int, fp8: bool) -> AttentionAttrs:
    return AttentionAttrs(num_q_heads=hq, num_kv_heads=hkv, head_size=d, attention_scale=1 / math.sqrt(d),
                          enable_fp8_kv_cache=fp8, qkv_scales=SCALES if fp8 else (1.0, 1.0, 1.0))


@dataclass
class Inputs:
    """One input set: Q `[B,S,Hq,D]` and the cache `[B,2,Hkv,T,D]`, fp16 and as FP8 codes (torch quantizes)."""

    q: torch.Tensor
    cache: torch.Tensor
    q8: torch.Tensor
    cache8: torch.Tensor

    @classmethod
    def random(cls, b: int, s: int, capacity: int, hq: int, hkv: int, d: int, device: torch.device) -> Inputs:
        q = torch.randn(b, s, hq, d, device=device, dtype=torch.float16)
        cache = torch.randn(b, 2, hkv, capacity, d, device=device, dtype=torch.float16)
        return cls(q, cache, to_fp8(q, SCALES[0]), to_fp8(cache, SCALES[1]))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.q8.float() * SCALES[0]).half(), (self.cache8.float() * SCALES[1]).half()


def sdpa_layout(q: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B,H,S,D] tensors for SDPA, the GQA heads expanded beforehand (outside any timing)."""
    group = q.shape[2] // cache.shape[2]
    return (q.transpose(1, 2).contiguous(), cache[:, 0].repeat_interleave(group, dim=1).contiguous(),
            cache[:, 1].repeat_interleave(group, dim=1).contiguous())


def sdpa_backend(name: str, device: torch.device):
    """SDPA restricted to one backend on the GPU; on the CPU (dry run) whatever torch picks."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def bench_prefill(model: str, b: int, s: int, device: torch.device, rep_ms: int, cudnn: bool) -> dict:
    from plugins.attention.triton_kernels import prefill_attention

    hq, hkv, d = MODELS[model]
    sets = [Inputs.random(b, s, s, hq, hkv, d, device)
            for _ in range(input_sets(3 * (b * s * hq * d + 2 * b * s * hkv * d), device))]
    ctx = torch.full((b,), s, dtype=torch.int32, device=device)
    start = torch.zeros(b, dtype=torch.int32, device=device)
    a16, a8 = attrs_for(hq, hkv, d, False), attrs_for(hq, hkv, d, True)
    sdpa = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True)
    expanded = [sdpa_layout(x.q, x.cache) for x in sets]

    first = sets[0]
    with sdpa_backend("FLASH_ATTENTION", device):
        want16 = sdpa(*expanded[0]).transpose(1, 2)
        want8 = sdpa(*sdpa_layout(*first.dequantized())).transpose(1, 2)
    row = dict(model=model, batch=b, seq=s)
    row["fp16_err"] = rel_err(prefill_attention(first.q, first.cache, ctx, start, a16), want16)
    row["fp8_err"] = rel_err(prefill_attention(first.q8, first.cache8, ctx, start, a8), want8)

    row["fp16_us"], _ = time_us([partial(prefill_attention, x.q, x.cache, ctx, start, a16) for x in sets], device, rep_ms)
    row["fp8_us"], timing = time_us([partial(prefill_attention, x.q8, x.cache8, ctx, start, a8) for x in sets], device,
                                    rep_ms)
    with sdpa_backend("FLASH_ATTENTION", device):
        row["sdpa_us"], sdpa_timing = time_us([partial(sdpa, *e) for e in expanded], device, rep_ms)
    row["cudnn_us"] = None
    if cudnn and device.type == "cuda":  # eager: milliseconds per call at the target length, and no capture risk
        try:
            with sdpa_backend("CUDNN_ATTENTION", device):
                row["cudnn_us"], _ = time_us([partial(sdpa, *e) for e in expanded], device, rep_ms, graph=False)
        except Exception as e:  # noqa: BLE001 - cuDNN attention is optional; say why it is missing
            row["cudnn_error"] = f"{type(e).__name__}: {e}"[:200]
    flops = 4 * b * hq * s * s * d / 2  # causal: half of QK^T and PV
    row.update(fp8_vs_fp16=row["fp16_us"] / row["fp8_us"], fp8_vs_sdpa=row["sdpa_us"] / row["fp8_us"],
               fp8_vs_cudnn=row["cudnn_us"] / row["fp8_us"] if row["cudnn_us"] else None,
               fp8_tflops=flops / row["fp8_us"] / 1e6, fp16_tflops=flops / row["fp16_us"] / 1e6,
               sdpa_tflops=flops / row["sdpa_us"] / 1e6, timing=timing if timing == sdpa_timing else f"{timing}/{sdpa_timing}",
               sets=len(sets))
    return row


def decode_reference(q: torch.Tensor, cache: torch.Tensor, d: int) -> torch.Tensor:
    """fp32 softmax(q k^T / sqrt(d)) v of one query per row over the whole cache: [B,1,Hq,D]."""
    group = q.shape[2] // cache.shape[2]
    keys = cache[:, 0].float().repeat_interleave(group, dim=1)  # [B,Hq,T,D]
    values = cache[:, 1].float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q[:, 0].float(), keys) / math.sqrt(d)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)[:, None]


def bench_decode(model: str, b: int, context: int, device: torch.device, rep_ms: int) -> dict:
    from plugins.attention.triton_kernels import decode_attention

    hq, hkv, d = MODELS[model]
    sets = [Inputs.random(b, 1, context, hq, hkv, d, device)
            for _ in range(input_sets(3 * b * 2 * hkv * context * d, device))]
    ctx = torch.ones(b, dtype=torch.int32, device=device)
    start = torch.full((b,), context - 1, dtype=torch.int32, device=device)  # the new token is the last of `context`
    a16, a8 = attrs_for(hq, hkv, d, False), attrs_for(hq, hkv, d, True)
    first = sets[0]
    row = dict(model=model, batch=b, context=context)
    row["fp16_err"] = rel_err(decode_attention(first.q, first.cache, ctx, start, a16),
                              decode_reference(first.q, first.cache, d))
    row["fp8_err"] = rel_err(decode_attention(first.q8, first.cache8, ctx, start, a8),
                             decode_reference(*first.dequantized(), d))
    row["fp16_us"], _ = time_us([partial(decode_attention, x.q, x.cache, ctx, start, a16) for x in sets], device, rep_ms)
    row["fp8_us"], row["timing"] = time_us([partial(decode_attention, x.q8, x.cache8, ctx, start, a8) for x in sets],
                                           device, rep_ms)
    kv_bytes = b * 2 * hkv * context * d  # FP8: one byte per element; FP16 reads twice as many
    row.update(fp8_vs_fp16=row["fp16_us"] / row["fp8_us"], fp8_gbps=kv_bytes / row["fp8_us"] / 1e3,
               fp16_gbps=2 * kv_bytes / row["fp16_us"] / 1e3, sets=len(sets))
    return row


def prefill_configs(grid: Grid) -> list[tuple[str, int, int]]:
    return [(m, b, s) for s in grid.seqs for m in MODELS for b in grid.batches]


def decode_configs(grid: Grid) -> list[tuple[str, int, int]]:
    return [(m, b, c) for c in grid.contexts for m in MODELS for b in grid.decode_batches]


def correct(row: dict) -> bool:
    return row.get("fp8_err", math.nan) <= MAX_REL_ERR and row.get("fp16_err", math.nan) <= MAX_REL_ERR


def judge(rows: list[dict], column: str, bar: float, wanted: int, where: str) -> dict:
    """{met, result} of "every row's `column` >= bar" over the `wanted` configurations of `where`: met only when all
    were measured (and computed the right result), missed as soon as one measured row falls short."""
    rows = [r for r in rows if correct(r) and r.get(column) is not None]
    if not rows:
        return dict(met=None, result=f"not measured ({where})")
    worst = min(rows, key=lambda r: r[column])
    at = f"{worst['model']} b{worst['batch']} " + (f"s{worst['seq']}" if "seq" in worst else f"ctx{worst['context']}")
    met = all(r[column] >= bar for r in rows)
    verdict = "met" if met and len(rows) == wanted else "missed" if not met else "not established"
    text = f"{verdict}: min {worst[column]:.2f}x ({at}) over {len(rows)} of {wanted} configs, {where}"
    return dict(met=None if verdict == "not established" else met, result=text)


def targets(prefill: list[dict], decode: list[dict], grid: Grid) -> dict:
    """The issue-5 attention targets, each {met: True / False / None, result: text}, judged on the rows that exist
    and computed the right result."""
    n_models, seq, context = len(MODELS), grid.seqs[0], grid.contexts[0]
    at_seq = [r for r in prefill if r["seq"] == seq]
    out = {
        "fp8_prefill_faster_than_fp16_everywhere": judge(prefill, "fp8_vs_fp16", 1.0 + 1e-9, len(prefill_configs(grid)),
                                                         "all prefill configs"),
        "fp8_prefill_ge_1.3x_sdpa_flash": judge(at_seq, "fp8_vs_sdpa", 1.3, n_models * len(grid.batches), f"seq {seq}"),
        "fp8_prefill_ge_1.3x_sdpa_cudnn": judge(at_seq, "fp8_vs_cudnn", 1.3, n_models * len(grid.batches), f"seq {seq}"),
        "decode_fp8_ge_1.6x_fp16": judge([r for r in decode if r["context"] == context], "fp8_vs_fp16", 1.6,
                                         n_models * len(grid.decode_batches), f"{context} tokens"),
    }
    wrong = [r for r in prefill + decode if not correct(r)]
    if wrong:
        out["wrong_results"] = dict(met=False, result=", ".join(
            f"{r['model']} b{r['batch']} " + (f"s{r['seq']}" if "seq" in r else f"ctx{r['context']}") +
            f" (err fp8 {r.get('fp8_err', math.nan):.2g}, fp16 {r.get('fp16_err', math.nan):.2g})" for r in wrong))
    return out


def tables(prefill: list[dict], decode: list[dict]) -> str:
    parts = []
    if prefill:
        parts += ["### Prefill attention, causal (microseconds; err = relative L2 error against SDPA)\n",
                  markdown(prefill, PREFILL_COLUMNS), ""]
    if decode:
        parts += ["### Decode attention, one new token over the cache (err against fp32 torch)\n",
                  markdown(decode, DECODE_COLUMNS), ""]
    return "\n".join(parts)


@click.command()
@click.option("--phase", type=click.Choice(["all", "prefill", "decode"]), default="all", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/fmha.json"), show_default=True)
@click.option("--rows", "rows_path", type=click.Path(path_type=Path), default=None,
              help="also append every row as a JSON line here the moment it is measured")
@click.option("--rep-ms", default=REP_MS, show_default=True, help="do_bench repetition time per measurement (ms)")
@click.option("--dry-run", is_flag=True, help="tiny sizes on the Triton CPU interpreter, host-clock timings")
def main(phase: str, out: Path, rows_path: Path | None, rep_ms: int, dry_run: bool) -> None:
    """Time the FP8 and FP16 attention kernels against torch SDPA; print Markdown tables, write JSON."""
    device = require_device(dry_run)
    grid = DRY if dry_run else FULL
    prefill, decode = [], []
    if phase in ("all", "prefill"):
        for model, b, s in prefill_configs(grid):
            prefill.append(bench_prefill(model, b, s, device, rep_ms, cudnn=s == grid.seqs[0]))
            emit(rows_path, "prefill", prefill[-1])
    if phase in ("all", "decode"):
        for model, b, context in decode_configs(grid):
            decode.append(bench_decode(model, b, context, device, rep_ms))
            emit(rows_path, "decode", decode[-1])
    goals = targets(prefill, decode, grid)
    click.echo("\n" + tables(prefill, decode))
    click.echo("### Targets\n\n" + "\n".join(f"- {k}: {v['result']}" for k, v in goals.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    out.write_text(json.dumps(dict(device=device_name, torch=torch.__version__, rep_ms=rep_ms, dry_run=dry_run,
                                   prefill=prefill, decode=decode, targets=goals), indent=1))
    click.echo(f"\nwrote {out}")


if __name__ == "__main__":
    main()
