"""The calibration report: per-layer q/k/v amax and scales, KV outliers, and what was left unquantized.

Written as `quantization_report.json` next to the checkpoint and printed as a table. An outlier is a layer whose K or
V amax is more than `OUTLIER_FACTOR` times the median over layers: one per-tensor scale then spends most of FP8's
range on that layer's few large values (the Qwen2.5-7B first/last-layer `k_proj` bias case), and keeping that layer's
KV cache in FP16 (`--kv_cache_fp16_layers`) is the known remedy.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from contract.kv import KvDtype, layer_kv_dtypes

if TYPE_CHECKING:  # imported by the CLI before torch and transformers (contract.cli)
    from quantization.calibrate import Calibration

OUTLIER_FACTOR = 4.0


def kv_outliers(qkv_amax: dict[int, tuple[float, float, float]], factor: float = OUTLIER_FACTOR) -> list[int]:
    """Layers whose K or V amax exceeds `factor` x the median across layers."""
    if len(qkv_amax) < 2:
        return []
    med_k = statistics.median(a[1] for a in qkv_amax.values())
    med_v = statistics.median(a[2] for a in qkv_amax.values())
    return [i for i, (_, k, v) in qkv_amax.items() if k > factor * med_k or v > factor * med_v]


def build_report(
    calib: Calibration,
    weight_format: str,
    kv_dtype: KvDtype,
    kv_fp16_layers: list[int],
    excluded: dict[str, str],
    num_samples: int,
) -> dict:
    """JSON-ready summary; scales are the unclamped amax/448 that the checkpoint carries."""
    from contract.formats import FP8_MAX

    kv_fp8 = kv_dtype is KvDtype.FP8
    per_layer = layer_kv_dtypes(max(calib.qkv_amax, default=-1) + 1, kv_dtype, kv_fp16_layers)
    layers = [
        {
            "layer": i,
            "q_amax": q,
            "k_amax": k,
            "v_amax": v,
            "q_scale": q / FP8_MAX,
            "k_scale": k / FP8_MAX,
            "v_scale": v / FP8_MAX,
            "kv_cache": per_layer[i].value,
        }
        for i, (q, k, v) in calib.qkv_amax.items()
    ]
    outliers = kv_outliers(calib.qkv_amax) if kv_fp8 else []
    warnings = [
        f"layer {i}: K/V amax is more than {OUTLIER_FACTOR:g}x the median over layers; one FP8 scale will lose "
        f"precision there, consider --kv_cache_fp16_layers {','.join(map(str, outliers))}"
        for i in outliers
        if i not in kv_fp16_layers
    ]
    warnings += [f"{m}: kept in fp16 ({why})" for m, why in excluded.items()]
    return {
        "quantization": weight_format,
        "kv_cache_quantization": kv_dtype.value if kv_fp8 else None,
        "kv_scale_clamp": None,
        "num_samples": num_samples,
        "num_tokens": calib.num_tokens,
        "kv_layers": layers,
        "kv_outlier_layers": outliers,
        "kv_cache_fp16_layers": sorted(kv_fp16_layers),
        "input_amax": calib.input_amax,
        "excluded_modules": excluded,
        "warnings": warnings,
    }


def describe_methods(m: dict) -> str:
    """The report's `methods` in a few words: what each method did and the error ratio it reached on its own
    objective (calibration data)."""
    parts = []
    if "auto" in m:
        a = m["auto"]
        parts.append(f"auto: {a['effective_bits']:.2f} bits, linears " +
                     ", ".join(f"{f} {n}" for f, n in a["formats"].items()))
    sm = m.get("smoothing") or {}
    if sm.get("groups"):
        parts.append(f"{sm['method']}: {sm['groups_scaled']}/{sm['groups']} groups scaled, group output error x"
                     f"{sm['output_error_ratio_median']:.2f} (median)")
    ws = m.get("weight_scales") or {}
    if "nvfp4_weight_error_ratio" in ws:
        parts.append(f"nvfp4 scale search: weight error x{ws['nvfp4_weight_error_ratio']:.2f}")
    elif ws.get("nvfp4_block_scales") == "gptq":
        parts.append("nvfp4 scale search: global scales (gptq chose the block scales)")
    if ws.get("shared_scales") and ws.get("linears"):
        parts.append("shared q/k/v, gate/up scales")
    g = m.get("gptq") or {}
    if g.get("linears"):
        parts.append(f"gptq: output error x{g['output_error_ratio']:.2f}")
    return "; ".join(parts)


def format_table(report: dict) -> str:
    """A fixed-width table of the per-layer KV calibration, then the methods' summary and the warnings."""
    lines = []
    if report["kv_layers"]:
        lines.append(f"{'layer':>5} {'q_amax':>10} {'k_amax':>10} {'v_amax':>10} {'k_scale':>10} {'v_scale':>10}  kv")
        for row in report["kv_layers"]:
            flag = "  <- outlier" if row["layer"] in report["kv_outlier_layers"] else ""
            lines.append(
                f"{row['layer']:>5} {row['q_amax']:>10.4g} {row['k_amax']:>10.4g} {row['v_amax']:>10.4g} "
                f"{row['k_scale']:>10.4g} {row['v_scale']:>10.4g}  {row['kv_cache']}{flag}"
            )
    methods = describe_methods(report.get("methods") or {})
    if methods:
        lines.append(f"methods: {methods}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
