"""`Fp8Gather` for ONNX Runtime: `com.microsoft.GatherBlockQuantized` reads the FP8 table directly (1 byte per
element at rest), multiplies by the fp32 row-block scale and a Cast gives fp16. It takes a short last block
(H % block_size != 0) as its own block, which is exactly our format, so no padding is needed.
"""

from __future__ import annotations

import onnx

from plugins.fp8_gather.schema import DOMAIN, OP_TYPE, read_block_size


def lower_fp8_gather(node: onnx.NodeProto, ctx) -> list[onnx.NodeProto]:
    block = read_block_size(node)
    table, scale, ids = node.input
    g = ctx.builder(node.name)
    dequantized = g.op("GatherBlockQuantized", [table, ids, scale], domain="com.microsoft", gather_axis=0,
                       quantize_axis=1, block_size=block)
    g.op("Cast", [dequantized], outputs=[node.output[0]], to=onnx.TensorProto.FLOAT16)
    ctx.used_domains.add("com.microsoft")
    return g.nodes


ORT_LOWERING = {(DOMAIN, OP_TYPE): lower_fp8_gather}
