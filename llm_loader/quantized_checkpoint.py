"""Read a quantized HF checkpoint: what each linear holds, its scales, and the FP8 KV cache scales per layer.

Understands three layouts (docs/quantization.md has the tensor tables):
- ModelOpt unified HF export (`hf_quant_config.json`, or `config.json` `quantization_config.quant_method ==
  "modelopt"`): FP8 per-tensor, FP8 per-channel, FP8_PB_WO 128x128 (`weight_scale [out/128, 1, in/128, 1]`), NVFP4,
  and MIXED_PRECISION of those; what `python -m quantization` writes.
- Hugging Face fine-grained FP8 (`quantization_config.quant_method == "fp8"` with `weight_block_size`):
  `weight_scale_inv [ceil(out/b), ceil(in/b)]`.
- A plain fp16/bf16 checkpoint (every linear is "fp16").

A checkpoint that claims a format for a module but does not hold its tensors raises InputError naming the tensor.
What each format's tensors are, and how they are checked and dequantized, is the format's module in
`plugins/weight_formats/`; this module reads the metadata and asks the formats.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from contract.checkpoint import layer_of, open_checkpoint
from contract.errors import InputError
from contract.families import family_of
from contract.fields import is_int, positive_int
from contract.jsonfile import read_json
from contract.paths import checked_file
from contract.weight_formats import (
    HF_QUANT_METHOD_FORMATS,
    QUANT_ALGO_FORMATS,
    SCALE_TENSORS,
    WEIGHT_FORMATS,
    unsupported_quant_algo,
)
from plugins import weight_formats
from plugins.weight_formats.linear import QuantizedLinear, check_scale


@dataclass
class KvScales:
    """FP8 KV cache dequant scales of one layer; `q_scale` is None in checkpoints that do not carry it."""

    k_scale: float
    v_scale: float
    q_scale: float | None = None


@dataclass
class QuantizedCheckpoint:
    path: Path
    config: dict
    quant_algo: str | None  # ModelOpt name, "FP8_BLOCK_FINE_GRAINED" for the HF layout, None for plain
    kv_cache_quant_algo: str | None
    exclude_modules: list[str]
    linears: dict[str, QuantizedLinear]
    kv_scales: dict[int, KvScales]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # everything that is not part of a linear or KV
    kv_cache_fp16_layers: list[int] = field(default_factory=list)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, found the way the exporter finds them (`open_checkpoint`: the shard index,
    else every *.safetensors; pickles refused), read file by file."""
    ckpt = open_checkpoint(path)
    return {n: t for file in sorted(set(ckpt.files.values())) for n, t in load_file(file).items() if n in ckpt.files}


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected an object, found {value!r:.60}")
    return value


def _names(value, where: str) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise InputError(f"{where}: expected a list of module names (patterns), found {value!r:.60}")
    return value


def _check_metadata(meta: dict, where: str) -> None:
    """The metadata's fields by type, before anything matches, sorts or divides by them."""
    if not (meta.get("quant_algo") is None or isinstance(meta["quant_algo"], str)):
        raise InputError(f"{where}.quant_algo: expected a name or null, found {meta['quant_algo']!r:.60}")
    kv = meta.get("kv_cache_quant_algo")
    if not (kv is None or str(kv).upper() == "FP8"):
        raise InputError(f"{where}.kv_cache_quant_algo: expected FP8 or null (the KV cache formats read here), found "
                         f"{kv!r:.60}")
    _names(meta.get("exclude_modules") or [], f"{where}.exclude_modules")
    layers = _object(meta.get("quantized_layers") or {}, f"{where}.quantized_layers")
    for label, entry in [(where, meta), *((f"{where}.quantized_layers[{m}]", e) for m, e in layers.items())]:
        if isinstance(entry, dict):
            positive_int(entry, "group_size", label, required=False)
    fp16_layers = meta.get("kv_cache_fp16_layers") or []
    if not (isinstance(fp16_layers, list) and all(is_int(i) for i in fp16_layers)):
        raise InputError(f"{where}.kv_cache_fp16_layers: expected a list of layer indices, found {fp16_layers!r:.60}")


def _metadata(path: Path, config: dict) -> dict:
    """The `quantization` section in ModelOpt terms, from hf_quant_config.json or config.json."""
    hf_quant = checked_file(path, "hf_quant_config.json", "ModelOpt's quantization config", required=False)
    qc = _object(config.get("quantization_config") or {}, f"{path / 'config.json'}: quantization_config")
    if hf_quant is not None:
        section = read_json(hf_quant, "ModelOpt's quantization config").get("quantization", {})
        where = f"{hf_quant}: quantization"
        meta = dict(_object(section, where))
    else:
        where = f"{path / 'config.json'}: quantization_config"
        meta = dict(qc)
        method = meta.get("quant_method")
        if method not in (None, "modelopt", *HF_QUANT_METHOD_FORMATS):
            raise InputError(f"{where}.quant_method: expected one of modelopt, {', '.join(HF_QUANT_METHOD_FORMATS)}, "
                             f"found {method!r}")
        meta.setdefault("exclude_modules", _names(meta.get("ignore") or [], f"{where}.ignore"))
    if qc.get("quant_method") in HF_QUANT_METHOD_FORMATS:  # HF fine-grained: config.json declares the weights
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2):
            raise InputError(f"{path / 'config.json'}: quantization_config.weight_block_size: expected [rows, cols], "
                             f"found {block!r:.60}")
        for i, size in enumerate(block):
            positive_int({f"weight_block_size[{i}]": size}, f"weight_block_size[{i}]",
                         f"{path / 'config.json'}: quantization_config")
        meta["quant_algo"], meta["hf_quant_method"] = HF_LAYOUT, qc["quant_method"]
        meta["block_size"] = tuple(block)
        not_converted = _names(qc.get("modules_to_not_convert") or [], f"{path / 'config.json'}: "
                               "quantization_config.modules_to_not_convert")
        meta["exclude_modules"] = sorted({*_names(meta.get("exclude_modules") or [], f"{where}.exclude_modules"),
                                          *not_converted})
    _check_metadata(meta, where)
    return meta


