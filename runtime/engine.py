"""The engine layer: one LLM engine and one embedding engine behind a small numpy API (ONNX Runtime backend).

Everything above this module (sampling, generation, the CLI) sees only `Engine` and `KVCache`. The KV cache lives
here, in numpy, because ONNX Runtime cannot update a graph input in place: the lowered graph (contracts.md 3.1,
"ONNX Runtime lowering") reads only the filled prefix of each layer's cache and returns only this call's K/V, which
`forward` writes into the cache at each row's length. Passing the prefix copies it (a slice of the capacity axis
is not contiguous): about 2 ms per decode step at 128 cached tokens and 16 ms at 1000 for SmolLM2-135M (30 layers),
against 20-30 ms for the step itself on two cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from builder.engine_dir import load_engine_config
from llm_loader.errors import InputError
from runtime.rope import rope_cos_sin

_FP8 = onnx.TensorProto.FLOAT8E4M3FN


@dataclass
class KVCache:
    """Per layer [batch, 2, Hkv, capacity, D] (index 0 of dim 1 = K); fp16, or uint8 holding FP8 E4M3 bytes."""

    layers: list[np.ndarray]
    lengths: np.ndarray  # int32 [batch]: tokens already cached per row
    dtype: str  # "fp16" | "fp8"

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


def _ort_input(array: np.ndarray, fp8: bool):
    """Numpy array as an ORT input; FP8 bytes need an explicit ONNX type."""
    if fp8:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _FP8)
    return ort.OrtValue.ortvalue_from_numpy(array)


class Engine:
    """An engine directory opened for inference: `embed`, `new_cache` and `forward`."""

    def __init__(self, engine_dir: Path, config: dict):
        self.engine_dir = engine_dir
        self.config = config
        bc = config["builder_config"]
        if bc["backend"] != "onnxruntime":
            raise InputError(f"{engine_dir}: backend {bc['backend']!r} engines need the TensorRT runtime, which this "
                             f"build does not implement; rebuild with llm-build --backend onnxruntime")
        self.vocab_size = int(config["vocab_size"])
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.num_kv_heads = int(config["num_key_value_heads"])
        self.head_dim = int(config.get("head_dim") or self.hidden_size // config["num_attention_heads"])
        self.max_batch_size = int(bc["max_batch_size"])
        self.max_input_len = int(bc["max_input_len"])
        self.max_kv_cache_capacity = int(bc["max_kv_cache_capacity"])
        self.kv_cache_dtype = bc["kv_cache_dtype"]
        eos = config.get("eos_token_id")
        self.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
        self.rope = rope_cos_sin(config, self.max_kv_cache_capacity)
        opts = session_options()
        providers = ["CPUExecutionProvider"]
        self.embedding_session = ort.InferenceSession(str(engine_dir / "embedding.onnx"), opts, providers=providers)
        if config.get("weight_format", "fp16") != "fp16":
            # ORT's CPU provider has no FP8/FP4 GEMM: every step dequantizes each weight into a transient fp32
            # buffer. The arena would keep all those buffers for good (measured on SmolLM2 fp8: 1002 MiB against
            # 413 MiB without it, and 737 MiB for the fp16 engine); without it the low-precision weights pay off.
            opts.enable_cpu_mem_arena = False
        self.llm_session = ort.InferenceSession(str(engine_dir / "llm.onnx"), opts, providers=providers)
        self._past_names = [f"past_key_values_{i}" for i in range(self.num_layers)]
        self._present_names = [f"present_key_values_{i}" for i in range(self.num_layers)]

    @classmethod
    def load(cls, engine_dir: str | Path) -> "Engine":
        """Validate ENG (InputError if it is not a complete engine dir of a known contract) and open its sessions."""
        engine_dir = Path(engine_dir)
        return cls(engine_dir, load_engine_config(engine_dir))

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """int32 [B,S] -> fp16 [B,S,H]; an id outside [0, vocab) is an InputError (a GPU kernel would give zeros)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids: expected an integer array [batch, seq_len], found {ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise InputError(f"input_ids: token id {int(ids[bad][0])} is outside the vocabulary [0, {self.vocab_size})")
        (embeds,) = self.embedding_session.run(["inputs_embeds"], {"input_ids": ids.astype(np.int32, copy=False)})
        return embeds

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache of `max_kv_cache_capacity` tokens per row, in the engine's KV dtype."""
        if not 1 <= batch <= self.max_batch_size:
            raise InputError(f"batch: expected 1..{self.max_batch_size} (the engine's max_batch_size), found {batch}")
        shape = (batch, 2, self.num_kv_heads, self.max_kv_cache_capacity, self.head_dim)
        dtype = np.uint8 if self.kv_cache_dtype == "fp8" else np.float16
        return KVCache([np.zeros(shape, dtype) for _ in range(self.num_layers)], np.zeros(batch, np.int32),
                       self.kv_cache_dtype)

    def forward(self, cache: KVCache, input_ids: np.ndarray, context_lengths: np.ndarray,
                last_token_ids: np.ndarray) -> np.ndarray:
        """Run `input_ids` (right-padded) on top of `cache`; append their K/V; return logits float32 [B,T,V].

        Row b's first new token sits at position cache.lengths[b]; only its first context_lengths[b] tokens are
        real (0 = the row sits this call out). last_token_ids int64 [B,T] picks the positions whose logits return.
        """
        ids = np.asarray(input_ids)
        ctx = np.asarray(context_lengths, dtype=np.int32)
        last = np.asarray(last_token_ids, dtype=np.int64)
        batch, seq = self._check(cache, ids, ctx, last)
        valid = np.arange(seq)[None, :] < ctx[:, None]
        embeds = self.embed(np.where(valid, ids, 0))  # padding may hold any value; only real tokens are checked
        start = cache.lengths.copy()
        prefix = int(start.max())
        fp8 = cache.dtype == "fp8"
        feeds = {"inputs_embeds": embeds, "rope_rotary_cos_sin": self.rope, "context_lengths": ctx,
                 "kvcache_start_index": start, "last_token_ids": last}
        binding = self.llm_session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, layer in zip(self._past_names, cache.layers):  # the filled prefix, copied contiguous (see module doc)
            binding.bind_ortvalue_input(name, _ort_input(np.ascontiguousarray(layer[:, :, :, :prefix]), fp8))
        binding.bind_output("logits")
        for name in self._present_names:
            binding.bind_output(name)
        self.llm_session.run_with_iobinding(binding)
        logits, *presents = (v.numpy() for v in binding.get_outputs())
        for layer, present in zip(cache.layers, presents):
            for b in range(batch):
                n, s = int(ctx[b]), int(start[b])
                if n:
                    layer[b, :, :, s:s + n] = present[b, :, :, :n]
        cache.lengths += ctx
        return logits

    def _check(self, cache: KVCache, ids: np.ndarray, ctx: np.ndarray, last: np.ndarray) -> tuple[int, int]:
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
        return batch, seq
