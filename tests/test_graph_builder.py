"""plugins.graph_builder, the one node/constant builder of the exporter and the lowerings, run by onnx.reference."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from plugins.graph_builder import GraphBuilder, Names


def inline(into: list):
    def add(name, array):
        into.append(numpy_helper.from_array(array, name))
        return name

    return add


def test_stable_names_and_fresh_names_build_a_graph_that_runs():
    inits = []
    names = Names(["x", "layer/Mul__1"])  # a fresh name must skip what the graph already has
    stable = GraphBuilder(names, inline(inits))
    two = stable.const(2.0, np.float32, name="const.two")
    doubled = stable.op("Mul", ["x", two], "layer/double")
    assert doubled == "layer/double/out0"
    lowering = GraphBuilder(names, inline(inits), prefix="layer")
    tripled = lowering.op("Mul", [doubled, lowering.const(1.5)])
    assert tripled not in {"x", "layer/Mul__1"} and tripled.startswith("layer/Mul__")
    lo, hi = lowering.op("Split", [tripled, lowering.ints(1, 2)], outputs=2, axis=0)
    lowering.op("Concat", [hi, lo], outputs=["y"], axis=0)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(stable.nodes + lowering.nodes, "g", [vi("x", TensorProto.FLOAT, [3])],
                              [vi("y", TensorProto.FLOAT, [3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    x = np.array([1.0, 2.0, 4.0], np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0], np.array([6.0, 12.0, 3.0]))
    assert len({n.name for n in graph.node}) == len(graph.node)
    assert not any(n.HasField("domain") for n in graph.node)  # the default domain stays unset, as onnx.helper does


def test_a_stable_name_is_claimed_once():
    g = GraphBuilder(Names(), inline([]))
    g.op("Relu", ["x"], "layers.0/act")
    with pytest.raises(ValueError, match="duplicate name layers.0/act"):
        g.op("Relu", ["x"], "layers.0/act")
    with pytest.raises(ValueError, match="duplicate name layers.0/act"):
        g.const([1], np.int64, name="layers.0/act")
