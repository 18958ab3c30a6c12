"""The engine layer: one LLM engine and one embedding engine behind a small numpy API.

Everything above this module (sampling, generation, the CLI) sees only `Engine` and `KVCache`; `Engine.load` opens
an engine dir of either backend (`runtime/tensorrt_engine.py` for TensorRT). On ONNX Runtime the KV cache lives in
numpy, one contiguous buffer per layer and K/V. The lowered graph (contracts.md 3.1, "ORT engine") takes it in one
of two forms: in place, the engine reads and updates the whole buffers (bound as both past and present,
no copy); or, for an FP8 cache, it reads only the filled prefix (a copy: a slice of the capacity axis is not
contiguous) and returns this call's K/V, which `forward` writes into the cache at each row's length.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from contract import stage
from contract.engine_dir import load_engine_config
from contract.errors import InputError
from runtime.rope import rope_cos_sin

_FP8 = onnx.TensorProto.FLOAT8E4M3FN


@dataclass
class KVCache:
    """One buffer per layer. ONNX Runtime: numpy `[2, batch, Hkv, capacity, D]` (index 0 = K, 1 = V), float32 for an
    fp16 cache (the CPU engine computes in fp32) or uint8 holding FP8 E4M3 bytes. TensorRT: a torch tensor on the GPU
    in the graph's own layout `[batch, 2, Hkv, capacity, D]`, float16 or float8_e4m3fn."""

    layers: list  # np.ndarray (ONNX Runtime) or torch.Tensor (TensorRT)
    lengths: np.ndarray  # int32 [batch]: tokens already cached per row
    dtype: str  # "fp16" | "fp8": the engine's kv_cache_dtype
    binding: ort.IOBinding | None = field(default=None, repr=False)  # in-place engines: these buffers, bound once

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.layers[0].shape[3]


def session_options() -> ort.SessionOptions:
    """All graph optimizations (ORT has no x86 fp16 MatMul: at this level it folds the fp16 weights to fp32 once at
    load; lower levels cast them on every run, 3x slower). Threads: ORT's default of one per physical core, or
    EDGELLM_ORT_THREADS."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("EDGELLM_ORT_THREADS") or 0)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def _return_freed_buffers_to_the_os() -> None:
    """Pin glibc's mmap threshold at 1 MiB, so each freed dequantized weight goes back to the OS at once. By default
    glibc raises the threshold to the largest buffer freed so far, which moves the next ones onto the heap, where
    freed memory stays resident: measured on the SmolLM2 fp8 engine, peak RSS growth 777 MiB by default, 547 MiB
    pinned, for about 5% of its (already slow) decode speed. Process-wide; a no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 20)


def _halves(cache: KVCache) -> list[np.ndarray]:
    """The cache's K and V buffers `[B,Hkv,capacity,D]` (contiguous) in the engine's binding order."""
    return [layer[j] for layer in cache.layers for j in (0, 1)]


def _ort_input(array: np.ndarray, fp8: bool):
    """Numpy array as an ORT input; FP8 bytes need an explicit ONNX type."""
    if fp8:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _FP8)
    return ort.OrtValue.ortvalue_from_numpy(array)


