"""Torch reference of `Fp8Gather` (contracts.md section 3.2): `fp16(float(table[id, j]) * scale[id, j // block])`."""

from __future__ import annotations

import torch

from contract.errors import InputError
from contract.formats import dequantize_fp8_row_block


def fp8_gather_reference(table_fp8: torch.Tensor, scale: torch.Tensor, input_ids: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """fp16 `[*input_ids.shape, H]`; ids outside `[0, V)` are an error, never zeros."""
    vocab = table_fp8.shape[0]
    ids = input_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"input_ids: expected ids in [0, {vocab}), found [{int(ids.min())}, {int(ids.max())}]")
    flat = ids.reshape(-1)
    rows = dequantize_fp8_row_block(table_fp8[flat], scale[flat], block_size)
    return rows.to(torch.float16).reshape(*ids.shape, table_fp8.shape[1])
