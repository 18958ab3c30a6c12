"""How much calibration is enough: calibration size against the time it takes and the accuracy it buys, the
measurement behind `llm-quantize --calibration quick` (docs/quantization.md, "Calibration size").

One forward pass of SmolLM2-135M-Instruct (fp32, CPU, as `llm-quantize` runs it) over `--samples` samples of up to
512 tokens of tinyshakespeare records, per sample, the input amax of every decoder linear over its first 256 tokens
and over the rest (a causal model computes the first 256 tokens the same whether or not the sample goes on). A size
"n x L" is then the first n samples cut at L tokens: its static scales are the max of those records, exactly what
calibrating on those tokens gives. For each size and method the quantizer's own writer makes the checkpoint:
- fp8: `llm-quantize --quantization fp8 --no-gptq` (amax input scales, shared q/k/v and gate/up weight scales; the
  default until FP8 GPTQ, whose Hessian also comes from the calibration data, was turned on: not measured here);
- nvfp4: the amax-scale recipe, "nvfp4 (amax)" on docs/accuracy.md (`--smoothing none --scale_search amax
  --no-fuse_scales --no-gptq`). The default's AWQ search, MSE scale search and GPTQ use calibration statistics of
  their own and take hours on the shared machine: not measured here.
Each checkpoint is exported, built (the default CPU engine) and scored on WikiText-2 windows against the FP16 engine
with `benchmarks/accuracy.py`'s scoring and `benchmarks/stats.py`'s intervals, the same as the accuracy page: KL(FP16
engine || recipe) per token and top-1 agreement with 95% bootstrap intervals over the windows, the perplexity change
beside them, and each size's paired difference against `quick` (a difference whose interval holds 0 is noise).

Time: the pass's measured seconds per calibration token times the size's tokens, plus the fixed part of a
quantizer run (load, tokenize, quantize, write: a real `llm-quantize` run with 1 sample x 16 tokens). Both are
measured here, on a shared machine: the load average is recorded. The pass and the fixed part are cached under
--work, as are checkpoints, engines, the FP16 reference and the scores, so an interrupted sweep resumes; the JSON is
rewritten after every row.

    python -m benchmarks.calibration [--samples 512] [--sizes 16x256,32x256,64x256,128x256,128x512,256x512,512x512]

Writes docs/calibration.json (or --out) and prints the Markdown table docs/quantization.md quotes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from benchmarks import stats
from benchmarks.accuracy import CALIB, ROOT, reference, run, score_recipe, windows
from benchmarks.e2e_cpu import machine

WINDOW = 256  # the record splits each sample at this many tokens
MAX_LEN = 2 * WINDOW  # longest calibration sample, and the engines' input length and KV capacity
# llm-quantize's recipe flags per method (the module docstring): nothing here needs calibration statistics besides
# the input amax (no smoothing, scale search or GPTQ)
RECIPES = {"fp8": dict(quantization="fp8", gptq=False),  # --no-gptq
           "nvfp4": dict(quantization="nvfp4", smoothing="none", scale_search="amax", fuse_scales=False, gptq=False)}


def record_amax(model, batches, names: list[str]) -> tuple[dict[str, torch.Tensor], float, float, int]:
    """({linear: [samples, 2] amax over tokens [0, 256) and [256, ...)}, wall s, CPU s, tokens) of one pass.
    The records are allocated before the pass: keeping thousands of small tensors made inside it grew the process
    to 19 GB at 128 samples (heap fragmentation, presumably) and the OOM killer stopped it."""
    modules = dict(model.named_modules())
    records = {n: torch.zeros(sum(len(b.input_ids) for b in batches), 2) for n in names}
    state = {}

    def hook(name):
        def record(_module, args):
            a = args[0].detach().abs().amax(-1) * state["mask"]  # [B, S], zero on padding
            rows = records[name][state["row"]:state["row"] + len(a)]
            torch.amax(a[:, :WINDOW], 1, out=rows[:, 0])
            if a.shape[1] > WINDOW:
                torch.amax(a[:, WINDOW:], 1, out=rows[:, 1])
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    state["row"] = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibration pass", unit="batch"):
            state["mask"] = batch.attention_mask.float()
            tokens += int(batch.attention_mask.sum())
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            state["row"] += len(batch.input_ids)
    for h in handles:
        h.remove()
    return records, time.perf_counter() - start, time.process_time() - cpu, tokens


def fixed_seconds(ckpt: Path) -> float:
    """Wall seconds of an `llm-quantize` run whose calibration is nearly nothing: its load and write cost."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantization", "llm", "--model_dir", ckpt, "--output_dir",
                        Path(tmp) / "out", "--quantization", "fp8", "--text_dataset", CALIB, "--num_samples", "1",
                        "--max_seq_len", "16"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def measure_pass(ckpt: Path, model, samples: int, work_dir: Path) -> dict:
    """The recorded amax and the timings of the pass and of the fixed part (cached in --work per sample count)."""
    from transformers import AutoTokenizer

    from quantization.datasets import CHARS_PER_TOKEN, load_texts, make_batches

    cache = work_dir / f"pass_{samples}.pt"
    if cache.exists():
        return torch.load(cache)
    load_before = os.getloadavg()[0]
    fixed = fixed_seconds(ckpt)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    texts = load_texts(str(CALIB), samples, MAX_LEN * CHARS_PER_TOKEN, seed=0)
    batches = list(make_batches(AutoTokenizer.from_pretrained(ckpt), texts, MAX_LEN, 4))
    records, wall, cpu, tokens = record_amax(model, batches, names)
    measured = {"records": records, "lengths": torch.cat([b.attention_mask.sum(1) for b in batches]),
                "pass": {"samples": len(texts), "tokens": tokens, "wall_s": wall, "cpu_s": cpu}, "fixed_s": fixed,
                "load_average_1min": [load_before, os.getloadavg()[0]]}
    torch.save(measured, cache)
    return measured


