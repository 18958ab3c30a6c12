"""`llm-quantize llm|draft` (or `python -m quantization`): HF checkpoint in, quantized checkpoint (ModelOpt unified HF
layout) out.

    llm-quantize llm --model_dir M --output_dir Q --quantization nvfp4 --kv_cache_quantization fp8
    llm-quantize draft --base_model_dir M --draft_model_dir D --output_dir QD   # EAGLE3 draft

Steps: check the inputs, load the model (fp32 on CPU, fp16 on CUDA), calibrate only what needs static scales
(input amax for fp8/nvfp4, post-RoPE q/k/v amax for the FP8 KV cache), quantize the weights, write the directory
atomically, print and save the calibration report. torch, transformers and the modules that need them at import
are imported inside the functions that use them, so `--help` answers at once and Ctrl-C is caught (contract.cli).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from contract.atomic import check_target
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.dir_kinds import checkpoint_mistake
from contract.errors import InputError
from contract.fields import positive_int
from contract.jsonfile import read_json
from contract.paths import checked_file
from contract.runtime_config import MODEL_INTS
from contract.tokenizer_files import PARSED, read_checked
from contract.weight_formats import WEIGHT_FORMATS
from quantization import checkpoint_writer as writer
from quantization.choices import AUTO_CANDIDATES, SCALE_SEARCHES, SMOOTHING_METHODS
from quantization.datasets import (
    CHARS_PER_TOKEN,
    DEFAULT_DATASET,
    load_texts,
    make_batches,
)
from quantization.report import build_report, format_table

if TYPE_CHECKING:
    import torch

    from contract.checkpoint import Checkpoint

REPORT_FILE = "quantization_report.json"
# --calibration: (samples, tokens per sample). "full" is the reference's default (TensorRT-Edge-LLM's quantizer and
# ModelOpt: 512 x 512); "quick", the default here, takes minutes on a CPU for a small model and measured no less
# accurate than up to 4x its tokens for fp8 and nvfp4 with amax scales and no GPTQ (docs/quantization.md,
# "Calibration size").
CALIBRATION_PRESETS = {"quick": (64, 256), "full": (512, 512)}


@dataclass(kw_only=True)
class QuantizeOptions:
    """The flags `llm` and `draft` share (keyword-only, so each subclass keeps its own positional paths).
    `num_samples` / `max_seq_len` left at None take the `calibration` preset's."""

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
    max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self) -> None:
        _check_choice("--calibration", self.calibration, tuple(CALIBRATION_PRESETS))
        samples, tokens = CALIBRATION_PRESETS[self.calibration]
        self.num_samples = samples if self.num_samples is None else self.num_samples
        self.max_seq_len = tokens if self.max_seq_len is None else self.max_seq_len


@dataclass
class LlmOptions(QuantizeOptions):
    model_dir: Path
    output_dir: Path
    kv_cache_fp16_layers: list[int] = field(default_factory=list)
    smoothing: str | None = None  # None: DEFAULT_SMOOTHING of the format
    scale_search: str = "mse"
    fuse_scales: bool = True
    gptq: bool = True
    effective_bits: float | None = None  # with --quantization auto
    search_samples: int = 8


# --smoothing when not given: awq where NVFP4 weights are; none for FP8, where smoothquant measured worse end to end
# (docs/accuracy.md: folding into v_proj / up_proj rows leaves some rows tiny against one per-tensor scale)
DEFAULT_SMOOTHING = {"nvfp4": "awq", writer.AUTO: "awq"}


def smoothing_method(o: LlmOptions) -> str:
    return o.smoothing or DEFAULT_SMOOTHING.get(o.quantization, "none")


