"""The ONNX Runtime (CPU) backend: engines are ONNX files whose custom ops are lowered to ops ORT runs natively.

`llm.onnx` is `model.onnx` after `plugins.lowering.lower_for_onnxruntime` (the "ORT engine" KV contract of
contracts.md 3.1) and `widen_to_fp32`: ORT's CPU provider has no fp16 kernels on x86, so the engine computes in
fp32 and holds an fp16 model's KV cache in fp32 (an FP8 cache stays FP8). A quantized model's weights are then, by
default, dequantized once here (`plugins.weight_folding.fast_form`: fp32 at rest, decode as fast as the fp16
engine); with `--cpuWeights quantized` they stay FP8 / packed FP4 at rest and are dequantized at every step (low
memory, slow).
`embedding.onnx` maps `input_ids` int32 [B,S] to `inputs_embeds` fp16 [B,S,H]: a plain Gather for an FP16 table,
an `Fp8Gather` node (then lowered) for an FP8 one, so the FP8 table stays FP8 in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from contract import onnxfile
from contract.embedding import EMBEDDING_BLOCK, EMBEDDING_FP8, EmbeddingSidecar
from contract.versions import ONNX_OPSET, PRODUCER
from contract.weight_formats import WEIGHTS_FP32
from plugins.fp8_gather import schema as fp8_gather_schema


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """`path` + `path.data`: the weights in one external file. Tensors under 1 KiB stay inline: ORT's shape
    inference must read small constants (Squeeze axes, Reshape shapes) and cannot read them from external data."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def embedding_model(sidecar: EmbeddingSidecar) -> onnx.ModelProto:
    """The un-lowered embedding engine graph (shared with the TensorRT backend, which runs Fp8Gather as a plugin)."""
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


def load_model(onnx_dir: Path) -> onnx.ModelProto:
    """model.onnx with its weights (external data checked first: contract.onnxfile)."""
    return onnxfile.load_model(onnx_dir / "model.onnx", "the exported graph model.onnx", weights=True)


def lower(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every trt_edgellm node replaced by ops ONNX Runtime runs natively (plugins.lowering)."""
    from plugins.lowering import lower_for_onnxruntime

    return lower_for_onnxruntime(model)


def lower_llm(model: onnx.ModelProto, weight_storage: str = WEIGHTS_FP32) -> onnx.ModelProto:
    """The LLM graph lowered and computing in fp32; `inputs_embeds` keeps its fp16 binding (the embedding engine's
    output). With `weight_storage` fp32 every quantized weight's dequantization is folded into an fp32 initializer;
    with `quantized` it stays in the graph."""
    from plugins.lowering import widen_to_fp32

    model = widen_to_fp32(lower(model), {"inputs_embeds"})
    if weight_storage == WEIGHTS_FP32:
        from plugins.weight_folding import fast_form

        fast_form(model)
    return model


def _bytes(tensor: onnx.TensorProto) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def session_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes the LLM session holds for the initializers of `model` (loaded): ORT widens fp16 ones to fp32 at load
    (the Casts `widen_to_fp32` put in front of them are folded), the others it holds as stored."""
    return sum(_bytes(t) * (2 if t.data_type == TensorProto.FLOAT16 else 1) for t in model.graph.initializer)


def build_embedding(sidecar: EmbeddingSidecar, out: Path) -> None:
    """out/embedding.onnx (+ .data) from the sidecar; FP8 goes through the same lowering as the LLM."""
    model = embedding_model(sidecar)
    if sidecar.format == EMBEDDING_FP8:
        model = lower(model)
    save_with_external_data(model, out / "embedding.onnx")
