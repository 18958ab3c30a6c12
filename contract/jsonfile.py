"""Reading the JSON files a stage is handed (configs, indexes, request files) as clean errors, never tracebacks.

A hostile or broken file can be missing, a directory, not UTF-8, not JSON, nested deeper than any file of the
contract (Python's parser gives up near 1000 levels, and code that walks a value recursively much sooner), or a JSON
value of the wrong kind; each is one InputError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from contract.errors import InputError

MAX_DEPTH = 64  # no config, index or request file of the contract nests more than a handful of levels


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_text(text: str, where: str, what: str):
    """Any JSON value from `text`; InputError naming `where` for bad syntax or nesting too deep to parse."""
    try:
        value = json.loads(text)
        too_deep = _depth(value) > MAX_DEPTH
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: expected valid JSON ({what}), found a syntax error at line {e.lineno} column "
                         f"{e.colno}: {e.msg}") from None
    except RecursionError:  # the C parser itself gives up near 1000 levels
        too_deep = True
    except ValueError as e:  # an integer literal longer than Python converts (4300 digits)
        raise InputError(f"{where}: expected {what} (JSON), found a number it cannot hold ({e})") from None
    if too_deep:
        raise InputError(f"{where}: expected {what} (JSON nested at most {MAX_DEPTH} levels), found deeper nesting")
    return value


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
