"""How much calibration is enough: calibration size against the time it takes and the accuracy it buys, the
measurement behind `llm-quantize --calibration quick` (docs/quantization.md, "Calibration size").

One forward pass of SmolLM2-135M-Instruct (fp32, CPU, as `llm-quantize` runs it) over 512 samples x 512 tokens of
tinyshakespeare (the shared full text) records, per sample, the input amax of every decoder linear over its first
256 tokens and over the rest (a causal model computes the first 256 tokens the same whether or not the sample goes
on). A size "n x L" is then the first n samples cut at L tokens: its static scales are the max of those records,
exactly what calibrating on those tokens gives. For each size and method (fp8, nvfp4) the quantizer's own writer
makes the checkpoint, which is exported, built (the default CPU engine) and scored on WikiText-2 windows through the
engines against the FP16 engine: KL(FP16 engine || recipe) per token and top-1 agreement, each with a 95%
bootstrap interval over the windows, and the perplexity change beside them.

Time: the pass's measured seconds per calibration token times the size's tokens, plus the fixed part of a
quantizer run (load, tokenize, quantize, write: a real `llm-quantize` run with 1 sample x 16 tokens). Both are
measured here, on a shared machine: the load average is recorded.

    python -m benchmarks.calibration [--samples 512] [--sizes 16x256,32x256,64x256,128x256,128x512,256x512,512x512]

Writes docs/calibration.json and prints the Markdown table docs/quantization.md quotes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.accuracy import CALIB, ROOT, run, window_log_probs, windows
from benchmarks.e2e_cpu import machine

WINDOW = 256  # the record splits each sample at this many tokens


def record_amax(model, batches, names: list[str]) -> tuple[dict[str, torch.Tensor], float, float, int]:
    """({linear: [samples, 2] amax over tokens [0, 256) and [256, ...)}, wall s, CPU s, tokens) of one pass."""
    modules = dict(model.named_modules())
    records: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    state = {}

    def hook(name):
        def record(_module, args):
            a = args[0].detach().abs().amax(-1) * state["mask"]  # [B, S], zero on padding
            records[name].append(torch.stack([a[:, :WINDOW].amax(1), a[:, WINDOW:].amax(1) if a.shape[1] > WINDOW
                                              else torch.zeros(a.shape[0])], dim=1))
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            state["mask"] = batch.attention_mask.float()
            tokens += int(batch.attention_mask.sum())
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            print(f"pass: batch {i + 1}/{len(batches)}, {tokens} tokens, {time.perf_counter() - start:.0f} s",
                  flush=True)
    for h in handles:
        h.remove()
    return ({n: torch.cat(r) for n, r in records.items()}, time.perf_counter() - start, time.process_time() - cpu,
            tokens)


def fixed_seconds(ckpt: Path, out: Path) -> float:
    """Wall seconds of an `llm-quantize` run whose calibration is nearly nothing: its load and write cost."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantization", "llm", "--model_dir", ckpt, "--output_dir", out,
                    "--quantization", "fp8", "--text_dataset", CALIB, "--num_samples", "1", "--max_seq_len", "16"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def write_checkpoint(model, ckpt: Path, out: Path, method: str, amax: dict[str, float]) -> None:
    """The checkpoint `llm-quantize llm --quantization METHOD` writes from these input amax values."""
    from contract.jsonfile import read_json
    from quantization import checkpoint_writer as writer
    from quantization.calibrate import Calibration
    from quantization.cli import LlmOptions, quantization_plan, write_quantized
    from quantization.report import build_report

    plan = quantization_plan(model, LlmOptions(ckpt, out, quantization=method))
    state_dict = {k: v.detach().float() for k, v in model.state_dict().items()}
    config = read_json(ckpt / "config.json", "the model config")
    if config.get("tie_word_embeddings"):
        state_dict.pop("lm_head.weight", None)
    qt = writer.quantize_state_dict(state_dict, plan, amax, {})
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    report = build_report(Calibration(input_amax=amax), method, False, [], qt.excluded, 0)
    write_quantized(qt, config, linears, report, method, False, [], source_dir=ckpt, output_dir=out,
                    max_shard_bytes=writer.DEFAULT_MAX_SHARD_BYTES)


def build(src: Path, work: Path) -> Path:
    onnx_out, engine = work / "onnx", work / "engine"
    if not (engine / "config.json").exists():
        run([sys.executable, "-m", "llm_loader.export_all_cli", src, onnx_out])
        run(["llm-build", "--onnxDir", onnx_out / "llm", "--engineDir", engine, "--backend", "onnxruntime",
             "--maxBatchSize", 1, "--maxInputLen", 512, "--maxKVCacheCapacity", 512])
    return engine


