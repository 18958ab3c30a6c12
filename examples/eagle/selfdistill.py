"""Self-distillation data for the draft: prompts built from the bundled text, the base's own greedy continuations,
and the base's features and greedy targets at every position.

At inference the draft has to guess the base's greedy continuation, so that is what it trains on: raw-text prompts
(passages of the text, continued as plain text), prose openings (a word of the text in the opening of an
encyclopedia-style sentence, so the base writes modern expository prose rather than verse) and chat prompts
(instructions about passages, lines and words of the text, rendered with the model's chat template and answered by
the base). Every position t of a sequence
x[0..L-1] stores the base's features h[t] (the target layers' hidden states, fp16 as the exported base emits them)
its greedy token after x[0..t] (-1 after an end-of-sequence token), and its `top_k` most likely next tokens with
their log-probabilities (the soft labels the draft trains on).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from contract.errors import InputError
from examples.eagle.draft_model import cache_kwargs

CHAT_PASSAGE = [
    "Continue this passage:\n\n{passage}",
    "Summarize this passage in two sentences:\n\n{passage}",
    "What is happening in this scene?\n\n{passage}",
    "Rewrite this passage in modern English:\n\n{passage}",
    "Who is speaking here, and what do they want?\n\n{passage}",
    "Write a reply to this speech:\n\n{passage}",
]
CHAT_LINE = [
    'Explain the meaning of this line: "{line}"',
    'Translate into plain English: "{line}"',
    'Is this line happy or sad? "{line}"',
]
CHAT_WORD = [
    "Write a short poem about {word}.",
    "Write a short story about {word}.",
    "What is {word}?",
    "Tell me about {word}.",
    "Give me three facts about {word}.",
    "Explain {word} to a child.",
    "List five things related to {word}.",
    'What does the word "{word}" mean?',
    "Write a letter to a friend about {word}.",
    "Why is {word} important?",
    "How would you describe {word} to someone who has never seen it?",
    "Give me some advice about {word}.",
    "Write a short encyclopedia article about {word}.",
    "Write a short history of {word}.",
    "Explain the science of {word}.",
    "Describe the role of {word} in society.",
]
PROSE_OPENINGS = [
    "{Word} is a",
    "The {word} is one of the",
    "{Word} was a",
    "The history of the {word} begins",
    "In the nineteenth century, the {word}",
    "The term {word} refers to",
    "{Word} is a village in",
    "{Word} is a species of",
    "{Word} is a song by",
    "{Word} is a novel by",
    "The Battle of {Word} was",
    "{Word} was born in",
    "The {word} is found in",
    "Most scholars agree that the {word}",
    "In 1920, the {word}",
    "The first recorded use of the word {word}",
]


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def text_prompts(text: str, tokenizer, n: int, rng: random.Random, min_len: int, max_len: int) -> list[list[int]]:
    """`n` raw-text prompts: consecutive paragraphs from a random paragraph on, cut to min_len..max_len tokens."""
    paras = paragraphs(text)
    prompts = []
    while len(prompts) < n:
        start = rng.randrange(len(paras))
        ids: list[int] = []
        for p in paras[start:]:
            ids += tokenizer.encode(p + "\n\n")
            if len(ids) >= max_len:
                break
        if len(ids) >= min_len:
            prompts.append(ids[: rng.randint(min_len, min(max_len, len(ids)))])
    return prompts


def words_of(text: str, count: int) -> list[str]:
    """The `count` most frequent lower-case words of at least 5 letters: topics for chat prompts."""
    counts = Counter(w.lower() for w in re.findall(r"[A-Za-z]{5,}", text))
    return [w for w, _ in counts.most_common(count)]


def prose_prompts(text: str, tokenizer, n: int, rng: random.Random) -> list[list[int]]:
    """`n` distinct openings of expository sentences about words of the text (raw text, continued by the base):
    a repeated opening would repeat its greedy continuation, and could land in training and held-out data alike."""
    openings = [(template, word) for word in words_of(text, 1500) for template in PROSE_OPENINGS]
    if n > len(openings):
        raise InputError(f"--prose_prompts {n}: expected at most {len(openings)} (the distinct openings)")
    return [tokenizer.encode(template.format(word=word, Word=word.capitalize()))
            for template, word in rng.sample(openings, n)]


def chat_messages(text: str, n: int, rng: random.Random) -> list[str]:
    """`n` user messages: instructions about a passage (1-6 lines of a speech), a line, or a word of the text."""
    paras = [p for p in paragraphs(text) if "\n" in p]
    words = words_of(text, 1500)
    messages = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            lines = rng.choice(paras).split("\n")
            passage = "\n".join(lines[: rng.randint(2, 7)])
            messages.append(rng.choice(CHAT_PASSAGE).format(passage=passage))
        elif kind < 0.55:
            line = rng.choice(rng.choice(paras).split("\n")[1:])
            messages.append(rng.choice(CHAT_LINE).format(line=line))
        else:
            messages.append(rng.choice(CHAT_WORD).format(word=rng.choice(words)))
    return messages


def chat_prompt(tokenizer, message: str) -> list[int]:
    """A user message rendered with the model's chat template, generation prompt included."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def features(hidden_states: tuple[torch.Tensor, ...], layer_ids: list[int]) -> torch.Tensor:
    return torch.cat([hidden_states[i] for i in layer_ids], dim=-1).half()


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return top.indices.to(torch.int32), top.values.half()