def _expected_format(module: str, meta: dict) -> str | None:
    """The format the metadata claims for `module`, or None if it claims none (excluded or unquantized)."""
    algo = meta.get("quant_algo")
    if algo is None or any(fnmatch.fnmatch(module, p) for p in meta.get("exclude_modules") or []):
        return None
    if algo == "MIXED_PRECISION":
        entry = (meta.get("quantized_layers") or {}).get(module)
        if not entry:
            return None
        if not isinstance(entry, dict) or entry.get("quant_algo") not in QUANT_ALGO_FORMATS:
            found = entry.get("quant_algo") if isinstance(entry, dict) else entry
            raise unsupported_quant_algo(found, f"quantized_layers[{module}]")
        return QUANT_ALGO_FORMATS[entry["quant_algo"]]
    if algo == HF_LAYOUT:
        return HF_QUANT_METHOD_FORMATS[meta["hf_quant_method"]]
    if algo not in QUANT_ALGO_FORMATS:
        raise unsupported_quant_algo(algo, "quant_algo")
    return QUANT_ALGO_FORMATS[algo]


KV_SUFFIXES = (".k_scale", ".v_scale", ".q_scale")
# the metadata's `quant_algo` of a checkpoint in a Hugging Face layout (config.json `quantization_config`)
HF_LAYOUT = "FP8_BLOCK_FINE_GRAINED"


def read_quantized_checkpoint(path: Path | str) -> QuantizedCheckpoint:
    """Read `path` (any layout above) and check that every module holds the format the metadata claims."""
    path = Path(path)
    config = read_json(checked_file(path, "config.json", "the HF config"), "the checkpoint config")
    meta = _metadata(path, config)
    tensors = load_tensors(path)
    # linears: modules with a 2-D weight, minus embedding tables
    modules = sorted(
        n.removesuffix(".weight")
        for n, t in tensors.items()
        if n.endswith(".weight") and t.dim() == 2 and "embed" not in n
    )
    try:
        linears = {}
        for module in modules:
            expected, actual = _expected_format(module, meta), weight_formats.classify(module, tensors)
            if expected is not None and actual != expected:
                wanted = WEIGHT_FORMATS[expected].scale_tensors
                missing = next((s for s in wanted if f"{module}.{s}" not in tensors), wanted[0])
                raise InputError(
                    f"tensor {module}.{missing}: expected by quant_algo {meta.get('quant_algo')} "
                    f"(format {expected}), found a {actual} module"
                )
            mixed = meta.get("quant_algo") == "MIXED_PRECISION"  # a layer's own entry (group_size) applies to it
            layer = (meta.get("quantized_layers") or {}).get(module) if mixed else None
            linears[module] = weight_formats.get(actual).read(module, tensors, {**meta, **(layer or {})})
        kv_scales, fp16_layers = _read_kv(tensors, meta, config)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    used = {f"{m}.{s}" for m in modules for s in ("weight", "bias", *SCALE_TENSORS)}
    rest = {n: t for n, t in tensors.items() if n not in used and not n.endswith(KV_SUFFIXES)}
    return QuantizedCheckpoint(
        path,
        config,
        meta.get("quant_algo"),
        meta.get("kv_cache_quant_algo"),
        list(meta.get("exclude_modules") or []),
        linears,
        kv_scales,
        rest,
        fp16_layers,
    )


def _read_kv(tensors: dict, meta: dict, config: dict) -> tuple[dict[int, KvScales], list[int]]:
    """Per-layer k/v (and q) scales; with FP8 KV every layer not kept in fp16 must have k and v scales (the first
    layer without them ends the loop), without it only the layers the checkpoint holds are looked at (the config's
    count may be anything: 10^12 layers would be a loop for ever)."""
    fp8 = str(meta.get("kv_cache_quant_algo") or "").upper() == "FP8"
    family = family_of(config, "config.json")
    fp16_layers = sorted(meta.get("kv_cache_fp16_layers") or [])
    present = {i for n in tensors if (i := layer_of(n)) is not None}
    scales = {}
    for layer in range(positive_int(config, "num_hidden_layers", "config.json")) if fp8 else sorted(present):
        q_name, k_name, v_name = family.kv_scale_names(layer)
        names = [k_name, v_name, q_name]
        k, v, q = (tensors.get(n) for n in names)
        if fp8 and layer not in fp16_layers:
            for name, t in zip(names[:2], (k, v)):
                if t is None:
                    raise InputError(f"tensor {name}: expected by kv_cache_quant_algo FP8, found none")
        if k is not None and v is not None:
            k, v, q = (None if t is None else float(check_scale(n, t, scalar=True)) for n, t in zip(names, (k, v, q)))
            scales[layer] = KvScales(k, v, q)
    return scales, fp16_layers


def dequantize_linear(linear: QuantizedLinear) -> torch.Tensor:
    """fp32 ``[out, in]`` weight the stored tensors stand for (the fake-quant reference)."""
    return weight_formats.get(linear.format).dequantize(linear)
