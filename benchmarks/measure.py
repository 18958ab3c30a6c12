"""What the GPU benchmarks share: one timing method, the rows they emit, and the Markdown they print.

Timing (`time_us`): the calls of one measurement, each on its own input set, are captured once in a CUDA graph and
the graph is replayed under `triton.testing.do_bench` (median; do_bench overwrites a 256 MB buffer before every
replay, so the L2 holds none of the inputs). The graph removes the Python launch overhead of the Triton kernels,
which is larger than a short decode or gather kernel itself; the separate input sets keep one call from reading
what the previous one left in L2. A library call that refuses graph capture is timed eagerly instead, and the row
says so. Without a GPU (`--dry-run`, kernels on the Triton interpreter) the host clock times one pass: the numbers
only prove the plumbing.

    python -m benchmarks.measure [--json FILE]   # this machine's GPU, driver and library versions as JSON
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
import torch

ROTATE_BYTES = 512 * 2**20  # input sets of one measurement together: several times the L2 of an H100/H200
MAX_SETS = 8
WARMUP_MS, REP_MS = 10, 50


def require_device(dry_run: bool) -> torch.device:
    """The device the benchmark runs on: the GPU, or the CPU (Triton interpreter) for a dry run."""
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                raise click.ClickException("--dry-run needs TRITON_INTERPRET=1 before triton is imported")
            os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    if not torch.cuda.is_available():
        click.echo("error: this benchmark needs a CUDA GPU (FP8 kernels need SM89 or newer); none is available here "
                   "(--dry-run runs it on the Triton CPU interpreter)", err=True)
        sys.exit(2)
    return torch.device("cuda")


def input_sets(bytes_per_set: int, device: torch.device) -> int:
    """How many distinct input sets one measurement rotates through (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_SETS, ROTATE_BYTES // max(1, bytes_per_set)))


def time_us(calls: list[Callable[[], object]], device: torch.device, rep_ms: int = REP_MS,
            graph: bool = True) -> tuple[float, str]:
    """(median microseconds of one call, how it was timed: "graph", "eager" or "host")."""
    if device.type != "cuda":
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls), "host"
    import triton.testing

    for call in calls:  # JIT compilation and first-touch work stay outside the capture
        call()
    torch.cuda.synchronize()

    def run_eagerly():
        for call in calls:
            call()

    run, mode, captured = run_eagerly, "eager", None
    if graph:
        try:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                run_eagerly()
            run, mode = captured.replay, "graph"
        except Exception:  # noqa: BLE001 - a call that cannot be captured is still worth an eager number
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=WARMUP_MS, rep=rep_ms, return_mode="median")
    del captured  # frees the graph's memory pool before the next measurement
    return ms * 1000.0 / len(calls), mode


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32 (NaN anywhere gives NaN)."""
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def emit(rows_path: Path | None, kind: str, row: dict) -> None:
    """Print one measured row and append it to `rows_path` (JSON lines), so a phase killed at its time limit keeps
    every row it finished."""
    click.echo(f"[{kind}] " + " ".join(f"{k}={fmt(v)}" for k, v in row.items()))
    if rows_path is not None:
        with open(rows_path, "a") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")


def read_rows(rows_path: Path) -> list[dict]:
    if not rows_path.exists():
        return []
    rows = []
    for line in rows_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a phase killed while writing
            pass
    return rows


def fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 0.01 and v else f"{v:.2f}"
    return "-" if v is None else str(v)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nvidia_smi() -> dict:
    """GPU name, driver and clocks as nvidia-smi reports them (without creating a CUDA context)."""
    info = {}
    for fields in (["name", "driver_version", "memory.total"], ["clocks.sm", "clocks.max.sm", "clocks.mem"]):
        try:  # two queries: a field this nvidia-smi does not know cannot cost the name and the driver
            out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            info.setdefault("nvidia_smi", f"unavailable: {e}")
            continue
        first = out.strip().splitlines()[0] if out.strip() else ""
        info.update(zip([f.replace(".", "_") for f in fields], (v.strip() for v in first.split(","))))
    return info


def versions() -> dict:
    return dict(python=platform.python_version(), torch=package_version("torch"), triton=package_version("triton"),
                onnx=package_version("onnx"), onnxruntime=package_version("onnxruntime"),
                numpy=package_version("numpy"))


def cuda_info() -> dict:
    """What torch sees: the device, its compute capability, SMs, memory and L2 (creates a CUDA context)."""
    info = dict(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_mib=getattr(p, "L2_cache_size", 0) / 2**20,
                    fp8_supported=(p.major, p.minor) >= (8, 9))
    return info


@click.command()
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="also write the JSON here")
def main(json_path: Path | None) -> None:
    """Print this machine's GPU, driver and library versions as JSON."""
    info = {**nvidia_smi(), **versions(), **cuda_info()}
    click.echo(json.dumps(info, indent=1))
    if json_path is not None:
        json_path.write_text(json.dumps(info))


if __name__ == "__main__":
    main()
