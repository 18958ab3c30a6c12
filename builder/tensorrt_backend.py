"""The TensorRT (GPU) build backend (`builder.backends.BuildBackend`): a strongly typed network parsed from the ONNX,
two optimization profiles.

TensorRT comes only from NVIDIA's package index, so this module imports it inside functions and keeps every decision
in pure code elsewhere: the profiles in builder/profiles.py, the graph changes TensorRT needs (plugin namespace,
7-input AttentionPlugin) in builder/trt_graph.py. Precision is not chosen here: with a strongly typed network the
ONNX dtypes (FP8 KV binding, FP8 table, Q/DQ) decide it, which is how FP8 KV and FP8 embedding "just work" after
detection. The custom ops are TensorRT Python plugins, registered (plugins/tensorrt_registry.py) before parsing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from builder.backends import LlmBuild
from builder.detect import Detection
from builder.embedding_graph import embedding_model, save_with_external_data
from builder.profiles import (
    Limits,
    Profile,
    embedding_profiles,
    llm_profiles,
)
from builder.summary import step
from builder.trt_graph import check_gpu_support, check_profiles, prepare_for_tensorrt
from contract import weight_formats
from contract.embedding import EmbeddingSidecar
from contract.errors import InputError
from contract.kv import KV_IN_PLACE, KvDtype
from plugins.tensorrt_registry import import_tensorrt

requires = "the tensorrt package and a CUDA GPU"


def missing() -> str | None:
    """Why `--backend auto` cannot pick TensorRT here ("the tensorrt package is not installed", "no CUDA GPU is
    visible"), or None when `import tensorrt` works and a CUDA GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU is visible"


def check_flags(cpu_weights: str | None, why: str) -> None:
    """`--cpuWeights` is the CPU engine's choice: TensorRT keeps quantized weights as exported."""
    if cpu_weights is not None:
        raise InputError(f"--cpuWeights {cpu_weights}: expected --backend onnxruntime with it, found tensorrt "
                         f"({why}); TensorRT runs FP8/FP4 weights natively")


def kv_io(found: Detection) -> str:
    """Always in place: the plugin's present output aliases its past input."""
    return KV_IN_PLACE


def weight_storage(weight_format: str, cpu_weights: str | None) -> str:
    """The weights as exported (fp16, or FP8/FP4 that TensorRT runs natively); `check_flags` refused --cpuWeights."""
    return weight_formats.weight_storage(weight_format)


def compute_line(found: Detection) -> str:
    return ("compute         fp16 activations in a strongly typed network (FP8/FP4 where the graph quantizes); KV "
            f"cache {'fp16' if KvDtype(found.kv_cache_dtype) is KvDtype.FP16 else 'FP8'}")


def check_engines(engine_dir: Path, config: dict) -> None:
    """Nothing to read without TensorRT: an engine's bindings are checked when the runtime deserializes it
    (runtime/tensorrt_backend.py)."""


def build_engine(model: onnx.ModelProto, model_path: Path, engine_path: Path, profiles: list[Profile]) -> None:
    """Parse `model` into a strongly typed network and serialize an engine with `profiles` to `engine_path`.

    `model` holds its large weights as external-data references, which TensorRT's parser resolves against the
    directory of `model_path` (it rejects `../` and does not take absolute locations), so `model_path` is the file
    the model was loaded from; the graph itself is handed over in memory."""
    trt = import_tensorrt("--backend tensorrt")
    check_profiles(model, profiles)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)  # owns the parsed weights: keep it alive until the build is done
    if not parser.parse(model.SerializeToString(), str(model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{model_path}: TensorRT could not parse it: {errors}")
    config = builder.create_builder_config()
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)  # present aliases past in place
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{model_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    engine_path.write_bytes(serialized)


def build_llm(job: LlmBuild) -> None:
    """job.path (llm.engine, spec_base.engine or spec_draft.engine) from model.onnx, whose weights stay in (and are
    read from) the ONNX dir; the generation profile takes `job.gen_tokens` per row (an EAGLE3 tree size). No memory
    estimate: TensorRT chooses its own workspace."""
    with step(f"build {job.path.name}"):
        model_path = job.onnx_dir / "model.onnx"
        model = onnx.load(str(model_path), load_external_data=False)
        check_gpu_support(model)  # on the exported nodes, before TensorRT's placeholders change their input lists
        model = prepare_for_tensorrt(model)
        build_engine(model, model_path, job.path, llm_profiles(job.limits, job.dims, job.gen_tokens))


def build_embedding(sidecar: EmbeddingSidecar, out: Path, limits: Limits) -> None:
    """`builder.embedding_graph.embedding_model` (Gather, or the Fp8Gather plugin) built into out/embedding.engine;
    the table goes through a temporary external-data file, like any large ONNX weight."""
    with step("build embedding.engine"), tempfile.TemporaryDirectory(dir=out) as tmp:
        path = Path(tmp) / "embedding.onnx"
        save_with_external_data(prepare_for_tensorrt(embedding_model(sidecar)), path)
        model = onnx.load(str(path), load_external_data=False)
        build_engine(model, path, out / "embedding.engine", embedding_profiles(limits))
