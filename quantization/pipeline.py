"""The quantizer's work as named steps over one value, `Run`: what `llm-quantize llm` does, in order.

    check_inputs -> calibration_data -> load_model -> plan_formats -> smooth -> calibrate -> weight_scales -> gptq
    -> quantize -> write

Each step reads what the earlier ones put into the `Run` and adds its own part; `quantize_llm` runs them all and
returns the calibration report. `check_inputs` reads only file headers and builds the model on the meta device, so a
bad checkpoint fails before any weight is loaded. torch, transformers and the modules that need them at import are
imported inside the steps, so `--help` answers at once and Ctrl-C is caught (contract.cli).

`quantize_draft` is the EAGLE3 draft's shorter pipeline (calibrated on the base's hidden states); both end in
`write_quantized`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from contract.atomic import check_target
from contract.dir_kinds import checkpoint_mistake
from contract.errors import InputError
from contract.families import Family, family_of
from contract.fields import positive_int
from contract.jsonfile import read_json
from contract.kv import KvDtype
from contract.paths import checked_file
from contract.runtime_config import MODEL_INTS
from contract.tokenizer_files import PARSED, read_checked
from contract.weight_formats import UNQUANTIZED, WEIGHT_FORMATS, WRITABLE_FORMATS
from quantization import checkpoint_writer as writer
from quantization.datasets import CHARS_PER_TOKEN, load_texts, make_batches
from quantization.options import (
    AUTO,
    CALIBRATION_PRESETS,
    DraftOptions,
    LlmOptions,
    check_choice,
    check_counts,
    check_llm_flags,
    needs_calibration,
)
from quantization.report import build_report

if TYPE_CHECKING:
    import torch

    from contract.checkpoint import Checkpoint

REPORT_FILE = "quantization_report.json"


@dataclass
class Run:
    """One `llm` run: the options, then what each step found or made."""

    options: LlmOptions
    config: dict  # the checkpoint's config.json, as read (the writer copies it)
    family: Family
    batches: list = field(default_factory=list)  # calibration batches (quantization.datasets.Batch)
    data: dict = field(default_factory=lambda: {"samples": 0, "warnings": []})  # what the calibration held
    model: Any = None  # the transformers model (smoothing folds into it)
    plan: dict[str, str] = field(default_factory=dict)  # module -> weight format of every linear to quantize
    fits: dict[str, str] = field(default_factory=dict)  # the plan's linears whose format fits their shape
    methods: dict = field(default_factory=dict)  # the report's entry per method (auto, smoothing, scales, gptq)
    calibration: Any = None  # quantization.calibrate.Calibration
    state_dict: dict = field(default_factory=dict)  # fp32 weights after smoothing (GPTQ rounds in place)
    scales: dict = field(default_factory=dict)  # module -> chosen weight scales
    quantized: Any = None  # checkpoint_writer.QuantizedTensors
    report: dict = field(default_factory=dict)

    @property
    def search_batches(self) -> list:
        """The slice of the calibration the hyper-parameter searches run on."""
        o = self.options
        return self.batches[: -(-o.search_samples // o.batch_size)]


# --- check_inputs -------------------------------------------------------------------------------------------------

def check_inputs(o: LlmOptions) -> Run:
    """Every check that needs no weight loaded: flags, the checkpoint's files and family, its tensors' headers
    against its config, the output target."""
    check_llm_flags(o)
    if o.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: expected a CUDA GPU, found none")
    config_path = o.model_dir / "config.json"
    mistake = checkpoint_mistake(o.model_dir, o.output_dir, "--model_dir takes the Hugging Face checkpoint to "
                                 "quantize, --output_dir the new one (swapped?); quantize before exporting")
    if mistake:
        raise InputError(f"--model_dir {mistake}")
    if not config_path.is_file():
        raise InputError(f"{config_path}: expected the HF config of --model_dir, found no such file")
    check_inside(o.model_dir)
    from contract.checkpoint import open_checkpoint

    ckpt = open_checkpoint(o.model_dir)  # safetensors only, no auto_map; indexes the tensors without reading them
    if "quantization_config" in ckpt.config or (o.model_dir / "hf_quant_config.json").exists():
        raise InputError(f"{o.model_dir}: expected an unquantized checkpoint, found a quantization config")
    family = family_of(ckpt.config, str(config_path))  # before transformers builds anything of it
    check_weights(ckpt)
    check_target(o.output_dir, kind=writer.OUTPUT_KIND, flag="--output_dir", inputs=[o.model_dir])
    num_layers = ckpt.config["num_hidden_layers"]
    bad = [i for i in o.kv_cache_fp16_layers if not 0 <= i < num_layers]
    if bad:
        raise InputError(f"--kv_cache_fp16_layers: expected layer indices in [0, {num_layers}), found {bad}")
    return Run(o, read_json(config_path, "the model config"), family)


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


# --- the steps ----------------------------------------------------------------------------------------------------

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


def load_calibration_data(run: Run) -> None:
    """Before the model loads, so a bad data set fails fast."""
    if needs_calibration(run.options):
        run.batches, run.data = calibration_data(run.options.model_dir, run.options)


def load_model(run: Run) -> None:
    """The checkpoint in fp32 on the CPU (fp16 on CUDA), checked for NaN / Inf."""
    import torch
    from transformers import AutoModelForCausalLM

    o = run.options
    torch.manual_seed(o.seed)
    dtype = torch.float16 if o.device == "cuda" else torch.float32
    run.model = AutoModelForCausalLM.from_pretrained(o.model_dir, dtype=dtype, attn_implementation="sdpa")
    run.model.to(o.device).eval()
    check_finite(run.model.state_dict(), o.model_dir)


def quantization_plan(model, o: LlmOptions, family: Family) -> dict[str, str]:
    """Module name -> format for every linear that gets quantized: the decoder layers' linears, lm_head on request."""
    import torch

    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == family.lm_head or name.endswith(f".{family.lm_head}"):
            if o.lm_head_quantization:
                plan[name] = o.lm_head_quantization
        elif name.startswith(f"{family.layers}.") and o.quantization not in (UNQUANTIZED, AUTO):
            plan[name] = o.quantization
    return plan


