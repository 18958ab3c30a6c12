"""How many tokens an EAGLE3 draft wins per base verification pass, measured in torch (`spec_decode.py`).

    python -m examples.eagle.acceptance [--draft_dir D] [--trees 10/6/60,4/4/16,1/5/5] [--wikitext FILE]

Accepted length = tokens emitted per base verification pass: the accepted draft tokens plus the base's own bonus
token, so it is at least 1 (plain decoding emits exactly 1 per base pass). The first generated token comes from the
base prefill and belongs to no verification pass; tokens past --max_new_tokens or after end-of-sequence still count
for the pass that produced them. The mean is pooled over all passes of a prompt set (total tokens / total passes);
beside it the per-prompt spread as mean +- 1.96 sd / sqrt(n) over prompts.

Prompt sets: held-out WikiText-2 test passages (raw text, continued; never used to train or tune the draft) and
chat requests (rendered with the model's chat template) unlike the training prompts. Every spec-decoded output is
compared with transformers' plain greedy generate of the same prompt: greedy speculative decoding must be
token-identical to it, whatever the draft.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.accuracy import WIKITEXT
from contract.cli import run_cli
from contract.errors import InputError
from contract.jsonfile import read_json
from examples.eagle.selfdistill import chat_prompt
from examples.eagle.spec_decode import spec_generate
from examples.eagle.train_draft import DEFAULT_OUTPUT
from examples.eagle.tree import TreeShape, draft_to_target
from quantization import eagle3

CHAT_MESSAGES = [
    "Please introduce the company NVIDIA and its CEO.",  # examples/llm_basic.json
    "Explain in simple words why the sky looks blue during the day.",  # examples/greedy_batch.json
    "What is machine learning?",
    "Give me three tips for staying healthy.",
    "How do airplanes fly?",
    "Write a Python function that returns the factorial of a number.",
    "What are the main causes of climate change?",
    "Describe the water cycle for a ten-year-old.",
    "Write a haiku about the ocean.",
    "Suggest a plan for a weekend trip to the mountains.",
    "What is the difference between a virus and a bacterium?",
    "How does a bank loan work?",
]


def wikitext_prompts(path: Path, tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    """The first `prompt_tokens` tokens of `n` paragraphs spread evenly over the file (headings and short
    paragraphs skipped)."""
    if not path.is_file():
        raise InputError(f"--wikitext {path}: expected the WikiText-2 raw test file, found no such file")
    paras = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    paras = [p for p in paras if len(p) > 600 and not p.startswith("=")]
    if len(paras) < n:
        raise InputError(f"--wikitext {path}: expected at least {n} paragraphs of over 600 characters, found {len(paras)}")
    picks = [paras[(2 * i + 1) * len(paras) // (2 * n)] for i in range(n)]
    return [tokenizer.encode(p)[:prompt_tokens] for p in picks]


def summarize(accepted: list[list[int]]) -> dict:
    """Pooled tokens per verification pass, and the per-prompt means' 95% interval."""
    passes = sum(len(a) for a in accepted)
    per_prompt = [sum(a) / len(a) for a in accepted if a]
    mean = sum(per_prompt) / len(per_prompt)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / max(1, len(per_prompt) - 1))
    return {"accepted_length": sum(map(sum, accepted)) / max(1, passes), "verification_passes": passes,
            "per_prompt_mean": mean, "per_prompt_ci95": 1.96 * sd / math.sqrt(len(per_prompt))}


def load_draft(draft_dir: Path, base_config: dict):
    config = eagle3.read_draft_config(draft_dir)
    tensors = eagle3.read_draft_tensors(draft_dir)
    layer_ids = eagle3.target_layer_ids(config, base_config["num_hidden_layers"])
    draft = eagle3.build_draft(config, tensors, base_config["hidden_size"], len(layer_ids), draft_dir)
    try:
        to_base = draft_to_target(tensors["d2t"], base_config["vocab_size"])
    except ValueError as e:
        raise InputError(f"{draft_dir}: {e}") from None
    return draft, layer_ids, to_base


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--base_model_dir", type=click.Path(path_type=Path), default=None,
              help="HF base checkpoint [default: the cached SmolLM2-135M-Instruct]")