def interval(per_window: list[float], rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval of the mean over windows (all windows have the same length)."""
    values = np.array(per_window)
    means = values[rng.integers(0, len(values), (2000, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@click.command()
@click.option("--samples", default=512, show_default=True, help="Samples of the one pass (the largest size's).")
@click.option("--sizes", default="16x256,32x256,64x256,128x256,128x512,256x512,512x512", show_default=True,
              help="samples x tokens, each L 256 or 512.")
@click.option("--methods", default="fp8,nvfp4", show_default=True)
@click.option("--windows", "n_windows", default=8, show_default=True, help="WikiText-2 windows to score.")
@click.option("--window_len", default=256, show_default=True)
@click.option("--work", default=str(ROOT / "work_out" / "calibration"), show_default=True)
def main(samples: int, sizes: str, methods: str, n_windows: int, window_len: int, work: str) -> None:
    """Calibration time and accuracy per calibration size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_loader.gguf_convert import smollm2_checkpoint
    from quantization.cli import CHARS_PER_TOKEN
    from quantization.datasets import load_texts, make_batches
    from runtime.engine import Engine

    ckpt, work_dir = smollm2_checkpoint(), Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    fixed = fixed_seconds(ckpt, work_dir / "fixed")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    texts = load_texts(str(CALIB), samples, 2 * WINDOW * CHARS_PER_TOKEN, seed=0)
    batches = list(make_batches(AutoTokenizer.from_pretrained(ckpt), texts, 2 * WINDOW, 4))
    records, wall, cpu, pass_tokens = record_amax(model, batches, names)
    loads.append(os.getloadavg()[0])
    lengths = torch.cat([b.attention_mask.sum(1) for b in batches])

    test = windows(ckpt, n_windows, window_len)
    fp16 = Engine.load(build(ckpt, work_dir / "fp16"))
    reference = [window_log_probs(fp16, ids) for ids in test]
    del fp16
    rows, rng = [], np.random.default_rng(0)
    for size in sizes.split(","):
        n, length = map(int, size.split("x"))
        columns = 1 if length <= WINDOW else 2
        amax = {name: float(r[:n, :columns].max()) for name, r in records.items()}
        tokens = int(lengths[:n].clamp(max=length).sum())
        for method in methods.split(","):
            out = work_dir / f"{method}-{size}"
            if not (out / "ckpt" / "config.json").exists():
                write_checkpoint(model, ckpt, out / "ckpt", method, amax)
            engine = Engine.load(build(out / "ckpt", out))
            kl, top1, nll, base = [], [], [], []
            for ids, ref in zip(test, reference):
                lp = window_log_probs(engine, ids)
                kl.append(float((np.exp(ref) * (ref - lp)).sum(-1).mean()))
                top1.append(float((lp.argmax(-1) == ref.argmax(-1)).mean()))
                nll.append(float(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))
                base.append(float(-ref[np.arange(len(ids) - 1), ids[1:]].mean()))
            rows.append({"method": method, "size": size, "samples": n, "tokens": tokens,
                         "seconds": fixed + tokens * wall / pass_tokens, "kl": float(np.mean(kl)),
                         "kl_ci": interval(kl, rng), "top1": float(np.mean(top1)), "top1_ci": interval(top1, rng),
                         "ppl_change": math.exp(np.mean(nll) - np.mean(base)) - 1})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(), "load_average_1min": loads, "pass": {"tokens": pass_tokens, "wall_s": wall,
              "cpu_s": cpu}, "fixed_s": fixed, "windows": n_windows, "window_len": window_len, "rows": rows}
    (ROOT / "docs" / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{machine()}, 1-minute load average {min(loads):.0f}-{max(loads):.0f}; the pass: {pass_tokens} tokens in "
          f"{wall:.0f} s wall ({pass_tokens / wall:.0f} tokens/s, {cpu:.0f} s CPU); fixed part {fixed:.0f} s\n")
    print("| method | samples x tokens | tokens | quantize time (est.) | KL (95% CI) | top-1 (95% CI) | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['size']} | {r['tokens']} | {r['seconds'] / 60:.1f} min | {r['kl']:.4f} "
              f"({r['kl_ci'][0]:.4f}-{r['kl_ci'][1]:.4f}) | {100 * r['top1']:.2f}% ({100 * r['top1_ci'][0]:.2f}-"
              f"{100 * r['top1_ci'][1]:.2f}) | {100 * r['ppl_change']:+.2f}% |")


if __name__ == "__main__":
    main()
