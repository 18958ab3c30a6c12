"""Export a Hugging Face checkpoint to the ONNX directory `OUT/llm/` (contracts.md section 1).

    llm-export CKPT OUT [--fp8-embedding] [--dtype fp16]      (or python -m llm_loader.export_all_cli ...)

A quantized checkpoint (FP8, FP8 per-channel, HF fine-grained FP8, NVFP4; optional FP8 KV cache) is detected from
its own files and exported with Q/DQ linears (contracts.md 2.1); no flag is needed.

Writes model.onnx + model.onnx.data, the runtime config.json, embedding.safetensors (FP16, or FP8 with row-block
scales) and the tokenizer with its chat template. Everything is written into a hidden sibling folder first and moved
into place only when complete (`contract.atomic.staged_dir`), so a failed export never leaves a half-written
`OUT/llm`, and an existing `OUT/llm` is replaced only when it is an earlier export. Every tensor of the checkpoint must
end up in the graph: a tensor the config does not account for (`model.layers.7.*` in a 2-layer config, a bias the
config switches off) means the config describes another model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from tqdm import tqdm

from contract.atomic import staged_dir
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.errors import InputError
from contract.paths import checked_file
from contract.stage import MIXED_WEIGHTS
from llm_loader.model_config import ModelConfig, model_config_from_dict
from llm_loader.runtime_config import runtime_config
from llm_loader.tokenizer_files import copy_tokenizer_files

if TYPE_CHECKING:
    from llm_loader.checkpoint import Checkpoint
    from llm_loader.quantized_checkpoint import QuantizedCheckpoint

DTYPES = ("fp16",)


# tensors a checkpoint may hold that no graph needs: RoPE buffers, FP8 KV scales (read through the quantized view)
_NOT_WEIGHTS = re.compile(r".*(\.rotary_emb\.inv_freq|\.k_proj\.k_scale|\.v_proj\.v_scale|\.q_proj\.q_scale)")


def check_every_tensor_used(ckpt: Checkpoint, cfg: ModelConfig, quant: QuantizedCheckpoint | None) -> None:
    """Refuse checkpoint tensors the graph did not take: the config then describes a different model."""
    from llm_loader.quantized_checkpoint import SCALE_SUFFIXES

    used = set(ckpt.read)
    for q in (quant.linears.values() if quant else ()):
        if q.format != "fp16":  # the graph took these through the quantized view, not `ckpt.tensor`
            used |= {f"{q.name}.{suffix}" for suffix in ("weight", *SCALE_SUFFIXES)}
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store the shared table twice
    unused = sorted(n for n in ckpt.files if n not in used and not _NOT_WEIGHTS.fullmatch(n))
    if not unused:
        return
    config = ckpt.path / "config.json"
    layers = cfg.num_hidden_layers
    beyond = [n for n in unused if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) >= layers]
    if beyond:
        raise InputError(f"{ckpt.path}: tensor {beyond[0]!r}: expected layers 0..{layers - 1} ({config} "
                         f"num_hidden_layers {layers}), found a tensor of a later layer; the config describes another "
                         "model")
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise InputError(f"{ckpt.path}: tensor {unused[0]!r}{more}: expected only tensors of the {cfg.model_type} model "
                     f"{config} describes, found it unused (check attention_bias, tie_word_embeddings and the layer "
                     "count)")


def export(checkpoint_dir: Path, out_dir: Path, fp8_embedding: bool = False, dtype: str = "fp16",
           progress: bool = False) -> Path:
    """Export `checkpoint_dir` into `out_dir/llm` and return that path."""
    # torch and onnx are imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from llm_loader.checkpoint import open_checkpoint
    from llm_loader.embedding import write_embedding_sidecar
    from llm_loader.onnx_graph import kv_cache_dtype, weight_formats, write_model
    from llm_loader.quantized_checkpoint import read_quantized_checkpoint

    if dtype not in DTYPES:
        raise InputError(f"--dtype: expected one of {DTYPES}, found {dtype!r}")
    ckpt = open_checkpoint(checkpoint_dir)
    quant = None  # a quantized checkpoint says so itself: hf_quant_config.json or config.json quantization_config
    hf_quant = checked_file(ckpt.path, "hf_quant_config.json", "ModelOpt's quantization config", required=False)
    if hf_quant or "quantization_config" in ckpt.config:
        quant = read_quantized_checkpoint(ckpt.path)
    cfg = model_config_from_dict(ckpt.config, ckpt.path / "config.json")
    weight_format, counts = weight_formats(quant)
    formats = {"kv_cache_dtype": kv_cache_dtype(quant).value, "weight_format": weight_format,
               "weight_format_counts": counts if weight_format == MIXED_WEIGHTS else None}
    final = Path(out_dir) / "llm"
    with staged_dir(final, kind="ONNX dir", flag="OUT", inputs=[ckpt.path]) as llm:
        copy_tokenizer_files(ckpt.path, llm)
        table = ckpt.tensor_fp16("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        write_embedding_sidecar(llm / "embedding.safetensors", table, fp8=fp8_embedding)
        del table
        config = runtime_config(cfg, ckpt.config, ckpt.path, **formats)
        (llm / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        wrap = (lambda it: tqdm(it, desc="export layers", unit="layer")) if progress else iter
        write_model(ckpt, cfg, llm, wrap_layers=wrap, quant=quant)
        check_every_tensor_used(ckpt, cfg, quant)
    return final


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-export ~/.cache/edgellm-toolchain/SmolLM2-135M-Instruct out --fp8-embedding   # writes out/llm/"))
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--fp8-embedding", "--fp8_embedding", "fp8_embedding", is_flag=True,
              help="Write embedding.safetensors as FP8 E4M3 with per-row 128-wide block scales "
              "(model.onnx is unchanged).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp16", show_default=True,
              help="Weight dtype of the graph.")
def cli(checkpoint: Path, out: Path, fp8_embedding: bool, dtype: str) -> None:
    """Export the HF checkpoint CHECKPOINT (Llama, Qwen2, Qwen3; safetensors) to OUT/llm/. An existing OUT/llm is
    replaced only when it is an earlier export holding nothing else."""
    click.echo(str(export(checkpoint, out, fp8_embedding=fp8_embedding, dtype=dtype, progress=True)))


def main(argv: list[str] | None = None) -> int:
    """`llm-export` (also `python -m llm_loader.export_all_cli`); exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
