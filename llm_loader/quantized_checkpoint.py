"""Read a quantized HF checkpoint: what each linear holds, its scales, and the FP8 KV cache scales per layer.

Understands three layouts (docs/quantization.md has the tensor tables):
- ModelOpt unified HF export (`hf_quant_config.json`, or `config.json` `quantization_config.quant_method ==
  "modelopt"`): FP8 per-tensor, FP8 per-channel, FP8_PB_WO 128x128 (`weight_scale [out/128, 1, in/128, 1]`), NVFP4,
  and MIXED_PRECISION of those; what `python -m quantization` writes.
- Hugging Face fine-grained FP8 (`quantization_config.quant_method == "fp8"` with `weight_block_size`):
  `weight_scale_inv [ceil(out/b), ceil(in/b)]`.
- A plain fp16/bf16 checkpoint (every linear is "fp16").

A checkpoint that claims a format for a module but does not hold its tensors raises InputError naming the tensor.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from contract import formats
from contract.checkpoint import layer_of, open_checkpoint
from contract.errors import InputError
from contract.fields import is_int, positive_int
from contract.jsonfile import read_json
from contract.paths import checked_file
from contract.weight_formats import QUANT_ALGO_FORMATS, unsupported_quant_algo

FP8 = torch.float8_e4m3fn


@dataclass
class QuantizedLinear:
    """One linear as stored. `format`: fp16 | fp8 | fp8_pc | fp8_block | fp8_pb_wo | nvfp4."""

    name: str
    format: str
    weight: torch.Tensor  # fp16/bf16 [out,in], FP8 [out,in], or NVFP4 packed uint8 [out,in/2]
    # fp8 [], fp8_pc [out], fp8_block [ceil(out/b), ceil(in/b)] (the file's weight_scale_inv),
    # fp8_pb_wo [out/128, 1, in/128, 1], nvfp4 FP8 [out, in/16]
    weight_scale: torch.Tensor | None = None
    weight_scale_2: torch.Tensor | None = None  # NVFP4 global scale
    input_scale: torch.Tensor | None = None  # static activation scale (fp8, nvfp4)
    bias: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None  # fp8_block / fp8_pb_wo tile, nvfp4 (1, group)

    @property
    def shape(self) -> tuple[int, int]:
        """Logical ``[out, in]``."""
        out, inp = self.weight.shape
        return (out, inp * 2) if self.format == "nvfp4" else (out, inp)


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
        if method not in (None, "modelopt", "fp8"):
            raise InputError(f"{where}.quant_method: expected modelopt or fp8, found {method!r}")
        meta.setdefault("exclude_modules", _names(meta.get("ignore") or [], f"{where}.ignore"))
    if qc.get("quant_method") == "fp8":  # HF fine-grained: config.json declares the weights
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2):
            raise InputError(f"{path / 'config.json'}: quantization_config.weight_block_size: expected [rows, cols], "
                             f"found {block!r:.60}")
        for i, size in enumerate(block):
            positive_int({f"weight_block_size[{i}]": size}, f"weight_block_size[{i}]",
                         f"{path / 'config.json'}: quantization_config")
        meta["quant_algo"] = "FP8_BLOCK_FINE_GRAINED"
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
    if algo == "FP8_BLOCK_FINE_GRAINED":
        return "fp8_block"
    if algo not in QUANT_ALGO_FORMATS:
        raise unsupported_quant_algo(algo, "quant_algo")
    return QUANT_ALGO_FORMATS[algo]


def _need(tensors: dict, name: str, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if name not in tensors:
        raise InputError(f"tensor {name}: expected by {what}, found none")
    t = tensors[name]
    if dtype is not None and t.dtype != dtype:
        raise InputError(f"tensor {name}: expected {dtype} for {what}, found {t.dtype}")
    return t


def _classify(module: str, tensors: dict) -> str:
    """The format a module's tensors actually hold."""
    if f"{module}.weight_scale_inv" in tensors:
        return "fp8_block"
    if f"{module}.weight_scale_2" in tensors:
        return "nvfp4"
    scale = tensors.get(f"{module}.weight_scale")
    if scale is None:
        return "fp16"
    if scale.dim() == 4:  # ModelOpt's [out/128, 1, in/128, 1] tiles, even when there is only one
        return "fp8_pb_wo"
    return "fp8" if scale.numel() == 1 else "fp8_pc"


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise InputError(f"tensor {name}: expected shape {list(expected)}, found {list(t.shape)}")


