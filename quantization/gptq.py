"""GPTQ rounding of NVFP4 weights: each column's rounding error is compensated on the columns not yet rounded.

Rounding every weight to its nearest level (what `quantize_nvfp4` does) minimizes the weight error, not the output
error ||X W^T - X Q^T||^2, which depends on how input channels co-vary. GPTQ (Frantar et al., 2022) rounds the input
columns one at a time and spreads each column's error over the remaining ones through the inverse of the input
second-moment matrix H = E[x x^T] from calibration. The NVFP4 block scale of each group of 16 columns is chosen when
the group is reached, from the already-updated weights (by output error as in `scale_search`, or from the amax); the
global scale is the one `scale_search` chose (shared by the fusion group). The result is an ordinary NVFP4 weight:
dequantized values that `quantize_nvfp4` with the returned scales reproduces exactly.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from contract import formats
from quantization.scale_search import search_block_scales

BLOCK = 128  # columns updated lazily together (a multiple of the NVFP4 group)
DAMP = 0.01  # fraction of the mean diagonal added to H, as the GPTQ reference does


def gptq_nvfp4(w: torch.Tensor, hessian: torch.Tensor, global_scale: torch.Tensor, search: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 dequantized weight ``[out, in]``, FP8 block scales ``[out, in/16]``) for `w` given H ``[in, in]``."""
    out, n = w.shape
    group = formats.NVFP4_GROUP
    W = w.float().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMP * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    diag = torch.diag(H).float()
    gs = global_scale.float().reshape(())
    Q = torch.zeros_like(W)
    scales = torch.zeros(out, n // group, dtype=formats.FP8_DTYPE)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        step = None
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                block = W1[:, i:i + group]
                if search:
                    s, _ = search_block_scales(block, gs, diag[col:col + group])
                else:
                    s = formats.nvfp4_block_scales(block, gs)
                scales[:, col // group] = s[:, 0]
                step = s[:, 0].float() * gs
            safe = torch.where(step > 0, step, torch.ones_like(step))
            q = formats.e2m1_round(W1[:, i] / safe) * step
            Q[:, col] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return Q, scales


def apply(state_dict: dict[str, torch.Tensor], plan: dict[str, str], scales: dict[str, dict[str, torch.Tensor]],
          hessians: dict[str, torch.Tensor], search: bool) -> dict:
    """Round every NVFP4 linear of `plan` that has a calibrated H with GPTQ, in place: its weight in `state_dict`
    becomes the rounded values and its `weight_scale` in `scales` the chosen block scales. Returns the report entry:
    the output error sum((W - Q) H (W - Q)^T) against plain rounding with the same global scales."""
    ours, plain = 0.0, 0.0
    names = [n for n, f in plan.items() if f == "nvfp4" and n in hessians and n in scales]
    for name in tqdm(names, desc="gptq", unit="linear"):
        w, h = state_dict[f"{name}.weight"].float(), hessians[name].float()
        gs = scales[name]["weight_scale_2"]
        q, block_scales = gptq_nvfp4(w, h, gs, search)
        rtn = formats.dequantize_nvfp4(*formats.quantize_nvfp4(w, block_scale=scales[name]["weight_scale"],
                                                               global_scale=gs))
        ours += float(((w - q) @ h * (w - q)).sum())
        plain += float(((w - rtn) @ h * (w - rtn)).sum())
        state_dict[f"{name}.weight"] = q
        scales[name]["weight_scale"] = block_scales
    return {"linears": len(names), "output_error_ratio": round(ours / plain, 4) if plain > 0 else None}
