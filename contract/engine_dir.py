"""The engine directory (contracts.md section 5): what `llm-build` writes and what the runtime checks before it runs.

It lives in the ground package because both sides hold it: the builder writes `builder_config` with
`make_builder_config`, the runtime reads it with `load_engine_config`. Everything checked here is a promise the
builder made, so a hand-edited or half-written directory fails with one clear line instead of deep inside ONNX
Runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from safetensors import safe_open

from contract import stage
from contract.errors import InputError
from contract.jsonfile import read_json
from contract.stage import (
    CONTRACT_VERSION,
    MIXED_WEIGHTS,
    WEIGHT_FORMAT_COUNTS,
    KvDtype,
)

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
    """config.json = the ONNX dir's config + builder_config; sidecar, tokenizer and chat template copied as-is."""
    (out / "config.json").write_text(json.dumps({**onnx_config, "builder_config": builder_config}, indent=2) + "\n")
    for name in COPIED_FILES:
        if (Path(onnx_dir) / name).exists():
            shutil.copy2(Path(onnx_dir) / name, out / name)


def load_engine_config(engine_dir: str | Path) -> dict:
    """ENG/config.json after checking that ENG is a complete engine directory this code can run."""
    eng = Path(engine_dir)
    path = eng / "config.json"
    if not path.is_file():
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
        if not (eng / name).is_file():
            raise InputError(f"{eng}: not a complete engine directory ({name} is missing)")
    if bc.get("kv_cache_dtype") != config.get("kv_cache_dtype"):
        raise InputError(f"{path}: kv_cache_dtype disagrees: builder_config says {bc.get('kv_cache_dtype')!r}, "
                         f"config says {config.get('kv_cache_dtype')!r}")
    kv = KvDtype.parse(bc["kv_cache_dtype"], f"{path} builder_config.kv_cache_dtype")
    if bc.get("kv_io") not in stage.KV_IO_FORMS:
        raise InputError(f"{path} builder_config.kv_io: expected one of {list(stage.KV_IO_FORMS)}, "
                         f"found {bc.get('kv_io')!r}; rebuild the engine with this llm-build")
    if backend == "onnxruntime":
        binding = llm_onnx_kv_dtype(eng / "llm.onnx")
        if binding != kv:
            raise InputError(f"{eng / 'llm.onnx'}: past_key_values dtype is {binding.value!r} but config.json says "
                             f"kv_cache_dtype {kv.value!r}; rebuild the engine from a matching export")
    sidecar = sidecar_dtype(eng / "embedding.safetensors")
    if stage.EMBEDDING_DTYPES.get(bc.get("embedding_format")) != sidecar:
        raise InputError(f"{eng / 'embedding.safetensors'}: tensor 'embedding' is {sidecar} but builder_config "
                         f"embedding_format is {bc.get('embedding_format')!r}")
    return config


def llm_onnx_kv_dtype(path: Path) -> KvDtype:
    """The KV dtype of the lowered graph's `past_key_values_*` inputs (weights are not loaded); the CPU engine holds
    an fp16 cache in fp32 (`KvDtype.ort_onnx`)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    types = {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith(stage.PAST_PREFIX)}
    kinds = {KvDtype.from_onnx(t, ort_engine=True) for t in types}
    if len(kinds) != 1 or None in kinds:
        found = sorted(onnx.helper.tensor_dtype_to_np_dtype(t).name if t else "?" for t in types)
        raise InputError(f"{path}: expected past_key_values_* inputs all float32 (an fp16 cache) or all float8e4m3fn, "
                         f"found {found}")
    return kinds.pop()


def sidecar_dtype(path: Path) -> str:
    """The safetensors dtype string ('F16', 'F8_E4M3', ...) of the `embedding` tensor, read from the header."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            if "embedding" not in f.keys():
                raise InputError(f"{path}: expected a tensor 'embedding', found {sorted(f.keys())}")
            return f.get_slice("embedding").get_dtype()
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise InputError(f"{path}: expected a safetensors file, found an unreadable one ({e})") from e
