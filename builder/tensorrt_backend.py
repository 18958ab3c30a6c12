"""The TensorRT (GPU) backend: a strongly typed network parsed from the ONNX, two optimization profiles.

TensorRT comes only from NVIDIA's package index, so this module imports it inside functions and keeps every decision
(profiles, flags) in pure code elsewhere (builder/profiles.py). Precision is not chosen here: with a strongly typed
network the ONNX dtypes (FP8 KV binding, FP8 table, Q/DQ) decide it, which is how FP8 KV and FP8 embedding "just
work" after detection. The custom ops are registered by importing the plugins' `trt_plugin` modules.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from builder.profiles import Limits, ModelDims, Profile, embedding_profiles, llm_profiles
from llm_loader.embedding import EmbeddingSidecar
from llm_loader.errors import InputError


def tensorrt_available() -> bool:
    """True when `import tensorrt` works and a CUDA GPU is visible (what `--backend auto` needs)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise InputError("--backend tensorrt: expected the tensorrt Python package (pip install --extra-index-url "
                         f"https://pypi.nvidia.com tensorrt), found none ({e})") from e
    import plugins.attention.trt_plugin  # noqa: F401  registers trt_edgellm::AttentionPlugin
    import plugins.fp8_gather.trt_plugin  # noqa: F401  registers trt_edgellm::Fp8Gather
    return trt


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile]) -> None:
    """Parse `onnx_path` into a strongly typed network and serialize an engine with `profiles` to `engine_path`."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS"):  # 10.9+: engine runs without Python
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{onnx_path}: TensorRT could not parse it: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.MONITOR_MEMORY)
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)  # present aliases past in place
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            if name in inputs:
                trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))


def build_llm(onnx_dir: Path, out: Path, limits: Limits, dims: ModelDims) -> None:
    build_engine(onnx_dir / "model.onnx", out / "llm.engine", llm_profiles(limits, dims))


def build_embedding(sidecar: EmbeddingSidecar, out: Path, limits: Limits) -> None:
    """The un-lowered embedding graph (Gather, or the Fp8Gather plugin) built into out/embedding.engine."""
    from builder.onnxruntime_backend import embedding_model, save_with_external_data

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        path = Path(tmp) / "embedding.onnx"
        save_with_external_data(embedding_model(sidecar), path)
        build_engine(path, out / "embedding.engine", embedding_profiles(limits))
