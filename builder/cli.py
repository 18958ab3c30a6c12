"""`llm-build`: ONNX dir -> engine dir, for ONNX Runtime (CPU) or TensorRT (GPU).

Detection decides precision (FP8 embedding, FP8 KV cache) and the EAGLE3 role from the files; flags only set limits,
the backend, and confirm the role (`--specBase` / `--specDraft`, as the reference requires). An EAGLE3 base and its
draft are built by two calls into one engine dir (contracts.md 5.2): each call replaces its own role's files and
keeps the other's, after checking that the two belong together.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from builder.profiles import Limits, ModelDims, validate_limits, validate_tree_size
from builder.summary import step
from contract.atomic import staged_dir
from contract.backends import AUTO, BACKENDS, ONNXRUNTIME, TENSORRT
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.eagle3 import DEFAULT_TREE_SIZE, ROLE_BASE, ROLE_DRAFT, ROLE_LLM
from contract.errors import InputError
from contract.paths import checked_file
from contract.weight_formats import CPU_WEIGHTS

BACKEND_CHOICES = (AUTO, *BACKENDS)


def resolve_backend(backend: str) -> tuple[str, str]:
    """(backend, why it was chosen): `auto` = tensorrt when TensorRT imports and a GPU is visible, else onnxruntime."""
    from builder.backends import build_backend

    if backend not in BACKEND_CHOICES:
        raise InputError(f"--backend: expected one of {list(BACKEND_CHOICES)}, found {backend!r}")
    if backend == AUTO:
        missing = build_backend(TENSORRT).missing()
        return (ONNXRUNTIME, f"auto: {missing}") if missing else (TENSORRT, "auto: TensorRT and a CUDA GPU found")
    missing = build_backend(backend).missing()
    if missing:
        raise InputError(f"--backend {backend}: expected {build_backend(backend).requires}, found that {missing}; "
                         "use --backend onnxruntime")
    return backend, f"--backend {backend}"


def check_role(found, spec_base: bool, spec_draft: bool) -> str:
    """The role flags must name the role the ONNX dir's config.json and graph say (reference 3.1)."""
    if spec_base and spec_draft:
        raise InputError("--specBase / --specDraft: expected at most one of them, found both")
    asked = ROLE_BASE if spec_base else ROLE_DRAFT if spec_draft else ROLE_LLM
    if asked != found.engine_role:
        flag = {ROLE_LLM: "no --specBase/--specDraft", ROLE_BASE: "--specBase", ROLE_DRAFT: "--specDraft"}
        raise InputError(f"{found.onnx_dir}/config.json engine_role: the build was asked for {flag[asked]} "
                         f"({asked!r}), found {found.engine_role!r}; build it with {flag[found.engine_role]}")
    return asked


def other_spec_side(engine_dir: Path, role: str, found, backend: str) -> dict | None:
    """The config of the other EAGLE3 role already in ENG (None when there is none), checked against this build
    (`found`: the ONNX dir's `builder.detect.Detection`); a vanilla engine there is refused rather than mixed with
    a spec engine."""
    from builder.backends import check_engine_files
    from contract import engine_dir as engine_dir_mod

    if role == ROLE_LLM or not engine_dir.exists():
        return None
    if (engine_dir / engine_dir_mod.CONFIG_FILES[ROLE_LLM]).exists():
        raise InputError(f"--engineDir {engine_dir}: expected an empty dir or an EAGLE3 engine dir, found a vanilla "
                         "engine (config.json); build the spec engines into another dir")
    other = ROLE_DRAFT if role == ROLE_BASE else ROLE_BASE
    if other not in engine_dir_mod.spec_roles(engine_dir):
        return None
    # complete, inside ENG, and checked, its engine files by their backend
    config = engine_dir_mod.load_engine_config(engine_dir, other, check_engines=check_engine_files)
    mine = {**found.config, "builder_config": {"backend": backend}}
    base, draft = (mine, config) if role == ROLE_BASE else (config, mine)
    engine_dir_mod.check_spec_pair(base, draft, f"{engine_dir} ({other} engine there) and --onnxDir {found.onnx_dir}")
    return config


