"""The engine directory (contracts.md section 5): what `llm-build` writes and what the runtime checks before it runs.

It lives in the ground package because both sides hold it: the builder writes `builder_config` with
`make_builder_config`, the runtime reads it with `load_engine_config`. Everything checked here is a promise the
builder made, so a hand-edited or half-written directory fails with one clear line instead of deep inside ONNX
Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from contract import stage
from contract.errors import InputError
from contract.jsonfile import read_json
from contract.onnxfile import load_model
from contract.paths import checked_file
from contract.stage import (
    CONTRACT_VERSION,
    MIXED_WEIGHTS,
    WEIGHT_FORMAT_COUNTS,
    KvDtype,
)
from contract.tokenizer_files import copy_checked

ENGINE_FILES = {"onnxruntime": ("llm.onnx", "embedding.onnx"), "tensorrt": ("llm.engine", "embedding.engine")}
COPIED_FILES = ("embedding.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja")


def make_builder_config(*, backend: str, max_batch_size: int, max_input_len: int, max_kv_cache_capacity: int,
                        kv_cache_dtype: str, embedding_format: str, weight_format: str, kv_io: str,
                        weight_formats: dict[str, int] | None = None) -> dict:
    """The `builder_config` block of contracts.md 5.1; `kv_io` is how the LLM engine takes its cache
    (`stage.KV_IO_FORMS`; a TensorRT engine is always in place); `weight_formats` (linears per format) only with
    weight_format "mixed"."""
    extra = {WEIGHT_FORMAT_COUNTS: weight_formats} if weight_format == MIXED_WEIGHTS else {}
    return {**extra, "backend": backend, "max_batch_size": max_batch_size, "max_input_len": max_input_len,
            "max_kv_cache_capacity": max_kv_cache_capacity, "spec_base": False, "spec_draft": False,
            "max_lora_rank": 0, "kv_cache_dtype": kv_cache_dtype, "embedding_format": embedding_format,
            "weight_format": weight_format, "kv_io": kv_io, "contract_version": CONTRACT_VERSION}


def write_config_and_copies(onnx_dir: Path, out: Path, onnx_config: dict, builder_config: dict) -> None:
    """config.json = the ONNX dir's config + builder_config; sidecar, tokenizer and chat template copied as-is,
    each checked first (a regular file inside the ONNX dir; tokenizer files parsed: contract.tokenizer_files)."""
    (out / "config.json").write_text(json.dumps({**onnx_config, "builder_config": builder_config}, indent=2) + "\n")
    copy_checked(Path(onnx_dir), out, COPIED_FILES)


def load_engine_config(engine_dir: str | Path) -> dict:
    """ENG/config.json after checking that ENG is a complete engine directory this code can run, and that every
    field the engines also fix (layers, heads, head size, hidden, vocab, KV dtype) agrees with them: a hand-edited
    config would otherwise size the cache wrongly and fail deep inside ONNX Runtime."""
    eng = Path(engine_dir)
    path = checked_file(eng, "config.json", "the engine config", required=False)
    if path is None:
        raise InputError(f"{eng}: not an engine directory (no config.json); build one with llm-build")
    config = read_json(path, "the engine config")
    bc = config.get("builder_config")
    if not isinstance(bc, dict):
        raise InputError(f"{path}: not an engine directory (no builder_config; is this an ONNX dir? run llm-build)")
    for where, version in (("builder_config.contract_version", bc.get("contract_version")),
                           ("contract_version", config.get("contract_version"))):
        if version != CONTRACT_VERSION:
            raise InputError(f"{path} {where}: expected {CONTRACT_VERSION}, found {version!r}")
    backend = bc.get("backend")
    if backend not in ENGINE_FILES:
        raise InputError(f"{path} builder_config.backend: expected one of {sorted(ENGINE_FILES)}, found {backend!r}")
    for name in ENGINE_FILES[backend] + ("embedding.safetensors",):
        if checked_file(eng, name, "an engine file", required=False) is None:
            raise InputError(f"{eng}: not a complete engine directory ({name} is missing)")
    if bc.get("kv_cache_dtype") != config.get("kv_cache_dtype"):
        raise InputError(f"{path}: kv_cache_dtype disagrees: builder_config says {bc.get('kv_cache_dtype')!r}, "
                         f"config says {config.get('kv_cache_dtype')!r}")
    kv = KvDtype.parse(bc["kv_cache_dtype"], f"{path} builder_config.kv_cache_dtype")
    stage.check_runtime_config(config, str(path))
    for key, bound in stage.LIMIT_BOUNDS.items():
        if stage.positive_int(bc, key, f"{path} builder_config") > bound:
            raise InputError(f"{path} builder_config: {key}: expected at most {bound}, found {bc[key]}")
    if bc["max_input_len"] > bc["max_kv_cache_capacity"]:
        raise InputError(f"{path} builder_config: max_input_len ({bc['max_input_len']}) expected at most "
                         f"max_kv_cache_capacity, found {bc['max_kv_cache_capacity']}")
    if bc.get("kv_io") not in stage.KV_IO_FORMS:
        raise InputError(f"{path} builder_config.kv_io: expected one of {list(stage.KV_IO_FORMS)}, "
                         f"found {bc.get('kv_io')!r}; rebuild the engine with this llm-build")
    if backend == "onnxruntime":
        check_ort_engines(eng, config, kv)
    sidecar, shape = sidecar_dtype(eng / "embedding.safetensors"), sidecar_shape(eng / "embedding.safetensors")
    if stage.EMBEDDING_DTYPES.get(bc.get("embedding_format")) != sidecar:
        raise InputError(f"{eng / 'embedding.safetensors'}: tensor 'embedding' is {sidecar} but builder_config "
                         f"embedding_format is {bc.get('embedding_format')!r}")
    if shape != [config["vocab_size"], config["hidden_size"]]:
        raise InputError(f"{eng / 'embedding.safetensors'}: tensor 'embedding' expected shape "
                         f"{[config['vocab_size'], config['hidden_size']]} (config.json vocab_size, hidden_size), "
                         f"found {shape}")
    return config


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def check_ort_engines(eng: Path, config: dict, kv: KvDtype) -> None:
    """llm.onnx and embedding.onnx (graphs only, external data checked) against config.json: one `.key`/`.value`
    cache pair per layer in the KV dtype, `[batch, num_key_value_heads, capacity, head_dim]`, and the hidden,
    vocab and rotary dims."""
    llm = load_model(eng / "llm.onnx", "the LLM engine").graph
    embedding = load_model(eng / "embedding.onnx", "the embedding engine").graph
    inputs, outputs = {i.name: i for i in llm.input}, {o.name: o for o in llm.output}
    layers, where = config["num_hidden_layers"], f"{eng / 'config.json'}"
    for prefix, io in ((stage.PAST_PREFIX, inputs), (stage.PRESENT_PREFIX, outputs)):
        found = {n for n in io if n.startswith(prefix)}
        expected = {f"{prefix}{i}.{half}" for i in range(layers) for half in stage.ORT_KV_HALVES} \
            if len(found) == 2 * layers else set()  # (a tampered count may be huge: compare counts first)
        if found != expected:
            raise InputError(f"{where}: num_hidden_layers {layers} disagrees with {eng / 'llm.onnx'}, which has "
                             f"{len(found) // 2} layers of {prefix}* bindings; rebuild the engine")
        for name in sorted(expected):
            value, dims = io[name], _dims(io[name])
            actual = KvDtype.from_onnx(value.type.tensor_type.elem_type, ort_engine=True)
            if actual is not kv:
                said = actual.value if actual else f"elem_type {value.type.tensor_type.elem_type}"
                raise InputError(f"{eng / 'llm.onnx'} {name}: past_key_values dtype is {said!r} but config.json says "
                                 f"kv_cache_dtype {kv.value!r}; rebuild the engine from a matching export")
            want = {1: ("num_key_value_heads", config["num_key_value_heads"]), 3: ("head_dim", stage.head_dim(config))}
            for axis, (key, size) in want.items():
                if len(dims) != 4 or dims[axis] != size:
                    raise InputError(f"{where}: {key} {size} disagrees with {eng / 'llm.onnx'} {name} shape {dims}; "
                                     "rebuild the engine")
    for graph, io, name, key, size in (
            (llm, inputs, stage.INPUTS_EMBEDS, "hidden_size", config["hidden_size"]),
            (llm, inputs, stage.ROPE_COS_SIN, "head_dim x partial_rotary_factor", stage.rotary_dim(config)),
            (llm, outputs, stage.LOGITS, "vocab_size", config["vocab_size"]),
            (embedding, {o.name: o for o in embedding.output}, stage.INPUTS_EMBEDS, "hidden_size",
             config["hidden_size"])):
        dims = _dims(io[name]) if name in io else []
        if len(dims) != 3 or dims[2] != size:
            file = "llm.onnx" if graph is llm else "embedding.onnx"
            raise InputError(f"{where}: {key} {size} disagrees with {eng / file} {name} shape {dims}; rebuild the "
                             "engine")


def _embedding_slice(path: Path, read):
    try:
        with safe_open(str(path), framework="numpy") as f:
            if "embedding" not in f.keys():
                raise InputError(f"{path}: expected a tensor 'embedding', found {sorted(f.keys())}")
            return read(f.get_slice("embedding"))
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise InputError(f"{path}: expected a safetensors file, found an unreadable one ({e})") from e


def sidecar_dtype(path: Path) -> str:
    """The safetensors dtype string ('F16', 'F8_E4M3', ...) of the `embedding` tensor, read from the header."""
    return _embedding_slice(path, lambda s: s.get_dtype())


def sidecar_shape(path: Path) -> list[int]:
    """The shape of the `embedding` tensor, read from the header."""
    return _embedding_slice(path, lambda s: list(s.get_shape()))
