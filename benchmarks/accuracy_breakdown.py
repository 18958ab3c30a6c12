"""Where does a recipe lose accuracy? Fake-quantize one part of SmolLM2 at a time in torch and score WikiText-2.

The engines of `benchmarks/accuracy.py` give the end-to-end numbers; this script attributes them. It takes the HF
model (fp32 compute, so only the quantization under test adds error), fake-quantizes either the weights or the
linear inputs (activations) of one kind of linear (q/k/v/o/gate/up/down) with the formats' fake quantization
(`plugins.weight_formats`), the fake
quantization the quantizer's searches use (NVFP4 activations with the op's reference), and reports the perplexity
increase on the same WikiText-2 windows.

    python -m benchmarks.accuracy_breakdown [--windows 8] [--window_len 256] [--per_kind]

Writes docs/accuracy-breakdown.md: KL against the fp32 model, top-1 and perplexity, each with a bootstrap interval.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks import stats
from benchmarks.accuracy import windows as accuracy_windows
from benchmarks.e2e_cpu import machine
from contract import formats
from plugins import weight_formats
from plugins.nvfp4.reference import nvfp4_activation_qdq

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nvfp4_act(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation QDQ as the engine computes it (the op's reference, with its fp16 roundings; `input_qdq` is
    the searches' fp32 proxy), the global scale from this tensor's amax (a calibrated scale is close to it)."""
    input_scale = float(x.abs().amax()) / (formats.E2M1_MAX * formats.FP8_MAX)
    return nvfp4_activation_qdq(x.float(), input_scale).to(x.dtype)


def fp8_act_static(amax: dict[str, float]):
    """FP8 activation QDQ with one static per-tensor scale per linear (`amax[name] / 448`): the `fp8` format's input."""
    return lambda name, x: weight_formats.get("fp8").input_qdq(x, amax[name])


def calibrated_amax(model, ckpt: Path, names: list[str]) -> dict[str, float]:
    """Input amax of `names` from the quantizer's own default calibration (`--calibration quick` on tinyshakespeare)."""
    from quantization.calibrate import calibrate
    from quantization.options import LlmOptions
    from quantization.pipeline import calibration_data

    options = LlmOptions(model_dir=ckpt, output_dir=ckpt / "unused")
    return calibrate(model, calibration_data(ckpt, options)[0], names, kv=False).input_amax


def observed_amax(model, windows: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    """Input amax of `names` over the scored windows themselves (an oracle: no calibration mismatch)."""
    from quantization.calibrate import calibrate
    from quantization.datasets import Batch

    return calibrate(model, [Batch(w[None], torch.ones_like(w[None])) for w in windows], names, kv=False).input_amax


def log_probs(model, windows: list[torch.Tensor]) -> list[np.ndarray]:
    """Teacher-forced fp32 log-probabilities ``[len - 1, V]`` of each window."""
    with torch.no_grad():
        return [torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1).numpy() for ids in windows]


def window_scores(model, windows: list[torch.Tensor], reference: list[np.ndarray]) -> stats.TokenScores:
    """The model's per-token scores on `windows` against the `reference` log-probabilities (`log_probs`)."""
    return stats.TokenScores.stack([stats.TokenScores.of_window(r, lp, w[1:].numpy())
                                    for r, lp, w in zip(reference, log_probs(model, windows), windows)])


@contextmanager
def fake_quantized(linears: dict, weight_fn=None, act_fn=None):
    """Inside the block each of `linears` (name -> module) computes with `weight_fn(weight)` and its input replaced
    by `act_fn(name, x)`; the weights and the model are restored after."""
    originals = {n: m.weight.data for n, m in linears.items()}
    hooks = []
    try:
        for n, m in linears.items():
            if weight_fn:
                m.weight.data = weight_fn(originals[n])
            if act_fn:
                hooks.append(m.register_forward_pre_hook(lambda _m, args, n=n: (act_fn(n, args[0]),)))
        yield
    finally:
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            m.weight.data = originals[n]