@torch.no_grad()
def greedy_with_features(base, prompts: list[list[int]], max_new_tokens: int, layer_ids: list[int],
                         eos_token_ids: set[int], pad_id: int, top_k: int = 16) -> dict[str, torch.Tensor]:
    """Greedy-continue a batch of prompts (left-padded, KV-cached) and record every real position.

    Returns a shard: `tokens` int32 [N], `targets` int32 [N] (the base's greedy token after each position, -1 after
    an end-of-sequence token), `top_ids` int32 / `top_logprobs` fp16 [N, top_k] (the base's most likely next
    tokens), `features` fp16 [N, fc_in], `lengths` int64 [B], `prompt_lengths` int64 [B]; the sequences are
    concatenated."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=base.config)
    out = base(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(base, cache),
               output_hidden_states=True)
    feats, argmax = [features(out.hidden_states, layer_ids)], [out.logits.argmax(-1)]
    tops = [top_logprobs(out.logits, top_k)]
    generated = [[] for _ in range(b)]
    alive = [True] * b
    next_pos = positions[:, -1]
    for _ in range(max_new_tokens):
        if not any(alive):
            break
        step = argmax[-1][:, -1]
        for i in range(b):
            if alive[i]:
                generated[i].append(int(step[i]))
                alive[i] = int(step[i]) not in eos_token_ids
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        next_pos = next_pos + 1
        out = base(input_ids=step[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                   **cache_kwargs(base, cache), output_hidden_states=True)
        feats.append(features(out.hidden_states, layer_ids))
        argmax.append(out.logits.argmax(-1))
        tops.append(top_logprobs(out.logits, top_k))
    feats, argmax = torch.cat(feats, dim=1), torch.cat(argmax, dim=1)
    top_ids, top_lps = torch.cat([t[0] for t in tops], dim=1), torch.cat([t[1] for t in tops], dim=1)
    tokens, targets, rows, lengths, ids_rows, lp_rows = [], [], [], [], [], []
    for i, p in enumerate(prompts):
        seq = p + generated[i]
        keep = slice(width - len(p), width - len(p) + len(seq))  # real positions: the prompt, then the generation
        target = argmax[i, keep].clone()
        if seq[-1] in eos_token_ids:
            target[-1] = -1
        tokens.append(torch.tensor(seq, dtype=torch.int32))
        targets.append(target.to(torch.int32))
        rows.append(feats[i, keep])
        ids_rows.append(top_ids[i, keep])
        lp_rows.append(top_lps[i, keep])
        lengths.append(len(seq))
    return {
        "tokens": torch.cat(tokens),
        "targets": torch.cat(targets),
        "features": torch.cat(rows),
        "top_ids": torch.cat(ids_rows),
        "top_logprobs": torch.cat(lp_rows),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.int64),
    }


def save_shard(shard: dict[str, torch.Tensor], path: Path) -> None:
    """Write next to `path` and rename, so a killed run never leaves a truncated shard that looks complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(shard, tmp)
    tmp.replace(path)


def load_shards(paths: list[Path]) -> dict[str, torch.Tensor]:
    shards = [load_file(p) for p in paths]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
