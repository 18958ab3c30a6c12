"""EAGLE3 speculative decoding on the CPU engine: acceptance and decode speed against plain greedy decoding.

SmolLM2-135M-Instruct (the cached fp16 checkpoint) with an EAGLE3 draft (`--draft`, e.g. the one examples/eagle/
trains), through the real pipeline: export (`--eagle-base --eagle-draft-dir`, the draft, and a vanilla export), one
spec engine dir (`llm-build --specBase` + `--specDraft`) and one vanilla engine, both ONNX Runtime. Held-out prompts:
WikiText-2 test passages (raw text, continued as text; the draft trains on other text) and general chat
instructions (chat template). For every prompt, in one process and interleaved so that machine load hits all sides
alike: plain greedy on the vanilla engine, then speculative decoding with each tree shape (batch 1, greedy).
Reports per shape: mean tokens emitted per verification step, decode tokens/s and its ratio to plain decoding, and
whether every output is token-identical to plain greedy. Plain decoding runs twice per prompt, with ONNX Runtime's
default spinning worker threads and without (`EDGELLM_ORT_SPINNING=0`, what the spec engines use), and the faster of
the two is the baseline: on a busy machine spinning threads lose, on an idle one they win, and the ratio must not
come from the baseline's setting.

    python -m benchmarks.eagle_cpu --draft DRAFT_DIR [--work work_out/eagle] [--new_tokens 128]
        [--shapes 1x4x5,2x4x9,...]   # top_k x steps x verify_size

Writes docs/eagle-cpu.json and prints the markdown table for docs/eagle-cpu.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from benchmarks import stats
from benchmarks.accuracy import WIKITEXT
from benchmarks.e2e_cpu import machine

ROOT = Path(__file__).resolve().parents[1]
CHAT = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short email asking a colleague to move a meeting to Friday.",
    "What are three good habits for staying healthy?",
    "Describe the water cycle in simple terms.",
    "Give me a recipe for a quick vegetable soup.",
    "Why do leaves change color in the autumn?",
    "Write a short story about a robot who learns to paint.",
    "What is the difference between weather and climate?",
    "List some tips for learning a new language.",
    "How does a bicycle stay upright when it moves?",
    "Summarize the plot of a typical detective novel.",
    "Write a haiku about the ocean and explain it.",
]


def wikitext_prompts(tokenizer, path: Path, n: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `n` WikiText-2 test paragraphs that have at least twice as many."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        ids = tokenizer.encode(line)
        if len(ids) >= 2 * length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            return prompts
    return prompts


def chat_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    from runtime.chat import format_prompt
    from runtime.requests import Message

    return [format_prompt(tokenizer, [Message("user", [{"type": "text", "text": q}])], True, True, False).token_ids
            for q in CHAT[:n]]


def acceptance(sel: list[dict], key: str) -> stats.Interval:
    """Tokens emitted per verification step of tree `key` over the prompts `sel` (all emitted / all steps), with the
    95% bootstrap interval over prompts (`benchmarks.stats`, as the other benchmarks)."""
    emitted = np.array([r["shapes"][key]["emitted"] for r in sel], dtype=float)
    steps = np.array([r["shapes"][key]["steps"] for r in sel], dtype=float)

    def per_step(i: np.ndarray) -> float:
        total = steps[i].sum()
        return float(emitted[i].sum() / total) if total else 0.0

    return stats.interval(per_step, stats.draws(len(sel)))


def parse_shapes(text: str):
    from runtime.eagle_tree import TreeShape

    return [TreeShape(*(int(x) for x in part.split("x"))) for part in text.split(",")]


def draft_identity(draft: Path) -> dict:
    """The draft the work dir's engines were built from: a digest of its config and weights (what identifies it) and
    its resolved path (what an error names)."""
    digest = hashlib.sha256()
    for path in sorted([draft / "config.json", *draft.glob("*.safetensors")]):
        digest.update(path.name.encode() + path.read_bytes())
    return {"draft": str(draft.resolve()), "sha256": digest.hexdigest()}


def check_work_dir(work: Path, draft: Path) -> None:
    """Refuse a work dir whose engines were built from another draft (or that no run of this benchmark stamped):
    reusing them would measure the wrong draft. A fresh work dir is stamped with `draft`."""
    stamp, expected = work / "draft.json", draft_identity(draft)
    built = [p for p in (work / "spec-engine", work / "vanilla-engine") if p.exists()]
    try:
        found = json.loads(stamp.read_text()) if stamp.exists() else None
    except (ValueError, UnicodeDecodeError):
        found = {"draft": f"an unreadable {stamp.name}"}
    same = isinstance(found, dict) and found.get("sha256") == expected["sha256"]  # a moved draft is the same draft
    if (built or found) and not same:
        what = f"engines of {found.get('draft')}" if isinstance(found, dict) else "engines without a draft.json"
        raise click.BadParameter(f"{work}: expected a work dir of this draft ({draft}) or a fresh one, found {what}; "
                                 "pass another --work or delete it", param_hint="--work")
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(expected, indent=2) + "\n")


def build_engines(draft: Path, work: Path, shapes, capacity: int) -> tuple[Path, Path]:
    """(spec engine dir, vanilla engine dir), reused when already built from the same draft (`check_work_dir`)."""
    check_work_dir(work, draft)
    from builder.cli import build
    from llm_loader.export_all_cli import export
    from llm_loader.gguf_convert import smollm2_checkpoint

    ckpt = smollm2_checkpoint()
    spec, vanilla = work / "spec-engine", work / "vanilla-engine"
    limits = dict(backend="onnxruntime", max_batch_size=1, max_input_len=256, max_kv_cache_capacity=capacity)
    verify = max(s.verify_size for s in shapes)
    drafted = max(max(s.draft_tokens, 1) for s in shapes)
    if not (spec / "draft_config.json").exists():
        base_onnx = export(ckpt, work / "base-onnx", eagle_base=True, eagle_draft_dir=draft)
        build(base_onnx, spec, spec_base=True, max_verify_tree_size=verify, **limits)
        build(export(draft, work / "draft-onnx"), spec, spec_draft=True, max_draft_tree_size=drafted, **limits)
    if not (vanilla / "config.json").exists():
        build(export(ckpt, work / "vanilla-onnx"), vanilla, **limits)
    return spec, vanilla


def verify_costs(engines, vanilla, prompt: list[int], sizes: list[int], repeats: int = 15) -> dict[int, float]:
    """Median time of one base-engine call of T tokens (logits and hidden states at every token, what a verification
    returns) over the time of one plain decode step on the vanilla engine, both after `prompt`, taken alternately so
    machine load hits both alike: what a round's verification costs in plain steps."""
    from runtime.engine import causal_tree
    from runtime.spec_decode import OUTPUTS

    base, n = engines.base, len(prompt)
    ids = np.array([prompt], np.int32)
    base_cache, plain_cache = base.new_cache(1), vanilla.new_cache(1)
    mask, pos = causal_tree(np.zeros(1, np.int32), n)
    base.forward_tree(base_cache, base.embed(ids), np.array([n], np.int32), np.array([[n - 1]]), mask, pos)
    vanilla.forward(plain_cache, ids, np.array([n], np.int32), np.array([[n - 1]]))
    plain_cache.lengths[:] = n

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    def plain_step():
        vanilla.forward(plain_cache, ids[:, -1:], np.array([1], np.int32), np.array([[0]]))
        plain_cache.lengths[:] = n

    costs = {}
    for t in sizes:
        mask, pos = causal_tree(base_cache.lengths.copy(), t)
        embeds, last = base.embed(ids[:, -t:]), np.arange(t)[None]

        def tree_call():
            base.forward_tree(base_cache, embeds, np.array([t], np.int32), last, mask, pos, outputs=OUTPUTS,
                              commit=False)

        pairs = [(timed(tree_call), timed(plain_step)) for _ in range(repeats)]
        costs[t] = float(np.median([a for a, _ in pairs]) / np.median([b for _, b in pairs]))
    return costs


