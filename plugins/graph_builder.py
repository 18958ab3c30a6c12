"""The one way this project appends ONNX nodes and constants to a graph: the exporter (`llm_loader.onnx_graph`) and
every lowering (`plugins.lowering`, `plugins/*/ort_lowering.py`) build with `GraphBuilder`.

Two naming styles share it. The exporter gives every node a stable name (`op(..., name="layers.0/qkv_proj")`, its
outputs `layers.0/qkv_proj/out0`, ...), so the same checkpoint always gives the same bytes and a repeated name is an
error. A lowering only needs names that are new in the graph it rewrites: without `name`, the node and its outputs
get fresh names from the builder's prefix (`layers.0/attention/Split__12`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper


class Names:
    """The names used in one graph: `claim` a given name once, or take a `fresh` one from a hint."""

    def __init__(self, taken: Iterable[str] = ()):
        self.taken = set(taken)
        self._counter = 0

    def claim(self, name: str) -> str:
        if name in self.taken:
            raise ValueError(f"duplicate name {name}")
        self.taken.add(name)
        return name

    def fresh(self, hint: str) -> str:
        """`hint__<n>`, not yet used in the graph."""
        while True:
            self._counter += 1
            candidate = f"{hint}__{self._counter}"
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate


class GraphBuilder:
    """Appends nodes to `nodes`; constants go to `add_initializer(name, array) -> name`, which stores them (inline
    initializers in a lowering, the external-data file in the exporter). `op` returns the output name, or the list
    of names when the node has several outputs."""

    def __init__(self, names: Names, add_initializer: Callable[[str, np.ndarray], str],
                 nodes: list[onnx.NodeProto] | None = None, prefix: str = ""):
        self.names, self.add_initializer, self.prefix = names, add_initializer, prefix
        self.nodes = [] if nodes is None else nodes

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int | list[str] = 1,
           domain: str | None = None, **attrs):
        """One node. `outputs` is a count (names made from the node's) or the output names themselves."""
        if name is None:
            hint = f"{self.prefix}/{op_type}"
            outs = outputs if isinstance(outputs, list) else [self.names.fresh(hint) for _ in range(outputs)]
            name = self.names.fresh(hint)
        else:
            self.names.claim(name)
            outs = outputs if isinstance(outputs, list) else [f"{name}/out{j}" for j in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, values, dtype=np.float32, name: str | None = None) -> str:
        """A constant of `values` as `dtype`, named `name` or fresh from the prefix."""
        name = self.names.claim(name) if name is not None else self.names.fresh(f"{self.prefix}/const")
        return self.add_initializer(name, np.asarray(values, dtype=dtype))

    def ints(self, *values: int) -> str:
        """An int64 vector (shapes, axes; 0 in a Reshape shape copies that dim)."""
        return self.const(list(values), np.int64)
