"""The engine layer's ONNX Runtime backend (CPU): the sessions of `llm.onnx` and `embedding.onnx`, and a numpy cache.

The cache is one numpy buffer per layer, `[2, batch, Hkv, capacity, D]` (index 0 = K, 1 = V), so that each half
`[batch, Hkv, capacity, D]` is contiguous, as the lowered graph's `past_key_values_i.key` / `.value` take it
(contracts.md 3.1). Its dtype is `KvDtype.numpy`: float32 for an fp16 cache (the engine computes in fp32), the bytes
for FP8. The graph takes it in one of two forms (builder_config.kv_io): in place, the engine reads and updates the
whole buffers (bound as both past and present, no copy); or, for an FP8 cache, it reads only the filled prefix (a
copy: a slice of the capacity axis is not contiguous) and returns this call's K/V, which `run` writes into the cache
at each row's `kvcache_start_index`.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.backends import ONNXRUNTIME
from contract.eagle3 import ROLE_LLM
from contract.engine_dir import engine_files, weight_storage
from contract.errors import InputError
from contract.graph_io import (
    CONTEXT_LENGTHS,
    INPUT_IDS,
    INPUTS_EMBEDS,
    KVCACHE_START_INDEX,
    past_key_values,
    present_key_values,
)
from contract.kv import KV_IN_PLACE, ORT_KV_HALVES
from contract.weight_formats import (
    WEIGHTS_FP16,
    WEIGHTS_QUANTIZED,
)
from plugins import ort_engine
from runtime.kv_cache import KvLayout


@dataclass
class OrtKv:
    """The cache's buffers, and (in-place engines) a binding of them as past and present per set of outputs, made
    at the first call that asks for those outputs."""

    layers: list[np.ndarray]  # [2, batch, Hkv, capacity, D] per layer
    bindings: dict[tuple[str, ...], ort.IOBinding] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def halves(self) -> list[np.ndarray]:
        """K and V of every layer `[batch, Hkv, capacity, D]` (contiguous views), in the graph's binding order."""
        return [half for layer in self.layers for half in layer]


def session_options(weight_storage: str = WEIGHTS_FP16, allow_spinning: bool = True) -> ort.SessionOptions:
    """Options for an engine whose weights are held as `weight_storage` (builder_config, `WEIGHT_STORAGE_FORMS`).

    All graph optimizations (ORT has no x86 fp16 MatMul: at this level it folds the fp16 weights to fp32 once at
    load; lower levels cast them on every run, 3x slower). Threads: ORT's default of one per physical core, or
    EDGELLM_ORT_THREADS. `allow_spinning=False` lets a session's threads sleep as soon as a run ends: the sessions of
    an EAGLE3 engine dir (base, draft, embedding) take turns many times per token, and each one's threads spinning
    after its run would take the cores from the next (measured: 1.5-2x slower rounds on 2 cores).
    EDGELLM_ORT_SPINNING=0 / 1 overrides that choice for every session.

    ORT's QDQ transformers are off (`session.disable_quant_qdq`): on the CPU they fuse nothing for FP8 and only copy
    each activation's Q/DQ pair across Reshapes and Wheres, which costs decode time. Not for weights kept quantized
    at rest (the low-memory form): without those transformers ORT's constant folding also folds each weight's
    DequantizeLinear into an fp32 copy at load, which would give that form the fast form's memory; its weights are
    dequantized into transient buffers at every step, so it also runs without the arena (which would keep all those
    buffers for good: measured on SmolLM2 fp8, 1002 MiB against 413 MiB without it, and 737 MiB for the fp16
    engine)."""
    opts = ort.SessionOptions()
    allow_spinning = os.environ.get("EDGELLM_ORT_SPINNING", "1" if allow_spinning else "0") != "0"
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = int(os.environ.get("EDGELLM_ORT_THREADS") or 0)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if weight_storage == WEIGHTS_QUANTIZED:
        opts.enable_cpu_mem_arena = False
    else:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
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