def summarize(rows: list[dict], tree_shapes) -> list[dict]:
    """Per tree shape and prompt kind (text, chat, all): acceptance with its interval, decode speeds, identity."""
    summary = []
    for shape in tree_shapes:
        key = f"{shape.top_k}x{shape.steps}x{shape.verify_size}"
        line = {"shape": key, "top_k": shape.top_k, "steps": shape.steps, "verify_size": shape.verify_size}
        for kind in ("text", "chat", "all"):
            sel = [r for r in rows if kind == "all" or r["kind"] == kind]
            spec_tps = sum(r["shapes"][key]["tokens"] for r in sel) / sum(r["shapes"][key]["decode_s"] for r in sel)
            plain_tps = sum(r["plain_tokens"] for r in sel) / min(sum(r["plain_spinning_s"] for r in sel),
                                                                   sum(r["plain_quiet_s"] for r in sel))
            tokens = sum(r["plain_tokens"] for r in sel)
            accepted = acceptance(sel, key)
            line[kind] = {"accepted_per_step": accepted.value, "accepted_per_step_95ci": [accepted.lo, accepted.hi],
                          "spec_tokens_per_s": spec_tps,
                          "plain_tokens_per_s": plain_tps, "speedup": spec_tps / plain_tps,
                          "plain_spinning_tokens_per_s": tokens / sum(r["plain_spinning_s"] for r in sel),
                          "plain_quiet_tokens_per_s": tokens / sum(r["plain_quiet_s"] for r in sel),
                          "identical": sum(r["shapes"][key]["identical"] for r in sel), "prompts": len(sel)}
        summary.append(line)
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--draft", "draft", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="EAGLE3 draft checkpoint for SmolLM2-135M-Instruct (plain or quantized).")
@click.option("--work", type=click.Path(path_type=Path), default=ROOT / "work_out" / "eagle", show_default=True,
              help="Where exports and engines go (reused when built from the same draft).")
