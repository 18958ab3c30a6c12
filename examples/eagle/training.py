"""Training an EAGLE3 draft on self-distillation data: the draft vocabulary, batches, the training-time-test loss,
and a resumable training loop.

Loss: at every unrolled step k (see `draft_model.unrolled_forward`) the cross-entropy of the draft's distribution
against the base's next-token distribution (its top-16 log-probabilities, restricted to the draft vocabulary and
renormalized: soft labels carry the base's ranking, which the tree's top-K candidates need), weighted 0.8^k as in
EAGLE3. Accuracy is top-1 against the base's greedy token and counts a token outside the draft vocabulary as a miss,
so `chain_estimate` (1 + acc0 + acc0 acc1 + ...) estimates the tokens per verification of a 1-wide chain.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from examples.eagle.draft_model import unrolled_forward
from quantization.eagle3 import Eagle3Draft

IGNORE = -2  # no target at all (padding, past the sequence, after end-of-sequence)
OUT_OF_VOCAB = -1  # the base's token is not in the draft vocabulary: cannot be predicted, counts as a miss


@dataclass
class Sequences:
    """Concatenated sequences of a self-distillation data set (see `selfdistill.greedy_with_features`)."""

    tokens: torch.Tensor  # int32 [N]
    targets: torch.Tensor  # int32 [N], -1 = none
    top_ids: torch.Tensor  # int32 [N, k]: the base's most likely next tokens ...
    top_logprobs: torch.Tensor  # fp16 [N, k]: ... and their log-probabilities
    features: torch.Tensor  # fp16 [N, fc_in]
    starts: list[int]
    lengths: list[int]

    @classmethod
    def from_shard(cls, shard: dict[str, torch.Tensor]) -> Sequences:
        lengths = shard["lengths"].tolist()
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        return cls(shard["tokens"], shard["targets"], shard["top_ids"], shard["top_logprobs"], shard["features"],
                   starts, lengths)

    def __len__(self) -> int:
        return len(self.lengths)


def choose_draft_vocab(targets: torch.Tensor, size: int, base_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `size` most frequent base greedy tokens (ties: lower id), in ascending id order.

    Returns `d2t` int64 [size] in the EAGLE offset form (target id = draft id + d2t[draft id]) and `t2d` bool
    [base_vocab] (True for the target ids in the draft vocabulary)."""
    counts = torch.bincount(targets[targets >= 0].long(), minlength=base_vocab)
    ids = counts.argsort(descending=True, stable=True)[:size].sort().values
    t2d = torch.zeros(base_vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(size), t2d


def target_to_draft(t2d: torch.Tensor) -> torch.Tensor:
    """int64 [base_vocab]: the draft id of each base token, OUT_OF_VOCAB where there is none."""
    table = torch.full(t2d.shape, OUT_OF_VOCAB, dtype=torch.int64)
    table[t2d] = torch.arange(int(t2d.sum()))
    return table


def init_draft(config: dict, base, d2t: torch.Tensor, fc_in: int, seed: int) -> Eagle3Draft:
    """A fresh draft that starts as a damped "logit lens" of the base at the deepest target layer: `fc` passes that
    layer's hidden state through (the other blocks start at zero), the lm_head holds the base's output rows of the
    draft vocabulary and the final norm is the base's at a fifth of its scale (at full scale the untrained draft's
    guesses are wildly overconfident, which measurably slows the start). The decoder layer starts random and learns
    the step ahead."""
    torch.manual_seed(seed)
    draft = Eagle3Draft(config, fc_in)
    ids = d2t + torch.arange(len(d2t))
    hidden = draft.fc.weight.shape[0]
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, fc_in - hidden :] = torch.eye(hidden)
        draft.lm_head.weight.copy_(base.get_output_embeddings().weight[ids].float())
        draft.norm.weight.copy_(0.2 * base.model.norm.weight.float())
    return draft


