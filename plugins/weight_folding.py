"""The fast form of a quantized CPU engine: every weight's dequantization evaluated once, at build time.

ONNX Runtime's CPU provider has no FP8 or FP4 GEMM, so the lowered graph turns each quantized weight into fp32
before its MatMul: a `DequantizeLinear` of the FP8 initializer, or (NVFP4, `plugins/nvfp4/ort_lowering.py`) a chain
that decodes the packed bytes. Left in the graph, that chain runs at every step (7-22x slower decode than the fp16
engine, for weights that stay FP8 / FP4 at rest). `fast_form` makes the graph compute like the fp16 engine's:

1. `fold_weight_dequantization` evaluates every node that computes from initializers alone and descends from such a
   `DequantizeLinear` (the weight's whole chain, Transpose included) with `onnx.reference`, and replaces the chain
   by one fp32 initializer holding its value (the same fp32 numbers the chain computes at every step).
2. `merge_duplicates` merges equal small constants and then nodes that compute the same thing from the same
   inputs. q/k/v (and gate/up) read one activation, and their calibrated input scales are equal, so their
   activation quantizers (static or dynamic FP8, NVFP4) become one.
3. `fuse_sibling_matmuls` joins MatMuls of one input and constant weights into one MatMul over the concatenated
   weights, split after (and a Concat of the pieces in order is the fused output itself): q|k|v and gate|up are
   one GEMM each again, as in the fp16 graph.

Activation quantization reads the activations, so it stays in the graph; every step is exact or computes each
output element the same way, so the engine's logits are those of the low-memory form up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

SMALL = 64  # constants with at most this many elements are compared by value (scales, shapes, axes)


def fast_form(model: onnx.ModelProto) -> None:
    """Steps 1-3 of the module docstring, in place, on a lowered graph whose weights are loaded."""
    fold_weight_dequantization(model)
    merge_duplicates(model.graph)
    fuse_sibling_matmuls(model.graph)


def _constant_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices (in graph order) of the nodes whose every input is an initializer or another such node's output."""
    known = {t.name for t in graph.initializer} | {""}  # "" = an omitted optional input
    constant = []
    for index, node in enumerate(graph.node):
        if node.input and all(i in known for i in node.input):
            constant.append(index)
            known.update(node.output)
    return constant


def _weight_chains(graph: onnx.GraphProto) -> tuple[list[int], list[str]]:
    """(indices of the nodes to fold, the values to materialize): the constant `DequantizeLinear`s and every constant
    node below them; a value is materialized where a node that is not folded (or a graph output) reads it."""
    folded, produced = [], set()
    for index in _constant_nodes(graph):
        node = graph.node[index]
        if node.op_type == "DequantizeLinear" or any(i in produced for i in node.input):
            folded.append(index)
            produced.update(node.output)
    skip = set(folded)
    read_outside = {i for k, n in enumerate(graph.node) if k not in skip for i in n.input}
    read_outside |= {o.name for o in graph.output}
    return folded, [name for k in folded for name in graph.node[k].output if name in read_outside]


def _evaluate(graph: onnx.GraphProto, opsets, inits: dict, producers: dict[str, int], name: str):
    """The value of `name`, computed by its constant ancestors (`producers`: output -> node index) with onnx's
    reference evaluator."""
    needed, stack = set(), [name]
    while stack:
        k = producers.get(stack.pop())
        if k is not None and k not in needed:
            needed.add(k)
            stack.extend(graph.node[k].input)
    chain = [graph.node[k] for k in sorted(needed)]
    used = sorted({i for n in chain for i in n.input if i in inits})
    sub = helper.make_graph(chain, "weight", [], [helper.make_value_info(name, onnx.TypeProto())],
                            [inits[i] for i in used])
    (value,) = ReferenceEvaluator(helper.make_model(sub, opset_imports=opsets)).run([name], {})
    return value


def fold_weight_dequantization(model: onnx.ModelProto) -> None:
    """Replace, in place, each weight's dequantization chain by an fp32 initializer of its value (weights loaded)."""
    graph = model.graph
    folded, values = _weight_chains(graph)
    inits = {t.name: t for t in graph.initializer}
    producers = {o: k for k in _constant_nodes(graph) for o in graph.node[k].output}
    for name in values:  # one weight at a time: the graph holds each fp32 value once
        _add_initializer(graph, name, _evaluate(graph, model.opset_import, inits, producers, name))
    _replace_nodes(graph, set(folded), {})
    _drop_unread(graph)