class Engine:
    """An engine directory opened for inference: `embed`, `new_cache` and `forward`.

    This class runs ONNX Runtime engine dirs; `TensorRTEngine` keeps its checks and replaces the four backend steps
    `_open`, `_lookup`, `_new_layers` and `_run`."""

    def __init__(self, engine_dir: Path, config: dict):
        self.engine_dir = engine_dir
        self.config = config
        bc = config["builder_config"]
        self.vocab_size = int(config["vocab_size"])
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.num_kv_heads = int(config["num_key_value_heads"])
        self.head_dim = stage.head_dim(config)
        self.max_batch_size = int(bc["max_batch_size"])
        self.max_input_len = int(bc["max_input_len"])
        self.max_kv_cache_capacity = int(bc["max_kv_cache_capacity"])
        self.kv_cache_dtype = bc["kv_cache_dtype"]
        eos = config.get("eos_token_id")
        self.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
        self.rope = rope_cos_sin(config, self.max_kv_cache_capacity)
        self._open()

    def _open(self) -> None:
        """The ONNX Runtime sessions of llm.onnx and embedding.onnx."""
        opts = session_options()
        providers = ["CPUExecutionProvider"]
        self.embedding_session = ort.InferenceSession(str(self.engine_dir / "embedding.onnx"), opts,
                                                      providers=providers)
        if self.config.get("weight_format", "fp16") != "fp16":
            # ORT's CPU provider has no FP8/FP4 GEMM: every step dequantizes each weight into a transient fp32
            # buffer. The arena would keep all those buffers for good (measured on SmolLM2 fp8: 1002 MiB against
            # 413 MiB without it, and 737 MiB for the fp16 engine); without it the low-precision weights pay off.
            opts.enable_cpu_mem_arena = False
            _return_freed_buffers_to_the_os()
        self.llm_session = ort.InferenceSession(str(self.engine_dir / "llm.onnx"), opts, providers=providers)
        # (past, present) binding names per layer and K/V, in the order of KVCache's buffers
        self._kv_names = [(f"past_key_values_{i}.{kind}", f"present_key_values_{i}.{kind}")
                          for i in range(self.num_layers) for kind in ("key", "value")]
        self.kv_in_place = self.config["builder_config"]["kv_io"] == stage.KV_IN_PLACE

    @staticmethod
    def load(engine_dir: str | Path) -> "Engine":
        """Validate ENG (InputError if it is not a complete engine dir of a known contract) and open it on the
        backend it was built for (builder_config.backend)."""
        engine_dir = Path(engine_dir)
        config = load_engine_config(engine_dir)
        if config["builder_config"]["backend"] == "tensorrt":
            from runtime.tensorrt_engine import TensorRTEngine

            return TensorRTEngine(engine_dir, config)
        return Engine(engine_dir, config)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """int32 [B,S] -> fp16 [B,S,H]; an id outside [0, vocab) is an InputError (a GPU kernel would give zeros)."""
        return self._lookup(self._checked_ids(input_ids))

    def _checked_ids(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids: expected an integer array [batch, seq_len], found {ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise InputError(f"input_ids: token id {int(ids[bad][0])} is outside the vocabulary [0, {self.vocab_size})")
        return ids.astype(np.int32, copy=False)

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """Checked int32 ids -> fp16 embeddings (the embedding engine)."""
        (embeds,) = self.embedding_session.run(["inputs_embeds"], {"input_ids": ids})
        return embeds

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache of `max_kv_cache_capacity` tokens per row, in the engine's KV dtype."""
        if not 1 <= batch <= self.max_batch_size:
            raise InputError(f"batch: expected 1..{self.max_batch_size} (the engine's max_batch_size), found {batch}")
        return KVCache(self._new_layers(batch), np.zeros(batch, np.int32), self.kv_cache_dtype)

    def _new_layers(self, batch: int) -> list[np.ndarray]:
        """Zeroed cache buffers, one per layer (KVCache's ONNX Runtime layout)."""
        shape = (2, batch, self.num_kv_heads, self.max_kv_cache_capacity, self.head_dim)
        dtype = np.uint8 if self.kv_cache_dtype == "fp8" else np.float32
        return [np.zeros(shape, dtype) for _ in range(self.num_layers)]

    def forward(self, cache: KVCache, input_ids: np.ndarray, context_lengths: np.ndarray,
                last_token_ids: np.ndarray) -> np.ndarray:
        """Run `input_ids` (right-padded) on top of `cache`; append their K/V; return logits float32 [B,T,V].

        Row b's first new token sits at position cache.lengths[b]; only its first context_lengths[b] tokens are
        real (0 = the row sits this call out). last_token_ids int64 [B,T] picks the positions whose logits return.
        """
        ids = np.asarray(input_ids)
        ctx = np.asarray(context_lengths, dtype=np.int32)
        last = np.asarray(last_token_ids, dtype=np.int64)
        self._check(cache, ids, ctx, last)
        valid = np.arange(ids.shape[1])[None, :] < ctx[:, None]
        ids = self._checked_ids(np.where(valid, ids, 0))  # padding may hold any value; only real tokens are checked
        logits = self._run(cache, ids, ctx, last)
        cache.lengths += ctx
        return logits

    def _run(self, cache: KVCache, ids: np.ndarray, ctx: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Embedding and llm.onnx on checked inputs; the cache's lengths are the caller's to advance."""
        batch, seq = ids.shape
        start = cache.lengths.copy()
        # the in-place GQA node needs room for the whole padded call in every row that takes part in it
        tight = (ctx > 0) & (start + seq > cache.capacity) if self.kv_in_place else np.zeros(batch, bool)
        if tight.any():
            b = int(np.argmax(tight))
            raise InputError(f"KV cache: row {b} holds {int(start[b])} tokens; a call padded to {seq} tokens "
                             f"would pass the capacity {cache.capacity}; send that row in a shorter call")
        fp8 = cache.dtype == "fp8"
        feeds = {"inputs_embeds": self._lookup(ids), "rope_rotary_cos_sin": self.rope, "context_lengths": ctx,
                 "kvcache_start_index": start, "last_token_ids": last}
        if self.kv_in_place:
            if cache.binding is None:
                cache.binding = self._bind_in_place(cache)
            binding = cache.binding
        else:
            prefix = int(start.max())
            binding = self.llm_session.io_binding()
            for (past, present), half in zip(self._kv_names, _halves(cache)):
                binding.bind_ortvalue_input(past, _ort_input(np.ascontiguousarray(half[:, :, :prefix]), fp8))
                binding.bind_output(present)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        logits = np.empty((batch, last.shape[1], self.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))  # written in place
        self.llm_session.run_with_iobinding(binding)
        if not self.kv_in_place:
            presents = binding.get_outputs()[:-1]  # in binding order: the presents, then logits
            for half, present in zip(_halves(cache), presents):
                present = present.numpy()
                for b in range(batch):
                    n, s = int(ctx[b]), int(start[b])
                    half[b, :, s:s + n] = present[b, :, :n]
        return logits

    def _bind_in_place(self, cache: KVCache) -> ort.IOBinding:
        """A binding of the cache's buffers as both past and present (OrtValues wrap them: no copy)."""
        binding = self.llm_session.io_binding()
        for (past, present), half in zip(self._kv_names, _halves(cache)):
            value = _ort_input(half, cache.dtype == "fp8")
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def _check(self, cache: KVCache, ids: np.ndarray, ctx: np.ndarray, last: np.ndarray) -> None:
        if ids.ndim != 2:
            raise InputError(f"input_ids: expected [batch, seq_len], found shape {ids.shape}")
        batch, seq = ids.shape
        if batch != cache.batch:
            raise InputError(f"input_ids: batch {batch} does not match the cache's batch {cache.batch}")
        if batch > self.max_batch_size:
            raise InputError(f"input_ids: batch {batch} exceeds the engine's max_batch_size {self.max_batch_size}")
        if seq > self.max_input_len:
            raise InputError(f"input_ids: seq_len {seq} exceeds the engine's max_input_len {self.max_input_len}")
        if ctx.shape != (batch,) or (ctx < 0).any() or (ctx > seq).any():
            raise InputError(f"context_lengths: expected {batch} values in [0, {seq}], found {ctx.tolist()}")
        if last.ndim != 2 or last.shape[0] != batch or (last < 0).any() or (last >= seq).any():
            raise InputError(f"last_token_ids: expected int64 [{batch}, T] with values in [0, {seq}), "
                             f"found shape {last.shape}")
        over = cache.lengths + ctx > cache.capacity
        if over.any():
            b = int(np.argmax(over))
            raise InputError(f"KV cache: row {b} would hold {int(cache.lengths[b] + ctx[b])} tokens, more than the "
                             f"capacity {cache.capacity} (max_kv_cache_capacity)")
