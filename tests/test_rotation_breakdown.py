"""The rotation experiment of benchmarks/rotation_breakdown.py: its conclusion (rotations raise the NVFP4 loss on
SmolLM2) rests on the rotated model computing exactly what the original computes, and on the matrices being what
they claim. References: plain formulas for the Hadamard constructions (Sylvester's entries (-1)^popcount(i & j),
Paley's from the Legendre symbol by Euler's criterion) and the unmodified `transformers` model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model

from benchmarks import rotation_breakdown as rotation


def legendre(a: int, p: int) -> int:
    a %= p
    return 0 if a == 0 else (1 if pow(a, (p - 1) // 2, p) == 1 else -1)


def paley_formula(p: int) -> torch.Tensor:
    """Paley I, entry by entry: row/column 0 border (+1 above, -1 left), 1 on the diagonal, chi(j - i) elsewhere."""
    n = p + 1
    h = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j:
                h[i, j] = 1
            elif i == 0:
                h[i, j] = 1
            elif j == 0:
                h[i, j] = -1
            else:
                h[i, j] = legendre(j - i, p)
    return h


# n, its power-of-two factor: the largest 2^k whose cofactor n / 2^k - 1 is a prime = 3 mod 4 (or 2^k = n)
@pytest.mark.parametrize("n,two", [(1, 1), (2, 2), (8, 8), (64, 64), (12, 1), (24, 2), (72, 1), (576, 8), (1536, 128)])
def test_hadamard_matrices_are_hadamard_and_match_the_formulas(n, two):
    h = rotation.hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)
    i = torch.arange(two)
    sylvester = ((-1.0) ** torch.tensor([bin(int(a) & int(b)).count("1") for a in i for b in i])).view(two, two)
    expected = sylvester.double() if two == n else torch.kron(sylvester.double(), paley_formula(n // two - 1))
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


@pytest.mark.parametrize("n,hadamard", [(576, True), (64, True), (28, False), (40, True)])
def test_rotation_matrices_are_orthogonal(n, hadamard):
    q = rotation.orthogonal(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (rotation.hadamard(n) is not None) == hadamard
    if hadamard:  # H diag(+-1) / sqrt(n): every entry +-1/sqrt(n), and H recovered up to column signs
        torch.testing.assert_close(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
        signs = torch.sign(q[0]) * torch.sign(rotation.hadamard(n)[0])
        torch.testing.assert_close(q * n**0.5, rotation.hadamard(n) * signs[None, :])
    torch.testing.assert_close(q, rotation.orthogonal(n, seed=3), rtol=0, atol=0)  # seeded
    assert not torch.equal(q, rotation.orthogonal(n, seed=4))
    q = rotation.orthogonal(n, seed=3, kind="random")
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


CASES = [  # family, overrides: tied and untied Llama, Qwen2 (q/k/v biases), Qwen3 (q_norm / k_norm after q/k proj)
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
]


R1_R2 = {"kind": "hadamard", "heads": True}
# R1 + R2 Hadamard on every family; the benchmark's other rotations on tied Llama
RUNS = [(f, o, R1_R2) for f, o in CASES] + [(*CASES[0], setup) for setup in (
    {"kind": "hadamard", "heads": False},
    {"kind": "random", "heads": True},
    {"kind": "hadamard", "heads": True, "block": 16},
    {"kind": "random", "heads": False, "keep": [3, 40]},
)]


@pytest.mark.parametrize("family,overrides,setup", RUNS, ids=[
    f"{f}{'-tied' if o else ''}-{'-'.join(str(v) for v in s.values())}" for f, o, s in RUNS])
def test_rotated_model_computes_the_same_logits(tiny_checkpoint, family, overrides, setup):
    model = hf_model(tiny_checkpoint(family, **overrides))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # norms that are not all ones, so folding them matters
        if name.endswith("norm.weight"):
            p.data = 1 + 0.3 * torch.randn(p.shape, generator=g)
    reference = hf_model(tiny_checkpoint(family, **overrides))
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 49152, (2, 16), generator=g)
    with torch.no_grad():
        ref = reference(ids).logits
        rotation.rotate(model, seed=0, **setup)
        ours = model(ids).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not model.config.tie_word_embeddings and emb.data_ptr() != head.data_ptr()
    assert not torch.allclose(emb, reference.get_input_embeddings().weight, atol=1e-3)  # really rotated
    layer, ref_layer = model.model.layers[0], reference.model.layers[0]
    keep = setup.get("keep", [])
    for norm, ref_norm in ((layer.input_layernorm, ref_layer.input_layernorm), (model.model.norm, reference.model.norm)):
        expected = torch.ones_like(norm.weight)
        expected[keep] = ref_norm.weight[keep]
        torch.testing.assert_close(norm.weight, expected)
    if keep:  # kept channels are neither rotated nor mixed into the others
        torch.testing.assert_close(emb[:, keep], reference.get_input_embeddings().weight[:, keep])
    if family == "qwen3":  # untouched: they act on q/k per head, which R1 leaves as they were
        torch.testing.assert_close(layer.self_attn.q_norm.weight, ref_layer.self_attn.q_norm.weight)
