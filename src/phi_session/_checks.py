"""Checks of the values a caller hands phi-session, made once where a value enters (a
constructor, a scope's start or finish), never per event.

A value of the wrong type raises `TypeError`; one of the right type that phi-core
cannot hold (a stop reason it does not know, a negative count) `InvalidArgument`.
Recording must refuse such values at once: taken in, they would be written into a
session that no store can load again.
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
import time
from collections.abc import Collection, Iterable
from datetime import timedelta
from typing import Literal, TypeVar, cast, overload

from msgspec.structs import astuple

from .errors import InvalidArgument
from .messages import ZERO_USAGE, Usage

__all__ = [
    "MOST_WAIT_SECONDS",
    "U64_MAX",
    "check_callable",
    "check_choice",
    "check_counts",
    "check_each",
    "check_index",
    "check_instance",
    "check_seconds",
    "check_text",
    "check_type",
    "check_unsigned",
    "check_usage",
    "counts_in_range",
    "deadline_of",
    "plain_text",
    "saturated",
    "seconds_left",
    "wait_limit",
]

U64_MAX = 2**64 - 1
"""The largest count phi-core holds (u64)."""
_COUNTER_TYPES = (int,) * len(Usage.__struct_fields__)

MOST_WAIT_SECONDS = 2_147_483.647
"""The longest wait a C int of milliseconds holds (2**31-1 ms, about 24.8 days): SQLite's
busy timeout, PostgreSQL's lock_timeout and libpq's connect_timeout take no longer one."""

_T = TypeVar("_T")
_Word = TypeVar("_Word", bound=str)


def check_type(name: str, value: object, expected: type, *, optional: bool = False) -> None:
    """`TypeError` unless `value` is an `expected` (a bool is no int), or None when `optional`."""
    if type(value) is expected or (value is None and optional):  # the common cases, first
        return
    if isinstance(value, expected) and not isinstance(value, bool):
        return
    alternative = " or None" if optional else ""
    raise TypeError(f"{name} must be {expected.__name__}{alternative}, not {type(value).__name__}")


def plain_text(text: str) -> str:
    """`text` as a `str` itself: a subclass's value (a `StrEnum` member, a library's own
    text type) is recorded as its own type otherwise, which no encoder writes (its own
    ``__str__`` may say something else)."""
    return text if type(text) is str else str.__str__(text)


@overload
def check_text(name: str, value: object) -> str: ...


@overload
def check_text(name: str, value: object, *, optional: Literal[True]) -> str | None: ...


def check_text(name: str, value: object, *, optional: bool = False) -> str | None:
    """`check_type` of text (or None when `optional`), returned as `plain_text`."""
    if type(value) is str:
        return value
    check_type(name, value, str, optional=optional)
    return None if value is None else plain_text(cast(str, value))


def _wrong_type(name: str, expected: str, value: object) -> TypeError:
    return TypeError(f"{name} must be {expected}, not {type(value).__name__}")


def check_instance(name: str, value: object, expected: type | tuple[type, ...], described: str) -> None:
    """`TypeError` unless `value` is an `expected` (`described` in the message: ``"str or None"``)."""
    if not isinstance(value, expected):
        raise _wrong_type(name, described, value)


def check_each(
    name: str, values: Iterable[_T], expected: type | tuple[type, ...], described: str
) -> tuple[_T, ...]:
    """`values` as a tuple; `TypeError` unless they are a collection (not text) of `expected`."""
    kind = type(values)
    if kind is not tuple and kind is not list:  # those skip the slower test against the ABC
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise _wrong_type(name, f"a sequence of {described}", values)
    items = tuple(values)
    for index, item in enumerate(items):
        if not isinstance(item, expected):
            raise _wrong_type(f"{name}[{index}]", described, item)
    return items


def check_callable(name: str, value: object, *, optional: bool = False) -> None:
    """`TypeError` unless `value` is callable (or None when `optional`)."""
    if not (callable(value) or (value is None and optional)):
        raise _wrong_type(name, "callable or None" if optional else "callable", value)


def check_choice(name: str, value: _Word, choices: Collection[str]) -> _Word:
    """`value` as `plain_text`; `TypeError` unless it is a str (a `StrEnum` member is one),
    `InvalidArgument` unless it is one of `choices`."""
    if isinstance(value, str) and value in choices:
        return cast(_Word, plain_text(value))
    check_type(name, value, str)
    raise InvalidArgument(f"{name}: expected one of {', '.join(choices)}; got {value!r}")


def check_unsigned(name: str, value: object, *, optional: bool = False) -> None:
    """`TypeError` unless `value` is an int (a bool is none), or None when `optional`;
    `InvalidArgument` unless phi-core's unsigned 64-bit counters hold it."""
    check_type(name, value, int, optional=optional)
    if isinstance(value, int) and not 0 <= value <= U64_MAX:
        raise InvalidArgument(f"{name}: expected a count from 0 to 2**64-1; got {value}")


