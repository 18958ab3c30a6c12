"""Quantization time, peak memory and checkpoint size per format on SmolLM2-135M-Instruct.

    python -m benchmarks.quantization [--num_samples 32 --max_seq_len 256] [--out results.json]

(Run it as a module from the repository root: as a script, this file would shadow the `quantization` package.)
Each format runs `python -m quantization llm` in its own process, so the peak resident memory (from wait4) is that
run's alone. Sizes are the safetensors bytes against the fp16 source checkpoint. Prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.e2e_cpu import machine as cpu_machine
from llm_loader.gguf_convert import smollm2_checkpoint
from quantization.checkpoint_writer import checkpoint_bytes

RUNS = [
    ("fp8", []),
    ("fp8_pc", []),
    ("fp8_block", []),
    ("nvfp4", []),
    ("fp8", ["--kv_cache_quantization", "fp8"]),
    ("nvfp4", ["--kv_cache_quantization", "fp8", "--lm_head_quantization", "nvfp4"]),
]


def run_one(model: Path, out: Path, method: str, extra: list[str], num_samples: int, max_seq_len: int) -> dict:
    args = [sys.executable, "-m", "quantization", "llm", "--model_dir", str(model), "--output_dir", str(out),
            "--quantization", method, "--num_samples", str(num_samples), "--max_seq_len", str(max_seq_len), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr.read()}")
    return {"method": method, "flags": " ".join(extra), "seconds": round(seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "bytes": checkpoint_bytes(out)}


@click.command()
@click.option("--num_samples", default=32, show_default=True, help="Calibration samples of each run.")
@click.option("--max_seq_len", default=256, show_default=True, help="Tokens per calibration sample.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
def main(num_samples: int, max_seq_len: int, out: Path | None) -> None:
    """Quantization time, peak memory and checkpoint size per format on SmolLM2-135M-Instruct (a Markdown table)."""
    model = smollm2_checkpoint()
    fp16_bytes = checkpoint_bytes(model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, extra) in enumerate(RUNS):
            click.echo(f"[{i + 1}/{len(RUNS)}] {method} {' '.join(extra)}", err=True)
            results.append(run_one(model, Path(tmp) / str(i), method, extra, num_samples, max_seq_len))
            click.echo(f"    {results[-1]['seconds']} s, peak RSS {results[-1]['peak_rss_mib']} MiB", err=True)
    machine = f"{cpu_machine(with_load=True)}, torch {torch.__version__}"
    click.echo(f"SmolLM2-135M-Instruct, {num_samples} samples x {max_seq_len} tokens, {machine}\n")
    click.echo("| method | flags | time (s) | peak RSS (MiB) | safetensors bytes | vs fp16 |")
    click.echo("|---|---|---|---|---|---|")
    click.echo(f"| fp16 source | | | | {fp16_bytes:,} | 1.00 |")
    for r in results:
        click.echo(f"| {r['method']} | {r['flags']} | {r['seconds']} | {r['peak_rss_mib']} | {r['bytes']:,} | "
                   f"{r['bytes'] / fp16_bytes:.2f} |")
    if out:
        out.write_text(json.dumps({"machine": machine, "fp16_bytes": fp16_bytes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
