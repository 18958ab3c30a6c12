"""`embedding.safetensors`: round trips against plain formulas, and every malformed file is an InputError."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from contract.embedding import read_embedding_sidecar
from contract.errors import InputError
from llm_loader.embedding import write_embedding_sidecar


def table(v: int = 300, h: int = 200, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    t = torch.randn(v, h) * torch.logspace(-3, 1, v)[:, None]  # rows of very different magnitude
    t[5] = 0  # an all-zero row: its scales take the 1e-4 floor
    return t.to(torch.float16)


def test_fp16_round_trip(tmp_path):
    w = table()
    write_embedding_sidecar(tmp_path / "e.safetensors", w, fp8=False)
    got = read_embedding_sidecar(tmp_path / "e.safetensors")
    assert got.format == "fp16" and got.scale is None and (got.vocab_size, got.hidden_size) == (300, 200)
    assert torch.equal(got.table, w)


@pytest.mark.parametrize("h", [128, 200, 576])
def test_fp8_matches_plain_formula(tmp_path, h):
    """Chunked quantization (more rows than one chunk) equals the per-row formula computed with ml_dtypes."""
    w = table(v=2500, h=h)
    write_embedding_sidecar(tmp_path / "e.safetensors", w, fp8=True)
    got = read_embedding_sidecar(tmp_path / "e.safetensors")

    x = w.float().numpy()
    nblocks = math.ceil(h / 128)
    amax = np.stack([np.abs(x[:, 128 * j : 128 * (j + 1)]).max(axis=1) for j in range(nblocks)], axis=1)
    scale = np.maximum(amax, np.float32(1e-4)) / np.float32(448)
    q = np.clip(x / np.repeat(scale, 128, axis=1)[:, :h], -448, 448).astype(ml_dtypes.float8_e4m3fn)

    assert got.format == "fp8_e4m3_row_block" and got.table.dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(got.scale.numpy(), scale)
    np.testing.assert_array_equal(got.table.view(torch.uint8).numpy(), q.view(np.uint8))
    # dequantized rows stay within half an FP8 step (relative 2^-4) of the fp16 table
    deq = q.astype(np.float32) * np.repeat(scale, 128, axis=1)[:, :h]
    assert np.all(np.abs(deq - x) <= np.abs(x) * 2**-4 + np.repeat(scale, 128, axis=1)[:, :h] * 2**-9)


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


FP8 = torch.zeros(4, 200).to(torch.float8_e4m3fn)
SCALE = torch.ones(4, 2)


@pytest.mark.parametrize(
    "tensors, metadata, needle",
    [
        ({"weights": torch.zeros(4, 8, dtype=torch.float16)}, None, "tensor 'embedding'"),
        ({"embedding": torch.zeros(4, 8)}, None, "F16 or F8_E4M3"),
        ({"embedding": torch.zeros(4, 8, 2, dtype=torch.float16)}, None, "2-D"),
        ({"embedding": FP8}, None, "'embedding_scale' expected with an F8_E4M3 table"),
        ({"embedding": FP8, "embedding_scale": torch.ones(4, 1)}, None, "F32 [4, 2]"),
        ({"embedding": FP8, "embedding_scale": SCALE.half()}, None, "F32 [4, 2]"),
        ({"embedding": torch.zeros(4, 8, dtype=torch.float16), "embedding_scale": SCALE}, None, "only with an FP8"),
        ({"embedding": FP8, "embedding_scale": SCALE}, {"format": "fp16"}, "disagrees"),
        ({"embedding": FP8, "embedding_scale": SCALE}, {"block_size": "64"}, "block_size"),
        ({"embedding": FP8, "embedding_scale": SCALE, "extra": SCALE.clone()}, None, "extra"),
    ],
    ids=["no-table", "fp32-table", "3d", "fp8-no-scale", "scale-shape", "scale-dtype", "fp16-with-scale",
         "metadata-format", "metadata-block", "extra-tensor"],
)
def test_malformed_sidecar_is_input_error(tmp_path, tensors, metadata, needle):
    path = write(tmp_path / "embedding.safetensors", tensors, metadata)
    with pytest.raises(InputError, match=str(path).replace(".", r"\.")) as err:
        read_embedding_sidecar(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_embedding_sidecar(tmp_path / "embedding.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(InputError, match="bad.safetensors"):
        read_embedding_sidecar(tmp_path / "bad.safetensors")


def test_reference_style_file_without_metadata_is_accepted(tmp_path):
    """The reference writes no metadata and keys on the dtype; so do we."""
    path = write(tmp_path / "e.safetensors", {"embedding": FP8, "embedding_scale": SCALE})
    assert read_embedding_sidecar(path).format == "fp8_e4m3_row_block"
