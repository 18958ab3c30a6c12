"""The build backends behind `llm-build --backend`: what a build needs of one (`BuildBackend`), and the registry.

`builder.cli.build` looks its backend up here and asks it everything that differs between backends (is it usable
here, how its LLM engine takes the KV cache, what it holds the weights in, the engines themselves, its summary line),
so the build branches on no backend name. Each backend is a module implementing `BuildBackend` with plain functions:
builder/onnxruntime_backend.py (CPU) and builder/tensorrt_backend.py (GPU), registered under its `contract.backends`
name. A module is imported only when its backend is asked for, so `llm-build --help` imports neither. The runtime
keeps the matching registry of the engines' readers (`runtime.engine.RUNTIME_BACKENDS`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from builder.profiles import Limits, ModelDims
from contract.backends import ONNXRUNTIME, TENSORRT

if TYPE_CHECKING:
    from builder.detect import Detection
    from contract.embedding import EmbeddingSidecar

BUILD_BACKENDS = {ONNXRUNTIME: "builder.onnxruntime_backend", TENSORRT: "builder.tensorrt_backend"}


@dataclass(frozen=True)
class LlmBuild:
    """One LLM engine to build: `onnx_dir`/model.onnx into `path` (llm, spec_base or spec_draft + the suffix)."""

    onnx_dir: Path
    path: Path
    limits: Limits
    dims: ModelDims
    gen_tokens: int  # tokens per row of the generation profile: 1, or an EAGLE3 engine's tree size
    weight_storage: str  # what the engine holds its weights in at rest (contract.weight_formats.WEIGHT_STORAGE_FORMS)


class BuildBackend(Protocol):
    """What `llm-build` needs of a backend; the functions of a module (see the module doc)."""

    requires: str  # what the backend needs on this machine, for the error when it is missing

    def missing(self) -> str | None:
        """Why this machine cannot build for the backend ("no CUDA GPU is visible"), None when it can."""

    def check_flags(self, cpu_weights: str | None, why: str) -> None:
        """InputError for a flag given that the backend does not take (`why`: how the backend was chosen)."""

    def kv_io(self, found: Detection) -> str:
        """How the LLM engine takes its cache (`contract.kv.KV_IO_FORMS`, recorded as builder_config.kv_io)."""

    def weight_storage(self, weight_format: str, cpu_weights: str | None) -> str:
        """What the engine holds its weights in at rest (builder_config.weight_storage), given `--cpuWeights`."""

    def compute_line(self, found: Detection) -> str:
        """The build summary's line on the precision the engine computes in and holds its cache in."""

    def build_llm(self, job: LlmBuild) -> int | None:
        """Write the LLM engine (printing its steps); the bytes its weights take in memory when it runs, from which
        the summary estimates the resident memory (None: no estimate)."""

    def build_embedding(self, sidecar: EmbeddingSidecar, out: Path, limits: Limits) -> None:
        """Write the embedding engine into `out` (embedding + the backend's suffix) from the sidecar's table."""

    def check_engines(self, engine_dir: Path, config: dict) -> None:
        """InputError unless the engine files of `config`'s role in `engine_dir` agree with it (the EAGLE3 role a
        build keeps; the runtime's backend checks the same when it opens them)."""


def build_backend(name: str) -> BuildBackend:
    """The backend registered as `name` (a `contract.backends.BACKENDS` name)."""
    return importlib.import_module(BUILD_BACKENDS[name])


def check_engine_files(engine_dir: Path, config: dict) -> None:
    """The engine files of the config's role, checked by the backend they were built for (`load_engine_config` calls
    it for the EAGLE3 role a build keeps in its engine dir)."""
    build_backend(config["builder_config"]["backend"]).check_engines(engine_dir, config)
