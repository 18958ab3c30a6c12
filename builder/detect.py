"""What an ONNX dir holds, read from the files themselves (contracts.md sections 1, 2, 4).

The build takes no precision flags: weight format, FP8 embedding and FP8 KV cache are detected here. Each fact has more than one
witness (tensor dtype and metadata; graph bindings, plugin attributes and config.json), and they must agree, so an
export that was edited by hand or half-converted fails before a long build instead of producing a wrong engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from contract import stage
from contract.errors import InputError
from contract.jsonfile import read_json
from contract.stage import CONTRACT_VERSION, KvDtype
from llm_loader.embedding import read_embedding_sidecar
from plugins.attention import schema as attention_schema


@dataclass(frozen=True)
class Detection:
    onnx_dir: Path
    config: dict  # config.json as read
    model: str  # HF model_type
    embedding_format: str  # "fp16" | "fp8_e4m3_row_block"
    kv_cache_dtype: str  # "fp16" | "fp8"
    weight_format: str  # "fp16", one quantized format, or "mixed"
    weight_formats: dict[str, int]  # quantized linears per format
    num_layers: int
    vocab_size: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int

    def summary(self) -> str:
        return "\n".join([
            f"ONNX dir        {self.onnx_dir}",
            f"model           {self.model}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}, {self.num_kv_heads} kv heads x {self.head_dim}",
            f"weights         {describe_weights(self.weight_format, self.weight_formats)} (model.onnx "
            "initializers/DQ nodes and config.json agree)",
            f"embedding       {self.embedding_format}",
            f"KV cache        {self.kv_cache_dtype} (graph bindings, AttentionPlugin and config.json agree)",
        ])


def describe_weights(weight_format: str, counts: dict[str, int]) -> str:
    """"fp8", or "mixed: nvfp4 90 linears, fp8 120 linears"."""
    if weight_format != stage.MIXED_WEIGHTS:
        return weight_format
    return f"{weight_format}: " + ", ".join(f"{fmt} {n} linears" for fmt, n in counts.items())


def read_config(onnx_dir: Path) -> dict:
    path = onnx_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{onnx_dir}: expected an ONNX dir from llm_loader.export_all_cli, found no config.json")
    config = read_json(path, "the ONNX dir's runtime config")
    if config.get("contract_version") != CONTRACT_VERSION:
        raise InputError(f"{path} contract_version: expected {CONTRACT_VERSION}, found {config.get('contract_version')!r}")
    if "builder_config" in config:
        raise InputError(f"{path}: this is an engine dir (it has builder_config), expected an ONNX dir")
    for key in ("model", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "kv_cache_dtype"):
        if key not in config:
            raise InputError(f"{path}: expected key {key!r}, found none")
    return config


def graph_kv_facts(model_path: Path) -> tuple[set[str], set[str], int]:
    """(dtypes of past_key_values_* inputs, KV dtypes implied by AttentionPlugin attributes, number of layers)."""
    if not model_path.is_file():
        raise InputError(f"{model_path.parent}: expected model.onnx, found no such file")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    for location in {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}:
        if not (model_path.parent / location).is_file():
            raise InputError(f"{model_path}: expected its weights file {location} next to it, found no such file")
    pasts = [i for i in graph.input if i.name.startswith(stage.PAST_PREFIX)]
    binding = set()
    for i in pasts:
        kv = KvDtype.from_onnx(i.type.tensor_type.elem_type)
        if kv is None:
            raise InputError(f"{model_path} input {i.name}: expected fp16 or float8e4m3fn, found elem_type "
                             f"{i.type.tensor_type.elem_type}")
        binding.add(kv.value)
    plugins = [n for n in graph.node if n.domain == attention_schema.DOMAIN and n.op_type == attention_schema.OP_TYPE]
    plugin = {attention_schema.read_attrs(n).kv_dtype.value for n in plugins}
    if len(plugins) != len(pasts):
        raise InputError(f"{model_path}: expected one AttentionPlugin per past_key_values input, found "
                         f"{len(plugins)} plugins and {len(pasts)} inputs")
    return binding, plugin, len(pasts)


def graph_linear_formats(model_path: Path) -> dict[str, str]:
    """The format of every quantized linear in model.onnx (contracts.md 2.1), keyed by module, from its weight
    initializer `<module>.weight` and the DequantizeLinear that reads it: FLOAT4E2M1 -> nvfp4; FP8 with a blocked
    DQ -> fp8_block when the MatMul's input is quantized, else fp8_pb_wo; with a per-channel scale -> fp8_pc;
    else fp8."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
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
        module = init.name.removesuffix(".weight")
        if init.data_type == onnx.TensorProto.FLOAT4E2M1:
            found[module] = "nvfp4"
        elif init.data_type == onnx.TensorProto.FLOAT8E4M3FN:
            if any(a.name == "block_size" and a.i > 0 for a in n.attribute):
                # 128x128 weights with dynamic activation quantization (HF fine-grained), or weight-only (FP8_PB_WO)
                found[module] = "fp8_block" if quantized_input(n) else "fp8_pb_wo"
            elif n.input[1] in inits and len(inits[n.input[1]].dims) > 0:
                found[module] = "fp8_pc"
            else:
                found[module] = "fp8"
    return found


