"""The KV cache as the engine layer sees it, whatever the backend.

`KVCache` is the bookkeeping `Engine` keeps (rows, tokens cached per row, capacity, dtype) around the backend's own
storage, which it never looks into. `KvLayout` is what a backend needs to allocate that storage. Per row and layer
the cache holds K and V of `[Hkv, capacity, D]`; a backend reads and writes them as `[layers, 2, Hkv, n, D]`
(index 0 = K, 1 = V), whatever layout it keeps them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract.kv import KvDtype


@dataclass(frozen=True)
class KvLayout:
    num_layers: int
    num_kv_heads: int
    capacity: int  # tokens per row: builder_config.max_kv_cache_capacity
    head_dim: int
    dtype: KvDtype


@dataclass
class KVCache:
    storage: object  # the backend's buffers (runtime/onnxruntime_backend.OrtKv, runtime/tensorrt_backend.GpuKv)
    lengths: np.ndarray  # int32 [batch]: tokens already cached per row
    capacity: int
    dtype: str  # the engine's kv_cache_dtype, "fp16" | "fp8"

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes
