"""The engine directory (contracts.md section 5): what `llm-build` writes and what the runtime checks before it runs.

It lives in the ground package because both sides hold it: the builder writes `builder_config` with
`make_builder_config`, the runtime reads it with `load_engine_config`. Everything checked here is a promise the
builder made, so a hand-edited or half-written directory fails with one clear line instead of deep inside ONNX
Runtime.

An EAGLE3 engine dir holds a base and a draft side by side, each built by its own `llm-build` call (reference 3.1):
its files are named per role (`engine_files`, `role_files`), and `check_spec_pair` says whether the two belong
together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from contract import weight_formats
from contract.backends import ENGINE_SUFFIX
from contract.eagle3 import (
    D2T_FILE,
    ROLE_BASE,
    ROLE_DRAFT,
    ROLE_LLM,
    default_eagle_layers,
)
from contract.embedding import EMBEDDING_DTYPES
from contract.errors import InputError
from contract.fields import positive_int
from contract.jsonfile import read_json
from contract.kv import KV_IO_FORMS, KvDtype
from contract.paths import checked_file
from contract.runtime_config import LIMIT_BOUNDS, check_runtime_config
from contract.tokenizer_files import copy_checked
from contract.versions import CONTRACT_VERSION
from contract.weight_formats import (
    WEIGHT_STORAGE_FORMS,
    weight_format_fields,
)

ENGINE_STEMS = {ROLE_LLM: "llm", ROLE_BASE: "spec_base", ROLE_DRAFT: "spec_draft"}  # reference 3.1 engine names
CONFIG_FILES = {ROLE_LLM: "config.json", ROLE_BASE: "base_config.json", ROLE_DRAFT: "draft_config.json"}
EMBEDDING_STEM = "embedding"
COPIED_FILES = ("embedding.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja")
DRAFT_COPIED_FILES = (D2T_FILE,)  # a draft has no table or tokenizer of its own: it uses its base's


def engine_files(role: str, backend: str) -> tuple[str, ...]:
    """The engines a role's build writes: its LLM engine, and the embedding engine unless it is a draft."""
    suffix = ENGINE_SUFFIX[backend]
    stems = (ENGINE_STEMS[role],) + (() if role == ROLE_DRAFT else (EMBEDDING_STEM,))
    return tuple(stem + suffix for stem in stems)


def copied_files(role: str) -> tuple[str, ...]:
    return DRAFT_COPIED_FILES if role == ROLE_DRAFT else COPIED_FILES


def role_files(role: str) -> set[str]:
    """Every file name a build of `role` may write, on either backend (engines with their `.data` files, the
    config, the copies): what a build of the other spec role keeps, and what this one replaces."""
    names = {CONFIG_FILES[role], *copied_files(role)}
    for backend in ENGINE_SUFFIX:
        for name in engine_files(role, backend):
            names |= {name, name + ".data"}
    return names


def make_builder_config(*, backend: str, max_batch_size: int, max_input_len: int, max_kv_cache_capacity: int,
                        kv_cache_dtype: str, embedding_format: str | None, weight_format: str, kv_io: str,
                        weight_storage: str, role: str = ROLE_LLM, tree_size: int | None = None,
                        weight_formats: dict[str, int] | None = None) -> dict:
    """The `builder_config` block of contracts.md 5.1; `kv_io` is how the LLM engine takes its cache
    (`KV_IO_FORMS`; a TensorRT engine is always in place), `weight_storage` what it holds its weights in at
    rest (`WEIGHT_STORAGE_FORMS`). A spec base records `max_verify_tree_size`, a draft `max_draft_tree_size`
    (`tree_size`, the generation profile's tokens per call); `weight_formats` (linears per format) as
    `weight_format_fields` writes it."""
    config = {"backend": backend, "max_batch_size": max_batch_size, "max_input_len": max_input_len,
              "max_kv_cache_capacity": max_kv_cache_capacity, "spec_base": role == ROLE_BASE,
              "spec_draft": role == ROLE_DRAFT, "max_lora_rank": 0, "kv_cache_dtype": kv_cache_dtype,
              "embedding_format": embedding_format, "weight_format": weight_format, "kv_io": kv_io,
              "weight_storage": weight_storage, "contract_version": CONTRACT_VERSION}
    config.update(weight_format_fields(weight_format, weight_formats))
    if role == ROLE_BASE:
        config["max_verify_tree_size"] = tree_size
    elif role == ROLE_DRAFT:
        config["max_draft_tree_size"] = tree_size
    return config


def weight_storage(builder_config: dict) -> str:
    """builder_config.weight_storage; an engine built before the field existed holds a quantized model's weights
    as exported (the only form then)."""
    if "weight_storage" in builder_config:
        return builder_config["weight_storage"]
    return weight_formats.weight_storage(builder_config.get("weight_format", "fp16"))


def write_config_and_copies(onnx_dir: Path, out: Path, onnx_config: dict, builder_config: dict,
                            role: str = ROLE_LLM) -> None:
    """The role's config file (`config.json`, `base_config.json` or `draft_config.json`) = the ONNX dir's config +
    builder_config; sidecars, tokenizer and chat template copied as-is, each checked first (a regular file inside
    the ONNX dir; tokenizer files parsed: contract.tokenizer_files)."""
    text = json.dumps({**onnx_config, "builder_config": builder_config}, indent=2) + "\n"
    (out / CONFIG_FILES[role]).write_text(text)
    copy_checked(Path(onnx_dir), out, copied_files(role))


def spec_roles(engine_dir: str | Path) -> set[str]:
    """The speculative-decoding roles whose config file ENG holds (empty for a vanilla or missing dir)."""
    return {role for role in (ROLE_BASE, ROLE_DRAFT)
            if checked_file(Path(engine_dir), CONFIG_FILES[role], "an engine config", required=False) is not None}


