"""Turn a model's fp32 state dict plus calibration into a quantized checkpoint directory (ModelOpt unified HF layout).

Per quantized linear `M` (see docs/quantization.md for the full table):
- fp8:       `M.weight` F8_E4M3, `M.weight_scale` F32 [] = amax_w/448, `M.input_scale` F32 [] = amax_x/448
- fp8_pc:    `M.weight` F8_E4M3, `M.weight_scale` F32 [out]; activations are quantized per token at run time
- fp8_block: `M.weight` F8_E4M3, `M.weight_scale_inv` F32 [ceil(out/128), ceil(in/128)] (HF fine-grained FP8)
- nvfp4:     `M.weight` U8 [out, in/2], `M.weight_scale` F8_E4M3 [out, in/16], `M.weight_scale_2` and
             `M.input_scale` F32 [] (global scales, amax/(6*448))
FP8 KV adds `self_attn.{k_proj.k_scale, v_proj.v_scale}` F32 [] and `self_attn.q_proj.q_scale` F32 [1].
Everything else (embeddings, norms, biases, excluded linears) is written as fp16.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from contract.atomic import staged_dir
from contract.tokenizer_files import copy_checked
from contract.versions import producer
from contract.weight_formats import WEIGHT_FORMATS

if TYPE_CHECKING:  # imported by the CLI for its constants before torch (contract.cli); the functions import it
    import torch

OUTPUT_KIND = "quantized checkpoint"  # what contract.atomic calls this writer's output
METHODS = ("fp8", "fp8_pc", "fp8_block", "nvfp4", "none")  # weight formats (contract.weight_formats) this writer produces
AUTO = "auto"  # --quantization auto: a format per linear group among quantization.auto.CANDIDATES
LM_HEAD_METHODS = ("fp8", "nvfp4")
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
    methods: dict[str, str]  # quantized module -> method
    excluded: dict[str, str] = field(default_factory=dict)  # linear left in fp16 -> why


def needs_input_amax(method: str) -> bool:
    """Static activation scales exist only for per-tensor FP8 and NVFP4."""
    return method in ("fp8", "nvfp4")


def unfit_reason(method: str, shape: tuple[int, int]) -> str | None:
    """Why a ``[out, in]`` weight cannot take `method`, or None. Only NVFP4 has a hard size rule (16-element groups)."""
    from contract import formats

    if method == "nvfp4" and shape[1] % formats.NVFP4_GROUP:
        return f"in_features {shape[1]} is not a multiple of {formats.NVFP4_GROUP}"
    return None


def quantize_linear(method: str, weight: torch.Tensor, input_amax: float | None,
                    scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear, keyed by suffix (`weight`, `weight_scale`, ...); `scales` gives chosen
    (shared or searched) `weight_scale` / `weight_scale_2` for fp8 and nvfp4 instead of the amax ones."""
    import torch

    from contract import formats

    scales = scales or {}
    if method == "fp8":
        q, scale = formats.quantize_fp8_per_tensor(weight, scales.get("weight_scale"))
        return {"weight": q, "weight_scale": scale, "input_scale": formats.amax_to_scale(torch.tensor(input_amax))}
    if method == "fp8_pc":
        q, scale = formats.quantize_fp8_per_channel(weight)
        return {"weight": q, "weight_scale": scale}
    if method == "fp8_block":
        q, scale = formats.quantize_fp8_block(weight)
        return {"weight": q, "weight_scale_inv": scale}
    if method == "nvfp4":
        packed, block_scale, global_scale = formats.quantize_nvfp4(
            weight, block_scale=scales.get("weight_scale"), global_scale=scales.get("weight_scale_2"))
        return {
            "weight": packed,
            "weight_scale": block_scale,
            "weight_scale_2": global_scale,
            "input_scale": formats.nvfp4_global_scale(torch.tensor(input_amax)),
        }
    raise ValueError(f"unknown method {method}")


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    plan: dict[str, str],
    input_amax: dict[str, float],
    kv_scales: dict[int, tuple[float, float, float]],
    attention_prefix: str = "model.layers.{}.self_attn",
    weight_scales: dict[str, dict[str, torch.Tensor]] | None = None,
) -> QuantizedTensors:
    """Quantize the linears in `plan` (module -> method); every other floating tensor becomes fp16.
    `weight_scales`: module -> chosen scales (`quantization.scale_search.weight_scales`)."""
    import torch

    from contract import formats

    weight_scales = weight_scales or {}
    tensors, methods, excluded = {}, {}, {}
    for name, value in state_dict.items():
        module, _, suffix = name.rpartition(".")
        method = plan.get(module)
        if method is None or suffix != "weight":
            tensors[name] = value.to(torch.float16) if value.is_floating_point() else value
            continue
        reason = unfit_reason(method, tuple(value.shape))
        if reason:
            excluded[module] = reason
            tensors[name] = value.to(torch.float16)
            continue
        for key, t in quantize_linear(method, value, input_amax.get(module), weight_scales.get(module)).items():
            tensors[f"{module}.{key}"] = t.clone().contiguous()  # shared (fused) scales are separate tensors on disk
        methods[module] = method
    for layer, (q, k, v) in kv_scales.items():
        prefix = attention_prefix.format(layer)
        tensors[f"{prefix}.q_proj.q_scale"] = formats.amax_to_scale(torch.tensor([q]))
        tensors[f"{prefix}.k_proj.k_scale"] = formats.amax_to_scale(torch.tensor(k))
        tensors[f"{prefix}.v_proj.v_scale"] = formats.amax_to_scale(torch.tensor(v))
    return QuantizedTensors(tensors, methods, excluded)


def hf_quant_config(
    qt: QuantizedTensors, all_linears: list[str], kv_fp8: bool, kv_fp16_layers: list[int]
) -> dict:
    """ModelOpt's `hf_quant_config.json`: one `quant_algo`, or MIXED_PRECISION with a per-module table."""
    from contract import formats

    algos = {WEIGHT_FORMATS[m].quant_algo for m in qt.methods.values()}
    exclude = sorted(m for m in all_linears if m not in qt.methods)
    quant: dict = {"kv_cache_quant_algo": "FP8" if kv_fp8 else None, "exclude_modules": exclude}
    if len(algos) > 1:
        quant["quant_algo"] = "MIXED_PRECISION"
        quant["quantized_layers"] = {
            m: {"quant_algo": WEIGHT_FORMATS[meth].quant_algo, **({"group_size": formats.NVFP4_GROUP} if meth == "nvfp4" else {})}
            for m, meth in sorted(qt.methods.items())
        }
    else:
        quant["quant_algo"] = algos.pop() if algos else None
        if quant["quant_algo"] == "NVFP4":
            quant["group_size"] = formats.NVFP4_GROUP
    if kv_fp16_layers:
        quant["kv_cache_fp16_layers"] = sorted(kv_fp16_layers)  # our extension: these layers carry no k/v scales
    return {"producer": producer(), "quantization": quant}


def fine_grained_fp8_config(exclude: list[str]) -> dict:
    """config.json `quantization_config` of the HF fine-grained FP8 layout (DeepSeek-V3, Qwen3-*-FP8)."""
    from contract import formats

    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [formats.WEIGHT_BLOCK, formats.WEIGHT_BLOCK],
        "modules_to_not_convert": exclude,
    }


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
