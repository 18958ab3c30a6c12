"""An ONNX Runtime engine dir's graphs checked against its config, before anything runs them.

An ORT engine is a graph lowered by `plugins.lowering` (the "ORT engine" KV contract of contracts.md 3.1: one
`.key` / `.value` binding per layer, in the cache's storage dtype); a hand-edited config.json would otherwise size
the cache wrongly and fail deep inside ONNX Runtime. It lives in `plugins`, beside the lowering that gives the graph
this form, because both the builder (the EAGLE3 role it keeps in an engine dir) and the runtime (every engine it
opens) check it, and neither may import the other.
"""

from __future__ import annotations

from pathlib import Path

from contract.backends import ONNXRUNTIME
from contract.eagle3 import ROLE_DRAFT, ROLE_LLM
from contract.engine_dir import CONFIG_FILES, engine_files
from contract.errors import InputError
from contract.graph_io import (
    INPUTS_EMBEDS,
    LOGITS,
    PAST_PREFIX,
    PRESENT_PREFIX,
    ROPE_COS_SIN,
)
from contract.kv import ORT_KV_HALVES, KvDtype
from contract.onnxfile import load_model
from contract.runtime_config import head_dim, rotary_dim


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def check_engines(engine_dir: Path, config: dict) -> None:
    """The LLM engine of the config's role (llm.onnx, spec_base.onnx or spec_draft.onnx) and embedding.onnx (graphs
    only, external data checked) against the config (`contract.engine_dir.load_engine_config` checked it): one
    `.key`/`.value` cache pair per layer in the KV dtype, `[batch, num_key_value_heads, capacity, head_dim]`, and the
    hidden, vocab (a draft's: draft_vocab_size) and rotary dims."""
    eng, role = Path(engine_dir), config.get("engine_role", ROLE_LLM)
    kv = KvDtype(config["builder_config"]["kv_cache_dtype"])
    llm_file, *embedding_file = engine_files(role, ONNXRUNTIME)
    llm = load_model(eng / llm_file, "the LLM engine").graph
    inputs, outputs = {i.name: i for i in llm.input}, {o.name: o for o in llm.output}
    layers, where = config["num_hidden_layers"], f"{eng / CONFIG_FILES[role]}"
    for prefix, io in ((PAST_PREFIX, inputs), (PRESENT_PREFIX, outputs)):
        found = {n for n in io if n.startswith(prefix)}
        expected = {f"{prefix}{i}.{half}" for i in range(layers) for half in ORT_KV_HALVES} \
            if len(found) == 2 * layers else set()  # (a tampered count may be huge: compare counts first)
        if found != expected:
            raise InputError(f"{where}: num_hidden_layers {layers} disagrees with {eng / llm_file}, which has "
                             f"{len(found) // 2} layers of {prefix}* bindings; rebuild the engine")
        for name in sorted(expected):
            value, dims = io[name], _dims(io[name])
            actual = KvDtype.from_onnx(value.type.tensor_type.elem_type, ort_engine=True)
            if actual is not kv:
                said = actual.value if actual else f"elem_type {value.type.tensor_type.elem_type}"
                raise InputError(f"{eng / llm_file} {name}: past_key_values dtype is {said!r} but config.json says "
                                 f"kv_cache_dtype {kv.value!r}; rebuild the engine from a matching export")
            want = {1: ("num_key_value_heads", config["num_key_value_heads"]), 3: ("head_dim", head_dim(config))}
            for axis, (key, size) in want.items():
                if len(dims) != 4 or dims[axis] != size:
                    raise InputError(f"{where}: {key} {size} disagrees with {eng / llm_file} {name} shape {dims}; "
                                     "rebuild the engine")
    vocab = config["draft_vocab_size"] if role == ROLE_DRAFT else config["vocab_size"]
    checks = [(llm_file, inputs, INPUTS_EMBEDS, "hidden_size", config["hidden_size"]),
              (llm_file, inputs, ROPE_COS_SIN, "head_dim x partial_rotary_factor", rotary_dim(config)),
              (llm_file, outputs, LOGITS, "vocab_size" if role != ROLE_DRAFT else "draft_vocab_size", vocab)]
    if embedding_file:
        embedding = load_model(eng / embedding_file[0], "the embedding engine").graph
        checks.append((embedding_file[0], {o.name: o for o in embedding.output}, INPUTS_EMBEDS, "hidden_size",
                       config["hidden_size"]))
    for file, io, name, key, size in checks:
        dims = _dims(io[name]) if name in io else []
        if len(dims) != 3 or dims[2] != size:
            raise InputError(f"{where}: {key} {size} disagrees with {eng / file} {name} shape {dims}; rebuild the "
                             "engine")
