"""Weight scales of the linears a runtime fuses, and the scale search.

Shared scales: q/k/v (and gate/up) read the same input and a runtime fuses them into one GEMM, which needs one
per-tensor scale; ModelOpt writes the largest of the group's (`weight_scale_2` of NVFP4, `weight_scale` of per-tensor
FP8), and so does this module, for every format whose row has `shared_scale` (the format's `group_scales`).

Search (`mse`, formats whose row has `scale_search`: NVFP4): the format's `group_scales(..., search=True)` picks the
scales by output error with E[x^2] per input channel from calibration (plugins/weight_formats/nvfp4.py says how);
`amax` keeps ModelOpt's amax scales.
"""

from __future__ import annotations

import torch

from contract.families import Family
from contract.weight_formats import WEIGHT_FORMATS
from plugins import weight_formats


def fusion_groups(linears: list[str], family: Family) -> list[list[str]]:
    """q/k/v of one attention and gate/up of one MLP together (the family's fusion groups); every other linear
    alone."""
    key_of = {leaf: key for key, leaves in family.fusion_groups().items() for leaf in leaves}
    groups: dict[str, list[str]] = {}
    for name in linears:
        prefix, _, leaf = name.rpartition(".")
        key = key_of.get(leaf)
        groups.setdefault(f"{prefix}.{key}" if key else name, []).append(name)
    return list(groups.values())


def weight_scales(state_dict: dict[str, torch.Tensor], plan: dict[str, str], input_sq: dict[str, torch.Tensor],
                  search: bool, fuse: bool, family: Family, gptq_blocks: bool = False
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Scales for the linears of `plan` (module -> format) whose format shares them (NVFP4, per-tensor FP8), and a
    summary for the report.

    `fuse`: one global / per-tensor scale per fusion group whose linears share the format; `search`: NVFP4 scales by
    output error (the module docstring). `gptq_blocks`: GPTQ chooses the NVFP4 block scales again and keeps only the
    global ones (its baseline is plain rounding with these block scales). The search still runs per block, as that
    error is what picks each global scale, but the searched block scales' error against amax scales is not
    measured, and the summary says the search chose the global scales."""
    scales, searched_err, amax_err, searched = {}, 0.0, 0.0, False
    names = [n for n, f in plan.items() if WEIGHT_FORMATS[f].shared_scale and f"{n}.weight" in state_dict]
    groups = fusion_groups(names, family) if fuse else [[n] for n in names]
    for group in groups:
        by_format: dict[str, list[str]] = {}
        for n in group:
            by_format.setdefault(plan[n], []).append(n)
        for fmt, members in by_format.items():
            ops = weight_formats.get(fmt)
            weights = {n: state_dict[f"{n}.weight"] for n in members
                       if not ops.unfit(tuple(state_dict[f"{n}.weight"].shape))}
            if not weights:
                continue
            search_here = search and ops.FORMAT.scale_search
            found = ops.group_scales(weights, input_sq, search_here)
            scales.update(found)
            searched |= search_here
            if search_here and not gptq_blocks:
                for n, w in weights.items():
                    h = input_sq.get(n)
                    amax_err += ops.scale_error(w, ops.amax_scales(w), h)
                    searched_err += ops.scale_error(w, found[n], h)
    summary = {"linears": len(scales), "nvfp4_scales": "mse" if search else "amax", "shared_scales": fuse}
    if amax_err > 0:
        summary["nvfp4_weight_error_ratio"] = round(searched_err / amax_err, 4)  # searched / amax, h-weighted
    if searched and gptq_blocks:
        summary["nvfp4_block_scales"] = "gptq"  # the search's block scales serve GPTQ's baseline only
    return scales, summary
