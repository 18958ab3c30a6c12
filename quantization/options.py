"""What `llm-quantize llm` and `llm-quantize draft` are asked to do, as one value, checked before anything heavy is
imported: this module imports neither torch nor transformers, so bad flags fail at once (contract.cli).

The choices come from the registries: `--quantization` from the writable rows of `contract.weight_formats` (plus
`auto`), `--lm_head_quantization` from the rows that allow it, the KV cache from `contract.kv.KvDtype`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import InputError
from contract.kv import KvDtype
from contract.weight_formats import (
    LM_HEAD_FORMATS,
    UNQUANTIZED,
    WEIGHT_FORMATS,
    WRITABLE_FORMATS,
)
from quantization.checkpoint_writer import DEFAULT_MAX_SHARD_BYTES
from quantization.choices import AUTO_CANDIDATES, SCALE_SEARCHES, SMOOTHING_METHODS
from quantization.datasets import DEFAULT_DATASET

AUTO = "auto"  # --quantization auto: a format per linear group among quantization.auto.CANDIDATES
NONE_ALIAS = "none"  # `--quantization none`, the reference's spelling of "no weight quantization": UNQUANTIZED
KV_CHOICES = tuple(k.value for k in KvDtype if k is not KvDtype.FP16)  # `--kv_cache_quantization` (off: fp16)
# --calibration: (samples, tokens per sample). "full" is the reference's default (TensorRT-Edge-LLM's quantizer and
# ModelOpt: 512 x 512); "quick", the default here, takes minutes on a CPU for a small model and measured no less
# accurate than up to 4x its tokens for fp8 and nvfp4 with amax scales and no GPTQ (docs/quantization.md,
# "Calibration size").
CALIBRATION_PRESETS = {"quick": (64, 256), "full": (512, 512)}


def quantization_help() -> str:
    """`--quantization`'s help, from the registry's rows."""
    rows = "; ".join(f"{name}: {WEIGHT_FORMATS[name].help}" for name in WRITABLE_FORMATS)
    return f"{rows}; {AUTO}: nvfp4/fp8/fp16 per linear group by sensitivity (see --effective_bits)."


def check_choice(flag: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise InputError(f"{flag}: expected one of {', '.join(choices)}, found {value!r}")


@dataclass(kw_only=True)
class QuantizeOptions:
    """The flags `llm` and `draft` share (keyword-only, so each subclass keeps its own positional paths).
    `num_samples` / `max_seq_len` left at None take the `calibration` preset's; `kv_cache_quantization` is parsed
    into `kv_dtype`, the one name of the KV cache dtype from here to the runtime."""

    quantization: str = "fp8"
    kv_cache_quantization: str | None = None
    lm_head_quantization: str | None = None
    text_dataset: str = DEFAULT_DATASET
    calibration: str = "quick"
    num_samples: int | None = None
    max_seq_len: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    seed: int = 0
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    kv_dtype: KvDtype = field(init=False)

    def __post_init__(self) -> None:
        if self.quantization == NONE_ALIAS:
            self.quantization = UNQUANTIZED
        check_choice("--calibration", self.calibration, tuple(CALIBRATION_PRESETS))
        samples, tokens = CALIBRATION_PRESETS[self.calibration]
        self.num_samples = samples if self.num_samples is None else self.num_samples
        self.max_seq_len = tokens if self.max_seq_len is None else self.max_seq_len
        check_choice("--kv_cache_quantization", self.kv_cache_quantization, KV_CHOICES)
        self.kv_dtype = KvDtype(self.kv_cache_quantization) if self.kv_cache_quantization else KvDtype.FP16

    @property
    def overridden(self) -> bool:
        """--num_samples or --max_seq_len changed the preset's size."""
        return (self.num_samples, self.max_seq_len) != CALIBRATION_PRESETS[self.calibration]


