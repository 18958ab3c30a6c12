"""The backends an engine dir can be built for, by name, and the suffix of their engine files (contracts.md 5).

The one list of backend names: the engine dir names its files from it (`contract.engine_dir.engine_files`),
`llm-build --backend` offers it, and the builder's and the runtime's registries (`builder/backends.py`,
`runtime/engine.py`) are keyed by it. Pure data: what a backend does lives with the builder and the runtime.
"""

from __future__ import annotations

ONNXRUNTIME, TENSORRT = "onnxruntime", "tensorrt"  # builder_config.backend
AUTO = "auto"  # llm-build --backend auto: tensorrt when it can run here, else onnxruntime (builder.cli)
ENGINE_SUFFIX = {ONNXRUNTIME: ".onnx", TENSORRT: ".engine"}  # llm.onnx / llm.engine, embedding.onnx / ...
BACKENDS = tuple(ENGINE_SUFFIX)
