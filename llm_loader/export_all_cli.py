"""Export a Hugging Face checkpoint to the ONNX directory `OUT/llm/` (contracts.md section 1).

    python -m llm_loader.export_all_cli CKPT OUT [--fp8-embedding] [--dtype fp16]

A quantized checkpoint (FP8, FP8 per-channel, HF fine-grained FP8, NVFP4; optional FP8 KV cache) is detected from
its own files and exported with Q/DQ linears (contracts.md 2.1); no flag is needed.

Writes model.onnx + model.onnx.data, the runtime config.json, embedding.safetensors (FP16, or FP8 with row-block
scales) and the tokenizer with its chat template. Everything is written into a hidden sibling folder first and moved
into place only when complete, so a failed export never leaves a half-written `OUT/llm`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click
from tqdm import tqdm

from contract.errors import InputError, run_cli
from contract.stage import MIXED_WEIGHTS
from llm_loader.checkpoint import open_checkpoint
from llm_loader.embedding import write_embedding_sidecar
from llm_loader.model_config import model_config_from_dict
from llm_loader.onnx_graph import kv_cache_dtype, weight_formats, write_model
from llm_loader.quantized_checkpoint import read_quantized_checkpoint
from llm_loader.runtime_config import runtime_config
from llm_loader.tokenizer_files import copy_tokenizer_files

DTYPES = ("fp16",)


def _move_into_place(work: Path, out: Path) -> None:
    """`work/llm` becomes `out/llm` (replacing an older export); `work` becomes `out` when `out` is new."""
    if not out.exists():
        work.rename(out)
        return
    if (out / "llm").exists():
        (out / "llm").rename(work / "llm.old")
    (work / "llm").rename(out / "llm")
    shutil.rmtree(work)


def export(checkpoint_dir: Path, out_dir: Path, fp8_embedding: bool = False, dtype: str = "fp16",
           progress: bool = False) -> Path:
    """Export `checkpoint_dir` into `out_dir/llm` and return that path."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype: expected one of {DTYPES}, found {dtype!r}")
    ckpt = open_checkpoint(checkpoint_dir)
    quant = None  # a quantized checkpoint says so itself: hf_quant_config.json or config.json quantization_config
    if (ckpt.path / "hf_quant_config.json").exists() or "quantization_config" in ckpt.config:
        quant = read_quantized_checkpoint(ckpt.path)
    cfg = model_config_from_dict(ckpt.config, ckpt.path / "config.json")
    weight_format, counts = weight_formats(quant)
    formats = {"kv_cache_dtype": kv_cache_dtype(quant).value, "weight_format": weight_format,
               "weight_format_counts": counts if weight_format == MIXED_WEIGHTS else None}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        llm = work / "llm"
        llm.mkdir()
        copy_tokenizer_files(ckpt.path, llm)
        table = ckpt.tensor_fp16("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        write_embedding_sidecar(llm / "embedding.safetensors", table, fp8=fp8_embedding)
        del table
        (llm / "config.json").write_text(json.dumps(runtime_config(cfg, ckpt.config, ckpt.path, **formats), indent=2) + "\n")
        wrap = (lambda it: tqdm(it, desc="export layers", unit="layer")) if progress else iter
        write_model(ckpt, cfg, llm, wrap_layers=wrap, quant=quant)
        for path in llm.iterdir():  # like the reference: readable by all (safetensors writes 0600)
            path.chmod(0o644)
        work.chmod(0o755)
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out / "llm"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--fp8-embedding", "--fp8_embedding", "fp8_embedding", is_flag=True,
              help="Write embedding.safetensors as FP8 E4M3 with per-row 128-wide block scales "
              "(model.onnx is unchanged).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp16", show_default=True,
              help="Weight dtype of the graph.")
def cli(checkpoint: Path, out: Path, fp8_embedding: bool, dtype: str) -> None:
    """Export the HF checkpoint CHECKPOINT (Llama, Qwen2, Qwen3; safetensors) to OUT/llm/."""
    click.echo(str(export(checkpoint, out, fp8_embedding=fp8_embedding, dtype=dtype, progress=True)))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input and usage errors print `error: ...` to stderr and return 2."""
    return run_cli(cli, argv, "python -m llm_loader.export_all_cli")


if __name__ == "__main__":
    sys.exit(main())
