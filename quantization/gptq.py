"""GPTQ rounding of NVFP4 and per-tensor FP8 weights: each column's rounding error is compensated on the columns not
yet rounded.

Rounding every weight to its nearest level (what `quantize_nvfp4` / `quantize_fp8_per_tensor` do) minimizes the weight
error, not the output error ||X W^T - X Q^T||^2, which depends on how input channels co-vary. GPTQ (Frantar et al.,
2022) rounds the input columns one at a time and spreads each column's error over the remaining ones through the
inverse of the input second-moment matrix H = E[x x^T] from calibration. For NVFP4 the block scale of each group of
16 columns is chosen when the group is reached, from the already-updated weights (by output error as in
`scale_search`, or from the amax); the global scale is the one `scale_search` chose (shared by the fusion group). For
FP8 the per-tensor scale is the (shared) one `scale_search` chose. The loop and H are here; how a format rounds a
column is its module's `gptq` (plugins/weight_formats). The result is an ordinary checkpoint weight: dequantized
values that the plain quantizer with the returned scales reproduces exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from contract.weight_formats import WEIGHT_FORMATS
from plugins import weight_formats

BLOCK = 128  # columns updated lazily together (a multiple of the NVFP4 group)
DAMP = 0.01  # fraction of the mean diagonal added to H, as the GPTQ reference does


@dataclass(frozen=True)
class Damped:
    """H = E[x x^T] of one input, damped, as the GPTQ loop uses it: computed once per input and shared by the linears
    that read it (q/k/v, gate/up), since the Cholesky factorization costs more than a small linear's loop."""

    diag: torch.Tensor  # fp32 diagonal of the damped H (the NVFP4 block-scale search weighs columns by it)
    dead: torch.Tensor  # bool: input channels that were never nonzero
    hinv: torch.Tensor  # fp32 upper Cholesky factor of the inverse of the damped H


def damped(hessian: torch.Tensor) -> Damped:
    """H in fp64 with 1 on the diagonal of dead input channels and DAMP of its mean diagonal added, factored."""
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += DAMP * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    return Damped(torch.diag(H).float(), dead, hinv)


def loop(w: torch.Tensor, h: Damped, round_column: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """The GPTQ loop: fp32 rounded weight ``[out, in]``. ``round_column(W1, i, col)`` rounds column ``i`` of the
    current lazy block ``W1`` (input column ``col``), which holds the error-updated weights of the block."""
    n = w.shape[1]
    W = w.float().clone()
    W[:, h.dead] = 0
    Hinv = h.hinv
    Q = torch.zeros_like(W)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            q = round_column(W1, i, b0 + i)
            Q[:, b0 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return Q


def apply(state_dict: dict[str, torch.Tensor], plan: dict[str, str], scales: dict[str, dict[str, torch.Tensor]],
          hessians: dict[str, torch.Tensor], search: bool) -> dict:
    """Round every linear of `plan` whose format GPTQ applies to (row `gptq`: NVFP4, per-tensor FP8) and that has a
    calibrated H, in place: its weight in `state_dict` becomes the rounded values (and its `scales` what the
    format's `gptq` chose, e.g. NVFP4's block scales).
    The linears of a fusion group read one input and share its H (`calibrate`): it is damped and factored once.
    Returns the report entry: the output error sum((W - Q) H (W - Q)^T) over those linears against plain rounding
    with the same scales."""
    ours, plain = 0.0, 0.0
    names = [n for n, f in plan.items() if WEIGHT_FORMATS[f].gptq and n in hessians and n in scales]
    by_input: dict[int, list[str]] = {}  # the linears that share one H tensor (calibrate keeps one per input)
    for name in names:
        by_input.setdefault(id(hessians[name]), []).append(name)
    for group in tqdm(list(by_input.values()), desc="gptq", unit="input"):
        h = damped(hessians[group[0]])
        for name in group:
            w, hessian = state_dict[f"{name}.weight"].float(), hessians[name].float()
            q, rtn, scales[name] = weight_formats.get(plan[name]).gptq(w, h, scales[name], search, loop)
            ours += float(((w - q) @ hessian * (w - q)).sum())
            plain += float(((w - rtn) @ hessian * (w - rtn)).sum())
            state_dict[f"{name}.weight"] = q
    return {"linears": len(names), "output_error_ratio": round(ours / plain, 4) if plain > 0 else None}
