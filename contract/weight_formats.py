"""Weight formats (contracts.md 2.1, docs/quantization.md): the registry of how a linear's weight can be stored,
how a model's mix of them is summarised in config.json, and what an engine holds its weights in at rest."""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import InputError
from contract.fields import is_int

# What an engine holds its linear weights in at rest (builder_config `weight_storage`, contracts.md 5.1): "fp16"
# for an unquantized model; a quantized model's weights either "quantized" (FP8 / packed FP4 as exported: always on
# TensorRT, which runs them natively; on ONNX Runtime dequantized at every step, the low-memory form) or "fp32"
# (ONNX Runtime only: dequantized once at build, the fast form and the default; `llm-build --cpuWeights`).
WEIGHTS_FP16, WEIGHTS_FP32, WEIGHTS_QUANTIZED = "fp16", "fp32", "quantized"
WEIGHT_STORAGE_FORMS = (WEIGHTS_FP16, WEIGHTS_FP32, WEIGHTS_QUANTIZED)
CPU_WEIGHTS = (WEIGHTS_FP32, WEIGHTS_QUANTIZED)  # the choices of `llm-build --cpuWeights`


def weight_storage(weight_format: str, quantized_form: str = WEIGHTS_QUANTIZED) -> str:
    """`weight_storage` of an engine of `weight_format`: fp16 for an unquantized model (whatever form was asked),
    else `quantized_form` (TensorRT, and engines built before the field existed: as exported)."""
    return WEIGHTS_FP16 if weight_format == "fp16" else quantized_form



@dataclass(frozen=True)
class WeightFormat:
    """One way a linear's weight is stored, as config.json `weight_format` and the exporter name it."""

    name: str
    quant_algo: str | None  # ModelOpt's `quant_algo` for a checkpoint of only this format (None: no ModelOpt name)
    activations: str  # how the graph quantizes the linear's input: "none", "static fp8", "dynamic fp8", "nvfp4"
    bits: float  # bits per weight, scales included, for effective-bits budgets


WEIGHT_FORMATS = {f.name: f for f in (
    WeightFormat("fp16", None, "none", 16.0),
    WeightFormat("fp8", "FP8", "static fp8", 8.0),
    WeightFormat("fp8_pc", "FP8_PER_CHANNEL_PER_TOKEN", "dynamic fp8", 8.0),
    # HF fine-grained 128x128 (weight_scale_inv); ModelOpt has no algo name for this layout
    WeightFormat("fp8_block", None, "dynamic fp8", 8.0),
    WeightFormat("fp8_pb_wo", "FP8_PB_WO", "none", 8.0),
    WeightFormat("nvfp4", "NVFP4", "nvfp4", 4.5),  # 4-bit codes + one FP8 scale per 16
)}
QUANTIZED_WEIGHT_FORMATS = tuple(name for name in WEIGHT_FORMATS if name != "fp16")
# ModelOpt quant_algo -> our format name
QUANT_ALGO_FORMATS = {f.quant_algo: f.name for f in WEIGHT_FORMATS.values() if f.quant_algo}


# config.json `weight_format` of an export whose quantized linears use more than one format; `weight_formats` then
# holds the number of quantized linears of each format (what detection counts in model.onnx)
MIXED_WEIGHTS = "mixed"
WEIGHT_FORMAT_COUNTS = "weight_formats"

# ModelOpt quant_algo names we do not read, with what they are, so a refusal can say it by name
UNSUPPORTED_QUANT_ALGOS = {
    "W8A8_SQ_PER_CHANNEL": "INT8 SmoothQuant",
    "W8A16": "INT8 weight-only",
    "W4A16_AWQ": "INT4 AWQ",
    "W4A8_AWQ": "INT4 AWQ with FP8 activations",
    "NVFP4_AWQ": "NVFP4 AWQ (unfolded pre_quant_scale)",
    "W4A8_NVFP4_FP8": "NVFP4 weights with FP8 activations",
    "W4A16_NVFP4": "NVFP4 weight-only",
    "MXFP4": "MXFP4",
    "W4A8_MXFP4_FP8": "MXFP4 weights with FP8 activations",
    "MXFP8": "MXFP8",
    "FP8_PB_REAL": "FP8 128x128 blocks with FP8 activations",
}


def unsupported_quant_algo(algo, where: str) -> InputError:
    """The refusal of a quant_algo we cannot read, naming what it is."""
    what = UNSUPPORTED_QUANT_ALGOS.get(str(algo).upper(), f"quant_algo {algo!r}")
    return InputError(f"{where}: {what} layers are not supported (quant_algo {algo!r}); expected one of "
                      f"{', '.join(QUANT_ALGO_FORMATS)}")


def summarize_weight_formats(per_linear) -> tuple[str, dict[str, int]]:
    """(`weight_format`, count per quantized format) of linears' formats: "fp16" when none is quantized, the one
    format, or `MIXED_WEIGHTS`."""
    counts: dict[str, int] = {}
    for fmt in per_linear:
        if fmt != "fp16":
            counts[fmt] = counts.get(fmt, 0) + 1
    counts = dict(sorted(counts.items()))
    if not counts:
        return "fp16", counts
    return (next(iter(counts)) if len(counts) == 1 else MIXED_WEIGHTS), counts


def weight_format_fields(weight_format: str, counts: dict[str, int] | None) -> dict:
    """The config fields that say a model's weight formats (config.json, builder_config): `weight_format`, and the
    quantized linears per format (`WEIGHT_FORMAT_COUNTS`) only when it is `MIXED_WEIGHTS`."""
    fields: dict = {"weight_format": weight_format}
    if weight_format == MIXED_WEIGHTS:
        fields[WEIGHT_FORMAT_COUNTS] = counts
    return fields


def weight_format(name, where: str) -> WeightFormat:
    """The registered format called `name`; InputError naming `where` otherwise."""
    if name not in WEIGHT_FORMATS:
        raise InputError(f"{where}: expected weight_format one of {list(WEIGHT_FORMATS)}, found {name!r}")
    return WEIGHT_FORMATS[name]


def check_weight_formats(config: dict, where: str) -> None:
    """A config's `weight_format`: a registered format, or `MIXED_WEIGHTS` with a count per quantized format."""
    name = config.get("weight_format", "fp16")
    if name != MIXED_WEIGHTS:
        weight_format(name, where)
        return
    counts = config.get(WEIGHT_FORMAT_COUNTS)
    if not (isinstance(counts, dict) and counts and all(
            f in QUANTIZED_WEIGHT_FORMATS and is_int(n) and n > 0
            for f, n in counts.items())):
        raise InputError(f"{where}: {WEIGHT_FORMAT_COUNTS}: expected, with weight_format {MIXED_WEIGHTS!r}, a "
                         f"positive count of linears per format of {list(QUANTIZED_WEIGHT_FORMATS)}, "
                         f"found {counts!r:.80}")