def write_checkpoint(model, ckpt: Path, out: Path, method: str, amax: dict[str, float], data: dict) -> None:
    """The checkpoint `llm-quantize llm` with METHOD's recipe flags (`RECIPES`) writes from these input amax values,
    through the quantizer's own tail (`quantization.pipeline.TAIL`); `data` is what the size holds, for its report."""
    from contract.families import family_of_model
    from contract.jsonfile import read_json
    from quantization import pipeline
    from quantization.calibrate import Calibration
    from quantization.options import LlmOptions

    o = LlmOptions(model_dir=ckpt, output_dir=out, **RECIPES[method])
    family = family_of_model(model)
    run = pipeline.Run(o, read_json(ckpt / "config.json", "the model config"), family, data=data, model=model,
                       plan=pipeline.quantization_plan(model, o, family), calibration=Calibration(input_amax=amax))
    for step in pipeline.TAIL:
        step(run)


def build(src: Path, folder: Path) -> Path:
    """export -> `llm-build` (ONNX Runtime) of `src` into `folder/engine` (cached). The KV capacity is the longest
    window, not accuracy.py's 4096: the logits are the same and the windows run faster."""
    onnx_out, engine = folder / "onnx", folder / "engine"
    if not (engine / "config.json").exists():
        run([sys.executable, "-m", "llm_loader.export_all_cli", src, onnx_out])
        run(["llm-build", "--onnxDir", onnx_out / "llm", "--engineDir", engine, "--backend", "onnxruntime",
             "--maxBatchSize", 1, "--maxInputLen", MAX_LEN, "--maxKVCacheCapacity", MAX_LEN])
    return engine


def parse_sizes(sizes: str, samples: int) -> list[tuple[int, int]]:
    parsed = []
    for size in sizes.split(","):
        try:
            n, length = map(int, size.split("x"))
        except ValueError:
            raise click.BadParameter(f"expected samples x tokens like 64x256, found {size!r}", param_hint="--sizes")
        if not 1 <= n <= samples or length not in (WINDOW, MAX_LEN):
            raise click.BadParameter(f"expected n <= --samples ({samples}) and L {WINDOW} or {MAX_LEN}, found {size}",
                                     param_hint="--sizes")
        parsed.append((n, length))
    return parsed


