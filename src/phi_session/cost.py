"""Cost in US dollars of stored usage, priced at query time.

A `Pricer` prices a `Usage` of one model at one instant: first from the user's own
prices (a mapping, or a TOML/JSON file: `Pricer.from_file`), then from the
``genai-prices`` table (the optional extra ``prices``) at the price valid at that
instant. Because prices are applied when asked, an updated table reprices history.

Every figure is a `Cost`: ``usd`` (None when some tokens have no known price:
unknown is never shown as 0) and ``sources``, where its prices came from
(``"genai-prices 0.2.3"`` or ``"user"``). Usage of zero tokens costs 0 whatever
the model.

Token mapping (phi-core's `Usage`): ``input`` counts the uncached input only, so
the priced input is ``input + cache_read + cache_write`` with the cache reads and
writes at their own rates; ``reasoning`` is a part of ``output`` (priced as output
unless the table has a reasoning rate).
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ._time import Timestamp
from .errors import PhiSessionError
from .messages import Usage
from .model import LoopRecord, Session, Turn
from .stores.base import UsageRow, usage_rows
from .stores.outline import SessionOutline
from .stores.query import parse_group_by

if TYPE_CHECKING:
    from .stores.base import UsageTotal

__all__ = [
    "USER_SOURCE",
    "ZERO_COST",
    "Cost",
    "CostTotal",
    "InvalidPrices",
    "LoopCost",
    "Pricer",
    "SessionCost",
    "TurnCost",
    "UserPrice",
    "cost_totals",
    "prices_available",
    "total",
]

USER_SOURCE = "user"
_MEMO_LIMIT = 100_000  # table prices remembered (a lookup costs about half a millisecond)
_PER_TOKEN = Decimal(1_000_000)  # user prices are per million tokens, as providers quote them
_PRICES_HINT = (
    "prices unknown: pip install 'phi-session[prices]' for the genai-prices table, or give your own prices"
)


class InvalidPrices(PhiSessionError, ValueError):
    """A user price table that cannot be read (names the file or entry and what is wrong)."""


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    """What some usage cost: ``usd`` (None: unknown) and where the prices came from.

    ``unpriced`` lists the ``provider/model`` names with tokens but no known price.
    Adding costs keeps the sources and unpriced models of both; the sum is unknown
    when either part is.
    """

    usd: float | None
    sources: tuple[str, ...] = ()
    unpriced: tuple[str, ...] = ()

    def __add__(self, other: Cost) -> Cost:
        usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        return Cost(
            usd=usd,
            sources=_merged(self.sources, other.sources),
            unpriced=_merged(self.unpriced, other.unpriced),
        )

    @property
    def known(self) -> bool:
        return self.usd is not None


ZERO_COST = Cost(usd=0.0)


def _merged(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return first + tuple(item for item in second if item not in first)


def total(costs: Iterable[Cost]) -> Cost:
    """The sum of `costs` (`ZERO_COST` for none)."""
    result = ZERO_COST
    for cost in costs:
        result = result + cost
    return result


class UserPrice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A user's price of one model, in USD per million tokens (cache rates default to input)."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None

    def usd(self, usage: Usage) -> float:
        cache_read = self.input if self.cache_read is None else self.cache_read
        cache_write = self.input if self.cache_write is None else self.cache_write
        micro = (
            Decimal(usage.input) * Decimal(str(self.input))
            + Decimal(usage.output) * Decimal(str(self.output))
            + Decimal(usage.cache_read) * Decimal(str(cache_read))
            + Decimal(usage.cache_write) * Decimal(str(cache_write))
        )
        return float(micro / _PER_TOKEN)


def prices_available() -> bool:
    """Whether the ``genai-prices`` table (extra ``prices``) is installed."""
    try:
        import genai_prices  # noqa: F401
    except ImportError:
        return False
    return True


def _has_tokens(usage: Usage) -> bool:
    return bool(usage.input or usage.output or usage.cache_read or usage.cache_write or usage.total_tokens)


class Pricer:
    """Prices usage by provider, model and time: the user's prices first, then ``genai-prices``.

    `user_prices` maps ``"provider/model"`` or a bare ``"model"`` (any provider) to a
    `UserPrice` or a mapping of its fields. ``use_table=False`` ignores
    ``genai-prices`` even when installed. Safe to share between threads.
    """

    def __init__(
        self,
        user_prices: Mapping[str, UserPrice | Mapping[str, Any]] | None = None,
        *,
        use_table: bool = True,
    ) -> None:
        self._user = {name: _user_price(name, price) for name, price in (user_prices or {}).items()}
        self._table: Any = None
        self._table_source: str | None = None
        # Table prices already looked up: totals price every loop, and views ask again.
        self._memo: dict[tuple[Usage, str | None, str, Timestamp], Cost] = {}
        self._memo_lock = threading.Lock()
        if use_table and prices_available():
            import genai_prices

            self._table = genai_prices
            self._table_source = f"genai-prices {genai_prices.__version__}"

    @classmethod
    def from_file(cls, path: str | Path, *, use_table: bool = True) -> Pricer:
        """A pricer with the user prices of a ``.toml`` or ``.json`` file.

        The file maps model names to prices per million tokens, e.g. in TOML::

            ["openai/gpt-4o"]
            input = 2.5
            output = 10
            cache_read = 1.25
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
            data = _read_toml(file, text) if file.suffix.lower() == ".toml" else json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise InvalidPrices(f"cannot read prices from {file}: {error}") from None
        if not isinstance(data, dict):
            raise InvalidPrices(f"{file}: expected a table of model names to prices")
        return cls(data, use_table=use_table)

    @property
    def table_source(self) -> str | None:
        """The price table in use (``"genai-prices 0.2.3"``), or None without the extra."""
        return self._table_source

    @property
    def hint(self) -> str | None:
        """What to do when costs come out unknown for want of a table (None with the table)."""
        return None if self._table is not None else _PRICES_HINT

    def price(self, usage: Usage, provider: str | None, model: str | None, at: Timestamp) -> Cost:
        """The cost of `usage` on `provider`/`model` at instant `at`."""
        if not _has_tokens(usage):
            return ZERO_COST
        name = f"{provider}/{model}" if provider else (model or "unknown")
        user = self._user.get(name) if provider else None
        if user is None and model is not None:
            user = self._user.get(model)
        if user is not None:
            return Cost(usd=user.usd(usage), sources=(USER_SOURCE,))
        if self._table is None or model is None:
            return Cost(usd=None, unpriced=(name,))
        key = (usage, provider, model, at)
        cost = self._memo.get(key)
        if cost is None:
            cost = self._table_price(usage, provider, model, at, name)
            with self._memo_lock:
                if len(self._memo) >= _MEMO_LIMIT:
                    self._memo.clear()
                self._memo[key] = cost
        return cost

    def _table_price(self, usage: Usage, provider: str | None, model: str, at: Timestamp, name: str) -> Cost:
        table = self._table
        counts = table.Usage(
            input_tokens=usage.input + usage.cache_read + usage.cache_write,
            cache_read_tokens=usage.cache_read,
            cache_write_tokens=usage.cache_write,
            output_tokens=usage.output,
            output_reasoning_tokens=min(usage.reasoning, usage.output),
        )
        when = at.to_datetime()
        try:
            result = table.calc_price(counts, model, provider_id=provider, genai_request_timestamp=when)
        except LookupError:
            if not provider:
                return Cost(usd=None, unpriced=(name,))
            try:  # a provider name the table does not know (a gateway, a custom id): match the model alone
                result = table.calc_price(counts, model, genai_request_timestamp=when)
            except LookupError:
                return Cost(usd=None, unpriced=(name,))
        assert self._table_source is not None
        return Cost(usd=float(result.total_price), sources=(self._table_source,))

    def turn(self, turn: Turn, record: LoopRecord) -> Cost:
        """The cost of one turn, at the price when it started."""
        provider, model = _model_of(record)
        return self.price(turn.usage, provider, model, turn.started_at)

    def loop(self, record: LoopRecord) -> Cost:
        """The cost of a loop's calls (`LoopRecord.billed_usage`), at the price when it started."""
        provider, model = _model_of(record)
        return self.price(record.billed_usage(), provider, model, record.started_at)

    def row_costs(self, rows: Iterable[UsageRow]) -> dict[str, Cost]:
        """The cost of usage rows summed per key, each row at its model's price when its
        loop started: the one place where stored usage becomes money in totals."""
        sums: dict[str, Cost] = {}
        for row in rows:
            cost = self.price(row.usage, row.provider, row.model, row.started_at)
            sums[row.key] = sums.get(row.key, ZERO_COST) + cost
        return sums

    def price_totals(self, totals: Iterable[UsageTotal], rows: Iterable[UsageRow]) -> list[UsageTotal]:
        """`totals` with their ``cost``: `row_costs` of their `rows` (a total without rows costs 0)."""
        sums = self.row_costs(rows)
        return [msgspec.structs.replace(item, cost=sums.get(item.key, ZERO_COST)) for item in totals]

    def session(self, session: Session) -> Cost:
        """The sum of the costs of the session's loops."""
        return total(self.loop(record) for record in session.loops)

    def outline(self, outline: SessionOutline) -> Cost:
        """`session` of an outlined session: its loops' billed usage is in the outline."""
        return total(
            self.price(loop.billed_usage, loop.provider, loop.model, loop.started_at)
            for loop in outline.loops
        )

    def loop_cost(self, record: LoopRecord) -> LoopCost:
        """The cost of a loop and of each of its turns."""
        return LoopCost(
            loop_id=record.loop_id,
            cost=self.loop(record),
            turns=tuple(
                TurnCost(turn_index=turn.index, cost=self.turn(turn, record)) for turn in record.turns
            ),
        )

    def breakdown(self, session: Session) -> SessionCost:
        """The cost of the session, of each loop and of each turn."""
        loops = [self.loop_cost(record) for record in session.loops]
        return SessionCost(
            session_id=session.session_id, cost=total(loop.cost for loop in loops), loops=tuple(loops)
        )


