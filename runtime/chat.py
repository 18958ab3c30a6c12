"""Prompt text and token ids for a request: the engine's own tokenizer and chat template, or the raw text.

The engine directory carries the tokenizer files and `chat_template.jinja` exactly as `transformers` saves them, so
`AutoTokenizer.from_pretrained(engine_dir)` is the tokenizer the model was exported with. Template keywords a
template does not use (`enable_thinking` for Llama) are simply ignored by jinja.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import InputError
from runtime.requests import Message


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
    try:
        return AutoTokenizer.from_pretrained(engine_dir, **model_config(engine_dir))
    except (OSError, ValueError) as e:
        raise InputError(f"{engine_dir}: expected a loadable tokenizer, found {type(e).__name__}: {e}") from None


def model_config(engine_dir: Path) -> dict:
    """`{"config": ...}`: the model's transformers config for `AutoTokenizer`, which would otherwise build one from
    ENG/config.json itself; that file is the runtime config (`model`, not HF's `model_type`), so transformers falls
    back to a generic config and warns about its `rope_scaling` key. Empty for a dir without a runtime config."""
    from contract.jsonfile import read_json
    from runtime.rope import hf_config

    path = engine_dir / "config.json"
    config = read_json(path, "the engine config") if path.is_file() else {}
    return {"config": hf_config(config)} if "model" in config else {}


def _template(tokenizer, messages: list[Message], add_generation_prompt: bool, enable_thinking: bool) -> str:
    # Plain string content: most templates (SmolLM2's among them) concatenate message['content'] directly.
    plain = [{"role": m.role, "content": m.text} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)


def format_prompt(tokenizer, messages: list[Message], apply_chat_template: bool, add_generation_prompt: bool,
                  enable_thinking: bool) -> Prompt:
    """Render `messages` to prompt text and token ids.

    With the chat template the text already holds the special tokens, so it is encoded without adding any (as
    `apply_chat_template(tokenize=True)` does). Without it the messages' text is the prompt as is, encoded the way
    the tokenizer encodes plain text (BOS added when the tokenizer is configured to add one).
    """
    n_system = 0
    while n_system < len(messages) and messages[n_system].role == "system":
        n_system += 1
    system = messages[:n_system]
    if apply_chat_template:
        if not tokenizer.chat_template:
            raise InputError(f"{tokenizer.name_or_path}: expected a chat template (chat_template.jinja) for "
                             "apply_chat_template: true, found none; set apply_chat_template to false")
        text = _template(tokenizer, messages, add_generation_prompt, enable_thinking)
        system_text = _template(tokenizer, system, False, enable_thinking) if system else ""
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