FP16_MAX = torch.finfo(torch.float16).max  # the graph holds most scales in fp16


def _check_scale(name: str, t: torch.Tensor, *, scalar: bool = False, zero_ok: bool = False) -> torch.Tensor:
    """`t` after checking that the graph can multiply or divide by it: finite, positive (an NVFP4 block scale may be 0:
    an all-zero block) and within fp16; one value where the format has one. A NaN, negative or zero scale would turn
    every output of the engine into NaN or noise."""
    if scalar and t.numel() != 1:
        raise InputError(f"tensor {name}: expected one scale value, found shape {list(t.shape)}")
    x = t.float()
    ok = ((x >= 0) if zero_ok else (x > 0)) & (x <= FP16_MAX)
    if not bool(ok.all()):
        kind = "non-negative" if zero_ok else "positive"
        raise InputError(f"tensor {name}: expected {kind} finite scales of at most {FP16_MAX:g}, found "
                         f"{float(x[~ok][0])}")
    return t


def _check_fp8_values(name: str, t: torch.Tensor) -> torch.Tensor:
    """An FP8 E4M3 tensor holds no NaN (its one non-finite code); checked in chunks, without a big temporary."""
    if any(torch.isnan(chunk.float()).any() for chunk in t.reshape(-1).split(1 << 20)):
        raise InputError(f"tensor {name}: expected finite FP8 values, found NaN")
    return t


