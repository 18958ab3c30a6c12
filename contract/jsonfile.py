"""Reading the JSON files a stage is handed (configs, indexes, request files) as clean errors, never tracebacks.

A hostile or broken file can be missing, a directory, not UTF-8, not JSON, too deeply nested for Python's parser
(RecursionError), or a JSON value of the wrong kind; each is one InputError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from contract.errors import InputError


def parse_json_text(text: str, where: str, what: str):
    """Any JSON value from `text`; InputError naming `where` for bad syntax or nesting too deep to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: expected valid JSON ({what}), found a syntax error at line {e.lineno} column "
                         f"{e.colno}: {e.msg}") from None
    except RecursionError:  # the C parser gives up near 1000 levels; no file of this contract comes close
        raise InputError(f"{where}: expected {what} (JSON), found nesting too deep to parse") from None


def read_json_value(path: str | Path, what: str):
    """Any JSON value from the file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: expected {what}, found no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: expected {what} (a JSON file), found a directory") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: expected {what} (UTF-8 JSON), found bytes that are not UTF-8 ({e.reason} at "
                         f"byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: expected {what}, could not read it ({e.strerror or e})") from None
    return parse_json_text(text, str(path), what)


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from the file at `path` (configs, indexes)."""
    data = read_json_value(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected {what} (a JSON object), found {type(data).__name__}")
    return data
