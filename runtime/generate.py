"""Batched generation on an `Engine`: one prefill for prompts of different lengths, then one token per row per step.

The prefill call takes the prompts right-padded to the longest, with `context_lengths` = each prompt's length and
`last_token_ids` = its last position, so every row gets the logits of its own last token. Each decode step feeds one
token per row; a finished row sits the step out with context length 0, so its cache and its neighbours' results are
untouched. A row stops at an eos id of the engine, at one of its stop strings (the text is cut before it), or after
`max_generate_length` tokens (or when its KV cache is full).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from contract.errors import InputError
from runtime.sampling import SamplingParams, sample, top_logprobs

# finish_reason values of the reference (5.3)
END_OF_SEQUENCE, MAX_LENGTH, STOP_WORDS = "end-of-sequence", "max-length", "stop-words"
OnTokens = Callable[[int], None] | None  # told how many tokens each step sampled (progress reports)


@dataclass
class Job:
    """One prompt to continue, with its own sampling settings."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    num_logprobs: int = 0
    seed: int = 0
    name: str = "request"  # for error messages, e.g. "cases.json: requests[3]"


@dataclass
class Generation:
    token_ids: list[int]  # every sampled token, a final eos included
    text: str  # the generated text only: special tokens skipped, cut before a stop string
    finish_reason: str
    logprobs: list[list[tuple[int, float]]]  # per sampled token, the top num_logprobs (id, logprob); [] when off


@dataclass
class Timing:
    """Counters of one or more batches; `profile()` turns them into the --dumpProfile numbers."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    first_token_s: list[float] = field(default_factory=list)  # per batch: prefill + first sample
    spec_steps: int = 0  # speculative decoding: verification passes, counted per row taking part
    spec_tokens: int = 0  # tokens those passes emitted (accepted draft tokens plus the base's own)

    def add(self, other: "Timing") -> None:
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        self.first_token_s += other.first_token_s
        self.spec_steps += other.spec_steps
        self.spec_tokens += other.spec_tokens

    def profile(self) -> dict:
        profile = {
            "prefill_tokens": self.prefill_tokens,
            "prefill_seconds": self.prefill_s,
            "prefill_tokens_per_second": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens": self.decode_tokens,
            "decode_seconds": self.decode_s,
            "decode_tokens_per_second": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "time_to_first_token_ms": 1000 * float(np.mean(self.first_token_s)) if self.first_token_s else 0.0,
        }
        if self.spec_steps:
            profile.update(spec_decode_steps=self.spec_steps,
                           mean_accepted_tokens_per_step=self.spec_tokens / self.spec_steps)
        return profile


class Row:
    """The state of one batch row while it generates."""

    def __init__(self, job: Job, limit: int, tokenizer, eos: set[int]):
        self.job, self.limit, self.tokenizer, self.eos = job, limit, tokenizer, eos
        self.rng = np.random.default_rng(job.seed)
        self.tokens: list[int] = []
        self.logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.text = ""

    def step(self, logits: np.ndarray) -> int:
        """Sample the next token from this row's logits and decide whether the row is done."""
        token = sample(logits, self.job.sampling, self.rng)
        self.tokens.append(token)
        if self.job.num_logprobs:
            self.logprobs.append(top_logprobs(logits, self.job.num_logprobs))
        if token in self.eos:
            self.finish_reason = END_OF_SEQUENCE
        elif self.job.stop and self._hit_stop():
            self.finish_reason = STOP_WORDS
        elif len(self.tokens) >= self.limit:
            self.finish_reason = MAX_LENGTH
        return token

    def _hit_stop(self) -> bool:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.job.stop) if i >= 0]
        if cuts:
            self.text = text[: min(cuts)]
        return bool(cuts)

    def result(self) -> Generation:
        text = self.text if self.finish_reason == STOP_WORDS else self.tokenizer.decode(
            self.tokens, skip_special_tokens=True)
        return Generation(self.tokens, text, self.finish_reason, self.logprobs)


def check_prompts(jobs: list[Job], max_input_len: int) -> None:
    """InputError for the first prompt an engine of `max_input_len` cannot take in one call."""
    for job in jobs:
        if not 1 <= len(job.prompt_ids) <= max_input_len:
            raise InputError(f"{job.name}: expected a prompt of 1..{max_input_len} tokens (the engine's "
                             f"max_input_len), found {len(job.prompt_ids)}")


def new_rows(jobs: list[Job], max_generate_length: int, max_input_len: int, capacity: int, tokenizer,
             eos: list[int]) -> tuple[list[Row], np.ndarray, np.ndarray]:
    """The rows' states, and the prompts right-padded `[B, longest]` with their lengths; InputError for a prompt
    the engine cannot take."""
    check_prompts(jobs, max_input_len)
    # A row's last sampled token never enters the cache, hence the +1.
    rows = [Row(j, min(max_generate_length, capacity - len(j.prompt_ids) + 1), tokenizer, set(eos)) for j in jobs]
    lengths = np.array([len(j.prompt_ids) for j in jobs], np.int32)
    ids = np.zeros((len(jobs), int(lengths.max())), np.int32)
    for b, job in enumerate(jobs):
        ids[b, : lengths[b]] = job.prompt_ids
    return rows, ids, lengths


def decode_plain(engine, cache, rows: list[Row], step_ids: np.ndarray, on_tokens: OnTokens = None) -> int:
    """One token per unfinished row per step until every row is done; `step_ids` int32 [B,1] holds each row's
    latest token (not yet in the cache). Returns the tokens decoded; `on_tokens(n)` hears of each step's."""
    decoded = 0
    while True:
        active = np.array([row.finish_reason is None for row in rows], np.int32)
        if not active.any():
            return decoded
        logits = engine.forward(cache, step_ids, active, np.zeros((len(rows), 1), np.int64))[:, 0]
        for b, row in enumerate(rows):
            if active[b]:
                step_ids[b, 0] = row.step(logits[b])
        decoded += int(active.sum())
        if on_tokens:
            on_tokens(int(active.sum()))


def generate(engine, tokenizer, jobs: list[Job], max_generate_length: int,
             on_tokens: OnTokens = None) -> tuple[list[Generation], Timing]:
    """Continue every prompt of `jobs` as one batch (at most engine.max_batch_size) and time it; `on_tokens(n)` is
    told after each step how many tokens it sampled (for progress reports)."""
    rows, ids, lengths = new_rows(jobs, max_generate_length, engine.max_input_len, engine.max_kv_cache_capacity,
                                  tokenizer, engine.eos_token_ids)
    timing = Timing(prefill_tokens=int(lengths.sum()))

    start = time.perf_counter()
    cache = engine.new_cache(len(jobs))
    logits = engine.forward(cache, ids, lengths, (lengths - 1).astype(np.int64)[:, None])[:, 0]
    timing.prefill_s = time.perf_counter() - start
    step_ids = np.array([[row.step(logits[b])] for b, row in enumerate(rows)], np.int32)
    timing.first_token_s.append(time.perf_counter() - start)
    if on_tokens:
        on_tokens(len(rows))

    start = time.perf_counter()
    timing.decode_tokens = decode_plain(engine, cache, rows, step_ids, on_tokens)
    timing.decode_s = time.perf_counter() - start
    return [row.result() for row in rows], timing
