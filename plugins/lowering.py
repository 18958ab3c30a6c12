"""Replace every `trt_edgellm` node with standard ONNX (opset 23) / `com.microsoft` ops that ONNX Runtime runs on CPU.

Each op package exports `ORT_LOWERING = {(domain, op_type): lower_fn}`; a `lower_fn(node, ctx)` returns the nodes
that replace `node`, built with `ctx.builder(prefix)` (`plugins.graph_builder`: fresh names, inline constants), and
may add shared nodes (built once per graph, e.g. the RoPE tables) and graph input/output changes through `ctx`.
The caller saves the returned model (external data stays as is).

`widen_to_fp32` then makes the LLM graph compute in fp32: ORT's CPU provider has no fp16 kernels on x86 and would
otherwise wrap every fp16 node in inserted Casts.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.errors import InputError
from contract.versions import CUSTOM_DOMAIN, ONNX_OPSET
from plugins.graph_builder import GraphBuilder, Names

MS_DOMAIN = "com.microsoft"


class LoweringContext:
    """What a lowering function may touch: a builder for new nodes and constants, shared sub-graphs, graph I/O."""

    def __init__(self, graph: onnx.GraphProto):
        self.inputs = {v.name: v for v in graph.input}
        self.outputs = {v.name: v for v in graph.output}
        self.new_initializers: list[onnx.TensorProto] = []
        self.pending: list[onnx.NodeProto] = []  # shared nodes to place before the node being lowered
        self.shared: dict[tuple, object] = {}
        self.used_domains: set[str] = set()
        self.replaced_io: dict[str, list[onnx.ValueInfoProto]] = {}  # graph input/output name -> its replacements
        initializers = {t.name for t in graph.initializer}
        self.names = Names([*self.inputs, *initializers, *(o for node in graph.node for o in node.output)])

    def builder(self, prefix: str, nodes: list[onnx.NodeProto] | None = None) -> GraphBuilder:
        """New nodes (appended to `nodes`, or the builder's own list) and inline constants, fresh names from `prefix`."""
        return GraphBuilder(self.names, self._add_initializer, nodes, prefix)

    def _add_initializer(self, name: str, array: np.ndarray) -> str:
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def shared_value(self, key: tuple, build: Callable[[], object]) -> object:
        """`build()` once per graph for `key`; its nodes must go to `ctx.pending`."""
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    def replace_io(self, name: str, *new: onnx.ValueInfoProto) -> None:
        """Replace graph input or output `name` by `new` (in its place, in order)."""
        self.replaced_io[name] = list(new)


def _registry() -> dict[tuple[str, str], Callable]:
    from plugins.attention.ort_lowering import ORT_LOWERING as attention
    from plugins.fp8_gather.ort_lowering import ORT_LOWERING as fp8_gather

    return {**attention, **fp8_gather}


def lower_for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every `trt_edgellm` node lowered; raises InputError for a custom op it does not know."""
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)  # no serialization: works past protobuf's 2 GB limit and keeps external data references
    model = lowered
    graph = model.graph
    registry = _registry()
    ctx = LoweringContext(graph)
    from plugins.weight_formats import MODULES as WEIGHT_FORMATS

    for fmt in WEIGHT_FORMATS.values():  # a format's graph form ORT lacks ops for (NVFP4's) is a pattern, not a node
        if fmt.ort_lowering is not None:
            fmt.ort_lowering(graph, ctx)
    nodes: list[onnx.NodeProto] = []
    replaced_outputs: set[str] = set()
    for node in graph.node:
        if node.domain != CUSTOM_DOMAIN:
            nodes.append(node)
            continue
        lower = registry.get((node.domain, node.op_type))
        if lower is None:
            known = ", ".join(sorted(f"{d}::{o}" for d, o in registry))
            raise InputError(f"node {node.name!r}: expected a known custom op ({known}), found {node.domain}::{node.op_type}")
        new_nodes = lower(node, ctx)
        nodes.extend(ctx.pending)
        ctx.pending.clear()
        nodes.extend(new_nodes)
        replaced_outputs.update(node.output)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(ctx.new_initializers)
    for io in (graph.input, graph.output):
        kept = [new for v in io for new in ctx.replaced_io.get(v.name, [v])]
        del io[:]
        io.extend(kept)
    # shapes inferred for the custom op's outputs may no longer hold (the ORT KV contract changes them)
    kept = [v for v in graph.value_info if v.name not in replaced_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    _fix_opsets(model, ctx.used_domains)
    return model


def widen_to_fp32(model: onnx.ModelProto, fp16_inputs: set[str]) -> onnx.ModelProto:
    """`model` (lowered) computing in fp32: the graph inputs named in `fp16_inputs` keep their fp16 binding and are
    cast on entry; every other fp16 graph input and output (the KV cache) becomes fp32; fp16 initializers are cast
    (ORT folds those Casts once at load, as it would for its own inserted ones); Casts to fp16 cast to fp32.

    Numerically this is the fp16 graph without its fp16 roundings, which is closer to an fp32 reference.
    """
    graph = model.graph
    renamed = {v.name: f"{v.name}.fp32" for v in graph.input
               if v.name in fp16_inputs and v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    fp16_inits = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
    renamed.update({name: f"{name}.fp32" for name in fp16_inits})
    for node in graph.node:
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                    attr.i = TensorProto.FLOAT
    casts = [helper.make_node("Cast", [name], [widened], name=f"{name}/to_fp32", to=TensorProto.FLOAT)
             for name, widened in renamed.items()]
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    for v in [*graph.input, *graph.output]:
        if v.name not in fp16_inputs and v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.value_info[:]  # fp16 shapes inferred before no longer hold; ORT infers again
    return model


def _fix_opsets(model: onnx.ModelProto, used_domains: set[str]) -> None:
    imports = {o.domain: o.version for o in model.opset_import if o.domain not in (CUSTOM_DOMAIN, "trt", "ai.onnx")}
    imports[""] = max(imports.get("", ONNX_OPSET), ONNX_OPSET)
    if MS_DOMAIN in used_domains:
        imports.setdefault(MS_DOMAIN, 1)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    model.ir_version = max(model.ir_version, 10)