def plan_formats(run: Run) -> None:
    """The format of every linear: the recipe's, or (`auto`) one per fusion group by measured sensitivity within the
    bits budget; `fits` keeps the linears whose format fits their shape (the writer keeps the others fp16)."""
    import torch

    from quantization import auto

    model, o = run.model, run.options
    run.plan = quantization_plan(model, o, run.family)
    if o.quantization == AUTO:
        layers = f"{run.family.layers}."
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(layers)
                   and not writer.unfit_reason(auto.CANDIDATES[0], tuple(m.weight.shape))]
        sizes = {n: model.get_submodule(n).weight.numel() for n in linears}
        scores = auto.sensitivities(model, run.search_batches[: -(-auto.SAMPLES // o.batch_size)], linears)
        chosen = auto.choose_formats(scores, sizes, o.effective_bits, run.family)
        run.plan.update({n: f for n, f in chosen.items() if f != UNQUANTIZED})
        run.methods["auto"] = {"effective_bits": round(auto.effective_bits(chosen, sizes), 4),
                               "budget": o.effective_bits,
                               "formats": {f: sum(v == f for v in chosen.values()) for f in auto.CANDIDATES}}
    run.fits = {n: f for n, f in run.plan.items()
                if not writer.unfit_reason(f, tuple(model.get_submodule(n).weight.shape))}


def smooth(run: Run) -> None:
    """Per-channel input scales searched and folded into the model (`--smoothing`)."""
    from quantization import smoothing

    method = run.options.smoothing_method
    results = smoothing.smooth(run.model, run.search_batches, run.fits, method, seed=run.options.seed)
    run.methods["smoothing"] = smoothing.summarize(method, results)


def calibrate(run: Run) -> None:
    """Static input amax, the FP8 KV cache's post-RoPE q/k/v amax, and the statistics the searches need (E[x^2] for
    the scale search, E[x x^T] for GPTQ), on the smoothed model."""
    from quantization.calibrate import Calibration
    from quantization.calibrate import calibrate as run_calibration

    o = run.options
    run.calibration = Calibration()
    if not needs_calibration(o):
        return
    squares = [n for n, f in run.fits.items() if WEIGHT_FORMATS[f].scale_search] if o.scale_search == "mse" else []
    hessians = [n for n, f in run.fits.items() if WEIGHT_FORMATS[f].gptq] if o.gptq else []
    static = [m for m, f in run.plan.items() if WEIGHT_FORMATS[f].static_input]
    run.calibration = run_calibration(run.model, run.batches, sorted({*static, *squares, *hessians}),
                                      kv=o.kv_dtype is KvDtype.FP8, square_names=squares, hessian_names=hessians)


def weight_scales(run: Run) -> None:
    """The model's fp32 weights, and the scales each format chooses (shared per fusion group, searched)."""
    from quantization import scale_search

    o, calib = run.options, run.calibration
    run.state_dict = {k: v.detach().float().cpu() for k, v in run.model.state_dict().items()}
    run.scales, run.methods["weight_scales"] = scale_search.weight_scales(
        run.state_dict, run.plan, calib.input_sq, o.scale_search == "mse", o.fuse_scales, run.family,
        gptq_blocks=o.gptq and bool(calib.hessian))


def gptq(run: Run) -> None:
    """GPTQ rounding (the linears whose format does not fit them have no scales, so GPTQ leaves them alone)."""
    from quantization import gptq as gptq_mod

    if run.options.gptq:
        run.methods["gptq"] = gptq_mod.apply(run.state_dict, run.plan, run.scales, run.calibration.hessian,
                                             run.options.scale_search == "mse")


def quantize(run: Run) -> None:
    """The checkpoint's tensors in each format's ModelOpt names, and the FP8 KV scales of the layers kept in FP8."""
    o, calib = run.options, run.calibration
    if run.config.get("tie_word_embeddings"):
        if any(m.endswith(run.family.lm_head) for m in run.plan):
            run.config["tie_word_embeddings"] = False  # a quantized lm_head can no longer share the fp16 table
        else:
            run.state_dict.pop(f"{run.family.lm_head}.weight", None)
    kv_scales = ({i: a for i, a in calib.qkv_amax.items() if i not in o.kv_cache_fp16_layers}
                 if o.kv_dtype is KvDtype.FP8 else {})
    run.quantized = writer.quantize_state_dict(run.state_dict, run.plan, calib.input_amax, kv_scales, run.family,
                                               weight_scales=run.scales)


def write(run: Run) -> None:
    """The report and the checkpoint directory, atomically."""
    import torch

    o = run.options
    linears = [n for n, m in run.model.named_modules() if isinstance(m, torch.nn.Linear)]
    report = build_report(run.calibration, o.quantization, o.kv_dtype, o.kv_cache_fp16_layers,
                          run.quantized.excluded, run.data["samples"])
    report = with_calibration(report, run.data)
    report["methods"] = run.methods
    if "auto" in run.methods:
        report["effective_bits"] = run.methods["auto"]["effective_bits"]
    run.report = report
    write_quantized(run.quantized, run.config, linears, report, o.kv_dtype, o.kv_cache_fp16_layers,
                    source_dir=o.model_dir, output_dir=o.output_dir, max_shard_bytes=o.max_shard_bytes)


STEPS = (load_calibration_data, load_model, plan_formats, smooth, calibrate, weight_scales, gptq, quantize, write)
TAIL = (weight_scales, gptq, quantize, write)  # from a calibrated model on (benchmarks/calibration.py)


def quantize_llm(o: LlmOptions) -> dict:
    """The `llm` subcommand; returns the calibration report."""
    run = check_inputs(o)
    for step in STEPS:
        step(run)
    return run.report


def with_calibration(report: dict, data: dict) -> dict:
    """The report with what the calibration data held (`calibration_data`) and its warnings first."""
    report["calibration"] = {k: v for k, v in data.items() if k != "warnings"}
    report["warnings"] = data["warnings"] + report["warnings"]
    return report


def write_quantized(qt, config: dict, linears: list[str], report: dict, kv_dtype: KvDtype, kv_fp16_layers: list[int],
                    *, source_dir: Path, output_dir: Path, max_shard_bytes: int, inputs: tuple[Path, ...] = ()) -> None:
    """The tail both subcommands share: hf_quant_config (and config.json's `quantization_config` for a format in a
    Hugging Face layout), then the checkpoint with its calibration report; `inputs` are the directories read besides
    `source_dir`."""
    quant_config = writer.hf_quant_config(qt, linears, kv_dtype, kv_fp16_layers)
    hf_config = writer.hf_config_quantization(qt, quant_config["quantization"]["exclude_modules"])
    if hf_config:
        config["quantization_config"] = hf_config
    writer.write_checkpoint(output_dir, qt.tensors, config, quant_config, source_dir,
                            extra_files={REPORT_FILE: json.dumps(report, indent=2)}, max_shard_bytes=max_shard_bytes,
                            inputs=inputs)


# --- the EAGLE3 draft -----------------------------------------------------------------------------------------------

def quantize_draft(o: DraftOptions) -> dict:
    """The `draft` subcommand: calibrate an EAGLE3 draft on its base's hidden states, quantize fc and midlayer.*."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantization import eagle3
    from quantization.calibrate import Calibration

    check_choice("--quantization", o.quantization, WRITABLE_FORMATS)  # no auto: a draft has one linear per kind
    if o.kv_dtype is not KvDtype.FP16:  # the reference hard-codes the draft's KV cache to fp16
        raise InputError(
            f"--kv_cache_quantization {o.kv_cache_quantization}: expected none for a draft (its KV cache is fp16)"
        )
    base_config = o.base_model_dir / "config.json"
    if not base_config.is_file():
        raise InputError(f"{base_config}: expected the HF config of --base_model_dir, found no such file")
    # the base and the shared flags go through the same checks as `llm --model_dir`
    shared = {k: v for k, v in vars(o).items() if k not in ("base_model_dir", "draft_model_dir", "kv_dtype")}
    base_run = check_inputs(LlmOptions(**{**shared, "model_dir": o.base_model_dir}))
    check_counts(o)
    check_inside(o.draft_model_dir)
    check_target(o.output_dir, kind=writer.OUTPUT_KIND, flag="--output_dir",
                 inputs=[o.base_model_dir, o.draft_model_dir])
    config = eagle3.read_draft_config(o.draft_model_dir)
    tensors = eagle3.read_draft_tensors(o.draft_model_dir)
    check_finite(tensors, o.draft_model_dir)
    static = any(f and WEIGHT_FORMATS[f].static_input for f in (o.quantization, o.lm_head_quantization))

    base_config = base_run.config
    layer_ids = eagle3.target_layer_ids(config, base_config.get("num_hidden_layers", 0))
    model = eagle3.build_draft(config, tensors, base_config.get("hidden_size"), len(layer_ids), o.draft_model_dir)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {n: o.quantization for n in linears if n != "lm_head" and o.quantization != UNQUANTIZED}
    if o.lm_head_quantization:
        plan["lm_head"] = o.lm_head_quantization
    batches, data = [], {"samples": 0, "warnings": []}
    if static:  # after every check of the draft, before the base model loads
        batches, data = calibration_data(o.base_model_dir, o)
    calib = Calibration()
    if static:
        torch.manual_seed(o.seed)
        dtype = torch.float16 if o.device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(o.base_model_dir, dtype=dtype, attn_implementation="sdpa")
        base = base.to(o.device).eval()
        calib = eagle3.calibrate_draft(base, model.to(o.device, dtype), batches, layer_ids,
                                       [m for m, f in plan.items() if WEIGHT_FORMATS[f].static_input])

    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    qt = writer.quantize_state_dict(state_dict, plan, calib.input_amax, {}, base_run.family)
    report = with_calibration(build_report(calib, o.quantization, KvDtype.FP16, [], qt.excluded, data["samples"]),
                              data)
    report["target_layer_ids"] = layer_ids
    write_quantized(qt, config, linears, report, KvDtype.FP16, [],
                    source_dir=o.draft_model_dir, output_dir=o.output_dir, max_shard_bytes=o.max_shard_bytes,
                    inputs=(o.base_model_dir,))
    return report
