"""Calibration: run text through the HF model and keep the running max |x| that the static scales need.

Two kinds of amax, both over real tokens only (the batch's attention mask drops right padding, which the reference
lets into its calibrators):
- the input of each quantized linear (`input_scale` of FP8 and NVFP4);
- the post-RoPE (and, for Qwen3, post-QK-norm) Q, K and V of every layer (the FP8 KV cache's q/k/v scales). These
  exist only inside HF's attention forward, so we register an attention function with `transformers`'
  `AttentionInterface` that records them and then runs the stock SDPA attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from contract.families import family_of_model
from quantization.datasets import Batch
from quantization.scale_search import fusion_groups

ATTN_IMPL = "edgellm_calibration"


@dataclass
class Calibration:
    """amax per linear input (module name -> float) and per layer post-RoPE q/k/v (layer -> (q, k, v)). The input
    statistics of the searches are per input: the linears of one fusion group (q/k/v, gate/up) read one input and
    share one tensor."""

    input_amax: dict[str, float] = field(default_factory=dict)
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # mean x^2 per input channel (NVFP4 scale search)
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)  # mean x x^T [in, in] (GPTQ)
    qkv_amax: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    num_tokens: int = 0


class _Observer:
    """Holds the current batch's token mask and folds each observed tensor's masked amax into a running max."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # bool [B, S]
        self.input_amax: dict[str, torch.Tensor] = {}
        self.input_sq: dict[str, torch.Tensor] = {}  # per fusion group: sum of x^2 per channel over real tokens
        self.hessian: dict[str, torch.Tensor] = {}  # per fusion group: sum of x x^T over real tokens
        self.qkv_amax: dict[int, torch.Tensor] = {}

    def tokens_amax(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| over the real tokens of a ``[B, S, ...]`` tensor."""
        return x[self.mask].detach().abs().amax().float()

    def update(self, table: dict, key, value: torch.Tensor) -> None:
        table[key] = value if key not in table else torch.maximum(table[key], value)


def _calibration_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that first records amax of q/k/v ``[B, H, S, D]`` (post-RoPE, before the GQA repeat)."""
    observer: _Observer | None = getattr(module, "_edgellm_observer", None)
    if observer is not None:
        amax = torch.stack([observer.tokens_amax(t.transpose(1, 2)) for t in (query, key, value)])
        observer.update(observer.qkv_amax, module.layer_idx, amax)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, _calibration_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


@contextmanager
def _observing(model, linear_names: list[str], observer: _Observer, kv: bool, square_names: set[str],
               hessian_names: set[str], groups: list[list[str]]):
    """Install the hooks (and the recording attention) for the duration of the block, then restore the model. The
    statistics of the input that the linears of one of `groups` read are kept once, under the group's first."""
    modules = dict(model.named_modules())
    first = {g[0]: g for g in groups}
    handles = []
    for name in linear_names:
        group = first.get(name, ())
        squares, hessian = bool(square_names.intersection(group)), bool(hessian_names.intersection(group))

        def hook(_module, args, name=name, squares=squares, hessian=hessian):
            observer.update(observer.input_amax, name, observer.tokens_amax(args[0]))
            if squares or hessian:
                x = args[0][observer.mask].detach().float()
                if squares:
                    observer.input_sq[name] = observer.input_sq.get(name, 0) + x.pow(2).sum(0)
                if hessian:
                    observer.hessian[name] = observer.hessian.get(name, 0) + x.T @ x

        handles.append(modules[name].register_forward_pre_hook(hook))
    family = family_of_model(model)
    attention = [m for m in modules.values() if hasattr(m, "layer_idx") and hasattr(m, family.k_proj)] if kv else []
    previous_impl = model.config._attn_implementation
    for m in attention:
        m._edgellm_observer = observer
    if kv:
        model.set_attn_implementation(ATTN_IMPL)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in attention:
            del m._edgellm_observer
        if kv:
            model.set_attn_implementation(previous_impl)


@torch.no_grad()
def calibrate(model, batches: list[Batch], linear_names: Iterable[str], kv: bool,
              square_names: Iterable[str] = (), hessian_names: Iterable[str] = ()) -> Calibration:
    """Run `batches` through `model` (no KV cache) and return the amax of the named linears' inputs and of q/k/v,
    the mean x^2 per input channel of `square_names` and the mean x x^T of `hessian_names` (both subsets of
    `linear_names`; one tensor per fusion group, which its named members share)."""
    observer = _Observer()
    device = next(model.parameters()).device
    num_tokens = 0
    linear_names = list(linear_names)
    # the decoder alone unless the lm_head is calibrated: logits are a fifth of a small model's work, and unused here
    lm_head = family_of_model(model).lm_head
    forward = model if any(n == lm_head or n.endswith(f".{lm_head}") for n in linear_names) else model.base_model
    square_names, hessian_names = set(square_names), set(hessian_names)
    wanted = square_names | hessian_names
    family = family_of_model(model)
    groups = fusion_groups([n for n in linear_names if n in wanted], family)  # the linears that read one input
    with _observing(model, linear_names, observer, kv, square_names, hessian_names, groups):
        for batch in tqdm(batches, desc="calibrating", unit="batch"):
            observer.mask = batch.attention_mask.to(device).bool()
            num_tokens += int(observer.mask.sum())
            forward(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False)

    def per_linear(sums: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
        """The group sums as means, one tensor per group that its members in `names` share."""
        means = {first: (v / max(num_tokens, 1)).cpu() for first, v in sums.items()}
        return {n: means[g[0]] for g in groups for n in g if n in names}

    return Calibration(
        input_amax={k: float(v) for k, v in observer.input_amax.items()},
        input_sq=per_linear(observer.input_sq, square_names),
        hessian=per_linear(observer.hessian, hessian_names),
        qkv_amax={k: tuple(float(x) for x in v) for k, v in sorted(observer.qkv_amax.items())},
        num_tokens=num_tokens,
    )
