"""The embedding sidecar `embedding.safetensors` (contracts.md section 4): its formats, and the one reader.

The embedding lookup is not in the LLM graph: the builder (its embedding engine) and the runtime read this file,
which llm_loader/embedding.py writes. It holds either the FP16 table or, with `--fp8-embedding`, an FP8 E4M3 table
plus fp32 per-row block scales. The reader keys on the tensor dtype, like the reference, and checks that our metadata
agrees when it is present. torch is imported by the reader only, so the format names stay cheap to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contract.errors import InputError

if TYPE_CHECKING:
    import torch

EMBEDDING_FP16 = "fp16"
EMBEDDING_FP8 = "fp8_e4m3_row_block"
EMBEDDING_BLOCK = 128
# sidecar metadata `format` -> safetensors dtype of tensor `embedding`
EMBEDDING_DTYPES = {EMBEDDING_FP16: "F16", EMBEDDING_FP8: "F8_E4M3"}


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


def read_embedding_sidecar(path: Path) -> EmbeddingSidecar:
    """Load and validate `embedding.safetensors`; any mismatch is an InputError naming the file and tensor."""
    import torch
    from safetensors import SafetensorError, safe_open

    from contract.formats import (
        FP8_DTYPE,  # (contract.formats imports this module: not at module level)
    )

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