def keep_other_side(engine_dir: Path, out: Path, role: str) -> None:
    """Hard-link (or copy) the other role's files from ENG into the staged dir, so replacing ENG keeps them."""
    from contract import engine_dir as engine_dir_mod

    if role == ROLE_LLM or not engine_dir.is_dir():
        return
    other = ROLE_DRAFT if role == ROLE_BASE else ROLE_BASE
    for name in sorted(engine_dir_mod.role_files(other)):
        source = checked_file(engine_dir, name, f"a file of the EAGLE3 {other} engine", required=False)
        if source is not None:
            try:
                os.link(source, out / name)
            except OSError:
                shutil.copy2(source, out / name)


def build(onnx_dir: str | Path, engine_dir: str | Path, *, max_batch_size: int = 4, max_input_len: int = 1024,
          max_kv_cache_capacity: int = 4096, backend: str = "auto", spec_base: bool = False, spec_draft: bool = False,
          max_verify_tree_size: int = DEFAULT_TREE_SIZE, max_draft_tree_size: int = DEFAULT_TREE_SIZE,
          cpu_weights: str | None = None) -> Path:
    """Build ENG from an ONNX dir; ENG appears only once complete (written to a temp sibling, then renamed). An
    EAGLE3 base or draft build keeps the other role's engine already in ENG.

    `cpu_weights` (onnxruntime only): "fp32" (default) dequantizes a quantized model's weights once at build, for
    decode as fast as the fp16 engine; "quantized" keeps them FP8/FP4 at rest (low memory, slow decode)."""
    # onnx and torch are imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from builder import summary as summary_lines
    from builder.backends import LlmBuild, build_backend
    from builder.detect import detect
    from contract import engine_dir as engine_dir_mod
    from contract.embedding import read_embedding_sidecar

    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    limits = Limits(max_batch_size, max_input_len, max_kv_cache_capacity)
    validate_limits(limits)
    if cpu_weights is not None and cpu_weights not in CPU_WEIGHTS:
        raise InputError(f"--cpuWeights: expected one of {list(CPU_WEIGHTS)}, found {cpu_weights!r}")
    backend, why = resolve_backend(backend)
    chosen = build_backend(backend)
    chosen.check_flags(cpu_weights, why)
    with step("detect"):
        found = detect(onnx_dir)
    role = check_role(found, spec_base, spec_draft)
    tree_size = {ROLE_LLM: None, ROLE_BASE: max_verify_tree_size, ROLE_DRAFT: max_draft_tree_size}[role]
    if tree_size is not None:
        validate_tree_size("--maxVerifyTreeSize" if role == ROLE_BASE else "--maxDraftTreeSize", tree_size, limits)
    other = other_spec_side(engine_dir, role, found, backend)
    summary = "\n".join([found.summary(), summary_lines.backend_line(backend, why), summary_lines.profile_line(limits),
                         chosen.compute_line(found)])
    if tree_size is not None:
        summary += f"\ntree size       {tree_size} tokens per generation call ({'verify' if role == ROLE_BASE else 'draft'})"
        summary += f"\nengine dir      {'adds to the ' + ('draft' if role == ROLE_BASE else 'base') + ' already there' if other else 'new'}"
    click.echo(summary, err=True)
    dims = ModelDims(found.num_layers, found.hidden_size, found.num_kv_heads, found.head_dim, found.rotary_dim,
                     tree=role != ROLE_LLM, draft_hidden_input=found.config.get("base_model_hidden_size")
                     if role == ROLE_DRAFT else None)
    storage = chosen.weight_storage(found.weight_format, cpu_weights)
    builder_config = engine_dir_mod.make_builder_config(
        backend=backend, max_batch_size=max_batch_size, max_input_len=max_input_len,
        max_kv_cache_capacity=max_kv_cache_capacity, kv_cache_dtype=found.kv_cache_dtype,
        embedding_format=found.embedding_format, weight_format=found.weight_format, kv_io=chosen.kv_io(found),
        weight_storage=storage, role=role, tree_size=tree_size, weight_formats=found.weight_formats)
    llm_file, *embedding_file = engine_dir_mod.engine_files(role, backend)
    with staged_dir(engine_dir, kind="engine dir", flag="--engineDir", inputs=[onnx_dir]) as out:
        keep_other_side(engine_dir, out, role)
        sidecar = read_embedding_sidecar(onnx_dir / "embedding.safetensors") if embedding_file else None
        weight_bytes = chosen.build_llm(LlmBuild(onnx_dir, out / llm_file, limits, dims, tree_size or 1, storage))
        if sidecar is not None:
            chosen.build_embedding(sidecar, out, limits)
        with step("config + copies"):
            engine_dir_mod.write_config_and_copies(onnx_dir, out, found.config, builder_config, role)
    lines = [summary_lines.weights_line(found.weight_format, storage)]
    if weight_bytes is not None:  # the backend knows what its weights take in memory: estimate the whole run's
        embedding = summary_lines.embedding_bytes(sidecar) if sidecar is not None else 0
        lines.append(summary_lines.memory_line(weight_bytes, summary_lines.kv_cache_bytes(found, limits),
                                               embedding, limits))
    click.echo("\n".join(lines) + f"\n[llm-build] wrote {engine_dir}", err=True)
    return engine_dir


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-build --onnxDir out/llm --engineDir engines/smollm2 --maxBatchSize 2 --maxInputLen 512 "
    "--maxKVCacheCapacity 1024",
    "llm-build --onnxDir base/llm --engineDir engines/eagle --specBase --maxVerifyTreeSize 16   # EAGLE3 base",
    "llm-build --onnxDir draft/llm --engineDir engines/eagle --specDraft --maxDraftTreeSize 16  # its draft"))
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
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="auto = tensorrt if TensorRT and a CUDA GPU are available, else onnxruntime.")
@click.option("--cpuWeights", "cpu_weights", type=click.Choice(CPU_WEIGHTS), default=None,
              help="onnxruntime only, quantized models: fp32 (default) dequantizes the weights once at build, so "
                   "decode is as fast as the fp16 engine; quantized keeps them FP8/FP4 at rest and dequantizes them at "
                   "every step (less memory, much slower decode).")
