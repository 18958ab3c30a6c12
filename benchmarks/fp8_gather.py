"""FP8 embedding gather bandwidth against what the GPU's memory can do.

Bytes moved per call: per token H FP8 codes + ceil(H/128) fp32 scales read, 2H bytes written. The reference
bandwidth is a large device-to-device copy measured here (read + write), so the ratio is "fraction of achievable".
Cold L2 before every call, median of timed calls. Prints a Markdown table and writes JSON.

    python -m benchmarks.fp8_gather [--out benchmarks/results/fp8_gather.json] [--vocab 151936] [--hidden 4096]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch

from benchmarks.fmha import markdown, require_cuda, time_cold

TOKENS = (1, 16, 128, 512, 1024, 4096, 8192)


def copy_bandwidth_gbps(iters: int) -> float:
    """Read + write GB/s of a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_cold(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / us / 1e3


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/fp8_gather.json"), show_default=True)
@click.option("--vocab", default=151936, show_default=True)
@click.option("--hidden", default=4096, show_default=True)
@click.option("--iters", default=100, show_default=True)
def main(out: Path, vocab: int, hidden: int, iters: int) -> None:
    require_cuda()
    from contract.formats import quantize_fp8_row_block
    from plugins.fp8_gather.triton_kernels import fp8_gather

    table, scale = quantize_fp8_row_block(torch.randn(vocab, hidden, device="cuda") * 0.02)
    peak = copy_bandwidth_gbps(iters)
    rows = []
    for tokens in TOKENS:
        ids = torch.randint(0, vocab, (1, tokens), dtype=torch.int32, device="cuda")
        us = time_cold(lambda: fp8_gather(table, scale, ids, check=False), iters)
        moved = tokens * (hidden + 4 * math.ceil(hidden / 128) + 2 * hidden)
        gbps = moved / us / 1e3
        rows.append(dict(tokens=tokens, hidden=hidden, us=us, gbps=gbps, fraction_of_copy=gbps / peak))
    target = next(r for r in rows if r["tokens"] == 4096)["fraction_of_copy"] >= 0.7
    device = torch.cuda.get_device_name()
    print(f"## FP8 gather, hidden {hidden} ({device}); device copy bandwidth {peak:.0f} GB/s\n")
    print(markdown(rows, ["tokens", "hidden", "us", "gbps", "fraction_of_copy"]))
    print(f"\n- target >= 70% of copy bandwidth at 4096 tokens: {target}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, copy_gbps=peak, rows=rows, target_met=target), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
