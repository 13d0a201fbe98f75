"""`PostgresStore`: sessions in a PostgreSQL database, shared by many processes and machines.

Install with ``pip install 'phi-session[postgres]'`` (psycopg 3). Without it this
module still imports and `PostgresStore()` raises `MissingStoreExtra` (a `MissingExtra`
and a `StoreError`) saying what to install; ``phi_session`` imports this module only
when `PostgresStore` is used.

Layout (all tables live in one schema, ``phi_session`` by default):

* ``meta``: ``schema_version`` (and room for later settings). Opening a store
  applies the missing forward migrations (`_MIGRATIONS`) in order, in one
  transaction, under a transaction-level advisory lock, so processes starting
  together never race and a failed migration leaves nothing behind. A schema
  written by a newer phi-session is refused with `StoreError`.
* ``sessions``: one row per session: the filterable summary columns (agent, times
  as BIGINT nanoseconds, formation, parent, per-status loop counts, token sums as
  NUMERIC, models) and ``header``, the session's compact JSON without its loops.
  ``saved_order`` (from the sequence ``save_order``) orders `list_ids`.
* ``loops``: one row per LoopRecord, in session order (``position``): the columns
  the model filters read, ``record``, the loop's compact phi-core JSON
  (`codec.encode_loop`), and ``words``, its full-text index entry (below). Rows go
  with their session (``ON DELETE CASCADE``). Token columns hold what a loop billed
  (`LoopRecord.billed_usage`); the v4 migration rebilled the loops cut off before
  their ``AgentEnd`` that earlier versions saved at zero, the v15 migration counted the
  calls that reported no total (`model.counted_usage`). ``calls`` holds the loop's
  model calls (`outline.encode_calls`), which priced totals read (schema v6).
* ``loop_models``: what each loop adds to the per-model totals, its usage by the
  model that served its calls (`outline_model_rows`), one row per loop and model,
  written and deleted with the loop's row (schema v12).

Full-text search (schema v2). ``words`` is a ``tsvector`` (GIN-indexed) of the
distinct words of the loop's searchable text (`search.loop_text`), split and
case-folded by `search.query_words` itself rather than by a PostgreSQL text
parser (which would split ``example.com`` or ``1.5`` differently from the query
rule), each cut to `_LEXEME_CHARS`. It is written with the loop row, so saves,
merges, deletes and prunes keep it current; a loop whose words outgrow a
``tsvector`` gets NULL and is read by every search. `search` asks the index for
the loops holding every query word (the first `_TSQUERY_WORDS` of a longer query),
then reads only those loops of the candidate sessions and applies the exact rule of
`search.py`. The v2 migration fills the column for the loops already stored.

Header and records are stored as the exact bytes phi-session writes (BYTEA, not
JSONB, which would reorder keys), so ``encode_session(load(id))`` equals
``encode_session(saved)`` byte for byte. PostgreSQL text cannot hold NUL: the text
columns, copies of the JSON's values for filters and listings, show it as U+FFFD
(`_text`). Filters stay exact: a filter value holding NUL or U+FFFD, whose column
match may be another string (NUL where it has U+FFFD, or the reverse), has each
session the columns select checked against its JSON (`_selected`); summaries read
their ids from the JSON, exact, and models and first prompt that held NUL
(``sessions.listing_nul``, schema v9) from the loops' outlines; `list_for_agent`
keeps only the agent asked for. Per-agent and per-model totals are exact too: a
group whose key holds U+FFFD is summed again under the keys its rows' JSON (a
loop's record and calls) holds (`_exact_totals`).
Text columns use the ``"C"`` collation, so every ordering is by code point (as in
Python and the other stores), whatever the database's locale. Times in the index
columns are clamped to what BIGINT nanoseconds hold (1677-09-21 to 2262-04-11);
the JSON keeps the exact instants, and summaries read them from there.

Concurrency: `save` locks the session row (``SELECT … FOR UPDATE``; a new session
is inserted with ``ON CONFLICT DO NOTHING`` and locked on the next try if another
writer inserted it first), reads the stored loops, merges with `merge_sessions`
and writes back the session row and the loops that changed, in one transaction.
Saves of one session therefore serialize across threads, processes and machines,
and none loses a loop. Waiting longer than ``lock_timeout`` for a row another
writer holds raises `SessionLocked`. Readers never wait: `load` and the listings
read one consistent snapshot in a single statement. `prune` deletes in one
transaction, skipping sessions being saved at that moment, then runs ``VACUUM
(ANALYZE)`` on both tables (outside the transaction, as VACUUM requires).

Connections: a small built-in pool (``pool_size`` connections, opened on demand,
in autocommit mode with explicit transactions). An idle connection the server ended
(a restart, ``idle_session_timeout``, ``pg_terminate_backend``) is seen before it is
used, without a round trip, and replaced: no call fails on it. A connection that
breaks during a call fails that call with `StoreError`, not retried (it may have
committed), and is dropped with the idle ones (they went through the same outage,
perhaps unseen); the next calls open new ones.

Async twins run the sync methods in a worker thread (`AsyncTwins`): one code path,
one set of transaction rules; at most ``pool_size`` calls use the database at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import select
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import msgspec

from .._checks import MOST_WAIT_SECONDS, check_seconds, check_type
from .._time import Timestamp
from ..codec import decode_loop, decode_session, encode_loop, encode_session
from ..errors import (
    DecodeError,
    InvalidArgument,
    InvalidStoreUrl,
    MissingStoreExtra,
    SessionLocked,
    SessionNotFound,
    SessionRefused,
    StoreClosed,
    StoredSessionUnusable,
    StoreError,
    UsedAfterFork,
)
from ..messages import ZERO_USAGE, Usage
from ..model import LoopRecord, Session
from .base import (
    STATUS_COLUMNS,
    USAGE_COLUMNS,
    USAGE_FIELDS,
    AsyncTwins,
    SessionSummary,
    UsageRow,
    UsageTotal,
    as_query,
    check_loop_range,
    check_pricer,
    check_writable,
    loop_configs,
    loops_a_merge_touches,
    merge_part,
    model_key,
    model_totals,
    outline_model_rows,
    query_selects,
    save_as_written,
    serving_rows,
    stored_usage_row,
    summarize,
    summarize_outline,
    totalled_rows,
    validate_session_id,
)
from .outline import (
    LoopOutline,
    SessionOutline,
    decode_loop_outline,
    encode_calls,
    encode_loop_outline,
    encode_outline_parts,
    loop_outline,
    session_outline,
    stored_first_prompts,
)
from .query import LOOP_STATUSES, GroupBy, PruneCriteria, SessionQuery, check_text, parse_group_by, shown
from .search import DEFAULT_LIMIT, SearchHit, document_hits, loop_text, query_words, search_words

# psycopg is optional: this module imports without it and `PostgresStore()` says
# what to install. `phi_session` itself imports this module only on first use.
_MISSING_PSYCOPG: ImportError | None = None
try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    _MISSING_PSYCOPG = exc

if TYPE_CHECKING:
    from ..cost import Pricer

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

_log = logging.getLogger(__name__)

SCHEMA_VERSION = 15
"""The schema version this code writes; `PostgresStore` migrates older databases to it."""

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Advisory-lock class id ("ph") of schema migrations; the object id is hashtext(schema).
MIGRATION_LOCK_CLASS = 0x7068
# libpq's error for a parameter it does not know, in a URL or a key=value string.
_UNKNOWN_PARAMETER = re.compile(r'invalid (?:URI query parameter:|connection option) "([^"\n]+)"')
# Migrations may rewrite tables, so other processes wait for them longer than for a session.
_MIGRATION_LOCK_TIMEOUT = 60.0
# Search lexemes are cut to this many characters (a tsvector lexeme holds at most 2047
# bytes); a loop's lexemes beyond _LEXEME_BUDGET bytes (a tsvector holds 1 MiB) are not indexed.
_LEXEME_CHARS = 256
_LEXEME_BUDGET = 1_000_000
# A search asks the index for at most this many of its words (`_tsquery`).
_TSQUERY_WORDS = 256
# Candidate sessions of a search are read 4, 8, … at most this many at a time, until the hits suffice.
_SEARCH_BATCH = 32
# A save retries when its session vanished (deleted) between its insert attempt and its lock.
_SAVE_ATTEMPTS = 8

if TYPE_CHECKING:
    from typing import TypeAlias

    _Backfill: TypeAlias = Callable[["psycopg.Cursor[Row]", Callable[[str], "sql.Composed"]], None]


def _blurred(query: SessionQuery) -> bool:
    """Whether a text filter of `query` may match its column for another string too:
    one with NUL where the value has U+FFFD, or the reverse (`_text`)."""
    return any(
        value is not None and ("\x00" in value or "\ufffd" in value)
        for value in (query.agent_id, query.model, query.parent_session_id)
    )


def _text(value: str | None) -> str | None:
    """`value` as a text column can hold it: PostgreSQL text refuses NUL, shown as U+FFFD.
    Only for copies of what the JSON keeps exact (filters and listings)."""
    return value.replace("\x00", "\ufffd") if value is not None else None


_BLURRED = "\ufffd"  # in a text column: U+FFFD, or NUL (`_text`)


def _exact_loop(record: bytes | None) -> LoopRecord | None:
    """The loop of a row whose text columns may stand for other strings (`_text`), to read
    its exact names from; None for another row, or one whose record does not decode."""
    if record is None:
        return None
    try:
        return decode_loop(record, strict=False)
    except DecodeError:
        return None


def _exact_key(group_by: GroupBy, key: str, loop: LoopRecord | None, header: bytes | None) -> str:
    """A `usage_totals` key as the JSON has it (`loop` and `header` are read only for rows
    whose key column may stand for another string); else the column's `key`."""
    if group_by == "agent" and header is not None:
        return _listed_decoder.decode(header).agent_id
    if group_by == "model" and loop is not None:
        return model_key(loop)
    return key