class TurnCost(msgspec.Struct, frozen=True, kw_only=True):
    turn_index: int
    cost: Cost


class LoopCost(msgspec.Struct, frozen=True, kw_only=True):
    """A loop's cost (its whole usage) and its turns' (which may not add up to it: a loop's
    usage also counts model calls outside finished turns)."""

    loop_id: str
    cost: Cost
    turns: tuple[TurnCost, ...]


class SessionCost(msgspec.Struct, frozen=True, kw_only=True):
    """`Pricer.breakdown`: a session's cost, per loop and per turn."""

    session_id: str
    cost: Cost
    loops: tuple[LoopCost, ...]


def _read_toml(file: Path, text: str) -> Any:
    if sys.version_info < (3, 11):
        raise InvalidPrices(f"{file}: TOML price files need Python 3.11 or later; use JSON")
    return importlib.import_module("tomllib").loads(text)


def _model_of(record: LoopRecord) -> tuple[str | None, str | None]:
    config = record.config
    return (None, None) if config is None else (config.provider, config.model)


def _user_price(name: object, price: object) -> UserPrice:
    if not isinstance(name, str) or not name:
        raise InvalidPrices(f"a model name must be non-empty text, got {name!r}")
    if isinstance(price, UserPrice):
        return price
    try:
        result = msgspec.convert(price, UserPrice)
    except msgspec.ValidationError as error:
        raise InvalidPrices(f"price of {name!r}: {error}") from None
    for field in ("input", "output", "cache_read", "cache_write"):
        value = getattr(result, field)
        if value is not None and not value >= 0:
            raise InvalidPrices(f"price of {name!r}: {field} must be a non-negative number, got {value}")
    return result


class CostTotal(msgspec.Struct, frozen=True, kw_only=True):
    """The cost of one group of `cost_totals` (the keys of `SessionStore.usage_totals`, or a session id)."""

    key: str
    cost: Cost


def cost_totals(sessions: Iterable[Session], group_by: str, pricer: Pricer) -> list[CostTotal]:
    """The cost of `sessions` per agent, model, day (the keys of `usage_totals`) or session, sorted by key.

    Loads nothing itself: give it the sessions (``store.load`` of ``store.list_ids()``).
    Per agent, model or day, ``store.usage_totals(by, pricer=pricer)`` gives the same
    costs without loading a session. Another `group_by` raises `InvalidQuery`
    (parameter ``group_by``).
    """
    by = "session" if group_by == "session" else parse_group_by(group_by)
    sums = pricer.row_costs(row for session in sessions for row in usage_rows(session, by))
    return [CostTotal(key=key, cost=sums[key]) for key in sorted(sums)]
