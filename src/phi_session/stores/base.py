"""The storage protocol shared by every backend, and the helpers they share."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast, runtime_checkable

import msgspec

from .._checks import check_type
from .._time import Timestamp
from ..codec import (
    encode_event,
    json_form,
    refusing_unwritable,
    within_depth,
    without_lone_surrogates,
    without_plain_metadata,
)
from ..errors import InvalidSessionId, SessionNotFound, StoreError
from ..events import AgentEvent
from ..messages import ZERO_USAGE, Usage
from ..model import LoopRecord, ModelCall, RecordMark, Session, counted_usage, keep_links
from .outline import LoopOutline, SessionOutline, decode_calls, first_prompt
from .query import LOOP_STATUSES, GroupBy, Order, PruneCriteria, SessionQuery, check_count, shown
from .search import DEFAULT_LIMIT, SearchHit, document_hits, search_words

if TYPE_CHECKING:  # cost.py reads the stores' rows; stores never need the price table
    from ..cost import Cost, Pricer

_log = logging.getLogger(__name__)

# The summary columns both SQL backends keep: one per loop status, one per usage field.
STATUS_COLUMNS: dict[str, str] = {status: f"loops_{status.lower()}" for status in LOOP_STATUSES}
USAGE_FIELDS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")
USAGE_COLUMNS = tuple(f"{field}_tokens" if field != "total_tokens" else field for field in USAGE_FIELDS)

_T = TypeVar("_T")


class SessionSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What a listing shows of a session: its header and totals, no event logs."""

    session_id: str
    agent_id: str
    created_at: Timestamp
    last_active_at: Timestamp
    formation: str
    parent_session_id: str | None
    rejected: bool
    loop_count: int
    loops_by_status: dict[str, int]
    turn_count: int
    usage: Usage
    models: tuple[str, ...]
    """Distinct ``provider/model`` of the loops' configs, in first-seen order."""
    first_prompt: str | None
    """The session's first user prompt, cut to `outline.PROMPT_CHARS` (`outline.first_prompt`)."""

    @property
    def total_tokens(self) -> int:
        return self.usage.total_tokens


class UsageTotal(msgspec.Struct, frozen=True, kw_only=True):
    """Usage summed over one group (an agent, a model or a UTC day)."""

    key: str
    sessions: int
    loops: int
    usage: Usage
    cost: Cost | msgspec.UnsetType = msgspec.UNSET
    """What the group's loops cost, when `usage_totals` was given a pricer (absent otherwise)."""


class UsageRow(NamedTuple):
    """One loop's part of a `usage_totals` group: what `Pricer.price_totals` prices."""

    key: str
    provider: str | None
    model: str | None
    usage: Usage
    """`LoopRecord.billed_usage`."""
    calls: Sequence[ModelCall]
    """`LoopRecord.model_calls`, which add up to `usage`: each is priced at its own price."""


def stored_usage_row(
    key: str,
    provider: str | None,
    model: str | None,
    calls: bytes | None,
    started_at: Timestamp,
    usage: Usage,
) -> UsageRow:
    """A SQL store's `UsageRow` of a loop row: its stored `calls` (`outline.encode_calls`);
    a row without them (its record did not decode when they were added), or whose calls
    do not decode (logged: the totals still count it), stands its billed `usage` in for
    them, as one call at its start."""
    if calls is not None:
        try:
            return UsageRow(key, provider, model, usage, decode_calls(calls))
        except msgspec.DecodeError as error:
            _log.warning(
                "a stored loop's model calls do not decode (%s): its usage is priced as one call", error
            )
    return UsageRow(key, provider, model, usage, (ModelCall.of(started_at, usage),))


def model_key(record: LoopRecord) -> str:
    """A loop's model: its config's ``provider/model``, else ``"unknown"``."""
    config = record.config
    return "unknown" if config is None else f"{config.provider}/{config.model}"


def serving_rows(row: UsageRow) -> Sequence[UsageRow]:
    """A loop's `row` under its model (`model_key`) as ``usage_totals("model")`` counts it:
    split by the model that served each call (`ModelCall.served_by`, a ``provider/model``
    key of its own), the loop's model keeping the rest."""
    if all(call.served_by is None for call in row.calls):
        return (row,)
    by_key: dict[str, list[ModelCall]] = {}
    for call in row.calls:
        served = call.served_by
        by_key.setdefault(row.key if served is None else f"{served[0]}/{served[1]}", []).append(call)
    return [
        row._replace(
            key=key, usage=counted_usage(sum((call.usage for call in calls), ZERO_USAGE), calls), calls=calls
        )
        for key, calls in by_key.items()
    ]