def graph_weight_format(model_path: Path) -> tuple[str, dict[str, int]]:
    """model.onnx's `weight_format` ("fp16", the one quantized format, or "mixed") and its linears per format."""
    return stage.summarize_weight_formats(graph_linear_formats(model_path).values())


def detect(onnx_dir: str | Path) -> Detection:
    """Read config.json, model.onnx (graph only, no weights) and embedding.safetensors; cross-check them."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise InputError(f"--onnxDir {onnx_dir}: expected a directory, found none")
    config = read_config(onnx_dir)
    binding, plugin, num_layers = graph_kv_facts(onnx_dir / "model.onnx")
    witnesses = {"model.onnx past_key_values inputs": binding, "AttentionPlugin enable_fp8_kv_cache": plugin,
                 "config.json kv_cache_dtype": {config["kv_cache_dtype"]}}
    if any(len(w) != 1 for w in witnesses.values()) or len(set.union(*witnesses.values())) != 1:
        said = ", ".join(f"{k} says {'/'.join(sorted(v))}" for k, v in witnesses.items())
        raise InputError(f"{onnx_dir}: KV cache dtype disagrees: {said}")
    if num_layers != config["num_hidden_layers"]:
        raise InputError(f"{onnx_dir}/model.onnx: expected {config['num_hidden_layers']} past_key_values inputs "
                         f"(config.json num_hidden_layers), found {num_layers}")
    weights, counts = graph_weight_format(onnx_dir / "model.onnx")
    mixed = weights == stage.MIXED_WEIGHTS
    said = (config.get("weight_format", "fp16"), config.get(stage.WEIGHT_FORMAT_COUNTS) if mixed else None)
    if (weights, counts if mixed else None) != said:
        raise InputError(f"{onnx_dir}: weight format disagrees: model.onnx initializers and DequantizeLinear nodes "
                         f"say {describe_weights(weights, counts)}, config.json weight_format says "
                         f"{describe_weights(said[0], said[1] or {})}")
    sidecar = read_embedding_sidecar(onnx_dir / "embedding.safetensors")
    expected = [config["vocab_size"], config["hidden_size"]]
    if [sidecar.vocab_size, sidecar.hidden_size] != expected:
        raise InputError(f"{onnx_dir}/embedding.safetensors: tensor 'embedding' expected {expected} (config.json "
                         f"vocab_size, hidden_size), found {[sidecar.vocab_size, sidecar.hidden_size]}")
    head_dim = stage.head_dim(config)
    return Detection(
        onnx_dir=onnx_dir, config=config, model=config["model"], embedding_format=sidecar.format,
        kv_cache_dtype=config["kv_cache_dtype"], weight_format=weights, weight_formats=counts,
        num_layers=num_layers, vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        num_kv_heads=int(config["num_key_value_heads"]), head_dim=head_dim,
        rotary_dim=int(head_dim * (config.get("partial_rotary_factor") or 1.0)),
    )
