"""EAGLE3 speculative decoding on an engine dir's base and draft engines (reference 5.4), greedy.

State between rounds, per row: the base cache holds the committed tokens x[0..n-1]; the root x[n] (the base's
latest token) is in no cache yet. The draft's entry p pairs token x[p+1] with the base's hidden states f[p] and
predicts x[p+2]; its cache holds entries 0..n-1, so the draft and base caches always have the same length. One round:

1. Draft proposals (`runtime/eagle_tree.py`): the draft's log-probs at entry n-1 give the root's K children; each of
   `steps - 1` proposal calls feeds every expanded node (token embedding from the base's table, its parent's draft
   hidden state as `hidden_states_from_draft`, `hidden_states_input` zero) at positions n - 1 + depth, written
   after the committed entries without committing them, and grows the tree by the frontier's top-K.
2. Verification: the root and the best `verify_size - 1` nodes in one base call, tree mask and positions n + depth.
3. Greedy acceptance: the base's top-1 at every node; follow the matching child from the root. Every emitted token
   is the base's top-1 after the tokens before it, so the output is the base's greedy output whatever the draft does.
4. The accepted nodes' K/V move together (`Engine.read_kv` / `write_kv`) and the base cache is cut after them; the
   draft's accept call pairs the emitted tokens with the base's hidden states at the accepted nodes and commits them.

A row that finishes sits later calls out (context length 0). When a round no longer fits a row's cache, the batch
finishes with plain decoding on the base engine (the same greedy tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.eagle3 import D2T_FILE, ROLE_BASE, ROLE_DRAFT, read_d2t_targets
from contract.engine_dir import check_spec_pair, spec_roles
from contract.errors import InputError
from contract.graph_io import (
    HIDDEN_STATES,
    HIDDEN_STATES_FROM_DRAFT,
    HIDDEN_STATES_INPUT,
    LOGITS,
    tree_mask_words,
)
from runtime.eagle_tree import CandidateTree, TreeShape
from runtime.engine import Engine, causal_tree
from runtime.generate import Generation, Job, Timing, decode_plain, new_rows
from runtime.sampling import log_softmax

OUTPUTS = (LOGITS, HIDDEN_STATES)


@dataclass
class SpecEngines:
    """The base and draft of one EAGLE3 engine dir, checked to belong together, and the draft -> base id map."""

    base: Engine
    draft: Engine
    targets: np.ndarray  # int64 [draft_vocab]: base id of each draft id

    @staticmethod
    def load(engine_dir: str | Path) -> "SpecEngines":
        engine_dir = Path(engine_dir)
        roles = spec_roles(engine_dir)
        if not roles and (engine_dir / "config.json").is_file():
            raise InputError(f"--specDecode: expected an EAGLE3 engine dir (base_config.json and draft_config.json "
                             f"from llm-build --specBase / --specDraft), found a vanilla engine in {engine_dir}")
        if ROLE_BASE not in roles:
            raise InputError(f"{engine_dir}: expected an EAGLE3 base engine next to the draft (base_config.json), "
                             "found none; build one with llm-build --specBase")
        if ROLE_DRAFT not in roles:
            raise InputError(f"{engine_dir}: expected an EAGLE3 draft engine next to the base (draft_config.json), "
                             "found none; build one with llm-build --specDraft")
        base, draft = Engine.load(engine_dir, ROLE_BASE), Engine.load(engine_dir, ROLE_DRAFT)
        check_spec_pair(base.config, draft.config, f"{engine_dir} (base_config.json, draft_config.json)")
        draft_vocab = int(draft.config["draft_vocab_size"])
        targets = read_d2t_targets(engine_dir / D2T_FILE, base.vocab_size, draft_vocab).numpy()
        return SpecEngines(base, draft, targets)

    @property
    def max_batch_size(self) -> int:
        return min(self.base.max_batch_size, self.draft.max_batch_size)

    def check_shape(self, shape: TreeShape) -> None:
        """A tree larger than the engines were built for is an InputError (before anything runs)."""
        shape.check(self.base.tree_size, self.draft.tree_size, len(self.targets))


class _TreeCall:
    """The inputs of one tree call for a batch; rows that sit it out keep context length 0 and zeros."""

    def __init__(self, batch: int, seq: int):
        self.tokens = np.zeros((batch, seq), np.int32)
        self.ctx = np.zeros(batch, np.int32)
        self.mask = np.zeros((batch, seq, tree_mask_words(seq)), np.int32)
        self.pos = np.zeros((batch, seq), np.int32)
        self.last = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))

    def row(self, b: int, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        self.tokens[b], self.mask[b], self.pos[b], self.ctx[b] = tokens, mask, positions, len(tokens)


def generate_spec(engines: SpecEngines, tokenizer, jobs: list[Job], max_generate_length: int,
                  shape: TreeShape) -> tuple[list[Generation], Timing]:
    """Greedy EAGLE3 speculative decoding of `jobs` as one batch; the same tokens as `generate` on the base."""
    base, draft = engines.base, engines.draft
    capacity = min(base.max_kv_cache_capacity, draft.max_kv_cache_capacity)
    rows, ids, lengths = new_rows(jobs, max_generate_length, min(base.max_input_len, draft.max_input_len), capacity,
                                  tokenizer, base.eos_token_ids)
    batch, longest = ids.shape
    timing = Timing(prefill_tokens=int(lengths.sum()))

    start = time.perf_counter()
    base_cache, draft_cache = base.new_cache(batch), draft.new_cache(batch)
    mask, pos = causal_tree(np.zeros(batch, np.int32), longest)
    out = base.forward_tree(base_cache, base.embed(ids), lengths, (lengths - 1)[:, None], mask, pos, outputs=OUTPUTS)
    roots = np.array([row.step(out[LOGITS][b, 0]) for b, row in enumerate(rows)], np.int32)
    # the draft's prefill: entry p pairs x[p+1] (the base's first token closes each prompt) with the base's f[p]
    shifted = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        shifted[b, : n - 1], shifted[b, n - 1] = ids[b, 1:n], roots[b]
    root_logp, root_hidden = _draft_commit(engines, draft_cache, shifted, lengths, out[HIDDEN_STATES])
    timing.prefill_s = time.perf_counter() - start
    timing.first_token_s.append(timing.prefill_s)

    start = time.perf_counter()
    while True:
        active = [b for b, row in enumerate(rows) if row.finish_reason is None]
        if not active:
            break
        room = [capacity - int(base_cache.lengths[b]) for b in active]
        if min(room) < max(min(shape.verify_size, shape.candidates), shape.draft_tokens):
            break  # a round would not fit a row's cache: finish plainly below
        trees = {b: CandidateTree.start(shape, engines.targets, int(roots[b]), root_logp[b]) for b in active}
        _propose(engines, draft_cache, trees, root_hidden, shape)
        emitted, hidden_rows = _verify(engines, base_cache, trees, rows, timing)
        for b in active:
            if rows[b].finish_reason is None:
                roots[b] = emitted[b][-1]
        commit_ids = np.zeros((batch, shape.steps + 1), np.int32)
        commit_len = np.zeros(batch, np.int32)
        commit_hidden = np.zeros((batch, shape.steps + 1, hidden_rows.shape[-1]), hidden_rows.dtype)
        for b in active:
            if rows[b].finish_reason is None:
                n = len(emitted[b])
                commit_ids[b, :n], commit_len[b] = emitted[b], n
                commit_hidden[b, :n] = hidden_rows[b, :n]
        if commit_len.any():
            width = int(commit_len.max())
            logp, hidden = _draft_commit(engines, draft_cache, commit_ids[:, :width], commit_len,
                                         commit_hidden[:, :width])
            for b in np.nonzero(commit_len)[0]:
                root_logp[b], root_hidden[b] = logp[b], hidden[b]
    plain = decode_plain(base, base_cache, rows, roots[:, None].copy())  # rows whose cache is nearly full
    timing.decode_tokens += plain
    timing.decode_s = time.perf_counter() - start
    return [row.result() for row in rows], timing


def _draft_commit(engines: SpecEngines, cache, token_ids: np.ndarray, counts: np.ndarray,
                  base_hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The draft's prefill or accept call: `counts[b]` new entries per row (tokens x[p+1] with the base's f[p]),
    causal, committed. Returns each row's log-probs (draft vocab) and hidden state at its last new entry."""
    draft = engines.draft
    batch, seq = token_ids.shape
    mask, pos = causal_tree(cache.lengths.copy(), seq)
    last = np.maximum(counts - 1, 0).astype(np.int64)
    zero = np.zeros((batch, seq, draft.hidden_size), draft.backend.hidden_dtype)
    out = draft.forward_tree(cache, engines.base.embed(np.where(np.arange(seq) < counts[:, None], token_ids, 0)),
                             counts, last[:, None], mask, pos,
                             extra={HIDDEN_STATES_INPUT: base_hidden[:, :seq],
                                    HIDDEN_STATES_FROM_DRAFT: zero}, outputs=OUTPUTS)
    hidden = out[HIDDEN_STATES][np.arange(len(counts)), last]
    return log_softmax(out[LOGITS][:, 0]), hidden