def fp8_qkv_attention(which: str):
    """An attention function that fake-quantizes post-RoPE Q and/or K, V to FP8 with one per-tensor scale (this
    call's amax; the engines use a calibrated one), then runs SDPA: the FP8 KV cache in torch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def qdq(t: torch.Tensor) -> torch.Tensor:
        return weight_formats.get("fp8").input_qdq(t).to(t.dtype)

    def attention(module, query, key, value, *args, **kwargs):
        if "q" in which:
            query = qdq(query)
        if "kv" in which:
            key, value = qdq(key), qdq(value)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    return attention


@click.command()
@click.option("--windows", "n_windows", default=8, show_default=True, help="WikiText-2 windows.")
@click.option("--window_len", default=256, show_default=True, help="Tokens per window.")
@click.option("--per_kind", is_flag=True, help="Also one row per kind of linear (q/k/v/o/gate/up/down), FP8 only.")
def main(n_windows: int, window_len: int, per_kind: bool) -> None:
    """KL, top-1 and perplexity from fake-quantizing one kind of tensor at a time (FP8, NVFP4), with intervals."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from llm_loader.gguf_convert import smollm2_checkpoint

    torch.set_num_threads(2)
    ckpt = smollm2_checkpoint()
    windows = [torch.from_numpy(w).long() for w in accuracy_windows(ckpt, n_windows, window_len)]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in KINDS}
    reference = log_probs(model, windows)
    rows: list[tuple[str, stats.TokenScores]] = []

    def score(label: str) -> None:
        rows.append((label, window_scores(model, windows, reference)))
        print(f"{label}: KL {rows[-1][1].kl.mean():.4f}", flush=True)

    def run(label: str, kinds, weight_fn=None, act_fn=None) -> None:
        with fake_quantized({n: m for n, m in linears.items() if n.split(".")[-1] in kinds}, weight_fn, act_fn):
            score(label)

    score("none (fp32 HF)")
    run("all weights FP8 per-tensor", KINDS, weight_fn=weight_formats.get("fp8").weight_qdq)
    run("all weights FP8 per-channel", KINDS, weight_fn=weight_formats.get("fp8_pc").weight_qdq)
    run("all activations FP8 per-token", KINDS, act_fn=lambda _n, x: weight_formats.get("fp8_pc").input_qdq(x))
    run("all activations FP8 per-tensor, static (calibrated amax: the `fp8` format)", KINDS,
        act_fn=fp8_act_static(calibrated_amax(model, ckpt, list(linears))))
    run("all activations FP8 per-tensor, static (the windows' own amax)", KINDS,
        act_fn=fp8_act_static(observed_amax(model, windows, list(linears))))
    run("all weights NVFP4", KINDS, weight_fn=weight_formats.get("nvfp4").weight_qdq)
    run("all activations NVFP4", KINDS, act_fn=lambda _n, x: nvfp4_act(x))
    for which, label in (("kv", "K and V FP8 per-tensor (post-RoPE)"), ("q", "Q FP8 per-tensor (post-RoPE)")):
        AttentionInterface.register(f"fp8_{which}", fp8_qkv_attention(which))
        model.set_attn_implementation(f"fp8_{which}")
        score(label)
    model.set_attn_implementation("sdpa")
    for kind in KINDS if per_kind else ():
        run(f"{kind} activations FP8 per-token", (kind,), act_fn=lambda _n, x: weight_formats.get("fp8_pc").input_qdq(x))
    for kind in KINDS if per_kind else ():
        run(f"{kind} weights FP8 per-channel", (kind,), weight_fn=weight_formats.get("fp8_pc").weight_qdq)

    idx = stats.draws(n_windows)
    base = rows[0][1]
    lines = ["# Where FP8 and NVFP4 lose accuracy on SmolLM2-135M (torch fake-quant attribution)", "",
             f"`python -m benchmarks.accuracy_breakdown --windows {n_windows} --window_len {window_len}"
             f"{' --per_kind' if per_kind else ''}`: HF model in fp32, {n_windows} x {window_len} tokens of WikiText-2 "
             f"raw test, one kind of tensor fake-quantized at a time (amax scales, no methods), against the "
             f"unquantized fp32 model on the same windows. KL in nats per token; 95% bootstrap intervals "
             f"over the windows (`benchmarks/stats.py`); a perplexity change whose interval contains 0 is no "
             f"difference. Machine: {machine(with_load=True)}.", "",
             "| fake-quantized | KL mean | top-1 | perplexity | ppl change |", "|---|---|---|---|---|"]
    for label, sc in rows:
        f = stats.summary(sc, base, idx)
        inc = f["ppl_increase"]
        change = "(reference)" if sc is base else stats.compare(inc, "+.1f", 100, "%")
        lines.append(f"| {label} | {f['kl'].fmt('.4f')} | {f['top1'].fmt('.1f', 100, '%')} | {f['ppl'].fmt('.2f')} "
                     f"| {change} |")
    (ROOT / "docs" / "accuracy-breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
