"""Where does a recipe lose accuracy? Fake-quantize one part of SmolLM2 at a time in torch and score WikiText-2.

The engines of `benchmarks/accuracy.py` give the end-to-end numbers; this script attributes them. It takes the HF
model (fp32 compute, so only the quantization under test adds error), fake-quantizes either the weights or the
linear inputs (activations) of one kind of linear (q/k/v/o/gate/up/down) with the FP8 formats of
`contract.formats`, and reports the perplexity increase on the same WikiText-2 windows.

    python -m benchmarks.accuracy_breakdown [--windows 4]

Writes docs/accuracy-breakdown.md.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import click
import torch

from contract import formats

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_weight_per_tensor(w: torch.Tensor) -> torch.Tensor:
    q, s = formats.quantize_fp8_per_tensor(w)
    return q.float() * s


def fp8_weight_per_channel(w: torch.Tensor) -> torch.Tensor:
    q, s = formats.quantize_fp8_per_channel(w)
    return q.float() * s[:, None]


def fp8_act_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-4) / formats.FP8_MAX
    return formats.to_fp8(x, scale).float() * scale


def nvfp4_weight(w: torch.Tensor) -> torch.Tensor:
    return formats.dequantize_nvfp4(*formats.quantize_nvfp4(w))


def nvfp4_act(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation QDQ with the global scale from this tensor's amax (a calibrated scale is close to it)."""
    from plugins.nvfp4.reference import nvfp4_activation_qdq

    input_scale = float(x.abs().amax()) / (6 * formats.FP8_MAX)
    return nvfp4_activation_qdq(x.float(), input_scale).to(x.dtype)


def perplexity(model, windows: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            n += len(ids) - 1
    return math.exp(nll / n)


@click.command()
@click.option("--windows", "n_windows", default=4, show_default=True, help="WikiText-2 windows of 512 tokens.")
def main(n_windows: int) -> None:
    """Perplexity increase from fake-quantizing one kind of tensor at a time (FP8, NVFP4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_loader.gguf_convert import smollm2_checkpoint

    torch.set_num_threads(2)
    ckpt = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor(tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"][: n_windows * 512])
    windows = list(ids.view(n_windows, 512))
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in KINDS}
    originals = {n: m.weight.data.clone() for n, m in linears.items()}
    base = perplexity(model, windows)
    rows = [("none (fp32 HF)", base)]

    def run(label: str, kinds, weight_fn=None, act_fn=None) -> None:
        hooks = []
        for n, m in linears.items():
            if n.split(".")[-1] not in kinds:
                continue
            if weight_fn:
                m.weight.data = weight_fn(originals[n])
            if act_fn:
                hooks.append(m.register_forward_pre_hook(lambda mod, args: (act_fn(args[0]),)))
        rows.append((label, perplexity(model, windows)))
        print(f"{label}: {rows[-1][1]:.3f} ({100 * (rows[-1][1] / base - 1):+.2f}%)", flush=True)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            m.weight.data = originals[n]

    run("all weights FP8 per-tensor", KINDS, weight_fn=fp8_weight_per_tensor)
    run("all weights FP8 per-channel", KINDS, weight_fn=fp8_weight_per_channel)
    run("all activations FP8 per-token", KINDS, act_fn=fp8_act_per_token)
    run("all weights NVFP4", KINDS, weight_fn=nvfp4_weight)
    run("all activations NVFP4", KINDS, act_fn=nvfp4_act)
    for kind in KINDS:
        run(f"{kind} activations FP8 per-token", (kind,), act_fn=fp8_act_per_token)
    for kind in KINDS:
        run(f"{kind} weights FP8 per-channel", (kind,), weight_fn=fp8_weight_per_channel)

    lines = ["# Where FP8 and NVFP4 lose accuracy on SmolLM2-135M (torch fake-quant attribution)", "",
             f"`python -m benchmarks.accuracy_breakdown --windows {n_windows}`: HF model in fp32, {n_windows} x 512 "
             f"tokens of WikiText-2 raw test, one kind of tensor fake-quantized at a time. Machine: "
             f"{platform.machine()}, {platform.system()}.", "",
             "| fake-quantized | perplexity | increase |", "|---|---|---|"]
    lines += [f"| {label} | {p:.3f} | {100 * (p / base - 1):+.2f}% |" for label, p in rows]
    (ROOT / "docs" / "accuracy-breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
