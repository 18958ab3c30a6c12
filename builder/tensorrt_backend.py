"""The TensorRT (GPU) backend: a strongly typed network parsed from the ONNX, two optimization profiles.

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

from builder.profiles import (
    Limits,
    ModelDims,
    Profile,
    embedding_profiles,
    llm_profiles,
)
from builder.trt_graph import check_gpu_support, check_profiles, prepare_for_tensorrt
from contract.embedding import EmbeddingSidecar
from contract.errors import InputError
from plugins.tensorrt_registry import import_tensorrt


def tensorrt_missing() -> str | None:
    """Why `--backend auto` cannot pick TensorRT here ("the tensorrt package is not installed", "no CUDA GPU is
    visible"), or None when `import tensorrt` works and a CUDA GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU is visible"


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


def build_llm(onnx_dir: Path, engine_path: Path, limits: Limits, dims: ModelDims, gen_tokens: int = 1) -> None:
    """`engine_path` (llm.engine, spec_base.engine or spec_draft.engine) from model.onnx, whose weights stay in (and
    are read from) the ONNX dir; `gen_tokens` = the generation profile's tokens per row (an EAGLE3 tree size)."""
    model_path = onnx_dir / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    check_gpu_support(model)  # on the exported nodes, before TensorRT's placeholders change their input lists
    model = prepare_for_tensorrt(model)
    build_engine(model, model_path, engine_path, llm_profiles(limits, dims, gen_tokens))


def build_embedding(sidecar: EmbeddingSidecar, out: Path, limits: Limits) -> None:
    """The un-lowered embedding graph the ORT backend starts from (Gather, or the Fp8Gather plugin), built into
    out/embedding.engine; the table goes through a temporary external-data file, like any large ONNX weight."""
    from builder.onnxruntime_backend import embedding_model, save_with_external_data

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        path = Path(tmp) / "embedding.onnx"
        save_with_external_data(prepare_for_tensorrt(embedding_model(sidecar)), path)
        model = onnx.load(str(path), load_external_data=False)
        build_engine(model, path, out / "embedding.engine", embedding_profiles(limits))
