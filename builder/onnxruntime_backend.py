"""The ONNX Runtime (CPU) build backend (`builder.backends.BuildBackend`): engines are ONNX files whose custom ops are
lowered to ops ORT runs natively.

`llm.onnx` is `model.onnx` after `plugins.lowering.lower_for_onnxruntime` (the "ORT engine" KV contract of
contracts.md 3.1) and `widen_to_fp32`: ORT's CPU provider has no fp16 kernels on x86, so the engine computes in
fp32 and holds an fp16 model's KV cache in fp32 (an FP8 cache stays FP8). A quantized model's weights are then, by
default, dequantized once here (`plugins.weight_folding.fast_form`: fp32 at rest, decode as fast as the fp16
engine); with `--cpuWeights quantized` they stay FP8 / packed FP4 at rest and are dequantized at every step (low
memory, slow).
`embedding.onnx` is `builder.embedding_graph.embedding_model` with its Fp8Gather (an FP8 table) lowered the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from builder.backends import LlmBuild
from builder.detect import Detection
from builder.embedding_graph import embedding_model, save_with_external_data
from builder.profiles import Limits
from builder.summary import step
from contract import onnxfile, weight_formats
from contract.embedding import EMBEDDING_FP8, EmbeddingSidecar
from contract.kv import KvDtype
from contract.weight_formats import WEIGHTS_FP32
from plugins import ort_engine
from plugins.attention.ort_lowering import kv_io_form

requires = "the onnxruntime package"


def missing() -> str | None:
    """None: onnxruntime is a dependency of this package, and the engine runs on any CPU."""
    return None


def check_flags(cpu_weights: str | None, why: str) -> None:
    """Every flag applies: `--cpuWeights` chooses the weights' form at rest."""


def kv_io(found: Detection) -> str:
    """In place for an fp16 cache, the filled prefix for an FP8 one (`plugins.attention.ort_lowering.kv_io_form`)."""
    return kv_io_form(KvDtype(found.kv_cache_dtype), found.rotary_dim)


def weight_storage(weight_format: str, cpu_weights: str | None) -> str:
    """A quantized model's weights: fp32 (dequantized at build, the default) or as exported (`--cpuWeights
    quantized`); an fp16 model's stay fp16."""
    return weight_formats.weight_storage(weight_format, cpu_weights or WEIGHTS_FP32)


def compute_line(found: Detection) -> str:
    cache = "fp32 (the fp16 cache, widened)" if KvDtype(found.kv_cache_dtype) is KvDtype.FP16 else "FP8"
    return (f"compute         fp32: ONNX Runtime's CPU provider has no fp16 kernels on x86, so the graph computes "
            f"in fp32 (quantized activations keep their FP8/FP4 rounding); KV cache held in {cache}")


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


def build_llm(job: LlmBuild) -> int:
    """job.path (+ .data): model.onnx lowered (and its weights dequantized, for fp32 storage); the bytes the session
    will hold for its weights."""
    with step("load model.onnx"):
        model = load_model(job.onnx_dir)
    with step("lower for onnxruntime" + (", dequantize the weights" if job.weight_storage == WEIGHTS_FP32 else "")):
        model = lower_llm(model, job.weight_storage)
    weight_bytes = session_weight_bytes(model)
    with step(f"save {job.path.name}"):
        save_with_external_data(model, job.path)
    return weight_bytes


def build_embedding(sidecar: EmbeddingSidecar, out: Path, limits: Limits) -> None:
    """out/embedding.onnx (+ .data) from the sidecar (any batch and length: `limits` bound nothing here); FP8 goes
    through the same lowering as the LLM."""
    with step("embedding.onnx"):
        model = embedding_model(sidecar)
        if sidecar.format == EMBEDDING_FP8:
            model = lower(model)
        save_with_external_data(model, out / "embedding.onnx")


def check_engines(engine_dir: Path, config: dict) -> None:
    """The check the runtime makes when it opens these engines (`plugins.ort_engine`), for the EAGLE3 role a build
    keeps in its engine dir."""
    ort_engine.check_engines(engine_dir, config)