@click.option("--specBase", "--eagleBase", "spec_base", is_flag=True,
              help="Build the EAGLE3 base engine (the ONNX dir's engine_role must be 'base'); it joins a draft "
              "already built into --engineDir.")
@click.option("--specDraft", "--eagleDraft", "spec_draft", is_flag=True,
              help="Build the EAGLE3 draft engine (engine_role 'draft') into the base's --engineDir.")
@click.option("--maxVerifyTreeSize", "max_verify_tree_size", default=DEFAULT_TREE_SIZE, show_default=True,
              type=int, help="--specBase: most tree tokens per verification call (generation profile).")
@click.option("--maxDraftTreeSize", "max_draft_tree_size", default=DEFAULT_TREE_SIZE, show_default=True,
              type=int, help="--specDraft: most tree tokens per draft call (generation profile).")
def cli(onnx_dir, engine_dir, max_batch_size, max_input_len, max_kv_cache_capacity, backend, cpu_weights, spec_base,
        spec_draft, max_verify_tree_size, max_draft_tree_size):
    """Build inference engines from an exported ONNX dir. FP8 embedding, FP8 KV cache and the EAGLE3 role are
    detected from the files; there are no precision flags."""
    build(onnx_dir, engine_dir, max_batch_size=max_batch_size, max_input_len=max_input_len,
          max_kv_cache_capacity=max_kv_cache_capacity, backend=backend, spec_base=spec_base, spec_draft=spec_draft,
          max_verify_tree_size=max_verify_tree_size, max_draft_tree_size=max_draft_tree_size, cpu_weights=cpu_weights)


def main(argv: list[str] | None = None) -> int:
    """`llm-build`; exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