class OnnxRuntimeBackend:
    """The sessions of one engine dir; arrays in and out are numpy."""

    max_selected_positions = None  # the lowered graph returns logits at any number of positions per row
    hidden_dtype = np.float32  # the engine computes in fp32: hidden states in and out as fp32 (contracts.md 3.1)

    @staticmethod
    def check_engines(engine_dir: Path, config: dict) -> None:
        """The graphs against the config, before any session opens them (`plugins.ort_engine`, which the builder
        shares for the EAGLE3 role a build keeps)."""
        ort_engine.check_engines(engine_dir, config)

    def __init__(self, engine_dir: Path, config: dict, kv: KvLayout, constants: dict[str, np.ndarray]):
        self.kv = kv
        self.constants = constants  # graph inputs that are the same at every call (the RoPE table)
        self.in_place = config["builder_config"]["kv_io"] == KV_IN_PLACE
        # the in-place GQA node needs room for the whole padded call in every row that takes part in it
        self.padded_call_needs_room = self.in_place
        # (past, present) names per layer and half, in the order of OrtKv.halves
        self.kv_names = [(f"{past_key_values(i)}.{half}", f"{present_key_values(i)}.{half}")
                         for i in range(kv.num_layers) for half in ORT_KV_HALVES]
        # the engine dir's files of this role (contracts.md 5.2): an EAGLE3 draft has no embedding engine
        role = config.get("engine_role", ROLE_LLM)
        llm_file, *embedding_file = engine_files(role, ONNXRUNTIME)
        spinning = role == ROLE_LLM
        providers = ["CPUExecutionProvider"]
        self.embedding = (ort.InferenceSession(str(engine_dir / embedding_file[0]),
                                               session_options(allow_spinning=spinning), providers=providers)
                          if embedding_file else None)
        storage = weight_storage(config["builder_config"])
        if storage == WEIGHTS_QUANTIZED:  # weights dequantized into transient buffers at every step
            _return_freed_buffers_to_the_os()
        self.llm = ort.InferenceSession(str(engine_dir / llm_file), session_options(storage, spinning),
                                        providers=providers)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        if self.embedding is None:
            raise InputError("this engine (an EAGLE3 draft) has no embedding engine; look tokens up with its base's")
        (embeds,) = self.embedding.run([INPUTS_EMBEDS], {INPUT_IDS: ids})
        return embeds

    def new_kv(self, batch: int) -> OrtKv:
        shape = (2, batch, self.kv.num_kv_heads, self.kv.capacity, self.kv.head_dim)
        return OrtKv([np.zeros(shape, self.kv.dtype.numpy) for _ in range(self.kv.num_layers)])

    def run(self, kv: OrtKv, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """llm.onnx on `inputs` (every graph input but the cache and the constants), updating the cache; returns
        `outputs` by name."""
        start = inputs[KVCACHE_START_INDEX]
        if self.in_place:
            if outputs not in kv.bindings:
                kv.bindings[outputs] = self._bind_in_place(kv)
            binding = kv.bindings[outputs]
        else:
            binding = self._bind_prefix(kv, int(start.max()))
        for name, value in {**self.constants, **inputs}.items():
            binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name)  # unbound from the last call's buffer: ORT allocates one of this call's shape
        self.llm.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order: the presents, then `outputs`
        presents = values[:len(self.kv_names)]
        if not self.in_place:
            for half, present in zip(kv.halves(), presents):
                present = present.numpy()
                for b, (s, n) in enumerate(zip(start.tolist(), inputs[CONTEXT_LENGTHS].tolist())):
                    half[b, :, s:s + n] = present[b, :, :n]
        return {name: value.numpy() for name, value in zip(outputs, values[len(presents):])}

    def _ort_value(self, array: np.ndarray) -> ort.OrtValue:
        """A cache buffer as an OrtValue over the same memory (FP8 bytes need their ONNX type)."""
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, self.kv.dtype.ort_onnx)

    def _bind_in_place(self, kv: OrtKv) -> ort.IOBinding:
        binding = self.llm.io_binding()
        for (past, present), half in zip(self.kv_names, kv.halves()):
            value = self._ort_value(half)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def _bind_prefix(self, kv: OrtKv, prefix: int) -> ort.IOBinding:
        """The first `prefix` tokens of every row as past (a copy); this call's K/V come back as present."""
        binding = self.llm.io_binding()
        for (past, present), half in zip(self.kv_names, kv.halves()):
            binding.bind_ortvalue_input(past, self._ort_value(np.ascontiguousarray(half[:, :, :prefix])))
            binding.bind_output(present)
        return binding

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    def read_kv(self, kv: OrtKv, row: int, positions: np.ndarray) -> np.ndarray:
        return np.stack([layer[:, row][:, :, positions] for layer in kv.layers])

    def write_kv(self, kv: OrtKv, row: int, start: int, values: np.ndarray) -> None:
        for layer, value in zip(kv.layers, values):
            layer[:, row, :, start:start + value.shape[2]] = value
