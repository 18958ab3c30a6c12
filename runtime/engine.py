"""The engine layer: one LLM engine and one embedding engine behind a small numpy API, on either backend.

Everything above this module (sampling, generation, the CLI) sees only `Engine` and `KVCache`. `Engine` holds what
does not depend on the backend: the engine dir's config, every check of a call's inputs, and the cache's
bookkeeping (rows, tokens cached per row, capacity, dtype). It composes one backend object, chosen by
builder_config.backend from `RUNTIME_BACKENDS`, that owns the sessions and the cache's storage and checks its engine
files before they are opened: `runtime/onnxruntime_backend.py` (CPU) and `runtime/tensorrt_backend.py` (GPU), both
shaped like `Backend` below. The backend API speaks the graph's own I/O names (contracts.md 2,
`contract.graph_io`), so a graph with more inputs or outputs needs no new backend method.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from contract.backends import ONNXRUNTIME, TENSORRT
from contract.eagle3 import ROLE_DRAFT, ROLE_LLM
from contract.engine_dir import load_engine_config
from contract.errors import InputError
from contract.graph_io import (
    ATTENTION_MASK,
    ATTENTION_POS_ID,
    CONTEXT_LENGTHS,
    INPUTS_EMBEDS,
    KVCACHE_START_INDEX,
    LAST_TOKEN_IDS,
    LOGITS,
    ROPE_COS_SIN,
    tree_mask_words,
)
from contract.kv import KvDtype
from contract.runtime_config import head_dim
from plugins.attention.tree_mask import causal_mask
from runtime.kv_cache import KVCache, KvLayout
from runtime.rope import rope_cos_sin


class Backend(Protocol):
    """What `Engine` needs of a backend, opened as `Backend(engine_dir, config, kv_layout, constants)`; `constants`
    are graph inputs that are the same at every call (the RoPE table), kept where the engine runs. Arrays are the
    backend's own (numpy on ONNX Runtime, torch tensors on the GPU on TensorRT), so they can pass from one call to
    the next without a copy; numpy is accepted as input."""

    max_selected_positions: int | None  # the most positions per row last_token_ids may pick (None: any)
    hidden_dtype: type  # numpy dtype of the EAGLE3 hidden-state inputs and outputs (fp32 on the CPU engine)
    padded_call_needs_room: bool  # a row taking part in a call needs capacity for the whole padded call

    @staticmethod
    def check_engines(engine_dir: Path, config: dict) -> None:
        """InputError unless the engine files of the config's role agree with it (before any is opened)."""

    def embed(self, ids: np.ndarray):
        """Checked int32 ids [B,S] -> fp16 embeddings [B,S,H] (the embedding engine)."""

    def new_kv(self, batch: int):
        """Zeroed cache storage for `batch` rows of `KvLayout.capacity` tokens; it has `nbytes`."""

    def run(self, kv, inputs: dict, outputs: tuple[str, ...]) -> dict:
        """The LLM engine on `inputs` (every graph input except the cache and the constants given at open), writing
        each row's new K/V into `kv` at its `kvcache_start_index`; returns `outputs` by name."""

    def to_numpy(self, array) -> np.ndarray: ...

    def read_kv(self, kv, row: int, positions: np.ndarray):
        """K/V of one row at `positions` as `[layers, 2, Hkv, n, D]` (0 = K), in the storage's dtype."""

    def write_kv(self, kv, row: int, start: int, values) -> None:
        """`values` as `read_kv` returns them, into positions start..start+n of the row."""


# contract.backends name -> (module, class) of its `Backend`; a module is imported only when an engine dir built for
# its backend is opened (TensorRT is not installed where the CPU engine runs)
RUNTIME_BACKENDS = {ONNXRUNTIME: ("runtime.onnxruntime_backend", "OnnxRuntimeBackend"),
                    TENSORRT: ("runtime.tensorrt_backend", "TensorRTBackend")}


def backend_class(name: str) -> type:
    """The `Backend` class registered for `name` (a `contract.backends` name)."""
    module, cls = RUNTIME_BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def check_engine_files(engine_dir: Path, config: dict) -> None:
    """The engine files of the config's role, checked by the backend they were built for (`load_engine_config`
    calls it once the config's backend is known to be one of `contract.backends`)."""
    backend_class(config["builder_config"]["backend"]).check_engines(engine_dir, config)