def _lexemes(record: LoopRecord) -> list[str] | None:
    """The ``words`` entry of `record`: its distinct search words, each cut to `_LEXEME_CHARS`
    (a cut word still finds its loop: the query's words are cut alike); None when they
    outgrow `_LEXEME_BUDGET` (the loop is then read by every search)."""
    lexemes = list(dict.fromkeys(word[:_LEXEME_CHARS] for word in query_words(loop_text(record))))
    if sum(len(lexeme.encode()) for lexeme in lexemes) > _LEXEME_BUDGET:
        return None
    return lexemes


def _tsquery(words: Sequence[str]) -> str:
    """The tsquery text asking for every one of `words` (`query_words`: letters, digits and
    ``_`` only, so quoting each lexeme needs no escape), but beyond the first
    `_TSQUERY_WORDS`: the index then names a few more candidates, which the exact rule
    reads (a tsquery holds at most 1 MB of lexemes)."""
    return _all_of(words[:_TSQUERY_WORDS])


def _all_of(words: Sequence[str]) -> str:
    """`_tsquery` as a balanced tree of ``&``: PostgreSQL evaluates a tsquery recursively,
    and a chain of some 19,000 words exceeded its stack depth limit."""
    if len(words) == 1:
        return f"'{words[0][:_LEXEME_CHARS]}'"
    half = len(words) // 2
    return f"({_all_of(words[:half])}) & ({_all_of(words[half:])})"


_WORDS_VALUE = "array_to_tsvector(%s::text[])"  # NULL stays NULL: array_to_tsvector is strict
# A loop row ``l`` that may hold every word of the tsquery parameter.
_MATCHING_LOOP = "(l.words @@ %s::tsquery OR l.words IS NULL)"


def _in_batches(cur: psycopg.Cursor[Row], name: str, query: sql.Composed) -> Iterator[list[Row]]:
    """The rows of `query`, 500 at a time, read through a server-side cursor named `name`
    (a migration step's backfill: the table is never held in memory whole)."""
    with cur.connection.cursor(name=name) as reader:
        reader.execute(query)
        while rows := reader.fetchmany(500):
            yield rows


def _backfill_loops(
    column: str,
    value: str,
    compute: Callable[[LoopRecord], Any],
    cur: psycopg.Cursor[Row],
    compose: Callable[[str], sql.Composed],
) -> None:
    """A migration step: set `column` of every stored loop to `value` (SQL of one parameter)
    of ``compute(record)``, reading the loops in batches through a server-side cursor. A
    record that does not decode keeps NULL (its readers then report it, as `load` does)."""
    update = compose(f"UPDATE {{s}}.loops SET {column} = {value} WHERE session_id = %s AND position = %s")
    query = compose("SELECT session_id, position, record FROM {s}.loops")
    for rows in _in_batches(cur, f"phi_session_backfill_{column}", query):
        values = []
        for session_id, position, record in rows:
            try:
                values.append((compute(decode_loop(record, strict=False)), session_id, position))
            except DecodeError:
                continue
        cur.executemany(update, values)


# Migration 4: a loop without AgentEnd counts the turn it was cut off in
# (`LoopRecord.billed_usage`). Released steps are frozen: the columns are spelled out.
_V4_FIELDS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")
_V4_TOKENS = (
    "input_tokens, output_tokens, reasoning_tokens, cache_read_tokens, cache_write_tokens, total_tokens"
)


def _bill_unfinished_loops(cur: psycopg.Cursor[Row], compose: Callable[[str], sql.Composed]) -> None:
    """Migration 4: the token columns of the loops saved at zero although their log holds
    billed calls (a loop without AgentEnd), and of their sessions; the records do not
    change. A record that does not decode is left as it was (reading it reports it)."""
    zero = " AND ".join(f"{column} = 0" for column in _V4_TOKENS.split(", "))
    update = compose(
        f"UPDATE {{s}}.loops SET ({_V4_TOKENS}) = (%s, %s, %s, %s, %s, %s)"
        " WHERE session_id = %s AND position = %s"
    )
    billed: set[str] = set()
    query = compose(
        "SELECT session_id, position, record FROM {s}.loops"
        f" WHERE status NOT IN ('Completed', 'Rejected') AND {zero}"
    )
    for rows in _in_batches(cur, "phi_session_bill_loops", query):
        values = []
        for session_id, position, blob in rows:
            try:
                record = decode_loop(blob, strict=False)
            except DecodeError:
                continue
            usage = record.billed_usage()
            if usage != record.usage:
                values.append((*(getattr(usage, name) for name in _V4_FIELDS), session_id, position))
                billed.add(session_id)
        cur.executemany(update, values)
    _sum_session_tokens(cur, compose, billed)


def _sum_session_tokens(
    cur: psycopg.Cursor[Row], compose: Callable[[str], sql.Composed], sessions: set[str]
) -> None:
    """The token columns of `sessions`, the sums of their loops' again."""
    if sessions:
        sums = ", ".join(f"sum(l.{column})" for column in _V4_TOKENS.split(", "))
        cur.execute(
            compose(
                f"UPDATE {{s}}.sessions s SET ({_V4_TOKENS}) ="
                f" (SELECT {sums} FROM {{s}}.loops l WHERE l.session_id = s.session_id)"
                " WHERE s.session_id = ANY(%s)"
            ),
            (sorted(sessions),),
        )


def _count_untotalled_calls(cur: psycopg.Cursor[Row], compose: Callable[[str], sql.Composed]) -> None:
    """Migration 15: a loop's total counts the tokens of its calls that reported no total
    (phi-core's Anthropic provider sets none: `counted_usage`), which its listing,
    ``min_tokens``, the order by tokens and the totals by model read, and a turn of several
    replies (an errored one, then a fallback's) is a call per reply, each on its model.
    Neither shows in the stored columns (a loop mixing calls with and without totals, a
    turn stored as one call), so every loop is decoded: one whose token columns, outline or
    calls differ from what it is stored as now gets them and its rows by serving model
    again, and its session its sums. A record that does not decode is left as it was."""
    update = compose(
        f"UPDATE {{s}}.loops SET ({_V4_TOKENS}, outline, calls) = (%s, %s, %s, %s, %s, %s, %s, %s)"
        " WHERE session_id = %s AND position = %s"
    )
    remove = compose("DELETE FROM {s}.loop_models WHERE session_id = %s AND position = %s")
    insert = compose(_INSERT_LOOP_MODEL)
    query = compose(f"SELECT session_id, position, record, {_V4_TOKENS}, outline, calls FROM {{s}}.loops")
    counted: set[str] = set()
    for rows in _in_batches(cur, "phi_session_count_untotalled", query):
        for session_id, position, blob, *stored in rows:
            try:
                record = decode_loop(blob, strict=False)
            except DecodeError:
                continue
            outline = loop_outline(record)
            current = (*_usage_values(record.billed_usage()), *encode_outline_parts(outline))
            if tuple(stored) == current:
                continue
            cur.execute(update, (*current, session_id, position))
            cur.execute(remove, (session_id, position))
            cur.executemany(
                insert,
                [_loop_model_values(session_id, position, part) for part in outline_model_rows(outline)],
            )
            counted.add(session_id)
    _sum_session_tokens(cur, compose, counted)


def _store_first_prompts(cur: psycopg.Cursor[Row], compose: Callable[[str], sql.Composed]) -> None:
    """Migration 5: ``sessions.first_prompt`` from the loops' outlines (a loop without one,
    not decodable, is passed over)."""
    query = compose(
        "SELECT session_id, outline FROM {s}.loops WHERE outline IS NOT NULL ORDER BY session_id, position"
    )
    rows: Iterator[tuple[str, bytes]] = itertools.chain.from_iterable(
        _in_batches(cur, "phi_session_first_prompts", query)
    )
    cur.executemany(
        compose("UPDATE {s}.sessions SET first_prompt = %s WHERE session_id = %s"),
        [
            (_text(prompt), session_id)
            for session_id, prompt in stored_first_prompts(rows)
            if prompt is not None
        ],
    )


