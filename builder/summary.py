"""What `llm-build` tells the user about the engine it builds, as pure functions of what it decided, and its steps.

Before the build: the backend and why it was chosen, the profile (batch, tokens per call, KV capacity) and the
precision the engine computes in (the backend's `compute_line`). During it: each step and how long it took (`step`).
After it: what the weights are held in at rest and an estimate of the resident memory a run at the profile's limits
needs (benchmarks/engine_memory.py measures it against real runs).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from builder.profiles import Limits
from contract.kv import KvDtype
from contract.weight_formats import WEIGHTS_FP16, WEIGHTS_FP32

if TYPE_CHECKING:  # (builder.detect imports onnx: not for llm-build --help)
    from builder.detect import Detection

MIB = 2**20


@contextmanager
def step(name: str):
    """Print a build stage and how long it took."""
    click.echo(f"[llm-build] {name} ...", err=True)
    t0 = time.perf_counter()
    yield
    click.echo(f"[llm-build] {name} done in {time.perf_counter() - t0:.1f} s", err=True)


def backend_line(backend: str, reason: str) -> str:
    return f"backend         {backend} ({reason})"


def profile_line(limits: Limits) -> str:
    return (f"profile         batch 1..{limits.max_batch_size}, 1..{limits.max_input_len} new tokens per call, "
            f"KV cache {limits.max_kv_cache_capacity} tokens per row")


def kv_cache_bytes(found: Detection, limits: Limits) -> int:
    """The CPU engine's KV cache at the profile's limits (it holds an fp16 cache in fp32: `KvDtype.numpy`)."""
    itemsize = KvDtype(found.kv_cache_dtype).numpy.itemsize
    return (limits.max_batch_size * found.num_layers * 2 * found.num_kv_heads * limits.max_kv_cache_capacity
            * found.head_dim * itemsize)


def embedding_bytes(sidecar) -> int:
    """The embedding engine's table (FP8 stays FP8 in memory) and its scales."""
    return sidecar.table.nbytes + (0 if sidecar.scale is None else sidecar.scale.nbytes)


def weights_line(weight_format: str, storage: str) -> str:
    """Which form of the weights the engine holds, and what the other form would trade."""
    if storage == WEIGHTS_FP16:
        return "weights         fp16 at rest (ONNX Runtime widens them to fp32 when the engine loads)"
    if storage == WEIGHTS_FP32:
        return (f"weights         fp32 at rest: the {weight_format} weights dequantized once at build (fast form; "
                "--cpuWeights quantized keeps them FP8/FP4 at rest: less memory, much slower decode)")
    return (f"weights         {weight_format} at rest, dequantized at every step (low-memory form, --cpuWeights "
            "quantized; the default --cpuWeights fp32 decodes as fast as the fp16 engine)")


def memory_line(weight_bytes: int, kv_bytes: int, embedding_bytes: int, limits: Limits) -> str:
    """An estimate from the bytes alone (the interpreter and ONNX Runtime itself come on top, ~100 MiB)."""
    total = weight_bytes + kv_bytes + embedding_bytes
    return (f"resident memory about {total / MIB:.0f} MiB: weights {weight_bytes / MIB:.0f} MiB, KV cache "
            f"{kv_bytes / MIB:.0f} MiB ({limits.max_batch_size} row{'s' * (limits.max_batch_size != 1)} x "
            f"{limits.max_kv_cache_capacity} tokens), "
            f"embedding table {embedding_bytes / MIB:.0f} MiB")