@click.option("--draft_dir", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT, help="EAGLE3 draft checkpoint.")
@click.option("--trees", default="10/6/60,4/4/16,1/5/5", help="Tree shapes topK/steps/verify, comma-separated.")
@click.option("--wikitext", type=click.Path(path_type=Path), default=WIKITEXT, help="WikiText-2 raw test file.")
@click.option("--num_wikitext", default=12, help="WikiText-2 passages.")
@click.option("--prompt_tokens", default=96, help="Tokens of each WikiText-2 passage used as the prompt.")
@click.option("--num_chat", default=8, help=f"Chat requests (at most {len(CHAT_MESSAGES)}).")
@click.option("--max_new_tokens", default=64)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the results as JSON here.")
@click.option("--threads", type=int, default=None, help="torch threads [default: the idle cores, at least 1]")
def main(base_model_dir, draft_dir, trees, wikitext, num_wikitext, prompt_tokens, num_chat, max_new_tokens, output,
         threads) -> None:
    """Mean accepted length of greedy EAGLE3 tree speculative decoding, and its identity with plain greedy."""
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0])))
    try:
        shapes = [TreeShape.parse(t) for t in trees.split(",")]
    except ValueError as e:
        raise InputError(f"--trees {trees}: expected topK/steps/verify triples like 10/6/60 ({e})") from None
    if num_chat > len(CHAT_MESSAGES):
        raise InputError(f"--num_chat {num_chat}: expected at most {len(CHAT_MESSAGES)}")
    if base_model_dir is None:
        from llm_loader.gguf_convert import smollm2_checkpoint

        base_model_dir = smollm2_checkpoint()
    base_config = read_json(base_model_dir / "config.json", "the base model's config.json")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    draft, layer_ids, to_base = load_draft(draft_dir, base_config)
    eos = base.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    sets = {
        "wikitext": wikitext_prompts(wikitext, tokenizer, num_wikitext, prompt_tokens),
        "chat": [chat_prompt(tokenizer, m) for m in CHAT_MESSAGES[:num_chat]],
    }
    results = {"draft_dir": str(draft_dir), "max_new_tokens": max_new_tokens, "target_layer_ids": layer_ids,
               "definition": "tokens emitted per base verification pass (accepted draft tokens + the bonus token)",
               "sets": {}}
    mismatches = 0
    for name, prompts in sets.items():
        accepted = {str(s): [] for s in shapes}
        seconds = {str(s): 0.0 for s in shapes}
        identical = {str(s): 0 for s in shapes}
        for prompt in tqdm(prompts, desc=f"{name} prompts", unit="prompt"):
            with torch.no_grad():
                out = base.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                    top_k=None, top_p=None, eos_token_id=sorted(eos),
                                    pad_token_id=tokenizer.pad_token_id or 0)
            reference = out[0, len(prompt):].tolist()
            for shape in shapes:
                t = time.time()
                result = spec_generate(base, draft, prompt, shape, max_new_tokens, eos, layer_ids, to_base)
                seconds[str(shape)] += time.time() - t
                accepted[str(shape)].append(result.accepted)
                if result.tokens == reference:
                    identical[str(shape)] += 1
                else:
                    mismatches += 1
                    first = next(i for i, (a, b) in enumerate(zip(result.tokens + [-1], reference + [-1])) if a != b)
                    tqdm.write(f"MISMATCH {name} tree {shape}: first difference at generated token {first}")
        results["sets"][name] = {
            "prompts": len(prompts),
            "trees": {s: {**summarize(accepted[s]), "identical_to_greedy": f"{identical[s]}/{len(prompts)}",
                          "seconds": round(seconds[s], 1)} for s in accepted},
        }
    print("| prompts | tree K/steps/verify | tokens per verification | per-prompt mean (95% CI) | passes | identical |")
    print("|---|---|---|---|---|---|")
    for name, r in results["sets"].items():
        for s, m in r["trees"].items():
            print(f"| {name} ({r['prompts']}) | {s} | {m['accepted_length']:.2f} | {m['per_prompt_mean']:.2f} "
                  f"+- {m['per_prompt_ci95']:.2f} | {m['verification_passes']} | {m['identical_to_greedy']} |")
    if output:
        output.write_text(json.dumps(results, indent=2) + "\n")
    if mismatches:
        raise click.ClickException(f"{mismatches} spec-decoded outputs differ from plain greedy decoding")


if __name__ == "__main__":
    sys.exit(run_cli(main))
