"""Number formats against ml_dtypes (FP8 E4M3, FP4 E2M1 casts) and plain per-tile formulas."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from contract import formats


def ml_fp8(x: np.ndarray) -> np.ndarray:
    """ml_dtypes' E4M3 (round to nearest even) after the clamp that keeps it from turning overflow into NaN."""
    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


def test_to_fp8_clamps_and_rounds_like_ml_dtypes():
    x = torch.tensor([1000.0, -1000.0, 448.0, 464.0, 0.0, -0.0, 1e-9, 17.0, 18.0, 0.0029296875])
    assert np.array_equal(bits(formats.to_fp8(x, 1.0)), ml_fp8(x.numpy()).view(np.uint8))
    assert formats.to_fp8(x, 1.0)[:2].float().tolist() == [448.0, -448.0]


def test_fp8_per_tensor():
    w = torch.randn(48, 40) * 3
    q, scale = formats.quantize_fp8_per_tensor(w)
    assert scale.shape == () and scale.dtype == torch.float32
    assert math.isclose(float(scale), float(w.abs().max()) / 448, rel_tol=1e-6)
    assert np.array_equal(bits(q), ml_fp8((w / scale).numpy()).view(np.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_divides_in_fp32_for_half_precision_weights(dtype):
    """A checkpoint's fp16/bf16 weight is divided by its scale in fp32, then rounded once to E4M3; dividing in the
    weight's own dtype would round twice and move some codes."""
    w = (torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    q, scale = formats.quantize_fp8_per_tensor(w)
    assert np.array_equal(bits(q), ml_fp8(w.float().numpy() / np.float32(scale)).view(np.uint8))
    shared = torch.tensor(0.0123)  # a given (shared) scale takes the same path
    q, _ = formats.quantize_fp8_per_tensor(w, shared)
    assert np.array_equal(bits(q), ml_fp8(w.float().numpy() / np.float32(shared)).view(np.uint8))


def test_fp8_per_channel():
    w = torch.randn(24, 40) * torch.logspace(-2, 2, 24)[:, None]
    w[5] = 0
    q, scale = formats.quantize_fp8_per_channel(w)
    assert scale.shape == (24,)
    expected = w.abs().amax(dim=1) / 448
    expected[5] = 1.0  # an all-zero row keeps a finite scale and quantizes to zeros
    torch.testing.assert_close(scale, expected)
    assert np.array_equal(bits(q), ml_fp8((w / scale[:, None]).numpy()).view(np.uint8))
    assert (q[5].float() == 0).all()


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 130), (128, 1)])
def test_fp8_block_128x128_incl_short_edge_tiles(shape):
    out, inp = shape
    w = torch.randn(shape) * 2
    w[:128, :128] = 0  # a zero tile
    q, scale = formats.quantize_fp8_block(w)
    rows, cols = math.ceil(out / 128), math.ceil(inp / 128)
    assert scale.shape == (rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            amax = float(tile.abs().max())
            s = amax / 448 if amax > 0 else 1.0
            assert math.isclose(float(scale[i, j]), s, rel_tol=1e-6)
            expected = ml_fp8((tile / scale[i, j]).numpy()).view(np.uint8)
            assert np.array_equal(bits(q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].contiguous()), expected)
    deq = formats.dequantize_fp8_block(q, scale)
    # E4M3 has 3 mantissa bits: relative error at most 2^-4 of each tile's amax-scaled value, plus subnormal steps
    bound = formats.expand_block_scale(scale, shape) * (448 * 2**-4)
    assert ((deq - w).abs() <= bound).all()


def test_fp8_block_dequant_with_rectangular_tiles():
    """HF fine-grained FP8 names its tile as [rows, cols] (`weight_block_size`); a non-square one must not swap."""
    w = torch.randn(10, 12) * torch.logspace(-2, 2, 10)[:, None]
    rows, cols = 4, 6
    scale = torch.rand(3, 2) + 0.5
    q = formats.to_fp8(w, 1.0)
    expected = torch.empty(10, 12)
    for i in range(10):
        for j in range(12):
            expected[i, j] = q[i, j].float() * scale[i // rows, j // cols]
    torch.testing.assert_close(formats.dequantize_fp8_block(q, scale, (rows, cols)), expected, rtol=0, atol=0)


def test_e2m1_encode_matches_ml_dtypes_incl_ties_and_saturation():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    special = torch.tensor([*ties, *[-t for t in ties], 6.0, 7.0, -100.0, 0.0, -0.0, 0.1, -0.1])
    x = torch.cat([torch.randn(4096) * 3, special])
    expected = x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert np.array_equal(formats.e2m1_encode(x).numpy(), expected)
    # ties go to the even code: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert formats.e2m1_decode(formats.e2m1_encode(torch.tensor(ties))).tolist() == [0, 1, 1, 2, 2, 4, 4]


def test_e2m1_decode_all_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(formats.e2m1_decode(codes).numpy(), expected)


def test_nibble_order_low_nibble_is_even_index():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = formats.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(formats.unpack_nibbles(packed), codes)


def test_nvfp4_against_plain_formula():
    w = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]
    w[3, 16:32] = 0  # a zero block
    packed, block_scale, global_scale = formats.quantize_nvfp4(w)
    assert packed.shape == (32, 32) and packed.dtype == torch.uint8
    assert block_scale.shape == (32, 4) and block_scale.dtype == torch.float8_e4m3fn
    assert math.isclose(float(global_scale), float(w.abs().max()) / (6 * 448), rel_tol=1e-6)

    wn = w.numpy().reshape(32, 4, 16)
    bs = (np.abs(wn).max(axis=-1) / 6 / float(global_scale)).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(bits(block_scale), bs.view(np.uint8))
    step = bs.astype(np.float32) * float(global_scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(step[..., None] > 0, wn / step[..., None], 0.0)
    codes = scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(32, 64)
    assert np.array_equal(formats.unpack_nibbles(packed).numpy(), codes)
    assert np.array_equal(packed.numpy(), codes[:, 0::2] | (codes[:, 1::2] << 4))

    deq = formats.dequantize_nvfp4(packed, block_scale, global_scale)
    expected = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32) * np.repeat(step, 16, axis=-1)
    np.testing.assert_array_equal(deq.numpy(), expected)
    assert (deq[3, 16:32] == 0).all()
    # the widest E2M1 gap is 2 units (4 -> 6), so rounding costs at most one unit; beyond 6 units it saturates
    unit = np.repeat(step, 16, axis=-1)
    bound = unit + np.maximum(np.abs(w.numpy()) - 6 * unit, 0) + 1e-12
    assert (np.abs(deq.numpy() - w.numpy()) <= bound).all()


def test_nvfp4_rejects_short_groups():
    with pytest.raises(ValueError, match="multiple of 16"):
        formats.quantize_nvfp4(torch.randn(4, 40))


def test_row_block_helpers_unchanged():
    w = torch.randn(3, 200)
    q, scale = formats.quantize_fp8_row_block(w)
    assert scale.shape == (3, 2)
    torch.testing.assert_close(formats.dequantize_fp8_row_block(q, scale), w, atol=float(scale.max()) * 16, rtol=0)
