"""Per-channel scaling of linear inputs, searched on calibration data and folded into the preceding norm or linear.

A linear's input channel j can be divided by s_j and its weight column j multiplied by s_j without changing its
output. Quantization does not commute with that: the scale moves difficulty between weights and activations. Two
ways to pick s, each searched over alpha on a slice of the calibration data by the output error of the quantized
linears (sum over the group of ||Q(x / s) Q(W s)^T - x W^T||^2 / ||x W^T||^2), with "no scaling" always a candidate:
- `awq` (activation-aware weight quantization, as ModelOpt's awq_lite): s = mean|x|^a / mean(|w| / block amax)^(1-a),
  which protects the weight columns that meet large activations (NVFP4's 8 levels per block are the loss);
- `smoothquant`: s = max|x|^a / max|w|^(1-a), which flattens activation outlier channels into the weights so that
  one static per-tensor FP8 input scale covers the rest better.

The scale is folded, never stored: into the RMSNorm weight before q/k/v and before gate/up (one s per group, since
the linears share the norm and a runtime fuses them), into v_proj's output rows before o_proj (GQA: one s per KV
channel, repeated over the query heads that read it), and into up_proj's output rows before down_proj (down's input
is silu(gate) * up, linear in up). Each fold is exact in real arithmetic, so the checkpoint keeps ModelOpt's plain
layout and the exporter and runtime have nothing new to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from contract.families import family_of_model
from contract.weight_formats import WEIGHT_FORMATS
from plugins import weight_formats
from quantization.scale_search import fusion_groups

ALPHAS = tuple(i / 5 for i in range(6))  # half as fine as ModelOpt awq_lite's 0.1 steps: a CPU search in minutes
SEARCH_TOKENS = 512  # calibration tokens (sampled from the search samples) each group is searched on


@dataclass
class ScaleGroup:
    """Linears that read the output of `source` (an RMSNorm, or a linear whose output rows get divided)."""

    source: str
    linears: list[str]
    heads: tuple[int, int, int] | None = None  # (q heads, kv heads, head_dim) when v_proj feeds o_proj

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Source channels -> input channels of the linears."""
        if self.heads is None:
            return s
        hq, hkv, d = self.heads
        return s.view(hkv, 1, d).expand(hkv, hq // hkv, d).reshape(hq * d)

    def reduce(self, t: torch.Tensor, how: str) -> torch.Tensor:
        """Input-channel statistic -> source channels (over the query heads that share a KV head)."""
        if self.heads is None:
            return t
        hq, hkv, d = self.heads
        t = t.view(hkv, hq // hkv, d)
        return (t.mean(1) if how == "mean" else t.amax(1)).reshape(-1)


def scale_groups(model, plan: dict[str, str]) -> list[ScaleGroup]:
    """The foldable groups of every decoder layer that holds at least one linear of `plan`: the members of a fusion
    group (`scale_search.fusion_groups`) share the source their family's `smoothing_sources` names."""
    cfg, family = model.config, family_of_model(model)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    sources, v_proj = family.smoothing_sources(), family.linears()["v"]
    modules = dict(model.named_modules())
    groups = []
    for i in range(cfg.num_hidden_layers):
        p = f"{family.layer(i)}."
        linears = [n for n, m in modules.items() if n.startswith(p) and isinstance(m, torch.nn.Linear)]
        for members in fusion_groups(linears, family):
            source = sources.get(members[0].removeprefix(p))
            if source and p + source in modules and any(n in plan for n in members):
                heads = (hq, hkv, d) if source == v_proj else None  # GQA: one scale per KV channel
                groups.append(ScaleGroup(p + source, members, heads))
    return groups


@torch.no_grad()
def capture_inputs(model, batches, groups: list[ScaleGroup], tokens: int = SEARCH_TOKENS, seed: int = 0):
    """fp32 inputs ``[T, in]`` of each group (the same T real tokens for all), sampled from `batches`."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    per_batch = -(-tokens // max(len(batches), 1))
    state: dict = {"rows": None}
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(groups))}

    handles = []
    for i, g in enumerate(groups):
        def hook(_m, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1])
            captured[i].append(x[state["rows"]].float().cpu())

        handles.append(modules[g.linears[0]].register_forward_pre_hook(hook))
    try:
        for batch in batches:
            real = torch.nonzero(batch.attention_mask.reshape(-1).bool()).squeeze(1)
            pick = real[torch.randperm(len(real), generator=rng)[:per_batch]]
            state["rows"] = pick.to(device)
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(xs) for i, xs in captured.items()}


def _statistics(method: str, x: torch.Tensor, weights: list[torch.Tensor], fmts: list[str], g: ScaleGroup):
    """Per-source-channel activation and weight statistics of `method`."""
    if method == "awq":
        act = g.reduce(x.abs().mean(0), "mean")
        rows = []
        for w, fmt in zip(weights, fmts):
            block = WEIGHT_FORMATS[fmt].awq_block or w.shape[1]
            blocks = w.abs().view(w.shape[0], -1, block)
            rows.append((blocks / blocks.amax(-1, keepdim=True).clamp_min(1e-12)).view_as(w))
        wst = g.reduce(torch.cat(rows).mean(0), "mean")
    else:
        act = g.reduce(x.abs().amax(0), "amax")
        wst = g.reduce(torch.cat(weights).abs().amax(0), "amax")
    return act.clamp_min(1e-8), wst.clamp_min(1e-8)


def _scale(act: torch.Tensor, wst: torch.Tensor, alpha: float) -> torch.Tensor:
    s = (act.pow(alpha) / wst.pow(1 - alpha)).clamp(1e-4, 1e4)
    return s / (s.max() * s.min()).sqrt()


def output_error(x: torch.Tensor, weights: list[torch.Tensor], fmts: list[str], refs: list[torch.Tensor],
                 s: torch.Tensor | None) -> float:
    """Sum over the linears of the relative squared output error with inputs divided by `s` (None: unscaled)."""
    xs = x if s is None else x / s
    amax = float(xs.abs().amax())
    inputs = {fmt: weight_formats.get(fmt).input_qdq(xs, amax) for fmt in set(fmts)}  # q/k/v share their input and usually a format
    total = 0.0
    for w, fmt, ref in zip(weights, fmts, refs):
        ws = w if s is None else w * s
        out = inputs[fmt] @ weight_formats.get(fmt).weight_qdq(ws).T
        total += float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
    return total


@dataclass
class GroupResult:
    group: ScaleGroup
    alpha: float | None  # None: no scaling won
    error_ratio: float  # output error with the chosen scale / without scaling


def search_group(method: str, g: ScaleGroup, x: torch.Tensor, weights: list[torch.Tensor],
                 fmts: list[str]) -> tuple[torch.Tensor | None, GroupResult]:
    """The scale (source channels) with the lowest output error over `ALPHAS` and no scaling."""
    refs = [x @ w.T for w in weights]
    plain = output_error(x, weights, fmts, refs, None)
    best, best_alpha, best_err = None, None, plain
    act, wst = _statistics(method, x, weights, fmts, g)
    for alpha in ALPHAS:
        s = _scale(act, wst, alpha)
        err = output_error(x, weights, fmts, refs, g.expand(s))
        if err < best_err:
            best, best_alpha, best_err = s, alpha, err
    return best, GroupResult(g, best_alpha, best_err / plain if plain > 0 else 1.0)


@torch.no_grad()
def fold(model, g: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the source's output channels by `s` and multiply the linears' input columns by it (exact)."""
    modules = dict(model.named_modules())
    source = modules[g.source]
    s = s.to(source.weight.device)
    if isinstance(source, torch.nn.Linear):
        source.weight.data = (source.weight.float() / s[:, None]).to(source.weight.dtype)
        if source.bias is not None:
            source.bias.data = (source.bias.float() / s).to(source.bias.dtype)
    else:  # RMSNorm: y = norm(x) * weight
        source.weight.data = (source.weight.float() / s).to(source.weight.dtype)
    se = g.expand(s)
    for name in g.linears:
        lin = modules[name]
        lin.weight.data = (lin.weight.float() * se[None, :]).to(lin.weight.dtype)


def smooth(model, batches, plan: dict[str, str], method: str, seed: int = 0) -> list[GroupResult]:
    """Search and fold one scale per group (see the module docstring); `plan` maps each quantized linear to its
    format. Returns what each group chose."""
    if method == "none":
        return []
    groups = scale_groups(model, plan)
    inputs = capture_inputs(model, batches, groups, seed=seed)
    modules = dict(model.named_modules())
    results = []
    for i, g in enumerate(tqdm(groups, desc=f"{method} scales", unit="group")):
        weights = [modules[n].weight.detach().float().cpu() for n in g.linears]
        fmts = [plan.get(n, "fp16") for n in g.linears]
        s, result = search_group(method, g, inputs.pop(i), weights, fmts)
        if s is not None:
            fold(model, g, s)
        results.append(result)
    return results


def summarize(method: str, results: list[GroupResult]) -> dict:
    """The calibration report's entry: how many groups took a scale, the alphas, the output-error ratios."""
    if not results:
        return {"method": method}
    ratios = sorted(r.error_ratio for r in results)
    return {
        "method": method,
        "groups": len(results),
        "groups_scaled": sum(r.alpha is not None for r in results),
        "alphas": {str(a): sum(r.alpha == a for r in results) for a in sorted({r.alpha for r in results if r.alpha
                                                                                is not None})},
        "output_error_ratio_median": ratios[len(ratios) // 2],
        "output_error_ratio_min": ratios[0],
        "per_group": {f"{r.group.source} -> {','.join(n.rsplit('.', 1)[-1] for n in r.group.linears)}":
                      {"alpha": r.alpha, "error_ratio": round(r.error_ratio, 4)} for r in results},
    }