@click.option("--new_tokens", default=128, show_default=True, help="Greedy tokens per prompt.")
@click.option("--text_prompts", default=8, show_default=True, type=click.IntRange(1),
              help="WikiText-2 test passages.")
@click.option("--chat_prompts", default=8, show_default=True, type=click.IntRange(1, len(CHAT)),
              help="Chat instructions.")
@click.option("--prompt_tokens", default=64, show_default=True, help="Tokens of each WikiText-2 prompt.")
@click.option("--shapes", default="1x4x5,1x6x7,2x4x9,3x4x12,4x5x16,10x6x60", show_default=True,
              help="Tree shapes top_k x steps x verify_size, comma-separated.")
@click.option("--verify_sizes", default="1,2,3,4,6,8,16,60", show_default=True,
              help="Tree sizes T whose verification-call cost (in plain decode steps) is measured; empty: none.")
@click.option("--wikitext", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=WIKITEXT,
              show_default=True, help="The WikiText-2 raw test split.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), default=ROOT / "docs" / "eagle-cpu.json",
              show_default=True)
def main(draft: Path, work: Path, new_tokens: int, text_prompts: int, chat_prompts: int, prompt_tokens: int,
         shapes: str, verify_sizes: str, wikitext: Path, out_json: Path) -> None:
    """Acceptance and decode speed of EAGLE3 speculative decoding against plain greedy on the CPU engine."""
    from runtime.chat import load_tokenizer
    from runtime.engine import Engine
    from runtime.generate import Job, generate
    from runtime.sampling import SamplingParams
    from runtime.spec_decode import SpecEngines, generate_spec

    tree_shapes = parse_shapes(shapes)
    spec_dir, vanilla_dir = build_engines(draft, work, tree_shapes, capacity=512)
    tokenizer = load_tokenizer(vanilla_dir)
    engines, vanilla = SpecEngines.load(spec_dir), Engine.load(vanilla_dir)
    os.environ["EDGELLM_ORT_SPINNING"] = "0"
    vanilla_quiet = Engine.load(vanilla_dir)  # the same engine, its threads sleeping between runs
    del os.environ["EDGELLM_ORT_SPINNING"]
    for shape in tree_shapes:
        engines.check_shape(shape)
    sizes = [int(t) for t in verify_sizes.split(",") if t]
    if not all(1 <= t <= min(engines.base.tree_size, prompt_tokens) for t in sizes):
        raise click.BadParameter(f"expected sizes 1..{min(engines.base.tree_size, prompt_tokens)} (the built verify "
                                 f"tree and --prompt_tokens), found {verify_sizes}", param_hint="--verify_sizes")
    greedy = SamplingParams(top_k=1)
    prompts = [("text", p) for p in wikitext_prompts(tokenizer, wikitext, text_prompts, prompt_tokens)]
    prompts += [("chat", p) for p in chat_prompt_ids(tokenizer, chat_prompts)]

    warm = [Job(prompts[0][1], greedy)]
    generate(vanilla, tokenizer, warm, 8)
    generate(vanilla_quiet, tokenizer, warm, 8)
    for shape in tree_shapes:
        generate_spec(engines, tokenizer, warm, 8, shape)

    rows = []
    for kind, ids in tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr):
        job = [Job(ids, greedy)]
        (plain,), timing = generate(vanilla, tokenizer, job, new_tokens)
        (quiet,), quiet_timing = generate(vanilla_quiet, tokenizer, job, new_tokens)
        assert quiet.token_ids == plain.token_ids
        record = {"kind": kind, "plain_tokens": timing.decode_tokens, "plain_spinning_s": timing.decode_s,
                  "plain_quiet_s": quiet_timing.decode_s, "shapes": {}}
        for shape in tree_shapes:
            t0 = time.perf_counter()
            (got,), spec_timing = generate_spec(engines, tokenizer, job, new_tokens, shape)
            record["shapes"][f"{shape.top_k}x{shape.steps}x{shape.verify_size}"] = {
                "tokens": spec_timing.decode_tokens, "decode_s": spec_timing.decode_s,
                "steps": spec_timing.spec_steps, "emitted": spec_timing.spec_tokens,
                "identical": got.token_ids == plain.token_ids, "wall_s": time.perf_counter() - t0}
        rows.append(record)

    summary = summarize(rows, tree_shapes)
    costs = verify_costs(engines, vanilla_quiet, prompts[0][1], sizes) if sizes else {}
    result = {"machine": machine(), "draft": str(draft), "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
              "summary": summary, "verify_cost_plain_steps": costs, "prompts": rows}
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']}\n")
    print("| tree (top_k x steps x verify) | accepted/step text | chat | spec tok/s | plain tok/s | speedup "
          "(text / chat / all) | identical |")
    print("|---|---|---|---|---|---|---|")
    for line in summary:
        a = line["all"]
        accepted = [stats.Interval(line[k]["accepted_per_step"], *line[k]["accepted_per_step_95ci"]).fmt(".2f")
                    for k in ("text", "chat")]
        print(f"| {line['shape']} | {accepted[0]} | {accepted[1]} | {a['spec_tokens_per_s']:.1f} "
              f"| {a['plain_tokens_per_s']:.1f} | {line['text']['speedup']:.2f}x / {line['chat']['speedup']:.2f}x / "
              f"{a['speedup']:.2f}x | {a['identical']}/{a['prompts']} |")
    if costs:
        print("\n| verified tokens T | " + " | ".join(map(str, costs)) + " |\n|---|" + "---|" * len(costs))
        print("| one verification call, in plain decode steps | " + " | ".join(f"{c:.2f}" for c in costs.values())
              + " |")
    print(f"\nwrote {out_json}")


if __name__ == "__main__":
    main()
