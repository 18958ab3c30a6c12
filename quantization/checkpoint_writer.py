"""Turn a model's fp32 state dict plus calibration into a quantized checkpoint directory (ModelOpt unified HF layout).

Each quantized linear `M` is written by its format's `quantize` (plugins/weight_formats/<format>.py, whose docstring
gives the tensors; docs/quantization.md has the table), e.g. fp8: `M.weight` F8_E4M3, `M.weight_scale` F32 [] =
amax_w/448, `M.input_scale` F32 [] = amax_x/448. FP8 KV adds `self_attn.{k_proj.k_scale, v_proj.v_scale}` F32 [] and `self_attn.q_proj.q_scale` F32 [1].
Everything else (embeddings, norms, biases, excluded linears) is written as fp16.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from contract.atomic import staged_dir
from contract.kv import KvDtype
from contract.tokenizer_files import copy_checked
from contract.versions import producer
from contract.weight_formats import WEIGHT_FORMATS

if TYPE_CHECKING:  # imported by the CLI for its constants before torch (contract.cli); the functions import it
    import torch

    from contract.families import Family

OUTPUT_KIND = "quantized checkpoint"  # what contract.atomic calls this writer's output
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class QuantizedTensors:
    """What the writer puts in the safetensors files plus what the metadata needs to say about it."""

    tensors: dict[str, torch.Tensor]
    formats: dict[str, str]  # quantized module -> weight format
    excluded: dict[str, str] = field(default_factory=dict)  # linear left in fp16 -> why


def unfit_reason(fmt: str, shape: tuple[int, int]) -> str | None:
    """Why a ``[out, in]`` weight cannot take format `fmt` (NVFP4's 16-element groups), or None."""
    from plugins import weight_formats

    return weight_formats.get(fmt).unfit(shape)


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    plan: dict[str, str],
    input_amax: dict[str, float],
    kv_scales: dict[int, tuple[float, float, float]],
    family: Family,
    weight_scales: dict[str, dict[str, torch.Tensor]] | None = None,
) -> QuantizedTensors:
    """Quantize the linears in `plan` (module -> format); every other floating tensor becomes fp16. `kv_scales`:
    layer -> post-RoPE (q, k, v) amax, written under the `family`'s scale names; `weight_scales`: module -> chosen
    scales (`quantization.scale_search.weight_scales`)."""
    import torch

    from contract import formats
    from plugins import weight_formats

    weight_scales = weight_scales or {}
    tensors, chosen, excluded = {}, {}, {}
    for name, value in state_dict.items():
        module, _, suffix = name.rpartition(".")
        fmt = plan.get(module)
        if fmt is None or suffix != "weight":
            tensors[name] = value.to(torch.float16) if value.is_floating_point() else value
            continue
        ops = weight_formats.get(fmt)
        reason = ops.unfit(tuple(value.shape))
        if reason:
            excluded[module] = reason
            tensors[name] = value.to(torch.float16)
            continue
        for key, t in ops.quantize(value, input_amax.get(module), weight_scales.get(module)).items():
            tensors[f"{module}.{key}"] = t.clone().contiguous()  # shared (fused) scales are separate tensors on disk
        chosen[module] = fmt
    for layer, (q, k, v) in kv_scales.items():
        q_name, k_name, v_name = family.kv_scale_names(layer)
        tensors[q_name] = formats.amax_to_scale(torch.tensor([q]))
        tensors[k_name] = formats.amax_to_scale(torch.tensor(k))
        tensors[v_name] = formats.amax_to_scale(torch.tensor(v))
    return QuantizedTensors(tensors, chosen, excluded)


def hf_quant_config(
    qt: QuantizedTensors, all_linears: list[str], kv_dtype: KvDtype, kv_fp16_layers: list[int]
) -> dict:
    """ModelOpt's `hf_quant_config.json`: one `quant_algo` (with the format's `group_size`, if it has one), or
    MIXED_PRECISION with a per-module table."""
    rows = {m: WEIGHT_FORMATS[f] for m, f in qt.formats.items()}
    algos = {r.quant_algo for r in rows.values()}
    exclude = sorted(m for m in all_linears if m not in qt.formats)
    kv_algo = {KvDtype.FP16: None, KvDtype.FP8: "FP8"}[kv_dtype]  # ModelOpt's name of the KV cache format
    quant: dict = {"kv_cache_quant_algo": kv_algo, "exclude_modules": exclude}
    if len(algos) > 1:
        quant["quant_algo"] = "MIXED_PRECISION"
        quant["quantized_layers"] = {m: {"quant_algo": r.quant_algo, **({"group_size": r.group_size} if r.group_size
                                                                        else {})}
                                     for m, r in sorted(rows.items())}
    else:
        row = next(iter(rows.values()), None)
        quant["quant_algo"] = row.quant_algo if row else None
        if row and row.group_size:
            quant["group_size"] = row.group_size
    if kv_fp16_layers:
        quant["kv_cache_fp16_layers"] = sorted(kv_fp16_layers)  # our extension: these layers carry no k/v scales
    return {"producer": producer(), "quantization": quant}


def hf_config_quantization(qt: QuantizedTensors, exclude: list[str]) -> dict | None:
    """config.json `quantization_config` of a format written in a Hugging Face layout (fp8_block's fine-grained
    FP8), or None when every quantized linear is in ModelOpt's layout (hf_quant_config.json says it all)."""
    from plugins import weight_formats

    configs = [c for f in sorted(set(qt.formats.values())) if (c := weight_formats.get(f).config_json(exclude))]
    return configs[0] if configs else None


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return [*shards, current]


def write_checkpoint(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    quant_config: dict,
    source_dir: Path,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    inputs: Iterable[Path] = (),
) -> Path:
    """Write config, hf_quant_config, (sharded) safetensors and the source's tokenizer files (checked: a regular file
    inside `source_dir`, JSON and templates parsed).

    Everything goes to a temporary sibling that is renamed into place only when complete; an existing `out_dir` is
    replaced only when it is an earlier quantized checkpoint (contract.atomic). `inputs`: other directories the run
    read (never written into or over).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with staged_dir(out_dir, kind=OUTPUT_KIND, flag="--output_dir", inputs=[source_dir, *inputs]) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "hf_quant_config.json").write_text(json.dumps(quant_config, indent=2))
        copy_checked(source_dir, tmp, SIDE_FILES)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def checkpoint_bytes(path: Path) -> int:
    """Total size of the safetensors files of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