def table(result: dict) -> str:
    """The Markdown table docs/quantization.md quotes."""
    lines = ["| method | samples x tokens | calibration tokens | quantize time (est.) | KL (95% CI) | top-1 (95% CI) | "
             "perplexity change | vs quick: KL, top-1 |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["method"], r["tokens"])):
        kl, top1, ppl = (stats.Interval(*r[k]) for k in ("kl", "top1", "ppl_increase"))
        lines.append(f"| {r['method']} | {r['size']} | {r['tokens']} | {r['seconds'] / 60:.1f} min | {kl.fmt('.4f')} | "
                     f"{top1.fmt('.2f', 100, '%')} | {ppl.fmt('+.2f', 100, '%')} | {r['vs_quick']} |")
    return "\n".join(lines)


@click.command()
@click.option("--samples", default=512, show_default=True, help="Samples of the one pass (the largest size's).")
@click.option("--sizes", default="16x256,32x256,64x256,128x256,128x512,256x512,512x512", show_default=True,
              help="samples x tokens per sample, L 256 or 512 (quick's size, if listed, is scored first).")
@click.option("--methods", default="fp8,nvfp4", show_default=True, help="fp8 and/or nvfp4 (see the module doc).")
@click.option("--windows", "n_windows", default=8, show_default=True, help="WikiText-2 windows to score.")
@click.option("--window_len", default=512, show_default=True, type=click.IntRange(2, MAX_LEN),
              help="Tokens per window (the accuracy page's 512).")
@click.option("--work", default=str(ROOT / "work_out" / "calibration"), show_default=True, help="Scratch directory.")
@click.option("--out", default=str(ROOT / "docs" / "calibration.json"), show_default=True, help="Result JSON.")
def main(samples: int, sizes: str, methods: str, n_windows: int, window_len: int, work: str, out: str) -> None:
    """Calibration time and accuracy (KL, top-1, perplexity against the FP16 engine) per calibration size."""
    from transformers import AutoModelForCausalLM

    from llm_loader.gguf_convert import smollm2_checkpoint
    from quantization.cli import CALIBRATION_PRESETS

    size_list, method_list = parse_sizes(sizes, samples), methods.split(",")
    unknown = set(method_list) - set(RECIPES)
    if unknown:
        raise click.BadParameter(f"expected fp8 or nvfp4, found {sorted(unknown)}", param_hint="--methods")
    started = time.perf_counter()
    ckpt, work_dir = smollm2_checkpoint(), Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    measured = measure_pass(ckpt, model, samples, work_dir)
    if max(n for n, _ in size_list) > measured["pass"]["samples"]:
        raise click.BadParameter(f"expected at most the {measured['pass']['samples']} samples the calibration text "
                                 f"gave, found {sizes}", param_hint="--sizes")
    per_token = measured["pass"]["wall_s"] / measured["pass"]["tokens"]

    wins = windows(ckpt, n_windows, window_len)
    fp16 = build(ckpt, work_dir / "fp16")
    ref = reference(fp16, work_dir / "fp16" / "reference", wins)
    base = score_recipe(fp16, ref, wins, work_dir / "fp16" / f"scores_{n_windows}x{window_len}.npz")
    idx = stats.draws(n_windows)
    quick = tuple(CALIBRATION_PRESETS["quick"])
    result = {"command": "python -m benchmarks.calibration " + " ".join(map(shlex.quote, sys.argv[1:])),
              "machine": machine(), **{k: v for k, v in measured.items() if k not in ("records", "lengths")},
              "seconds_per_token": per_token, "windows": n_windows, "window_len": window_len, "rows": []}
    scores: dict[tuple[str, tuple[int, int]], stats.TokenScores] = {}
    for method in method_list:
        for n, length in sorted(size_list, key=lambda s: s != quick):  # quick first: the others compare with it
            size = f"{n}x{length}"
            amax = {name: float(r[:n, :1 if length <= WINDOW else 2].max()) for name, r in measured["records"].items()}
            tokens = int(measured["lengths"][:n].clamp(max=length).sum())
            folder = work_dir / f"{method}-{size}"
            if not (folder / "ckpt" / "config.json").exists():
                write_checkpoint(model, ckpt, folder / "ckpt", method, amax,
                                 {"samples": n, "max_seq_len": length, "tokens": tokens, "warnings": []})
            s = scores[method, (n, length)] = score_recipe(build(folder / "ckpt", folder), ref, wins,
                                                           folder / f"scores_{n_windows}x{window_len}.npz")
            figures = stats.summary(s, base, idx)
            vs_quick = ""
            if (method, quick) in scores and (n, length) != quick:
                q = scores[method, quick]
                d_kl = stats.interval(stats.difference(stats.kl_mean(s), stats.kl_mean(q)), idx)
                d_top1 = stats.interval(stats.difference(stats.top1(s), stats.top1(q)), idx)
                vs_quick = f"{stats.compare(d_kl)}, {stats.compare(d_top1, '+.2f', 100, '%')}"
            result["rows"].append({"method": method, "size": size, "samples": n, "tokens": tokens,
                                   "seconds": measured["fixed_s"] + tokens * per_token, "vs_quick": vs_quick,
                                   **{k: [v.value, v.lo, v.hi] for k, v in figures.items()}})
            result["load_average_1min"].append(os.getloadavg()[0])
            result["wall_s"] = time.perf_counter() - started
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result["rows"][-1]), flush=True)

    loads, p = result["load_average_1min"], result["pass"]
    print(f"\n{result['machine']}, 1-minute load average {min(loads):.1f}-{max(loads):.1f}; the pass: {p['tokens']} "
          f"tokens in {p['wall_s']:.0f} s wall ({1000 * per_token:.1f} ms/token, {p['cpu_s']:.0f} s CPU); fixed part "
          f"{result['fixed_s']:.0f} s; this run {result['wall_s'] / 60:.1f} min\n")
    print(table(result))


if __name__ == "__main__":
    main()