def _read_linear(module: str, fmt: str, tensors: dict, meta: dict) -> QuantizedLinear:
    """Collect and check one module's tensors for the format it holds."""
    what = f"format {fmt}"
    bias = tensors.get(f"{module}.bias")
    if fmt == "fp16":
        return QuantizedLinear(module, fmt, tensors[f"{module}.weight"], bias=bias)
    if fmt == "nvfp4":
        weight = _need(tensors, f"{module}.weight", what, torch.uint8)
        scale = _need(tensors, f"{module}.weight_scale", what, FP8)
        group = meta.get("group_size") or formats.NVFP4_GROUP
        if weight.shape[1] * 2 % group:
            raise InputError(f"tensor {module}.weight: expected input features ({weight.shape[1] * 2}) in groups of "
                             f"group_size {group}, found a remainder")
        _check_shape(f"{module}.weight_scale", scale, (weight.shape[0], weight.shape[1] * 2 // group))
        _check_scale(f"{module}.weight_scale", scale, zero_ok=True)
        global_scale = _check_scale(f"{module}.weight_scale_2", _need(tensors, f"{module}.weight_scale_2", what),
                                    scalar=True)
        input_scale = _check_scale(f"{module}.input_scale", _need(tensors, f"{module}.input_scale", what), scalar=True)
        return QuantizedLinear(module, fmt, weight, scale, global_scale, input_scale, bias, (1, group))

    weight = _check_fp8_values(f"{module}.weight", _need(tensors, f"{module}.weight", what, FP8))
    out, inp = weight.shape
    input_scale, block = None, None
    if fmt == "fp8_block":
        scale = _need(tensors, f"{module}.weight_scale_inv", what)
        block = tuple(meta.get("block_size") or (formats.WEIGHT_BLOCK, formats.WEIGHT_BLOCK))
        _check_shape(f"{module}.weight_scale_inv", scale, (-(-out // block[0]), -(-inp // block[1])))
    elif fmt == "fp8_pb_wo":
        scale = _need(tensors, f"{module}.weight_scale", what)
        block = (formats.WEIGHT_BLOCK, formats.WEIGHT_BLOCK)
        _check_shape(f"{module}.weight_scale", scale, (out // 128, 1, inp // 128, 1))
    elif fmt == "fp8_pc":
        scale = _need(tensors, f"{module}.weight_scale", what).reshape(-1)  # [out] or [out, 1]
        _check_shape(f"{module}.weight_scale", scale, (out,))
    else:
        scale = _need(tensors, f"{module}.weight_scale", what).reshape(())
        input_scale = _check_scale(f"{module}.input_scale", _need(tensors, f"{module}.input_scale", what), scalar=True)
    _check_scale(f"{module}.{'weight_scale_inv' if fmt == 'fp8_block' else 'weight_scale'}", scale)
    return QuantizedLinear(module, fmt, weight, scale.float(), None, input_scale, bias, block)


SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv", "weight_scale_2", "input_scale")
KV_SUFFIXES = ("k_proj.k_scale", "v_proj.v_scale", "q_proj.q_scale")


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
            expected, actual = _expected_format(module, meta), _classify(module, tensors)
            if expected is not None and actual != expected:
                missing = {"fp8_block": "weight_scale_inv", "nvfp4": "weight_scale_2"}.get(expected, "weight_scale")
                raise InputError(
                    f"tensor {module}.{missing}: expected by quant_algo {meta.get('quant_algo')} "
                    f"(format {expected}), found a {actual} module"
                )
            mixed = meta.get("quant_algo") == "MIXED_PRECISION"  # a layer's own entry (group_size) applies to it
            layer = (meta.get("quantized_layers") or {}).get(module) if mixed else None
            linears[module] = _read_linear(module, actual, tensors, {**meta, **(layer or {})})
        kv_scales, fp16_layers = _read_kv(tensors, meta, config)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    used = {f"{m}.{s}" for m in modules for s in ("weight", "bias", *SCALE_SUFFIXES)}
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
    fp16_layers = sorted(meta.get("kv_cache_fp16_layers") or [])
    present = {i for n in tensors if (i := layer_of(n)) is not None}
    scales = {}
    for layer in range(positive_int(config, "num_hidden_layers", "config.json")) if fp8 else sorted(present):
        prefix = f"model.layers.{layer}.self_attn"
        names = [f"{prefix}.{p}" for p in ("k_proj.k_scale", "v_proj.v_scale", "q_proj.q_scale")]
        k, v, q = (tensors.get(n) for n in names)
        if fp8 and layer not in fp16_layers:
            for name, t in zip(names[:2], (k, v)):
                if t is None:
                    raise InputError(f"tensor {name}: expected by kv_cache_quant_algo FP8, found none")
        if k is not None and v is not None:
            k, v, q = (None if t is None else float(_check_scale(n, t, scalar=True)) for n, t in zip(names, (k, v, q)))
            scales[layer] = KvScales(k, v, q)
    return scales, fp16_layers


def dequantize_linear(linear: QuantizedLinear) -> torch.Tensor:
    """fp32 ``[out, in]`` weight the stored tensors stand for (the fake-quant reference)."""
    w, s = linear.weight, linear.weight_scale
    if linear.format == "fp16":
        return w.float()
    if linear.format == "fp8":
        return w.float() * s.float()
    if linear.format == "fp8_pc":
        return w.float() * s.float()[:, None]
    if linear.format == "fp8_block":
        return formats.dequantize_fp8_block(w, s, linear.block_size)
    if linear.format == "fp8_pb_wo":
        return formats.dequantize_fp8_block(w, s.reshape(s.shape[0], s.shape[2]), linear.block_size)
    if linear.format == "nvfp4":
        return formats.dequantize_nvfp4(w, s, linear.weight_scale_2, linear.block_size[1])
    raise ValueError(f"unknown format {linear.format}")
