"""Weight scales of the linears a runtime fuses, and the NVFP4 scale search.

Shared scales: q/k/v (and gate/up) read the same input and a runtime fuses them into one GEMM, which needs one
per-tensor scale; ModelOpt writes the largest of the group's (`weight_scale_2` of NVFP4, `weight_scale` of per-tensor
FP8), and so does this module.

Search (`mse`): NVFP4 rounds each block of 16 to 8 levels times an FP8 block scale times the global scale. Scaling
a block by its amax never clips but wastes levels when one value stands out; a smaller FP8 block scale clips that
value and rounds the rest finer. For each block we try the FP8 scale codes around the amax one, and for the global
scale a few factors within an octave (which shifts the FP8 grid the block scales are rounded to), and keep what
minimizes the output error ``sum_j E[x_j^2] (w_j - q(w_j))^2`` (the output MSE with a diagonal input covariance,
E[x^2] per input channel from calibration). `amax` keeps ModelOpt's amax scales.
"""

from __future__ import annotations

import torch

from contract import formats

BLOCK_STEPS = (0, -1, -2, -3, 1)  # FP8 codes tried around the amax block scale (one code is 6-12%)
GLOBAL_FACTORS = (1.0, 2 ** -0.25, 2 ** -0.5, 2 ** -0.75)  # x the amax global scale: shifts the FP8 grid by 1/4 octave
FP8_MAX_CODE = 0x7E  # 448; 0x7F is NaN in E4M3FN


def fusion_groups(linears: list[str]) -> list[list[str]]:
    """q/k/v of one attention and gate/up of one MLP together; every other linear alone."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        prefix, _, leaf = name.rpartition(".")
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
               "up_proj": "gate_up"}.get(leaf)
        groups.setdefault(f"{prefix}.{key}" if key else name, []).append(name)
    return list(groups.values())


def _blocks(w: torch.Tensor) -> torch.Tensor:
    out, inp = w.shape
    return w.float().view(out, inp // formats.NVFP4_GROUP, formats.NVFP4_GROUP)


def _dequant(blocks: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    return formats.e2m1_qdq(blocks, (block_scale.float() * global_scale)[..., None])


def search_block_scales(w: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor | None):
    """FP8 block scales ``[out, in/16]`` minimizing the h-weighted error per block, and that total error."""
    blocks = _blocks(w)
    weight = torch.ones(blocks.shape[1:]) if h is None else h.float().view(blocks.shape[1:])
    base = formats.nvfp4_block_scales(w, global_scale).view(torch.uint8).int()
    best, best_err = None, None
    for k in BLOCK_STEPS:
        code = (base + k).clamp(0, FP8_MAX_CODE).to(torch.uint8).view(formats.FP8_DTYPE)
        err = ((blocks - _dequant(blocks, code, global_scale)).pow(2) * weight).sum(-1)
        if best is None:
            best, best_err = code, err
        else:
            better = err < best_err
            best = torch.where(better, code.view(torch.uint8), best.view(torch.uint8)).view(formats.FP8_DTYPE)
            best_err = torch.minimum(err, best_err)
    return best, float(best_err.sum())


def nvfp4_group_scales(weights: dict[str, torch.Tensor], h: dict[str, torch.Tensor | None], search: bool
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """`weight_scale` (FP8 blocks) and one shared `weight_scale_2` for the linears of one fusion group."""
    amax = max(float(w.float().abs().amax()) for w in weights.values())
    base = formats.nvfp4_global_scale(torch.tensor(amax))
    if not search:
        return {n: {"weight_scale": formats.nvfp4_block_scales(w, base), "weight_scale_2": base}
                for n, w in weights.items()}
    best, best_err = None, None
    for factor in GLOBAL_FACTORS:
        gs = (base * factor).float()
        found = {n: search_block_scales(w, gs, h.get(n)) for n, w in weights.items()}
        err = sum(e for _, e in found.values())
        if best_err is None or err < best_err:
            best, best_err = {n: {"weight_scale": s, "weight_scale_2": gs} for n, (s, _) in found.items()}, err
    return best


def fp8_group_scale(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """One per-tensor FP8 `weight_scale` for a fusion group: the largest amax / 448."""
    amax = max(float(w.float().abs().amax()) for w in weights.values())
    scale = formats.amax_to_scale(torch.tensor(amax))
    return {n: {"weight_scale": scale} for n in weights}


def weight_scales(state_dict: dict[str, torch.Tensor], plan: dict[str, str], input_sq: dict[str, torch.Tensor],
                  search: bool, fuse: bool, gptq_blocks: bool = False
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Scales for the NVFP4 and per-tensor FP8 linears of `plan` (module -> format), and a summary for the report.

    `fuse`: one global / per-tensor scale per fusion group whose linears share the format; `search`: NVFP4 scales by
    output error (the module docstring). `gptq_blocks`: GPTQ chooses the NVFP4 block scales again and keeps only the
    global ones (its baseline is plain rounding with these block scales). The search still runs per block, as that
    error is what picks each global scale, but the searched block scales' error against amax scales is not
    measured, and the summary says the search chose the global scales."""
    scales, searched_err, amax_err, searched = {}, 0.0, 0.0, False
    names = [n for n, f in plan.items() if f in ("nvfp4", "fp8") and f"{n}.weight" in state_dict]
    groups = fusion_groups(names) if fuse else [[n] for n in names]
    for group in groups:
        by_format: dict[str, list[str]] = {}
        for n in group:
            by_format.setdefault(plan[n], []).append(n)
        for fmt, members in by_format.items():
            weights = {n: state_dict[f"{n}.weight"] for n in members if not _unfit(fmt, state_dict[f"{n}.weight"])}
            if not weights:
                continue
            if fmt == "fp8":
                scales.update(fp8_group_scale(weights))
                continue
            found = nvfp4_group_scales(weights, input_sq, search)
            scales.update(found)
            searched |= search
            if search and not gptq_blocks:
                for n, w in weights.items():
                    h = input_sq.get(n)
                    amax_gs = formats.nvfp4_global_scale(w.float().abs().amax())
                    amax_err += _error(w, formats.nvfp4_block_scales(w, amax_gs), amax_gs, h)
                    searched_err += _error(w, found[n]["weight_scale"], found[n]["weight_scale_2"], h)
    summary = {"linears": len(scales), "nvfp4_scales": "mse" if search else "amax", "shared_scales": fuse}
    if amax_err > 0:
        summary["nvfp4_weight_error_ratio"] = round(searched_err / amax_err, 4)  # searched / amax, h-weighted
    if searched and gptq_blocks:
        summary["nvfp4_block_scales"] = "gptq"  # the search's block scales serve GPTQ's baseline only
    return scales, summary


def _unfit(fmt: str, w: torch.Tensor) -> bool:
    return fmt == "nvfp4" and w.shape[1] % formats.NVFP4_GROUP != 0


def _error(w: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, h: torch.Tensor | None) -> float:
    blocks = _blocks(w)
    weight = torch.ones(blocks.shape[1:]) if h is None else h.float().view(blocks.shape[1:])
    return float(((blocks - _dequant(blocks, block_scale, global_scale)).pow(2) * weight).sum())