def load_engine_config(engine_dir: str | Path, role: str = ROLE_LLM,
                       check_engines: Callable[[Path, dict], None] | None = None) -> dict:
    """The role's config (`config.json` of a vanilla engine, `base_config.json` / `draft_config.json` of an EAGLE3
    engine dir) after checking that ENG holds a complete engine of that role this code can run: its fields, its
    files, and the embedding table against them. `check_engines(ENG, config)` is the backend's check that its engine
    files agree with the config (layers, heads, head size, hidden, vocab, KV dtype; a hand-edited config would
    otherwise size the cache wrongly): the contract names those files but does not read inside them, so the runtime
    and the builder each pass their backend's (`runtime.engine.check_engine_files`,
    `builder.backends.check_engine_files`). It runs once the config's own fields are checked and before the table,
    so a config that disagrees with both is named against its engine."""
    eng = Path(engine_dir)
    path = checked_file(eng, CONFIG_FILES[role], "the engine config", required=False)
    if path is None:
        if role == ROLE_LLM and spec_roles(eng):
            raise InputError(f"{eng}: expected a vanilla engine (config.json), found a speculative-decoding engine "
                             f"dir ({', '.join(sorted(CONFIG_FILES[r] for r in spec_roles(eng)))}); run it with "
                             "--specDecode")
        what = {ROLE_LLM: "not an engine directory", ROLE_BASE: "no EAGLE3 base engine",
                ROLE_DRAFT: "no EAGLE3 draft engine"}[role]
        flag = {ROLE_LLM: "", ROLE_BASE: " --specBase", ROLE_DRAFT: " --specDraft"}[role]
        raise InputError(f"{eng}: {what} (no {CONFIG_FILES[role]}); build one with llm-build{flag}")
    config = read_json(path, "the engine config")
    if config.get("engine_role", ROLE_LLM) != role:
        raise InputError(f"{path} engine_role: expected {role!r}, found {config.get('engine_role')!r}")
    bc = config.get("builder_config")
    if not isinstance(bc, dict):
        raise InputError(f"{path}: not an engine directory (no builder_config; is this an ONNX dir? run llm-build)")
    for where, version in (("builder_config.contract_version", bc.get("contract_version")),
                           ("contract_version", config.get("contract_version"))):
        if version != CONTRACT_VERSION:
            raise InputError(f"{path} {where}: expected {CONTRACT_VERSION}, found {version!r}")
    backend = bc.get("backend")
    if backend not in ENGINE_SUFFIX:
        raise InputError(f"{path} builder_config.backend: expected one of {sorted(ENGINE_SUFFIX)}, found {backend!r}")
    required = engine_files(role, backend) + (DRAFT_COPIED_FILES if role == ROLE_DRAFT else ("embedding.safetensors",))
    for name in required:
        if checked_file(eng, name, "an engine file", required=False) is None:
            raise InputError(f"{eng}: not a complete engine directory ({name} is missing)")
    if bc.get("kv_cache_dtype") != config.get("kv_cache_dtype"):
        raise InputError(f"{path}: kv_cache_dtype disagrees: builder_config says {bc.get('kv_cache_dtype')!r}, "
                         f"config says {config.get('kv_cache_dtype')!r}")
    KvDtype.parse(bc["kv_cache_dtype"], f"{path} builder_config.kv_cache_dtype")
    check_runtime_config(config, str(path))
    for key, bound in LIMIT_BOUNDS.items():
        if positive_int(bc, key, f"{path} builder_config") > bound:
            raise InputError(f"{path} builder_config: {key}: expected at most {bound}, found {bc[key]}")
    if bc["max_input_len"] > bc["max_kv_cache_capacity"]:
        raise InputError(f"{path} builder_config: max_input_len ({bc['max_input_len']}) expected at most "
                         f"max_kv_cache_capacity, found {bc['max_kv_cache_capacity']}")
    if bc.get("kv_io") not in KV_IO_FORMS:
        raise InputError(f"{path} builder_config.kv_io: expected one of {list(KV_IO_FORMS)}, "
                         f"found {bc.get('kv_io')!r}; rebuild the engine with this llm-build")
    if weight_storage(bc) not in WEIGHT_STORAGE_FORMS:
        raise InputError(f"{path} builder_config.weight_storage: expected one of {list(WEIGHT_STORAGE_FORMS)}, "
                         f"found {bc.get('weight_storage')!r}")
    if check_engines is not None:
        check_engines(eng, config)
    if role == ROLE_DRAFT:  # no table of its own
        return config
    sidecar, shape = sidecar_dtype(eng / "embedding.safetensors"), sidecar_shape(eng / "embedding.safetensors")
    if EMBEDDING_DTYPES.get(bc.get("embedding_format")) != sidecar:
        raise InputError(f"{eng / 'embedding.safetensors'}: tensor 'embedding' is {sidecar} but builder_config "
                         f"embedding_format is {bc.get('embedding_format')!r}")
    if shape != [config["vocab_size"], config["hidden_size"]]:
        raise InputError(f"{eng / 'embedding.safetensors'}: tensor 'embedding' expected shape "
                         f"{[config['vocab_size'], config['hidden_size']]} (config.json vocab_size, hidden_size), "
                         f"found {shape}")
    return config


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
def check_spec_pair(base: dict, draft: dict, where: str) -> None:
    """InputError unless the EAGLE3 draft config `draft` was made for the base config `base` (hidden size,
    vocabulary, the base hidden states its fc reads); `where` names the two in the message."""
    for key in ("hidden_size", "vocab_size"):
        if draft.get(key) != base.get(key):
            raise InputError(f"{where}: draft {key} {draft.get(key)!r} does not match the base's {base.get(key)!r}; "
                             "the draft was trained for another base model")
    layers = base["eagle_hidden_state_layers"]  # both configs passed check_spec_config
    want = base["hidden_size"] * len(layers)
    if draft.get("base_model_hidden_size") != want:
        raise InputError(f"{where}: draft base_model_hidden_size {draft.get('base_model_hidden_size')!r} does not match "
                         f"the base's hidden_states width {want} ({len(layers)} layers x {base['hidden_size']})")
    ids = draft.get("eagle3_config", {}).get("target_layer_ids")
    if ids is None:  # the draft names none: it reads its base's default layers
        ids = default_eagle_layers(int(base["num_hidden_layers"]))
    if list(ids) != list(layers):
        raise InputError(f"{where}: draft target layers {list(ids)} do not match the base's eagle_hidden_state_layers "
                         f"{list(layers)}; export the base with --eagle-draft-dir pointing at this draft")
    backends = (base.get("builder_config", {}).get("backend"), draft.get("builder_config", {}).get("backend"))
    if None not in backends and backends[0] != backends[1]:
        raise InputError(f"{where}: the base was built for {backends[0]}, the draft for {backends[1]}; "
                         "build both with the same --backend")