def _propose(engines: SpecEngines, cache, trees: dict[int, CandidateTree], root_hidden: np.ndarray,
             shape: TreeShape) -> None:
    """The `steps - 1` proposal calls: every expanded node with its parent's draft hidden state, uncommitted."""
    draft, batch = engines.draft, cache.batch
    node_hidden = {b: {0: root_hidden[b]} for b in trees}  # draft hidden state per tree node (the root's: entry n-1)
    for _ in range(shape.steps - 1):
        calls = {b: tree.draft_call() for b, tree in trees.items()}
        seq = len(next(iter(calls.values())).nodes)
        feeds = _TreeCall(batch, seq)
        from_draft = np.zeros((batch, seq, draft.hidden_size), draft.backend.hidden_dtype)
        for b, call in calls.items():
            feeds.row(b, call.tokens, call.mask, cache.lengths[b] + call.depths - 1)
            from_draft[b] = [node_hidden[b][trees[b].parents[n]] for n in call.nodes]
        frontier = feeds.last[:, seq - shape.top_k:]  # the frontier is fed last
        base_hidden = np.zeros((batch, seq, int(draft.config["base_model_hidden_size"])), draft.backend.hidden_dtype)
        out = draft.forward_tree(cache, engines.base.embed(feeds.tokens), feeds.ctx, frontier, feeds.mask, feeds.pos,
                                 extra={HIDDEN_STATES_INPUT: base_hidden,
                                        HIDDEN_STATES_FROM_DRAFT: from_draft},
                                 outputs=OUTPUTS, commit=False)
        for b, tree in trees.items():
            node_hidden[b].update({n: out[HIDDEN_STATES][b, i] for i, n in enumerate(calls[b].nodes)})
            tree.grow(log_softmax(out[LOGITS][b]))


