"""What the Triton kernels compile to on Hopper (sm_90), measured without a GPU: registers and spills per thread,
shared memory per program, and the tensor-core instructions, for each kernel at the tiles and warp counts it
launches with. Triton's own compiler and cuobjdump (shipped in the triton wheel) do the work.

    python -m benchmarks.kernel_resources [--rows FILE.jsonl]

A kernel that spills, or an FP8 prefill that does not reach the e4m3 wgmma instructions, cannot be fast whatever the
GPU; `tests/test_triton_kernels.py` checks both on every run.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import click

from benchmarks.measure import emit, markdown

F8 = "fp8e4nv"
COLUMNS = ["kernel", "warps", "registers", "spill_bytes", "shared_kib", "tensor_cores"]


def hopper_kernels() -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, signature, constexprs, launch options) at the benchmark's shapes (Qwen3-8B heads; a d-64
    model); the options are the launch's warps and FMA contraction."""
    from plugins.attention import triton_kernels as A
    from plugins.fp8_gather import triton_kernels as G

    def rope(t):
        return dict(qkv_ptr="*fp16", cache_ptr=f"*{t}", q_out_ptr=f"*{t}", ctx_ptr="*i32", start_ptr="*i32",
                    cos_sin_ptr="*fp32", q_gamma_ptr="*fp16", k_gamma_ptr="*fp16", pos_id_ptr="*i32", S="i32",
                    T="i32", q_scale="fp32", k_scale="fp32", v_scale="fp32", eps="fp32")

    def prefill(t):
        return dict(q_ptr=f"*{t}", cache_ptr=f"*{t}", out_ptr="*fp16", ctx_ptr="*i32", start_ptr="*i32",
                    mask_ptr="*i32", S="i32", T="i32", W="i32", qk_scale="fp32", out_scale="fp32")

    def decode(t):
        return dict(q_ptr=f"*{t}", cache_ptr=f"*{t}", part_o_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32",
                    ctx_ptr="*i32", start_ptr="*i32", T="i32", CHUNK="i32", qk_scale="fp32")

    name = {F8: "fp8", "fp16": "fp16"}
    kernels = []
    for t in (F8, "fp16"):
        kernels.append((f"rope_kv_write {name[t]} d128 qk-norm", A._rope_kv_write_kernel, rope(t),
                        dict(HQ=32, HKV=8, D=128, BLOCK_D=128, ROT=128, QK_NORM=True, FP8=t == F8, TREE=False),
                        launch(4, False)))
        for d in (128, 64):  # prefill_attention on a GPU: BLOCK_M 128, BLOCK_N 64, 8 warps
            kernels.append((f"prefill {name[t]} d{d}", A._prefill_kernel, prefill(t),
                            dict(HQ=32, HKV=8, D=d, BLOCK_M=128, BLOCK_N=64, TREE=False), launch(8)))
            kernels.append((f"decode {name[t]} d{d}", A._decode_kernel, decode(t),
                            dict(HQ=32, HKV=8, D=d, NUM_SPLITS=16, BLOCK_G=16, BLOCK_N=64), launch(4)))
        # EAGLE3 tree calls (verification, draft proposals, a prefill through a spec engine): 64 x 32 tiles
        kernels.append((f"prefill {name[t]} d128 tree", A._prefill_kernel, prefill(t),
                        dict(HQ=32, HKV=8, D=128, BLOCK_M=64, BLOCK_N=32, TREE=True), launch(4)))
    kernels.append(("decode reduce d128", A._decode_reduce_kernel,
                    dict(part_o_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32", out_ptr="*fp16", ctx_ptr="*i32",
                         out_scale="fp32"), dict(HQ=32, D=128, NUM_SPLITS=16, BLOCK_S=16), launch(4)))
    kernels.append(("fp8_gather h4096", G._fp8_gather_kernel,
                    dict(table_ptr=f"*{F8}", scale_ptr="*fp32", ids_ptr="*i32", out_ptr="*fp16", V="i32", H="i32",
                         NUM_BLOCKS="i32"), dict(BLOCK=128, BLOCK_H=4096), launch(8, False)))
    return kernels


def launch(num_warps: int, fp_fusion: bool = True) -> dict:
    """A kernel's launch options as `plugins/*/triton_kernels.py` pass them."""
    return dict(num_warps=num_warps, enable_fp_fusion=fp_fusion)


def compile_for_hopper(fn, signature: dict, constexprs: dict, options: dict):
    """`fn` compiled for sm_90 the way the JIT compiles it for real buffers: pointer arguments known 16-byte aligned
    (torch and TensorRT allocations are), which is what lets Triton vectorize the tile loads. Without that hint the
    d-128 prefill spills hundreds of bytes per thread, so a compile check without it measures the wrong kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*")}
    source = triton.compiler.ASTSource(fn=fn, signature={**signature, **{name: "constexpr" for name in constexprs}},
                                       constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_stages=3, **options))


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the one kernel in `cubin`; stack in these call-free kernels
    is spilled registers."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(registers), int(stack)


def tensor_core_instructions(ptx: str) -> list[str]:
    """The distinct wgmma / mma shapes and types in `ptx` (e.g. `wgmma m64n64k32 e4m3.e4m3`)."""
    found = re.findall(r"\b(wgmma)\.mma_async\.sync\.aligned\.(\w+)\.\w+\.(\w+\.\w+)", ptx)
    found += re.findall(r"\b(mma)\.sync\.aligned\.(\w+)\.row\.col\.\w+\.(\w+\.\w+)", ptx)
    return sorted({" ".join(parts) for parts in found})


@click.command()
@click.option("--rows", "rows_path", type=click.Path(path_type=Path), default=None,
              help="also append every kernel's row as a JSON line here")
def main(rows_path: Path | None) -> None:
    """Compile every kernel for sm_90 (no GPU needed) and print its registers, spills, shared memory and MMA ops."""
    import triton

    rows = []
    for label, fn, signature, constexprs, options in hopper_kernels():
        kernel = compile_for_hopper(fn, signature, constexprs, options)
        registers, stack = registers_and_stack(kernel.asm["cubin"])
        rows.append(dict(kernel=label, warps=options["num_warps"], registers=registers, spill_bytes=stack,
                         shared_kib=kernel.metadata.shared / 1024,
                         tensor_cores=", ".join(tensor_core_instructions(kernel.asm["ptx"])) or "-",
                         triton=triton.__version__))
        emit(rows_path, "compile", rows[-1])
    click.echo("\n" + markdown(rows, COLUMNS))


if __name__ == "__main__":
    main()
