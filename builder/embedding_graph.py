"""The embedding engine's graph, which both backends start from, and the one way the builder saves an ONNX graph.

`embedding_model` maps `input_ids` int32 [B,S] to `inputs_embeds` fp16 [B,S,H]: a plain Gather for an FP16 table, an
`Fp8Gather` node for an FP8 one, so the FP8 table stays FP8 in memory. ONNX Runtime lowers that node
(builder/onnxruntime_backend.py); TensorRT runs it as a plugin (builder/tensorrt_backend.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from contract.embedding import EMBEDDING_BLOCK, EMBEDDING_FP8, EmbeddingSidecar
from contract.versions import ONNX_OPSET, PRODUCER
from plugins.fp8_gather import schema as fp8_gather_schema


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """`path` + `path.data`: the weights in one external file. Tensors under 1 KiB stay inline: ORT's shape
    inference must read small constants (Squeeze axes, Reshape shapes) and cannot read them from external data."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def embedding_model(sidecar: EmbeddingSidecar) -> onnx.ModelProto:
    """The un-lowered embedding engine graph of the sidecar's table."""
    vocab, hidden = sidecar.vocab_size, sidecar.hidden_size
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq_len"])
    out = helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", hidden])
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    if sidecar.format == EMBEDDING_FP8:
        table = helper.make_tensor("embedding", TensorProto.FLOAT8E4M3FN, [vocab, hidden],
                                   sidecar.table.contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
        scale = onnx.numpy_helper.from_array(sidecar.scale.float().numpy(), "embedding_scale")
        nodes = [fp8_gather_schema.make_node("embedding", "embedding_scale", "input_ids", "inputs_embeds",
                                             name="embedding_lookup", block_size=EMBEDDING_BLOCK)]
        inits = [table, scale]
        opsets.append(fp8_gather_schema.OPSET)
    else:
        inits = [onnx.numpy_helper.from_array(sidecar.table.numpy().astype(np.float16), "embedding")]
        nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["inputs_embeds"], name="embedding_lookup",
                                  axis=0)]
    graph = helper.make_graph(nodes, "embedding", [ids], [out], initializer=inits)
    return helper.make_model(graph, opset_imports=opsets, producer_name=f"{PRODUCER} llm-build")