def _add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    """`array` as a new initializer, written straight into the graph (no second copy of a large weight)."""
    tensor = graph.initializer.add()
    tensor.name, tensor.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def _replace_nodes(graph: onnx.GraphProto, drop: set[int], insert: dict[int, list[onnx.NodeProto]]) -> None:
    """Graph nodes without the indices in `drop`, with `insert[k]` placed where node k was."""
    kept = [new for k, n in enumerate(graph.node) for new in insert.get(k, []) + ([] if k in drop else [n])]
    del graph.node[:]
    graph.node.extend(kept)


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove the constant nodes and the initializers nothing reads any more (a scale's Cast, the FP8 weight)."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = {k for k in _constant_nodes(graph) if not any(o in read for o in graph.node[k].output)}
        if not dead:
            break
        _replace_nodes(graph, dead, {})
    for index in reversed([k for k, t in enumerate(graph.initializer) if t.name not in read]):
        del graph.initializer[index]


def merge_duplicates(graph: onnx.GraphProto) -> None:
    """Merge small initializers of equal dtype, shape and value, then nodes of equal op, attributes and inputs (in
    graph order, so a merge upstream lets the nodes below it merge too); a Cast of an initializer to its own dtype
    (`widen_to_fp32` makes them of the graph's Casts to fp16) is the initializer. A node that makes a graph output
    stays."""
    canonical, renamed, types = {}, {}, {}
    for t in graph.initializer:
        types[t.name] = t.data_type
        if int(np.prod(t.dims, dtype=np.int64)) <= SMALL:
            key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            renamed[t.name] = canonical.setdefault(key, t.name)
    renamed = {k: v for k, v in renamed.items() if k != v}
    graph_outputs = {o.name for o in graph.output}
    seen, drop = {}, set()
    for k, node in enumerate(graph.node):
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
        if graph_outputs.intersection(node.output):
            continue
        if node.op_type == "Cast" and types.get(node.input[0]) == _attr(node, "to"):
            renamed[node.output[0]] = node.input[0]
            drop.add(k)
            continue
        attrs = tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))
        key = (node.domain, node.op_type, tuple(node.input), attrs, len(node.output))
        if key in seen:
            renamed.update(zip(node.output, graph.node[seen[key]].output))
            drop.add(k)
        else:
            seen[key] = k
    _replace_nodes(graph, drop, {})
    _drop_unread(graph)


def fuse_sibling_matmuls(graph: onnx.GraphProto) -> None:
    """One MatMul (then a Split along the last axis) for the MatMuls that read the same input with 2-D fp32
    initializer weights; a Concat along the last axis of exactly those outputs, in order, becomes the fused output."""
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2:
            groups.setdefault(node.input[0], []).append(k)
    drop, insert = set(), {}
    for source, members in groups.items():
        if len(members) < 2:
            continue
        nodes = [graph.node[k] for k in members]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        fused, weight, sizes = f"{nodes[0].output[0]}/fused", f"{nodes[0].input[1]}/fused", f"{nodes[0].name}/sizes"
        _add_initializer(graph, weight, np.concatenate(weights, axis=1))
        _add_initializer(graph, sizes, np.array([w.shape[1] for w in weights], np.int64))
        insert[members[0]] = [
            helper.make_node("MatMul", [source, weight], [fused], name=f"{nodes[0].name}/fused"),
            helper.make_node("Split", [fused, sizes], [n.output[0] for n in nodes], name=f"{fused}/split", axis=-1)]
        drop.update(members)
    _replace_nodes(graph, drop, insert)
    _join_split_concat(graph)
    _drop_unread(graph)


def _join_split_concat(graph: onnx.GraphProto) -> None:
    """A Concat of all of a Split's outputs, in order and along the same axis, is the Split's input: both go."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    splits = {tuple(n.output): k for k, n in enumerate(graph.node) if n.op_type == "Split"}
    renamed, drop = {}, set()
    for k, node in enumerate(graph.node):
        split = splits.get(tuple(node.input)) if node.op_type == "Concat" else None
        if split is None or node.output[0] in graph_outputs:
            continue
        pieces = graph.node[split].output
        if _axis(node) == _axis(graph.node[split]) == -1 and all(readers[o] == 1 for o in pieces):
            renamed[node.output[0]] = graph.node[split].input[0]
            drop.update((k, split))
    _replace_nodes(graph, drop, {})
    _rename_inputs(graph, renamed)


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


def _axis(node: onnx.NodeProto) -> int | None:
    return _attr(node, "axis")
