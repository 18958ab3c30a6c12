"""Checks of single JSON fields (counts, numbers), shared by every reader of a config file: a bool is no count, a
float such as 64.0 is no layer count, a huge integer is no float."""

from __future__ import annotations

import math

from contract.errors import InputError


def is_int(value) -> bool:
    """A JSON integer: Python's bool is an int, but `true` is no count, index or token id."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(config: dict, key: str, where: str, *, required: bool = True) -> int | None:
    """`config[key]` as a positive int (a bool, a float such as 64.0 or a string is refused)."""
    value = config.get(key)
    if value is None and not required:
        return None
    if not is_int(value) or value <= 0:
        raise InputError(f"{where}: {key}: expected a positive integer, found {value!r:.60}")
    return value


def positive_number(config: dict, key: str, where: str, *, default: float | None = None) -> float:
    """`config[key]` as a finite positive number."""
    value = config.get(key, default)
    try:  # a JSON integer of hundreds of digits is a valid int that no float holds
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"{where}: {key}: expected a finite positive number, found {value!r:.60}")
    return number
