"""Number formats: the single source of truth for how a tensor becomes FP8 (and back).

Every scale here is a *dequant* scale: ``x ~= q * scale`` with ``scale = amax / 448`` (E4M3's largest finite value).
Values are clamped to +-448 before the cast because torch saturates but ``ml_dtypes`` turns overflow into NaN; with
the clamp both agree bit for bit (round to nearest even).
"""

from __future__ import annotations

import math

import torch

from contract.embedding import EMBEDDING_BLOCK

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
MIN_BLOCK_AMAX = 1e-4  # keeps an all-zero block's scale finite


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``fp8(clamp(x / scale, +-448))`` computed in fp32; `scale` broadcasts against `x`."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_row_block(w: torch.Tensor, block: int = EMBEDDING_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, blocks of `block` along the last dim: returns FP8 ``[V, H]`` and fp32 scales ``[V, ceil(H/block)]``.

    When H is not a multiple of `block` the last block of each row is shorter and gets its own scale.
    """
    v, h = w.shape
    nblocks = math.ceil(h / block)
    w32 = w.float()
    padded = torch.nn.functional.pad(w32.abs(), (0, nblocks * block - h))
    amax = padded.view(v, nblocks, block).amax(dim=-1)
    scale = amax.clamp_min(MIN_BLOCK_AMAX) / FP8_MAX
    return to_fp8(w32, expand_row_block_scale(scale, h, block)), scale


def expand_row_block_scale(scale: torch.Tensor, h: int, block: int = EMBEDDING_BLOCK) -> torch.Tensor:
    """``[V, ceil(H/block)]`` scales repeated to ``[V, H]``."""
    return scale.repeat_interleave(block, dim=-1)[..., :h]


def dequantize_fp8_row_block(q: torch.Tensor, scale: torch.Tensor, block: int = EMBEDDING_BLOCK) -> torch.Tensor:
    """fp32 ``q * scale[:, j // block]``."""
    return q.float() * expand_row_block_scale(scale, q.shape[-1], block)


# --- FP8 weights: per-tensor, per-output-channel and 128x128 blocks ------------------------------------------------

WEIGHT_BLOCK = 128


def amax_to_scale(amax: torch.Tensor, qmax: float = FP8_MAX) -> torch.Tensor:
    """``amax / qmax`` in fp32, with 1.0 where amax is 0 so that an all-zero tensor or block stays exactly 0."""
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_fp8_per_tensor(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``w`` and a scalar fp32 scale, ``amax / 448`` unless given (ModelOpt "FP8"; a scale shared by linears
    that a runtime fuses, such as q/k/v, is the largest of theirs)."""
    scale = amax_to_scale(w.float().abs().amax()) if scale is None else scale.float().reshape(())
    return to_fp8(w, scale), scale


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``w [out, in]`` and fp32 scales ``[out]``, one per output row (ModelOpt "FP8_PER_CHANNEL_PER_TOKEN")."""
    scale = amax_to_scale(w.float().abs().amax(dim=1))
    return to_fp8(w, scale[:, None]), scale


def _block_view_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    """amax of each ``block x block`` tile of a 2-D tensor; edge tiles are shorter (zero padding cannot raise amax)."""
    out, inp = w.shape
    rows, cols = math.ceil(out / block), math.ceil(inp / block)
    padded = torch.nn.functional.pad(w.float().abs(), (0, cols * block - inp, 0, rows * block - out))
    return padded.view(rows, block, cols, block).amax(dim=(1, 3))


def expand_block_scale(
    scale: torch.Tensor, shape: tuple[int, int], block: int | tuple[int, int] = WEIGHT_BLOCK
) -> torch.Tensor:
    """``[ceil(out/rows), ceil(in/cols)]`` tile scales repeated to the full ``[out, in]`` (`block` int = square)."""
    rows, cols = (block, block) if isinstance(block, int) else block
    out, inp = shape
    return scale.repeat_interleave(rows, dim=0)[:out].repeat_interleave(cols, dim=1)[:, :inp]


def quantize_fp8_block(w: torch.Tensor, block: int = WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``w`` and fp32 ``weight_scale_inv [ceil(out/b), ceil(in/b)]`` (HF fine-grained FP8; a dequant multiplier).

    Shapes that are not multiples of `block` get shorter edge tiles, each with its own scale, like DeepSeek-V3.
    """
    scale = amax_to_scale(_block_view_amax(w, block))
    return to_fp8(w, expand_block_scale(scale, w.shape, block)), scale


def dequantize_fp8_block(
    q: torch.Tensor, scale: torch.Tensor, block: int | tuple[int, int] = WEIGHT_BLOCK
) -> torch.Tensor:
    """fp32 ``q * scale[i // rows, j // cols]``."""
    return q.float() * expand_block_scale(scale.float(), q.shape, block)


# --- NVFP4: E2M1 codes, two per byte, FP8 scale per 16 elements, fp32 global scale -----------------------------------

NVFP4_GROUP = 16
E2M1_MAX = 6.0
E2M1_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_LEVELS[1:] + E2M1_LEVELS[:-1]) / 2


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, bit 3 = sign) of `x`: nearest level, ties to the even code, saturating at +-6."""
    a = x.float().abs().clamp(max=E2M1_MAX)
    mids = _E2M1_MIDPOINTS.to(a.device)
    code = torch.bucketize(a, mids)  # a == mids[i] lands on the lower code i
    tie_to_odd = (a == mids[code.clamp(max=len(mids) - 1)]) & (code % 2 == 1)
    code = code + tie_to_odd.to(code.dtype)
    return (code | (torch.signbit(x.float()).to(code.dtype) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of 4-bit E2M1 codes."""
    codes = codes.long()
    value = E2M1_LEVELS.to(codes.device)[codes & 7]
    return torch.where(codes & 8 > 0, -value, value)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``e2m1_decode(e2m1_encode(x))`` without the codes, for searches that only need the values: the levels are
    steps of 0.5 below 2, of 1 below 4 and of 2 up to 6, so round-half-to-even within each range (ties land on the
    even code, as in `e2m1_encode`)."""
    a = x.float().abs().clamp(max=E2M1_MAX)
    half = torch.round(a * 2) / 2
    one = torch.round(a)
    two = torch.round(a / 2) * 2
    value = torch.where(a < 2, half, torch.where(a < 4, one, two))
    return torch.where(torch.signbit(x.float()), -value, value)


def e2m1_qdq(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fp32 ``e2m1(x / step) * step``, `step` (block scale x global scale) broadcast against `x`; a zero step gives
    zeros: the values NVFP4 stores for `x`, as the searches and GPTQ need them (no codes, no packing)."""
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return e2m1_round(x / safe) * step


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` 4-bit codes -> uint8 ``[..., n/2]``; the even index goes in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n/2]`` -> 4-bit codes ``[..., n]`` (inverse of `pack_nibbles`)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``weight_scale_2`` / NVFP4 ``input_scale``: ``amax / (6 * 448)``, fp32."""
    return amax_to_scale(amax, E2M1_MAX * FP8_MAX)


def nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor, group: int = NVFP4_GROUP) -> torch.Tensor:
    """FP8 block scales ``[out, in/group]`` in units of the global scale: ``fp8(block_amax / 6 / ws2)``, at most 448."""
    out, inp = w.shape
    amax = w.float().view(out, inp // group, group).abs().amax(dim=-1)
    return (amax / (E2M1_MAX * global_scale)).clamp(max=FP8_MAX).to(FP8_DTYPE)


def quantize_nvfp4(w: torch.Tensor, group: int = NVFP4_GROUP, block_scale: torch.Tensor | None = None,
                   global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> packed uint8 ``[out, in/2]``, FP8 block scales ``[out, in/group]``, fp32 scalar global scale.

    By default the global scale is ``amax / (6 * 448)`` and the block scale ``fp8(block_amax / 6 / weight_scale_2)``,
    so it never exceeds 448; either can be given instead (a searched or shared scale). A block whose FP8 scale is 0
    (all zeros, or underflow) quantizes to zeros; values beyond a block's 6 * scale saturate.
    """
    out, inp = w.shape
    if inp % group:
        raise ValueError(f"NVFP4 needs the input size to be a multiple of {group}, found {inp}")
    w32 = w.float().view(out, inp // group, group)
    if global_scale is None:
        global_scale = nvfp4_global_scale(w32.abs().amax())
    global_scale = global_scale.float().reshape(())
    if block_scale is None:
        block_scale = nvfp4_block_scales(w, global_scale, group)
    step = block_scale.float() * global_scale
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = e2m1_encode(w32 / step[..., None]).view(out, inp)
    return pack_nibbles(codes), block_scale, global_scale


def dequantize_nvfp4(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, group: int = NVFP4_GROUP
) -> torch.Tensor:
    """fp32 ``e2m1 * fp32(block_scale) * weight_scale_2`` of shape ``[out, 2 * packed.shape[1]]``."""
    values = e2m1_decode(unpack_nibbles(packed))
    scale = block_scale.float().repeat_interleave(group, dim=-1) * global_scale.float()
    return values * scale
