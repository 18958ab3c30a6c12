"""The engine layer's TensorRT backend (GPU): `llm.engine` and `embedding.engine`, and a cache on the GPU.

The KV cache is one torch tensor per layer on the GPU, in the graph's layout `[batch, 2, Hkv, capacity, D]` and the
engine's dtype (`KvDtype.torch`). It is bound as both `past_key_values_i` and `present_key_values_i`: the attention
plugin's output is aliased to its input, so the new K/V are written in place and nothing is copied. One execution
context per engine; the LLM's switches between the context profile (prefill) and the generation profile (one token
per row) of builder/profiles.py as calls need. Arrays stay on the GPU between calls (embeddings, outputs) until
`to_numpy`. The plugins are Python plugins (their `impl` launches the Triton kernels), so they are registered in this
process before the engines are deserialized.

What this module decides (which profile, which tensors in which layout and dtype) is in plain functions that CI
checks against real exports and their profiles. The TensorRT calls themselves need a GPU and TensorRT; neither
exists where this project's CI runs, so `TensorRTBackend` has not run there (docs/gpu-kernels.md says what has).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.backends import TENSORRT
from contract.eagle3 import ROLE_LLM
from contract.engine_dir import engine_files
from contract.errors import InputError
from contract.graph_io import (
    INPUT_IDS,
    INPUTS_EMBEDS,
    past_key_values,
    present_key_values,
)
from contract.kv import KvDtype
from plugins.tensorrt_registry import import_tensorrt
from plugins.trt_tensors import TORCH_DTYPE_NAMES
from runtime.kv_cache import KvLayout

CONTEXT, GENERATION = 0, 1  # optimization profile indices, in the order builder/profiles.llm_profiles lists them


def profile_for(seq_len: int, gen_tokens: int = 1) -> int:
    """The generation profile admits up to `gen_tokens` tokens per row (1; an EAGLE3 engine's tree size) and as many
    selected positions; everything longer is a prefill (one selected position)."""
    return GENERATION if seq_len <= gen_tokens else CONTEXT


def generation_tokens(config: dict) -> int:
    """Tokens per row of the engine's generation profile (builder_config: an EAGLE3 base's or draft's tree size)."""
    bc = config["builder_config"]
    return int(bc.get("max_verify_tree_size") or bc.get("max_draft_tree_size") or 1)


@dataclass
class GpuKv:
    layers: list  # torch.Tensor [batch, 2, Hkv, capacity, D] per layer

    @property
    def nbytes(self) -> int:
        return sum(layer.numel() * layer.element_size() for layer in self.layers)


def new_cache_layers(batch: int, kv: KvLayout, device: str) -> list:
    """Zeroed per-layer caches `[batch, 2, Hkv, capacity, D]` as `past_key_values_i` takes them."""
    import torch

    shape = (batch, 2, kv.num_kv_heads, kv.capacity, kv.head_dim)
    return [torch.zeros(shape, dtype=kv.dtype.torch, device=device) for _ in range(kv.num_layers)]


def llm_bindings(constants: dict, inputs: dict, layers: list) -> tuple[dict, dict]:
    """Every input of llm.engine by name (contracts.md 2), and the cache's outputs: `past_key_values_i` and
    `present_key_values_i` are both `layers[i]`."""
    past = {past_key_values(i): layer for i, layer in enumerate(layers)}
    present = {present_key_values(i): layer for i, layer in enumerate(layers)}
    return {**constants, **inputs, **past}, present


def read_layers(layers: list, row: int, positions) -> object:
    """K/V of `row` at `positions` (a tensor of indices on the cache's device): `[layers, 2, Hkv, n, D]`."""
    import torch

    return torch.stack([layer[row][:, :, positions] for layer in layers])


def write_layers(layers: list, row: int, start: int, values) -> None:
    """`values` as `read_layers` returns them, into `row` at positions start..start+n."""
    for layer, value in zip(layers, values):
        layer[row, :, :, start:start + value.shape[2]] = value


def check_kv_binding(dtype_name: str, kv_cache_dtype: str, path: Path) -> None:
    """The engine's cache binding (a `tensorrt.DataType` name) must be what config.json promises (the reference
    runtime checks the same)."""
    found = KvDtype.from_tensorrt(dtype_name)
    if found != kv_cache_dtype:
        raise InputError(f"{path}: past_key_values_0 is {found.value if found else dtype_name} but config.json says "
                         f"kv_cache_dtype {KvDtype(kv_cache_dtype).value!r}; rebuild the engine from a matching export")


class TensorRTBackend:
    """The engines of one engine dir; the cache and every binding stay on the GPU, numpy inputs are uploaded."""

    padded_call_needs_room = False  # the plugin writes only each row's real tokens
    hidden_dtype = np.float16  # the engines' hidden-state bindings (contracts.md 2.2, 2.3)

    @staticmethod
    def check_engines(engine_dir: Path, config: dict) -> None:
        """Nothing to read without TensorRT: `__init__` checks the cache binding of the deserialized engine against
        the config (`check_kv_binding`)."""

    def __init__(self, engine_dir: Path, config: dict, kv: KvLayout, constants: dict[str, np.ndarray]):
        import torch

        trt = import_tensorrt(f"{engine_dir} (built for TensorRT)")
        if not torch.cuda.is_available():
            raise InputError(f"{engine_dir}: a TensorRT engine dir needs a CUDA GPU, found none; rebuild it with "
                             f"llm-build --backend onnxruntime to run on the CPU")
        self._torch = torch
        self.kv = kv
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives the engines it deserializes
        # builder/profiles.py: last_token_ids is [batch, 1] in the context profile, [batch, <= gen] in generation
        self.gen_tokens = generation_tokens(config)
        self.max_selected_positions = self.gen_tokens
        llm_file, *embedding_file = engine_files(config.get("engine_role", ROLE_LLM), TENSORRT)
        self._llm = self._deserialize(engine_dir / llm_file)
        self._embedding = self._deserialize(engine_dir / embedding_file[0]) if embedding_file else None
        check_kv_binding(self._llm.get_tensor_dtype(past_key_values(0)).name, kv.dtype, engine_dir / llm_file)
        self._llm_context = self._llm.create_execution_context()
        self._embedding_context = self._embedding.create_execution_context() if self._embedding else None
        self._profile = CONTEXT  # a new context starts on profile 0
        self._stream = torch.cuda.Stream()
        self.constants = {name: torch.from_numpy(value).cuda() for name, value in constants.items()}

    def _deserialize(self, path: Path):
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise InputError(f"{path}: TensorRT could not deserialize it (built by another TensorRT version or for "
                             f"another GPU? see the TensorRT log above); rebuild it with llm-build")
        return engine

    def embed(self, ids: np.ndarray):
        if self._embedding is None:
            raise InputError("this engine (an EAGLE3 draft) has no embedding engine; look tokens up with its base's")
        with self._torch.cuda.stream(self._stream):
            outputs = self._execute(self._embedding, self._embedding_context, {INPUT_IDS: ids},
                                    (INPUTS_EMBEDS,), {})
        return outputs[INPUTS_EMBEDS]

    def new_kv(self, batch: int) -> GpuKv:
        return GpuKv(new_cache_layers(batch, self.kv, "cuda"))

    def run(self, kv: GpuKv, inputs: dict, outputs: tuple[str, ...]) -> dict:
        """llm.engine on `inputs` (every graph input but the cache and the constants; numpy or GPU tensors), the
        cache updated in place; returns `outputs` by name as GPU tensors."""
        profile = profile_for(inputs[INPUTS_EMBEDS].shape[1], self.gen_tokens)
        with self._torch.cuda.stream(self._stream):
            if profile != self._profile:
                self._llm_context.set_optimization_profile_async(profile, self._stream.cuda_stream)
                self._profile = profile
            bound_inputs, presents = llm_bindings(self.constants, inputs, kv.layers)
            return self._execute(self._llm, self._llm_context, bound_inputs, outputs, presents)

    def _execute(self, engine, context, inputs: dict, outputs: tuple[str, ...], bound_outputs: dict) -> dict:
        """Shapes and addresses of every I/O tensor (fresh GPU tensors for `outputs`, shaped as TensorRT computes
        them from the inputs), then one enqueue on the backend's stream."""
        torch = self._torch
        inputs = {name: value if isinstance(value, torch.Tensor) else self._to_gpu(value)
                  for name, value in inputs.items()}
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(f"{name}: shape {tuple(tensor.shape)} is outside the engine's optimization profile")
            context.set_tensor_address(name, tensor.data_ptr())
        fresh = {name: torch.empty(tuple(context.get_tensor_shape(name)), device="cuda",
                                   dtype=getattr(torch, TORCH_DTYPE_NAMES[engine.get_tensor_dtype(name).name]))
                 for name in outputs}
        for name, tensor in {**bound_outputs, **fresh}.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return fresh

    def _to_gpu(self, array: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to("cuda")

    def to_numpy(self, array) -> np.ndarray:
        with self._torch.cuda.stream(self._stream):
            return array.cpu().numpy()  # waits for the stream

    def read_kv(self, kv: GpuKv, row: int, positions: np.ndarray):
        with self._torch.cuda.stream(self._stream):
            return read_layers(kv.layers, row, self._to_gpu(positions))

    def write_kv(self, kv: GpuKv, row: int, start: int, values) -> None:
        with self._torch.cuda.stream(self._stream):
            write_layers(kv.layers, row, start, values)
