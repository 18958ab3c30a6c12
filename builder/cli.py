"""`llm-build`: ONNX dir -> engine dir, for ONNX Runtime (CPU) or TensorRT (GPU).

Detection decides precision (FP8 embedding, FP8 KV cache) from the files; flags only set limits and the backend.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from builder.profiles import Limits, ModelDims, validate_limits
from contract import stage
from contract.atomic import staged_dir
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.errors import InputError
from contract.stage import CPU_WEIGHTS, KvDtype

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@contextmanager
def step(name: str):
    """Print a build stage and how long it took."""
    click.echo(f"[llm-build] {name} ...", err=True)
    t0 = time.perf_counter()
    yield
    click.echo(f"[llm-build] {name} done in {time.perf_counter() - t0:.1f} s", err=True)


def resolve_backend(backend: str) -> tuple[str, str]:
    """(backend, why it was chosen): `auto` = tensorrt when TensorRT imports and a GPU is visible, else onnxruntime."""
    from builder.tensorrt_backend import tensorrt_missing

    if backend not in BACKENDS:
        raise InputError(f"--backend: expected one of {list(BACKENDS)}, found {backend!r}")
    missing = tensorrt_missing() if backend in ("auto", "tensorrt") else None
    if backend == "auto":
        return ("onnxruntime", f"auto: {missing}") if missing else ("tensorrt", "auto: TensorRT and a CUDA GPU found")
    if backend == "tensorrt" and missing:
        raise InputError(f"--backend tensorrt: expected the tensorrt package and a CUDA GPU, found that {missing}; "
                         "use --backend onnxruntime")
    return backend, f"--backend {backend}"


def build(onnx_dir: str | Path, engine_dir: str | Path, *, max_batch_size: int = 4, max_input_len: int = 1024,
          max_kv_cache_capacity: int = 4096, backend: str = "auto", cpu_weights: str | None = None) -> Path:
    """Build ENG from an ONNX dir; ENG appears only once complete (written to a temp sibling, then renamed).

    `cpu_weights` (onnxruntime only): "fp32" (default) dequantizes a quantized model's weights once at build, for
    decode as fast as the fp16 engine; "quantized" keeps them FP8/FP4 at rest (low memory, slow decode)."""
    # onnx and torch are imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from builder import summary
    from builder.detect import detect
    from contract import engine_dir as engine_dir_mod
    from llm_loader.embedding import read_embedding_sidecar

    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    limits = Limits(max_batch_size, max_input_len, max_kv_cache_capacity)
    validate_limits(limits)
    if cpu_weights is not None and cpu_weights not in stage.CPU_WEIGHTS:
        raise InputError(f"--cpuWeights: expected one of {list(stage.CPU_WEIGHTS)}, found {cpu_weights!r}")
    backend, why = resolve_backend(backend)
    if cpu_weights is not None and backend != "onnxruntime":
        raise InputError(f"--cpuWeights {cpu_weights}: expected --backend onnxruntime with it, found {backend} "
                         f"({why}); TensorRT runs FP8/FP4 weights natively")
    with step("detect"):
        found = detect(onnx_dir)
    click.echo("\n".join([found.summary(), summary.backend_line(backend, why), summary.profile_line(limits),
                          summary.compute_line(found, backend)]), err=True)
    dims = ModelDims(found.num_layers, found.hidden_size, found.num_kv_heads, found.head_dim, found.rotary_dim)
    if backend == "onnxruntime":
        from builder.onnxruntime_backend import weight_storage
        from plugins.attention.ort_lowering import kv_io_form

        kv_io = kv_io_form(KvDtype(found.kv_cache_dtype), found.rotary_dim)
        storage = weight_storage(found.weight_format, cpu_weights or stage.WEIGHTS_FP32)
    else:
        kv_io = stage.KV_IN_PLACE  # the plugin's present output aliases its past input
        storage = stage.WEIGHTS_FP16 if found.weight_format == "fp16" else stage.WEIGHTS_QUANTIZED
    builder_config = engine_dir_mod.make_builder_config(
        backend=backend, max_batch_size=max_batch_size, max_input_len=max_input_len,
        max_kv_cache_capacity=max_kv_cache_capacity, kv_cache_dtype=found.kv_cache_dtype,
        embedding_format=found.embedding_format, weight_format=found.weight_format, kv_io=kv_io,
        weight_storage=storage)
    with staged_dir(engine_dir) as out:
        sidecar = read_embedding_sidecar(onnx_dir / "embedding.safetensors")
        if backend == "onnxruntime":
            from builder import onnxruntime_backend as ort_backend

            with step("load model.onnx"):
                model = ort_backend.load_model(onnx_dir)
            lowering = "lower for onnxruntime" + (", dequantize the weights" if storage == stage.WEIGHTS_FP32 else "")
            with step(lowering):
                model = ort_backend.lower_llm(model, storage)
            weight_bytes = ort_backend.session_weight_bytes(model)
            with step("save llm.onnx"):
                ort_backend.save_with_external_data(model, out / "llm.onnx")
            del model
            with step("embedding.onnx"):
                ort_backend.build_embedding(sidecar, out)
        else:
            from builder import tensorrt_backend as trt_backend

            with step("build llm.engine"):
                trt_backend.build_llm(onnx_dir, out, limits, dims)
            with step("build embedding.engine"):
                trt_backend.build_embedding(sidecar, out, limits)
        with step("config + copies"):
            engine_dir_mod.write_config_and_copies(onnx_dir, out, found.config, builder_config)
    lines = [summary.weights_line(found.weight_format, storage)]
    if backend == "onnxruntime":
        lines.append(summary.memory_line(weight_bytes, summary.kv_cache_bytes(found, limits, backend),
                                         summary.embedding_bytes(sidecar), limits))
    click.echo("\n".join(lines) + f"\n[llm-build] wrote {engine_dir}", err=True)
    return engine_dir


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-build --onnxDir out/llm --engineDir engines/smollm2 --maxBatchSize 2 --maxInputLen 512 "
    "--maxKVCacheCapacity 1024"))
@click.option("--onnxDir", "onnx_dir", required=True, type=click.Path(path_type=Path),
              help="ONNX dir written by llm-export / python -m llm_loader.export_all_cli (OUT/llm).")
@click.option("--engineDir", "engine_dir", required=True, type=click.Path(path_type=Path),
              help="Engine dir to write (replaced atomically if it exists).")
@click.option("--maxBatchSize", "max_batch_size", default=4, show_default=True, type=int)
@click.option("--maxInputLen", "max_input_len", default=1024, show_default=True, type=int,
              help="Most new tokens per row in one call (prefill length).")
@click.option("--maxKVCacheCapacity", "max_kv_cache_capacity", default=4096, show_default=True, type=int,
              help="KV cache tokens per row (prompt + generated); also the RoPE table length.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto = tensorrt if TensorRT and a CUDA GPU are available, else onnxruntime.")
@click.option("--cpuWeights", "cpu_weights", type=click.Choice(CPU_WEIGHTS), default=None,
              help="onnxruntime only, quantized models: fp32 (default) dequantizes the weights once at build, so "
                   "decode is as fast as the fp16 engine; quantized keeps them FP8/FP4 at rest and dequantizes them at "
                   "every step (less memory, much slower decode).")
@click.option("--specBase", "spec_base", is_flag=True, help="EAGLE base engine (not implemented in this build).")
@click.option("--specDraft", "spec_draft", is_flag=True, help="EAGLE draft engine (not implemented in this build).")
def cli(onnx_dir, engine_dir, max_batch_size, max_input_len, max_kv_cache_capacity, backend, cpu_weights, spec_base,
        spec_draft):
    """Build inference engines from an exported ONNX dir. FP8 embedding and FP8 KV cache are detected from the
    files; there are no precision flags."""
    if spec_base or spec_draft:
        flag = "--specBase" if spec_base else "--specDraft"
        raise InputError(f"{flag}: speculative-decoding engines are not implemented in this build; "
                         "only vanilla engines (spec_decode_type 'none')")
    build(onnx_dir, engine_dir, max_batch_size=max_batch_size, max_input_len=max_input_len,
          max_kv_cache_capacity=max_kv_cache_capacity, backend=backend, cpu_weights=cpu_weights)


def main(argv: list[str] | None = None) -> int:
    """`llm-build`; exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
