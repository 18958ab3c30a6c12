"""Would an orthogonal rotation folded into the weights (QuaRot / SpinQuant style) make NVFP4 lose less on SmolLM2?

Tried for issue 14 and not adopted (docs/quantization.md, "Rotations"). The rotation is exact before quantization:
- R1 (residual stream): every RMSNorm weight is folded into the linears that read it (q/k/v, gate/up, lm_head) and
  set to 1, since RMSNorm(x Q) = RMSNorm(x) Q only without the per-channel weight; then the embedding becomes E Q,
  every reader W Q, every writer to the residual (o_proj, down_proj) Q^T W. A tied lm_head gets its own tensor.
- R2 (per head): the V rows of each KV head get H^T, the o_proj input columns of the query heads reading it get H.
Q is a randomized Hadamard matrix H diag(+-1) / sqrt(n) (Sylvester 2^k times a Paley I block of order p + 1 for a
prime p = 3 mod 4, e.g. 576 = 8 * 72), or a seeded random orthogonal matrix; optionally block-diagonal, or leaving
some residual channels unrotated (`keep`, whose norm weights then stay in the norm).

Torch fake-quant as benchmarks/accuracy_breakdown.py (fp32 HF model, amax scales, dynamic per-call activation amax):
every decoder linear's weight and/or input quantized, each setup against the unrotated unquantized model on the same
WikiText-2 windows (each row's KL also as a paired difference from the first setup's with the same fake-quant);
`--awq` first folds the quantizer's AWQ scales (quantization/smoothing.py) into each setup.

    python -m benchmarks.rotation_breakdown [--windows 4] [--window_len 256] [--awq] [--setups ...] [--quant ...]
"""

from __future__ import annotations

import click
import torch

from benchmarks import stats
from benchmarks.accuracy import windows as accuracy_windows
from benchmarks.accuracy_breakdown import (
    KINDS,
    fake_quantized,
    log_probs,
    window_scores,
)
from benchmarks.e2e_cpu import machine
from plugins import weight_formats
from quantization import smoothing
from quantization.datasets import (
    CHARS_PER_TOKEN,
    DEFAULT_DATASET,
    load_texts,
    make_batches,
)

# SmolLM2-135M's residual channels whose amax over layers on 512 tinyshakespeare tokens exceeds 10x the median
# channel's (507 is 291x, then 24x, 24x, 11x, 10x)
OUTLIERS = [507, 17, 247, 14, 100]
SETUPS = {  # label -> rotate() arguments, None = unrotated
    "none": None,
    "R1 hadamard": {"kind": "hadamard", "heads": False},
    "R1+R2 hadamard": {"kind": "hadamard", "heads": True},
    "R1+R2 random orthogonal": {"kind": "random", "heads": True},
    "R1 hadamard in blocks of 16": {"kind": "hadamard", "heads": False, "block": 16},
    "norms folded only": {"kind": "identity", "heads": False},
    "R1 random orthogonal except 5 outlier channels": {"kind": "random", "heads": False, "keep": OUTLIERS},
    "norms folded except 5 outlier channels": {"kind": "identity", "heads": False, "keep": OUTLIERS},
}
QUANT = {  # label -> (weight format or None, input format or None)
    "nvfp4 W+A": ("nvfp4", "nvfp4"),
    "nvfp4 W": ("nvfp4", None),
    "nvfp4 A": (None, "nvfp4"),
    "fp8 W+A": ("fp8", "fp8"),
}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def paley_hadamard(p: int) -> torch.Tensor:
    """Paley construction I, order p + 1 for a prime p = 3 (mod 4): with chi the Legendre symbol, the Jacobsthal
    matrix J[i, j] = chi(j - i) is skew (chi(-1) = -1) with J J^T = p I - 1 1^T, so S = [[0, 1^T], [-1, J]] is skew
    with S S^T = p I and (I + S)(I + S)^T = (p + 1) I."""
    if not (_is_prime(p) and p % 4 == 3):
        raise ValueError(f"Paley I needs a prime p = 3 mod 4, found {p}")
    squares = {(i * i) % p for i in range(1, p)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, p)], dtype=torch.float64)
    idx = torch.arange(p)
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % p]
    return torch.eye(p + 1, dtype=torch.float64) + s


def sylvester_hadamard(n: int) -> torch.Tensor:
    """Order n = 2^k: H_2n = [[H, H], [H, -H]]."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester needs a power of two, found {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n: 2^k, or 2^k (p + 1) with a Paley I order p + 1 (the largest 2^k that
    works); None when neither reaches n."""
    two = n & -n
    if two == n:
        return sylvester_hadamard(n)
    while two >= 1:
        p = n // two - 1
        if _is_prime(p) and p % 4 == 3:
            return torch.kron(sylvester_hadamard(two), paley_hadamard(p))
        two //= 2
    return None


