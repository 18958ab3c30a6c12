"""The version-1 stage contract: every fact that one stage writes and a later one reads, stated once.

docs/contracts.md is the prose; this module is what the code imports. It imports no stage and neither torch nor
onnx at module level, so a CLI's `--help` stays fast: the forms of a dtype that need those libraries are built
when asked for.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from contract.errors import InputError

CONTRACT_VERSION = 1  # config.json `contract_version` of an ONNX dir and of an engine dir (and its builder_config)
EDGELLM_VERSION = "0.10.0"  # the TensorRT-Edge-LLM contract this one mirrors (config.json `edgellm_version`)
PRODUCER = "edgellm-toolchain"  # the distribution name: config.json, hf_quant_config.json and sidecar metadata

ONNX_OPSET = 23  # default-domain opset of model.onnx and of every engine graph
IR_VERSION = 11  # the IR that introduced opset 23
CUSTOM_DOMAIN = "trt_edgellm"  # domain of the custom ops (AttentionPlugin, Fp8Gather), version 1

# --- graph I/O names (contracts.md section 2) ---------------------------------------------------------------------
INPUTS_EMBEDS = "inputs_embeds"
CONTEXT_LENGTHS = "context_lengths"
ROPE_COS_SIN = "rope_rotary_cos_sin"
KVCACHE_START_INDEX = "kvcache_start_index"
LAST_TOKEN_IDS = "last_token_ids"
LOGITS = "logits"
INPUT_IDS = "input_ids"  # the embedding engine's input; its output is INPUTS_EMBEDS
PAST_PREFIX, PRESENT_PREFIX = "past_key_values_", "present_key_values_"


# EAGLE3 (contracts.md sections 2.2 and 2.3): the base's tree inputs and hidden-state output, the draft's inputs
ATTENTION_MASK = "attention_mask"  # int32 [batch, seq_len, ceil(seq_len / 32)]: the bit-packed tree mask
ATTENTION_POS_ID = "attention_pos_id"  # int32 [batch, seq_len]: each new token's RoPE position
HIDDEN_STATES = "hidden_states"  # base: fp16 [batch, seq_len, k * hidden]; draft: fp16 [batch, seq_len, hidden]
HIDDEN_STATES_INPUT = "hidden_states_input"  # draft input: the base's hidden_states
HIDDEN_STATES_FROM_DRAFT = "hidden_states_from_draft"  # draft input: the draft's own previous hidden_states
TREE_MASK_BITS = 32  # tree-mask flags per int32 word: bit j % 32 of word j // 32 of row i = node i sees node j


def tree_mask_words(tree_size: int) -> int:
    """int32 words per row of the packed tree mask of `tree_size` tokens."""
    return -(-tree_size // TREE_MASK_BITS)


def past_key_values(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}"


def present_key_values(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}"


def producer() -> dict:
    """`{"name", "version"}` of this installation ("0+unknown" in a source tree that was never installed)."""
    try:
        return {"name": PRODUCER, "version": version(PRODUCER)}
    except PackageNotFoundError:
        return {"name": PRODUCER, "version": "0+unknown"}


def head_dim(config: dict) -> int:
    """`head_dim`, or `hidden_size // num_attention_heads` for configs that leave it out (as HF does)."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rotary_dim(config: dict) -> int:
    """Channels of each head that RoPE rotates: `head_dim * partial_rotary_factor`."""
    return int(head_dim(config) * (config.get("partial_rotary_factor") or 1.0))


# --- the runtime config.json of an ONNX dir and an engine dir (contracts.md 1.1) ------------------------------------

# Upper bounds of the build limits (llm-build flags, builder_config): far past any real engine, low enough that a
# typo or a hand-edited config cannot make the runtime size a RoPE table or a cache of terabytes.
MAX_BATCH_SIZE = 4096
MAX_KV_CACHE_CAPACITY = 1 << 24
LIMIT_BOUNDS = {"max_batch_size": MAX_BATCH_SIZE, "max_input_len": MAX_KV_CACHE_CAPACITY,
                "max_kv_cache_capacity": MAX_KV_CACHE_CAPACITY}

MODEL_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


