"""What an ONNX dir holds, read from the files themselves (contracts.md sections 1, 2, 4).

The build takes no precision flags: weight format, FP8 embedding and FP8 KV cache are detected here. Each fact has more
than one witness (tensor dtype and metadata; each layer's graph bindings and plugin attributes, and config.json), and
they must agree, so an export that was edited by hand or half-converted fails before a long build instead of producing
a wrong engine. Every dim config.json states and the graph fixes (layers, heads, head size, hidden, vocab, rotary
dim) is checked the same way, and so is the EAGLE3 role: config.json `engine_role` against the graph's tree inputs,
plugins and hidden-state I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from contract.dir_kinds import onnx_dir_mistake
from contract.eagle3 import D2T_FILE, ROLE_BASE, ROLE_DRAFT, ROLE_LLM, read_d2t_targets
from contract.embedding import read_embedding_sidecar
from contract.errors import InputError
from contract.graph_io import (
    ATTENTION_MASK,
    ATTENTION_POS_ID,
    HIDDEN_STATES,
    HIDDEN_STATES_FROM_DRAFT,
    HIDDEN_STATES_INPUT,
    INPUTS_EMBEDS,
    LOGITS,
    PAST_PREFIX,
    PRESENT_PREFIX,
    ROPE_COS_SIN,
    past_key_values,
    present_key_values,
)
from contract.jsonfile import read_json
from contract.kv import KvDtype
from contract.onnxfile import load_model
from contract.paths import checked_file
from contract.runtime_config import check_runtime_config, head_dim, rotary_dim
from contract.versions import CONTRACT_VERSION
from contract.weight_formats import (
    MIXED_WEIGHTS,
    WEIGHT_FORMAT_COUNTS,
    summarize_weight_formats,
    weight_format_fields,
)
from plugins import weight_formats
from plugins.attention import schema as attention_schema


@dataclass(frozen=True)
class Detection:
    onnx_dir: Path
    config: dict  # config.json as read
    model: str  # HF model_type
    embedding_format: str | None  # "fp16" | "fp8_e4m3_row_block"; None for a draft (it uses its base's table)
    kv_cache_dtype: str  # "fp16" | "fp8"
    weight_format: str  # "fp16", one quantized format, or "mixed"
    weight_formats: dict[str, int]  # quantized linears per format
    num_layers: int
    vocab_size: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    engine_role: str = ROLE_LLM  # "llm" | "base" | "draft" (config.json, checked against the graph)

    def summary(self) -> str:
        role = {ROLE_LLM: " (vanilla)",
                ROLE_BASE: f" (EAGLE3 base: hidden_states of layers {self.config.get('eagle_hidden_state_layers')})",
                ROLE_DRAFT: f" (EAGLE3 draft: draft vocab {self.config.get('draft_vocab_size')}, reads "
                            f"{self.config.get('base_model_hidden_size')} base hidden values per token)"}
        return "\n".join([
            f"ONNX dir        {self.onnx_dir}",
            f"model           {self.model}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, {self.num_kv_heads} kv heads x {self.head_dim}",
            f"role            {self.engine_role}{role[self.engine_role]}",
            f"weights         {describe_weights(self.weight_format, self.weight_formats)} (model.onnx "
            "initializers/DQ nodes and config.json agree)",
            f"embedding       {self.embedding_format}",
            f"KV cache        {self.kv_cache_dtype} (graph bindings, AttentionPlugin and config.json agree)",
        ])


# inputs only a TensorRT-Edge-LLM 0.11 token-major (ragged, paged) export has (reference section 2.9)
TOKEN_MAJOR_INPUTS = ("positions", "query_start_offsets", "query_lengths", "past_lengths", "logits_indices",
                      "attention_sequence_lengths", "execution_phase_marker")


def _foreign_export(onnx_dir: Path, config: dict) -> str | None:
    """What a config.json without our contract_version is, when it is a TensorRT-Edge-LLM export: its graph is
    token-major (0.11: `inputs_embeds [tokens, hidden]`, per-sequence offsets) or batch-major over a paged pool
    (0.10: `kv_page_table`)."""
    version = str(config.get("edgellm_version") or "")
    try:
        graph = load_model(onnx_dir / "model.onnx", "the exported graph").graph
        inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    except InputError:
        inputs = {}
    token_major = any(name in inputs for name in TOKEN_MAJOR_INPUTS) or inputs.get(INPUTS_EMBEDS) == 2
    if token_major or version.startswith("0.11"):
        found = (f"a TensorRT-Edge-LLM {version or '0.11'} token-major/paged export (inputs_embeds [tokens, hidden], "
                 "positions, query_start_offsets, kv_page_table)")
    elif "kv_page_table" in inputs or version:
        found = f"a TensorRT-Edge-LLM {version or '0.10'} export (batch-major over a paged KV pool, kv_page_table)"
    else:
        return None
    return (f"{onnx_dir}: expected an ONNX dir of contract_version {CONTRACT_VERSION}, found {found}; llm-build "
            "builds only exports of python -m llm_loader.export_all_cli (batch-major inputs_embeds [batch, seq, "
            "hidden], one contiguous KV cache per layer, no kv_page_table): export the Hugging Face checkpoint "
            "with it")


def describe_weights(weight_format: str, counts: dict[str, int]) -> str:
    """"fp8", or "mixed: nvfp4 90 linears, fp8 120 linears"."""
    if weight_format != MIXED_WEIGHTS:
        return weight_format
    return f"{weight_format}: " + ", ".join(f"{fmt} {n} linears" for fmt, n in counts.items())


def read_config(onnx_dir: Path) -> dict:
    path = checked_file(onnx_dir, "config.json", "the runtime config", required=False)
    if path is None:
        raise InputError(onnx_dir_mistake(onnx_dir)
                         or f"{onnx_dir}: expected an ONNX dir from llm_loader.export_all_cli, found no config.json")
    config = read_json(path, "the ONNX dir's runtime config")
    if config.get("contract_version") != CONTRACT_VERSION:
        found = config.get("contract_version")
        raise InputError(_foreign_export(onnx_dir, config) or onnx_dir_mistake(onnx_dir)
                         or f"{path} contract_version: expected {CONTRACT_VERSION}, found {found!r}")
    if "builder_config" in config:
        raise InputError(f"{path}: this is an engine dir (it has builder_config), expected an ONNX dir")
    for key in ("model", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "kv_cache_dtype"):
        if key not in config:
            raise InputError(f"{path}: expected key {key!r}, found none")
    check_runtime_config(config, str(path))
    return config


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _agree(onnx_dir: Path, what: str, witnesses: dict[str, object], layer: int | None = None) -> None:
    """Every source of one fact (config.json, a binding's dtype or shape, a plugin attribute) must say the same."""
    if len({str(v) for v in witnesses.values()}) > 1:
        said = ", ".join(f"{source} says {value}" for source, value in witnesses.items())
        at = "" if layer is None else f" at layer {layer}"
        raise InputError(f"{onnx_dir}: {what} disagrees{at}: {said}")


def check_graph(onnx_dir: Path, graph: onnx.GraphProto, config: dict) -> None:
    """Cross-check every layer's KV bindings and AttentionPlugin, and every dim the graph fixes, with config.json."""
    inputs, outputs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
    layers = config["num_hidden_layers"]
    for kind, found in (("input", sorted(n for n in inputs if n.startswith(PAST_PREFIX))),
                        ("output", sorted(n for n in outputs if n.startswith(PRESENT_PREFIX)))):
        prefix = PAST_PREFIX if kind == "input" else PRESENT_PREFIX
        # counts first: config.json may state any number of layers
        expected = sorted(f"{prefix}{i}" for i in range(layers)) if len(found) == layers else None
        if found != expected:
            raise InputError(f"{onnx_dir}/model.onnx: expected {prefix}0..{layers - 1} {kind}s (config.json "
                             f"num_hidden_layers {layers}), found {len(found)}: {', '.join(found[:4])}"
                             f"{' ...' if len(found) > 4 else ''}")
    plugins = {n.input[1]: n for n in graph.node if n.domain == attention_schema.DOMAIN
               and n.op_type == attention_schema.OP_TYPE and len(n.input) > 1}
    attention_nodes = sum(n.op_type == attention_schema.OP_TYPE for n in graph.node)
    if attention_nodes != layers:
        raise InputError(f"{onnx_dir}/model.onnx: expected one AttentionPlugin per layer ({layers}, config.json "
                         f"num_hidden_layers), found {attention_nodes}")
    hd = head_dim(config)
    for i in range(layers):
        past, present = inputs[past_key_values(i)], outputs[present_key_values(i)]
        node = plugins.get(past.name)
        if node is None or list(node.output[1:2]) != [present.name]:
            raise InputError(f"{onnx_dir}/model.onnx: expected an AttentionPlugin reading {past.name} and writing "
                             f"{present.name}, found none")
        attrs = attention_schema.read_attrs(node)
        plugin = f"AttentionPlugin {node.name!r}"
        past_type, present_type = (KvDtype.from_onnx(v.type.tensor_type.elem_type) for v in (past, present))
        _agree(onnx_dir, "KV cache dtype", layer=i, witnesses={
            f"model.onnx {past.name}": getattr(past_type, "value", past.type.tensor_type.elem_type),
            f"model.onnx {present.name}": getattr(present_type, "value", present.type.tensor_type.elem_type),
            f"{plugin} enable_fp8_kv_cache": attrs.kv_dtype.value,
            "config.json kv_cache_dtype": config["kv_cache_dtype"]})
        shape = _dims(past)
        if len(shape) != 5 or shape[1] != 2 or _dims(present) != shape:
            raise InputError(f"{onnx_dir}/model.onnx {past.name}: expected shape [batch, 2, kv_heads, kv_len, "
                             f"head_dim] (and the same for {present.name}), found {shape} and {_dims(present)}")
        _agree(onnx_dir, "num_key_value_heads", layer=i, witnesses={
            "config.json num_key_value_heads": config["num_key_value_heads"], f"model.onnx {past.name} dim 2": shape[2],
            f"{plugin} num_kv_heads": attrs.num_kv_heads})
        _agree(onnx_dir, "head_dim", layer=i, witnesses={
            "config.json head_dim": hd, f"model.onnx {past.name} dim 4": shape[4],
            f"{plugin} head_size": attrs.head_size})
        _agree(onnx_dir, "num_attention_heads", layer=i, witnesses={
            "config.json num_attention_heads": config["num_attention_heads"],
            f"{plugin} num_q_heads": attrs.num_q_heads})
    vocab_key = "draft_vocab_size" if config.get("engine_role") == ROLE_DRAFT else "vocab_size"
    for name, io, axis, key, value in (
            (INPUTS_EMBEDS, inputs, 2, "hidden_size", config["hidden_size"]),
            (ROPE_COS_SIN, inputs, 2, "head_dim x partial_rotary_factor", rotary_dim(config)),
            (LOGITS, outputs, 2, vocab_key, config.get(vocab_key))):
        if name not in io:
            raise InputError(f"{onnx_dir}/model.onnx: expected {name}, found no such graph input or output")
        dims = _dims(io[name])
        _agree(onnx_dir, key, {f"config.json {key}": value,
                               f"model.onnx {name} dim {axis}": dims[axis] if len(dims) == 3 else dims})


def graph_role(model_path: Path, graph: onnx.GraphProto) -> str:
    """The EAGLE3 role the graph's own I/O says: a draft reads hidden_states_input, a base returns hidden_states,
    and both run every AttentionPlugin in tree mode with the two tree inputs; a vanilla graph has none of that."""
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    plugins = [n for n in graph.node if n.domain == attention_schema.DOMAIN and n.op_type == attention_schema.OP_TYPE]
    tree = {attention_schema.read_attrs(n).enable_tree_attention for n in plugins}
    has_tree_inputs = {ATTENTION_MASK, ATTENTION_POS_ID} <= inputs
    if tree == {False} and not has_tree_inputs and HIDDEN_STATES not in outputs:
        return ROLE_LLM
    if tree != {True} or not has_tree_inputs or HIDDEN_STATES not in outputs:
        raise InputError(f"{model_path}: expected either a vanilla graph or an EAGLE3 one (tree attention in every "
                         f"AttentionPlugin, inputs {ATTENTION_MASK} and {ATTENTION_POS_ID}, output "
                         f"{HIDDEN_STATES}), found a mix")
    draft_inputs = {HIDDEN_STATES_INPUT, HIDDEN_STATES_FROM_DRAFT}
    if draft_inputs <= inputs:
        return ROLE_DRAFT
    if draft_inputs & inputs:
        raise InputError(f"{model_path}: expected both draft inputs {sorted(draft_inputs)}, found only "
                         f"{sorted(draft_inputs & inputs)}")
    return ROLE_BASE


def graph_linear_formats(graph: onnx.GraphProto) -> dict[str, str]:
    """The format of every quantized linear in model.onnx (contracts.md 2.1), keyed by module, from its weight
    initializer `<module>.weight` and the DequantizeLinear that reads it, as each format's `recognize` says
    (plugins/weight_formats: e.g. FLOAT4E2M1 -> nvfp4; FP8 with a blocked DQ -> fp8_block when the MatMul's input is
    quantized, else fp8_pb_wo)."""
    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def quantized_input(weight_dq) -> bool:
        """Does the MatMul that consumes this weight read a DequantizeLinear'd (or Cast of one) activation?"""
        for mm in consumers.get(weight_dq.output[0], []):
            act = producer.get(mm.input[0])
            if act is not None and act.op_type == "Cast":
                act = producer.get(act.input[0])
            if act is not None and act.op_type == "DequantizeLinear":
                return True
        return False

    found = {}
    for n in graph.node:
        init = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if init is None or not init.name.endswith(".weight"):
            continue
        fmt = weight_formats.recognize(n, init, inits, quantized_input(n))
        if fmt is not None:
            found[init.name.removesuffix(".weight")] = fmt
    return found


def graph_weight_format(graph: onnx.GraphProto) -> tuple[str, dict[str, int]]:
    """model.onnx's `weight_format` ("fp16", the one quantized format, or "mixed") and its linears per format."""
    return summarize_weight_formats(graph_linear_formats(graph).values())


def detect(onnx_dir: str | Path) -> Detection:
    """Read config.json, model.onnx (graph only, no weights) and embedding.safetensors; cross-check them."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise InputError(f"--onnxDir {onnx_dir}: expected a directory, found none")
    config = read_config(onnx_dir)
    role = config.get("engine_role", ROLE_LLM)  # checked with the other EAGLE3 fields by read_config
    graph = load_model(onnx_dir / "model.onnx", "the exported graph model.onnx").graph
    found_role = graph_role(onnx_dir / "model.onnx", graph)
    if found_role != role:
        raise InputError(f"{onnx_dir}: engine role disagrees: config.json says {role!r}, model.onnx's inputs and "
                         f"outputs say {found_role!r}")
    check_graph(onnx_dir, graph, config)
    weights, counts = graph_weight_format(graph)
    said = weight_format_fields(config.get("weight_format", "fp16"), config.get(WEIGHT_FORMAT_COUNTS))
    if weight_format_fields(weights, counts) != said:
        raise InputError(f"{onnx_dir}: weight format disagrees: model.onnx initializers and DequantizeLinear nodes "
                         f"say {describe_weights(weights, counts)}, config.json weight_format says "
                         f"{describe_weights(said['weight_format'], said.get(WEIGHT_FORMAT_COUNTS) or {})}")
    if role == ROLE_DRAFT:
        embedding_format = None
        read_d2t_targets(checked_file(onnx_dir, D2T_FILE, "the draft vocabulary map"), config["vocab_size"],
                         config["draft_vocab_size"])
    else:
        sidecar = read_embedding_sidecar(checked_file(onnx_dir, "embedding.safetensors", "the embedding sidecar"))
        expected = [config["vocab_size"], config["hidden_size"]]
        if [sidecar.vocab_size, sidecar.hidden_size] != expected:
            raise InputError(f"{onnx_dir}/embedding.safetensors: tensor 'embedding' expected {expected} (config.json "
                             f"vocab_size, hidden_size), found {[sidecar.vocab_size, sidecar.hidden_size]}")
        embedding_format = sidecar.format
    return Detection(
        onnx_dir=onnx_dir, config=config, model=config["model"], embedding_format=embedding_format, engine_role=role,
        kv_cache_dtype=config["kv_cache_dtype"], weight_format=weights, weight_formats=counts,
        num_layers=config["num_hidden_layers"], vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_kv_heads=config["num_key_value_heads"], head_dim=head_dim(config),
        rotary_dim=rotary_dim(config),
    )
