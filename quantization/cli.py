"""`llm-quantize llm|draft` (or `python -m quantization`): HF checkpoint in, quantized checkpoint (ModelOpt unified HF
layout) out. The click layer: flags -> `quantization.options` -> `quantization.pipeline`.

    llm-quantize llm --model_dir M --output_dir Q --quantization nvfp4 --kv_cache_quantization fp8
    llm-quantize draft --base_model_dir M --draft_model_dir D --output_dir QD   # EAGLE3 draft

The choices and their help come from the registries (`contract.weight_formats`, `contract.kv`); nothing here imports
torch, so `--help` answers at once and Ctrl-C is caught (contract.cli).
"""

from __future__ import annotations

from pathlib import Path

import click

from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.weight_formats import LM_HEAD_FORMATS
from quantization.choices import SCALE_SEARCHES, SMOOTHING_METHODS
from quantization.datasets import DEFAULT_DATASET
from quantization.options import (
    CALIBRATION_PRESETS,
    KV_CHOICES,
    DraftOptions,
    LlmOptions,
    parse_layers,
    quantization_help,
)
from quantization.report import format_table


@click.group(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-quantize llm --model_dir SmolLM2-135M-Instruct --output_dir smollm2-nvfp4 --quantization nvfp4 "
    "--kv_cache_quantization fp8",
    "llm-quantize draft --base_model_dir Llama-3.1-8B-Instruct --draft_model_dir EAGLE3-LLaMA3.1-8B "
    "--output_dir eagle3-fp8"))
def cli() -> None:
    """Quantize Hugging Face checkpoints to FP8 / NVFP4 with an optional calibrated FP8 KV cache."""


def calibration_options(command):
    """The calibration flags `llm` and `draft` share."""
    for option in reversed([
        click.option("--text_dataset", default=DEFAULT_DATASET, show_default=True,
                     help="Name or .txt/.jsonl/.json path."),
        click.option("--calibration", default="quick", show_default=True, type=click.Choice(list(CALIBRATION_PRESETS)),
                     help="Calibration size: quick = " + " x ".join(map(str, CALIBRATION_PRESETS["quick"]))
                     + " (samples x tokens), minutes on a laptop CPU for a small model; full = the reference's "
                     + " x ".join(map(str, CALIBRATION_PRESETS["full"])) + "."),
        click.option("--num_samples", default=None, type=int, help="Calibration samples [default: the preset's]."),
        click.option("--max_seq_len", default=None, type=int,
                     help="Most tokens per calibration sample [default: the preset's]."),
        click.option("--batch_size", default=4, show_default=True, type=int),
        click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"])),
        click.option("--seed", default=0, show_default=True, type=int, help="Picks the calibration samples."),
    ]):
        command = option(command)
    return command


@cli.command(epilog=example(
    "llm-quantize llm --model_dir SmolLM2-135M-Instruct --output_dir smollm2-nvfp4 --quantization nvfp4 "
    "--kv_cache_quantization fp8"))
@click.option("--model_dir", required=True, type=click.Path(path_type=Path), help="HF checkpoint (fp16/bf16).")
@click.option("--output_dir", required=True, type=click.Path(path_type=Path),
              help="New directory (an earlier quantized checkpoint there is replaced; anything else is refused).")
@click.option("--quantization", default="fp8", show_default=True, help=quantization_help())
@click.option("--kv_cache_quantization", default=None,
              help=f"{' | '.join(KV_CHOICES)}: calibrated per-layer q/k/v scales (fp16 cache otherwise).")
@click.option("--lm_head_quantization", default=None,
              help=f"{' | '.join(LM_HEAD_FORMATS)} (lm_head stays fp16 otherwise).")
@click.option("--kv_cache_fp16_layers", default=None, help="Comma-separated layers whose KV stays fp16, e.g. 0,27.")
@click.option("--effective_bits", default=None, type=float,
              help="With --quantization auto: mean bits per decoder-linear weight (nvfp4 4.5, fp8 8, fp16 16).")
@click.option("--smoothing", default=None, type=click.Choice(SMOOTHING_METHODS),
              help="Per-channel input scaling searched on calibration data and folded into the preceding norm or "
                   "linear. [default: awq for nvfp4 and auto, none otherwise]")
@click.option("--scale_search", default="mse", show_default=True, type=click.Choice(SCALE_SEARCHES),
              help="NVFP4 block and global scales: mse = chosen by output error, amax = from the amax.")
@click.option("--fuse_scales/--no-fuse_scales", default=True, show_default=True,
              help="One weight_scale_2 (NVFP4) / weight_scale (FP8) shared by q/k/v and by gate/up, as ModelOpt.")
@click.option("--gptq/--no-gptq", default=True, show_default=True,
              help="NVFP4 and per-tensor FP8 weights rounded with GPTQ error compensation (input covariance from "
                   "calibration).")
@click.option("--search_samples", default=8, show_default=True, type=int,
              help="Calibration samples the searches (smoothing, auto) run on.")
@calibration_options
def llm(model_dir, output_dir, kv_cache_fp16_layers, **kwargs) -> None:
    """Quantize a causal LM checkpoint."""
    layers = parse_layers(kv_cache_fp16_layers)
    from quantization.pipeline import quantize_llm

    report = quantize_llm(LlmOptions(model_dir, output_dir, kv_cache_fp16_layers=layers, **kwargs))
    table = format_table(report)
    if table:
        click.echo(table)
    click.echo(f"wrote {output_dir} ({report['quantization']}, kv cache {report['kv_cache_quantization'] or 'fp16'})")


@cli.command(epilog=example(
    "llm-quantize draft --base_model_dir Llama-3.1-8B-Instruct --draft_model_dir EAGLE3-LLaMA3.1-8B "
    "--output_dir eagle3-fp8"))
@click.option("--base_model_dir", required=True, type=click.Path(path_type=Path), help="The draft's HF base model.")
@click.option("--draft_model_dir", required=True, type=click.Path(path_type=Path), help="EAGLE3 draft checkpoint.")
@click.option("--output_dir", required=True, type=click.Path(path_type=Path),
              help="New directory (an earlier quantized checkpoint there is replaced; anything else is refused).")
@click.option("--quantization", default="fp8", show_default=True,
              help="As for llm, but auto: one format for the draft's linears.")
@click.option("--kv_cache_quantization", default=None, help="Refused: the draft's KV cache is always fp16.")
@click.option("--lm_head_quantization", default=None,
              help=f"{' | '.join(LM_HEAD_FORMATS)} (the draft lm_head stays fp16 otherwise).")
@calibration_options
def draft(**kwargs) -> None:
    """Quantize an EAGLE3 draft, calibrated on the base model's hidden states."""
    from quantization.pipeline import quantize_draft

    report = quantize_draft(DraftOptions(**kwargs))
    table = format_table(report)
    if table:
        click.echo(table)
    click.echo(f"wrote {kwargs['output_dir']} (EAGLE3 draft, {report['quantization']}, kv cache fp16)")


def main(argv: list[str] | None = None) -> int:
    """`llm-quantize` (also `python -m quantization`); exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)
