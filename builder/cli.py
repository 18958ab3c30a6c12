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
from contract.stage import KvDtype

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@contextmanager
def step(name: str):
    """Print a build stage and how long it took."""
    click.echo(f"[llm-build] {name} ...", err=True)
    t0 = time.perf_counter()
    yield
    click.echo(f"[llm-build] {name} done in {time.perf_counter() - t0:.1f} s", err=True)


def resolve_backend(backend: str) -> str:
    """`auto` = tensorrt when TensorRT imports and a GPU is visible, else onnxruntime."""
    from builder.tensorrt_backend import tensorrt_available

    if backend not in BACKENDS:
        raise InputError(f"--backend: expected one of {list(BACKENDS)}, found {backend!r}")
    if backend == "auto":
        return "tensorrt" if tensorrt_available() else "onnxruntime"
    if backend == "tensorrt" and not tensorrt_available():
        raise InputError("--backend tensorrt: expected the tensorrt package and a CUDA GPU, found them missing; "
                         "use --backend onnxruntime")
    return backend


def build(onnx_dir: str | Path, engine_dir: str | Path, *, max_batch_size: int = 4, max_input_len: int = 1024,
          max_kv_cache_capacity: int = 4096, backend: str = "auto") -> Path:
    """Build ENG from an ONNX dir; ENG appears only once complete (written to a temp sibling, then renamed)."""
    # onnx and torch are imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from builder.detect import detect
    from contract import engine_dir as engine_dir_mod
    from llm_loader.embedding import read_embedding_sidecar

    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    limits = Limits(max_batch_size, max_input_len, max_kv_cache_capacity)
    validate_limits(limits)
    backend = resolve_backend(backend)
    with step("detect"):
        found = detect(onnx_dir)
    click.echo(found.summary() + f"\nbackend         {backend}", err=True)
    dims = ModelDims(found.num_layers, found.hidden_size, found.num_kv_heads, found.head_dim, found.rotary_dim)
    if backend == "onnxruntime":
        from plugins.attention.ort_lowering import kv_io_form

        kv_io = kv_io_form(KvDtype(found.kv_cache_dtype), found.rotary_dim)
    else:
        kv_io = stage.KV_IN_PLACE  # the plugin's present output aliases its past input
    builder_config = engine_dir_mod.make_builder_config(
        backend=backend, max_batch_size=max_batch_size, max_input_len=max_input_len,
        max_kv_cache_capacity=max_kv_cache_capacity, kv_cache_dtype=found.kv_cache_dtype,
        embedding_format=found.embedding_format, weight_format=found.weight_format, kv_io=kv_io,
        weight_formats=found.weight_formats)
    with staged_dir(engine_dir, kind="engine dir", flag="--engineDir", inputs=[onnx_dir]) as out:
        sidecar = read_embedding_sidecar(onnx_dir / "embedding.safetensors")
        if backend == "onnxruntime":
            from builder import onnxruntime_backend as ort_backend

            with step("load model.onnx"):
                model = ort_backend.load_model(onnx_dir)
            with step("lower for onnxruntime"):
                model = ort_backend.lower_llm(model)
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
    click.echo(f"[llm-build] wrote {engine_dir}", err=True)
    return engine_dir


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-build --onnxDir out/llm --engineDir engines/smollm2 --maxBatchSize 2 --maxInputLen 512 "
    "--maxKVCacheCapacity 1024"))
@click.option("--onnxDir", "onnx_dir", required=True, type=click.Path(path_type=Path),
              help="ONNX dir written by llm-export / python -m llm_loader.export_all_cli (OUT/llm).")
@click.option("--engineDir", "engine_dir", required=True, type=click.Path(path_type=Path),
              help="Engine dir to write. An existing one is replaced (atomically) only when it is an earlier engine "
                   "dir of llm-build holding nothing else; any other existing directory is refused.")
@click.option("--maxBatchSize", "max_batch_size", default=4, show_default=True, type=int)
@click.option("--maxInputLen", "max_input_len", default=1024, show_default=True, type=int,
              help="Most new tokens per row in one call (prefill length).")
@click.option("--maxKVCacheCapacity", "max_kv_cache_capacity", default=4096, show_default=True, type=int,
              help="KV cache tokens per row (prompt + generated); also the RoPE table length.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto = tensorrt if TensorRT and a CUDA GPU are available, else onnxruntime.")
@click.option("--specBase", "spec_base", is_flag=True, help="EAGLE base engine (not implemented in this build).")
@click.option("--specDraft", "spec_draft", is_flag=True, help="EAGLE draft engine (not implemented in this build).")
def cli(onnx_dir, engine_dir, max_batch_size, max_input_len, max_kv_cache_capacity, backend, spec_base, spec_draft):
    """Build inference engines from an exported ONNX dir. FP8 embedding and FP8 KV cache are detected from the
    files; there are no precision flags."""
    if spec_base or spec_draft:
        flag = "--specBase" if spec_base else "--specDraft"
        raise InputError(f"{flag}: speculative-decoding engines are not implemented in this build; "
                         "only vanilla engines (spec_decode_type 'none')")
    build(onnx_dir, engine_dir, max_batch_size=max_batch_size, max_input_len=max_input_len,
          max_kv_cache_capacity=max_kv_cache_capacity, backend=backend)


def main(argv: list[str] | None = None) -> int:
    """`llm-build`; exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