def outline_model_rows(outline: LoopOutline) -> Sequence[UsageRow]:
    """What the loop of `outline` adds to ``usage_totals("model")``: its `serving_rows`
    (the rows the SQL stores keep per loop and serving model, which those totals sum)."""
    provider, model = outline.provider, outline.model
    key = "unknown" if provider is None or model is None else f"{provider}/{model}"
    return serving_rows(UsageRow(key, provider, model, outline.billed_usage, outline.model_calls()))


def totalled_rows(rows: Iterable[UsageRow], group_by: GroupBy) -> list[UsageRow]:
    """The loops' `rows` (each under its loop's key) as ``usage_totals(group_by)`` prices
    them: by model, each loop's `serving_rows`."""
    if group_by != "model":
        return list(rows)
    return [part for row in rows for part in serving_rows(row)]


def model_totals(rows: Iterable[tuple[str, UsageRow]]) -> list[UsageTotal]:
    """``usage_totals("model")`` of `rows` (`serving_rows`, each with its session's id), by
    key: a session counts once in each of its models, a loop once in each that served it."""
    groups: dict[str, tuple[set[str], int, Usage]] = {}
    for session_id, row in rows:
        sessions, loops, usage = groups.get(row.key) or (set(), 0, ZERO_USAGE)
        sessions.add(session_id)
        groups[row.key] = (sessions, loops + 1, usage + row.usage)
    return [
        UsageTotal(key=key, sessions=len(sessions), loops=loops, usage=usage)
        for key, (sessions, loops, usage) in sorted(groups.items())
    ]


def usage_rows(session: Session, group_by: GroupBy | str) -> Iterator[UsageRow]:
    """`session`'s loops as `UsageRow`, under their key of `usage_totals` (``session``: its
    id; ``model``: a loop's `serving_rows`)."""
    for record in session.loops:
        if group_by == "agent":
            key = session.agent_id
        elif group_by == "day":
            key = str(session.created_at).partition("T")[0]
        elif group_by == "session":
            key = session.session_id
        else:
            yield from serving_rows(loop_usage_row(record, model_key(record)))
            continue
        yield loop_usage_row(record, key)


def loop_usage_row(record: LoopRecord, key: str) -> UsageRow:
    """`record` as a `UsageRow` under `key`."""
    config = record.config
    return UsageRow(
        key,
        None if config is None else config.provider,
        None if config is None else config.model,
        record.billed_usage(),
        record.model_calls(),
    )


def escaped_to_save(value: _T, error: UnicodeEncodeError) -> _T | None:
    """What to save instead of `value` (a session, or sessions) that a store refused for
    text holding lone surrogates (decoded from undecodable bytes): a copy with them
    escaped (`without_lone_surrogates`), logged; None if `value` has none (it is already
    that copy, or the text was not its own)."""
    escaped = without_lone_surrogates(value)
    if escaped is value:
        return None
    pairs = (
        [(escaped, value)]
        if isinstance(value, Session)
        else zip(cast(Any, escaped), cast(Any, value), strict=True)
    )
    for copy, session in pairs:
        if copy is not session:
            _log.warning(
                "session %s holds text no store accepts (%s): saving it with its lone surrogates escaped",
                session.session_id,
                error.reason,
            )
    return escaped


def check_writable(store: Any, action: str) -> None:
    """`StoreError` if `store` was opened read-only (its ``read_only``): the refusal of a
    write (`action`: ``save session 'x'``, ``prune``) in one wording for every backend."""
    if store.read_only:
        raise StoreError(f"{store!r} is open read-only: cannot {action}")


