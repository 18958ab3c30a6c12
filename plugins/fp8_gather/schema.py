"""`trt_edgellm::Fp8Gather`: the FP8 embedding lookup node (contracts.md section 3.2).

`table` FLOAT8E4M3FN `[V,H]`, `scale` fp32 `[V, ceil(H/block_size)]`, `input_ids` int32 `[B,S]` -> fp16 `[B,S,H]`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from contract.errors import InputError
from contract.versions import CUSTOM_DOMAIN

DOMAIN = CUSTOM_DOMAIN
OP_TYPE = "Fp8Gather"
OPSET = onnx.helper.make_opsetid(DOMAIN, 1)
DEFAULT_BLOCK_SIZE = 128


def make_node(table: str, scale: str, input_ids: str, output: str, *, name: str, block_size: int = DEFAULT_BLOCK_SIZE) -> onnx.NodeProto:
    return onnx.helper.make_node(
        OP_TYPE, [table, scale, input_ids], [output], name=name, domain=DOMAIN, block_size=int(block_size)
    )


def block_size_from_fields(fields: Mapping[str, object], where: str) -> int:
    """`block_size`, checked, whoever hands it over: an ONNX node (`read_block_size`) or TensorRT (`trt_plugin`)."""
    block = fields.get("block_size", DEFAULT_BLOCK_SIZE)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
        raise InputError(f"{where}: expected a positive int block_size, found {block!r}")
    return int(block)


def read_block_size(node: onnx.NodeProto) -> int:
    """The node's `block_size` (checked by `block_size_from_fields`) and its input count."""
    where = f"Fp8Gather node {node.name!r}"
    block = block_size_from_fields({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, where)
    if len(node.input) != 3:
        raise InputError(f"{where}: expected 3 inputs (table, scale, input_ids), found {len(node.input)}")
    return block