def make_batches(lengths: list[int], indices: list[int], max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of at most `max_tokens` padded tokens, in random order."""
    order = sorted(indices, key=lambda i: (lengths[i], rng.random()))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    aux: torch.Tensor  # [B, S, fc_in] base features h[0..S-1]
    embeds: torch.Tensor  # [B, S + steps - 1, H] embeddings of x[1..]
    targets: torch.Tensor  # int64 [B, S + steps - 1]: draft id of the base's token after x[t+1], or IGNORE / OUT_OF_VOCAB
    soft_ids: torch.Tensor  # int64 [B, S + steps - 1, k]: draft ids of the base's top tokens (0 where none) ...
    soft_probs: torch.Tensor  # [B, S + steps - 1, k]: ... and their probabilities, renormalized over the draft vocab


def collate(data: Sequences, idx: list[int], steps: int, to_draft: torch.Tensor, embed) -> Batch:
    s = max(data.lengths[i] for i in idx) - 1
    width = s + steps - 1
    aux = torch.zeros(len(idx), s, data.features.shape[1])
    next_ids = torch.zeros(len(idx), width, dtype=torch.int64)
    targets = torch.full((len(idx), width), IGNORE, dtype=torch.int64)
    k = data.top_ids.shape[1]
    soft_ids = torch.zeros(len(idx), width, k, dtype=torch.int64)
    soft_probs = torch.zeros(len(idx), width, k)
    for row, i in enumerate(idx):
        start, n = data.starts[i], data.lengths[i]
        aux[row, : n - 1] = data.features[start : start + n - 1].float()
        next_ids[row, : n - 1] = data.tokens[start + 1 : start + n].long()
        t = data.targets[start + 1 : start + n].long()
        targets[row, : n - 1] = torch.where(t >= 0, to_draft[t.clamp(min=0)], IGNORE)
        ids = to_draft[data.top_ids[start + 1 : start + n].long()]
        probs = data.top_logprobs[start + 1 : start + n].float().exp() * (ids >= 0)
        soft_ids[row, : n - 1] = ids.clamp(min=0)
        soft_probs[row, : n - 1] = probs / probs.sum(-1, keepdim=True).clamp(min=1e-6)
    with torch.no_grad():
        embeds = embed(next_ids).float()
    return Batch(aux, embeds, targets, soft_ids, soft_probs)


def ttt_loss(draft: Eagle3Draft, batch: Batch, steps: int, decay: float = 0.8):
    """Weighted soft cross-entropy over the unrolled steps; also returns per step how often the base's greedy token
    is the draft's top-1 and in its top-10 (a tree's top-K), and how many positions counted."""
    s = batch.aux.shape[1]
    hidden = unrolled_forward(draft, batch.embeds, batch.aux, steps)
    loss = torch.zeros(())
    correct, top10, counted = torch.zeros(steps), torch.zeros(steps), torch.zeros(steps)
    for k, h in enumerate(hidden):
        target = batch.targets[:, k : k + s]
        rows = target != IGNORE
        logits = draft.lm_head(draft.norm(h[rows])).float()
        target = target[rows]
        probs = batch.soft_probs[:, k : k + s][rows]
        logq = F.log_softmax(logits, dim=-1).gather(-1, batch.soft_ids[:, k : k + s][rows])
        loss = loss + decay**k * -(probs * logq).sum(-1).sum() / rows.sum().clamp(min=1)
        known = target >= 0
        correct[k] = ((logits.argmax(-1) == target) & known).sum()
        top10[k] = ((logits.topk(min(10, logits.shape[-1]), dim=-1).indices == target[:, None]).any(-1) & known).sum()
        counted[k] = rows.sum()
    return loss, correct, top10, counted


def chain_estimate(accuracy: list[float]) -> float:
    """1 + a0 + a0 a1 + ...: expected tokens per verification of a chain as deep as the unrolled steps."""
    total, prob = 1.0, 1.0
    for a in accuracy:
        prob *= a
        total += prob
    return total


@torch.no_grad()
def evaluate(draft, data: Sequences, idx: list[int], steps: int, to_draft, embed, max_tokens: int):
    """Per-step top-1 accuracy and top-10 recall of the base's greedy token on held-out sequences (fp32)."""
    draft.eval()
    correct, top10, counted = torch.zeros(steps), torch.zeros(steps), torch.zeros(steps)
    for b in make_batches(data.lengths, idx, max_tokens, random.Random(0)):
        _, c, c10, n = ttt_loss(draft, collate(data, b, steps, to_draft, embed), steps)
        correct, top10, counted = correct + c, top10 + c10, counted + n
    draft.train()
    return (correct / counted.clamp(min=1)).tolist(), (top10 / counted.clamp(min=1)).tolist()


@dataclass
class TrainOptions:
    steps: int  # unrolled training-time-test steps
    epochs: int
    batch_tokens: int
    lr: float
    warmup: int
    seed: int
    save_every: int  # optimizer steps between checkpoints
    bf16: bool  # bf16 autocast for the matmuls (the master weights stay fp32)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(draft: Eagle3Draft, data: Sequences, train_idx: list[int], eval_idx: list[int], to_draft, embed,
          o: TrainOptions, state_path: Path) -> dict:
    """Train `draft` in place, checkpointing to `state_path` (resumed from it when present). Returns the history."""
    optimizer = torch.optim.AdamW(draft.parameters(), lr=o.lr, betas=(0.9, 0.95), weight_decay=0.0)
    per_epoch = len(make_batches(data.lengths, train_idx, o.batch_tokens, random.Random(0)))
    total = per_epoch * o.epochs
    history = {"train": [], "eval": []}
    done = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        history, done = state["history"], state["step"]
        print(f"resuming training at step {done}/{total} from {state_path}", flush=True)

    def save(step: int) -> None:
        tmp = state_path.with_name(f".{state_path.name}.tmp")
        torch.save({"draft": draft.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                    "step": step}, tmp)
        tmp.replace(state_path)

    draft.train()
    bar = tqdm(total=total, initial=done, desc="training draft", unit="step")
    step = 0
    for epoch in range(o.epochs):
        batches = make_batches(data.lengths, train_idx, o.batch_tokens, random.Random(o.seed * 1000 + epoch))
        for idx in batches:
            step += 1
            if step <= done:
                continue
            for group in optimizer.param_groups:
                group["lr"] = o.lr * lr_factor(step - 1, o.warmup, total)
            batch = collate(data, idx, o.steps, to_draft, embed)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=o.bf16):
                loss, correct, _, counted = ttt_loss(draft, batch, o.steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            optimizer.step()
            acc = (correct / counted.clamp(min=1)).tolist()
            history["train"].append({"step": step, "loss": loss.item(), "acc": acc, "tokens": int(counted[0])})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{acc[0]:.3f}", acc1=f"{acc[min(1, o.steps - 1)]:.3f}")
            if step % o.save_every == 0:
                save(step)
        if step > done or not any(e["epoch"] == epoch for e in history["eval"]):
            acc, top10 = evaluate(draft, data, eval_idx, o.steps, to_draft, embed, o.batch_tokens)
            history["eval"].append({"epoch": epoch, "step": step, "acc": acc, "top10": top10,
                                    "chain": chain_estimate(acc)})
            tqdm.write(f"epoch {epoch}: held-out top-1 per step {[round(a, 3) for a in acc]} (chain estimate "
                       f"{chain_estimate(acc):.2f}), top-10 {[round(a, 3) for a in top10]}")
            save(step)
    bar.close()
    return history
