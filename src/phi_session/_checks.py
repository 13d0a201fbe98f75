"""Argument checks shared by the public API: a wrong type is a `TypeError` naming the argument."""

from __future__ import annotations


def check_type(name: str, value: object, expected: type, *, optional: bool = False) -> None:
    """`TypeError` unless `value` is an `expected` (a bool is no int), or None when `optional`."""
    if (value is None and optional) or (isinstance(value, expected) and not isinstance(value, bool)):
        return
    alternative = " or None" if optional else ""
    raise TypeError(f"{name} must be {expected.__name__}{alternative}, not {type(value).__name__}")
