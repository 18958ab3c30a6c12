"""benchmarks/calibration.py derives every calibration size from one pass: the per-sample amax it records, maxed over
the first n samples and their first L tokens, must equal what the quantizer's own calibration (quantization.calibrate)
measures on exactly those tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY

from benchmarks.calibration import WINDOW, record_amax
from quantization.calibrate import calibrate
from quantization.datasets import Batch

SPIKE = 5  # a token whose embedding is one large channel: its activations dominate every amax of layer 0


def sample_rows(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Random tokens (never SPIKE) with SPIKE after token WINDOW of row 0 and early in row 4: a size that keeps the
    wrong tokens or the wrong samples then records a different amax."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(SPIKE + 1, 49152, (n,), generator=g) for n in lengths]
    rows[0][WINDOW + 10] = SPIKE
    rows[4][20] = SPIKE
    return rows


def batches_of(rows: list[torch.Tensor], max_len: int, batch_size: int = 2) -> list[Batch]:
    """Rows cut at `max_len` and right-padded per batch, as quantization.datasets.make_batches makes them."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = [r[:max_len] for r in rows[start:start + batch_size]]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), 2)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for i, r in enumerate(chunk):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        out.append(Batch(ids, mask))
    return out


@pytest.mark.parametrize("n, length", [(3, WINDOW), (5, 2 * WINDOW)])
def test_recorded_amax_of_a_size_equals_calibrating_on_it(tiny_checkpoint, n, length):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[SPIKE] = torch.nn.functional.one_hot(torch.tensor(3), TINY["hidden_size"]) * 50
    names = [m for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in m]
    rows = sample_rows([300, 200, 280, 310, 260, 290])  # one shorter than WINDOW, the rest longer
    records, _, _, tokens = record_amax(model, batches_of(rows, 2 * WINDOW), names)
    assert tokens == sum(len(r) for r in rows)
    expected = calibrate(model, batches_of(rows[:n], length), names, kv=False).input_amax
    columns = 1 if length <= WINDOW else 2
    for name in names:
        assert float(records[name][:n, :columns].max()) == pytest.approx(expected[name], rel=1e-5), name
