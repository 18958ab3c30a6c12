"""Export a Hugging Face checkpoint to the ONNX directory `OUT/llm/` (contracts.md section 1).

    llm-export CKPT OUT [--fp8-embedding] [--dtype fp16]      (or python -m llm_loader.export_all_cli ...)
    llm-export BASE OUT --eagle-base [--eagle-draft-dir DRAFT]   # EAGLE3 base
    llm-export DRAFT OUT                                         # EAGLE3 draft

A quantized checkpoint (FP8, FP8 per-channel, HF fine-grained FP8, NVFP4; optional FP8 KV cache) is detected from
its own files and exported with Q/DQ linears (contracts.md 2.1); no flag is needed. So is an EAGLE3 draft
(`architectures` *Eagle3*, `draft_vocab_size` or `ttt_length` in its config.json): it gets the draft graph,
`d2t.safetensors` and a draft config, and no embedding table or tokenizer (it uses its base's). A draft checkpoint may
carry training-only tensors (`t2d`, a copy of the embeddings), so the every-tensor-used check below is for bases.

Writes model.onnx + model.onnx.data, the runtime config.json, embedding.safetensors (FP16, or FP8 with row-block
scales) and the tokenizer with its chat template. Everything is written into a hidden sibling folder first and moved
into place only when complete (`contract.atomic.staged_dir`), so a failed export never leaves a half-written
`OUT/llm`, and an existing `OUT/llm` is replaced only when it is an earlier export. Every tensor of the checkpoint must
end up in the graph: a tensor the config does not account for (`model.layers.7.*` in a 2-layer config, a bias the
config switches off) means the config describes another model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from tqdm import tqdm

from contract.atomic import staged_dir
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.dir_kinds import checkpoint_mistake
from contract.eagle3 import (
    D2T_FILE,
    ROLE_BASE,
    SPEC_EAGLE3,
    default_eagle_layers,
    draft_target_layers,
    is_eagle3_config,
)
from contract.errors import InputError
from contract.fields import is_int
from contract.jsonfile import read_json
from contract.kv import KvDtype
from contract.paths import checked_file
from llm_loader.model_config import ModelConfig, model_config_from_dict
from llm_loader.runtime_config import runtime_config
from llm_loader.tokenizer_files import copy_tokenizer_files

if TYPE_CHECKING:
    from contract.checkpoint import Checkpoint
    from llm_loader.quantized_checkpoint import QuantizedCheckpoint

DTYPES = ("fp16",)


# tensors a checkpoint may hold that no graph needs: RoPE buffers, FP8 KV scales (read through the quantized view)
_NOT_WEIGHTS = re.compile(r".*(\.rotary_emb\.inv_freq|\.[kvq]_scale)")


def check_every_tensor_used(ckpt: Checkpoint, cfg: ModelConfig, quant: QuantizedCheckpoint | None) -> None:
    """Refuse checkpoint tensors the graph did not take: the config then describes a different model."""
    from contract.checkpoint import layer_of
    from contract.weight_formats import SCALE_TENSORS, UNQUANTIZED

    used = set(ckpt.read)
    for q in (quant.linears.values() if quant else ()):
        if q.format != UNQUANTIZED:  # the graph took these through the quantized view, not `ckpt.tensor`
            used |= {f"{q.name}.{suffix}" for suffix in ("weight", *SCALE_TENSORS)}
    if cfg.tie_word_embeddings:
        used.add(f"{cfg.family.lm_head}.weight")  # some tied checkpoints store the shared table twice
    unused = sorted(n for n in ckpt.files if n not in used and not _NOT_WEIGHTS.fullmatch(n))
    if not unused:
        return
    config = ckpt.path / "config.json"
    layers = cfg.num_hidden_layers
    beyond = [n for n in unused if (i := layer_of(n)) is not None and i >= layers]
    if beyond:
        raise InputError(f"{ckpt.path}: tensor {beyond[0]!r}: expected layers 0..{layers - 1} ({config} "
                         f"num_hidden_layers {layers}), found a tensor of a later layer; the config describes another "
                         "model")
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise InputError(f"{ckpt.path}: tensor {unused[0]!r}{more}: expected only tensors of the {cfg.model_type} model "
                     f"{config} describes, found it unused (check attention_bias, tie_word_embeddings and the layer "
                     "count)")


def eagle_layers(cfg, draft_dir: Path | None) -> list[int]:
    """The base hidden states an EAGLE3 base exports: the draft's target layers (checked against the draft's config)
    when `--eagle-draft-dir` names one, else the reference default."""
    ids = default_eagle_layers(cfg.num_hidden_layers)
    where = "the default EAGLE3 target layers"
    if draft_dir is not None:
        path = checked_file(Path(draft_dir), "config.json", "the EAGLE3 draft's config", required=False)
        if path is None:
            raise InputError(f"--eagle-draft-dir {draft_dir}: expected an EAGLE3 draft checkpoint dir, found no "
                             "config.json")
        draft = read_json(path, "the EAGLE3 draft's config")
        if not is_eagle3_config(draft):
            raise InputError(f"{path}: expected an EAGLE3 draft (architectures *Eagle3*, draft_vocab_size or "
                             f"ttt_length), found architectures {draft.get('architectures')}")
        for key, base_value in (("hidden_size", cfg.hidden_size), ("vocab_size", cfg.vocab_size)):
            if draft.get(key) != base_value:
                raise InputError(f"{path}: {key}: expected {base_value} (the base's), found {draft.get(key)!r}")
        ids = draft_target_layers(draft) or ids
        where = f"{path} target layer ids"
    if not all(is_int(i) and 0 <= i < cfg.num_hidden_layers for i in ids):
        raise InputError(f"{where}: expected decoder-layer indices in [0, {cfg.num_hidden_layers}) of the base, "
                         f"found {ids}")
    return ids


def _open_quantized(ckpt):
    """The quantized-checkpoint view when the checkpoint says it is quantized (hf_quant_config.json or config.json
    quantization_config), else None."""
    from llm_loader.quantized_checkpoint import read_quantized_checkpoint

    hf_quant = checked_file(ckpt.path, "hf_quant_config.json", "ModelOpt's quantization config", required=False)
    if hf_quant or "quantization_config" in ckpt.config:
        return read_quantized_checkpoint(ckpt.path)
    return None


def export(checkpoint_dir: Path, out_dir: Path, fp8_embedding: bool = False, dtype: str = "fp16",
           progress: bool = False, eagle_base: bool = False, eagle_draft_dir: Path | None = None) -> Path:
    """Export `checkpoint_dir` into `out_dir/llm` and return that path. An EAGLE3 draft checkpoint is detected and
    exported as a draft; `eagle_base` exports a base for one (its target layers from `eagle_draft_dir`)."""
    # torch and onnx are imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from contract.checkpoint import open_checkpoint
    from llm_loader.embedding import write_embedding_sidecar
    from llm_loader.onnx_graph import kv_cache_dtype, weight_format_summary, write_model

    if dtype not in DTYPES:
        raise InputError(f"--dtype: expected one of {DTYPES}, found {dtype!r}")
    if eagle_draft_dir is not None and not eagle_base:
        raise InputError("--eagle-draft-dir: expected together with --eagle-base, found it alone")
    mistake = checkpoint_mistake(checkpoint_dir, out_dir, "arguments swapped? (llm-export CKPT OUT)")
    if mistake:
        raise InputError(mistake)
    ckpt = open_checkpoint(checkpoint_dir)
    if is_eagle3_config(ckpt.config):
        for flag, given in (("--eagle-base", eagle_base), ("--fp8-embedding", fp8_embedding)):
            if given:
                raise InputError(f"{flag}: expected no such flag for an EAGLE3 draft checkpoint ({ckpt.path} is one; "
                                 "it has no embedding table and uses its base's)")
        return _export_draft(ckpt, Path(out_dir))
    quant = _open_quantized(ckpt)  # a quantized checkpoint says so itself
    cfg = model_config_from_dict(ckpt.config, ckpt.path / "config.json")
    layers = eagle_layers(cfg, eagle_draft_dir) if eagle_base else None
    weight_format, counts = weight_format_summary(quant)
    formats = {"kv_cache_dtype": kv_cache_dtype(quant).value, "weight_format": weight_format,
               "weight_format_counts": counts}
    final = Path(out_dir) / "llm"
    with staged_dir(final, kind="ONNX dir", flag="OUT", inputs=[ckpt.path]) as llm:
        copy_tokenizer_files(ckpt.path, llm)
        table = ckpt.tensor_fp16(f"{cfg.family.embed_tokens}.weight", (cfg.vocab_size, cfg.hidden_size))
        write_embedding_sidecar(llm / "embedding.safetensors", table, fp8=fp8_embedding)
        del table
        config = runtime_config(cfg, ckpt.config, ckpt.path, **formats)
        if layers is not None:
            config.update(spec_decode_type=SPEC_EAGLE3, engine_role=ROLE_BASE,
                          eagle_hidden_state_layers=layers)
        (llm / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        wrap = (lambda it: tqdm(it, desc="export layers", unit="layer")) if progress else iter
        write_model(ckpt, cfg, llm, wrap_layers=wrap, quant=quant, eagle_layers=layers)
        check_every_tensor_used(ckpt, cfg, quant)
    return final


def _export_draft(ckpt: Checkpoint, out: Path) -> Path:
    """An EAGLE3 draft into `out/llm`: model.onnx (+ .data), d2t.safetensors, config.json."""
    from llm_loader import eagle3_draft
    from llm_loader.onnx_graph import kv_cache_dtype, weight_format_summary

    quant = _open_quantized(ckpt)
    if kv_cache_dtype(quant) is not KvDtype.FP16:
        raise InputError(f"{ckpt.path}: kv_cache_quant_algo: expected none for an EAGLE3 draft (its KV cache is "
                         "always fp16), found FP8")
    cfg = dataclasses.replace(model_config_from_dict(ckpt.config, ckpt.path / "config.json"), tie_word_embeddings=False)
    facts = eagle3_draft.draft_facts(ckpt, cfg, quant)
    d2t = eagle3_draft.read_d2t(ckpt, facts, cfg.vocab_size)
    final = out / "llm"
    with staged_dir(final, kind="ONNX dir", flag="OUT", inputs=[ckpt.path]) as llm:
        weight_format, counts = weight_format_summary(quant)
        config = runtime_config(cfg, ckpt.config, ckpt.path, kv_cache_dtype=KvDtype.FP16.value,
                                weight_format=weight_format, weight_format_counts=counts)
        config.update(eagle3_draft.draft_config_keys(facts))
        (llm / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        eagle3_draft.write_d2t(llm / D2T_FILE, d2t)
        eagle3_draft.write_draft_model(ckpt, cfg, facts, llm, quant)
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
@click.option("--eagle-base", "--eagle_base", "eagle_base", is_flag=True,
              help="Export an EAGLE3 base: tree attention (attention_mask, attention_pos_id inputs) in every layer and "
              "a hidden_states output of three layers' residual stream.")
@click.option("--eagle-draft-dir", "--eagle_draft_dir", "eagle_draft_dir", type=click.Path(path_type=Path),
              default=None, help="With --eagle-base: the EAGLE3 draft whose target layers the base exports "
              "(default layers 2, N/2, N-4).")
def cli(checkpoint: Path, out: Path, fp8_embedding: bool, dtype: str, eagle_base: bool,
        eagle_draft_dir: Path | None) -> None:
    """Export the HF checkpoint CHECKPOINT (Llama, Qwen2, Qwen3; safetensors) to OUT/llm/; an EAGLE3 draft checkpoint
    is recognised and exported as a draft. An existing OUT/llm is replaced only when it is an earlier export holding
    nothing else."""
    click.echo(str(export(checkpoint, out, fp8_embedding=fp8_embedding, dtype=dtype, progress=True,
                          eagle_base=eagle_base, eagle_draft_dir=eagle_draft_dir)))


def main(argv: list[str] | None = None) -> int:
    """`llm-export` (also `python -m llm_loader.export_all_cli`); exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
