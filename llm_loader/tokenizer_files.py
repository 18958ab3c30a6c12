"""Copy the tokenizer and its chat template next to the model, as `transformers` saves them.

The chat template ends up in `chat_template.jinja` whether the checkpoint keeps it in that file (transformers 5) or
inside `tokenizer_config.json` (older checkpoints), so the runtime has one place to look. Every file is checked
(inside the checkpoint, and parsed) before it is copied: `contract.tokenizer_files`.
"""

from __future__ import annotations

from pathlib import Path

from contract.chat_template import compile_template
from contract.errors import InputError
from contract.jsonfile import read_json
from contract.paths import checked_file
from contract.tokenizer_files import (
    CHAT_TEMPLATE,
    TOKENIZER_FILES,
    copy_checked,
    read_checked,
)


def chat_template(checkpoint_dir: Path) -> str | None:
    """The checkpoint's default chat template (compiled once to check it), or None when it has none."""
    checkpoint_dir = Path(checkpoint_dir)
    data = read_checked(checkpoint_dir, CHAT_TEMPLATE)
    if data is not None:
        return data.decode("utf-8")
    config_path = checked_file(checkpoint_dir, "tokenizer_config.json", "the tokenizer config", required=False)
    template = read_json(config_path, "the tokenizer config").get("chat_template") if config_path else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise InputError(f"{config_path}: field 'chat_template' expected a string, found {type(template).__name__}")
    if template is not None:
        compile_template(template, f"{config_path} chat_template")
    return template


def copy_tokenizer_files(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files that exist and write the chat template; returns the names written."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    checked_file(checkpoint_dir, "tokenizer.json", "tokenizer.json (a fast tokenizer)")
    written = copy_checked(checkpoint_dir, out_dir, TOKENIZER_FILES)
    template = chat_template(checkpoint_dir)
    if template is not None:
        (out_dir / CHAT_TEMPLATE).write_text(template)
        written.append(CHAT_TEMPLATE)
    return written
