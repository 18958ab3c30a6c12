"""Prompt text and token ids for a request: the engine's own tokenizer and chat template, or the raw text.

The engine directory carries the tokenizer files and `chat_template.jinja` exactly as `transformers` saves them, so
`AutoTokenizer.from_pretrained(engine_dir)` is the tokenizer the model was exported with. The template is rendered
the way `tokenizer.apply_chat_template` renders it, but within time and size bounds (`contract.chat_template`: the
template is the checkpoint author's code). Template keywords a template does not use (`enable_thinking` for Llama)
are simply ignored by jinja.

A prompt that cannot fit the engine's `max_input_len` is refused before it is tokenized: no token of the vocabulary
covers more than its longest entry's characters, so a longer text needs more tokens than the engine takes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

from contract import chat_template
from contract.errors import InputError
from contract.jsonfile import read_json
from contract.paths import checked_file
from runtime.requests import Message

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Prompt:
    text: str  # formatted_complete_request
    system_text: str  # formatted_system_prompt: the leading system messages alone, "" when there are none
    token_ids: list[int]


def load_tokenizer(engine_dir: str | Path):
    """The engine directory's tokenizer (InputError when its files are missing or unreadable)."""
    from transformers import AutoTokenizer

    engine_dir = Path(engine_dir)
    if not (engine_dir / "tokenizer.json").is_file() and not (engine_dir / "tokenizer_config.json").is_file():
        raise InputError(f"{engine_dir}: expected tokenizer files (tokenizer.json, tokenizer_config.json), found none")
    for name in TOKENIZER_FILES:  # inside the engine dir, and JSON a reader can walk
        path = checked_file(engine_dir, name, "a tokenizer file", required=False)
        if path is not None and name.endswith(".json") and name != "tokenizer.json":
            read_json(path, "a tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(engine_dir, **model_config(engine_dir))
    except Exception as e:  # OSError / ValueError from transformers, the Rust tokenizer's own type for tokenizer.json
        raise InputError(f"{engine_dir}: expected a loadable tokenizer, found {type(e).__name__}: {e}") from None


def model_config(engine_dir: Path) -> dict:
    """`{"config": ...}`: the model's transformers config for `AutoTokenizer`, which would otherwise build one from
    ENG/config.json itself; that file is the runtime config (`model`, not HF's `model_type`), so transformers falls
    back to a generic config and warns about its `rope_scaling` key. Empty for a dir without a runtime config."""
    from runtime.rope import hf_config

    path = checked_file(engine_dir, "config.json", "the engine config", required=False)
    config = read_json(path, "the engine config") if path is not None else {}
    return {"config": hf_config(config)} if "model" in config else {}


_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # get_vocab takes ~0.2 s: once per tokenizer


def _longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry (for byte-level BPE, bytes): the most text one token covers."""
    if tokenizer not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[tokenizer] = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return _LONGEST_TOKEN[tokenizer]


def max_prompt_chars(tokenizer, max_input_len: int) -> int:
    """No text longer than this fits in `max_input_len` tokens."""
    return max_input_len * _longest_token_chars(tokenizer)


def _template(tokenizer, messages: list[Message], add_generation_prompt: bool, enable_thinking: bool, where: str,
              max_chars: int) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)`, rendered within bounds."""
    source = f"{tokenizer.name_or_path}/chat_template.jinja"
    template = chat_template.compile_template(tokenizer.chat_template, source)
    # Plain string content: most templates (SmolLM2's among them) concatenate message['content'] directly.
    plain = [{"role": m.role, "content": m.text} for m in messages]
    # what apply_chat_template hands a template: the special tokens, then its own keywords
    context = {**tokenizer.special_tokens_map, "enable_thinking": enable_thinking}
    return chat_template.render(template, where, max_chars=max_chars, messages=plain, tools=None, documents=None,
                                add_generation_prompt=add_generation_prompt, **context)


def format_prompt(tokenizer, messages: list[Message], apply_chat_template: bool, add_generation_prompt: bool,
                  enable_thinking: bool, *, where: str = "request", max_input_len: int | None = None) -> Prompt:
    """Render `messages` to prompt text and token ids; `where` names the request in errors.

    With the chat template the text already holds the special tokens, so it is encoded without adding any (as
    `apply_chat_template(tokenize=True)` does). Without it the messages' text is the prompt as is, encoded the way
    the tokenizer encodes plain text (BOS added when the tokenizer is configured to add one). With `max_input_len`,
    a prompt too long for it is refused before it is tokenized.
    """
    max_chars = chat_template.MAX_CHARS if max_input_len is None else max_prompt_chars(tokenizer, max_input_len)

    def check_length(text: str) -> None:
        if max_input_len is not None and len(text) > max_chars:
            raise InputError(f"{where}: expected a prompt of at most {max_input_len} tokens (the engine's "
                             f"max_input_len), found {len(text)} characters, more than {max_input_len} tokens hold")

    n_system = 0
    while n_system < len(messages) and messages[n_system].role == "system":
        n_system += 1
    system = messages[:n_system]
    check_length("".join(m.text for m in messages))
    if apply_chat_template:
        if not tokenizer.chat_template:
            raise InputError(f"{tokenizer.name_or_path}: expected a chat template (chat_template.jinja) for "
                             "apply_chat_template: true, found none; set apply_chat_template to false")
        text = _template(tokenizer, messages, add_generation_prompt, enable_thinking, where, max_chars)
        system_text = _template(tokenizer, system, False, enable_thinking, where, max_chars) if system else ""
        check_length(text)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text = "".join(m.text for m in messages)
        system_text = "".join(m.text for m in system)
        ids = tokenizer.encode(text, add_special_tokens=True)
    return Prompt(text=text, system_text=system_text, token_ids=list(ids))


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token: exact for byte-level BPE (a token may be half a UTF-8 character), else its text."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")
