"""`--quantization auto --effective_bits B`: a format per linear group (nvfp4, fp8 or fp16) by measured sensitivity.

Sensitivity, as ModelOpt's `auto_quantize` measures it: one forward and backward pass of the language-model loss on a
few calibration samples; for each linear and format, the output change that fake-quantizing its weight and input
causes, weighted by the squared gradient of the loss at that output (a diagonal-Fisher estimate of the loss
increase), summed over real tokens. Linears a runtime fuses (q/k/v, gate/up) get one format together.

Choice: minimize the summed sensitivity subject to the weight bits (contract.weight_formats' bits per weight, scales
included) averaged over the decoder linears being at most B. A Lagrange multiplier picks each group's format
(score + lambda * bits), bisected to the budget, then leftover bits upgrade the groups that gain most per bit.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from contract.families import Family, family_of_model
from contract.weight_formats import UNQUANTIZED, WEIGHT_FORMATS
from plugins import weight_formats
from quantization.choices import AUTO_CANDIDATES
from quantization.scale_search import fusion_groups

CANDIDATES = AUTO_CANDIDATES
SAMPLES = 8  # calibration samples the sensitivities are measured on


def sensitivities(model, batches, linears: list[str], formats=CANDIDATES) -> dict[str, dict[str, float]]:
    """linear -> format -> estimated loss increase (fp16: 0)."""
    modules = dict(model.named_modules())
    qweights = {n: {f: weight_formats.get(f).weight_qdq(modules[n].weight.detach().float()) for f in formats
                    if f != UNQUANTIZED} for n in linears}
    scores = {n: dict.fromkeys(formats, 0.0) for n in linears}
    groups = fusion_groups(linears, family_of_model(model))  # q/k/v, gate/up: one input, fake-quantized once for the group
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    qinputs: dict[int, dict[str, torch.Tensor]] = {}  # group -> format -> its fake-quantized input (current batch)
    pending: dict[int, int] = {}  # group -> members whose gradient has not come yet (the entry goes with the last)
    handles = []
    for name in linears:
        def forward_hook(_m, args, out, name=name):
            x = args[0].detach().float()

            def on_grad(g, x=x):
                y = x @ modules[name].weight.detach().float().T
                gid = group_of[name]
                shared = qinputs.setdefault(gid, {})
                for f, wq in qweights[name].items():
                    if f not in shared:
                        shared[f] = weight_formats.get(f).input_qdq(x)
                    delta = shared[f] @ wq.T - y
                    scores[name][f] += float((delta * g.float()).pow(2).sum())
                pending[gid] = pending.get(gid, len(groups[gid])) - 1
                if pending[gid] == 0:
                    del qinputs[gid], pending[gid]

            out.register_hook(on_grad)

        handles.append(modules[name].register_forward_hook(forward_hook))
    device = next(model.parameters()).device
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for batch in tqdm(batches, desc="sensitivity", unit="batch"):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # so backward hooks fire
            loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            qinputs.clear()
            pending.clear()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return scores


def choose_formats(scores: dict[str, dict[str, float]], sizes: dict[str, int], effective_bits: float,
                   family: Family) -> dict[str, str]:
    """linear -> format with mean bits per weight <= `effective_bits` and the least summed score; one format per
    fusion group of the `family`."""
    groups = fusion_groups(list(scores), family)
    options = [[f for f in CANDIDATES if f in scores[g[0]]] for g in groups]
    score = [{f: sum(scores[n][f] for n in g) for f in opts} for g, opts in zip(groups, options)]
    numel = [sum(sizes[n] for n in g) for g in groups]
    total = sum(numel)
    budget = effective_bits * total
    bits = {f: WEIGHT_FORMATS[f].bits for f in CANDIDATES}

    def pick(lam: float) -> list[str]:
        return [min(opts, key=lambda f: s[f] + lam * n * bits[f]) for opts, s, n in zip(options, score, numel)]

    def used(choice: list[str]) -> float:
        return sum(n * bits[f] for n, f in zip(numel, choice))

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget and hi < 1e30:
        hi *= 10
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(pick(mid)) > budget else (lo, mid)
    choice = pick(hi)
    while True:  # spend what is left on the best gain per extra bit
        left = budget - used(choice)
        upgrades = [(( score[i][choice[i]] - score[i][f]) / (numel[i] * (bits[f] - bits[choice[i]])), i, f)
                    for i, opts in enumerate(options) for f in opts
                    if bits[f] > bits[choice[i]] and numel[i] * (bits[f] - bits[choice[i]]) <= left
                    and score[i][f] < score[i][choice[i]]]
        if not upgrades:
            break
        _, i, f = max(upgrades)
        choice[i] = f
    return {n: f for g, f in zip(groups, choice) for n in g}


def effective_bits(plan: dict[str, str], sizes: dict[str, int]) -> float:
    """Mean bits per weight over the linears of `sizes` (fp16 where `plan` has none)."""
    total = sum(sizes.values())
    return sum(n * WEIGHT_FORMATS[plan.get(name, UNQUANTIZED)].bits for name, n in sizes.items()) / total