def _verify(engines: SpecEngines, cache, trees: dict[int, CandidateTree], rows, timing: Timing):
    """The base's verification call, greedy acceptance, token emission and KV compaction. Returns the tokens each
    row emitted (its new root last) and, per row, the base hidden states at the accepted nodes `[B, n, 3H]`."""
    base, batch = engines.base, cache.batch
    verify = {b: tree.select()[0] for b, tree in trees.items()}
    seq = len(next(iter(verify.values())).tokens)
    starts = cache.lengths.copy()
    feeds = _TreeCall(batch, seq)
    for b, tree in verify.items():
        feeds.row(b, tree.tokens, tree.mask, starts[b] + tree.depths)
    out = base.forward_tree(cache, base.embed(feeds.tokens), feeds.ctx, feeds.last, feeds.mask, feeds.pos,
                            outputs=OUTPUTS, commit=False)
    logits, hidden = out[LOGITS], out[HIDDEN_STATES]
    emitted: dict[int, list[int]] = {}
    hidden_rows = np.zeros((batch, seq, hidden.shape[-1]), hidden.dtype)
    for b, tree in verify.items():
        path, _ = tree.accept(logits[b].argmax(-1))
        tokens = []
        for node in path:  # each accepted node's logits give the next token: the base's own greedy choice
            tokens.append(rows[b].step(logits[b, node]))
            if rows[b].finish_reason is not None:
                break
        timing.spec_steps += 1
        timing.spec_tokens += len(tokens)
        timing.decode_tokens += len(tokens)
        emitted[b] = tokens
        kept = path[: len(tokens)]  # the root and the accepted nodes whose successors were emitted
        base.write_kv(cache, b, int(starts[b]), base.read_kv(cache, b, starts[b] + np.array(kept)))
        cache.lengths[b] = starts[b] + len(kept)
        hidden_rows[b, : len(kept)] = hidden[b, kept]
    return emitted, hidden_rows
