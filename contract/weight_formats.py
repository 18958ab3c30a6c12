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


UNQUANTIZED = "fp16"  # the format of a linear no recipe quantized (config.json `weight_format`, `--quantization fp16`)


def weight_storage(weight_format: str, quantized_form: str = WEIGHTS_QUANTIZED) -> str:
    """`weight_storage` of an engine of `weight_format`: fp16 for an unquantized model (whatever form was asked),
    else `quantized_form` (TensorRT, and engines built before the field existed: as exported)."""
    return WEIGHTS_FP16 if weight_format == UNQUANTIZED else quantized_form


@dataclass(frozen=True)
class WeightFormat:
    """One way a linear's weight is stored: what every stage needs to know about it as data. Its operations
    (quantize, read, dequantize, graph forms, recognising it in a graph) are the module of the same name in
    `plugins/weight_formats/`; `tests/test_weight_formats.py` fails when a row lacks its module or an operation."""

    name: str  # config.json `weight_format`, `--quantization`, the module name
    quant_algo: str | None  # ModelOpt `quant_algo` (None: no ModelOpt name)
    bits: float  # bits per weight, scales included, for effective-bits budgets
    weight_dtype: str  # safetensors dtype of the stored `weight` (NVFP4: two E2M1 codes per U8 byte along `in`)
    scale_tensors: tuple[str, ...]  # the tensors beside `weight`, by their checkpoint suffix
    act_dtype: str | None  # what the graph quantizes the linear's input to: "fp8", "nvfp4", None (kept fp16)
    act_scale: str | None  # that input scale: "static" (calibrated input_scale) or "dynamic" (computed at run time)
    help: str  # one line for `--quantization` and the docs
    writable: bool = True  # `llm-quantize` writes it (False: read from other tools' checkpoints only)
    lm_head: bool = False  # allowed for `--lm_head_quantization`
    group_size: int | None = None  # ModelOpt `group_size` metadata of the format (NVFP4: 16 elements per scale)
    hf_quant_method: str | None = None  # config.json `quantization_config.quant_method` of a Hugging Face layout
    shared_scale: bool = False  # one per-tensor scale that a fusion group (q/k/v, gate/up) shares, as ModelOpt
    scale_search: bool = False  # `--scale_search mse` searches its scales by output error
    gptq: bool = False  # `--gptq` rounds it with error compensation
    default_smoothing: str = "none"  # `--smoothing` when not given
    awq_block: int | None = None  # weight elements along `in` that AWQ's statistic normalises by (None: the row)

    @property
    def static_input(self) -> bool:
        """The input scale is calibrated (the quantizer records the input amax)."""
        return self.act_scale == "static"


WEIGHT_FORMATS = {f.name: f for f in (
    WeightFormat(UNQUANTIZED, None, 16.0, "F16", (), None, None, "unquantized (also spelled none)"),
    WeightFormat("fp8", "FP8", 8.0, "F8_E4M3", ("weight_scale", "input_scale"), "fp8", "static",
                 "FP8 E4M3 weights and activations, one scale per tensor (activations: calibrated)",
                 lm_head=True, shared_scale=True, gptq=True),
    WeightFormat("fp8_pc", "FP8_PER_CHANNEL_PER_TOKEN", 8.0, "F8_E4M3", ("weight_scale",), "fp8", "dynamic",
                 "FP8 weights per output channel, activations per token at run time"),
    WeightFormat("fp8_block", None, 8.0, "F8_E4M3", ("weight_scale_inv",), "fp8", "dynamic",
                 "FP8 weights in 128x128 blocks (Hugging Face fine-grained layout), activations per token and 128 "
                 "channels at run time", hf_quant_method="fp8"),
    WeightFormat("fp8_pb_wo", "FP8_PB_WO", 8.0, "F8_E4M3", ("weight_scale",), None, None,
                 "ModelOpt's FP8 128x128 weight-only blocks (read, not written)", writable=False),
    WeightFormat("nvfp4", "NVFP4", 4.5, "U8", ("weight_scale", "weight_scale_2", "input_scale"), "nvfp4", "static",
                 "NVFP4: E2M1 weights and activations with an FP8 scale per 16 and a global scale",
                 lm_head=True, group_size=16, shared_scale=True, scale_search=True, gptq=True,
                 default_smoothing="awq", awq_block=16),
)}
QUANTIZED_WEIGHT_FORMATS = tuple(name for name in WEIGHT_FORMATS if name != UNQUANTIZED)
WRITABLE_FORMATS = tuple(name for name, f in WEIGHT_FORMATS.items() if f.writable)  # `--quantization` choices
LM_HEAD_FORMATS = tuple(name for name, f in WEIGHT_FORMATS.items() if f.lm_head)  # `--lm_head_quantization`
# ModelOpt quant_algo -> our format name; a Hugging Face `quant_method` -> our format name
QUANT_ALGO_FORMATS = {f.quant_algo: f.name for f in WEIGHT_FORMATS.values() if f.quant_algo}
HF_QUANT_METHOD_FORMATS = {f.hf_quant_method: f.name for f in WEIGHT_FORMATS.values() if f.hf_quant_method}
SCALE_TENSORS = tuple(sorted({s for f in WEIGHT_FORMATS.values() for s in f.scale_tensors}))


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
        if fmt != UNQUANTIZED:
            counts[fmt] = counts.get(fmt, 0) + 1
    counts = dict(sorted(counts.items()))
    if not counts:
        return UNQUANTIZED, counts
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
    name = config.get("weight_format", UNQUANTIZED)
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
