"""Triton GPU kernel of `trt_edgellm::Fp8Gather` (contracts.md section 3.2): the FP8 embedding lookup.

One program copies one token's row: FP8 codes `[H]` times the row's block scales `scale[id, j // block]`, written
as fp16. Any H works, a short last block included (SmolLM2: 576 = 4 * 128 + 64). The lookup is memory bound, so
the kernel only streams bytes: H FP8 codes plus ceil(H / block) fp32 scales in, 2H bytes out.

Ids outside `[0, V)` are checked on the host before launch (`check_ids=True`, the default); the kernel itself writes
zeros for them, which is what the TensorRT plugin relies on after the runtime's own check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from contract.errors import InputError


@triton.jit
def _fp8_gather_kernel(
    table_ptr, scale_ptr, ids_ptr, out_ptr, V, H, NUM_BLOCKS,
    BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (tokens, cdiv(H, BLOCK_H)): columns [c * BLOCK_H, (c + 1) * BLOCK_H) of one token's row."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok = tl.load(ids_ptr + t).to(tl.int64)
    valid = (tok >= 0) & (tok < V)
    row = tl.where(valid, tok, 0)  # an out-of-range id reads row 0 and writes zeros
    in_row = cols < H
    q = tl.load(table_ptr + row * H + cols, mask=in_row, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + row * NUM_BLOCKS + cols // BLOCK, mask=in_row, other=0.0)
    tl.store(out_ptr + t * H + cols, tl.where(valid, q * s, 0.0).to(tl.float16), mask=in_row)


def check_ids(input_ids: torch.Tensor, vocab: int) -> None:
    """Raise InputError naming the first id outside [0, vocab)."""
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bool(bad.any()):
        first = int(input_ids[bad].reshape(-1)[0])
        raise InputError(f"input_ids: expected ids in [0, {vocab}), found {first}")


def fp8_gather(
    table_fp8: torch.Tensor,
    scale: torch.Tensor,
    input_ids: torch.Tensor,
    block_size: int = 128,
    out: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """fp16 `[*input_ids.shape, H]` = `table_fp8[id] * scale[id, j // block_size]`; writes into `out` when given."""
    vocab, hidden = table_fp8.shape
    num_blocks = triton.cdiv(hidden, block_size)
    if table_fp8.dtype != torch.float8_e4m3fn:
        raise InputError(f"table: expected float8_e4m3fn, found {table_fp8.dtype}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (vocab, num_blocks):
        raise InputError(f"scale: expected fp32 [{vocab}, {num_blocks}], found {scale.dtype} {list(scale.shape)}")
    if check:
        check_ids(input_ids, vocab)
    if out is None:
        out = torch.empty(*input_ids.shape, hidden, device=table_fp8.device, dtype=torch.float16)
    tokens = input_ids.numel()
    if tokens:
        block_h = min(triton.next_power_of_2(hidden), 4096 if table_fp8.is_cuda else 256)
        extra = dict(num_warps=8 if block_h >= 2048 else 4) if table_fp8.is_cuda else {}
        _fp8_gather_kernel[(tokens, triton.cdiv(hidden, block_h))](
            table_fp8, scale, input_ids.contiguous(), out, vocab, hidden, num_blocks,
            BLOCK=block_size, BLOCK_H=block_h, enable_fp_fusion=False, **extra,  # a product: nothing to fuse
        )
    return out