def is_int(value) -> bool:
    """A JSON integer: Python's bool is an int, but `true` is no count, index or token id."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(config: dict, key: str, where: str, *, required: bool = True) -> int | None:
    """`config[key]` as a positive int (a bool, a float such as 64.0 or a string is refused)."""
    value = config.get(key)
    if value is None and not required:
        return None
    if not is_int(value) or value <= 0:
        raise InputError(f"{where}: {key}: expected a positive integer, found {value!r:.60}")
    return value


def positive_number(config: dict, key: str, where: str, *, default: float | None = None) -> float:
    """`config[key]` as a finite positive number."""
    value = config.get(key, default)
    try:  # a JSON integer of hundreds of digits is a valid int that no float holds
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"{where}: {key}: expected a finite positive number, found {value!r:.60}")
    return number


def check_rope(config: dict, where: str) -> None:
    """`rope_theta` and `rope_scaling` of a config: a base above 1 (a base at or below 1 gives no rotation, and one
    near 0 a table of NaN), and a scaling that is null or an object with a rope_type name whose `factor`, if any, is
    at least 1 (transformers' own rule: a smaller one only warns there, and gives NaN or a wrong table)."""
    if positive_number(config, "rope_theta", where) <= 1:
        raise InputError(f"{where}: rope_theta: expected a RoPE base greater than 1, found {config['rope_theta']!r:.60}")
    scaling = config.get("rope_scaling")
    if scaling is not None and not (isinstance(scaling, dict) and isinstance(scaling.get("rope_type", ""), str)):
        raise InputError(f"{where}: rope_scaling: expected null or an object with a rope_type, found {scaling!r:.60}")
    if scaling and "factor" in scaling and positive_number(scaling, "factor", f"{where}: rope_scaling") < 1:
        raise InputError(f"{where}: rope_scaling: factor: expected a number of at least 1, found {scaling['factor']!r}")


def check_runtime_config(config: dict, where: str) -> None:
    """The model fields of a runtime config.json (section 1.1) by type and range, before anything sizes a graph,
    a cache or a table from them: a positive int is an int, eos ids are token ids, and the head counts divide."""
    for key in MODEL_INTS:
        positive_int(config, key, where)
    positive_int(config, "head_dim", where, required=False)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads ({heads}) expected a multiple of num_key_value_heads, found "
                         f"{kv_heads}")
    check_rope(config, where)
    positive_number(config, "rms_norm_eps", where)
    factor = positive_number(config, "partial_rotary_factor", where, default=1.0)
    if factor > 1 or rotary_dim(config) % 2 or rotary_dim(config) == 0:
        raise InputError(f"{where}: partial_rotary_factor: expected a factor in (0, 1] giving an even rotary dim, "
                         f"found {factor} (rotary dim {rotary_dim(config)})")
    KvDtype.parse(config.get("kv_cache_dtype"), where)
    eos = config.get("eos_token_id", [])
    vocab = config["vocab_size"]
    if not isinstance(eos, list) or not all(is_int(e) and 0 <= e < vocab
                                            for e in eos):
        raise InputError(f"{where}: eos_token_id: expected a list of token ids in [0, {vocab}), found {eos!r:.60}")
    check_weight_formats(config, where)
    check_spec_config(config, where)


# --- the KV cache dtype and its forms -----------------------------------------------------------------------------

class KvDtype(str, enum.Enum):
    """config.json `kv_cache_dtype`. One value per engine; each library names it differently."""

    FP16 = "fp16"
    FP8 = "fp8"

    @property
    def onnx(self) -> int:
        """elem_type of `past_key_values_*` in model.onnx (and of a TensorRT engine's binding)."""
        from onnx import TensorProto

        return TensorProto.FLOAT16 if self is KvDtype.FP16 else TensorProto.FLOAT8E4M3FN

    @property
    def ort_onnx(self) -> int:
        """elem_type of the cache in the ONNX Runtime engine: it computes in fp32, so an fp16 cache is held in fp32."""
        from onnx import TensorProto

        return TensorProto.FLOAT if self is KvDtype.FP16 else TensorProto.FLOAT8E4M3FN

    @property
    def numpy(self):
        """numpy dtype of the ONNX Runtime engine's cache buffers (FP8 as its bytes)."""
        import numpy as np

        return np.dtype(np.float32) if self is KvDtype.FP16 else np.dtype(np.uint8)

    @property
    def torch(self):
        """torch dtype of the GPU cache."""
        import torch

        return torch.float16 if self is KvDtype.FP16 else torch.float8_e4m3fn

    @property
    def tensorrt(self) -> str:
        """`tensorrt.DataType` name of the engine's cache binding."""
        return "HALF" if self is KvDtype.FP16 else "FP8"

    @classmethod
    def parse(cls, value, where: str) -> "KvDtype":
        try:
            return cls(value)
        except ValueError:
            raise InputError(f"{where}: expected kv_cache_dtype one of {[k.value for k in cls]}, "
                             f"found {value!r}") from None

    @classmethod
    def from_onnx(cls, elem_type: int, ort_engine: bool = False) -> "KvDtype | None":
        """The KvDtype a graph binding's elem_type stands for (model.onnx, or a lowered ORT engine), else None."""
        for kv in cls:
            if (kv.ort_onnx if ort_engine else kv.onnx) == elem_type:
                return kv
        return None

    @classmethod
    def from_tensorrt(cls, name: str) -> "KvDtype | None":
        return next((kv for kv in cls if kv.tensorrt == name), None)


