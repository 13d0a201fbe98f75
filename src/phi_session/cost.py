"""Cost in US dollars of stored usage, priced at query time.

A `Pricer` prices model calls, each on the model that served it (the reply's, else the
loop config's: `ModelCall.served_by`) and at its own instant: first from the
user's own prices (a mapping, or a TOML/JSON file: `Pricer.from_file`), then from
the ``genai-prices`` table (the optional extra ``prices``) at the price valid at that
instant. A loop or a session is the sum of its calls (`LoopRecord.model_calls`), never
its summed usage priced as one call: a table price can depend on one request's input
tokens (tiered prices). Because prices are applied when asked, an updated table
reprices history.

Every figure is a `Cost`: ``usd`` (None when some tokens have no known price:
unknown is never shown as 0) and ``sources``, where its prices came from
(``"genai-prices 0.2.3"`` or ``"user"``). Usage of zero tokens costs 0 whatever
the model; a call that counted its tokens only as a total (no input, output or
cache count) has no known price.

Token mapping (phi-core's `Usage`): the cache reads and writes are priced at their own
rates, the rest of the input at the input rate (`uncached_input`: phi-core's providers
count ``input`` with or without the cache, and the call's ``total_tokens`` tells which);
``reasoning`` is a part of ``output`` (priced as output unless the table has a
reasoning rate).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ._checks import check_type
from ._time import Timestamp
from .errors import InvalidPrices
from .messages import Usage
from .model import LoopRecord, ModelCall, Session, Turn, prompt_tokens, uncached_input, without_provider
from .stores.base import UsageRow, usage_rows
from .stores.outline import SessionOutline
from .stores.query import parse_cost_by

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
    "uncached_input",
]

USER_SOURCE = "user"
_PER_TOKEN = Decimal(1_000_000)  # user prices are per million tokens, as providers quote them
_PRICES_HINT = (
    "prices unknown: pip install 'phi-session[prices]' for the genai-prices table, or give your own prices"
)


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    """What some usage cost: ``usd`` (None: unknown) and where the prices came from.

    ``unpriced`` lists the ``provider/model`` names with tokens but no known price.
    ``unsplit`` (left out, UNSET, unless some) names those of them whose price is not
    missing but cannot apply: a call reported only its total, not its tokens by kind.
    Adding costs keeps the sources and unpriced models of both, sorted (a sum is the same
    whatever order a store reads its parts in); the sum is unknown when either part is.
    """

    usd: float | None
    sources: tuple[str, ...] = ()
    unpriced: tuple[str, ...] = ()
    unsplit: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET

    def __add__(self, other: Cost) -> Cost:
        usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        unsplit = _merged(self.unsplit or (), other.unsplit or ())
        return Cost(
            usd=usd,
            sources=_merged(self.sources, other.sources),
            unpriced=_merged(self.unpriced, other.unpriced),
            unsplit=unsplit or msgspec.UNSET,
        )

    @property
    def known(self) -> bool:
        return self.usd is not None


ZERO_COST = Cost(usd=0.0)


def _merged(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return first if set(second) <= set(first) else tuple(sorted({*first, *second}))


def _group_order(item: tuple[tuple[str, str | None, str | None], list[ModelCall]]) -> tuple[str, str, str]:
    (key, provider, model), _ = item
    return key, provider or "", model or ""


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

    def usd(self, usage: Usage | ModelCall) -> float:
        cache_read = self.input if self.cache_read is None else self.cache_read
        cache_write = self.input if self.cache_write is None else self.cache_write
        micro = (
            Decimal(uncached_input(usage)) * Decimal(str(self.input))
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


def _split(call: ModelCall) -> bool:
    """Whether the call says which kinds its tokens were (what prices are per)."""
    return bool(call.input or call.output or call.cache_read or call.cache_write)


def _has_tokens(call: ModelCall) -> bool:
    return _split(call) or bool(call.total_tokens)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime.max.replace(tzinfo=timezone.utc)
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_OUTLINES_KEPT = 8  # outlines whose cost a pricer remembers (a viewer keeps a few sessions open)
_PROBE_SPAN = 1_000_000  # tokens between the probes of a rate (the last band has no upper end)
_PROBE_TOLERANCE = Decimal("1e-12")  # relative: the table's own arithmetic rounds at 28 digits


def _instant(started_ms: int) -> datetime:
    """A call's start as the table's aware UTC datetime (clamped to what datetime holds)."""
    try:
        return _EPOCH + timedelta(milliseconds=started_ms)
    except OverflowError:
        return _LATEST if started_ms > 0 else _EARLIEST


class _TableModel:
    """One model of the ``genai-prices`` table, and the rates of each of its prices.

    The table prices a call in about a tenth of a millisecond, too slow for a session
    of thousands of calls. Its price of a call, for one resolved price (the model's
    price at an instant: `ModelInfo.get_prices`, which only start dates and times of
    day select) and one tier band (the input tokens between two tier thresholds), is
    a linear function of the call's five counts plus a per-request part. So each
    (price, band) is asked of the table once, at a few probe calls inside the band,
    which give the rates; a last probe with every count at once checks the function
    is linear, and a (price, band) that fails it (or that the table refuses to probe)
    is priced by the table call by call. The price of each call is resolved by the
    table at the call's own instant, so no date or time window is ever assumed.
    """

    __slots__ = ("_bands", "_timed", "info", "provider")

    def __init__(self, provider: Any, info: Any) -> None:
        self.provider = provider
        self.info = info
        self._timed = isinstance(info.prices, list)  # conditional prices: resolved at each call's instant
        # id(resolved price) -> (that price, its tier thresholds, its rates per band; None: not linear)
        self._bands: dict[int, tuple[Any, list[int], dict[int, tuple[float, ...] | None]]] = {}

    def usd(self, table: Any, call: ModelCall) -> float:
        """What the table charges for `call` (`ValueError` if it refuses its counts)."""
        total_input = prompt_tokens(call)
        reasoning = min(call.reasoning, call.output)
        if self._timed:
            when = _instant(call.started_ms)
            price = self.info.get_prices(when)
        else:
            when, price = _EPOCH, self.info.prices
        entry = self._bands.get(id(price))
        if entry is None:
            entry = self._bands[id(price)] = (price, _thresholds(price), {})
        _, thresholds, bands = entry
        band = bisect_left(thresholds, total_input)  # a tier applies above its start: input > start
        if band not in bands:
            bands[band] = self._rates(table, when, thresholds, band)
        rates = bands[band]
        if rates is None:
            counts = (total_input, call.cache_read, call.cache_write, call.output, reasoning)
            return float(self._exact(table, when, *counts))
        base, per_input, per_read, per_write, per_output, per_reasoning = rates
        return (
            base
            + per_input * total_input
            + per_read * call.cache_read
            + per_write * call.cache_write
            + per_output * call.output
            + per_reasoning * reasoning
        )

    def _exact(self, table: Any, when: datetime, *counts: int) -> Decimal:
        total_input, cache_read, cache_write, output, reasoning = counts
        usage = table.Usage(
            input_tokens=total_input,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            output_tokens=output,
            output_reasoning_tokens=reasoning,
        )
        result = self.info.calc_price(usage, self.provider, genai_request_timestamp=when)
        return Decimal(result.total_price)

    def _rates(
        self, table: Any, when: datetime, thresholds: list[int], band: int
    ) -> tuple[float, ...] | None:
        """The per-request price and the five rates of one band, from probes (USD as floats,
        as costs are given); None when the table's price is not linear there (or a probe
        is refused)."""
        low = 0 if band == 0 else thresholds[band - 1] + 1
        high = thresholds[band] if band < len(thresholds) else low + _PROBE_SPAN
        try:
            at_low = self._exact(table, when, low, 0, 0, 0, 0)
            at_high = self._exact(table, when, high, 0, 0, 0, 0)
            per_input = (at_high - at_low) / (high - low) if high > low else Decimal(0)
            per_read = (
                (self._exact(table, when, high, high, 0, 0, 0) - at_high) / high if high else Decimal(0)
            )
            per_write = (
                (self._exact(table, when, high, 0, high, 0, 0) - at_high) / high if high else Decimal(0)
            )
            with_output = self._exact(table, when, high, 0, 0, _PROBE_SPAN, 0)
            per_output = (with_output - at_high) / _PROBE_SPAN
            per_reasoning = (
                self._exact(table, when, high, 0, 0, _PROBE_SPAN, _PROBE_SPAN) - with_output
            ) / _PROBE_SPAN
            rates = (at_low - per_input * low, per_input, per_read, per_write, per_output, per_reasoning)
            check = (high, high // 3, high // 4, 777_777, 123_456)
            expected = self._exact(table, when, *check)
        except ValueError:
            return None
        got = rates[0] + sum((rate * count for rate, count in zip(rates[1:], check, strict=True)), Decimal(0))
        if abs(got - expected) > _PROBE_TOLERANCE * max(abs(expected), Decimal(1)):
            return None
        return tuple(float(rate) for rate in rates)


def _thresholds(price: Any) -> list[int]:
    """The input-token tier starts of a resolved table price, sorted (none: one band)."""
    starts = {
        tier.start
        for value in vars(price).values()
        if hasattr(value, "tiers") and hasattr(value, "base")
        for tier in value.tiers
    }
    return sorted(starts)


# What the APIs append to an alias to name the snapshot that served it: a date
# (gpt-4o-2024-08-06, claude-3-5-sonnet-20241022) or a month code (gpt-4-0613).
_DATED_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})")


class Pricer:
    """Prices usage by provider, model and time: the user's prices first, then ``genai-prices``.

    A loop is priced call by call (`LoopRecord.model_calls`), each call at its own
    price: a price can depend on one request's input tokens (tiered prices, such as
    2x above 200k input tokens) and on when it was made (a price change, an off-peak
    window). `user_prices` maps ``"provider/model"`` or a bare ``"model"`` (any
    provider) to a `UserPrice` or a mapping of its fields. ``use_table=False``
    ignores ``genai-prices`` even when installed. Safe to share between threads.
    """

    def __init__(
        self,
        user_prices: Mapping[str, UserPrice | Mapping[str, Any]] | None = None,
        *,
        use_table: bool = True,
    ) -> None:
        check_type("user_prices", user_prices, Mapping, optional=True)
        self._user = {name: _user_price(name, price) for name, price in (user_prices or {}).items()}
        self._table: Any = None
        self._table_source: str | None = None
        # The table's models already looked up (None: not in the table), for the table
        # snapshot they came from: an updated snapshot (genai-prices' UpdatePrices) drops them.
        self._models: dict[tuple[str | None, str], _TableModel | None] = {}
        self._snapshot: Any = None
        # The cost of the last outlines priced, by identity (an outline is frozen): a viewer
        # keeps a session's outline and asks for its cost again with every cost page. Ordered:
        # the oldest goes in O(1).
        self._outlines: OrderedDict[int, tuple[SessionOutline, Any, Cost]] = OrderedDict()
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
        except OSError as error:  # its reason alone: the message names the file once
            raise InvalidPrices(f"cannot read prices from {file}: {error.strerror or error}") from None
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidPrices(f"cannot read prices from {file}: {error}") from None
        if not isinstance(data, dict):
            raise InvalidPrices(f"{file}: expected a table of model names to prices")
        try:
            return cls(data, use_table=use_table)
        except InvalidPrices as error:  # which file holds the bad price, as its other errors say
            raise InvalidPrices(f"{file}: {error}") from None

    @property
    def table_source(self) -> str | None:
        """The price table in use (``"genai-prices 0.2.3"``), or None without the extra."""
        return self._table_source

    @property
    def hint(self) -> str | None:
        """What to do when costs come out unknown for want of a table (None with the table)."""
        return None if self._table is not None else _PRICES_HINT

    def price(self, usage: Usage, provider: str | None, model: str | None, at: Timestamp) -> Cost:
        """The cost of one model call of `usage` on `provider`/`model` at instant `at`."""
        return self.calls([ModelCall.of(at, usage)], provider, model)

    def calls(self, calls: Iterable[ModelCall], provider: str | None, model: str | None) -> Cost:
        """The cost of model calls of a loop on `provider`/`model`, each at its price when it
        started (to the millisecond), on the model that served it (`ModelCall.served_by`,
        else `provider`/`model`). Unknown when a call with tokens has no known price."""
        priced = [call for call in calls if _has_tokens(call)]
        if all(call.served_by is None for call in priced):
            return self._one_model(priced, provider, model)
        groups: dict[tuple[str | None, str | None], list[ModelCall]] = {}
        for call in priced:
            served = (
                (provider, model)
                if call.served_by is None or self._priced_as_configured(call.served_by, provider, model)
                else (call.served_by[0] or None, call.served_by[1])
            )
            groups.setdefault(served, []).append(call)
        # In the models' order, not the calls': the same calls cost the same in any order.
        ordered = sorted(groups.items(), key=lambda item: (item[0][0] or "", item[0][1] or ""))
        return total(self._one_model(group, *served) for served, group in ordered)

    def _users_price(self, provider: str | None, model: str | None) -> UserPrice | None:
        """The user's price of `provider`/`model` (under that name, else the bare model's)."""
        for name in _model_names(provider, model):
            user = self._user.get(f"{provider}/{name}") if provider else None
            if user is None:
                user = self._user.get(name)
            if user is not None:
                return user
        return None

    def _priced_as_configured(self, served: tuple[str, str], provider: str | None, model: str | None) -> bool:
        """Whether a call served by `served` is priced as the configured `provider`/`model`:
        a dated snapshot of it (``gpt-4o-2024-08-06``, as the APIs name what served an
        alias) that the user priced only under the configured name."""
        served_provider, served_model = served
        return (
            model is not None
            and served_model.startswith(model)
            and _DATED_SUFFIX.fullmatch(served_model, len(model)) is not None
            and (not served_provider or not provider or served_provider == provider)
            and self._users_price(served_provider or provider, served_model) is None
            and self._users_price(provider, model) is not None
        )

    def _one_model(self, priced: list[ModelCall], provider: str | None, model: str | None) -> Cost:
        """`calls` of calls with tokens, all on `provider`/`model`."""
        if not priced:
            return ZERO_COST
        name = f"{provider}/{model}" if provider else (model or "unknown")
        if not all(map(_split, priced)):  # a bare total: no rate applies to it
            return Cost(usd=None, unpriced=(name,), unsplit=(name,))
        user = self._users_price(provider, model)
        if user is not None:
            return Cost(usd=math.fsum(user.usd(call) for call in priced), sources=(USER_SOURCE,))
        entry = None if self._table is None or model is None else self._table_model(provider, model)
        if entry is None:
            return Cost(usd=None, unpriced=(name,))
        try:
            # fsum: correctly rounded, so the same calls cost the same in any order.
            usd = math.fsum(entry.usd(self._table, call) for call in priced)
        except ValueError:  # counts the table refuses for this model: better unknown than wrong
            return Cost(usd=None, unpriced=(name,))
        assert self._table_source is not None
        return Cost(usd=usd, sources=(self._table_source,))

    def _current_snapshot(self) -> Any:
        """The table's data in use now (None without the table): genai-prices' `UpdatePrices`
        may replace it, and what was remembered of the last one is then dropped."""
        return None if self._table is None else self._table.data_snapshot.get_snapshot()

    def _table_model(self, provider: str | None, model: str) -> _TableModel | None:
        snapshot = self._current_snapshot()
        if snapshot is not self._snapshot:
            with self._memo_lock:
                self._models = {}
                self._snapshot = snapshot
        key = (provider, model)
        if key in self._models:
            return self._models[key]
        entry: _TableModel | None = None
        # A provider name the table does not know (a gateway, a custom id): the model alone.
        for name in _model_names(provider, model):
            for provider_id in (provider, None) if provider else (None,):
                try:
                    entry = _TableModel(*snapshot.find_provider_model(name, None, provider_id, None))
                    break
                except LookupError:
                    continue
            if entry is not None:
                break
        with self._memo_lock:
            self._models[key] = entry
        return entry

    def turn(self, turn: Turn, record: LoopRecord) -> Cost:
        """The cost of one turn: each of its model calls (`LoopRecord.turn_calls`, one per
        assistant reply) at its price when it started; none for a reply a replay served
        from its recording (no model was called: `is_replayed`)."""
        return self.calls(record.turn_calls(turn), *_model_of(record))

    def loop(self, record: LoopRecord) -> Cost:
        """The cost of a loop: each of its calls (`LoopRecord.model_calls`) at its own price."""
        return self.calls(record.model_calls(), *_model_of(record))

    def _grouped(
        self, loops: Iterable[tuple[str, str | None, str | None, Iterable[ModelCall]]]
    ) -> dict[str, Cost]:
        """The cost per key of ``(key, provider, model, calls)`` loops: the calls of a
        key and model are priced together (one lookup), each at its own price."""
        groups: dict[tuple[str, str | None, str | None], list[ModelCall]] = {}
        for key, provider, model, calls in loops:
            groups.setdefault((key, provider, model), []).extend(calls)
        sums: dict[str, Cost] = {}
        # In the groups' order, not the rows': every store's rows then give the same sums.
        for (key, provider, model), calls in sorted(groups.items(), key=_group_order):
            sums[key] = sums.get(key, ZERO_COST) + self.calls(calls, provider, model)
        return sums

    def row_costs(self, rows: Iterable[UsageRow]) -> dict[str, Cost]:
        """The cost of usage rows summed per key, each call of a row at its price when it
        started: the one place where stored usage becomes money in totals."""
        return self._grouped((row.key, row.provider, row.model, row.calls) for row in rows)

    def price_totals(self, totals: Iterable[UsageTotal], rows: Iterable[UsageRow]) -> list[UsageTotal]:
        """`totals` with their ``cost``: `row_costs` of their `rows` (a total without rows costs 0)."""
        sums = self.row_costs(rows)
        return [msgspec.structs.replace(item, cost=sums.get(item.key, ZERO_COST)) for item in totals]

    def session(self, session: Session) -> Cost:
        """The sum of the costs of the session's loops."""
        check_type("session", session, Session)
        loops = (("", *_model_of(record), record.model_calls()) for record in session.loops)
        return self._grouped(loops).get("", ZERO_COST)

    def outline(self, outline: SessionOutline) -> Cost:
        """`session` of an outlined session: its loops' calls are in the outline. The cost
        of the last few outlines is remembered (by identity, for the same table data)."""
        check_type("outline", outline, SessionOutline)
        snapshot = self._current_snapshot()
        kept = self._outlines.get(id(outline))
        if kept is not None and kept[0] is outline and kept[1] is snapshot:
            return kept[2]
        loops = (("", loop.provider, loop.model, loop.model_calls()) for loop in outline.loops)
        cost = self._grouped(loops).get("", ZERO_COST)
        with self._memo_lock:
            if len(self._outlines) >= _OUTLINES_KEPT:
                self._outlines.popitem(last=False)
            self._outlines[id(outline)] = (outline, snapshot, cost)
        return cost

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
        check_type("session", session, Session)
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


def _model_names(provider: str | None, model: str | None) -> tuple[str, ...]:
    """The names `model` of `provider` is looked up by: its own, then without a leading
    ``provider/`` (a LiteLLM id, as the Google ADK adapter recorded one before it took the
    provider out)."""
    if model is None:
        return ()
    bare = without_provider(provider, model)
    return (model,) if bare == model else (model, bare)


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
        if value is not None and not 0 <= value < math.inf:
            raise InvalidPrices(
                f"price of {name!r}: {field} must be a finite non-negative number, got {value}"
            )
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
    by = parse_cost_by(group_by)
    sums = pricer.row_costs(row for session in sessions for row in usage_rows(session, by))
    return [CostTotal(key=key, cost=sums[key]) for key in sorted(sums)]