def _sum_loops_by_serving_model(cur: psycopg.Cursor[Row], compose: Callable[[str], sql.Composed]) -> None:
    """Migration 12's backfill: each stored loop's ``loop_models`` rows (`serving_rows` of
    its stored calls), reading the loops in batches through a server-side cursor."""
    insert = compose(
        f"INSERT INTO {{s}}.loop_models (session_id, position, model, {_V4_TOKENS})"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    query = compose(
        "SELECT session_id, position, COALESCE(provider || '/' || model, 'unknown'), provider, model,"
        f" calls, started_at_ns, {_V4_TOKENS} FROM {{s}}.loops"
    )
    for rows in _in_batches(cur, "phi_session_backfill_loop_models", query):
        cur.executemany(
            insert,
            [
                _loop_model_values(session_id, position, part)
                for session_id, position, key, provider, model, calls, started, *usage in rows
                for part in serving_rows(
                    stored_usage_row(key, provider, model, calls, Timestamp.from_ns(started), _usage(usage))
                )
            ],
        )


def _list_prompts_of_loops_that_never_ended(
    cur: psycopg.Cursor[Row], compose: Callable[[str], sql.Composed]
) -> None:
    """Migration 13: a loop that never ended has the prompt of its ``MessageEnd`` events
    (`loop_prompt` since 41544bf, which migrated nothing). Its outline has it, migration 10
    having outlined every loop again, but the first prompt its session lists, stored
    before, may say it has none: every session's is read from its outlines again, as
    migration 5 did; a session with a loop not outlined (its record does not decode) keeps its."""
    query = compose(
        "SELECT l.session_id, s.first_prompt, l.outline"
        " FROM {s}.loops l JOIN {s}.sessions s USING (session_id)"
        " WHERE NOT EXISTS (SELECT FROM {s}.loops n WHERE n.session_id = l.session_id AND n.outline IS NULL)"
        " ORDER BY l.session_id, l.position"
    )
    rows = itertools.chain.from_iterable(_in_batches(cur, "phi_session_first_prompts_again", query))
    listed = stored_first_prompts(((session_id, stored), outline) for session_id, stored, outline in rows)
    cur.executemany(
        compose(
            "UPDATE {s}.sessions SET first_prompt = %s, listing_nul = listing_nul OR %s WHERE session_id = %s"
        ),
        [
            (_text(prompt), "\x00" in prompt, session_id)
            for (session_id, stored), prompt in listed
            if prompt is not None and _text(prompt) != stored
        ],
    )


# Forward migrations: _MIGRATIONS[n] takes the schema from version n to n + 1.
# A step is SQL ("{s}" is the schema, quoted) or a function given the migration's
# cursor and the function that fills in "{s}". Never edit a released entry; append a new one.
# Text columns use the "C" collation: sorting by code point, as Python does (and
# as the other stores do), whatever the database's locale.
_MIGRATIONS: tuple[tuple[str | _Backfill, ...], ...] = (
    (
        "CREATE SEQUENCE {s}.save_order",
        f"""CREATE TABLE {{s}}.sessions (
            session_id TEXT COLLATE "C" PRIMARY KEY,
            agent_id TEXT COLLATE "C" NOT NULL,
            created_at_ns BIGINT NOT NULL,
            created_day TEXT COLLATE "C" NOT NULL,
            last_active_at_ns BIGINT NOT NULL,
            saved_order BIGINT NOT NULL,
            formation TEXT COLLATE "C" NOT NULL,
            parent_session_id TEXT COLLATE "C",
            rejected BOOLEAN NOT NULL,
            loop_count INTEGER NOT NULL,
            turn_count BIGINT NOT NULL,
            {", ".join(f"{c} INTEGER NOT NULL" for c in STATUS_COLUMNS.values())},
            {", ".join(f"{c} NUMERIC NOT NULL" for c in USAGE_COLUMNS)},
            models TEXT[] NOT NULL,
            model_keys TEXT[] NOT NULL,
            header BYTEA NOT NULL
        )""",
        "CREATE INDEX sessions_saved ON {s}.sessions (saved_order DESC)",
        "CREATE INDEX sessions_active ON {s}.sessions (last_active_at_ns DESC, session_id)",
        "CREATE INDEX sessions_agent_active ON {s}.sessions (agent_id, last_active_at_ns DESC, session_id)",
        "CREATE INDEX sessions_tokens ON {s}.sessions (total_tokens DESC, session_id)",
        "CREATE INDEX sessions_parent ON {s}.sessions (parent_session_id)"
        " WHERE parent_session_id IS NOT NULL",
        "CREATE INDEX sessions_model_keys ON {s}.sessions USING GIN (model_keys)",
        # Completed is the common status (an index would not help); the others are rare.
        *(
            f"CREATE INDEX sessions_with_{status.lower()} ON {{s}}.sessions"
            f" (last_active_at_ns DESC, session_id) WHERE {column} > 0"
            for status, column in STATUS_COLUMNS.items()
            if status != "Completed"
        ),
        f"""CREATE TABLE {{s}}.loops (
            session_id TEXT COLLATE "C" NOT NULL
                REFERENCES {{s}}.sessions (session_id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            loop_id TEXT COLLATE "C" NOT NULL,
            occurrence INTEGER NOT NULL,
            status TEXT COLLATE "C" NOT NULL,
            started_at_ns BIGINT NOT NULL,
            provider TEXT COLLATE "C",
            model TEXT COLLATE "C",
            turn_count INTEGER NOT NULL,
            {", ".join(f"{c} NUMERIC NOT NULL" for c in USAGE_COLUMNS)},
            record BYTEA NOT NULL,
            PRIMARY KEY (session_id, position),
            UNIQUE (session_id, loop_id, occurrence)
        )""",
        "CREATE INDEX loops_loop_id ON {s}.loops (loop_id)",
        "CREATE INDEX loops_model ON {s}.loops (provider, model)",
    ),
    (
        # NULL reads as "not indexed": every search reads such a loop, so the column is
        # correct before the backfill below and for loops too wordy for a tsvector.
        "ALTER TABLE {s}.loops ADD COLUMN words tsvector",
        partial(_backfill_loops, "words", _WORDS_VALUE, _lexemes),
        "CREATE INDEX loops_words ON {s}.loops USING GIN (words)",
        "CREATE INDEX loops_unindexed ON {s}.loops (session_id) WHERE words IS NULL",
    ),
    (
        # Partial loads (`load_outline`): each loop's outline beside its record.
        "ALTER TABLE {s}.loops ADD COLUMN outline BYTEA",
        partial(_backfill_loops, "outline", "%s", encode_loop_outline),
    ),
    (_bill_unfinished_loops,),
    (
        # What a listing shows of a session: its first user prompt (`SessionSummary.first_prompt`).
        "ALTER TABLE {s}.sessions ADD COLUMN first_prompt TEXT",
        _store_first_prompts,
    ),
    (
        # Cost per model call: each loop's calls (`encode_calls`), what priced totals read,
        # and its outline again, with them. NULL calls (a record that does not decode):
        # its billed usage stands in for them (`stored_usage_row`).
        "ALTER TABLE {s}.loops ADD COLUMN calls BYTEA",
        partial(_backfill_loops, "calls", "%s", encode_calls),
        partial(_backfill_loops, "outline", "%s", encode_loop_outline),
    ),
    (
        # A tool call's words are those of its arguments' text, a control character's
        # escape read as a blank (`search.loop_text`): every loop's words again.
        partial(_backfill_loops, "words", _WORDS_VALUE, _lexemes),
    ),
    (
        # A loop that never ended is searched by what its MessageEnd events said
        # (`LoopRecord.conversation`): every loop's words again.
        partial(_backfill_loops, "words", _WORDS_VALUE, _lexemes),
    ),
    (
        # Whether the models or first_prompt column stands for text holding NUL (`_text`):
        # only those summaries read them exact from the outlines. Stored rows showing
        # U+FFFD may: they are read exact until saved again.
        "ALTER TABLE {s}.sessions ADD COLUMN listing_nul BOOLEAN NOT NULL DEFAULT false",
        "UPDATE {s}.sessions SET listing_nul = true WHERE strpos(first_prompt, chr(65533)) > 0"
        " OR strpos(array_to_string(models, ''), chr(65533)) > 0",
    ),
    (
        # A model call names the model that served it when not the loop config's
        # (`ModelCall.served_by`): every loop's calls and outline again.
        partial(_backfill_loops, "calls", "%s", encode_calls),
        partial(_backfill_loops, "outline", "%s", encode_loop_outline),
    ),
    (
        # The rule's words are those of the composed (NFC) text (`search.query_words`):
        # every loop's words again.
        partial(_backfill_loops, "words", _WORDS_VALUE, _lexemes),
    ),
    (
        # Totals by model count each call under the model that served it, in one
        # aggregate: each loop's usage by serving model (`outline_model_rows`), removed
        # with its loop row. A key's text is `_text`'s: U+FFFD may stand for NUL.
        f"""CREATE TABLE {{s}}.loop_models (
            session_id TEXT COLLATE "C" NOT NULL,
            position INTEGER NOT NULL,
            model TEXT COLLATE "C" NOT NULL,
            {", ".join(f"{column} NUMERIC NOT NULL" for column in _V4_TOKENS.split(", "))},
            FOREIGN KEY (session_id, position) REFERENCES {{s}}.loops ON DELETE CASCADE
        )""",
        "CREATE INDEX loop_models_loop ON {s}.loop_models (session_id, position)",
        _sum_loops_by_serving_model,
    ),
    (_list_prompts_of_loops_that_never_ended,),
    (
        # The rule's words are case-folded, no longer lower-cased (`search.query_words`:
        # "straße" is "strasse"): every loop's words again.
        partial(_backfill_loops, "words", _WORDS_VALUE, _lexemes),
    ),
    (_count_untotalled_calls,),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_SESSION_COLUMNS = (
    "agent_id",
    "created_at_ns",
    "created_day",
    "last_active_at_ns",
    "formation",
    "parent_session_id",
    "rejected",
    "loop_count",
    "turn_count",
    *STATUS_COLUMNS.values(),
    *USAGE_COLUMNS,
    "models",
    "model_keys",
    "first_prompt",
    "listing_nul",
    "header",
)
_LOOP_COLUMNS = (
    "loop_id",
    "occurrence",
    "status",
    "started_at_ns",
    "provider",
    "model",
    "turn_count",
    *USAGE_COLUMNS,
    "record",
    "words",
    "outline",
    "calls",
)
# The VALUES of a loop row, in `_LOOP_COLUMNS` order.
_LOOP_VALUES = ", ".join(_WORDS_VALUE if column == "words" else "%s" for column in _LOOP_COLUMNS)
_ORDER_BY = {
    "newest": "last_active_at_ns DESC, session_id",
    "oldest": "last_active_at_ns ASC, session_id",
    "tokens": "total_tokens DESC, session_id",
}
_LIST_ORDER = "saved_order DESC"
# The column of each `PageCursor.column`.
_CURSOR_COLUMNS = {"last_active_at": "last_active_at_ns", "total_tokens": "total_tokens"}
# Keys of usage_totals; an agent's totals come from the sessions rows, a model's from loop_models.
_GROUP_KEY = {
    "agent": "agent_id",
    "model": "model",
    "day": "created_day",
}

# The same keys for a loop row ``l`` joined with its session row ``s``.
_ROW_KEY = {
    "agent": "s.agent_id",
    "model": "COALESCE(l.provider || '/' || l.model, 'unknown')",
    "day": "s.created_day",
}

Row = tuple[Any, ...]


class _Spawn(msgspec.Struct):
    parent_session_id: str


class _Listed(msgspec.Struct):
    """The header fields a listing reads exact (a text column may not: `_text`), without
    decoding the whole header."""

    agent_id: str
    created_at: str
    last_active_at: str
    parent_spawn_ref: _Spawn | None = None


_listed_decoder = msgspec.json.Decoder(_Listed)


class _LoopId(msgspec.Struct):
    """The loop id of a loop's outline or record (both hold it first), read exact where
    the ``loop_id`` column may show another string (`_text`), without decoding the rest."""

    loop_id: str


_loop_id_decoder = msgspec.json.Decoder(_LoopId)


def _clamped_ns(ts: Timestamp) -> int:
    return min(max(ts.ns, _I64_MIN), _I64_MAX)


def _day(ts: Timestamp) -> str:
    """The UTC date (``YYYY-MM-DD``) of `ts`: its canonical text up to the ``T``."""
    return str(ts).split("T", 1)[0]


def _usage_values(usage: Usage) -> tuple[int, ...]:
    return tuple(getattr(usage, name) for name in USAGE_FIELDS)


def _usage(values: Sequence[Any]) -> Usage:
    """A `Usage` from the token columns (NUMERIC sums arrive as `Decimal`)."""
    return Usage(**{name: int(value) for name, value in zip(USAGE_FIELDS, values, strict=True)})


def _header(session: Session) -> bytes:
    return encode_session(msgspec.structs.replace(session, loops=[]), pretty=False)


def _session_values(session: Session, outlines: Sequence[LoopOutline]) -> tuple[Any, ...]:
    """The ``sessions`` row of the (merged) session header `session`, whose loops'
    outlines are `outlines`, in `_SESSION_COLUMNS` order."""
    summary = summarize_outline(session_outline(session, outlines))
    # What the model filter matches: every provider/model and every bare model name.
    model_keys = dict.fromkeys(summary.models)
    model_keys.update((outline.model, None) for outline in outlines if outline.model is not None)
    return (
        _text(session.agent_id),
        _clamped_ns(session.created_at),
        _day(session.created_at),
        _clamped_ns(session.last_active_at),
        summary.formation,
        _text(summary.parent_session_id),
        summary.rejected,
        summary.loop_count,
        summary.turn_count,
        *(summary.loops_by_status.get(s, 0) for s in LOOP_STATUSES),
        *_usage_values(summary.usage),
        [_text(model) for model in summary.models],
        [_text(model) for model in model_keys],
        _text(summary.first_prompt),
        any("\x00" in text for text in (*summary.models, summary.first_prompt or "")),
        _header(session),
    )


def _loop_values(record: LoopRecord, occurrence: int, data: bytes, outline: LoopOutline) -> tuple[Any, ...]:
    """The ``loops`` row of `record` (encoded as `data`, outlined as `outline`), in
    `_LOOP_COLUMNS` order."""
    config = record.config
    return (
        _text(record.loop_id),
        occurrence,
        record.status,
        _clamped_ns(record.started_at),
        _text(config.provider) if config is not None else None,
        _text(config.model) if config is not None else None,
        len(record.turns),
        *_usage_values(record.billed_usage()),
        data,
        _lexemes(record),
        *encode_outline_parts(outline),
    )


def _loop_model_values(session_id: str, position: int, part: UsageRow) -> tuple[Any, ...]:
    """The ``loop_models`` row of a loop's `part` (one of its `serving_rows`)."""
    return (session_id, position, _text(part.key), *_usage_values(part.usage))


_INSERT_LOOP_MODEL = (
    f"INSERT INTO {{s}}.loop_models (session_id, position, model, {', '.join(USAGE_COLUMNS)})"
    f" VALUES (%s, %s, %s{', %s' * len(USAGE_COLUMNS)})"
)


class _Encodings:
    """Compact JSON and outlines of loop records: the incoming ones made up front (before
    the session's lock is taken), others on demand.

    Keyed by identity: the up-front records are kept alive by `_records`, so no
    other record can take one of their ids. `merge_sessions` may hand back new
    record objects (loops it re-linked); those are encoded when asked for.
    """

    def __init__(self, records: Sequence[LoopRecord]) -> None:
        self._records = list(records)
        self._data = {id(record): encode_loop(record, pretty=False) for record in self._records}
        self._outlines = {id(record): loop_outline(record) for record in self._records}

    def __call__(self, record: LoopRecord) -> bytes:
        data = self._data.get(id(record))
        return data if data is not None else encode_loop(record, pretty=False)

    def outline(self, record: LoopRecord) -> LoopOutline:
        outline = self._outlines.get(id(record))
        return outline if outline is not None else loop_outline(record)


def _sessions_sql(condition: str, loop_condition: str = "TRUE") -> str:
    """The ``(session_id, header, records)`` of the sessions ``s`` meeting `condition`, in
    `list_ids` order; the records of the loops ``l`` meeting `loop_condition` (whose
    parameters come first), by position."""
    return (
        "SELECT s.session_id, s.header, ARRAY(SELECT l.record FROM {s}.loops l"
        f" WHERE l.session_id = s.session_id AND {loop_condition} ORDER BY l.position)"
        f" FROM {{s}}.sessions s WHERE {condition} ORDER BY {_LIST_ORDER}"
    )


def _describe_server(params: dict[str, Any]) -> str:
    """``user@host:port/dbname`` from parsed connection parameters, never the password."""
    user = params.get("user")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port")
    dbname = params.get("dbname") or "default database"
    return f"{f'{user}@' if user else ''}{host}{f':{port}' if port else ''}/{dbname}"


def _closed_by_server(conn: psycopg.Connection[Row]) -> bool:
    """Whether the server ended idle `conn` (a restart, ``idle_session_timeout``,
    ``pg_terminate_backend``: its farewell and the end of the stream wait unread), seen
    without sending anything, so a call never fails on it nor may have run twice."""
    if conn.closed:
        return True
    try:
        # An idle connection hears nothing, but a notice; each read takes what has come.
        while _readable(conn.fileno()):
            conn.pgconn.consume_input()
    except psycopg.OperationalError:  # the end of the stream
        return True
    return conn.closed


def _readable(fd: int) -> bool:
    """Whether `fd` has something to read now (or has ended). poll takes any descriptor
    (select refuses those past 1023) in 1 us (a `selectors` object costs 16); Windows has
    only select."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


class _Pool:
    """At most `size` connections, opened on demand and reused; broken ones are dropped."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Row]], size: int) -> None:
        self._connect = connect
        self._pid = os.getpid()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Row]] = []
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Row]]:
        if os.getpid() != self._pid:
            # A forked child shares its parent's sockets: using (or even closing) them
            # would corrupt the parent's sessions with the server.
            raise UsedAfterFork(
                f"this PostgresStore was opened by process {self._pid}; a forked process must open its own"
            )
        with self._slots:
            with self._lock:
                if self._closed:
                    raise StoreClosed("the PostgresStore is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is not None and _closed_by_server(conn):
                conn.close()
                conn = None
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                self._release(conn)

    def _release(self, conn: psycopg.Connection[Row]) -> None:
        # After an error the connection is usually still fine (a constraint, a lock
        # timeout): keep it when it is open and outside any transaction.
        reusable = (
            not conn.closed and not conn.broken and (conn.info.transaction_status == TransactionStatus.IDLE)
        )
        idle: list[psycopg.Connection[Row]] = []
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(conn)
                return
            if conn.broken:
                # The idle ones went through the same outage, perhaps unseen (a network path
                # dropped without a word): each would fail a call of its own.
                idle, self._idle = self._idle, []
        for stale in (conn, *idle):
            stale.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


_SUMMARY_COLUMNS = (  # the agent and parent ids are read from the header: exact
    "session_id",
    "formation",
    "rejected",
    "loop_count",
    "turn_count",
    *STATUS_COLUMNS.values(),
    *USAGE_COLUMNS,
    "models",
    "first_prompt",
    "listing_nul",
    "header",
)


def _summary(row: Row) -> tuple[SessionSummary, bool]:
    """A `SessionSummary` from a row of `_SUMMARY_COLUMNS`, and whether its models or
    first prompt stand for text holding NUL (`_text`)."""
    session_id, formation, rejected, loop_count, turn_count = row[:5]
    counts = row[5 : 5 + len(LOOP_STATUSES)]
    usage = row[5 + len(LOOP_STATUSES) : 5 + len(LOOP_STATUSES) + len(USAGE_COLUMNS)]
    models, prompt, nul, header = row[-4:]
    try:
        listed = _listed_decoder.decode(header)
        created_at = Timestamp.parse(listed.created_at)
        last_active_at = Timestamp.parse(listed.last_active_at)
    except (msgspec.DecodeError, ValueError) as exc:
        raise StoredSessionUnusable(f"stored session {session_id!r} is corrupt: {exc}") from exc
    spawn = listed.parent_spawn_ref
    return SessionSummary(
        session_id=session_id,
        agent_id=listed.agent_id,
        created_at=created_at,
        last_active_at=last_active_at,
        formation=formation,
        parent_session_id=spawn.parent_session_id if spawn is not None else None,
        rejected=rejected,
        loop_count=loop_count,
        loops_by_status={status: n for status, n in zip(LOOP_STATUSES, counts, strict=True) if n},
        turn_count=turn_count,
        usage=_usage(usage),
        models=tuple(models),
        first_prompt=prompt,
    ), nul


def _set_lock_timeout(cur: psycopg.Cursor[Row], seconds: float) -> None:
    """Bound this transaction's lock waits (at least 1 ms: PostgreSQL reads 0 as no bound)."""
    cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(seconds * 1000))}ms",))


