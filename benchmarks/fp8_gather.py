"""FP8 embedding gather bandwidth against what the GPU's memory can do.

Bytes moved per call: per token H FP8 codes + ceil(H/128) fp32 scales read, 2H bytes written. The reference
bandwidth is a 1 GiB device-to-device copy measured in the same process (read + write), so the ratio is "fraction of
achievable". Every token count is first checked bit for bit against the torch reference. Timing: CUDA graph replay
under `triton.testing.do_bench`, cold L2 (benchmarks/measure.py). Prints a Markdown table and writes JSON.

    python -m benchmarks.fp8_gather [--out benchmarks/results/fp8_gather.json] [--rows FILE.jsonl] [--dry-run]
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import click
import torch

from benchmarks.measure import (
    REP_MS,
    emit,
    input_sets,
    markdown,
    require_device,
    time_us,
)

TOKENS = (4096, 1, 16, 128, 512, 1024, 8192)  # the target first
TARGET_TOKENS, TARGET_FRACTION = 4096, 0.7
VOCAB, HIDDEN = 151936, 4096  # Qwen3 vocabulary, Qwen3-8B hidden size
DRY = dict(tokens=(16, 1), vocab=256, hidden=4096, copy_bytes=2**24)
COLUMNS = ["tokens", "hidden", "us", "gbps", "fraction_of_copy", "exact", "timing"]


def copy_bandwidth_gbps(nbytes: int, device: torch.device, rep_ms: int) -> float:
    """Read + write GB/s of a device-to-device copy of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us, _ = time_us([partial(dst.copy_, src)], device, rep_ms)
    return 2 * nbytes / us / 1e3


def bench_gather(table, scale, tokens: int, peak_gbps: float, device: torch.device, rep_ms: int) -> dict:
    from plugins.fp8_gather.reference import fp8_gather_reference
    from plugins.fp8_gather.triton_kernels import fp8_gather

    vocab, hidden = table.shape
    moved = tokens * (hidden + 4 * math.ceil(hidden / 128) + 2 * hidden)
    ids = [torch.randint(0, vocab, (1, tokens), dtype=torch.int32, device=device)
           for _ in range(input_sets(moved, device))]
    exact = torch.equal(fp8_gather(table, scale, ids[0], check=False), fp8_gather_reference(table, scale, ids[0]))
    us, timing = time_us([partial(fp8_gather, table, scale, i, check=False) for i in ids], device, rep_ms)
    gbps = moved / us / 1e3
    return dict(tokens=tokens, hidden=hidden, us=us, gbps=gbps, fraction_of_copy=gbps / peak_gbps, exact=exact,
                timing=timing, sets=len(ids))


def target(rows: list[dict], target_tokens: int = TARGET_TOKENS) -> dict:
    """{met, result} of ">= 70 % of copy bandwidth at 4096 tokens", judged only on a bit-exact row."""
    row = next((r for r in rows if r["tokens"] == target_tokens), None)
    if row is None:
        return dict(met=None, result=f"not measured at {target_tokens} tokens")
    if not row["exact"]:
        return dict(met=False, result=f"wrong result at {target_tokens} tokens (not bit-exact)")
    met = row["fraction_of_copy"] >= TARGET_FRACTION
    return dict(met=met, result=f"{'met' if met else 'missed'}: {100 * row['fraction_of_copy']:.0f} % of copy bandwidth "
                                f"({row['gbps']:.0f} GB/s) at {target_tokens} tokens")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/fp8_gather.json"), show_default=True)
@click.option("--rows", "rows_path", type=click.Path(path_type=Path), default=None,
              help="also append every row as a JSON line here the moment it is measured")
@click.option("--vocab", default=VOCAB, show_default=True)
@click.option("--hidden", default=HIDDEN, show_default=True)
@click.option("--rep-ms", default=REP_MS, show_default=True, help="do_bench repetition time per measurement (ms)")
@click.option("--dry-run", is_flag=True, help="tiny sizes on the Triton CPU interpreter, host-clock timings")
def main(out: Path, rows_path: Path | None, vocab: int, hidden: int, rep_ms: int, dry_run: bool) -> None:
    """Time the FP8 gather kernel against the device's copy bandwidth; print a Markdown table, write JSON."""
    from contract.formats import quantize_fp8_row_block

    device = require_device(dry_run)
    tokens, copy_bytes = (DRY["tokens"], DRY["copy_bytes"]) if dry_run else (TOKENS, 2**30)
    vocab, hidden = (DRY["vocab"], DRY["hidden"]) if dry_run else (vocab, hidden)
    table, scale = quantize_fp8_row_block(torch.randn(vocab, hidden, device=device) * 0.02)
    peak = copy_bandwidth_gbps(copy_bytes, device, rep_ms)
    emit(rows_path, "copy", dict(bytes=copy_bytes, gbps=peak))
    rows = []
    for n in tokens:
        rows.append(bench_gather(table, scale, n, peak, device, rep_ms))
        emit(rows_path, "gather", rows[-1])
    goal = target(rows, tokens[0])
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    click.echo(f"\n### FP8 gather, hidden {hidden} ({device_name}); device copy bandwidth {peak:.0f} GB/s\n")
    click.echo(markdown(sorted(rows, key=lambda r: r["tokens"]), COLUMNS))
    click.echo(f"\n- target >= 70 % of copy bandwidth at {tokens[0]} tokens: {goal['result']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device_name, copy_gbps=peak, rows=rows, target=goal, dry_run=dry_run),
                              indent=1))
    click.echo(f"\nwrote {out}")


if __name__ == "__main__":
    main()