@dataclass
class LlmOptions(QuantizeOptions):
    model_dir: Path
    output_dir: Path
    kv_cache_fp16_layers: list[int] = field(default_factory=list)
    smoothing: str | None = None  # None: the format's default_smoothing
    scale_search: str = "mse"
    fuse_scales: bool = True
    gptq: bool = True
    effective_bits: float | None = None  # with --quantization auto
    search_samples: int = 8

    @property
    def smoothing_method(self) -> str:
        """--smoothing, or the format's default: awq where NVFP4 weights are; none for FP8, where smoothquant measured
        worse end to end (docs/accuracy.md: folding into v_proj / up_proj rows leaves some rows tiny against one
        per-tensor scale)."""
        if self.smoothing:
            return self.smoothing
        return "awq" if self.quantization == AUTO else WEIGHT_FORMATS[self.quantization].default_smoothing


@dataclass
class DraftOptions(QuantizeOptions):
    base_model_dir: Path
    draft_model_dir: Path
    output_dir: Path


def check_llm_flags(o: LlmOptions) -> None:
    """Every flag of `llm` that can be rejected from the flags alone (no file read, nothing imported)."""
    check_choice("--quantization", o.quantization, (*WRITABLE_FORMATS, AUTO))
    check_choice("--smoothing", o.smoothing, SMOOTHING_METHODS)
    check_choice("--scale_search", o.scale_search, SCALE_SEARCHES)
    if o.quantization == AUTO and o.effective_bits is None:
        raise InputError("--quantization auto: expected --effective_bits B (mean bits per weight), found none")
    if o.effective_bits is not None and o.quantization != AUTO:
        raise InputError(f"--effective_bits: expected --quantization auto with it, found {o.quantization}")
    lowest, highest = (WEIGHT_FORMATS[f].bits for f in (AUTO_CANDIDATES[0], AUTO_CANDIDATES[-1]))
    if o.effective_bits is not None and not lowest <= o.effective_bits <= highest:
        raise InputError(f"--effective_bits: expected a number in [{lowest:g}, {highest:g}], "
                         f"found {o.effective_bits:g}")
    if o.smoothing not in (None, "none") and o.quantization == UNQUANTIZED:
        raise InputError(f"--smoothing {o.smoothing}: expected a --quantization that quantizes linears, found "
                         f"{UNQUANTIZED}")
    if o.search_samples < 1:
        raise InputError(f"--search_samples: expected a positive integer, found {o.search_samples}")
    check_choice("--lm_head_quantization", o.lm_head_quantization, LM_HEAD_FORMATS)
    own_layout = o.quantization != AUTO and WEIGHT_FORMATS[o.quantization].hf_quant_method
    if o.lm_head_quantization and (o.quantization == AUTO or own_layout):
        raise InputError(f"--lm_head_quantization: expected none with --quantization {o.quantization} (one layout per "
                         "file for a Hugging Face layout; auto chooses the decoder linears only)")
    if o.kv_cache_fp16_layers and o.kv_dtype is KvDtype.FP16:
        raise InputError("--kv_cache_fp16_layers: expected --kv_cache_quantization fp8 with it, found none")
    check_counts(o)


def check_counts(o: QuantizeOptions) -> None:
    counts = {"--num_samples": o.num_samples, "--max_seq_len": o.max_seq_len, "--batch_size": o.batch_size}
    for flag, value in counts.items():
        if value < 1:
            raise InputError(f"{flag}: expected a positive integer, found {value}")


def needs_calibration(o: LlmOptions) -> bool:
    """Calibration data is needed for a static input scale, the FP8 KV cache's scales, smoothing or `auto`."""
    static = any(f and f != AUTO and WEIGHT_FORMATS[f].static_input for f in (o.quantization, o.lm_head_quantization))
    return o.kv_dtype is not KvDtype.FP16 or o.quantization == AUTO or o.smoothing_method != "none" or static


def parse_layers(value: str | None) -> list[int]:
    """"0, 27" -> [0, 27]."""
    try:
        return sorted({int(v) for v in (value or "").split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--kv_cache_fp16_layers: expected comma-separated layer indices, found {value!r}") from None
