"""Copy the tokenizer and its chat template next to the model, as `transformers` saves them.

The chat template ends up in `chat_template.jinja` whether the checkpoint keeps it in that file (transformers 5) or
inside `tokenizer_config.json` (older checkpoints), so the runtime has one place to look.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from contract.errors import InputError
from contract.jsonfile import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE = "chat_template.jinja"


def chat_template(checkpoint_dir: Path) -> str | None:
    """The checkpoint's default chat template, or None when it has none."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / CHAT_TEMPLATE).is_file():
        return (checkpoint_dir / CHAT_TEMPLATE).read_text()
    config_path = checkpoint_dir / "tokenizer_config.json"
    template = read_json(config_path, "the tokenizer config").get("chat_template") if config_path.exists() else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise InputError(f"{config_path}: field 'chat_template' expected a string, found {type(template).__name__}")
    return template


def copy_tokenizer_files(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files that exist and write the chat template; returns the names written."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / "tokenizer.json").is_file():
        raise InputError(f"{checkpoint_dir}: expected tokenizer.json (a fast tokenizer), found no such file")
    written = []
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copyfile(checkpoint_dir / name, out_dir / name)
            written.append(name)
    template = chat_template(checkpoint_dir)
    if template is not None:
        (out_dir / CHAT_TEMPLATE).write_text(template)
        written.append(CHAT_TEMPLATE)
    return written