def _check_choice(flag: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise InputError(f"{flag}: expected one of {', '.join(choices)}, found {value!r}")


def check_options(o: LlmOptions) -> None:
    """Everything that can be rejected before a model is loaded."""
    import torch

    _check_choice("--quantization", o.quantization, (*writer.METHODS, writer.AUTO))
    _check_choice("--smoothing", o.smoothing, SMOOTHING_METHODS)
    _check_choice("--scale_search", o.scale_search, SCALE_SEARCHES)
    if o.quantization == writer.AUTO and o.effective_bits is None:
        raise InputError("--quantization auto: expected --effective_bits B (mean bits per weight), found none")
    if o.effective_bits is not None and o.quantization != writer.AUTO:
        raise InputError(f"--effective_bits: expected --quantization auto with it, found {o.quantization}")
    lowest, highest = (WEIGHT_FORMATS[f].bits for f in (AUTO_CANDIDATES[0], AUTO_CANDIDATES[-1]))
    if o.effective_bits is not None and not lowest <= o.effective_bits <= highest:
        raise InputError(f"--effective_bits: expected a number in [{lowest:g}, {highest:g}], "
                         f"found {o.effective_bits:g}")
    if o.smoothing not in (None, "none") and o.quantization == "none":
        raise InputError(f"--smoothing {o.smoothing}: expected a --quantization that quantizes linears, found none")
    if o.search_samples < 1:
        raise InputError(f"--search_samples: expected a positive integer, found {o.search_samples}")
    _check_choice("--kv_cache_quantization", o.kv_cache_quantization, ("fp8",))
    _check_choice("--lm_head_quantization", o.lm_head_quantization, writer.LM_HEAD_METHODS)
    if o.lm_head_quantization and o.quantization in ("fp8_block", writer.AUTO):
        raise InputError(f"--lm_head_quantization: expected none with --quantization {o.quantization} (one layout per "
                         "file for fp8_block; auto chooses the decoder linears only)")
    if o.kv_cache_fp16_layers and o.kv_cache_quantization != "fp8":
        raise InputError("--kv_cache_fp16_layers: expected --kv_cache_quantization fp8 with it, found none")
    counts = {"--num_samples": o.num_samples, "--max_seq_len": o.max_seq_len, "--batch_size": o.batch_size}
    for flag, value in counts.items():
        if value < 1:
            raise InputError(f"{flag}: expected a positive integer, found {value}")
    if o.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: expected a CUDA GPU, found none")
    config = o.model_dir / "config.json"
    mistake = checkpoint_mistake(o.model_dir, o.output_dir, "--model_dir takes the Hugging Face checkpoint to "
                                 "quantize, --output_dir the new one (swapped?); quantize before exporting")
    if mistake:
        raise InputError(f"--model_dir {mistake}")
    if not config.is_file():
        raise InputError(f"{config}: expected the HF config of --model_dir, found no such file")
    check_inside(o.model_dir)
    from contract.checkpoint import open_checkpoint

    ckpt = open_checkpoint(o.model_dir)  # safetensors only, no auto_map; indexes the tensors without reading them
    if "quantization_config" in ckpt.config or (o.model_dir / "hf_quant_config.json").exists():
        raise InputError(f"{o.model_dir}: expected an unquantized checkpoint, found a quantization config")
    check_weights(ckpt)
    check_target(o.output_dir, kind=writer.OUTPUT_KIND, flag="--output_dir", inputs=[o.model_dir])


def check_inside(model_dir: Path) -> None:
    """Everything transformers will read from `model_dir` (config, weights, index, tokenizer files) must be a regular
    file inside it (contract.paths; the Hugging Face cache layout is fine), and the tokenizer files must parse."""
    for path in sorted(model_dir.iterdir()):
        if path.name.endswith((".json", ".safetensors", ".bin", ".jinja", ".model", ".txt")):
            checked_file(model_dir, path.name, "a checkpoint file")
    for name in writer.SIDE_FILES:
        if name.endswith(PARSED):
            read_checked(model_dir, name)


def check_weights(ckpt: Checkpoint) -> None:
    """The checkpoint's tensors (their safetensors headers; no data is read) against the model its config.json
    describes, before `transformers` loads it: it would fill a tensor the files lack with random values, drop one the
    model has no place for, and allocate whatever dims the config states."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from contract.checkpoint import layer_of

    model_dir, hf_config, where = ckpt.path, ckpt.config, ckpt.path / "config.json"
    stored = {name: ckpt.header(name) for name in ckpt.files}
    for key in MODEL_INTS:
        positive_int(hf_config, key, str(where))
    layers = {i for n in stored if (i := layer_of(n)) is not None}
    if hf_config["num_hidden_layers"] != len(layers):  # before the model is built: its size follows this count
        raise InputError(f"{where}: num_hidden_layers: expected {len(layers)} (the decoder layers the weights hold), "
                         f"found {hf_config['num_hidden_layers']}")
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):  # shapes only, nothing allocated
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError... for a config it cannot build
        raise InputError(f"{where}: expected a config transformers builds a causal LM from, found one it cannot "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    table = model.get_input_embeddings().weight  # a tied lm_head is this same tensor; the files may hold one name
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is table}
    expected = {n: list(t.shape) for n, t in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in stored:
            if not (name in tied and tied & stored.keys()):
                raise InputError(f"{model_dir}: tensor {name}: expected by the {config.model_type} model config.json "
                                 "describes, found none in the weights")
        elif stored[name][0] != shape or stored[name][1] not in ("F16", "BF16", "F32"):
            raise InputError(f"{model_dir}: tensor {name}: expected F16, BF16 or F32 {shape} (config.json), found "
                             f"{stored[name][1]} {stored[name][0]}")
    unused = sorted(n for n in stored if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise InputError(f"{model_dir}: tensor {unused[0]}: expected only tensors of the {config.model_type} model "
                         "config.json describes, found it unused (check attention_bias and tie_word_embeddings)")


def check_finite(state_dict: dict[str, torch.Tensor], model_dir: Path) -> None:
    """NaN or Inf in a weight would silently poison every scale computed from it."""
    import torch

    for name, t in state_dict.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            kind = "NaN" if torch.isnan(t).any() else "Inf"
            raise InputError(f"{model_dir}: tensor {name}: expected finite values, found {kind}")


def quantization_plan(model, o: LlmOptions) -> dict[str, str]:
    """Module name -> method for every linear that gets quantized: the decoder layers' linears, lm_head on request."""
    import torch

    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head" or name.endswith(".lm_head"):
            if o.lm_head_quantization:
                plan[name] = o.lm_head_quantization
        elif ".layers." in name and o.quantization not in ("none", writer.AUTO):
            plan[name] = o.quantization
    return plan


def parse_layers(value: str | None) -> list[int]:
    """"0, 27" -> [0, 27]."""
    try:
        return sorted({int(v) for v in (value or "").split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--kv_cache_fp16_layers: expected comma-separated layer indices, found {value!r}") from None


def calibration_batches(tokenizer_dir: Path, texts: list[str], o) -> list:
    """The calibration texts tokenized into batches of `o.batch_size` rows of at most `o.max_seq_len` tokens."""
    from transformers import AutoTokenizer

    return list(make_batches(AutoTokenizer.from_pretrained(tokenizer_dir), texts, o.max_seq_len, o.batch_size))


def calibration_data(tokenizer_dir: Path, o) -> tuple[list, dict]:
    """The calibration batches and what they hold (for the report), said on stderr before the long part starts,
    with a warning when the data set yields fewer samples than asked for."""
    texts = load_texts(o.text_dataset, o.num_samples, o.max_seq_len * CHARS_PER_TOKEN, o.seed)
    batches = calibration_batches(tokenizer_dir, texts, o)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    info = {"preset": o.calibration, "samples_asked": o.num_samples, "max_seq_len": o.max_seq_len,
            "samples": len(texts), "tokens": tokens, "warnings": []}
    if len(texts) < o.num_samples:
        info["warnings"].append(f"--text_dataset {o.text_dataset}: {len(texts)} samples of up to {o.max_seq_len} "
                                f"tokens, fewer than the {o.num_samples} asked for (--num_samples)")
    other = "quick" if o.calibration == "full" else "full"
    click.echo(f"calibration: {len(texts)} samples, {tokens} tokens (up to {o.max_seq_len} per sample) from "
               f"{o.text_dataset} (--calibration {o.calibration}; --calibration {other}: "
               f"{' x '.join(map(str, CALIBRATION_PRESETS[other]))})", err=True)
    for warning in info["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    return batches, info


def static_inputs(plan: dict[str, str]) -> list[str]:
    """The linears whose format needs a calibrated input amax (static activation scales)."""
    return [m for m, method in plan.items() if writer.needs_input_amax(method)]


def quantize_llm(o: LlmOptions) -> dict:
    """The `llm` subcommand; returns the calibration report.

    Order: (auto) pick formats by sensitivity -> search and fold smoothing scales -> calibrate static scales on the
    folded model -> choose weight scales (shared per fusion group, NVFP4 searched) -> write."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantization import auto, gptq
    from quantization import smoothing as smoothing_mod
    from quantization.calibrate import Calibration, calibrate

    check_options(o)
    kv_fp8 = o.kv_cache_quantization == "fp8"
    is_auto = o.quantization == writer.AUTO
    smoothing = smoothing_method(o)
    methods = {o.quantization, o.lm_head_quantization}
    needs_calibration = (kv_fp8 or is_auto or smoothing != "none"
                         or any(m and writer.needs_input_amax(m) for m in methods))
    num_layers = read_json(o.model_dir / "config.json", "the model config").get("num_hidden_layers", 0)
    bad = [i for i in o.kv_cache_fp16_layers if not 0 <= i < num_layers]
    if bad:
        raise InputError(f"--kv_cache_fp16_layers: expected layer indices in [0, {num_layers}), found {bad}")
    batches, data = [], {"samples": 0, "warnings": []}
    if needs_calibration:  # before loading the model, so a bad dataset fails fast
        batches, data = calibration_data(o.model_dir, o)

    torch.manual_seed(o.seed)
    dtype = torch.float16 if o.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(o.model_dir, dtype=dtype, attn_implementation="sdpa").to(o.device)
    model.eval()
    check_finite(model.state_dict(), o.model_dir)

    plan = quantization_plan(model, o)
    search_batches = batches[: -(-o.search_samples // o.batch_size)]  # hyper-parameters: a slice of the calibration
    method_report: dict = {}
    if is_auto:
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
                   and not writer.unfit_reason("nvfp4", tuple(m.weight.shape))]
        sizes = {n: model.get_submodule(n).weight.numel() for n in linears}
        scores = auto.sensitivities(model, search_batches[: -(-auto.SAMPLES // o.batch_size)], linears)
        chosen = auto.choose_formats(scores, sizes, o.effective_bits)
        plan.update({n: f for n, f in chosen.items() if f != "fp16"})
        method_report["auto"] = {"effective_bits": round(auto.effective_bits(chosen, sizes), 4),
                                 "budget": o.effective_bits,
                                 "formats": {f: sum(v == f for v in chosen.values()) for f in auto.CANDIDATES}}
    # the linears whose format fits them (the writer keeps the others fp16 and reports why)
    fits = {n: f for n, f in plan.items() if not writer.unfit_reason(f, tuple(model.get_submodule(n).weight.shape))}
    results = smoothing_mod.smooth(model, search_batches, fits, smoothing, seed=o.seed)
    method_report["smoothing"] = smoothing_mod.summarize(smoothing, results)

    calib = Calibration()
    if needs_calibration:
        nvfp4 = [n for n, f in fits.items() if f == "nvfp4"]
        squares = nvfp4 if o.scale_search == "mse" else []
        hessians = [n for n, f in fits.items() if f in gptq.FORMATS] if o.gptq else []
        calib = calibrate(model, batches, sorted({*static_inputs(plan), *squares, *hessians}), kv=kv_fp8,
                          square_names=squares, hessian_names=hessians)

    return write_llm(model, o, plan, calib, data, method_report)


def write_llm(model, o: LlmOptions, plan: dict[str, str], calib, data: dict, method_report: dict) -> dict:
    """The tail of `llm` on a (smoothed) model and its calibration: weight scales (shared per fusion group, NVFP4
    searched), GPTQ, the quantized tensors, the report, the directory. Returns the report; `data` is what the
    calibration held (`calibration_data`), `method_report` what the earlier steps did."""
    import torch

    from quantization import gptq, scale_search

    kv_fp8 = o.kv_cache_quantization == "fp8"
    state_dict = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    config = read_json(o.model_dir / "config.json", "the model config")
    lm_head = [m for m in plan if m.endswith("lm_head")]
    if config.get("tie_word_embeddings"):
        if lm_head:  # a quantized lm_head can no longer share the fp16 embedding table
            config["tie_word_embeddings"] = False
        else:
            state_dict.pop("lm_head.weight", None)
    scales, method_report["weight_scales"] = scale_search.weight_scales(
        state_dict, plan, calib.input_sq, o.scale_search == "mse", o.fuse_scales, gptq_blocks=o.gptq and bool(calib.hessian))
    if o.gptq:
        # (the linears whose format does not fit them have no scales, so GPTQ leaves them alone)
        method_report["gptq"] = gptq.apply(state_dict, plan, scales, calib.hessian, o.scale_search == "mse")
    kv_scales = {i: a for i, a in calib.qkv_amax.items() if i not in o.kv_cache_fp16_layers} if kv_fp8 else {}
    qt = writer.quantize_state_dict(state_dict, plan, calib.input_amax, kv_scales, weight_scales=scales)

    all_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    report = with_calibration(build_report(calib, o.quantization, kv_fp8, o.kv_cache_fp16_layers, qt.excluded,
                                           data["samples"]), data)
    report["methods"] = method_report
    if "auto" in method_report:
        report["effective_bits"] = method_report["auto"]["effective_bits"]
    write_quantized(qt, config, all_linears, report, o.quantization, kv_fp8, o.kv_cache_fp16_layers,
                    source_dir=o.model_dir, output_dir=o.output_dir, max_shard_bytes=o.max_shard_bytes)
    return report


def with_calibration(report: dict, data: dict) -> dict:
    """The report with what the calibration data held (`calibration_data`) and its warnings first."""
    report["calibration"] = {k: v for k, v in data.items() if k != "warnings"}
    report["warnings"] = data["warnings"] + report["warnings"]
    return report


def write_quantized(qt, config: dict, linears: list[str], report: dict, quantization: str, kv_fp8: bool,
                    kv_fp16_layers: list[int], *, source_dir: Path, output_dir: Path, max_shard_bytes: int,
                    inputs: tuple[Path, ...] = ()) -> None:
    """The tail both subcommands share: hf_quant_config (and HF's fine-grained config for fp8_block), then the
    checkpoint with its calibration report; `inputs` are the directories read besides `source_dir`."""
    quant_config = writer.hf_quant_config(qt, linears, kv_fp8, kv_fp16_layers)
    if quantization == "fp8_block":
        config["quantization_config"] = writer.fine_grained_fp8_config(quant_config["quantization"]["exclude_modules"])
    writer.write_checkpoint(output_dir, qt.tensors, config, quant_config, source_dir,
                            extra_files={REPORT_FILE: json.dumps(report, indent=2)}, max_shard_bytes=max_shard_bytes,
                            inputs=inputs)


@dataclass
class DraftOptions(QuantizeOptions):
    base_model_dir: Path
    draft_model_dir: Path
    output_dir: Path


def quantize_draft(o: DraftOptions) -> dict:
    """The `draft` subcommand: calibrate an EAGLE3 draft on its base's hidden states, quantize fc and midlayer.*."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantization import eagle3
    from quantization.calibrate import Calibration

    _check_choice("--quantization", o.quantization, writer.METHODS)  # no auto: a draft has one linear per kind
    if o.kv_cache_quantization:  # the reference hard-codes the draft's KV cache to fp16
        raise InputError(
            f"--kv_cache_quantization {o.kv_cache_quantization}: expected none for a draft (its KV cache is fp16)"
        )
    base_config = o.base_model_dir / "config.json"
    if not base_config.is_file():
        raise InputError(f"{base_config}: expected the HF config of --base_model_dir, found no such file")
    # the base and the shared flags go through the same checks as `llm --model_dir`
    shared = {k: v for k, v in vars(o).items() if k not in ("base_model_dir", "draft_model_dir")}
    check_options(LlmOptions(**{**shared, "model_dir": o.base_model_dir}))
    check_inside(o.draft_model_dir)
    check_target(o.output_dir, kind=writer.OUTPUT_KIND, flag="--output_dir",
                 inputs=[o.base_model_dir, o.draft_model_dir])
    config = eagle3.read_draft_config(o.draft_model_dir)
    tensors = eagle3.read_draft_tensors(o.draft_model_dir)
    check_finite(tensors, o.draft_model_dir)
    methods = {o.quantization, o.lm_head_quantization}
    needs_calibration = any(m and writer.needs_input_amax(m) for m in methods)

    base_config = read_json(base_config, "the base model config")
    layer_ids = eagle3.target_layer_ids(config, base_config.get("num_hidden_layers", 0))
    model = eagle3.build_draft(config, tensors, base_config.get("hidden_size"), len(layer_ids), o.draft_model_dir)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {n: o.quantization for n in linears if n != "lm_head" and o.quantization != "none"}
    if o.lm_head_quantization:
        plan["lm_head"] = o.lm_head_quantization
    batches, data = [], {"samples": 0, "warnings": []}
    if needs_calibration:  # after every check of the draft, before the base model loads
        batches, data = calibration_data(o.base_model_dir, o)
    calib = Calibration()
    if needs_calibration:
        torch.manual_seed(o.seed)
        dtype = torch.float16 if o.device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(o.base_model_dir, dtype=dtype, attn_implementation="sdpa")
        base = base.to(o.device).eval()
        calib = eagle3.calibrate_draft(base, model.to(o.device, dtype), batches, layer_ids, static_inputs(plan))

    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    qt = writer.quantize_state_dict(state_dict, plan, calib.input_amax, {})
    report = with_calibration(build_report(calib, o.quantization, False, [], qt.excluded, data["samples"]), data)
    report["target_layer_ids"] = layer_ids
    write_quantized(qt, config, linears, report, o.quantization, False, [],
                    source_dir=o.draft_model_dir, output_dir=o.output_dir, max_shard_bytes=o.max_shard_bytes,
                    inputs=(o.base_model_dir,))
    return report


@click.group(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-quantize llm --model_dir SmolLM2-135M-Instruct --output_dir smollm2-nvfp4 --quantization nvfp4 "
    "--kv_cache_quantization fp8",
    "llm-quantize draft --base_model_dir Llama-3.1-8B-Instruct --draft_model_dir EAGLE3-LLaMA3.1-8B "
    "--output_dir eagle3-fp8"))
def cli() -> None:
    """Quantize Hugging Face checkpoints to FP8 / NVFP4 with an optional calibrated FP8 KV cache."""


def calibration_options(command):
    """The calibration flags `llm` and `draft` share."""
    for option in reversed([
        click.option("--text_dataset", default=DEFAULT_DATASET, show_default=True,
                     help="Name or .txt/.jsonl/.json path."),
        click.option("--calibration", default="quick", show_default=True, type=click.Choice(list(CALIBRATION_PRESETS)),
                     help="Calibration size: quick = " + " x ".join(map(str, CALIBRATION_PRESETS["quick"]))
                     + " (samples x tokens), minutes on a laptop CPU for a small model; full = the reference's "
                     + " x ".join(map(str, CALIBRATION_PRESETS["full"])) + "."),
        click.option("--num_samples", default=None, type=int, help="Calibration samples [default: the preset's]."),
        click.option("--max_seq_len", default=None, type=int,
                     help="Most tokens per calibration sample [default: the preset's]."),
        click.option("--batch_size", default=4, show_default=True, type=int),
        click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"])),
        click.option("--seed", default=0, show_default=True, type=int, help="Picks the calibration samples."),
    ]):
        command = option(command)
    return command


@cli.command(epilog=example(
    "llm-quantize llm --model_dir SmolLM2-135M-Instruct --output_dir smollm2-nvfp4 --quantization nvfp4 "
    "--kv_cache_quantization fp8"))
@click.option("--model_dir", required=True, type=click.Path(path_type=Path), help="HF checkpoint (fp16/bf16).")
@click.option("--output_dir", required=True, type=click.Path(path_type=Path),
              help="New directory (an earlier quantized checkpoint there is replaced; anything else is refused).")
@click.option("--quantization", default="fp8", show_default=True,
              help="fp8 | fp8_pc | fp8_block | nvfp4 | none | auto (nvfp4/fp8/fp16 per linear, see --effective_bits)")
@click.option("--kv_cache_quantization", default=None, help="fp8: calibrated per-layer q/k/v scales.")
@click.option("--lm_head_quantization", default=None, help="fp8 | nvfp4 (lm_head stays fp16 otherwise).")
@click.option("--kv_cache_fp16_layers", default=None, help="Comma-separated layers whose KV stays fp16, e.g. 0,27.")
@click.option("--effective_bits", default=None, type=float,
              help="With --quantization auto: mean bits per decoder-linear weight (nvfp4 4.5, fp8 8, fp16 16).")
@click.option("--smoothing", default=None, type=click.Choice(SMOOTHING_METHODS),
              help="Per-channel input scaling searched on calibration data and folded into the preceding norm or "
                   "linear. [default: awq for nvfp4 and auto, none otherwise]")
@click.option("--scale_search", default="mse", show_default=True, type=click.Choice(SCALE_SEARCHES),
              help="NVFP4 block and global scales: mse = chosen by output error, amax = from the amax.")
@click.option("--fuse_scales/--no-fuse_scales", default=True, show_default=True,
              help="One weight_scale_2 (NVFP4) / weight_scale (FP8) shared by q/k/v and by gate/up, as ModelOpt.")
@click.option("--gptq/--no-gptq", default=True, show_default=True,
              help="NVFP4 and per-tensor FP8 weights rounded with GPTQ error compensation (input covariance from "
                   "calibration).")
@click.option("--search_samples", default=8, show_default=True, type=int,
              help="Calibration samples the searches (smoothing, auto) run on.")
@calibration_options
def llm(model_dir, output_dir, kv_cache_fp16_layers, **kwargs) -> None:
    """Quantize a causal LM checkpoint."""
    layers = parse_layers(kv_cache_fp16_layers)
    report = quantize_llm(LlmOptions(model_dir, output_dir, kv_cache_fp16_layers=layers, **kwargs))
    table = format_table(report)
    if table:
        click.echo(table)
    click.echo(f"wrote {output_dir} ({report['quantization']}, kv cache {report['kv_cache_quantization'] or 'fp16'})")


@cli.command(epilog=example(
    "llm-quantize draft --base_model_dir Llama-3.1-8B-Instruct --draft_model_dir EAGLE3-LLaMA3.1-8B "
    "--output_dir eagle3-fp8"))
@click.option("--base_model_dir", required=True, type=click.Path(path_type=Path), help="The draft's HF base model.")
@click.option("--draft_model_dir", required=True, type=click.Path(path_type=Path), help="EAGLE3 draft checkpoint.")
@click.option("--output_dir", required=True, type=click.Path(path_type=Path),
              help="New directory (an earlier quantized checkpoint there is replaced; anything else is refused).")
@click.option("--quantization", default="fp8", show_default=True, help="fp8 | fp8_pc | fp8_block | nvfp4 | none")
@click.option("--kv_cache_quantization", default=None, help="Refused: the draft's KV cache is always fp16.")
@click.option("--lm_head_quantization", default=None, help="fp8 | nvfp4 (the draft lm_head stays fp16 otherwise).")
@calibration_options
def draft(**kwargs) -> None:
    """Quantize an EAGLE3 draft, calibrated on the base model's hidden states."""
    report = quantize_draft(DraftOptions(**kwargs))
    table = format_table(report)
    if table:
        click.echo(table)
    click.echo(f"wrote {kwargs['output_dir']} (EAGLE3 draft, {report['quantization']}, kv cache fp16)")


def main(argv: list[str] | None = None) -> int:
    """`llm-quantize` (also `python -m quantization`); exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)
