"""The token embedding sidecar's writer, `embedding.safetensors` (contracts.md section 4).

The embedding lookup is not in the LLM graph: the builder (its embedding engine) and the runtime read this file with
`contract.embedding.read_embedding_sidecar`. It holds either the FP16 table or, with `--fp8-embedding`, an FP8 E4M3
table plus fp32 per-row block scales.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from contract.embedding import EMBEDDING_BLOCK, EMBEDDING_FP8, EMBEDDING_FP16
from contract.formats import FP8_DTYPE, quantize_fp8_row_block
from contract.versions import PRODUCER

QUANT_CHUNK_ROWS = 1024


def write_embedding_sidecar(path: Path, table_fp16: torch.Tensor, fp8: bool) -> None:
    """Write the table as FP16, or quantized to FP8 with 1x128 row-block scales (contract.formats)."""
    if table_fp16.dtype != torch.float16 or table_fp16.dim() != 2:
        raise ValueError(f"embedding table must be fp16 [V, H], got {table_fp16.dtype} {list(table_fp16.shape)}")
    metadata = {"format": EMBEDDING_FP8 if fp8 else EMBEDDING_FP16, "block_size": str(EMBEDDING_BLOCK),
                "producer": PRODUCER}
    if fp8:  # the math is per row: quantize a chunk of rows at a time to keep the fp32 temporaries small
        v, h = table_fp16.shape
        table = torch.empty(v, h, dtype=FP8_DTYPE)
        scale = torch.empty(v, math.ceil(h / EMBEDDING_BLOCK), dtype=torch.float32)
        for start in range(0, v, QUANT_CHUNK_ROWS):
            rows = slice(start, start + QUANT_CHUNK_ROWS)
            table[rows], scale[rows] = quantize_fp8_row_block(table_fp16[rows])
        tensors = {"embedding": table, "embedding_scale": scale}
    else:
        tensors = {"embedding": table_fp16.contiguous()}
    save_file(tensors, str(path), metadata=metadata)