# How an ONNX Runtime engine takes its KV cache (builder_config `kv_io`, contracts.md 3.1 and 5.1): "in_place" binds
# the whole cache as past and present; "prefix" passes the filled prefix in and returns only this call's K/V.
KV_IN_PLACE, KV_PREFIX = "in_place", "prefix"
KV_IO_FORMS = (KV_IN_PLACE, KV_PREFIX)
# The ORT engine splits each layer's cache binding into halves named `{past_key_values_i}.key` / `.value` (and the
# same for present), `[B,Hkv,T,D]` each, K first (contracts.md 3.1).
ORT_KV_HALVES = ("key", "value")

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


# --- the embedding sidecar formats (contracts.md section 4) --------------------------------------------------------

EMBEDDING_FP16 = "fp16"
EMBEDDING_FP8 = "fp8_e4m3_row_block"
EMBEDDING_BLOCK = 128
# sidecar metadata `format` -> safetensors dtype of tensor `embedding`
EMBEDDING_DTYPES = {EMBEDDING_FP16: "F16", EMBEDDING_FP8: "F8_E4M3"}


# --- weight formats (contracts.md 2.1, docs/quantization.md) -------------------------------------------------------

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


# --- speculative decoding (contracts.md sections 1.1 and 5) --------------------------------------------------------

SPEC_NONE, SPEC_EAGLE3 = "none", "eagle3"  # config.json `spec_decode_type`
ROLE_LLM, ROLE_BASE, ROLE_DRAFT = "llm", "base", "draft"  # config.json `engine_role`
ENGINE_ROLES = (ROLE_LLM, ROLE_BASE, ROLE_DRAFT)
D2T_FILE, D2T_TENSOR = "d2t.safetensors", "d2t"  # the draft's draft-vocab -> base-vocab map (int32 [draft_vocab])
DEFAULT_TREE_SIZE = 60  # --maxVerifyTreeSize / --maxDraftTreeSize: tree tokens per call in the generation profile


def _layer_ids(value, num_layers: int | None) -> bool:
    """A list of hidden-state indices of a model of `num_layers` layers (HF `output_hidden_states`: 0..N); None:
    of a model whose depth is not known here (a draft names its base's layers)."""
    return isinstance(value, list) and all(is_int(i) and 0 <= i
                                           and (num_layers is None or i <= num_layers) for i in value)


def check_spec_config(config: dict, where: str) -> None:
    """The EAGLE3 fields of a runtime config.json (section 1.1) by type, for its `engine_role`: a base names the
    layers its hidden_states output concatenates, a draft its vocabulary, the width of the base hidden states it
    reads and (optionally) their layers."""
    role = config.get("engine_role", ROLE_LLM)
    if role not in ENGINE_ROLES:
        raise InputError(f"{where}: engine_role: expected one of {list(ENGINE_ROLES)}, found {role!r:.60}")
    layers = config["num_hidden_layers"]
    if role == ROLE_BASE and not _layer_ids(config.get("eagle_hidden_state_layers"), layers):
        raise InputError(f"{where}: eagle_hidden_state_layers: expected a list of layer indices in [0, {layers}], "
                         f"found {config.get('eagle_hidden_state_layers')!r:.60}")
    if role == ROLE_DRAFT:
        positive_int(config, "draft_vocab_size", where)
        positive_int(config, "base_model_hidden_size", where)
        eagle3 = config.get("eagle3_config", {})
        ids = eagle3.get("target_layer_ids") if isinstance(eagle3, dict) else None
        if not isinstance(eagle3, dict) or not (ids is None or _layer_ids(ids, None)):
            raise InputError(f"{where}: eagle3_config: expected an object whose target_layer_ids (if any) is a list "
                             f"of layer indices, found {eagle3!r:.60}")


def is_eagle3_config(config: dict) -> bool:
    """An EAGLE3 draft checkpoint, by the reference's rule: an "Eagle3" architecture, `ttt_length` or
    `draft_vocab_size` in its config.json."""
    archs = config.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]  # a hand-edited config may hold one name, or anything
    return any("Eagle3" in str(a) for a in archs) or "ttt_length" in config or "draft_vocab_size" in config


def default_eagle_layers(num_layers: int) -> list[int]:
    """The base hidden states an EAGLE3 draft reads when it names none (reference 0.10): inputs of decoder layers
    2, N // 2 and N - 4, i.e. HF `output_hidden_states[i]`."""
    return [2, num_layers // 2, num_layers - 4]


def draft_target_layers(config: dict) -> list[int] | None:
    """The target layers a draft's config.json names (`eagle_config.eagle_aux_hidden_state_layer_ids` or
    `target_layer_ids`), None when it names none (then it reads its base's defaults). Whatever it names comes back
    as a list, unchecked: the caller checks the ids against the model it knows."""
    eagle = config.get("eagle_config")
    ids = (eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None) \
        or config.get("target_layer_ids")
    if not ids:
        return None
    return list(ids) if isinstance(ids, list) else [ids]