def check_pricer(pricer: Pricer | None) -> None:
    """`usage_totals`' check of its ``pricer`` argument (`TypeError` for anything but a `Pricer`)."""
    if pricer is not None:
        from ..cost import Pricer  # here: cost.py imports this module

        check_type("pricer", pricer, Pricer)


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live. Every backend passes the shared conformance suite.

    Contract: `save` merges with what is stored under the same id (loops are
    matched by ``loop_id``; nothing stored is ever discarded); `load` returns what
    was saved, byte for byte once encoded; missing ids raise `SessionNotFound`;
    ids that could escape the store raise `InvalidSessionId`. Methods are safe
    to call from several threads. Async twins have the same semantics.
    """

    def save(self, session: Session) -> None:
        """Store `session`, merged with what is stored under its id (`merge_sessions`)."""
        ...

    def load(self, session_id: str) -> Session:
        """The stored session; `SessionNotFound` if there is none."""
        ...

    def delete(self, session_id: str) -> None:
        """Remove the session; `SessionNotFound` if there is none."""
        ...

    def list_ids(self) -> list[str]:
        """Every stored id, most recently saved first (equal save times: by id)."""
        ...

    def list_for_agent(self, agent_id: str) -> list[Session]:
        """The sessions of `agent_id`, in `list_ids` order.

        A stored session that cannot be read is skipped with a logged warning
        rather than failing the whole listing.
        """
        ...

    def query(self, query: SessionQuery | None = None) -> list[SessionSummary]:
        """Summaries of the sessions `query` selects, in its order (None: every session, newest first)."""
        ...

    def usage_totals(self, group_by: GroupBy = "agent", *, pricer: Pricer | None = None) -> list[UsageTotal]:
        """Usage summed per agent, per model or per day (`parse_group_by`), sorted by key.

        ``model`` groups each model call by the ``provider/model`` that served it
        (`ModelCall.served_by`), else its loop config's (``"unknown"`` without a
        config), and counts a session, and a loop, once in each of its models;
        ``day`` groups sessions by the UTC date of ``created_at`` (``YYYY-MM-DD``).
        Usage is `LoopRecord.billed_usage`. With a `pricer`, each total also has its
        ``cost`` (`Pricer.price_totals`: each model call at its model's price, and tier,
        when the call was made; unknown when a price is): O(loops) price lookups.
        """
        ...

    def prune(self, criteria: PruneCriteria) -> int:
        """Delete the whole sessions `criteria` selects; returns how many.

        Unreadable sessions are never deleted.
        """
        ...

    def search(
        self, text: str, query: SessionQuery | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[SearchHit]:
        """Where the sessions `query` selects say `text`: at most `limit` hits (`search.py` rules).

        Hits come session by session in the query's order (newest first by default),
        then loop by loop and message by message.
        """
        ...

    def load_outline(self, session_id: str) -> SessionOutline:
        """The stored session with its loops bare, and what each leaves out (`outline.py`):
        what a huge session's viewer shows first. `SessionNotFound` if there is none."""
        ...

    def load_loops(self, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        """The whole loops at positions `start` to `stop` (excluded) of the stored session:
        ``load(session_id).loops[start:stop]``, reading no other loop.

        `SessionNotFound` if there is no such session; `InvalidQuery` for a negative
        bound (`TypeError` for a non-int one).
        """
        ...

    def close(self) -> None:
        """Release the store's resources. Idempotent."""
        ...

    async def asave(self, session: Session) -> None: ...
    async def aload(self, session_id: str) -> Session: ...
    async def adelete(self, session_id: str) -> None: ...
    async def alist_ids(self) -> list[str]: ...
    async def alist_for_agent(self, agent_id: str) -> list[Session]: ...
    async def aquery(self, query: SessionQuery | None = None) -> list[SessionSummary]: ...
    async def ausage_totals(
        self, group_by: GroupBy = "agent", *, pricer: Pricer | None = None
    ) -> list[UsageTotal]: ...
    async def aprune(self, criteria: PruneCriteria) -> int: ...
    async def aload_outline(self, session_id: str) -> SessionOutline: ...
    async def aload_loops(self, session_id: str, start: int, stop: int) -> list[LoopRecord]: ...
    async def asearch(
        self, text: str, query: SessionQuery | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[SearchHit]: ...


@runtime_checkable
class LoopStarts(Protocol):
    """An optional extension of `SessionStore`, which the stores here implement: a store
    without it (written to the protocol before it) works the same, its loop starts read
    from `SessionStore.load_outline` (`stored_loop_starts`). Not in `SessionStore`, whose
    runtime check would refuse such a store."""

    def loop_starts(self, session_id: str, start: int) -> list[tuple[str, int]]:
        """The id and start time (nanoseconds since the epoch) of each stored loop at
        positions `start` onward, in order: what another writer added to a session since a
        reader saw its first `start` loops (a merge keeps stored loops in place and appends
        new ones), reading no record, and nothing before `start` where the store can.

        `SessionNotFound` if there is no such session; `InvalidQuery` for a negative
        `start` (`TypeError` for a non-int one).
        """
        ...

    async def aloop_starts(self, session_id: str, start: int) -> list[tuple[str, int]]: ...


def stored_loop_starts(store: SessionStore, session_id: str, start: int) -> list[tuple[str, int]]:
    """`LoopStarts.loop_starts` of `store`, from its outline when it lacks the extension."""
    if isinstance(store, LoopStarts):
        return store.loop_starts(session_id, start)
    return outline_loop_starts(store, session_id, start)


def outline_loop_starts(store: SessionStore, session_id: str, start: int) -> list[tuple[str, int]]:
    """`LoopStarts.loop_starts` read from `store`'s outline (`SessionStore.load_outline`)."""
    check_loop_range(start, start)
    return [(loop.loop_id, loop.started_at.ns) for loop in store.load_outline(session_id).loops[start:]]


class AsyncTwins:
    """Async twins of the sync methods, run in a worker thread (never blocking the loop)."""

    async def asave(self, session: Session) -> None:
        await asyncio.to_thread(self.save, session)  # type: ignore[attr-defined]

    async def aload(self, session_id: str) -> Session:
        return await asyncio.to_thread(self.load, session_id)  # type: ignore[attr-defined]

    async def adelete(self, session_id: str) -> None:
        await asyncio.to_thread(self.delete, session_id)  # type: ignore[attr-defined]

    async def alist_ids(self) -> list[str]:
        return await asyncio.to_thread(self.list_ids)  # type: ignore[attr-defined]

    async def alist_for_agent(self, agent_id: str) -> list[Session]:
        return await asyncio.to_thread(self.list_for_agent, agent_id)  # type: ignore[attr-defined]

    async def aquery(self, query: SessionQuery | None = None) -> list[SessionSummary]:
        return await asyncio.to_thread(self.query, query)  # type: ignore[attr-defined]

    async def ausage_totals(
        self, group_by: GroupBy = "agent", *, pricer: Pricer | None = None
    ) -> list[UsageTotal]:
        return await asyncio.to_thread(self.usage_totals, group_by, pricer=pricer)  # type: ignore[attr-defined]

    async def aprune(self, criteria: PruneCriteria) -> int:
        return await asyncio.to_thread(self.prune, criteria)  # type: ignore[attr-defined]

    async def asearch(
        self, text: str, query: SessionQuery | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[SearchHit]:
        return await asyncio.to_thread(self.search, text, query, limit)  # type: ignore[attr-defined]

    async def aload_outline(self, session_id: str) -> SessionOutline:
        return await asyncio.to_thread(self.load_outline, session_id)  # type: ignore[attr-defined]

    async def aload_loops(self, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        return await asyncio.to_thread(self.load_loops, session_id, start, stop)  # type: ignore[attr-defined]

    async def aloop_starts(self, session_id: str, start: int) -> list[tuple[str, int]]:
        return await asyncio.to_thread(self.loop_starts, session_id, start)  # type: ignore[attr-defined]


class ScanSearch:
    """`SessionStore.search` by reading the sessions (`scan_search`): for stores without an index."""

    def search(
        self, text: str, query: SessionQuery | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[SearchHit]:
        """See `SessionStore.search`. Loads every selected session: slow on a big store."""
        return scan_search(self, text, query, limit)  # type: ignore[arg-type]


def check_loop_range(start: int, stop: int) -> None:
    """The bounds of `SessionStore.load_loops` (`loop_starts`: its `start` twice): `TypeError`
    unless ints, `InvalidQuery` if negative."""
    check_count("start", start)
    check_count("stop", stop)


EVERY_SESSION = SessionQuery()


def as_query(query: SessionQuery | None) -> SessionQuery:
    """What a backend's `query` was asked: None means every session; another type is a `TypeError`."""
    if query is None:
        return EVERY_SESSION
    check_type("query", query, SessionQuery)
    return query


def query_selects(
    query: SessionQuery, summary: SessionSummary, configs: Iterable[tuple[str | None, str | None]]
) -> bool:
    """Whether `query`'s filters (not its order, limit or page) select the session `summary`
    sums up, whose loops ran the ``(provider, model)`` `configs`."""
    return (
        (query.agent_id is None or summary.agent_id == query.agent_id)
        and _selects_numbers(query, summary)
        and (query.status is None or summary.loops_by_status.get(query.status, 0) > 0)
        and (query.model is None or _runs_model(query.model, configs))
        and (query.parent_session_id is None or summary.parent_session_id == query.parent_session_id)
    )


def _selects_numbers(query: SessionQuery, summary: SessionSummary) -> bool:
    return (
        (query.since is None or summary.last_active_at >= query.since)
        and (query.until is None or summary.last_active_at < query.until)
        and (query.min_tokens is None or summary.total_tokens >= query.min_tokens)
    )


def past_the_columns(
    query: SessionQuery, summaries: Iterable[SessionSummary], first: list[SessionSummary]
) -> list[SessionSummary]:
    """A SQL store's answer to `query`: `first`, what its integer columns selected among
    the sessions whose time and token count they hold exact, merged with those of
    `summaries` (the sessions whose value a column saturates, which `query`'s other
    filters selected) that its filters on time and tokens and its page select, in its
    order and up to its limit."""
    after = query.after
    past = [row for row in summaries if _selects_numbers(query, row) and (after is None or after.passed(row))]
    if not past:
        return first
    rows = first + past
    sort_summaries(rows, query.order)
    return rows if query.limit is None else rows[: query.limit]


def sort_summaries(rows: list[SessionSummary], order: Order) -> None:
    """Sort `rows` in `order`, ties by session id (as every store sorts)."""
    rows.sort(key=lambda row: row.session_id)  # ties, kept by the stable sorts below
    if order == "newest":
        rows.sort(key=lambda row: row.last_active_at, reverse=True)
    elif order == "oldest":
        rows.sort(key=lambda row: row.last_active_at)
    else:
        rows.sort(key=lambda row: row.total_tokens, reverse=True)


def _runs_model(wanted: str, configs: Iterable[tuple[str | None, str | None]]) -> bool:
    # Matched on the parts: a provider's name may hold a "/" as well as a model's.
    return any(
        model == wanted or (provider is not None and f"{provider}/{model}" == wanted)
        for provider, model in configs
    )


def loop_configs(session: Session) -> Iterator[tuple[str | None, str | None]]:
    """``(provider, model)`` of each loop of `session` that has a config (`query_selects`)."""
    return ((loop.config.provider, loop.config.model) for loop in session.loops if loop.config is not None)


def scan_search(store: SessionStore, text: str, query: SessionQuery | None, limit: int) -> list[SearchHit]:
    """`SessionStore.search` by loading every selected session and reading it (slow on big stores)."""
    return collect_hits(store, search_words(text, limit), query, limit)


def collect_hits(
    store: SessionStore,
    words: tuple[str, ...],
    query: SessionQuery | None,
    limit: int,
    candidates: Container[str] | None = None,
) -> list[SearchHit]:
    """The first `limit` hits of `words` in the sessions `query` selects, in its order.

    An index passes the ids of the sessions that may match as `candidates`: only those
    are loaded (None: every selected session is). A session that cannot be read is
    skipped with a logged warning, as listings skip it.
    """
    hits: list[SearchHit] = []
    if not words or not limit:
        return hits
    for summary in store.query(as_query(query)):
        if candidates is not None and summary.session_id not in candidates:
            continue
        try:
            session = store.load(summary.session_id)
        except SessionNotFound:  # deleted since the listing
            continue
        except StoreError as error:
            _log.warning("skipping unreadable session %r: %s", summary.session_id, error)
            continue
        hits.extend(itertools.islice(document_hits(session, words), limit - len(hits)))
        if len(hits) == limit:
            break
    return hits


# msgspec refuses text holding a lone surrogate: encoding a session (in C) is how a store
# learns cheaply that it holds none, the common case.
_surrogate_check = msgspec.json.Encoder(enc_hook=json_form)


def session_to_save(session: Session) -> Session:
    """A session handed to `save` as a store holds it (`TypeError` for anything but a
    `Session`; its id checked): itself, or a copy with the lone surrogates of its text
    escaped (`escaped_to_save`) and its free-form values nested too deep to write clipped
    (`within_depth`), as stores write them. It is merged with the stored copy
    so: merged raw, the same session saved again would read as new loops and links."""
    check_type("session", session, Session)
    validate_session_id(session.session_id)  # before escaping: such an id is refused
    try:
        _surrogate_check.encode(session)
    except UnicodeEncodeError as error:
        escaped = escaped_to_save(session, error)
        return session if escaped is None else escaped  # None: nothing the walk reaches to escape
    except RecursionError:
        clipped = within_depth(session)
        if clipped is session:  # not a free-form value's doing
            raise
        _log.warning(
            "session %s holds a value nested too deep to write: saving it with that value clipped",
            session.session_id,
        )
        return session_to_save(clipped)
    return session


def save_as_written(sessions: Sequence[Session], write: Callable[[Sequence[Session]], None]) -> None:
    """Save `sessions` (`TypeError` for anything but a `Session`; their ids checked) with
    `write`, a store's whole save of them, which writes nothing unless it completes.

    `write` runs `refusing_unwritable`: a session holding lone surrogates, or a value
    nested too deep to write, makes it raise before anything is written, merged or not;
    only then are the sessions made as stores write them (`session_to_save`, which says
    so in the log) and written again, outside the block: how deep an encoder reaches
    depends on the stack it starts from, so a value `session_to_save`'s shallower check
    passes may still be too deep for the store's encoders, which then clip it."""
    for session in sessions:
        check_type("session", session, Session)
        validate_session_id(session.session_id)
    try:
        with refusing_unwritable():
            write(sessions)
            return
    except (UnicodeEncodeError, RecursionError):
        sessions = [session_to_save(session) for session in sessions]
    write(sessions)


def validate_session_id(session_id: str) -> str:
    """Reject ids that could escape a directory or break a file name (`TypeError` for a non-string)."""
    check_type("session id", session_id, str)
    if not session_id:
        raise InvalidSessionId("session id must be a non-empty string")
    try:
        size = len(session_id.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no file name, no database text
        raise InvalidSessionId(f"session id {session_id!r} is not valid Unicode text") from None
    if (
        "/" in session_id
        or "\\" in session_id
        or "\x00" in session_id
        or session_id in (".", "..")
        or session_id.startswith(".")
        or size > 200
    ):
        # Cut short only beyond what a valid id may hold (200 bytes).
        raise InvalidSessionId(f"unsafe session id {shown(repr(session_id), 240)}")
    return session_id


def validate_loop_session_id(session_id: str) -> str:
    """`validate_session_id`, and no ``.``: the id of a session loops are recorded in, which
    phi-core reads back from their ids (``{session_id}.{config_id}.{N}``) as the part
    before the first ``.``."""
    validate_session_id(session_id)
    if "." in session_id:
        head = session_id.split(".", 1)[0]
        raise InvalidSessionId(
            f"session id {shown(repr(session_id), 240)} holds a '.': its loop ids name session {head!r}"
        )
    return session_id


# A loop that ended outweighs one cut short (never ended: a recorder too keeps an ended
# record over the same loop sent again that never ends), which outweighs a running snapshot.
_FINISH_RANK: dict[str, int] = {"Pending": 0, "Running": 0, "Aborted": 1, "Completed": 2, "Rejected": 2}


def _loop_weight(record: LoopRecord) -> tuple[int, int]:
    # Then more events win.
    return (_FINISH_RANK[record.status], len(record.events))


def merge_sessions(stored: Session, incoming: Session) -> Session:
    """Combine two saves of one session id without losing a loop.

    Which records are the same loop (the merge key): a loop is known by its
    ``loop_id``, its agent and its lifetime. An incoming record with id X is matched
    with the first stored record of id X, not matched yet, of the same ``agent_id``
    (or either's unknown: empty, a parallel branch registered before it started, or made
    up by the OTLP ingest, listed in ``metadata["otel"]["synthesized"]``), a compaction
    pass only with a compaction pass (which may start at its loop's very instant: a
    clock of ms), that

    1. started at the same instant and, for a compaction pass, ended at the same
       instant (or neither has ended), else one is a running snapshot yet to end
       (`RecordMark`; the n-th such with the n-th: a pass cut short, saved
       ``Aborted`` with no end, is not a finished pass started at its instant);
       else that
    2. started at another instant and was alive at the same time: neither started at
       or after the other ended (an unfinished record has not ended). A restarted or
       re-stamped ``AgentStart`` thus saves the same loop again, not a second one.

    Otherwise the record is new and is appended: an id used again after its loop
    ended names a second record (phi-core's compaction pass re-uses the id of the
    last, finished loop, and phi-core keeps both), and so does one another agent
    ran (two processes' adapters that numbered overlapping runs of one session alike,
    each with an agent id of its own: neither run is lost).

    Of two versions of one loop, an ended one (``Completed``, ``Rejected``) wins
    over one cut short (``Aborted``), which wins over a running snapshot; then the
    one with more events, then (a tie) the incoming one; the winner is kept whole, start time
    included. Stored loops keep their place; new ones are appended in their order.
    A winning version keeps the links (``children_loop_ids``, ``child_loop_refs``)
    of the version it replaces, and a finished loop that is new or changed is
    linked into its same-session parent's ``children_loop_ids``, as are the stored
    finished children of a parent that is new or changed: a recorder that drained
    the parent before the child finished (or the child before the parent came) could
    not link them, and the merged session then reads as if it had been recorded in
    one go.
    Session-scoped events (``session_events``) are combined the same way: the
    incoming ones not already stored are appended.
    """
    loops = list(stored.loops)
    stored_slots: dict[str, list[int]] = {}  # loop id -> positions of its stored records
    for index, record in enumerate(loops):
        stored_slots.setdefault(record.loop_id, []).append(index)
    matched: set[int] = set()
    adopted: list[LoopRecord] = []  # incoming versions that are new or differ from the stored one
    for record in incoming.loops:
        unmatched = [slot for slot in stored_slots.get(record.loop_id, ()) if slot not in matched]
        slot = _same_loop(record, loops, unmatched)
        if slot is None:
            loops.append(record)
            adopted.append(record)
            continue
        matched.add(slot)
        kept = loops[slot]
        if _loop_weight(record) >= _loop_weight(kept):
            merged = keep_links(kept, record)
            # Compared as stored: encoders drop the agent metadata of plain-form messages
            # (a request's history), which a loaded copy lacks (stripped only if they differ).
            if merged != kept and without_plain_metadata(merged) != without_plain_metadata(kept):
                loops[slot] = merged
                adopted.append(merged)
    _link_to_parents(loops, adopted)
    spawn = incoming.parent_spawn_ref or stored.parent_spawn_ref
    if stored.parent_spawn_ref and spawn and not spawn.tool_call_id and stored.parent_spawn_ref.tool_call_id:
        spawn = stored.parent_spawn_ref
    return msgspec.structs.replace(
        stored,
        created_at=min(stored.created_at, incoming.created_at),
        last_active_at=max(stored.last_active_at, incoming.last_active_at),
        parent_spawn_ref=spawn,
        scope="persistent" if "persistent" in (stored.scope, incoming.scope) else "ephemeral",
        loops=loops,
        rejected=True if (stored.is_rejected or incoming.is_rejected) else msgspec.UNSET,
        session_events=_merge_events(stored.session_events, incoming.session_events),
    )


def loops_a_merge_touches(stored: Sequence[tuple[str, str | None]], incoming: Session) -> list[int]:
    """The positions of the stored loops (`stored`: each one's loop id and parent loop id,
    in order) that `merge_sessions` with `incoming` may change or read: those of its loops'
    ids, of their parents' (a finished loop is linked into its parent's
    ``children_loop_ids``), and their children (linked into a parent that is new or
    changed). The others keep their place as stored: a store reads whole only these
    (`merge_part`)."""
    ids = {record.loop_id for record in incoming.loops}
    wanted = ids | {record.parent_loop_id for record in incoming.loops if record.parent_loop_id is not None}
    return [
        position
        for position, (loop_id, parent_id) in enumerate(stored)
        if loop_id in wanted or parent_id in ids
    ]


def merge_part(
    stored: Session, positions: Sequence[int], loop_count: int, incoming: Session
) -> tuple[Session, list[tuple[int, LoopRecord]]]:
    """`merge_sessions` of a stored session of `loop_count` loops with `incoming`, read in
    part: `stored` holds the header and only the loops at `positions` (at least those of
    `loops_a_merge_touches`). The merged header (its loops: those of `stored`, merged, then
    the new ones), and each of those loops with its position in the whole merged session.
    The same as merging the whole session: every loop the merge matches, replaces or
    links is among them, and new loops are appended after the last stored one."""
    merged = merge_sessions(stored, incoming)
    added = range(loop_count, loop_count + len(merged.loops) - len(positions))
    return merged, list(zip([*positions, *added], merged.loops, strict=True))


def _ended_before(first: LoopRecord, second: LoopRecord) -> bool:
    return first.ended_at is not None and second.started_at >= first.ended_at


def _agent_unknown(record: LoopRecord) -> bool:
    """Whether `record` may be any agent's: empty (a parallel branch registered before it
    started), or made up by the OTLP ingest (a chat span standing in for a loop span yet
    to come, its agent guessed from the service), listed in its metadata."""
    if not record.agent_id:
        return True
    otel = record.metadata.get("otel") if isinstance(record.metadata, dict) else None
    made_up = otel.get("synthesized") if isinstance(otel, dict) else None
    return isinstance(made_up, list) and "agent_id" in made_up


def _same_loop(record: LoopRecord, loops: list[LoopRecord], candidates: list[int]) -> int | None:
    """The position of the stored version of `record` among `candidates` (the unmatched
    stored records of its id), or None: the merge key of `merge_sessions`."""
    mark = RecordMark.of(record)
    marks = {slot: RecordMark.of(loops[slot]) for slot in candidates}
    candidates = [slot for slot in candidates if marks[slot].compaction == mark.compaction]
    if not _agent_unknown(record):
        agent = record.agent_id
        candidates = [
            slot for slot in candidates if loops[slot].agent_id == agent or _agent_unknown(loops[slot])
        ]
    found = mark.position_in([marks[slot] for slot in candidates])
    if found is not None:
        return candidates[found]
    for slot in candidates:
        if (
            marks[slot].started_at != mark.started_at  # at one instant, the marks alone decide
            and not _ended_before(loops[slot], record)
            and not _ended_before(record, loops[slot])
        ):
            return slot
    return None


def _link_to_parents(loops: list[LoopRecord], adopted: list[LoopRecord]) -> None:
    first: dict[str, int] = {}  # like the recorder, a loop id names its first record
    for index, record in enumerate(loops):
        first.setdefault(record.loop_id, index)
    # A parent new or changed links its stored children too: one saved before it (its
    # continuation's trace exported first) is not in its links.
    parents = {record.loop_id for record in adopted if loops[first[record.loop_id]] is record}
    taken = set(map(id, adopted))
    stored = [record for record in loops if record.parent_loop_id in parents and id(record) not in taken]
    for child in [*stored, *adopted]:
        if child.parent_loop_id is None or child.status in ("Running", "Pending"):
            continue  # only finished loops are linked
        slot = first.get(child.parent_loop_id)
        if slot is None:
            continue  # the parent lives in another session
        parent = loops[slot]
        if parent is child:
            continue  # never to itself (a compaction pass's record links to its loop's first)
        if child.loop_id not in parent.children_loop_ids:
            loops[slot] = msgspec.structs.replace(
                parent, children_loop_ids=(*parent.children_loop_ids, child.loop_id)
            )


def _merge_events(
    stored: list[AgentEvent] | msgspec.UnsetType, incoming: list[AgentEvent] | msgspec.UnsetType
) -> list[AgentEvent] | msgspec.UnsetType:
    if isinstance(incoming, msgspec.UnsetType):
        return stored
    if isinstance(stored, msgspec.UnsetType):
        return list(incoming)
    # Events are compared by their encoding (their fields may hold unhashable JSON
    # values); the n-th copy of an event matches the n-th stored copy, so a later
    # snapshot that repeats the stored events adds only what is new.
    remaining = Counter(encode_event(event) for event in stored)
    merged = list(stored)
    for event in incoming:
        key = encode_event(event)
        if remaining[key]:
            remaining[key] -= 1
        else:
            merged.append(event)
    return merged


def summarize(session: Session) -> SessionSummary:
    """The listing row of a session."""
    loops = (
        (
            record.status,
            None if record.config is None else model_key(record),
            record.billed_usage(),
            len(record.turns),
        )
        for record in session.loops
    )
    return summarize_parts(session, len(session.loops), loops, first_prompt(session))


def summarize_outline(outline: SessionOutline) -> SessionSummary:
    """The listing row of an outlined session (`summarize` of the whole session)."""
    loops = ((loop.status, loop.model_key, loop.billed_usage, loop.turn_count) for loop in outline.loops)
    return summarize_parts(outline.session, len(outline.loops), loops, outline.first_prompt)


def summarize_parts(
    session: Session, loop_count: int, loops: Iterable[tuple[str, str | None, Usage, int]], prompt: str | None
) -> SessionSummary:
    """The listing row of `session` (whose loops may be left out) from each loop's status,
    ``provider/model`` (None: no config), billed usage and turn count, and its first prompt."""
    statuses: Counter[str] = Counter()
    models: dict[str, None] = {}
    usage = ZERO_USAGE
    turns = 0
    for status, model, billed, turn_count in loops:
        statuses[status] += 1
        usage = usage + billed
        turns += turn_count
        if model is not None:
            models[model] = None
    spawn = session.parent_spawn_ref
    return SessionSummary(
        session_id=session.session_id,
        agent_id=session.agent_id,
        created_at=session.created_at,
        last_active_at=session.last_active_at,
        formation=session.formation.kind,
        parent_session_id=spawn.parent_session_id if spawn is not None else None,
        rejected=session.is_rejected,
        loop_count=loop_count,
        # In `LOOP_STATUSES` order, as the SQL stores' columns give them: one listing, whatever the store.
        loops_by_status={status: statuses[status] for status in LOOP_STATUSES if status in statuses},
        turn_count=turns,
        usage=usage,
        models=tuple(models),
        first_prompt=prompt,
    )


def _encode_extra(obj: Any) -> Any:
    if isinstance(obj, Timestamp):
        return str(obj)
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def to_builtins(obj: Any) -> Any:
    """JSON-ready builtins of query results (summaries, usage totals), as the front ends show them.

    A `SessionSummary` also gets its ``total_tokens`` (a property, not a field).
    """
    if isinstance(obj, list):
        return [to_builtins(item) for item in obj]
    data = msgspec.to_builtins(obj, enc_hook=_encode_extra)
    if isinstance(obj, SessionSummary):
        data["total_tokens"] = obj.total_tokens
    return data