def open_backend(engine_dir: Path, config: dict, kv: KvLayout, constants: dict[str, np.ndarray]) -> Backend:
    """The backend the engine dir was built for (builder_config.backend); TensorRT is imported only for its dirs."""
    return backend_class(config["builder_config"]["backend"])(engine_dir, config, kv, constants)


def llm_inputs(embeds, context_lengths: np.ndarray, kvcache_start_index: np.ndarray,
               last_token_ids: np.ndarray) -> dict:
    """The LLM graph's inputs of one plain step by name, but the cache and the RoPE table (contracts.md 2)."""
    return {INPUTS_EMBEDS: embeds, CONTEXT_LENGTHS: context_lengths,
            KVCACHE_START_INDEX: kvcache_start_index, LAST_TOKEN_IDS: last_token_ids}


def causal_tree(starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(attention_mask, attention_pos_id) of an ordinary causal call (contracts.md 2.2): every earlier token
    visible, positions start + i; with them an EAGLE3 engine computes exactly what a vanilla one does."""
    return causal_mask(len(starts), seq_len), (starts[:, None] + np.arange(seq_len)[None, :]).astype(np.int32)


def tree_inputs(embeds: np.ndarray, context_lengths: np.ndarray, kvcache_start_index: np.ndarray,
                last_token_ids: np.ndarray, attention_mask: np.ndarray, attention_pos_id: np.ndarray, extra: dict,
                hidden_dtype) -> dict:
    """The graph inputs of one EAGLE3 tree call by name, but the cache and the RoPE table (contracts.md 2.2, 2.3):
    the plain inputs, the tree mask and positions, and `extra` hidden states in the backend's `hidden_dtype`."""
    inputs = llm_inputs(np.asarray(embeds).astype(np.float16, copy=False), context_lengths, kvcache_start_index,
                        last_token_ids)
    inputs.update({ATTENTION_MASK: attention_mask, ATTENTION_POS_ID: attention_pos_id})
    inputs.update({name: np.asarray(value, dtype=hidden_dtype) for name, value in extra.items()})
    return inputs


class Engine:
    """An engine directory opened for inference: `embed`, `new_cache`, `forward`, and `forward_tree` for the EAGLE3
    base and draft engines of a spec engine dir (`role`)."""

    def __init__(self, engine_dir: Path, config: dict):
        self.engine_dir = engine_dir
        self.config = config
        bc = config["builder_config"]
        self.role = config.get("engine_role", ROLE_LLM)
        self.tree = self.role != ROLE_LLM  # an EAGLE3 base or draft: tree inputs on every call
        # tokens per row of a tree call the build was sized for (the generation profile's; 1 for a vanilla engine)
        self.tree_size = int(bc.get("max_verify_tree_size") or bc.get("max_draft_tree_size") or 1)
        self.vocab_size = int(config["vocab_size"])
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.num_kv_heads = int(config["num_key_value_heads"])
        self.head_dim = head_dim(config)
        self.max_batch_size = int(bc["max_batch_size"])
        self.max_input_len = int(bc["max_input_len"])
        self.max_kv_cache_capacity = int(bc["max_kv_cache_capacity"])
        self.kv_cache_dtype = bc["kv_cache_dtype"]  # "fp16" | "fp8" (contract.kv.KvDtype values)
        eos = config.get("eos_token_id")
        self.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
        self.rope = rope_cos_sin(config, self.max_kv_cache_capacity)
        layout = KvLayout(self.num_layers, self.num_kv_heads, self.max_kv_cache_capacity, self.head_dim,
                          KvDtype(self.kv_cache_dtype))
        self.backend = open_backend(engine_dir, config, layout, {ROPE_COS_SIN: self.rope})

    @staticmethod
    def load(engine_dir: str | Path, role: str = ROLE_LLM) -> "Engine":
        """Validate ENG (InputError if it is not a complete engine dir of a known contract) and open the engine of
        `role` (the vanilla `llm`, or an EAGLE3 dir's `base` / `draft`) on the backend it was built for."""
        engine_dir = Path(engine_dir)
        return Engine(engine_dir, load_engine_config(engine_dir, role, check_engines=check_engine_files))

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """int32 [B,S] -> fp16 [B,S,H]; an id outside [0, vocab) is an InputError (a GPU kernel would give zeros)."""
        return self.backend.to_numpy(self.backend.embed(self._checked_ids(input_ids)))

    def _checked_ids(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids: expected an integer array [batch, seq_len], found {ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise InputError(f"input_ids: token id {int(ids[bad][0])} is outside the vocabulary [0, {self.vocab_size})")
        return ids.astype(np.int32, copy=False)

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache of `max_kv_cache_capacity` tokens per row, in the engine's KV dtype."""
        if not 1 <= batch <= self.max_batch_size:
            raise InputError(f"batch: expected 1..{self.max_batch_size} (the engine's max_batch_size), found {batch}")
        return KVCache(self.backend.new_kv(batch), np.zeros(batch, np.int32), self.max_kv_cache_capacity,
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
        if self.role == ROLE_DRAFT:
            raise InputError("forward: an EAGLE3 draft engine takes hidden states too; call forward_tree")
        if ids.ndim != 2:
            raise InputError(f"input_ids: expected [batch, seq_len], found shape {ids.shape}")
        self._check(cache, ids.shape, ctx, last)
        valid = np.arange(ids.shape[1])[None, :] < ctx[:, None]
        ids = self._checked_ids(np.where(valid, ids, 0))  # padding may hold any value; only real tokens are checked
        inputs = llm_inputs(self.backend.embed(ids), ctx, cache.lengths.copy(), last)
        if self.tree:  # a base engine decodes plainly with the causal mask
            mask, pos = causal_tree(cache.lengths, ids.shape[1])
            inputs.update({ATTENTION_MASK: mask, ATTENTION_POS_ID: pos})
        outputs = self.backend.run(cache.storage, inputs, (LOGITS,))
        logits = self.backend.to_numpy(outputs[LOGITS])
        cache.lengths += ctx
        return logits

    def forward_tree(self, cache: KVCache, embeds: np.ndarray, context_lengths: np.ndarray,
                     last_token_ids: np.ndarray, attention_mask: np.ndarray, attention_pos_id: np.ndarray,
                     extra: dict | None = None, outputs: tuple[str, ...] = (LOGITS,),
                     commit: bool = True) -> dict[str, np.ndarray]:
        """One call of an EAGLE3 base or draft engine: `embeds` fp16 `[B,S,H]` (looked up in the base's table) on
        top of `cache`, with the packed tree mask int32 `[B,S,W]` and positions int32 `[B,S]` (contracts.md 2.2),
        `extra` graph inputs (the draft's `hidden_states_input` / `hidden_states_from_draft`, `hidden_dtype`);
        returns `outputs` by name as numpy. Token i of row b is written to slot `cache.lengths[b] + i`;
        `commit=False` leaves the lengths as they were, so the next call overwrites those slots (draft proposals)."""
        if not self.tree:
            raise InputError(f"{self.engine_dir}: forward_tree needs an EAGLE3 base or draft engine, found a vanilla "
                             "engine")
        embeds = np.asarray(embeds)
        ctx = np.asarray(context_lengths, dtype=np.int32)
        last = np.asarray(last_token_ids, dtype=np.int64)
        if embeds.ndim != 3 or embeds.shape[2] != self.hidden_size:
            raise InputError(f"inputs_embeds: expected [batch, seq_len, {self.hidden_size}], found {embeds.shape}")
        batch, seq = embeds.shape[:2]
        self._check(cache, (batch, seq), ctx, last)
        mask = np.asarray(attention_mask, dtype=np.int32)
        pos = np.asarray(attention_pos_id, dtype=np.int32)
        if mask.ndim != 3 or mask.shape[:2] != (batch, seq) or mask.shape[2] < tree_mask_words(seq):
            raise InputError(f"attention_mask: expected int32 [{batch}, {seq}, >= {tree_mask_words(seq)}], "
                             f"found {mask.shape}")
        if pos.shape != (batch, seq) or (pos < 0).any() or (pos >= cache.capacity).any():
            raise InputError(f"attention_pos_id: expected [{batch}, {seq}] positions in [0, {cache.capacity}), "
                             f"found shape {pos.shape}")
        for name, value in (extra or {}).items():
            if np.ndim(value) != 3 or np.shape(value)[:2] != (batch, seq):
                raise InputError(f"{name}: expected [{batch}, {seq}, width], found {np.shape(value)}")
        inputs = tree_inputs(embeds, ctx, cache.lengths.copy(), last, mask, pos, extra or {}, self.backend.hidden_dtype)
        result = self.backend.run(cache.storage, inputs, outputs)
        if commit:
            cache.lengths += ctx
        return {name: self.backend.to_numpy(value) for name, value in result.items()}

    def _check(self, cache: KVCache, shape: tuple[int, int], ctx: np.ndarray, last: np.ndarray) -> None:
        batch, seq = shape
        if batch != cache.batch:
            raise InputError(f"input_ids: batch {batch} does not match the cache's batch {cache.batch}")
        if batch > self.max_batch_size:
            raise InputError(f"input_ids: batch {batch} exceeds the engine's max_batch_size {self.max_batch_size}")
        if seq > max(self.max_input_len, self.tree_size):
            raise InputError(f"input_ids: seq_len {seq} exceeds the engine's max_input_len {self.max_input_len}")
        if ctx.shape != (batch,) or (ctx < 0).any() or (ctx > seq).any():
            raise InputError(f"context_lengths: expected {batch} values in [0, {seq}], found {ctx.tolist()}")
        if last.ndim != 2 or last.shape[0] != batch or (last < 0).any() or (last >= seq).any():
            raise InputError(f"last_token_ids: expected int64 [{batch}, T] with values in [0, {seq}), "
                             f"found shape {last.shape}")
        most = self.backend.max_selected_positions
        if most is not None and seq > most:
            most = 1  # longer calls run in the context profile, which selects one position
        if most is not None and last.shape[1] > most:
            raise InputError(f"last_token_ids: expected at most {most} positions per row (the engine's profiles), "
                             f"found {last.shape[1]}")
        over = cache.lengths + ctx > cache.capacity
        if over.any():
            b = int(np.argmax(over))
            raise InputError(f"KV cache: row {b} would hold {int(cache.lengths[b] + ctx[b])} tokens, more than the "
                             f"capacity {cache.capacity} (max_kv_cache_capacity)")
        if self.backend.padded_call_needs_room:
            tight = (ctx > 0) & (cache.lengths + seq > cache.capacity)
            if tight.any():
                b = int(np.argmax(tight))
                raise InputError(f"KV cache: row {b} holds {int(cache.lengths[b])} tokens; a call padded to {seq} "
                                 f"tokens would pass the capacity {cache.capacity}; send that row in a shorter call")

    def read_kv(self, cache: KVCache, row: int, positions) -> object:
        """The K/V cached for `row` at `positions` as `[layers, 2, Hkv, n, D]` (0 = K, 1 = V), in the backend's own
        array (numpy on ONNX Runtime: float32 for an fp16 cache, FP8 as bytes; a GPU tensor on TensorRT)."""
        positions = np.asarray(positions, dtype=np.int64)
        self._check_row(cache, row)
        if positions.ndim != 1 or (positions < 0).any() or (positions >= cache.capacity).any():
            raise InputError(f"positions: expected indices in [0, {cache.capacity}), found {positions.tolist()}")
        return self.backend.read_kv(cache.storage, row, positions)

    def write_kv(self, cache: KVCache, row: int, start: int, values) -> None:
        """Write `values` (as `read_kv` returns them) into `row` at positions start..start+n, e.g. to move accepted
        tokens' K/V together; the row's length is the caller's to set."""
        self._check_row(cache, row)
        expected = (self.num_layers, 2, self.num_kv_heads, None, self.head_dim)
        shape = tuple(values.shape)
        if len(shape) != 5 or any(e not in (None, n) for e, n in zip(expected, shape)):
            raise InputError(f"values: expected [{self.num_layers}, 2, {self.num_kv_heads}, n, {self.head_dim}], "
                             f"found {list(shape)}")
        if not 0 <= start <= cache.capacity - shape[3]:
            raise InputError(f"start: expected {shape[3]} positions from start within the capacity {cache.capacity}, "
                             f"found start {start}")
        self.backend.write_kv(cache.storage, row, start, values)

    def _check_row(self, cache: KVCache, row: int) -> None:
        if not 0 <= row < cache.batch:
            raise InputError(f"row: expected 0..{cache.batch - 1}, found {row}")
