"""The token embedding sidecar, `embedding.safetensors` (contracts.md section 4).

The embedding lookup is not in the LLM graph: the runtime (or the builder's embedding engine) reads this file. It holds
either the FP16 table or, with `--fp8-embedding`, an FP8 E4M3 table plus fp32 per-row block scales. Readers key on the
tensor dtype, like the reference, and check that our metadata agrees when it is present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from contract.embedding import EMBEDDING_BLOCK, EMBEDDING_FP8, EMBEDDING_FP16
from contract.errors import InputError
from contract.formats import FP8_DTYPE, quantize_fp8_row_block
from contract.versions import PRODUCER

QUANT_CHUNK_ROWS = 1024


@dataclass
class EmbeddingSidecar:
    """`table`: fp16 or float8_e4m3fn ``[V, H]``; `scale`: fp32 ``[V, ceil(H/128)]`` for FP8, else None."""

    format: str
    table: torch.Tensor
    scale: torch.Tensor | None

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.table.shape[1]


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


def read_embedding_sidecar(path: Path) -> EmbeddingSidecar:
    """Load and validate `embedding.safetensors`; any mismatch is an InputError naming the file and tensor."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: expected the embedding sidecar embedding.safetensors, found no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: expected a safetensors file, could not read it ({e})") from None

    if "embedding" not in tensors:
        raise InputError(f"{path}: expected tensor 'embedding', found {sorted(names) or 'no tensors'}")
    table = tensors["embedding"]
    if table.dim() != 2:
        raise InputError(f"{path}: tensor 'embedding' expected 2-D [vocab, hidden], found shape {list(table.shape)}")
    unexpected = names - {"embedding", "embedding_scale"}
    if unexpected:
        raise InputError(f"{path}: expected only 'embedding' and 'embedding_scale', found also {sorted(unexpected)}")

    if table.dtype == torch.float16:
        fmt, scale = EMBEDDING_FP16, None
        if "embedding_scale" in tensors:
            raise InputError(f"{path}: tensor 'embedding_scale' expected only with an FP8 table, found an F16 table")
    elif table.dtype == FP8_DTYPE:
        fmt = EMBEDDING_FP8
        scale = tensors.get("embedding_scale")
        expected = [table.shape[0], math.ceil(table.shape[1] / EMBEDDING_BLOCK)]
        if scale is None:
            raise InputError(f"{path}: tensor 'embedding_scale' expected with an F8_E4M3 table, found none")
        if scale.dtype != torch.float32 or list(scale.shape) != expected:
            raise InputError(
                f"{path}: tensor 'embedding_scale' expected F32 {expected}, found {scale.dtype} {list(scale.shape)}"
            )
    else:
        raise InputError(f"{path}: tensor 'embedding' expected F16 or F8_E4M3, found {table.dtype}")

    if "format" in metadata and metadata["format"] != fmt:
        raise InputError(f"{path}: metadata format {metadata['format']!r} disagrees with tensor 'embedding' ({fmt})")
    if "block_size" in metadata and metadata["block_size"] != str(EMBEDDING_BLOCK):
        raise InputError(f"{path}: metadata block_size expected '{EMBEDDING_BLOCK}', found {metadata['block_size']!r}")
    return EmbeddingSidecar(fmt, table, scale)
