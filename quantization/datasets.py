"""Calibration text: where it comes from and how it becomes padded, masked token batches.

`--text_dataset` takes a local file (.txt, .jsonl, .json) or a registered name. The default, `tinyshakespeare`,
ships inside this package so calibration works offline. The reference's names (`cnn_dailymail`, `wikitext`) go
through the `datasets` library; offline, point `EDGELLM_QUANT_DATASET_<NAME>` at a local file, as the reference does.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from contract.errors import InputError
from contract.jsonfile import parse_json_text, read_json_value

if TYPE_CHECKING:  # the CLI imports this module before torch (contract.cli)
    import torch

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_DATASET = "tinyshakespeare"
BUILTIN = {"tinyshakespeare": DATA_DIR / "tinyshakespeare.txt"}
# name -> (HF hub id, config, split, text field), as the reference registers them
REGISTERED = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "train", "article"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
}
TEXT_FIELDS = ("text", "article", "content")
CHARS_PER_TOKEN = 4  # how much text a sample needs to fill --max_seq_len tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, S], right-padded
    attention_mask: torch.Tensor  # int64 [B, S], 1 = real token


def load_texts(name_or_path: str, num_samples: int, max_chars: int, seed: int = 0) -> list[str]:
    """`num_samples` non-empty texts (fewer if the source has fewer) from a file or a registered name.

    Plain text is split at blank lines and consecutive paragraphs are joined up to `max_chars`, so that a sample of
    a play or an article is long enough to fill the sequence length. When the source holds more samples than asked
    for, `seed` picks which.
    """
    texts = _load_all(name_or_path, num_samples, max_chars)
    if len(texts) > num_samples:
        texts = random.Random(seed).sample(texts, num_samples)
    return texts


def _load_all(name_or_path: str, num_samples: int, max_chars: int) -> list[str]:
    env = os.environ.get(f"EDGELLM_QUANT_DATASET_{name_or_path.upper()}")
    if env:
        return _load_all(env, num_samples, max_chars)
    if name_or_path in BUILTIN:
        return _chunk_paragraphs(BUILTIN[name_or_path].read_text(encoding="utf-8"), max_chars)
    if name_or_path in REGISTERED:
        return _load_hub(name_or_path, num_samples)
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join([*BUILTIN, *REGISTERED])
        raise InputError(
            f"--text_dataset {name_or_path}: expected a .txt/.jsonl/.json file or one of {names}, found neither"
        )
    if path.suffix == ".jsonl":
        lines = _read_text(path).splitlines()
        texts = [_record_text(parse_json_text(line, f"{path} line {i + 1}", "a calibration record"), path, i + 1)
                 for i, line in enumerate(lines) if line.strip()]
    elif path.suffix == ".json":
        records = read_json_value(path, "calibration records")
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a JSON list of strings or objects, found {type(records).__name__}")
        texts = [_record_text(r, path, i) for i, r in enumerate(records)]
    else:
        return _chunk_paragraphs(_read_text(path), max_chars)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{path}: expected calibration text, found none")
    return texts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: expected UTF-8 calibration text, found bytes that are not UTF-8 ({e.reason} at byte "
                         f"{e.start})") from None


def _record_text(record, path: Path, where: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for field in TEXT_FIELDS:
            if isinstance(record.get(field), str):
                return record[field]
    raise InputError(
        f"{path} record {where}: expected a string or an object with one of {TEXT_FIELDS}, found {record!r:.60}"
    )


def _chunk_paragraphs(text: str, max_chars: int) -> list[str]:
    chunks, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    if not chunks:
        raise InputError("calibration text: expected at least one non-empty paragraph, found none")
    return chunks


def _load_hub(name: str, num_samples: int) -> list[str]:
    repo, config, split, field = REGISTERED[name]
    hint = f"pass a local file with --text_dataset PATH or set EDGELLM_QUANT_DATASET_{name.upper()}=PATH"
    try:
        import datasets
    except ImportError:
        raise InputError(f"--text_dataset {name}: expected the `datasets` package, found none; {hint}") from None
    try:
        data = datasets.load_dataset(repo, config, split=f"{split}[:{num_samples * 2}]")
    except Exception as e:  # network or hub errors come in many types
        raise InputError(f"--text_dataset {name}: expected to download {repo}, found {type(e).__name__}; {hint}") from e
    texts = [t for t in data[field] if t and t.strip()]
    if not texts:
        raise InputError(f"--text_dataset {name}: expected text in field {field!r}, found none")
    return texts


def make_batches(tokenizer, texts: list[str], max_seq_len: int, batch_size: int) -> Iterator[Batch]:
    """Tokenize, truncate to `max_seq_len` and right-pad per batch; the mask marks the real tokens."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_seq_len,
        )
        yield Batch(enc["input_ids"], enc["attention_mask"])
