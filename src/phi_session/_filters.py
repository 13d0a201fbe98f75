"""The session-listing filters as users type them, shared by the CLI and the web viewer.

Both front ends take the same filters as text (command-line options, query-string
parameters) and must reject bad input with the same clear message, so the parsing
lives here once. `SessionFilters.parse` turns text into typed values; `run` asks a
`SessionStore` for the matching summaries. `to_builtins` gives the JSON shape both
front ends print or serve.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import msgspec

from ._time import Timestamp
from .model import LoopStatus
from .stores.base import GroupBy, Order, SessionStore, SessionSummary

__all__ = [
    "GROUP_BYS", "LOOP_STATUSES", "MAX_COUNT", "ORDERS", "FilterError", "SessionFilters", "parse_group_by",
    "parse_time_bound", "to_builtins",
]

LOOP_STATUSES: tuple[str, ...] = get_args(LoopStatus)
ORDERS: tuple[str, ...] = get_args(Order)
GROUP_BYS: tuple[str, ...] = get_args(GroupBy)

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_NS = 1_000_000_000
_EARLIEST = Timestamp.parse("0001-01-01T00:00:00Z")

TIME_HELP = "an RFC 3339 date-time, a date YYYY-MM-DD (midnight UTC) or an age such as 30m, 24h, 7d, 2w"


def parse_time_bound(text: str, *, now: Timestamp | None = None) -> Timestamp:
    """Read a time bound: RFC 3339, ``YYYY-MM-DD`` (00:00 UTC that day) or an age.

    An age (``90s``, ``30m``, ``24h``, ``7d``, ``2w``) means that long before `now`
    (default: the current time). Raises ``ValueError`` naming the accepted forms.
    """
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative is not None:
        current = now if now is not None else Timestamp.now()
        digits, unit = relative.group(1), relative.group(2)
        # Compared as text first: int() refuses more than 4,300 digits with its own error.
        if len(digits) > 20 or current.ns - int(digits) * _UNIT_SECONDS[unit] * _NS < _EARLIEST.ns:
            raise ValueError(f"{text!r} reaches back before the year 1")
        return Timestamp.from_ns(current.ns - int(digits) * _UNIT_SECONDS[unit] * _NS)
    candidate = f"{value}T00:00:00Z" if _DATE.fullmatch(value) else value
    try:
        return Timestamp.parse(candidate)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: expected {TIME_HELP}") from None


class FilterError(ValueError):
    """A malformed filter value; `parameter` names it so each front end can spell it its way."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}")
        self.parameter = parameter
        self.reason = reason


_ASCII_WHOLE = re.compile(r"-?[0-9]+")
MAX_COUNT = 2**63 - 1
"""The largest count a filter takes: stores hand limits to SQLite/PostgreSQL as 64-bit integers."""


def _non_negative_int(name: str, text: str) -> int:
    # ASCII digits only: int() would also take "1_000", "+5" and non-Latin digits.
    if _ASCII_WHOLE.fullmatch(text) is None:
        raise FilterError(name, f"expected a whole number, got {text!r}")
    if text.startswith("-"):
        raise FilterError(name, f"must not be negative, got {text}")
    # Length first: int() refuses more than 4,300 digits, and the message would quote them all.
    if len(text.lstrip("0")) > len(str(MAX_COUNT)) or int(text) > MAX_COUNT:
        shown = text if len(text) <= 30 else f"a number of {len(text):,} digits"
        raise FilterError(name, f"must be at most {MAX_COUNT:,}, got {shown}")
    return int(text)


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    """`text` as spelled in `choices`, in any case (``completed`` is ``Completed``)."""
    for choice in choices:
        if choice.casefold() == text.casefold():
            return choice
    raise FilterError(name, f"expected one of {', '.join(choices)}; got {text!r}")


def parse_group_by(text: str) -> GroupBy:
    """``agent``, ``model`` or ``day``; `FilterError` (parameter ``by``) otherwise."""
    return _choice("by", text, GROUP_BYS)  # type: ignore[return-value]


@dataclass(frozen=True)
class SessionFilters:
    """Typed arguments of `SessionStore.query`; every field None means "no filter"."""

    agent_id: str | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    status: str | None = None
    model: str | None = None
    min_tokens: int | None = None
    parent_session_id: str | None = None
    limit: int | None = None
    order: Order = "newest"

    # User-facing parameter name -> field name (the CLI's options use the same names).
    PARAMETERS: ClassVar[dict[str, str]] = {
        "agent": "agent_id", "since": "since", "until": "until", "status": "status",
        "model": "model", "min_tokens": "min_tokens", "parent": "parent_session_id",
        "limit": "limit", "order": "order",
    }

    @classmethod
    def parse(cls, params: Mapping[str, str | None], *, now: Timestamp | None = None) -> SessionFilters:
        """Filters from text parameters named as in `PARAMETERS`.

        Absent, None and empty values mean no filter. Raises `FilterError` naming
        the parameter for an unknown name or a malformed value.
        """
        unknown = sorted(set(params) - set(cls.PARAMETERS))
        if unknown:
            raise FilterError(unknown[0], f"unknown filter; known filters: {', '.join(cls.PARAMETERS)}")
        given = {name: value.strip() for name, value in params.items() if value and value.strip()}
        values: dict[str, Any] = {}
        for name, text in given.items():
            if name in ("since", "until"):
                try:
                    values[name] = parse_time_bound(text, now=now)
                except ValueError as error:
                    raise FilterError(name, str(error)) from None
            elif name in ("min_tokens", "limit"):
                values[name] = _non_negative_int(name, text)
            elif name == "status":
                values[name] = _choice(name, text, LOOP_STATUSES)
            elif name == "order":
                values[name] = _choice(name, text, ORDERS)
            else:
                values[name] = text
        filters = cls(**{cls.PARAMETERS[name]: value for name, value in values.items()})
        if filters.since is not None and filters.until is not None and filters.until <= filters.since:
            raise FilterError("until", f"{filters.until} is not later than since ({filters.since})")
        return filters

    def run(self, store: SessionStore) -> list[SessionSummary]:
        """The matching summaries, in the requested order."""
        return store.query(
            agent_id=self.agent_id, since=self.since, until=self.until, status=self.status,
            model=self.model, min_tokens=self.min_tokens, parent_session_id=self.parent_session_id,
            limit=self.limit, order=self.order,
        )


def _encode_extra(obj: Any) -> Any:
    if isinstance(obj, Timestamp):
        return str(obj)
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def to_builtins(obj: Any) -> Any:
    """JSON-ready builtins of summaries, usage totals and other records.

    A `SessionSummary` also gets its ``total_tokens`` (a property, not a field).
    """
    if isinstance(obj, list):
        return [to_builtins(item) for item in obj]
    data = msgspec.to_builtins(obj, enc_hook=_encode_extra)
    if isinstance(obj, SessionSummary):
        data["total_tokens"] = obj.total_tokens
    return data
