"""`Fp8Gather` for ONNX Runtime: `com.microsoft.GatherBlockQuantized` reads the FP8 table directly (1 byte per
element at rest), multiplies by the fp32 row-block scale and a Cast gives fp16. It takes a short last block
(H % block_size != 0) as its own block, which is exactly our format, so no padding is needed.
"""

from __future__ import annotations

import onnx
from onnx import helper

from plugins.fp8_gather.schema import DOMAIN, OP_TYPE, read_block_size


def lower_fp8_gather(node: onnx.NodeProto, ctx) -> list[onnx.NodeProto]:
    block = read_block_size(node)
    table, scale, ids = node.input
    dequantized = ctx.name(f"{node.name}_fp32")
    ctx.used_domains.add("com.microsoft")
    return [
        helper.make_node(
            "GatherBlockQuantized", [table, ids, scale], [dequantized], name=ctx.name(node.name),
            domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block,
        ),
        helper.make_node("Cast", [dequantized], [node.output[0]], name=ctx.name(f"{node.name}_cast"), to=onnx.TensorProto.FLOAT16),
    ]


ORT_LOWERING = {(DOMAIN, OP_TYPE): lower_fp8_gather}
