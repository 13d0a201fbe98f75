"""What a store is asked: `SessionQuery` (listing), `PruneCriteria` (deleting) and a
usage grouping, each checked once, when it is built, with one wording for every backend.

Every backend takes these values and translates them into its own filter (SQL for
SQLite and PostgreSQL, a summary match for the JSON directory); none checks them
again. Front ends build them from text (command-line options, query-string
parameters) with `SessionQuery.from_strings` and `parse_group_by`, so that bad input
gets the same `InvalidQuery` everywhere: a usage error naming the parameter.
Arguments of the wrong Python type raise `TypeError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, get_args

from .._checks import check_type
from .._time import Timestamp
from ..errors import InvalidQuery
from ..model import LoopStatus

__all__ = [
    "GROUP_BYS",
    "LOOP_STATUSES",
    "MAX_COUNT",
    "ORDERS",
    "TIME_HELP",
    "CostBy",
    "GroupBy",
    "Order",
    "PageCursor",
    "PruneCriteria",
    "SessionQuery",
    "parse_cost_by",
    "parse_group_by",
    "parse_time_bound",
]

Order = Literal["newest", "oldest", "tokens"]
GroupBy = Literal["agent", "model", "day"]
CostBy = Literal[GroupBy, "session"]  # `cost_totals` prices the loaded sessions one by one too

LOOP_STATUSES: tuple[LoopStatus, ...] = get_args(LoopStatus)
ORDERS: tuple[Order, ...] = get_args(Order)
GROUP_BYS: tuple[GroupBy, ...] = get_args(GroupBy)
COST_BYS: tuple[CostBy, ...] = get_args(CostBy)

MAX_COUNT = 2**63 - 1
"""The largest `limit` (and, typed as text, `min_tokens`): stores hand them to SQLite
and PostgreSQL as signed 64-bit integers."""

TIME_HELP = "an RFC 3339 date-time, a date YYYY-MM-DD (midnight UTC) or an age such as 30m, 24h, 7d, 2w"

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RELATIVE = re.compile(r"([0-9]+)\s*([smhdw])")
_WHOLE = re.compile(r"-?[0-9]+")  # ASCII only: int() would also take "1_000", "+5", other scripts' digits
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_NS = 1_000_000_000
_YEAR_ONE_NS = Timestamp.parse("0001-01-01T00:00:00Z").ns


def shown(text: str, most: int = 40) -> str:
    """`text` cut short beyond `most` characters for an error message, which stays one
    readable line even for a 5,000-digit number or id."""
    return text if len(text) <= most else f"{text[: most // 2]}... ({len(text)} characters)"


def _whole_number(name: str, text: str, maximum: int) -> int:
    """A non-negative ASCII whole number of at most `maximum`, checked before `int()`
    (which refuses numbers of more than 4,300 digits with a ValueError)."""
    if _WHOLE.fullmatch(text) is None:
        raise InvalidQuery(f"expected a whole number, got {shown(repr(text))}", name)
    if text.startswith("-"):
        raise InvalidQuery(f"must not be negative, got {shown(text)}", name)
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise InvalidQuery(f"must be at most {maximum}, got {shown(text)}", name)
    return int(digits)


def parse_time_bound(text: str, *, now: Timestamp | None = None, name: str = "time") -> Timestamp:
    """Read a time bound: RFC 3339, ``YYYY-MM-DD`` (00:00 UTC that day) or an age.

    An age (``90s``, ``30m``, ``24h``, ``7d``, ``2w``) means that long before `now`
    (default: the current time); one reaching before year 1 is refused. Raises
    `InvalidQuery` (naming parameter `name`) with the accepted forms.
    """
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative is not None:
        current = now if now is not None else Timestamp.now()
        amount, unit = relative.group(1), relative.group(2)
        oldest = (current.ns - _YEAR_ONE_NS) // (_UNIT_SECONDS[unit] * _NS)
        try:
            seconds = _whole_number(name, amount, oldest) * _UNIT_SECONDS[unit]
        except InvalidQuery:
            raise InvalidQuery(f"{shown(value)} reaches back before year 1", name) from None
        return Timestamp.from_ns(current.ns - seconds * _NS)
    candidate = f"{value}T00:00:00Z" if _DATE.fullmatch(value) else value
    try:
        return Timestamp.parse(candidate)
    except ValueError:
        raise InvalidQuery(f"{shown(repr(text))} is not a time: expected {TIME_HELP}", name) from None


def _choice(name: str, value: object, choices: tuple[str, ...]) -> Any:
    """`value` as spelled in `choices`, matched case-insensitively."""
    check_type(name, value, str)
    for choice in choices:
        if choice.lower() == str(value).lower():
            return choice
    raise InvalidQuery(f"expected one of {', '.join(choices)}; got {shown(repr(value))}", name)


def check_text(name: str, value: str | None) -> None:
    """`InvalidQuery` (parameter `name`) if `value` holds a lone surrogate, what bytes that
    are not UTF-8 decode to (a command-line argument's): no stored text holds one, and the
    SQL stores cannot even be asked for it."""
    if value is None or value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problem = f"{shown(repr(value))} is not Unicode text (it holds a lone surrogate)"
        raise InvalidQuery(problem, name) from None


def check_count(name: str, value: int | None, maximum: int | None = None) -> None:
    """`TypeError` unless `value` is an int (or None); `InvalidQuery` if negative or above `maximum`."""
    check_type(name, value, int, optional=True)
    if value is None:
        return
    if value < 0:
        raise InvalidQuery(f"must not be negative, got {value}", name)
    if maximum is not None and value > maximum:
        raise InvalidQuery(f"must be at most {maximum}, got {value}", name)


def parse_group_by(value: object) -> GroupBy:
    """How `usage_totals` groups: ``agent``, ``model`` or ``day`` (any case).

    `InvalidQuery` (parameter ``group_by``) for another name; `TypeError` for a non-string.
    """
    result: GroupBy = _choice("group_by", value, GROUP_BYS)
    return result


def parse_cost_by(value: object) -> CostBy:
    """How `cost.cost_totals` groups: as `parse_group_by`, or ``session`` (any case).

    `InvalidQuery` (parameter ``group_by``) for another name; `TypeError` for a non-string.
    """
    result: CostBy = _choice("group_by", value, COST_BYS)
    return result


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where a page of `SessionStore.query` results ended: keyset paging, not OFFSET.

    It holds the last row's sort value (``last_active_at`` in nanoseconds for the
    ``newest`` and ``oldest`` orders, total tokens for ``tokens``) and its session id;
    the next page holds the rows that sort after that pair, as stored when it is read.
    So a session saved or deleted between pages never shifts the others: each session
    left alone is listed once, in order. No snapshot is kept, though: a session saved
    again meanwhile (its last activity, its tokens changed) is listed where its new value
    puts it, so twice if that is after the cursor (``oldest``: it was listed already)
    and not at all if before (``newest``, ``tokens``: one not yet listed). Build one
    with `after` from the last summary of a page; `str()` gives the text form that
    `parse` reads back (the web API's and CLI's ``after`` parameter).
    """

    order: Order
    value: int
    session_id: str

    def __post_init__(self) -> None:
        check_type("cursor order", self.order, str)
        check_type("cursor value", self.value, int)
        check_type("cursor session_id", self.session_id, str)
        object.__setattr__(self, "order", _choice("after", self.order, ORDERS))
        check_text("after", self.session_id)
        if "\x00" in self.session_id:  # no session id holds one (`validate_session_id`)
            raise InvalidQuery(f"not a page cursor: {shown(repr(str(self)))}", "after")

    @classmethod
    def after(cls, order: Order, row: Any) -> PageCursor:
        """The cursor just past `row` (a `SessionSummary`) in `order`."""
        value = row.total_tokens if order == "tokens" else row.last_active_at.ns
        return cls(order, value, row.session_id)

    @property
    def column(self) -> Literal["last_active_at", "total_tokens"]:
        """The summary field the order sorts by (the backends' column, ``_ns`` for times)."""
        return "total_tokens" if self.order == "tokens" else "last_active_at"

    @property
    def descending(self) -> bool:
        """Whether the order runs from the largest value (ties always by ascending id)."""
        return self.order != "oldest"

    def passed(self, row: Any) -> bool:
        """Whether `row` (a `SessionSummary`) sorts after the cursor: it belongs to a later page."""
        value: int = row.total_tokens if self.order == "tokens" else row.last_active_at.ns
        session_id: str = row.session_id
        if value != self.value:
            return value < self.value if self.descending else value > self.value
        return session_id > self.session_id

    def __str__(self) -> str:
        return f"{self.order}:{self.value}:{self.session_id}"

    @classmethod
    def parse(cls, text: str) -> PageCursor:
        """The cursor `str()` wrote; `InvalidQuery` (parameter ``after``) for anything else."""
        order, _, rest = text.partition(":")
        value, colon, session_id = rest.partition(":")
        if not colon or not session_id or re.fullmatch(r"-?[0-9]{1,80}", value) is None:
            raise InvalidQuery(f"not a page cursor: {shown(repr(text))}", "after")
        return cls(order, int(value), session_id)  # type: ignore[arg-type]  # checked by __post_init__


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionQuery:
    """Which sessions `SessionStore.query` returns, and in which order; checked when built.

    Every filter left None matches everything; the given ones must all hold:

    * `agent_id`: the session's agent;
    * `since` <= ``last_active_at`` < `until` (`until` must be later than `since`);
    * `status`: at least one loop has it (a `LoopStatus`, any case: ``completed``
      is ``Completed``; the query keeps the canonical spelling);
    * `model`: a loop ran ``provider/model``, or the bare model name;
    * `min_tokens`: ``usage.total_tokens >= min_tokens``;
    * `parent_session_id`: the session was spawned from that session.

    `order`: ``newest``/``oldest`` by ``last_active_at``, ``tokens`` by total tokens,
    largest first; ties by session id. `after` (a `PageCursor` made for the same
    order) skips the rows up to and including the previous page's last one;
    `limit` (at most `MAX_COUNT`) keeps the first rows of that order. A malformed
    value raises `InvalidQuery` naming the field; a value of the wrong type raises
    `TypeError`.
    """

    agent_id: str | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    status: str | None = None
    model: str | None = None
    min_tokens: int | None = None
    parent_session_id: str | None = None
    limit: int | None = None
    order: Order = "newest"
    after: PageCursor | None = None

    PARAMETERS: ClassVar[Mapping[str, str]] = {
        "agent": "agent_id",
        "since": "since",
        "until": "until",
        "status": "status",
        "model": "model",
        "min_tokens": "min_tokens",
        "parent": "parent_session_id",
        "limit": "limit",
        "order": "order",
        "after": "after",
    }
    """The text parameters of `from_strings` (the CLI's options, the web API's query
    string) and the field each one sets."""

    def next_page(self, rows: Sequence[Any]) -> SessionQuery | None:
        """The query of the page after `rows` (this query's result), or None when
        `rows` was the last page (a limit not reached, or no limit)."""
        if self.limit is None or len(rows) < self.limit or not rows:
            return None
        return replace(self, after=PageCursor.after(self.order, rows[-1]))

    def __post_init__(self) -> None:
        for name in ("agent_id", "model", "parent_session_id"):
            check_type(name, getattr(self, name), str, optional=True)
            check_text(name, getattr(self, name))
        for name in ("since", "until"):
            check_type(name, getattr(self, name), Timestamp, optional=True)
        check_count("min_tokens", self.min_tokens)
        check_count("limit", self.limit, MAX_COUNT)
        if self.status is not None:
            object.__setattr__(self, "status", _choice("status", self.status, LOOP_STATUSES))
        object.__setattr__(self, "order", _choice("order", self.order, ORDERS))
        check_type("after", self.after, PageCursor, optional=True)
        if self.after is not None and self.after.order != self.order:
            made_for = self.after.order
            raise InvalidQuery(f"the cursor was made for order {made_for!r}, not {self.order!r}", "after")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise InvalidQuery(f"{self.until} is not later than since ({self.since})", "until")

    @classmethod
    def from_strings(cls, params: Mapping[str, str | None], *, now: Timestamp | None = None) -> SessionQuery:
        """A query from text parameters named as in `PARAMETERS` (``agent``, ``since``, …).

        Absent, None and blank values mean no filter. Times take `TIME_HELP`'s forms
        (ages count back from `now`, default the current time); counts are ASCII
        whole numbers up to `MAX_COUNT`. Raises `InvalidQuery` naming the parameter
        for an unknown name or a malformed value.
        """
        unknown = sorted(set(params) - set(cls.PARAMETERS))
        if unknown:
            raise InvalidQuery(f"unknown filter; known filters: {', '.join(cls.PARAMETERS)}", unknown[0])
        values: dict[str, Any] = {}
        for name, raw in params.items():
            text = raw.strip() if raw is not None else ""
            if not text:
                continue
            check_text(name, text)  # named as given: the field's checks would name the field
            value: Any = text
            if name in ("since", "until"):
                value = parse_time_bound(text, now=now, name=name)
            elif name in ("min_tokens", "limit"):
                value = _whole_number(name, text, MAX_COUNT)
            elif name == "after":
                value = PageCursor.parse(text)
            values[cls.PARAMETERS[name]] = value
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneCriteria:
    """Which sessions `SessionStore.prune` deletes; checked when built.

    Candidates are all sessions, or those of `agent_id`. A candidate is deleted
    when it meets every given condition: ``last_active_at < older_than``, and not
    being among the `keep_last` most recently active candidates (ties by session
    id). At least one of `older_than` and `keep_last` is required (`InvalidQuery`).
    """

    older_than: Timestamp | None = None
    keep_last: int | None = None
    agent_id: str | None = None

    def __post_init__(self) -> None:
        check_type("older_than", self.older_than, Timestamp, optional=True)
        check_count("keep_last", self.keep_last, MAX_COUNT)
        check_type("agent_id", self.agent_id, str, optional=True)
        check_text("agent_id", self.agent_id)
        if self.older_than is None and self.keep_last is None:
            raise InvalidQuery("prune needs older_than, keep_last or both")
