"""The tokenizer files each stage carries along (checkpoint -> quantized checkpoint -> export -> engine dir).

A stage copies them only after checking that each is a regular file inside the directory it reads (`contract.paths`)
and parsing it: `tokenizer.json` with the `tokenizers` library, other JSON files as JSON objects, a chat template as
Jinja (`contract.chat_template`). So a checkpoint whose `tokenizer.json` links to `/etc/shadow`, or whose template
does not compile, fails at the first stage with one line instead of travelling into the engine dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from contract.chat_template import compile_template
from contract.errors import InputError
from contract.jsonfile import parse_json_text
from contract.paths import checked_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE = "chat_template.jinja"
PARSED = (".json", ".jinja")  # the kinds of file check_content parses


def check_content(path: Path, data: bytes) -> None:
    """Parse a tokenizer-side file by its name; InputError naming it when it does not parse."""
    name = path.name
    if not name.endswith(PARSED):
        return  # binary (tokenizer.model, a safetensors sidecar) or plain text (merges.txt): nothing to parse here
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: expected UTF-8 text, found bytes that are not UTF-8 ({e.reason} at byte "
                         f"{e.start})") from None
    if name.endswith(".jinja"):
        compile_template(text, str(path))
    elif name == "tokenizer.json":  # the Rust parser bounds its own nesting
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(text)
        except Exception as e:  # the Rust library raises its own exception type
            raise InputError(f"{path}: expected a tokenizers tokenizer.json, found one it cannot load ({e})") from None
    elif not isinstance(value := parse_json_text(text, str(path), "a tokenizer file"), dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")


def read_checked(root: Path, name: str) -> bytes | None:
    """The bytes of `root/name` after the checks of the module docstring; None when the file does not exist."""
    path = checked_file(root, name, "a tokenizer file", required=False)
    if path is None:
        return None
    data = path.read_bytes()
    check_content(path, data)
    return data


def copy_checked(src: Path, dst: Path, names) -> list[str]:
    """Copy each of `names` that exists in `src` to `dst`, checked (files with nothing to parse are streamed);
    returns the names copied."""
    copied = []
    for name in names:
        if name.endswith(PARSED):
            data = read_checked(Path(src), name)
            if data is not None:
                (Path(dst) / name).write_bytes(data)
                copied.append(name)
        elif (path := checked_file(src, name, "a file to copy", required=False)) is not None:
            shutil.copyfile(path, Path(dst) / name)
            copied.append(name)
    return copied
