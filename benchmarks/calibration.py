"""How much calibration is enough: calibration size against the time it takes and the accuracy it buys, the
measurement behind `llm-quantize --calibration quick` (docs/quantization.md, "Calibration size").

For each method and size (samples x tokens per sample): `llm-quantize llm` on SmolLM2-135M-Instruct calibrated on
tinyshakespeare (the shared full text, which holds more than 512 samples of 512 tokens), timed as a child process
(wall and CPU seconds, model load included); then export, build (the default CPU engine) and score on WikiText-2
windows through the engines: KL(FP16 engine || recipe) per token and top-1 agreement, each with a 95% bootstrap
interval over the windows, and the perplexity increase beside them. Sizes share the FP16 engine and the windows.

    python -m benchmarks.calibration [--sizes 32x256,64x256,128x512,512x512] [--methods fp8,nvfp4] [--windows 8]

Writes docs/calibration.json and prints the Markdown table docs/quantization.md quotes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.accuracy import CALIB, ROOT, log_softmax, run, window_logits, windows
from benchmarks.e2e_cpu import machine


def quantize_timed(ckpt: Path, out: Path, method: str, samples: int, tokens: int) -> dict:
    """`llm-quantize llm` in a child process: its wall and CPU seconds, and what its report says it used."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "quantization", "llm", "--model_dir", str(ckpt), "--output_dir", str(out),
           "--quantization", method, "--text_dataset", str(CALIB), "--num_samples", str(samples),
           "--max_seq_len", str(tokens)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    report = json.loads((out / "quantization_report.json").read_text())
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, **report["calibration"]}


def build(src: Path, work: Path) -> Path:
    onnx_out, engine = work / "onnx", work / "engine"
    run([sys.executable, "-m", "llm_loader.export_all_cli", src, onnx_out])
    run(["llm-build", "--onnxDir", onnx_out / "llm", "--engineDir", engine, "--backend", "onnxruntime",
         "--maxBatchSize", 1, "--maxInputLen", 512, "--maxKVCacheCapacity", 512])
    return engine


def interval(per_window: list[float], weights: list[int], rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval of the token-weighted mean over windows."""
    values, w = np.array(per_window), np.array(weights, float)
    picks = rng.integers(0, len(values), (2000, len(values)))
    means = (values[picks] * w[picks]).sum(1) / w[picks].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@click.command()
@click.option("--sizes", default="32x256,64x256,128x512,512x512", show_default=True, help="samples x tokens.")
@click.option("--methods", default="fp8,nvfp4", show_default=True)
@click.option("--windows", "n_windows", default=8, show_default=True, help="WikiText-2 windows to score.")
@click.option("--window_len", default=256, show_default=True)
@click.option("--work", default=str(ROOT / "work_out" / "calibration"), show_default=True)
def main(sizes: str, methods: str, n_windows: int, window_len: int, work: str) -> None:
    """Calibration time and accuracy per calibration size."""
    from llm_loader.gguf_convert import smollm2_checkpoint
    from runtime.engine import Engine

    ckpt, work_dir = smollm2_checkpoint(), Path(work)
    texts = windows(ckpt, n_windows, window_len)
    fp16 = Engine.load(build(ckpt, work_dir / "fp16") if not (work_dir / "fp16/engine").exists()
                       else work_dir / "fp16/engine")
    reference = [log_softmax(window_logits(fp16, ids))[:-1] for ids in texts]
    del fp16
    rows, rng = [], np.random.default_rng(0)
    for method in methods.split(","):
        for size in sizes.split(","):
            samples, tokens = map(int, size.split("x"))
            name = f"{method}-{samples}x{tokens}"
            row = {"method": method, "size": size, **quantize_timed(ckpt, work_dir / name / "ckpt", method, samples,
                                                                    tokens)}
            engine = Engine.load(build(work_dir / name / "ckpt", work_dir / name))
            kl, top1, nll, count = [], [], [], []
            for ids, ref in zip(texts, reference):
                lp = log_softmax(window_logits(engine, ids))[:-1]
                kl.append(float((np.exp(ref) * (ref - lp)).sum(-1).mean()))
                top1.append(float((lp.argmax(-1) == ref.argmax(-1)).mean()))
                nll.append(float(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))
                count.append(len(ids) - 1)
            base_nll = np.average([-r[np.arange(len(i) - 1), i[1:]].mean() for i, r in zip(texts, reference)],
                                  weights=count)
            row.update(kl=float(np.average(kl, weights=count)), kl_ci=interval(kl, count, rng),
                       top1=float(np.average(top1, weights=count)), top1_ci=interval(top1, count, rng),
                       ppl_increase=math.exp(np.average(nll, weights=count) - base_nll) - 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    result = {"machine": machine(), "load_average_1_5_15": load, "windows": n_windows, "window_len": window_len,
              "rows": rows}
    (ROOT / "docs" / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{machine()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)\n")
    print("| method | samples x tokens | tokens used | quantize wall s | CPU s | KL (95% CI) | top-1 (95% CI) "
          "| perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['size']} | {r['tokens']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['kl']:.4f} "
              f"({r['kl_ci'][0]:.4f}-{r['kl_ci'][1]:.4f}) | {100 * r['top1']:.2f}% ({100 * r['top1_ci'][0]:.2f}-"
              f"{100 * r['top1_ci'][1]:.2f}) | {100 * r['ppl_increase']:+.2f}% |")


if __name__ == "__main__":
    main()