def orthogonal(n: int, seed: int, kind: str = "hadamard", block: int | None = None) -> torch.Tensor:
    """n x n float64: H diag(random +-1) / sqrt(n) for `hadamard` when one of order n exists, else (or for `random`)
    the Q of a seeded Gaussian's QR with signs fixed; `identity`; `block`: block-diagonal of such blocks."""
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    if block is not None and block < n:
        return torch.block_diag(*[orthogonal(block, seed + i, kind) for i in range(n // block)])
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        return h * (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1)[None, :] / n**0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype)


def _fold_norm(norm, readers, keep: list[int]) -> None:
    """The RMSNorm weight into the reading linears' columns (W diag(g)); the norm keeps it only on `keep`."""
    g = norm.weight.data.double().clone()
    g[keep] = 1.0
    for lin in readers:
        _set(lin.weight, lin.weight.data.double() * g[None, :])
    _set(norm.weight, norm.weight.data.double() / g)


@torch.no_grad()
def rotate(model, seed: int = 0, kind: str = "hadamard", heads: bool = True, block: int | None = None,
           keep: list[int] | None = None) -> None:
    """Fold R1 (identity on the residual channels `keep`), and R2 when `heads`, into a Llama / Qwen2 / Qwen3 HF
    model in place (float64 math, each parameter's dtype kept); a tied lm_head is untied."""
    cfg, keep = model.config, keep or []
    hidden, hq, hkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or hidden // hq
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.data.clone())
    model.config.tie_word_embeddings = False
    rest = torch.tensor([i for i in range(hidden) if i not in keep])
    q1 = torch.eye(hidden, dtype=torch.float64)
    q1[rest[:, None], rest[None, :]] = orthogonal(len(rest), seed, kind, block)
    q2 = orthogonal(d, seed + 1, kind, block)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], keep)
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], keep)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _set(lin.weight, lin.weight.data.double() @ q1)
        for lin in (attn.o_proj, mlp.down_proj):
            _set(lin.weight, q1.T @ lin.weight.data.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.data.double() @ q1)
        if heads:
            v = attn.v_proj.weight.data.double().view(hkv, d, -1)
            _set(attn.v_proj.weight, (q2.T[None] @ v).reshape(hkv * d, -1))
            if attn.v_proj.bias is not None:
                _set(attn.v_proj.bias, (attn.v_proj.bias.data.double().view(hkv, d) @ q2).reshape(-1))
            o = attn.o_proj.weight.data.double().view(-1, hq, d)
            _set(attn.o_proj.weight, (o @ q2).reshape(-1, hq * d))
    _fold_norm(model.model.norm, [head], keep)
    _set(emb.weight, emb.weight.data.double() @ q1)
    _set(head.weight, head.weight.data.double() @ q1)


@click.command()
@click.option("--windows", "n_windows", default=4, show_default=True, help="WikiText-2 windows.")
@click.option("--window_len", default=256, show_default=True, help="Tokens per window.")
@click.option("--quant", default=",".join(QUANT), show_default=True, help="Comma-separated fake-quant settings.")
@click.option("--setups", default=",".join(SETUPS), show_default=True, help="Comma-separated rotations.")
@click.option("--awq", is_flag=True, help="Fold the quantizer's NVFP4 AWQ scales (8 tinyshakespeare samples x 256 "
              "tokens) after the rotation, as `llm-quantize` would.")
def main(n_windows: int, window_len: int, quant: str, setups: str, awq: bool) -> None:
    """KL / top-1 of fake-quantized SmolLM2 with and without rotations, against the unrotated fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_loader.gguf_convert import smollm2_checkpoint

    torch.set_num_threads(2)
    ckpt = smollm2_checkpoint()
    windows = [torch.from_numpy(w).long() for w in accuracy_windows(ckpt, n_windows, window_len)]
    awq_batches = []
    if awq:  # the AWQ search's samples, tokenized once for every setup
        texts = load_texts(DEFAULT_DATASET, 8, 256 * CHARS_PER_TOKEN, 0)
        awq_batches = list(make_batches(AutoTokenizer.from_pretrained(ckpt), texts, 256, 4))

    def load(setup: str | None):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
        if setup is None:
            return model
        if SETUPS[setup] is not None:
            rotate(model, seed=0, **SETUPS[setup])
        if awq:
            plan = {n: "nvfp4" for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in KINDS}
            smoothing.smooth(model, awq_batches, plan, "awq")
        return model

    reference = log_probs(load(None), windows)
    base = stats.TokenScores.stack([stats.TokenScores.of_window(r, r, w[1:].numpy())
                                    for r, w in zip(reference, windows)])
    idx = stats.draws(n_windows)
    first: dict[str, stats.TokenScores] = {}  # fake-quant setting -> its scores under the first setup

    def score(label: str, model, q: str = "") -> None:
        sc = window_scores(model, windows, reference)
        f = stats.summary(sc, base, idx)
        paired = ""
        if q in first:
            d = stats.interval(stats.difference(stats.kl_mean(sc), stats.kl_mean(first[q])), idx)
            paired = f"{stats.compare(d)} vs the first setup (paired)"
        first.setdefault(q, sc)
        print(f"| {label} | {f['kl'].fmt('.4f')} | {f['top1'].fmt('.1f', 100, '%')} | {paired} |", flush=True)

    print(f"{n_windows} x {window_len} WikiText-2 tokens{', AWQ folded' if awq else ''}; "
          f"machine: {machine(with_load=True)}")
    print("| setup, fake-quantized | KL mean | top-1 | KL difference |\n|---|---|---|---|")
    for setup in setups.split(","):
        model = load(setup)
        score(f"{setup}, unquantized", model)  # the rotation (and AWQ) alone: exact, KL ~0
        linears = {n: m for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in KINDS}
        for q in quant.split(","):
            wfmt, afmt = QUANT[q]
            with fake_quantized(linears, wfmt and (lambda w, f=wfmt: weight_formats.get(f).weight_qdq(w)),
                                afmt and (lambda _n, x, f=afmt: weight_formats.get(f).input_qdq(x))):
                score(f"{setup}, {q}", model, q)


if __name__ == "__main__":
    main()