def _occurrences(columns: Iterable[str | None]) -> list[int]:
    """For each loop, how many earlier loops share its ``loop_id`` column (`columns`: each
    loop's, as `_text` writes it; merge matches by both, and two ids it shows alike stay
    unique)."""
    seen: Counter[str | None] = Counter()
    out = []
    for column in columns:
        out.append(seen[column])
        seen[column] += 1
    return out


def schema_problem(schema: object) -> str | None:
    """Why `schema` names no schema this store can use, or None."""
    if not isinstance(schema, str) or not schema or len(schema.encode("utf-8")) > 63 or "\x00" in schema:
        return f"schema must be a PostgreSQL identifier of 1 to 63 bytes, got {schema!r}"
    return None


def require_psycopg(user: str) -> None:
    """Raise `MissingStoreExtra` naming the extra unless psycopg imported: `user` needs it."""
    if _MISSING_PSYCOPG is not None:
        raise MissingStoreExtra(
            f"{user} needs psycopg 3 ({_MISSING_PSYCOPG}): pip install 'phi-session[postgres]'"
        ) from None


def dsn_parameters(dsn: str) -> dict[str, Any]:
    """libpq's parameters in `dsn` (a URL or a key=value string; none without psycopg,
    whose absence the caller reports). A parameter libpq does not know is `InvalidStoreUrl`
    naming it; any other fault a `StoreError` that does not show the string, which may
    hold a password (as libpq's own messages may)."""
    if _MISSING_PSYCOPG is not None:
        return {}
    try:
        return conninfo_to_dict(dsn)
    except psycopg.Error as error:
        unknown = _UNKNOWN_PARAMETER.fullmatch(str(error).strip())
        if unknown is not None:  # (this message quotes only the parameter's name)
            raise InvalidStoreUrl(f"unknown PostgreSQL connection parameter {unknown.group(1)!r}") from None
        raise StoreError("invalid PostgreSQL connection string (not shown: it may hold a password)") from None