def check_index(name: str, value: object, described: str = "int") -> int:
    """`value` as an int: anything that is an integer (``operator.index``: a NumPy integer
    too) but a bool; `TypeError` otherwise (`described` says what was expected)."""
    if isinstance(value, bool):
        raise _wrong_type(name, described, value)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise _wrong_type(name, described, value) from None


@overload
def check_seconds(
    name: str,
    value: object,
    *,
    optional: Literal[False] = False,
    positive: bool = False,
    duration: bool = False,
    maximum: float | None = None,
    finite: bool = False,
    unit: str = "seconds",
) -> float: ...


@overload
def check_seconds(
    name: str,
    value: object,
    *,
    optional: Literal[True],
    positive: bool = False,
    duration: bool = False,
    maximum: float | None = None,
    finite: bool = False,
    unit: str = "seconds",
) -> float | None: ...


def check_seconds(
    name: str,
    value: object,
    *,
    optional: bool = False,
    positive: bool = False,
    duration: bool = False,
    maximum: float | None = None,
    finite: bool = False,
    unit: str = "seconds",
) -> float | None:
    """`value` as a float of seconds (an int too large for one, 10**400, as infinity): the
    value to keep, as arithmetic with the int itself overflows. `TypeError` unless `value`
    is a real number (a NumPy one too; with `duration`, a `timedelta` too), or None when
    `optional`; `InvalidArgument` if it is negative (or zero, when `positive`), NaN, (given
    a `maximum`) above it or (when `finite`) infinite. `unit` names what it counts, for
    the message (``"milliseconds"``: returned as given, not converted)."""
    if value is None and optional:
        return None
    if duration and isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        described = f"a number of {unit}" + (" or a timedelta" if duration else "")
        raise _wrong_type(name, described + (" or None" if optional else ""), value)
    seconds = _seconds(value)
    if (
        not (seconds > 0 if positive else seconds >= 0)
        or (maximum is not None and not seconds <= maximum)
        or (finite and math.isinf(seconds))
    ):
        bound = "> 0" if positive else ">= 0"  # the first test also refuses NaN
        if maximum is not None:
            bound += f" and <= {maximum}"
        number = "a finite number" if finite else "a number"
        raise InvalidArgument(f"{name} must be {number} of {unit} {bound}, got {value!r}")
    return seconds


def _seconds(value: numbers.Real) -> float:
    """`value` as a float; an int too large for one (10**400) as the infinity it stands for."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if cast(int, value) > 0 else -math.inf  # only an int is too large


def wait_limit(seconds: float | None) -> float | None:
    """`seconds` (checked) as a `threading` wait takes them: None, no limit, past
    `threading.TIMEOUT_MAX` (about 292 years; infinity too), which such a wait refuses
    (`OverflowError`)."""
    return None if seconds is None or seconds > threading.TIMEOUT_MAX else seconds


def deadline_of(name: str, timeout: object) -> float | None:
    """The `time.monotonic()` instant an optional `timeout` (`check_seconds`) ends at, or
    None for no limit (`wait_limit`). A negative number is a time already past (what is
    left of a caller's own deadline): no wait, as `threading`'s waits take it."""
    if type(timeout) in (int, float) and timeout < 0:  # type: ignore[operator]
        timeout = 0.0
    limit = wait_limit(check_seconds(name, timeout, optional=True))
    return None if limit is None else time.monotonic() + limit


def seconds_left(deadline: float | None) -> float | None:
    """What is left until `deadline` (`deadline_of`), at least 0; None for no limit."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def check_counts(name: str, values: Iterable[int]) -> tuple[int, ...]:
    """`values` as a tuple, each checked by `check_unsigned`."""
    counts = check_each(name, values, int, "int")
    for index, count in enumerate(counts):
        check_unsigned(f"{name}[{index}]", count)
    return counts


def check_usage(name: str, usage: Usage | None, *, optional: bool = False) -> None:
    """`check_type` of a `Usage`, and `check_unsigned` of each of its counters."""
    if usage is ZERO_USAGE:  # the default of most scopes, frozen
        return
    check_type(name, usage, Usage, optional=optional)
    if usage is None:
        return
    if not counts_in_range(usage):
        for field, count in zip(Usage.__struct_fields__, astuple(usage), strict=True):
            check_unsigned(f"{name}.{field}", count)  # raises, naming the counter


def counts_in_range(usage: Usage) -> bool:
    """Whether each counter of `usage` is an int (no bool) that phi-core's unsigned 64-bit
    counters hold: the cheap test, made before any error is worded."""
    if usage is ZERO_USAGE:
        return True
    counts = astuple(usage)
    return tuple(map(type, counts)) == _COUNTER_TYPES and min(counts) >= 0 and max(counts) <= U64_MAX


def saturated(usage: Usage) -> Usage:
    """`usage` (a sum of counters phi-core holds) with each counter beyond its unsigned
    64-bit ones at the largest they hold; `usage` itself when none is beyond."""
    counts = astuple(usage)
    if max(counts) <= U64_MAX:
        return usage
    fields = Usage.__struct_fields__
    return Usage(**{field: min(count, U64_MAX) for field, count in zip(fields, counts, strict=True)})
