"""The engine layer on TensorRT: `llm.engine` and `embedding.engine` behind the API of `runtime.engine.Engine`.

The KV cache is one torch tensor per layer on the GPU, in the graph's layout `[batch, 2, Hkv, capacity, D]` and the
engine's dtype (float16 or float8_e4m3fn). It is bound as both `past_key_values_i` and `present_key_values_i`: the
attention plugin's output is aliased to its input, so the new K/V are written in place and nothing is copied. One
execution context per engine; the LLM's switches between the context profile (prefill) and the generation profile
(one token per row) of builder/profiles.py as calls need. The plugins are Python plugins (their `impl` launches the
Triton kernels), so they are registered in this process before the engines are deserialized.

What this module decides (which profile, which tensors in which layout and dtype) is in plain functions that CI
checks against real exports and their profiles. The TensorRT calls themselves need a GPU and TensorRT; neither
exists where this project's CI runs, so `TensorRTEngine` has not run there (docs/gpu-kernels.md says what has).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from builder.tensorrt_backend import import_tensorrt
from contract.errors import InputError
from plugins.trt_tensors import TORCH_DTYPE_NAMES
from runtime.engine import Engine, KVCache

CONTEXT, GENERATION = 0, 1  # optimization profile indices, in the order builder/profiles.llm_profiles lists them
KV_DTYPES = {"HALF": "fp16", "FP8": "fp8"}  # TensorRT DataType name of past_key_values_* -> kv_cache_dtype


def profile_for(seq_len: int) -> int:
    """The generation profile admits exactly one token per row; everything longer is a prefill."""
    return GENERATION if seq_len == 1 else CONTEXT


def new_cache_layers(batch: int, num_layers: int, num_kv_heads: int, capacity: int, head_dim: int,
                     kv_cache_dtype: str, device: str) -> list:
    """Zeroed per-layer caches `[batch, 2, Hkv, capacity, D]` as `past_key_values_i` takes them."""
    import torch

    shape = (batch, 2, num_kv_heads, capacity, head_dim)
    trt_name = next(name for name, kv in KV_DTYPES.items() if kv == kv_cache_dtype)
    dtype = getattr(torch, TORCH_DTYPE_NAMES[trt_name])
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def llm_inputs(embeds, layers: list, rope, context_lengths, kvcache_start_index, last_token_ids) -> dict:
    """Every input of llm.engine by name (contracts.md 2); `present_key_values_i` is bound to `layers[i]` too."""
    inputs = {"inputs_embeds": embeds, "context_lengths": context_lengths, "kvcache_start_index": kvcache_start_index,
              "rope_rotary_cos_sin": rope, "last_token_ids": last_token_ids}
    inputs.update({f"past_key_values_{i}": layer for i, layer in enumerate(layers)})
    return inputs


def check_kv_binding(dtype_name: str, kv_cache_dtype: str, path: Path) -> None:
    """The engine's cache binding must be what config.json promises (the reference runtime checks the same)."""
    found = KV_DTYPES.get(dtype_name, dtype_name)
    if found != kv_cache_dtype:
        raise InputError(f"{path}: past_key_values_0 is {found} but config.json says kv_cache_dtype "
                         f"{kv_cache_dtype!r}; rebuild the engine from a matching export")


class TensorRTEngine(Engine):
    """`Engine` over TensorRT engines; the cache and every binding stay on the GPU, logits come back as numpy."""

    def _open(self) -> None:
        import torch

        trt = import_tensorrt(f"{self.engine_dir} (built for TensorRT)")
        if not torch.cuda.is_available():
            raise InputError(f"{self.engine_dir}: a TensorRT engine dir needs a CUDA GPU, found none; rebuild it with "
                             f"llm-build --backend onnxruntime to run on the CPU")
        self._torch = torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives the engines it deserializes
        self._llm, self._embedding = (self._deserialize(name) for name in ("llm.engine", "embedding.engine"))
        check_kv_binding(self._llm.get_tensor_dtype("past_key_values_0").name, self.kv_cache_dtype,
                         self.engine_dir / "llm.engine")
        self._llm_context = self._llm.create_execution_context()
        self._embedding_context = self._embedding.create_execution_context()
        self._profile = CONTEXT  # a new context starts on profile 0
        self._stream = torch.cuda.Stream()
        self._rope = torch.from_numpy(self.rope).cuda()

    def _deserialize(self, name: str):
        engine = self._runtime.deserialize_cuda_engine((self.engine_dir / name).read_bytes())
        if engine is None:
            raise InputError(f"{self.engine_dir / name}: TensorRT could not deserialize it (built by another TensorRT "
                             f"version or for another GPU? see the TensorRT log above); rebuild it with llm-build")
        return engine

    def _new_layers(self, batch: int) -> list:
        return new_cache_layers(batch, self.num_layers, self.num_kv_heads, self.max_kv_cache_capacity, self.head_dim,
                                self.kv_cache_dtype, "cuda")

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        with self._torch.cuda.stream(self._stream):
            return self._lookup_on_gpu(ids).cpu().numpy()

    def _lookup_on_gpu(self, ids: np.ndarray):
        embeds = self._torch.empty((*ids.shape, self.hidden_size), dtype=self._torch.float16, device="cuda")
        self._execute(self._embedding_context, {"input_ids": self._to_gpu(ids)}, {"inputs_embeds": embeds})
        return embeds

    def _run(self, cache: KVCache, ids: np.ndarray, ctx: np.ndarray, last: np.ndarray) -> np.ndarray:
        if last.shape[1] != 1:
            raise InputError(f"last_token_ids: a TensorRT engine returns one position per row (its profiles' "
                             f"last_token_ids is [batch, 1]), found {last.shape[1]}")
        torch = self._torch
        with torch.cuda.stream(self._stream):
            inputs = llm_inputs(self._lookup_on_gpu(ids), cache.layers, self._rope, self._to_gpu(ctx),
                                self._to_gpu(cache.lengths), self._to_gpu(last))
            logits = torch.empty((len(ids), 1, self.vocab_size), dtype=torch.float32, device="cuda")
            outputs = {"logits": logits, **{f"present_key_values_{i}": layer for i, layer in enumerate(cache.layers)}}
            profile = profile_for(ids.shape[1])
            if profile != self._profile:
                self._llm_context.set_optimization_profile_async(profile, self._stream.cuda_stream)
                self._profile = profile
            self._execute(self._llm_context, inputs, outputs)
            return logits.cpu().numpy()  # waits for the stream

    def _to_gpu(self, array: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to("cuda")

    def _execute(self, context, inputs: dict, outputs: dict) -> None:
        """Shapes and addresses of every I/O tensor, then one enqueue on the engine's stream."""
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(f"{name}: shape {tuple(tensor.shape)} is outside the engine's optimization profile")
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