def _schema_placeholders(schema: str, sequence: str) -> dict[str, sql.Composable]:
    """What `PostgresStore._sql` puts for ``{s}`` (`schema`, quoted) and ``{order}`` (the
    next number of the quoted `sequence`). psycopg reads every ``%`` of a statement with
    parameters as a placeholder, quoted or not: in a schema holding one, it is written as
    a Unicode escape (in an identifier ``U&"..."``, in a string ``E'...'``)."""
    if "%" not in schema:
        return {"s": sql.Identifier(schema), "order": sql.SQL("nextval({})").format(sql.Literal(sequence))}
    name = schema.replace("\\", "\\\\").replace('"', '""').replace("%", "\\0025")
    text = sequence.replace("\\", "\\\\").replace("'", "''").replace("%", "\\u0025")
    return {"s": sql.SQL(f'U&"{name}"'), "order": sql.SQL(f"nextval(E'{text}')")}


class PostgresStore(AsyncTwins):
    """Sessions in PostgreSQL; safe for many threads, processes and machines at once.

    ``dsn`` is a libpq connection string or URL. ``schema`` names the PostgreSQL
    schema holding the tables (created if missing; at most 63 bytes, since
    PostgreSQL would silently truncate a longer name). ``pool_size`` bounds the
    connections this store opens (one per concurrent call). ``lock_timeout``
    (seconds) bounds the wait for a session another writer is saving, after
    which `SessionLocked` is raised. ``connect_timeout`` (seconds) applies unless
    the DSN sets one. Both are > 0 and at most 2147483.647 s (`InvalidArgument`).

    Opening connects once and brings the schema up to `SCHEMA_VERSION`; every
    database failure is raised as `StoreError` naming the server (never the
    password). Use as a context manager or call `close`.

    With `read_only`, the store only reads: opening creates and migrates nothing (a
    schema that does not exist, or was written by an earlier phi-session, is a
    `StoreError`; saving with a store opened to write upgrades it), and `save`,
    `delete` and `prune` raise `StoreError`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "phi_session",
        pool_size: int = 4,
        lock_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        read_only: bool = False,
    ) -> None:
        require_psycopg("PostgresStore")
        check_type("dsn", dsn, str)
        check_type("schema", schema, str)
        if (problem := schema_problem(schema)) is not None:
            raise InvalidArgument(problem)
        if pool_size < 1:
            raise InvalidArgument(f"pool_size must be at least 1, got {pool_size}")
        # PostgreSQL reads a lock_timeout of 0 as "wait forever", and holds at most
        # 2**31-1 ms; libpq a connect_timeout of 0 as "wait forever".
        check_seconds("lock_timeout", lock_timeout, positive=True, maximum=MOST_WAIT_SECONDS)
        check_seconds("connect_timeout", connect_timeout, positive=True, maximum=MOST_WAIT_SECONDS)
        given = dsn_parameters(dsn)
        self._dsn = dsn
        self.read_only = read_only
        self._where = _describe_server(given)
        self._schema = schema
        self._placeholders = _schema_placeholders(schema, self._qualified("save_order"))
        self._lock_timeout = lock_timeout
        self._created_schema = False  # by this opening (`discard_new_schema`)
        self._connect_options: dict[str, Any] = {}
        if "connect_timeout" not in given:
            self._connect_options["connect_timeout"] = max(1, round(connect_timeout))
        if "application_name" not in given:
            self._connect_options["application_name"] = "phi-session"
        self._pool = _Pool(self._connect, pool_size)
        try:
            if read_only:
                self._check_readable()
            else:
                self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self._where!r}, schema={self._schema!r})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def schema(self) -> str:
        return self._schema

    # -- Plumbing -------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Row]:
        try:
            return psycopg.Connection.connect(self._dsn, autocommit=True, **self._connect_options)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {self._where}: {exc}") from exc

    def _sql(self, text: str) -> sql.Composed:
        """`text` with ``{s}`` replaced by the quoted schema and ``{order}`` by the next save number."""
        return sql.SQL(text).format(**self._placeholders)

    def _qualified(self, name: str) -> str:
        """``"schema".name``, quoted for regclass lookups."""
        return '"{}".{}'.format(self._schema.replace('"', '""'), name)

    @contextmanager
    def _cursor(
        self, action: str, *, transaction: bool = False, session_id: str | None = None
    ) -> Iterator[psycopg.Cursor[Row]]:
        """A cursor for one operation, with database errors raised as phi-session errors.

        With `transaction` the operation is one transaction whose lock waits are
        bounded by ``lock_timeout``; a wait for `session_id` beyond it raises
        `SessionLocked`, any other `StoreError`.
        """
        try:
            with self._pool.connection() as conn:
                if not transaction:
                    with conn.cursor() as cur:
                        yield cur
                    return
                with conn.transaction(), conn.cursor() as cur:
                    _set_lock_timeout(cur, self._lock_timeout)
                    yield cur
        except psycopg.errors.LockNotAvailable as exc:
            if session_id is None:
                raise StoreError(
                    f"{action}: a lock on {self._where} stayed taken for more than {self._lock_timeout:g} s"
                ) from exc
            raise SessionLocked(
                f"session {session_id!r} is being written by another client (waited {self._lock_timeout:g} s)"
            ) from exc
        except psycopg.errors.IntegrityError as exc:  # SQLSTATE class 23: the same every time
            if session_id is None:
                raise StoreError(f"{action} failed on PostgreSQL at {self._where}: {exc}") from exc
            raise SessionRefused(f"{action} was refused by PostgreSQL at {self._where}: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"{action} failed on PostgreSQL at {self._where}: {exc}") from exc

    def _migrate(self) -> None:
        """Bring the schema to `SCHEMA_VERSION`, or refuse a database from newer code."""
        with self._cursor("checking the schema version") as cur:
            if self._stored_version(cur) == SCHEMA_VERSION:
                return
            with cur.connection.transaction():
                _set_lock_timeout(cur, _MIGRATION_LOCK_TIMEOUT)
                # Serializes concurrent openers: the later ones re-read the version below.
                cur.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (MIGRATION_LOCK_CLASS, self._schema)
                )
                # CREATE SCHEMA needs a privilege even with IF NOT EXISTS: skip it when
                # an administrator created the schema for us.
                cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema,))
                if cur.fetchone() is None:
                    cur.execute(self._sql("CREATE SCHEMA {s}"))
                    self._created_schema = True
                cur.execute(
                    self._sql(
                        "CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                    )
                )
                version = self._stored_version(cur) or 0
                for statements in _MIGRATIONS[version:]:
                    for step in statements:
                        if isinstance(step, str):
                            cur.execute(self._sql(step))
                        else:
                            step(cur, self._sql)
                if version < SCHEMA_VERSION:
                    cur.execute(
                        self._sql(
                            "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s)"
                            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                        ),
                        (str(SCHEMA_VERSION),),
                    )

    def discard_new_schema(self) -> bool:
        """Drop the schema that opening this store created, if no session is in it: for a
        command that ends having saved nothing and must leave no new store behind. A schema
        that existed before the opening is never dropped. Whether it was dropped (the store
        can then no longer be used)."""
        if not self._created_schema:
            return False
        with self._cursor("dropping the new schema", transaction=True) as cur:
            # Taken first, so that a save in flight elsewhere commits before the check below.
            cur.execute(self._sql("LOCK TABLE {s}.sessions IN ACCESS EXCLUSIVE MODE"))
            cur.execute(self._sql("SELECT EXISTS (SELECT 1 FROM {s}.sessions)"))
            row = cur.fetchone()
            if row is None or row[0]:
                return False
            cur.execute(self._sql("DROP SCHEMA {s} CASCADE"))
        self._created_schema = False
        return True

    def _check_readable(self) -> None:
        """What a read-only store reads is there, at `SCHEMA_VERSION`."""
        with self._cursor("checking the schema version") as cur:
            version = self._stored_version(cur)
        if version is None:
            raise StoreError(
                f"no phi-session schema {self._schema!r} on {self._where}: nothing was recorded there"
            )
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"schema {self._schema!r} on {self._where} has version {version}, older than this"
                f" phi-session's ({SCHEMA_VERSION}); reading leaves it as it is: the first save"
                " by this phi-session upgrades it"
            )

    def _stored_version(self, cur: psycopg.Cursor[Row]) -> int | None:
        """The schema version recorded in the database (None: no schema yet)."""
        cur.execute("SELECT to_regclass(%s)", (self._qualified("meta"),))
        row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        cur.execute(self._sql("SELECT value FROM {s}.meta WHERE key = 'schema_version'"))
        row = cur.fetchone()
        if row is None:
            return None
        if re.fullmatch(r"[0-9]{1,9}", row[0]) is None:  # int() takes " 7", raises on "v7"
            raise StoreError(
                f"schema {self._schema!r} on {self._where} records schema_version {shown(repr(row[0]))}:"
                " not a version phi-session writes (a damaged or foreign meta table)"
            )
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"schema {self._schema!r} on {self._where} has version {version}, written by a newer"
                f" phi-session; this one reads up to version {SCHEMA_VERSION}: upgrade phi-session"
            )
        return version

    def _session(self, session_id: str, header: bytes, records: Sequence[bytes]) -> Session:
        try:
            session = decode_session(header, strict=False)
            session.loops = [decode_loop(record, strict=False) for record in records]
        except DecodeError as exc:
            raise StoredSessionUnusable(f"stored session {session_id!r} is corrupt: {exc}") from exc
        return session

    # -- SessionStore ---------------------------------------------------------------------

    def save(self, session: Session) -> None:
        """Merge `session` into what is stored under its id (see `merge_sessions`).

        One transaction: the session row is locked, so saves of one session from
        anywhere serialize. The incoming records are encoded before the lock is taken.
        """
        save_as_written([session], self._save_one)

    def _save_one(self, sessions: Sequence[Session]) -> None:
        (session,) = sessions
        session_id = session.session_id
        check_writable(self, f"save session {session_id!r}")
        encoded = _Encodings(session.loops)
        with self._cursor(f"saving session {session_id!r}", transaction=True, session_id=session_id) as cur:
            for _ in range(_SAVE_ATTEMPTS):
                cur.execute(
                    self._sql("SELECT header FROM {s}.sessions WHERE session_id = %s FOR UPDATE"),
                    (session_id,),
                )
                row = cur.fetchone()
                if row is not None:
                    self._merge_into(cur, session_id, row[0], session, encoded)
                    return
                # A writer that inserts the same id first makes this a no-op (after
                # waiting for it to commit); the next round then locks its row.
                cur.execute(
                    self._sql(
                        f"INSERT INTO {{s}}.sessions (session_id, saved_order, {', '.join(_SESSION_COLUMNS)})"
                        f" VALUES (%s, {{order}}{', %s' * len(_SESSION_COLUMNS)})"
                        " ON CONFLICT (session_id) DO NOTHING"
                    ),
                    (session_id, *_session_values(session, list(map(encoded.outline, session.loops)))),
                )
                if cur.rowcount == 1:
                    loops = session.loops
                    occurrences = _occurrences(_text(record.loop_id) for record in loops)
                    rows = [(r, n, encoded.outline(r)) for r, n in zip(loops, occurrences, strict=True)]
                    self._insert_loops(cur, session_id, 0, rows, encoded)
                    return
        raise StoreError(
            f"saving session {session_id!r}: it was deleted and re-created"
            f" {_SAVE_ATTEMPTS} times while this save waited"
        )

    def _insert_loops(
        self,
        cur: psycopg.Cursor[Row],
        session_id: str,
        first_position: int,
        loops: Sequence[tuple[LoopRecord, int, LoopOutline]],
        encoded: _Encodings,
    ) -> None:
        """Insert `loops` (each with its occurrence and outline) from `first_position` on."""
        if not loops:
            return
        cur.executemany(
            self._sql(
                f"INSERT INTO {{s}}.loops (session_id, position, {', '.join(_LOOP_COLUMNS)})"
                f" VALUES (%s, %s, {_LOOP_VALUES})"
            ),
            [
                (session_id, first_position + i, *_loop_values(record, occurrence, encoded(record), outline))
                for i, (record, occurrence, outline) in enumerate(loops)
            ],
        )
        self._insert_loop_models(
            cur, session_id, [(first_position + i, outline) for i, (_, _, outline) in enumerate(loops)]
        )

    def _insert_loop_models(
        self, cur: psycopg.Cursor[Row], session_id: str, loops: Sequence[tuple[int, LoopOutline]]
    ) -> None:
        """Insert the ``loop_models`` rows of `loops` (each outline at its position)."""
        cur.executemany(
            self._sql(_INSERT_LOOP_MODEL),
            [
                _loop_model_values(session_id, position, part)
                for position, outline in loops
                for part in outline_model_rows(outline)
            ],
        )

    def _merge_into(
        self,
        cur: psycopg.Cursor[Row],
        session_id: str,
        header: bytes,
        incoming: Session,
        encoded: _Encodings,
    ) -> None:
        """Merge `incoming` into the locked stored session; rewrite the loops that changed.

        Only the stored loops the merge may change are read whole (`loops_a_merge_touches`):
        a conversation saved loop by loop costs what each loop touches, not the whole
        session again. The others are known by their outlines (the session's summary)."""
        cur.execute(
            self._sql(
                "SELECT position, loop_id, outline FROM {s}.loops WHERE session_id = %s ORDER BY position"
            ),
            (session_id,),
        )
        rows = cur.fetchall()
        try:
            outlines = [None if outline is None else decode_loop_outline(outline) for _, _, outline in rows]
        except (DecodeError, msgspec.DecodeError) as exc:
            raise StoredSessionUnusable(f"stored session {session_id!r} is corrupt: {exc}") from exc
        # The ids as the outlines hold them: the column shows NUL as U+FFFD (`_text`), which
        # no incoming id would match. A loop without an outline is read whatever its id.
        family = [
            (column, None) if outline is None else (outline.loop_id, outline.parent_loop_id)
            for (_, column, _), outline in zip(rows, outlines, strict=True)
        ]
        wanted = set(loops_a_merge_touches(family, incoming))
        wanted.update(index for index, outline in enumerate(outlines) if outline is None)
        indexes = sorted(wanted)
        cur.execute(
            self._sql("SELECT position, record FROM {s}.loops WHERE session_id = %s AND position = ANY(%s)"),
            (session_id, [rows[index][0] for index in indexes]),
        )
        data_at: dict[int, bytes] = dict(cur.fetchall())
        stored = self._session(session_id, header, [data_at[rows[index][0]] for index in indexes])
        kept = dict(zip(indexes, stored.loops, strict=True))  # merge_sessions keeps these where they win
        merged, pairs = merge_part(stored, indexes, len(rows), incoming)
        new_columns = [_text(record.loop_id) for index, record in pairs if index >= len(rows)]
        occurrences = _occurrences([*(loop_id for _, loop_id, _ in rows), *new_columns])
        outlines += [None] * len(new_columns)
        updates = []
        updated: list[tuple[int, LoopOutline]] = []
        added: list[tuple[LoopRecord, int, LoopOutline]] = []
        for index, record in pairs:
            if record is kept.get(index):
                if outlines[index] is None:
                    outlines[index] = loop_outline(record)
                continue
            outline = outlines[index] = encoded.outline(record)
            if index >= len(rows):
                added.append((record, occurrences[index], outline))
                continue
            position = rows[index][0]
            new_data = encoded(record)
            if new_data != data_at[position]:
                updates.append(
                    (*_loop_values(record, occurrences[index], new_data, outline), session_id, position)
                )
                updated.append((position, outline))
        if updates:
            cur.executemany(
                self._sql(
                    f"UPDATE {{s}}.loops SET ({', '.join(_LOOP_COLUMNS)})"
                    f" = ROW({_LOOP_VALUES})"
                    " WHERE session_id = %s AND position = %s"
                ),
                updates,
            )
            cur.execute(
                self._sql("DELETE FROM {s}.loop_models WHERE session_id = %s AND position = ANY(%s)"),
                (session_id, [position for position, _ in updated]),
            )
            self._insert_loop_models(cur, session_id, updated)
        # Positions only grow (whole sessions are deleted, never single loops), but a
        # gap left by hand-editing must not make an insert collide.
        next_position = rows[-1][0] + 1 if rows else 0
        self._insert_loops(cur, session_id, next_position, added, encoded)
        # Always rewritten, even when nothing changed: the save counts as the latest one.
        cur.execute(
            self._sql(
                f"UPDATE {{s}}.sessions SET (saved_order, {', '.join(_SESSION_COLUMNS)})"
                f" = ROW({{order}}, {', '.join(['%s'] * len(_SESSION_COLUMNS))}) WHERE session_id = %s"
            ),
            (*_session_values(merged, cast(list[LoopOutline], outlines)), session_id),
        )

    def _select_sessions(self, action: str, condition: str, params: Sequence[Any]) -> list[Row]:
        """``(session_id, header, records)`` rows in `list_ids` order, from one snapshot."""
        with self._cursor(action) as cur:
            cur.execute(self._sql(_sessions_sql(condition)), params)
            return cur.fetchall()

    def load(self, session_id: str) -> Session:
        validate_session_id(session_id)
        rows = self._select_sessions(f"loading session {session_id!r}", "s.session_id = %s", (session_id,))
        if not rows:
            raise SessionNotFound(f"no session {session_id!r} in {self._where} schema {self._schema!r}")
        return self._session(*rows[0])

    def load_outline(self, session_id: str) -> SessionOutline:
        """See `SessionStore.load_outline`. Reads the stored outlines, never a whole record
        (but of a loop whose outline is missing: one that did not decode when migrated)."""
        validate_session_id(session_id)
        with self._cursor(f"loading the outline of session {session_id!r}") as cur:
            cur.execute(
                self._sql(
                    "SELECT s.header, ARRAY(SELECT l.outline FROM {s}.loops l"
                    " WHERE l.session_id = s.session_id ORDER BY l.position),"
                    " ARRAY(SELECT CASE WHEN l.outline IS NULL THEN l.record END FROM {s}.loops l"
                    " WHERE l.session_id = s.session_id ORDER BY l.position)"
                    " FROM {s}.sessions s WHERE s.session_id = %s"
                ),
                (session_id,),
            )
            row = cur.fetchone()
        if row is None:
            raise SessionNotFound(f"no session {session_id!r} in {self._where} schema {self._schema!r}")
        header, outlines, records = row
        try:
            session = decode_session(header, strict=False)
            loops = [
                decode_loop_outline(outline)
                if outline is not None
                else loop_outline(decode_loop(record, strict=False))
                for outline, record in zip(outlines, records, strict=True)
            ]
        except (DecodeError, msgspec.DecodeError) as exc:
            raise StoredSessionUnusable(f"stored session {session_id!r} is corrupt: {exc}") from exc
        return session_outline(session, loops)

    def load_loops(self, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        """See `SessionStore.load_loops`. Reads those loops' records only."""
        validate_session_id(session_id)
        check_loop_range(start, stop)
        with self._cursor(f"loading loops of session {session_id!r}") as cur:
            cur.execute(
                self._sql(
                    "SELECT ARRAY(SELECT l.record FROM {s}.loops l WHERE l.session_id = s.session_id"
                    " ORDER BY l.position LIMIT %s OFFSET %s) FROM {s}.sessions s WHERE s.session_id = %s"
                ),
                (min(max(0, stop - start), _I64_MAX), min(start, _I64_MAX), session_id),
            )
            row = cur.fetchone()
        if row is None:
            raise SessionNotFound(f"no session {session_id!r} in {self._where} schema {self._schema!r}")
        try:
            return [decode_loop(record, strict=False) for record in row[0]]
        except DecodeError as exc:
            raise StoredSessionUnusable(f"stored session {session_id!r} is corrupt: {exc}") from exc

    def loop_starts(self, session_id: str, start: int) -> list[tuple[str, int]]:
        """See `LoopStarts.loop_starts`. One range of the loops' index; an id whose column
        holds U+FFFD, which may stand for NUL (`_text`), is read from its outline."""
        validate_session_id(session_id)
        check_loop_range(start, start)
        with self._cursor(f"reading the loop starts of session {session_id!r}") as cur:
            cur.execute(
                self._sql(
                    "SELECT ARRAY(SELECT l.loop_id FROM {s}.loops l WHERE l.session_id = s.session_id"
                    " AND l.position >= %s ORDER BY l.position),"
                    " ARRAY(SELECT l.started_at_ns FROM {s}.loops l WHERE l.session_id = s.session_id"
                    " AND l.position >= %s ORDER BY l.position),"
                    " ARRAY(SELECT CASE WHEN strpos(l.loop_id, %s) > 0 THEN coalesce(l.outline, l.record) END"
                    " FROM {s}.loops l WHERE l.session_id = s.session_id AND l.position >= %s"
                    " ORDER BY l.position)"
                    " FROM {s}.sessions s WHERE s.session_id = %s"
                ),
                (min(start, _I64_MAX), min(start, _I64_MAX), _BLURRED, min(start, _I64_MAX), session_id),
            )
            row = cur.fetchone()
        if row is None:
            raise SessionNotFound(f"no session {session_id!r} in {self._where} schema {self._schema!r}")
        columns, starts, exact = row
        try:
            ids = [
                column if data is None else _loop_id_decoder.decode(data).loop_id
                for column, data in zip(columns, exact, strict=True)
            ]
        except msgspec.DecodeError as exc:
            raise StoredSessionUnusable(f"stored session {session_id!r} is corrupt: {exc}") from exc
        return list(zip(ids, starts, strict=True))

    def list_for_agent(self, agent_id: str) -> list[Session]:
        """The sessions of `agent_id` in `list_ids` order; unreadable ones are logged and skipped."""
        check_type("agent_id", agent_id, str)
        check_text("agent_id", agent_id)
        sessions = []
        for row in self._select_sessions(
            f"loading the sessions of agent {agent_id!r}", "s.agent_id = %s", (_text(agent_id),)
        ):
            try:
                session = self._session(*row)
            except StoreError as exc:
                _log.warning("%s: skipping it in list_for_agent(%r)", exc, agent_id)
                continue
            if session.agent_id == agent_id:  # not another agent the column shows alike (`_text`)
                sessions.append(session)
        return sessions

    def delete(self, session_id: str) -> None:
        validate_session_id(session_id)
        check_writable(self, f"delete session {session_id!r}")
        with self._cursor(f"deleting session {session_id!r}", transaction=True, session_id=session_id) as cur:
            cur.execute(self._sql("DELETE FROM {s}.sessions WHERE session_id = %s"), (session_id,))
            if cur.rowcount == 0:
                raise SessionNotFound(f"no session {session_id!r} in {self._where} schema {self._schema!r}")

    def list_ids(self) -> list[str]:
        """Every stored session id, most recently saved first."""
        with self._cursor("listing sessions") as cur:
            cur.execute(self._sql(f"SELECT session_id FROM {{s}}.sessions ORDER BY {_LIST_ORDER}"))
            return [session_id for (session_id,) in cur.fetchall()]

    # -- Queries --------------------------------------------------------------------------

    def _query_sql(
        self,
        query: SessionQuery,
        columns: Sequence[str] = _SUMMARY_COLUMNS,
        also: tuple[str, Sequence[Any]] | None = None,
    ) -> tuple[sql.Composed, list[Any]]:
        """PostgreSQL's translation of `query`: the statement selecting `columns` of the
        sessions it selects (and meeting the condition `also`, with its parameters)."""
        conditions: list[str] = []
        params: list[Any] = []
        if also is not None:
            conditions.append(also[0])
            params += also[1]
        for condition, value in (
            ("agent_id = %s", _text(query.agent_id)),
            ("last_active_at_ns >= %s", None if query.since is None else _clamped_ns(query.since)),
            ("last_active_at_ns < %s", None if query.until is None else _clamped_ns(query.until)),
            ("model_keys @> ARRAY[%s::text]", _text(query.model)),
            ("total_tokens >= %s", query.min_tokens),
            ("parent_session_id = %s", _text(query.parent_session_id)),
        ):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        if query.status is not None:
            conditions.append(f"{STATUS_COLUMNS[query.status]} > 0")
        if query.after is not None:
            cursor = query.after
            column, beyond = _CURSOR_COLUMNS[cursor.column], "<" if cursor.descending else ">"
            conditions.append(f"({column} {beyond} %s OR ({column} = %s AND session_id > %s))")
            # Times are BIGINT (clamped when saved); token totals NUMERIC, unbounded.
            value = cursor.value
            if cursor.column == "last_active_at":
                value = min(max(value, _I64_MIN), _I64_MAX)
            params += [value, value, cursor.session_id]
        text = (
            f"SELECT {', '.join(columns)} FROM {{s}}.sessions"
            f"{' WHERE ' + ' AND '.join(conditions) if conditions else ''}"
            f" ORDER BY {_ORDER_BY[query.order]}"
        )
        if query.limit is not None:
            text += " LIMIT %s"
            params.append(query.limit)
        return self._sql(text), params

    def _selected(self, query: SessionQuery, columns: Sequence[str] = _SUMMARY_COLUMNS) -> list[Row]:
        """The rows of `columns` (the session id first) of the sessions `query` selects,
        in its order. When a text filter's column match may be another string
        (`_blurred`), the columns select without the limit and each candidate's JSON
        decides; a candidate that does not decode is skipped with a logged warning."""
        if not _blurred(query):
            statement, params = self._query_sql(query, columns)
            with self._cursor("querying sessions") as cur:
                cur.execute(statement, params)
                return cur.fetchall()
        statement, params = self._query_sql(replace(query, limit=None), columns)
        with self._cursor("querying sessions") as cur:
            cur.execute(statement, params)
            candidates = cur.fetchall()
        exact = (row for row in candidates if self._selects_exactly(query, row[0]))
        return list(itertools.islice(exact, query.limit))

    def _selects_exactly(self, query: SessionQuery, session_id: str) -> bool:
        try:
            session = self.load(session_id)
            return query_selects(query, summarize(session), loop_configs(session))
        except SessionNotFound:  # deleted since the candidates were listed
            return False
        except StoreError as exc:
            _log.warning("%s: skipping it in a query", exc)
            return False

    def query(self, query: SessionQuery | None = None) -> list[SessionSummary]:
        """Summaries of the sessions `query` selects (see `SessionQuery`), computed in SQL
        on indexed columns."""
        summaries = [_summary(row) for row in self._selected(as_query(query))]
        return [self._exact_summary(summary) if nul else summary for summary, nul in summaries]

    def _exact_summary(self, summary: SessionSummary) -> SessionSummary:
        """`summary`, whose models or first prompt show U+FFFD for NUL (`_text`), with those
        read exact from its loops' outlines; as it is if they cannot be read (logged)."""
        try:
            exact = summarize_outline(self.load_outline(summary.session_id))
        except SessionNotFound:  # deleted since it was listed
            return summary
        except StoreError as exc:
            _log.warning("%s: its listing may show U+FFFD for NUL", exc)
            return summary
        return msgspec.structs.replace(summary, models=exact.models, first_prompt=exact.first_prompt)

    def explain_query(self, query: SessionQuery | None = None, *, analyze: bool = False) -> str:
        """PostgreSQL's plan for `query` (run it too with `analyze`): for benchmarks."""
        statement, params = self._query_sql(as_query(query))
        return self._explain(statement, params, analyze=analyze)

    def _explain(self, statement: sql.Composed, params: Sequence[Any], *, analyze: bool) -> str:
        prefix = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN ")
        with self._cursor("explaining a query") as cur:
            cur.execute(sql.Composed([prefix, statement]), params)
            return "\n".join(line for (line,) in cur.fetchall())

    def _search_sql(self, words: Sequence[str], query: SessionQuery) -> tuple[sql.Composed, list[Any]]:
        """The ids of the sessions `query` selects that have a loop the index names for `words`."""
        matching = (
            f"EXISTS (SELECT 1 FROM {{s}}.loops l WHERE l.session_id = {{s}}.sessions.session_id"
            f" AND {_MATCHING_LOOP})"
        )
        if query.limit is None and not _blurred(query):
            return self._query_sql(query, ("session_id",), (matching, [_tsquery(words)]))
        # The query's limit picks sessions before the words do, as in every store.
        selected = [session_id for (session_id, *_) in self._selected(query, ("session_id",))]
        return self._query_sql(
            replace(query, limit=None),
            ("session_id",),
            (f"session_id = ANY(%s) AND {matching}", [selected, _tsquery(words)]),
        )

    def search(
        self, text: str, query: SessionQuery | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[SearchHit]:
        """See `SessionStore.search`. The GIN index on ``words`` names the candidate
        sessions (in the query's order) and, in each, the loops that may hold every
        word; only those loops are read, a few sessions at a time until `limit` hits.
        A session whose loops do not decode is skipped with a logged warning."""
        words = search_words(text, limit)
        selection = as_query(query)
        if not words or not limit:
            return []
        statement, params = self._search_sql(words, selection)
        read = self._sql(_sessions_sql("s.session_id = ANY(%s)", _MATCHING_LOOP))
        hits: list[SearchHit] = []
        # All candidates at once: a plan for the first rows (a server-side cursor) would
        # probe every session's loops in order, which costs a rare word, the usual search,
        # a scan. Their loops are read a few sessions at a time, until the hits suffice.
        with self._cursor("searching sessions") as cur:
            cur.execute(statement, params)
            candidates = [session_id for (session_id,) in cur.fetchall()]
            start, size = 0, 4
            while start < len(candidates):
                batch = candidates[start : start + size]
                start, size = start + size, min(2 * size, _SEARCH_BATCH)
                cur.execute(read, [_tsquery(words), batch])
                found = {row[0]: row for row in cur.fetchall()}
                for session_id in batch:
                    if session_id not in found:
                        continue  # deleted since the candidates were listed
                    try:
                        session = self._session(*found[session_id])  # the loops the index named
                    except StoreError as exc:
                        _log.warning("%s: skipping it in search", exc)
                        continue
                    hits.extend(itertools.islice(document_hits(session, words), limit - len(hits)))
                    if len(hits) == limit:
                        return hits
        return hits

    def explain_search(self, text: str, query: SessionQuery | None = None, *, analyze: bool = False) -> str:
        """PostgreSQL's plan for finding the sessions `search` reads (run it too with `analyze`)."""
        statement, params = self._search_sql(query_words(text), as_query(query))
        return self._explain(statement, params, analyze=analyze)

    def usage_totals(self, group_by: GroupBy = "agent", *, pricer: Pricer | None = None) -> list[UsageTotal]:
        """Usage summed per agent, per ``provider/model`` that served the calls
        (`serving_rows`, from ``loop_models``; ``"unknown"`` without a config; a session
        counts once in each of its models) or per UTC day of ``created_at``
        (``YYYY-MM-DD``), sorted by key; with a `pricer`, the loops' rows are read too and
        priced (see `SessionStore.usage_totals`)."""
        group_by = parse_group_by(group_by)
        check_pricer(pricer)
        sums = ", ".join(f"sum({column})" for column in USAGE_COLUMNS)
        if group_by == "model":
            counts, table = "count(DISTINCT session_id), count(*)", "loop_models"
        else:
            counts, table = "count(*), sum(loop_count)", "sessions"
        with self._cursor(f"summing usage by {group_by}") as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_GROUP_KEY[group_by]} AS key, {counts}, {sums} FROM {{s}}.{table}"
                    " GROUP BY 1 ORDER BY 1"  # keys are "C"-collated columns: code point order
                )
            )
            totals = [
                UsageTotal(key=key, sessions=sessions, loops=int(loops), usage=_usage(tokens))
                for key, sessions, loops, *tokens in cur.fetchall()
            ]
            totals = self._exact_totals(cur, group_by, totals)
            if pricer is None:
                return totals
            rows = self._usage_rows(cur, group_by)
            # Names holding U+FFFD may stand for NUL too (`_text`): those rows' JSON says.
            if any(_BLURRED in f"{row.key}{row.provider}{row.model}" for _, row in rows):
                rows = [
                    (sid, row) for sid, row in rows if _BLURRED not in f"{row.key}{row.provider}{row.model}"
                ]
                rows += self._usage_rows(cur, group_by, exact=True)
        return pricer.price_totals(totals, totalled_rows((row for _, row in rows), group_by))

    def _usage_rows(
        self,
        cur: psycopg.Cursor[Row],
        group_by: GroupBy,
        *,
        exact: bool = False,
        models: Sequence[str] | None = None,
    ) -> list[tuple[str, UsageRow]]:
        """Every loop's `UsageRow` and its session's id, its key and names as the columns
        hold them; `exact`: only the loops whose key or names hold U+FFFD, as their JSON
        holds them; `models`: only the loops with ``loop_models`` rows of those keys, as
        their JSON holds them."""
        key_column = _ROW_KEY[group_by]
        tokens = ", ".join(f"l.{column}" for column in USAGE_COLUMNS)
        json, where = "NULL, NULL", ""
        params: tuple[Any, ...] | None = None
        if models is not None:
            json, params = "l.record, s.header", (list(models),)
            where = (
                " WHERE EXISTS (SELECT 1 FROM {s}.loop_models m WHERE m.session_id = l.session_id"
                " AND m.position = l.position AND m.model = ANY(%s))"
            )
        elif exact:
            json, params = "l.record, s.header", (_BLURRED,)
            where = f" WHERE strpos(concat({key_column}, l.provider, l.model), %s) > 0"
        cur.execute(
            self._sql(
                f"SELECT l.session_id, {key_column}, l.provider, l.model, l.calls, l.started_at_ns,"
                f" {json}, {tokens}"
                f" FROM {{s}}.loops l JOIN {{s}}.sessions s USING (session_id){where}"
            ),
            params,
        )
        rows = []
        for session_id, key, provider, model, calls, started, record, header, *usage in cur.fetchall():
            if record is not None:
                loop = _exact_loop(record)
                if loop is not None:
                    config = loop.config
                    provider, model = (None, None) if config is None else (config.provider, config.model)
                key = _exact_key(group_by, key, loop, header)
            row = stored_usage_row(key, provider, model, calls, Timestamp.from_ns(started), _usage(usage))
            rows.append((session_id, row))
        return rows

    def _exact_totals(
        self, cur: psycopg.Cursor[Row], group_by: GroupBy, totals: list[UsageTotal]
    ) -> list[UsageTotal]:
        """`totals` with each group whose key holds U+FFFD (which stands for NUL too:
        `_text`) summed again under its rows' exact keys, read from their JSON; by key."""
        blurred = [total.key for total in totals if _BLURRED in total.key]
        if not blurred:
            return totals
        exact = [total for total in totals if total.key not in blurred]
        if group_by == "model":
            # The loops a blurred key counts, split again: their parts of those keys.
            exact += model_totals(
                (session_id, part)
                for session_id, row in self._usage_rows(cur, group_by, models=blurred)
                for part in serving_rows(row)
                if _text(part.key) in blurred
            )
            return sorted(exact, key=lambda total: total.key)
        # By agent (a day is digits).
        tokens = ", ".join(USAGE_COLUMNS)
        cur.execute(
            self._sql(
                f"SELECT agent_id, session_id, loop_count, header, {tokens} FROM {{s}}.sessions"
                " WHERE agent_id = ANY(%s)"
            ),
            (blurred,),
        )
        sessions: dict[str, set[str]] = {}
        loops: Counter[str] = Counter()
        usage: dict[str, Usage] = {}
        for column_key, session_id, count, header, *values in cur.fetchall():
            key = _exact_key(group_by, column_key, None, header)
            sessions.setdefault(key, set()).add(session_id)
            loops[key] += count
            usage[key] = usage.get(key, ZERO_USAGE) + _usage(values)
        exact += [
            UsageTotal(key=key, sessions=len(ids), loops=loops[key], usage=usage[key])
            for key, ids in sessions.items()
        ]
        return sorted(exact, key=lambda total: total.key)

    def prune(self, criteria: PruneCriteria) -> int:
        """Delete the whole sessions `criteria` selects; returns how many. Then ``VACUUM`` the tables.

        Sessions being saved at that moment are skipped: they are evidently in use.
        The deletion is one transaction; the ``VACUUM`` that follows (outside it, in
        autocommit mode) returns the space to PostgreSQL and refreshes the planner's
        statistics.
        """
        check_type("criteria", criteria, PruneCriteria)
        check_writable(self, "prune")
        agent_id, keep_last, older_than = criteria.agent_id, criteria.keep_last, criteria.older_than
        conditions: list[str] = []
        params: list[Any] = []
        scope = "agent_id = %s"
        scope_params: list[Any] = [_text(agent_id)]
        if agent_id is not None and _blurred(SessionQuery(agent_id=agent_id)):
            exact = self._selected(SessionQuery(agent_id=agent_id), ("session_id",))
            scope += " AND session_id = ANY(%s)"
            scope_params.append([session_id for (session_id, *_) in exact])
        if older_than is not None:
            conditions.append("r.last_active_at_ns < %s")
            params.append(_clamped_ns(older_than))
        if keep_last is not None:
            conditions.append("r.rank > %s")
            params.append(keep_last)
        text = (
            f"WITH ranked AS (SELECT session_id, last_active_at_ns, row_number() OVER"
            f" (ORDER BY {_ORDER_BY['newest']}) AS rank FROM {{s}}.sessions"
            f"{' WHERE ' + scope if agent_id is not None else ''}),"
            " doomed AS (SELECT s.session_id FROM {s}.sessions s JOIN ranked r USING (session_id)"
            f" WHERE {' AND '.join(conditions)} FOR UPDATE OF s SKIP LOCKED)"
            " DELETE FROM {s}.sessions WHERE session_id IN (SELECT session_id FROM doomed)"
        )
        if agent_id is not None:
            params[:0] = scope_params
        with self._cursor("pruning sessions", transaction=True) as cur:
            cur.execute(self._sql(text), params)
            deleted = cur.rowcount
        if deleted:
            try:
                with self._cursor("vacuuming after a prune") as cur:
                    cur.execute(self._sql("VACUUM (ANALYZE) {s}.sessions, {s}.loops"))
            except StoreError as exc:
                # The deletion is committed; autovacuum will reclaim the space later.
                _log.warning("%s", exc)
        return deleted

    def close(self) -> None:
        """Close the connections; later calls raise `StoreError`. Safe to call twice."""
        self._pool.close()
