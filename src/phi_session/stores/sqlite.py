"""`SqliteStore`: the embedded default store, one SQLite file (stdlib ``sqlite3``).

Layout. Table ``sessions`` holds one row per session: the header (every session
field but the loops, as compact phi-core JSON), the summary columns that
listings, filters and totals read, and the ids of the session's messages. Table
``loops`` holds one row per loop: its record and the columns the model/status
filters and per-day totals read, its outline, and its model calls (``calls``,
`outline.encode_calls`), which priced totals read; ``loop_models`` holds what each
loop adds to the per-model totals: its usage by the model that served its calls
(`outline_model_rows`). A record is stored
as a packed template (`message_book`): the loop's compact phi-core JSON (`codec.encode_loop`) with each
message replaced by a reference to table ``messages``, which holds each distinct
message once, shared by every session that has it and deleted with the last (its
``refs`` counts them; every change runs in the writing transaction). `load`
rebuilds the Session from the header, the templates and the messages, so it encodes
to the bytes that were saved. `query` and `usage_totals` only read indexed columns,
never records.

Concurrency. Every thread gets its own connection, opened on first use; SQLite's
locks do the rest, so the store may be shared by threads and the file by
processes. The database runs in WAL mode: readers never wait for the writer. A
writer waits for another writer for at most ``timeout`` seconds, then
`SessionLocked` is raised. A connection is closed only while no thread uses it:
`close` waits for a use in progress to end (the store reopens connections on
demand), and at interpreter exit only idle connections are closed, so a daemon
thread still saving is never pulled out from under. A file that is not a
phi-session database is refused before anything is written to it. SQLite
connections must not cross ``fork()``: a store that has open connections when the
process forks refuses to work in the child (`StoreError`) until `close` is called
there; calling `close` before forking avoids that.

Durability. ``synchronous=NORMAL`` by default: a power cut may lose the last
commits but never corrupts the file or leaves half a session (every save is one
transaction); pass ``synchronous="FULL"`` to make each commit durable.

Numbers. SQLite integers are signed 64-bit; phi-core's token counters are
unsigned 64-bit and its instants reach year 9999. Values beyond SQLite's range
saturate in the integer columns, which only sort and filter: the few sessions at
a column's bound (more than 2**63-2 tokens, instants outside 1677-2262) are
sorted and filtered by their exact values, read apart (`past_the_columns`).
Nothing exact is lost: timestamps are also kept as text, the records keep every
value, and the summaries and totals of a session whose token counts saturated
are computed from its records.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast, get_args

import msgspec
from msgspec.structs import replace

from .._checks import MOST_WAIT_SECONDS, check_seconds, check_type
from .._time import Timestamp
from ..codec import decode_loop, decode_session, encode_session
from ..errors import (
    DecodeError,
    InvalidArgument,
    SessionLocked,
    SessionNotFound,
    StoredSessionUnusable,
    StoreError,
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
    collect_hits,
    loops_a_merge_touches,
    merge_part,
    outline_model_rows,
    past_the_columns,
    save_as_written,
    serving_rows,
    stored_usage_row,
    summarize,
    summarize_outline,
    totalled_rows,
    usage_rows,
    validate_session_id,
)
from .message_book import MessageBook, expand, numbers_in, pack, unpack
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
from .query import LOOP_STATUSES, GroupBy, PruneCriteria, SessionQuery, check_text, parse_group_by
from .search import DEFAULT_LIMIT, SearchHit, loop_text, query_words, search_words

if TYPE_CHECKING:
    from ..cost import Pricer

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore", "check_timeout"]

logger = logging.getLogger(__name__)

Synchronous = Literal["NORMAL", "FULL"]

# Marks the file as a phi-session database (PRAGMA application_id), so that a
# foreign SQLite file is refused instead of having tables added to it.
APPLICATION_ID = int.from_bytes(b"phiS", "big")

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
# How long opening a store waits, in seconds, for another process's migration of it
# (rewriting a large store's records takes minutes), before `SessionLocked`.
_MIGRATION_WAIT = 600.0
# How many times a writable connection is opened again when the file at the path changed
# while it opened (`SqliteStore._connect_to_the_file_at_path`).
_OPEN_TRIES = 20
_TOKEN_SUMS_SQL = ", ".join(f"SUM({column})" for column in USAGE_COLUMNS)

# -- Schema ------------------------------------------------------------------------------


# Released migrations are frozen: never edit one, append the next. Their SQL is
# therefore spelled out rather than derived from the column lists below.
_SCHEMA_V1 = (
    """CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY NOT NULL,
        agent_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_active_at TEXT NOT NULL,
        created_at_ns INTEGER NOT NULL,
        last_active_at_ns INTEGER NOT NULL,
        save_seq INTEGER NOT NULL,
        formation TEXT NOT NULL,
        parent_session_id TEXT,
        rejected INTEGER NOT NULL,
        loop_count INTEGER NOT NULL,
        turn_count INTEGER NOT NULL,
        loops_pending INTEGER NOT NULL,
        loops_running INTEGER NOT NULL,
        loops_completed INTEGER NOT NULL,
        loops_rejected INTEGER NOT NULL,
        loops_aborted INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cache_read_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        models TEXT NOT NULL,
        exact INTEGER NOT NULL,
        header BLOB NOT NULL
    )""",
    """CREATE TABLE loops (
        session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        loop_id TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at_ns INTEGER NOT NULL,
        ended_at_ns INTEGER,
        provider TEXT,
        model TEXT,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cache_read_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        record BLOB NOT NULL,
        UNIQUE (session_id, position)
    )""",
    # Shaped after the orders of `_ORDER_SQL` so that a LIMIT stops early; total_tokens
    # lets a min_tokens filter skip rows without reading them.
    "CREATE INDEX sessions_agent_active ON sessions "
    "(agent_id, last_active_at_ns DESC, session_id, total_tokens)",
    "CREATE INDEX sessions_active ON sessions (last_active_at_ns DESC, session_id, total_tokens)",
    "CREATE INDEX sessions_saved ON sessions (save_seq)",
    "CREATE INDEX sessions_parent ON sessions (parent_session_id) WHERE parent_session_id IS NOT NULL",
    "CREATE INDEX sessions_tokens ON sessions (total_tokens DESC, session_id)",
    "CREATE INDEX sessions_inexact ON sessions (session_id) WHERE NOT exact",
    # Cover the loop filters (both shapes of `_loop_filter`) and the per-model totals:
    # none of them reads the wide rows.
    "CREATE INDEX loops_model ON loops (model, session_id, provider, input_tokens, output_tokens, "
    "reasoning_tokens, cache_read_tokens, cache_write_tokens, total_tokens)",
    "CREATE INDEX loops_status ON loops (status, session_id)",
)


def _create_v1(conn: sqlite3.Connection) -> None:
    # One statement per execute(): executescript() would commit the migration's transaction.
    for statement in _SCHEMA_V1:
        conn.execute(statement)


Migration = Callable[[sqlite3.Connection], None]

# v2: full-text search. `loop_text` holds each loop's searchable text (`loop_text`),
# removed with its loop row; `loop_text_fts` indexes it (an external-content FTS5
# table kept in step by triggers). The migration indexes the loops already stored.
_SCHEMA_V2 = (
    """CREATE TABLE loop_text (
        session_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        text TEXT NOT NULL,
        UNIQUE (session_id, position),
        FOREIGN KEY (session_id, position) REFERENCES loops (session_id, position) ON DELETE CASCADE
    )""",
    "CREATE VIRTUAL TABLE loop_text_fts USING fts5(text, content='loop_text', "
    "tokenize='unicode61 remove_diacritics 0')",  # v8 replaces it (`_index_words`)
    """CREATE TRIGGER loop_text_added AFTER INSERT ON loop_text BEGIN
        INSERT INTO loop_text_fts (rowid, text) VALUES (new.rowid, new.text);
    END""",
    """CREATE TRIGGER loop_text_removed AFTER DELETE ON loop_text BEGIN
        INSERT INTO loop_text_fts (loop_text_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    END""",
    """CREATE TRIGGER loop_text_changed AFTER UPDATE ON loop_text BEGIN
        INSERT INTO loop_text_fts (loop_text_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
        INSERT INTO loop_text_fts (rowid, text) VALUES (new.rowid, new.text);
    END""",
)
_CREATE_LOOP_TEXT_FTS = (
    "CREATE VIRTUAL TABLE loop_text_fts USING fts5(text, content='loop_text', "
    "tokenize=\"ascii tokenchars '_'\")"
)
_UPSERT_LOOP_TEXT = (
    "INSERT INTO loop_text (session_id, position, text) VALUES (?, ?, ?) "
    "ON CONFLICT (session_id, position) DO UPDATE SET text = excluded.text"
)


def _create_v2(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V2:
        conn.execute(statement)
    rows = conn.execute("SELECT session_id, position, record FROM loops").fetchall()
    conn.executemany(
        _UPSERT_LOOP_TEXT,
        [
            (session_id, position, loop_text(decode_loop(record, strict=False)))
            for session_id, position, record in rows
        ],
    )


# v3: a loop without AgentEnd counts the turn it was cut off in (`LoopRecord.billed_usage`);
# the token columns of such loops, saved as zero before, and of their sessions are
# recomputed. The records themselves do not change.
_V3_UNFINISHED = (
    "SELECT session_id, position, record FROM loops WHERE ended_at_ns IS NULL "
    "AND status NOT IN ('Completed', 'Rejected') AND input_tokens = 0 AND output_tokens = 0 "
    "AND reasoning_tokens = 0 AND cache_read_tokens = 0 AND cache_write_tokens = 0 AND total_tokens = 0"
)
_V3_FIELDS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")
_V3_TOKENS = (
    "input_tokens, output_tokens, reasoning_tokens, cache_read_tokens, cache_write_tokens, total_tokens"
)


def _bill_unfinished_loops(conn: sqlite3.Connection) -> None:
    billed: set[str] = set()
    for session_id, position, blob in conn.execute(_V3_UNFINISHED).fetchall():
        try:
            record = decode_loop(blob, strict=False)
        except DecodeError:
            continue  # left as it was: reading the session reports it
        usage = record.billed_usage()
        if usage != record.usage:
            conn.execute(
                f"UPDATE loops SET ({_V3_TOKENS}) = (?, ?, ?, ?, ?, ?) WHERE session_id = ? AND position = ?",
                [*(_clamp(getattr(usage, name)) for name in _V3_FIELDS), session_id, position],
            )
            billed.add(session_id)
    _sum_session_tokens(conn, billed)


def _sum_session_tokens(conn: sqlite3.Connection, sessions: Iterable[str]) -> None:
    """The token columns of `sessions`, the sums of their loops' again."""
    for session_id in sessions:
        # Summed here, not by SQL (whose integers overflow). Loop columns saturate at
        # 2**63-1: a sum is exact only below that (an inexact session is summarized
        # from its records).
        rows = conn.execute(f"SELECT {_V3_TOKENS} FROM loops WHERE session_id = ?", (session_id,)).fetchall()
        sums = [sum(column) for column in zip(*rows, strict=True)]
        exact = all(value < _I64_MAX for value in sums)
        conn.execute(
            f"UPDATE sessions SET ({_V3_TOKENS}) = (?, ?, ?, ?, ?, ?), exact = exact AND ? "
            "WHERE session_id = ?",
            [*map(_clamp, sums), int(exact), session_id],
        )


def _outline_stored_loops(conn: sqlite3.Connection) -> None:
    """v4: partial loads. ``loops.outline`` holds each loop's outline (`encode_loop_outline`),
    so that `load_outline` reads no record; filled here for the loops already stored (a
    record that does not decode keeps NULL: `load_outline` then reads it, and reports it)."""
    conn.execute("ALTER TABLE loops ADD COLUMN outline BLOB")
    rows = conn.execute("SELECT session_id, position, record FROM loops").fetchall()
    outlines = []
    for session_id, position, blob in rows:
        try:
            outlines.append((encode_loop_outline(decode_loop(blob, strict=False)), session_id, position))
        except DecodeError:
            continue
    conn.executemany("UPDATE loops SET outline = ? WHERE session_id = ? AND position = ?", outlines)


def _store_first_prompts(conn: sqlite3.Connection) -> None:
    """v5: ``sessions.first_prompt``, what a listing shows (`SessionSummary.first_prompt`),
    filled from the loops' outlines (a loop without one, not decodable, is passed over)."""
    conn.execute("ALTER TABLE sessions ADD COLUMN first_prompt TEXT")
    rows = conn.execute(
        "SELECT session_id, outline FROM loops WHERE outline IS NOT NULL ORDER BY session_id, position"
    )
    conn.executemany(
        "UPDATE sessions SET first_prompt = ? WHERE session_id = ?",
        [(prompt, session_id) for session_id, prompt in stored_first_prompts(rows) if prompt is not None],
    )


# v6: each distinct message stored once (`message_book`). ``messages`` holds them, with
# how many sessions refer to each (``refs``: a message no session refers to is deleted);
# ``sessions.message_ids`` maps each session's message numbers to them; ``loops.record``
# holds the loop's packed template instead of its whole JSON.
_SCHEMA_V6 = (
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        digest BLOB NOT NULL UNIQUE,
        refs INTEGER NOT NULL,
        body BLOB NOT NULL
    )""",
    "ALTER TABLE sessions ADD COLUMN message_ids BLOB NOT NULL DEFAULT x''",
)


def _share_messages(conn: sqlite3.Connection) -> None:
    """v6: the stored records become templates and their messages rows of ``messages``.
    A record that does not decode is kept as a template without markers (its bytes
    unchanged once unpacked): reading it reports it, as before."""
    for statement in _SCHEMA_V6:
        conn.execute(statement)
    for (session_id,) in conn.execute("SELECT session_id FROM sessions").fetchall():
        book = MessageBook()
        templates = []
        for position, blob in conn.execute(
            "SELECT position, record FROM loops WHERE session_id = ?", (session_id,)
        ).fetchall():
            try:
                template, _ = book.template(decode_loop(blob, strict=False))
            except DecodeError:
                template = blob.encode() if isinstance(blob, str) else bytes(blob)
            templates.append((pack(template), session_id, position))
        ids = _register_messages(conn, book, [])
        conn.execute("UPDATE sessions SET message_ids = ? WHERE session_id = ?", (_pack_ids(ids), session_id))
        conn.executemany("UPDATE loops SET record = ? WHERE session_id = ? AND position = ?", templates)


def _store_model_calls(conn: sqlite3.Connection) -> None:
    """v7: cost per model call. ``loops.calls`` holds each loop's calls (`encode_calls`),
    what priced totals read, and its outline is written again with them. A loop whose
    record does not decode keeps NULL and its old outline: its billed usage then stands
    in for its calls (`stored_usage_row`, `LoopOutline.model_calls`)."""
    conn.execute("ALTER TABLE loops ADD COLUMN calls BLOB")
    updates = [
        (encode_calls(record), encode_loop_outline(record), session_id, position)
        for session_id, position, record in _each_stored_loop(conn)
    ]
    conn.executemany("UPDATE loops SET calls = ?, outline = ? WHERE session_id = ? AND position = ?", updates)


def _each_stored_loop(
    conn: sqlite3.Connection, sessions: Iterable[str] | None = None
) -> Iterator[tuple[str, int, LoopRecord]]:
    """``(session_id, position, record)`` of every stored loop (v6's layout), or of those of
    `sessions` only, that decodes: a migration leaves one that does not as it was, for its
    readers to report."""
    select = "SELECT session_id, message_ids FROM sessions"
    if sessions is None:
        rows = conn.execute(select).fetchall()
    else:
        rows = [
            row
            for session_id in sessions
            for row in conn.execute(f"{select} WHERE session_id = ?", (session_id,))
        ]
    for session_id, message_ids in rows:
        try:
            ids = _unpack_ids(message_ids)
        except DecodeError:
            continue
        found = _message_rows(conn, ids)
        bodies = [row[1] if row is not None else None for row in map(found.get, ids)]
        for position, blob in conn.execute(
            "SELECT position, record FROM loops WHERE session_id = ?", (session_id,)
        ).fetchall():
            try:
                record = decode_loop(expand(unpack(blob), bodies), strict=False)
            except DecodeError:
                continue
            yield session_id, position, record


def _indexed_text(text: str) -> str:
    """What ``loop_text`` stores of a loop's searchable text: its words (`query_words`), one
    space apart. The index's ``ascii`` tokenizer (``_`` a word character, every non-ASCII
    character too) then keeps each word whole, so it splits and folds nothing its own way:
    unicode61 split no word at a private-use character or a combining accent, had no token
    for ``_`` and folded some letters otherwise than the rule (`search.query_words`), and
    missed such hits."""
    return " ".join(query_words(text))


def _index_words(conn: sqlite3.Connection) -> None:
    """v8: search by the rule's words. ``loop_text`` holds `_indexed_text` and
    ``loop_text_fts`` is built again with the ``ascii`` tokenizer."""
    rows = conn.execute("SELECT rowid, text FROM loop_text").fetchall()
    conn.executemany(
        "UPDATE loop_text SET text = ? WHERE rowid = ?",
        [(_indexed_text(text), rowid) for rowid, text in rows],
    )
    conn.execute("DROP TABLE loop_text_fts")
    conn.execute(_CREATE_LOOP_TEXT_FTS)
    conn.execute("INSERT INTO loop_text_fts (loop_text_fts) VALUES ('rebuild')")


def _index_tool_call_words(conn: sqlite3.Connection) -> None:
    """v9: a tool call's words are those of its arguments' text, a control character's
    escape read as a blank (`search.loop_text`): the loops whose words that changes are
    indexed again."""
    _index_changed_words(conn)


def _index_what_cut_loops_said(conn: sqlite3.Connection) -> None:
    """v10: a loop that never ended is searched by what its ``MessageEnd`` events said
    (`LoopRecord.conversation`): the loops whose words that changes are indexed again."""
    _index_changed_words(conn)


def _index_changed_words(conn: sqlite3.Connection, sessions: Iterable[str] | None = None) -> None:
    """Index again the loops (of every session, or of `sessions`) whose words
    (`search.loop_text`) differ from those stored. A loop whose record does not decode
    keeps its words."""
    changed: list[tuple[str, int, str]] = []
    for session_id, position, record in _each_stored_loop(conn, sessions):
        text = _indexed_text(loop_text(record))
        stored = conn.execute(
            "SELECT text FROM loop_text WHERE session_id = ? AND position = ?", (session_id, position)
        ).fetchone()
        if stored is None or stored[0] != text:
            changed.append((session_id, position, text))
    _index_loop_texts(conn, changed)


def _name_serving_models(conn: sqlite3.Connection) -> None:
    """v11: a model call names the model that served it when not the loop config's
    (`ModelCall.served_by`): the loops whose calls that changes get them, and their
    outline, again. A loop whose record does not decode keeps its calls."""
    updates = []
    for session_id, position, record in _each_stored_loop(conn):
        outline = loop_outline(record)
        if outline.calls is None or not any(call.served_by for call in outline.calls):
            continue
        outline_json, calls_json = encode_outline_parts(outline)
        updates.append((calls_json, outline_json, session_id, position))
    conn.executemany("UPDATE loops SET calls = ?, outline = ? WHERE session_id = ? AND position = ?", updates)


def _index_composed_words(conn: sqlite3.Connection) -> None:
    """v12: the rule's words are those of the composed (NFC) text (`search.query_words`):
    the loops whose words that changes (decomposed accents) are indexed again."""
    _index_changed_words(conn)


def _sum_loops_by_serving_model(conn: sqlite3.Connection) -> None:
    """v13: totals by model count each call under the model that served it, in one
    aggregate: ``loop_models`` holds each loop's usage by serving model (`serving_rows`
    of its stored calls), removed with its loop row, and an index covering that sum."""
    conn.execute(
        f"""CREATE TABLE loop_models (
        session_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        model TEXT NOT NULL,
        {", ".join(f"{column} INTEGER NOT NULL" for column in _V3_TOKENS.split(", "))},
        PRIMARY KEY (session_id, position, model),
        FOREIGN KEY (session_id, position) REFERENCES loops (session_id, position) ON DELETE CASCADE
    ) WITHOUT ROWID"""
    )
    conn.execute(f"CREATE INDEX loop_models_model ON loop_models (model, session_id, {_V3_TOKENS})")
    rows = [
        _loop_model_row(session_id, position, part)
        for session_id, position, key, provider, model, calls, started, *tokens in conn.execute(
            f"SELECT l.session_id, l.position, {_LOOP_MODEL_SQL}, {_ROWS_FROM_SQL}"
        ).fetchall()
        for part in serving_rows(
            stored_usage_row(key, provider, model, calls, Timestamp.from_ns(started), _usage_of(tokens))
        )
    ]
    conn.executemany(_INSERT_LOOP_MODEL, rows)


def _prompt_loops_that_never_ended(conn: sqlite3.Connection) -> None:
    """v14: a loop that never ended has the prompt of its ``MessageEnd`` events (`loop_prompt`
    since 41544bf, which migrated nothing): its outline stored at versions 7 to 9 says it has
    none (v7 outlined every loop again), and so may the first prompt its session lists,
    stored at any version. Such outlines (no prompt, some ``MessageEnd``: a loop without
    messages) are written again, then every session's first prompt is read from its outlines,
    as v5 did; a session with a loop not outlined (its record does not decode) keeps its."""
    unprompted: dict[str, set[int]] = {}
    for session_id, position, outline in conn.execute(
        "SELECT session_id, position, outline FROM loops WHERE outline IS NOT NULL"
    ):
        stored = decode_loop_outline(outline)
        if stored.prompt is None and "MessageEnd" in stored.event_types:
            unprompted.setdefault(session_id, set()).add(position)
    conn.executemany(
        "UPDATE loops SET outline = ? WHERE session_id = ? AND position = ?",
        [
            (encode_loop_outline(record), session_id, position)
            for session_id, position, record in _each_stored_loop(conn, unprompted)
            if position in unprompted[session_id]
        ],
    )
    rows = conn.execute(
        "SELECT l.session_id, s.first_prompt, l.outline FROM loops l JOIN sessions s USING (session_id) "
        "WHERE l.session_id NOT IN (SELECT session_id FROM loops WHERE outline IS NULL) "
        "ORDER BY l.session_id, l.position"
    )
    listed = stored_first_prompts(((session_id, stored), outline) for session_id, stored, outline in rows)
    conn.executemany(
        "UPDATE sessions SET first_prompt = ? WHERE session_id = ?",
        [
            (prompt, session_id)
            for (session_id, stored), prompt in listed
            if prompt is not None and prompt != stored
        ],
    )


def _index_case_folded_words(conn: sqlite3.Connection) -> None:
    """v15: the rule's words are case-folded, no longer lower-cased (`search.query_words`:
    "straße" is "strasse"): the loops whose words that changes are indexed again. Only
    sessions with a word not ASCII are read: no character lower-cased to ASCII folds otherwise."""
    sessions = {
        session_id
        for session_id, text in conn.execute("SELECT session_id, text FROM loop_text")
        if not text.isascii()
    }
    _index_changed_words(conn, sorted(sessions))


def _count_untotalled_calls(conn: sqlite3.Connection) -> None:
    """v16: a loop's total counts the tokens of its calls that reported no total (phi-core's
    Anthropic provider sets none: `counted_usage`), which its listing, ``min_tokens``, the
    order by tokens and the totals by model read, and a turn of several replies (an errored
    one, then a fallback's) is a call per reply, each on its model. Neither shows in the
    stored columns (a loop mixing calls with and without totals, a turn stored as one call),
    so every loop is decoded: one whose token columns, outline or calls differ from what it
    is stored as now gets them and its rows by serving model again, and its session its
    sums. A loop whose record does not decode is left as it was."""
    changed: set[str] = set()
    for session_id, position, record in _each_stored_loop(conn):
        outline = loop_outline(record)
        current = [*_token_columns(record.billed_usage()), *encode_outline_parts(outline)]
        stored = conn.execute(
            f"SELECT {_V3_TOKENS}, outline, calls FROM loops WHERE session_id = ? AND position = ?",
            (session_id, position),
        ).fetchone()
        if list(stored) == current:
            continue
        conn.execute(
            f"UPDATE loops SET ({_V3_TOKENS}, outline, calls) = (?, ?, ?, ?, ?, ?, ?, ?)"
            " WHERE session_id = ? AND position = ?",
            [*current, session_id, position],
        )
        conn.execute("DELETE FROM loop_models WHERE session_id = ? AND position = ?", (session_id, position))
        conn.executemany(
            _INSERT_LOOP_MODEL,
            [_loop_model_row(session_id, position, part) for part in outline_model_rows(outline)],
        )
        changed.add(session_id)
    _sum_session_tokens(conn, sorted(changed))


MIGRATIONS: tuple[Migration, ...] = (
    _create_v1,
    _create_v2,
    _bill_unfinished_loops,
    _outline_stored_loops,
    _store_first_prompts,
    _share_messages,
    _store_model_calls,
    _index_words,
    _index_tool_call_words,
    _index_what_cut_loops_said,
    _name_serving_models,
    _index_composed_words,
    _sum_loops_by_serving_model,
    _prompt_loops_that_never_ended,
    _index_case_folded_words,
    _count_untotalled_calls,
)
"""Forward migrations: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``.

They run in order, all inside one ``BEGIN IMMEDIATE`` transaction that also sets
``PRAGMA user_version``, so a failed migration leaves the database as it was.
"""

SCHEMA_VERSION = len(MIGRATIONS)

# -- Errors ----------------------------------------------------------------------------

# SQLite's primary result codes (stable C API values; ``sqlite3`` names them only from 3.11).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_FULL = 13


def _primary_code(error: sqlite3.Error) -> int | None:
    code: int | None = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    return None if code is None else code & 0xFF


def _is_busy(error: sqlite3.Error) -> bool:
    code = _primary_code(error)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


# -- Row building --------------------------------------------------------------------------


def _clamp(value: int) -> int:
    """`value` saturated to SQLite's signed 64-bit integers."""
    return _I64_MIN if value < _I64_MIN else _I64_MAX if value > _I64_MAX else value


def _token_columns(usage: Usage) -> list[int]:
    return [_clamp(getattr(usage, name)) for name in USAGE_FIELDS]


def _header(session: Session) -> bytes:
    return encode_session(replace(session, loops=[]), pretty=False)


# -- The message table -------------------------------------------------------------------

# Message ids in one statement's IN list: far below SQLite's oldest default limit (999).
_IDS_PER_STATEMENT = 500
# A session's message ids, by message number: little-endian signed 64-bit; 0 marks a
# number none of the session's loops uses any more.
_ID_FORMAT = "<%dq"


def _pack_ids(ids: Sequence[int]) -> bytes:
    return struct.pack(_ID_FORMAT % len(ids), *ids)


def _unpack_ids(blob: bytes) -> list[int]:
    try:
        return list(struct.unpack(_ID_FORMAT % (len(blob) // 8), blob))  # raises unless len % 8 == 0
    except struct.error as error:
        raise DecodeError(f"not a list of message ids ({error})") from None


def _in_chunks(values: Sequence[Any]) -> Iterator[tuple[Sequence[Any], str]]:
    """`values` in slices small enough for one IN list, each with its placeholders."""
    for start in range(0, len(values), _IDS_PER_STATEMENT):
        chunk = values[start : start + _IDS_PER_STATEMENT]
        yield chunk, ", ".join("?" * len(chunk))


def _message_digests(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, bytes]:
    """The digest of each message of `ids` that is stored (0s are skipped)."""
    wanted = sorted({message_id for message_id in ids if message_id})
    digests: dict[int, bytes] = {}
    for chunk, marks in _in_chunks(wanted):
        digests.update(conn.execute(f"SELECT id, digest FROM messages WHERE id IN ({marks})", chunk))
    return digests


def _message_rows(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, tuple[bytes, bytes]]:
    """The digest and body of each message of `ids` that is stored (0s are skipped)."""
    wanted = sorted({message_id for message_id in ids if message_id})
    rows: dict[int, tuple[bytes, bytes]] = {}
    for chunk, marks in _in_chunks(wanted):
        for message_id, address, body in conn.execute(
            f"SELECT id, digest, body FROM messages WHERE id IN ({marks})", chunk
        ):
            rows[message_id] = (address, body)
    return rows


# A digest stored already keeps its row, which one more session now refers to.
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, digest, refs, body) VALUES (?, ?, 1, ?) "
    "ON CONFLICT (digest) DO UPDATE SET refs = refs + 1"
)


def _blob(data: bytes) -> bytearray:
    """`data` as a parameter the ``sqlite3`` module binds at once: it looks for an adapter
    for every value but an int, float, str or bytearray first, which for bytes (on Python
    3.11) costs more than copying them (it raises and clears an AttributeError)."""
    return bytearray(data)


def _register_messages(conn: sqlite3.Connection, book: MessageBook, ids: Sequence[int]) -> list[int]:
    """`ids` (the stored ids of `book`'s seeded numbers) followed by the ids of the
    messages `book` added: a stored message of the same digest, which one more session
    now refers to, or a new row. Inside the writing transaction: no other writer runs."""
    if not book.added:
        return list(ids)
    # Most messages are new: each is offered under the next free id, and only the
    # digests whose offered id was not taken (stored already) are looked up, rather
    # than looking every digest up before inserting.
    first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetchone()[0]
    conn.executemany(
        _INSERT_MESSAGE,
        [(first + n, _blob(address), _blob(body)) for n, (address, body) in enumerate(book.added)],
    )
    new_ids = list(range(first, first + len(book.added)))
    taken = {message_id for (message_id,) in conn.execute("SELECT id FROM messages WHERE id >= ?", (first,))}
    if len(taken) < len(new_ids):
        shared = [n for n, message_id in enumerate(new_ids) if message_id not in taken]
        addresses = [book.added[n][0] for n in shared]
        stored: dict[bytes, int] = {}
        for chunk, marks in _in_chunks(addresses):
            stored.update(conn.execute(f"SELECT digest, id FROM messages WHERE digest IN ({marks})", chunk))
        for n, address in zip(shared, addresses, strict=True):
            new_ids[n] = stored[address]
    return [*ids, *new_ids]


def _release_sessions(conn: sqlite3.Connection, message_ids: Iterable[bytes]) -> None:
    """The sessions whose ``message_ids`` these are were deleted: release their messages.
    A corrupt list is passed over (its messages stay) rather than refusing the delete or
    releasing ids it does not hold."""
    ids: list[int] = []
    for blob in message_ids:
        try:
            ids += _unpack_ids(blob)
        except DecodeError:
            logger.warning("deleted a session whose message ids are corrupt: its messages stay stored")
    _release_messages(conn, ids)


def _release_messages(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    """One session fewer refers to each of `ids` (0s are skipped; an id may repeat, once
    per session): the messages no session refers to any more are deleted."""
    counts = Counter(message_id for message_id in ids if message_id)
    conn.executemany("UPDATE messages SET refs = refs - ? WHERE id = ?", [(n, i) for i, n in counts.items()])
    conn.executemany("DELETE FROM messages WHERE id = ? AND refs <= 0", [(i,) for i in counts])


# ``loop_text`` rows a statement: three parameters each, as many as in an IN list.
_TEXT_ROWS_PER_STATEMENT = _IDS_PER_STATEMENT // 3


def _index_loop_texts(conn: sqlite3.Connection, rows: Sequence[tuple[str, int, str]]) -> None:
    """Upsert `rows` into ``loop_text``, many a statement, after a transaction's other writes.

    FTS5 writes the words indexed so far as a new segment of its index whenever a
    statement opens a savepoint while it holds some, which a write with a trigger does:
    upserted a row at a time (``executemany``) and before other writes, a transaction
    wrote a segment per loop, and merging them cost more than indexing the words."""
    for start in range(0, len(rows), _TEXT_ROWS_PER_STATEMENT):
        chunk = rows[start : start + _TEXT_ROWS_PER_STATEMENT]
        values = ", ".join(["(?, ?, ?)"] * len(chunk))
        conn.execute(
            f"INSERT INTO loop_text (session_id, position, text) VALUES {values} "
            "ON CONFLICT (session_id, position) DO UPDATE SET text = excluded.text",
            [value for row in chunk for value in row],
        )


def _loop_row(record: LoopRecord) -> list[Any]:
    """The columns of one loop row after ``(session_id, position)``, without the record."""
    config = record.config
    ended = record.ended_at
    return [
        record.loop_id,
        record.status,
        _clamp(record.started_at.ns),
        None if ended is None else _clamp(ended.ns),
        None if config is None else config.provider,
        None if config is None else config.model,
        *_token_columns(record.billed_usage()),
    ]


# What a listing reads (`_summary_from_row`), then what only sorts, filters or loads.
_SUMMARY_COLUMNS = (
    "session_id",
    "agent_id",
    "created_at",
    "last_active_at",
    "formation",
    "parent_session_id",
    "rejected",
    "loop_count",
    "turn_count",
    *STATUS_COLUMNS.values(),
    *USAGE_COLUMNS,
    "models",
    "first_prompt",
    "exact",
)
_SESSION_COLUMNS = (*_SUMMARY_COLUMNS, "created_at_ns", "last_active_at_ns", "header", "message_ids")


def _session_row(session: Session, summary: SessionSummary, message_ids: Sequence[int]) -> list[Any]:
    """The `_SESSION_COLUMNS` of a (merged) session header, its `summary`, its message
    numbers standing for `message_ids`."""
    tokens = [getattr(summary.usage, name) for name in USAGE_FIELDS]
    return [
        session.session_id,
        session.agent_id,
        str(session.created_at),
        str(session.last_active_at),
        summary.formation,
        summary.parent_session_id,
        int(summary.rejected),
        summary.loop_count,
        summary.turn_count,
        *(summary.loops_by_status.get(status, 0) for status in LOOP_STATUSES),
        *map(_clamp, tokens),
        msgspec.json.encode(summary.models).decode(),
        summary.first_prompt,
        # Token counts are unsigned: a loop's beyond 64 signed bits makes the session's too.
        int(all(value <= _I64_MAX for value in tokens)),
        _clamp(session.created_at.ns),
        _clamp(session.last_active_at.ns),
        _header(session),
        _pack_ids(message_ids),
    ]


_UPSERT_SESSION = (
    f"INSERT INTO sessions ({', '.join(_SESSION_COLUMNS)}, save_seq) "
    f"VALUES ({', '.join('?' * len(_SESSION_COLUMNS))}, "
    "(SELECT COALESCE(MAX(save_seq), 0) + 1 FROM sessions)) ON CONFLICT (session_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*_SESSION_COLUMNS[1:], "save_seq"))
)
_LOOP_COLUMNS = (
    "session_id",
    "position",
    "loop_id",
    "status",
    "started_at_ns",
    "ended_at_ns",
    "provider",
    "model",
    *USAGE_COLUMNS,
    "record",
    "outline",
    "calls",
)
_UPSERT_LOOP = (
    f"INSERT INTO loops ({', '.join(_LOOP_COLUMNS)}) VALUES ({', '.join('?' * len(_LOOP_COLUMNS))}) "
    "ON CONFLICT (session_id, position) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _LOOP_COLUMNS[2:])
)
_SUMMARY_SQL = f"SELECT {', '.join(_SUMMARY_COLUMNS)} FROM sessions"
_STATUS_SLICE = slice(9, 9 + len(LOOP_STATUSES))
_TOKEN_SLICE = slice(_STATUS_SLICE.stop, _STATUS_SLICE.stop + len(USAGE_FIELDS))


def _summary_from_row(row: Sequence[Any]) -> SessionSummary:
    """A summary from a `_SUMMARY_SQL` row whose ``exact`` is set (see `_session_row`)."""
    session_id, agent_id, created_at, last_active_at, formation, parent, rejected, loops, turns = row[:9]
    return SessionSummary(
        session_id=session_id,
        agent_id=agent_id,
        created_at=Timestamp(created_at),  # written as str(Timestamp): canonical
        last_active_at=Timestamp(last_active_at),
        formation=formation,
        parent_session_id=parent,
        rejected=bool(rejected),
        loop_count=loops,
        loops_by_status={status: n for status, n in zip(LOOP_STATUSES, row[_STATUS_SLICE], strict=True) if n},
        turn_count=turns,
        usage=_usage_of(row[_TOKEN_SLICE]),
        models=tuple(msgspec.json.decode(row[_TOKEN_SLICE.stop])),
        first_prompt=row[_TOKEN_SLICE.stop + 1],
    )


# -- Queries ---------------------------------------------------------------------------

# Ties by session id, in every order (as the other stores).
_ORDER_SQL: dict[str, str] = {
    "newest": "last_active_at_ns DESC, session_id",
    "oldest": "last_active_at_ns, session_id",
    "tokens": "total_tokens DESC, session_id",
}
# The column of each `PageCursor.column`.
_CURSOR_COLUMNS = {"last_active_at": "last_active_at_ns", "total_tokens": "total_tokens"}
# Most recently saved first: `save_seq` grows with every save (no ties).
_SAVED_ORDER_SQL = "save_seq DESC"


def _loop_filter(lookups: Sequence[tuple[str, Sequence[Any]]], *, limited: bool) -> tuple[str, list[Any]]:
    """Sessions having a loop that meets one of `lookups` (``(condition, params)`` pairs).

    Two shapes, for SQLite's planner, which cannot tell how selective a value is:
    with a LIMIT, a correlated EXISTS probe per session, so that the scan in the
    order's index stops after LIMIT matches; without, an IN list gathered from the
    covering index, fast when the value is rare.
    """
    params: list[Any] = []
    for _, lookup_params in lookups:
        params += lookup_params
    if limited:
        probes = [
            f"EXISTS (SELECT 1 FROM loops WHERE loops.session_id = sessions.session_id AND {condition})"
            for condition, _ in lookups
        ]
        return "(" + " OR ".join(probes) + ")", params
    union = " UNION ALL ".join(f"SELECT session_id FROM loops WHERE {condition}" for condition, _ in lookups)
    return f"session_id IN ({union})", params


def _model_lookups(model: str) -> list[tuple[str, Sequence[Any]]]:
    """Loops whose model is `model`, or whose ``provider/model`` is: providers and
    models may both contain ``/``, so every split point is an alternative."""
    lookups: list[tuple[str, Sequence[Any]]] = [("model = ?", [model])]
    for index, char in enumerate(model):
        if char == "/":
            lookups.append(("model = ? AND provider = ?", [model[index + 1 :], model[:index]]))
    return lookups


# The sessions whose sort columns may be saturated (`_clamp`): their exact values decide
# the filters on them, the page and the order (`past_the_columns`).
_SATURATED_SQL = "(last_active_at_ns IN (?, ?) OR total_tokens = ?)"
_SATURATED = (_I64_MIN, _I64_MAX, _I64_MAX)
_ANY_SATURATED_SQL = f"SELECT 1 FROM sessions WHERE {_SATURATED_SQL} LIMIT 1"


def _select_summaries(query: SessionQuery, *, saturated: bool = False) -> tuple[str, list[Any]]:
    """SQLite's translation of `query`: the SQL and parameters of `SqliteStore.query`, for
    the sessions whose sort columns hold their exact values; `saturated`: the sessions of
    the others that the filters on text and loops select, in no order."""
    # Saturated: the few such sessions first (the indexes of both columns), then the
    # filters, their loops probed a session at a time (as a limited query's).
    where = [
        f"session_id IN (SELECT session_id FROM sessions WHERE {_SATURATED_SQL})"
        if saturated
        else f"NOT {_SATURATED_SQL}"
    ]
    params: list[Any] = [*_SATURATED]
    limited = query.limit is not None or saturated
    for condition, value in (
        ("agent_id = ?", query.agent_id),
        ("last_active_at_ns >= ?", None if query.since is None or saturated else _clamp(query.since.ns)),
        ("last_active_at_ns < ?", None if query.until is None or saturated else _clamp(query.until.ns)),
        ("total_tokens >= ?", None if query.min_tokens is None or saturated else _clamp(query.min_tokens)),
        ("parent_session_id = ?", query.parent_session_id),
    ):
        if value is not None:
            where.append(condition)
            params.append(value)
    loop_lookups: list[list[tuple[str, Sequence[Any]]]] = []
    if query.status is not None:
        loop_lookups.append([("status = ?", [query.status])])
    if query.model is not None:
        loop_lookups.append(_model_lookups(query.model))
    for lookups in loop_lookups:
        condition, loop_params = _loop_filter(lookups, limited=limited)
        where.append(condition)
        params += loop_params
    if saturated:  # in no order: `past_the_columns` sorts them
        return f"{_SUMMARY_SQL} WHERE {' AND '.join(where)}", params
    if query.after is not None:
        cursor = query.after
        column, beyond = _CURSOR_COLUMNS[cursor.column], "<" if cursor.descending else ">"
        where.append(f"({column} {beyond} ? OR ({column} = ? AND session_id > ?))")
        params += [_clamp(cursor.value), _clamp(cursor.value), cursor.session_id]
    sql = f"{_SUMMARY_SQL} WHERE {' AND '.join(where)} ORDER BY {_ORDER_SQL[query.order]}"
    if query.limit is not None:
        sql += " LIMIT ?"
        params.append(query.limit)
    return sql, params


# The UTC date of created_at: its canonical text up to the "T" (any year, as the other stores).
_DAY_SQL = "substr(created_at, 1, instr(created_at, 'T') - 1)"
_BY_SESSION_SQL = f"COUNT(*), SUM(loop_count), {_TOKEN_SUMS_SQL} FROM sessions"
_TOTALS_SQL: dict[str, str] = {
    "agent": f"SELECT agent_id AS key, {_BY_SESSION_SQL} GROUP BY key ORDER BY key",
    "day": f"SELECT {_DAY_SQL} AS key, {_BY_SESSION_SQL} GROUP BY key ORDER BY key",
    # A loop counts once in each model that served it (`loop_models`).
    "model": f"SELECT model AS key, COUNT(DISTINCT session_id), COUNT(*), {_TOKEN_SUMS_SQL} "
    "FROM loop_models GROUP BY key ORDER BY key",
}


# Each loop's `UsageRow` under its `_TOTALS_SQL` key.
_LOOP_TOKENS_SQL = ", ".join(f"l.{column}" for column in USAGE_COLUMNS)
_ROWS_FROM_SQL = (
    f"l.provider, l.model, l.calls, l.started_at_ns, {_LOOP_TOKENS_SQL} "
    "FROM loops l JOIN sessions s USING (session_id)"
)
_LOOP_MODEL_SQL = "COALESCE(l.provider || '/' || l.model, 'unknown')"
_ROWS_SQL: dict[str, str] = {
    "agent": f"SELECT s.agent_id, {_ROWS_FROM_SQL}",
    "day": f"SELECT substr(s.created_at, 1, instr(s.created_at, 'T') - 1), {_ROWS_FROM_SQL}",
    "model": f"SELECT {_LOOP_MODEL_SQL}, {_ROWS_FROM_SQL}",
}
_INSERT_LOOP_MODEL = (
    f"INSERT INTO loop_models (session_id, position, model, {', '.join(USAGE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (3 + len(USAGE_COLUMNS)))})"
)


def _loop_model_row(session_id: str, position: int, part: UsageRow) -> list[Any]:
    """The ``loop_models`` row of a loop's `part` (one of its `serving_rows`)."""
    return [session_id, position, part.key, *_token_columns(part.usage)]


def _usage_of(tokens: Sequence[int]) -> Usage:
    return Usage(**dict(zip(USAGE_FIELDS, tokens, strict=True)))


def _usage_by_key(session: Session, group_by: GroupBy) -> dict[str, tuple[int, Usage]]:
    """What `session` adds to each `usage_totals` key: loops and usage (as `_TOTALS_SQL`)."""
    if group_by == "agent":
        return {session.agent_id: (len(session.loops), session.billed_usage())}
    if group_by == "day":
        return {str(session.created_at).partition("T")[0]: (len(session.loops), session.billed_usage())}
    by_model: dict[str, tuple[int, Usage]] = {}
    for row in usage_rows(session, group_by):
        loops, usage = by_model.get(row.key, (0, ZERO_USAGE))
        by_model[row.key] = (loops + 1, usage + row.usage)
    return by_model


# -- The store -------------------------------------------------------------------------------


def _on_read_only_file_system(file: Path) -> bool:
    """Whether `file` lies on a file system mounted read-only (nothing can change it)."""
    if not hasattr(os, "statvfs"):  # Windows
        return False
    try:
        return bool(os.statvfs(file).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _is_another_users(file: Path) -> bool:
    """Whether `file` belongs to another user (never on Windows: no owners to tell)."""
    try:
        return hasattr(os, "geteuid") and file.stat().st_uid != os.geteuid()
    except OSError:
        return False


def _why_no_wal(file: Path) -> str | None:
    """Why this user may not make the -wal and -shm of `file`; None: it may.

    Beside another user's file it may not write, they would be left owned by this
    user, and that user's next write would fail ('attempt to write a readonly
    database'). Its own file made read-only (archived) is no such case."""
    if not os.access(file.parent, os.W_OK):
        return f"it may not write {file.parent}"
    if _is_another_users(file) and not os.access(file, os.W_OK):
        return "the file is another user's and this user may not write it: that user's writes would fail"
    return None


def _no_wal_for_this_user(file: Path, why: str) -> StoreError:
    return StoreError(
        f"{file}: cannot read it as this user: SQLite reads it beside its -wal and -shm files,"
        f" which are missing and which this user may not make ({why}); they exist while a writer"
        " has it open"
    )


def _reclaim_space(conn: sqlite3.Connection) -> None:
    """Give the database's free pages back to the file system (outside a transaction)."""
    # executescript() steps the pragma to completion; execute() frees one page.
    conn.executescript("PRAGMA incremental_vacuum")
    # Copy the shrunken database back from the WAL so that the file itself shrinks.
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


_MESSAGE_IDS_SQL = "SELECT message_ids FROM sessions WHERE session_id = ?"
_HEAD_SQL = "SELECT header, message_ids FROM sessions WHERE session_id = ?"


class _StoredRows(NamedTuple):
    """What is stored of one session: its header, message ids and loops' packed templates."""

    header: bytes
    message_ids: bytes
    records: list[bytes]


class _StoredPart(NamedTuple):
    """What a save reads of the stored session it merges into (`SqliteStore._read_for_merge`)."""

    session: Session
    """The header, and the records of the loops at `positions` only."""
    positions: list[int]
    """The loops the merge may change (`loops_a_merge_touches`), and those without an outline."""
    outlines: list[LoopOutline | None]
    """Every stored loop's (None: not stored; its record is read)."""
    templates: dict[int, bytes]
    """The templates of the loops at `positions`."""
    ids: list[int]
    """The stored message id of each message number (0: unassigned)."""
    book: MessageBook
    """Numbers messages as the stored session does: a loop saved again unchanged has the same template."""


# Connections inherited through fork(): SQLite must neither use nor close them in the
# child (closing runs its last-connection cleanup against the parent's live files),
# so the child keeps them referenced and untouched.
_FORKED_AWAY: list[sqlite3.Connection] = []


class _WalReaders:
    """A read-only store's open connections that it opened ``mode=rw`` (see
    `SqliteStore._open_read_only`): they made the -wal and -shm, and the last of them to
    close removes both. While one is open, the -wal there is theirs and the store opens
    its other connections the same way: one opened ``mode=ro`` on seeing it could, closing
    last, remove neither. `lock` is held from deciding a connection's mode to its first
    read, and while one of the store's connections closes (`close`)."""

    __slots__ = ("lock", "open")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[sqlite3.Connection] = set()

    def close(self, conn: sqlite3.Connection) -> None:
        """Close one of the store's connections (waits for another's opening, up to its first read)."""
        with self.lock:
            conn.close()
            self.open.discard(conn)


class _Connection:
    """One thread's connection, and the lock its user holds while using it.

    Only `release` closes it, and never while another thread is in the middle of
    using it: closing a connection under a running statement crashes SQLite. One
    released while in use is `abandoned`: its user closes it as that use ends.
    """

    __slots__ = ("abandoned", "closed", "conn", "file_id", "lock", "pid", "readers")

    def __init__(
        self, conn: sqlite3.Connection, readers: _WalReaders | None, file_id: tuple[int, int] | None
    ) -> None:
        self.conn = conn
        self.file_id = file_id  # the file it opened (`SqliteStore._file_id`); None: a read-only store's
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.closed = False
        self.abandoned = False
        self.readers = readers  # a read-only store's

    def release(self, *, wait: bool) -> None:
        """Close the connection once it is idle; with `wait` False, if another thread
        is using it, mark it `abandoned` for that thread to close (`SqliteStore._connected`)."""
        if not self.lock.acquire(blocking=wait):
            self.abandoned = True
            # Its user may have ended that use before seeing the mark: it is idle then.
            if not self.lock.acquire(blocking=False):
                return
        try:
            if self.closed:
                return
            self.closed = True
            if os.getpid() != self.pid:
                _FORKED_AWAY.append(self.conn)
            elif self.readers is None:
                self.conn.close()
            else:
                self.readers.close(self.conn)
        finally:
            self.lock.release()


class _Owner:
    """What a thread's local storage holds: when it goes (the thread ends, or `close`
    drops every thread's), its finalizer releases the connection."""

    __slots__ = ("__weakref__", "connection")

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection


def check_timeout(value: object) -> None:
    """`InvalidArgument` unless `value` is a lock wait SQLite keeps: 0 (none) up to
    `MOST_WAIT_SECONDS`. Beyond it (inf too), Python hands SQLite a C int that overflows
    and SQLite waits not at all; `TypeError` for a value that is no number."""
    check_seconds("timeout", value, maximum=MOST_WAIT_SECONDS)


class SqliteStore(AsyncTwins):
    """Sessions in one SQLite file; see the module docstring for layout and guarantees.

    `path` is created (with its parent directories) if missing. `timeout` bounds,
    in seconds, how long a write waits for another writer before `SessionLocked`:
    0 (not at all) up to 2147483.647 (2**31-1 ms, the longest SQLite waits); another
    value, inf too, raises `InvalidArgument` (`check_timeout`).
    Raises `StoreError` if the file is not a phi-session database or was written
    by a newer phi-session (schema version above `SCHEMA_VERSION`). A file removed
    while the store is open is made again at `path` by its next use: saves go to
    the file `path` names, never to the removed one.

    With `read_only`, the store only reads: `path` must exist, nothing is created,
    migrated or changed in it (a write raises `StoreError`), and it still sees what
    writers commit meanwhile, and closing it never checkpoints what a writer left in
    the WAL into the file. A file on a read-only file system is read as it is; one in
    a directory this user may not write, or another user's that this user may not
    write, is read while a writer has it open (SQLite reads it through the -wal and
    -shm files it then has beside it), else refused (`StoreError`). A file written by
    an earlier phi-session (an older schema) is read through a migrated copy in a
    temporary directory, taken when the store is opened: it does not see later writes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        synchronous: Synchronous = "NORMAL",
        read_only: bool = False,
    ) -> None:
        text = os.fspath(path)
        if text in ("", ":memory:") or text.startswith("file:"):
            raise StoreError(
                f"SqliteStore needs a file path, got {text!r}: every thread opens its own "
                "connection, so an in-memory database would not be shared (use a temporary file)"
            )
        if synchronous not in get_args(Synchronous):
            raise InvalidArgument(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        check_timeout(timeout)
        self.path = Path(text).absolute()
        self.timeout = timeout
        self.synchronous = synchronous
        self.read_only = read_only
        # What connections open: `path`, or the migrated copy a read-only store reads.
        self._file = self.path
        self._copy: tempfile.TemporaryDirectory[str] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[_Connection, weakref.finalize[Any, Any]]] = []
        self._readers = _WalReaders()
        if not read_only:
            self._make_directory()
        try:
            with self._connected("open") as conn:  # which migrates a writable store's file
                if read_only:
                    self._read_older_schema_from_a_copy(conn)
        finally:
            # Holding no connection until first use, a store opened before a fork() is
            # safe to use on both sides of it.
            self.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Connections and transactions ----------------------------------------------------------

    def _make_directory(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the directory of {self.path}: {error}") from error

    def _file_id(self) -> tuple[int, int] | None:
        """Which file `path` names now (device, inode); None: none."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def _own_connection(self) -> _Connection:
        """This thread's connection, opened (and configured) on first use or after a release.

        A writable store's connection is dropped once `path` no longer names the file it
        opened (removed, or replaced by another process's new store): it would go on
        writing into the unlinked file, every save lost. The next opens (and migrates)
        the file `path` names now, made again if missing. One stat per use, reads too:
        they then see what the writes do. Every new writable connection migrates its file
        (one query if done)."""
        owner: _Owner | None = getattr(self._local, "owner", None)
        if owner is not None and owner.connection.pid == os.getpid() and not owner.connection.closed:
            connection = owner.connection
            if connection.file_id is None or connection.file_id == self._file_id():
                return connection
            logger.warning("%s was removed or replaced while open: opening the file there now", self.path)
            connection.release(wait=True)
            # Should opening the file there fail, the next use opens it again (not this).
            self._local.owner = None
            self._make_directory()
        with self._lock:
            self._open = [(connection, release) for connection, release in self._open if release.alive]
            if any(connection.pid != os.getpid() for connection, _ in self._open):
                raise StoreError(
                    f"{self!r} had open SQLite connections when this process was forked, and SQLite "
                    "connections must not cross fork(): call close() before forking (the store "
                    "reconnects on its next use), or open the store in the child"
                )
        connection = (
            _Connection(self._connect(self._file, read_only=True), self._readers, None)
            if self.read_only
            else self._connect_to_the_file_at_path()
        )
        owner = _Owner(connection)
        # At interpreter exit the finalizer runs in the main thread while daemon threads
        # may still be saving: it must then close idle connections only (wait=False).
        release = weakref.finalize(owner, connection.release, wait=False)
        with self._lock:
            self._open.append((connection, release))
        self._local.owner = owner
        return connection

    def _connect_to_the_file_at_path(self) -> _Connection:
        """A writable connection, its file migrated, noting that file (`_file_id`): the one
        `path` named both before it connected and after its first reads. Another thread
        or process may remove the file, and make it again, meanwhile: one stat taken
        after connecting only would name no file (never checked then) or the new one,
        while the connection writes the unlinked file."""
        for _ in range(_OPEN_TRIES):
            before = self._file_id()
            conn = self._connect(self._file, read_only=False)
            try:
                # Whatever the file (made again, by this store or another), and whatever
                # became of an earlier opening (interrupted migrating it): one query if done.
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            after = self._file_id()
            if after is not None and after == before:
                return _Connection(conn, None, after)
            conn.close()
        # A file removed and made again at every try, or a file system whose inode numbers
        # do not stay: an error the caller (a saver) retries, not a loop without end.
        raise StoreError(f"{self.path}: the file kept changing while it was opened ({_OPEN_TRIES} tries)")

    def _connection_to(self, target: str | Path, *, uri: bool = False) -> sqlite3.Connection:
        # check_same_thread=False only so that `close` and the exit hook may close an
        # idle connection of another thread.
        return sqlite3.connect(
            target, timeout=self.timeout, isolation_level=None, check_same_thread=False, uri=uri
        )

    def _connect(self, file: Path, *, read_only: bool) -> sqlite3.Connection:
        """A configured connection to `file`; with `read_only`, one that writes nothing
        (`_open_read_only`)."""
        conn = self._open_read_only(file) if read_only else self._connection_to(file)
        try:
            if not read_only:
                # Before anything that writes (journal_mode changes the file's header):
                # a database of another application must be left exactly as it was.
                self._check_version(conn)
                # Lets `prune` give pages back. It takes effect only on a new, empty file,
                # and setting it writes the header even unchanged, which would make every
                # connection wait for another process's write (a big save), readers too.
                if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                # A no-op, taking no lock, on a file already in WAL mode.
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Checkpoints shrink the WAL back to this after a large transaction (or a prune).
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        except BaseException:
            if read_only:
                self._readers.close(conn)
            else:
                conn.close()
            raise
        return conn

    def _open_read_only(self, file: Path) -> sqlite3.Connection:
        """A connection to `file` that neither creates it (a store moved away while a
        reader runs stays away) nor writes it, its schema checked.

        SQLite reads a WAL database through its -wal and -shm files, creating them if
        missing; the last connection to close checkpoints the -wal into the file and
        removes both, but a read-only one (``mode=ro``) can do neither. So:

        * a connection of this store opened ``mode=rw`` (below) is open: the -wal there
          is theirs, ``mode=rw`` too, so that whichever closes last removes it
          (`_WalReaders`);
        * else, a -wal is there (a writer is at work, or was killed and left its commits
          in it): ``mode=ro``, which creates nothing here and never checkpoints, so
          closing never rewrites the file;
        * none (the file holds every commit), on a read-only file system: ``mode=ro``
          and ``immutable=1``: nothing can change the file, and no -wal can be made;
        * none, elsewhere: ``mode=rw`` (no create) with ``query_only``: it makes the
          -wal and -shm and, closing last, removes them, leaving nothing behind; what
          it may checkpoint then is only what writers committed while it was open,
          as their own close would have. Where this user may not create them (a
          directory it may not write), `StoreError`: ``immutable=1`` would be wrong
          as soon as a writer comes, which it could not tell. The same beside another
          user's file it may not write (in a shared directory): the -wal and -shm it
          made would, left behind owned by it, keep the file's owner from writing.
        """
        if not file.is_file():
            raise StoreError(f"no SQLite store at {file}")
        wal = file.with_name(f"{file.name}-wal")
        with self._readers.lock:
            if self._readers.open:
                mode = "rw"
            elif wal.exists():
                mode = "ro"
            elif _on_read_only_file_system(file):
                mode = "ro&immutable=1"
            elif (why := _why_no_wal(file)) is None:
                mode = "rw"
            else:
                raise _no_wal_for_this_user(file, why)
            conn = self._connection_to(f"{file.as_uri()}?mode={mode}", uri=True)
            try:
                self._check_version(conn)  # its first read, which opens the WAL
                conn.execute("PRAGMA query_only = ON")
            except sqlite3.Error as error:
                conn.close()
                if not wal.exists() and (why := _why_no_wal(file)) is not None:
                    raise _no_wal_for_this_user(file, why) from error
                raise
            except BaseException:
                conn.close()
                raise
            if mode == "rw":
                self._readers.open.add(conn)
        return conn

    def _read_older_schema_from_a_copy(self, conn: sqlite3.Connection) -> None:
        """A read-only store of an older schema: point the connections at a copy of the
        file (`conn`'s snapshot) migrated in a temporary directory, the file left as it is."""
        version = self._check_version(conn)
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            raise StoreError(f"no SQLite store at {self.path}: the file holds no phi-session tables")
        self._copy = tempfile.TemporaryDirectory(prefix="phi-session-")
        copy = Path(self._copy.name) / self.path.name
        with closing(self._connect(copy, read_only=False)) as target:
            conn.backup(target)
            self._migrate(target)
        self._file = copy
        logger.warning(
            "%s has schema version %d, older than this phi-session's (%d): reading a migrated copy "
            "of it, left as it is (the first save into it upgrades it)",
            self.path,
            version,
            SCHEMA_VERSION,
        )

    @contextmanager
    def _connected(self, action: str, session_id: str | None = None) -> Iterator[sqlite3.Connection]:
        """This thread's connection, held for the block; sqlite3 errors are translated (`_errors`)."""
        with self._errors(action, session_id):
            while True:
                connection = self._own_connection()
                try:
                    with connection.lock:
                        if not connection.closed:  # else released meanwhile: open another
                            yield connection.conn
                            return
                finally:
                    if connection.abandoned:  # its owner dropped meanwhile (`close`): none else closes it
                        connection.release(wait=False)

    @contextmanager
    def _errors(self, action: str, session_id: str | None = None) -> Iterator[None]:
        """Translate sqlite3 errors into phi-session errors naming the file and the action."""
        try:
            yield
        except sqlite3.Error as error:
            what = f"{action} {session_id!r}" if session_id is not None else action
            if _is_busy(error):
                raise SessionLocked(
                    f"{self.path}: {what}: the database stayed locked by another writer "
                    f"for more than {self.timeout} s"
                ) from error
            if _primary_code(error) == _SQLITE_FULL:
                raise StoreError(
                    f"{self.path}: {what}: disk or database full ({error}); "
                    "nothing of this operation was written"
                ) from error
            raise StoreError(f"{self.path}: {what} failed: {error}") from error

    @contextmanager
    def _transaction(
        self, action: str, session_id: str | None = None, *, write: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """One transaction; a write one takes the write lock up front (no upgrade deadlocks)."""
        with self._connected(action, session_id) as conn:
            # BEGIN inside the try: an interrupt (Ctrl-C) landing as it returns must not
            # leave the write lock held and every later BEGIN refused.
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    conn.rollback()
                raise
            conn.execute("COMMIT")

    def _begin_migration(self, conn: sqlite3.Connection) -> bool:
        """Take the write lock to migrate; False if another process migrated meanwhile.
        While another holds the lock and the schema is still old, it is most likely
        migrating (a long rewrite): a store opened then (a worker started during an
        upgrade) waits for it, up to `_MIGRATION_WAIT`, rather than fail after `timeout`."""
        deadline = time.monotonic() + _MIGRATION_WAIT
        logged = False
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as error:
                if not _is_busy(error) or time.monotonic() >= deadline:
                    raise
            if self._check_version(conn) == SCHEMA_VERSION:
                return False
            if not logged:
                logged = True
                logger.warning(
                    "%s: another process holds it at an older schema, likely migrating it: "
                    "waiting for it (up to %d s)",
                    self.path,
                    _MIGRATION_WAIT,
                )
            time.sleep(0.05)  # a store with no lock wait (timeout 0) must not spin

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = self._check_version(conn)
        if version == SCHEMA_VERSION:
            return
        try:
            if not self._begin_migration(conn):
                return
            version = self._check_version(conn)  # another process may have migrated meanwhile
            for migration in MIGRATIONS[version:]:
                migration(conn)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        conn.execute("COMMIT")
        if version:  # rewritten records (v6) leave pages free
            _reclaim_space(conn)

    def _check_version(self, conn: sqlite3.Connection) -> int:
        # One statement, one snapshot: another process may be creating the schema meanwhile.
        application_id, version, has_tables = conn.execute(
            "SELECT (SELECT application_id FROM pragma_application_id()), "
            "(SELECT user_version FROM pragma_user_version()), EXISTS (SELECT 1 FROM sqlite_master)"
        ).fetchone()
        if application_id == 0 and version == 0:
            if has_tables:
                raise StoreError(
                    f"{self.path} is an SQLite database of another application "
                    "(it has tables but no phi-session schema); refusing to use it"
                )
            return 0
        if application_id != APPLICATION_ID:
            raise StoreError(
                f"{self.path} is not a phi-session database (application_id {application_id:#x})"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this phi-session "
                f"understands ({SCHEMA_VERSION}); upgrade phi-session to open it"
            )
        return int(version)

    def schema_version(self) -> int:
        """The schema version stored in the file (``PRAGMA user_version``)."""
        with self._connected("read the schema version") as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the connections of every thread. Idempotent; the store stays usable and
        reconnects on its next use. A connection another thread is using is closed as
        soon as that use ends (`close` waits for it)."""
        with self._lock:
            releases, self._open = self._open, []
        for connection, release in releases:
            release.detach()
            connection.release(wait=True)
        self._local = threading.local()

    # -- Reading -----------------------------------------------------------------------------

    @staticmethod
    def _read_rows(conn: sqlite3.Connection, session_id: str) -> _StoredRows | None:
        """The stored rows of `session_id`, or None."""
        row = conn.execute(_HEAD_SQL, (session_id,)).fetchone()
        if row is None:
            return None
        records = conn.execute(
            "SELECT record FROM loops WHERE session_id = ? ORDER BY position", (session_id,)
        ).fetchall()
        return _StoredRows(row[0], row[1], [record for (record,) in records])

    @contextmanager
    def _reading(self, session_id: str) -> Iterator[None]:
        """Stored bytes that do not decode: `StoredSessionUnusable` naming the session."""
        try:
            yield
        except (DecodeError, msgspec.DecodeError) as error:
            raise StoredSessionUnusable(
                f"{self.path}: stored session {session_id!r} is corrupt: {error}"
            ) from error

    def _expand(
        self,
        conn: sqlite3.Connection,
        session_id: str,
        message_ids: bytes,
        blobs: Sequence[bytes],
        *,
        every_loop: bool = False,
    ) -> list[bytes]:
        """The compact JSON of the loops stored as `blobs`, read with the messages they use
        (with `every_loop`, the blobs are all the session's loops: all its messages)."""
        with self._reading(session_id):
            ids = _unpack_ids(message_ids)
            templates = [unpack(blob) for blob in blobs]
            if not every_loop:
                used = set().union(*map(numbers_in, templates))
                ids = [message_id if n in used else 0 for n, message_id in enumerate(ids)]
            rows = _message_rows(conn, ids)
            bodies = [row[1] if row is not None else None for row in map(rows.get, ids)]
            return [expand(template, bodies) for template in templates]

    def _decode(self, session_id: str, header: bytes, records: Sequence[bytes]) -> Session:
        # Our own encoder wrote these bytes: the strict re-scan that matches phi-core on
        # hand-written input would only cost time, and would alter what a lenient decode
        # kept (integers beyond 64 bits), which must come back as it went in.
        with self._reading(session_id):
            session = decode_session(header, strict=False)
            session.loops = [decode_loop(record, strict=False) for record in records]
        return session

    def _read_session(self, conn: sqlite3.Connection, session_id: str) -> Session:
        """`session_id` as stored; `SessionNotFound`, or `StoreError` if it does not decode."""
        rows = self._read_rows(conn, session_id)
        if rows is None:
            raise SessionNotFound(f"no session {session_id!r} in {self.path}")
        records = self._expand(conn, session_id, rows.message_ids, rows.records, every_loop=True)
        return self._decode(session_id, rows.header, records)

    def load(self, session_id: str) -> Session:
        validate_session_id(session_id)
        with self._transaction("load", session_id) as conn:
            return self._read_session(conn, session_id)

    def load_outline(self, session_id: str) -> SessionOutline:
        """See `SessionStore.load_outline`. Reads the stored outlines, never a whole record
        (but of a loop whose outline is missing: one that did not decode when migrated)."""
        validate_session_id(session_id)
        with self._transaction("load outline", session_id) as conn:
            row = conn.execute(_HEAD_SQL, (session_id,)).fetchone()
            if row is None:
                raise SessionNotFound(f"no session {session_id!r} in {self.path}")
            loops = conn.execute(
                "SELECT outline, CASE WHEN outline IS NULL THEN record END FROM loops "
                "WHERE session_id = ? ORDER BY position",
                (session_id,),
            ).fetchall()
            blobs = [record for outline, record in loops if outline is None]
            records = iter(self._expand(conn, session_id, row[1], blobs) if blobs else ())
        with self._reading(session_id):
            header = decode_session(row[0], strict=False)
            outlines = [
                decode_loop_outline(outline)
                if outline is not None
                else loop_outline(decode_loop(next(records), strict=False))
                for outline, _ in loops
            ]
        return session_outline(header, outlines)

    def load_loops(self, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        """See `SessionStore.load_loops`. Reads those loops' records only."""
        validate_session_id(session_id)
        check_loop_range(start, stop)
        with self._transaction("load loops", session_id) as conn:
            row = conn.execute(_MESSAGE_IDS_SQL, (session_id,)).fetchone()
            if row is None:
                raise SessionNotFound(f"no session {session_id!r} in {self.path}")
            rows = conn.execute(
                "SELECT record FROM loops WHERE session_id = ? ORDER BY position LIMIT ? OFFSET ?",
                (session_id, _clamp(max(0, stop - start)), _clamp(start)),
            ).fetchall()
            records = self._expand(conn, session_id, row[0], [record for (record,) in rows])
        with self._reading(session_id):
            return [decode_loop(record, strict=False) for record in records]

    def loop_starts(self, session_id: str, start: int) -> list[tuple[str, int]]:
        """See `LoopStarts.loop_starts`. One range of the loops' index, and the session's
        row when that range is empty."""
        validate_session_id(session_id)
        check_loop_range(start, start)
        with self._transaction("read loop starts", session_id) as conn:
            rows = conn.execute(
                "SELECT loop_id, started_at_ns FROM loops WHERE session_id = ? AND position >= ? "
                "ORDER BY position",
                (session_id, _clamp(start)),
            ).fetchall()
            if not rows and conn.execute(_MESSAGE_IDS_SQL, (session_id,)).fetchone() is None:
                raise SessionNotFound(f"no session {session_id!r} in {self.path}")
        return [(loop_id, started) for loop_id, started in rows]

    def list_ids(self) -> list[str]:
        """Every stored session id, most recently saved first."""
        with self._connected("list sessions") as conn:
            rows = conn.execute(f"SELECT session_id FROM sessions ORDER BY {_SAVED_ORDER_SQL}").fetchall()
        return [session_id for (session_id,) in rows]

    def list_for_agent(self, agent_id: str) -> list[Session]:
        """The sessions of `agent_id`, most recently saved first, read in one snapshot.

        A stored session that does not decode is skipped with a logged warning.
        """
        check_type("agent_id", agent_id, str)
        check_text("agent_id", agent_id)
        sessions: list[Session] = []
        with self._transaction("list sessions of agent", agent_id) as conn:
            ids = conn.execute(
                f"SELECT session_id FROM sessions WHERE agent_id = ? ORDER BY {_SAVED_ORDER_SQL}",
                (agent_id,),
            ).fetchall()
            for (session_id,) in ids:
                try:
                    sessions.append(self._read_session(conn, session_id))
                except StoreError as error:
                    logger.warning("skipping unreadable session %r: %s", session_id, error)
        return sessions

    # -- Writing -------------------------------------------------------------------------------

    def save(self, session: Session) -> None:
        """Store `session`, merged with what is stored under its id (`merge_sessions`).

        One ``BEGIN IMMEDIATE`` transaction: concurrent saves of one id serialize and
        none loses a loop; a failure (disk full, lock timeout) leaves the stored
        session as it was. Loop rows whose record did not change are not rewritten.
        """
        save_as_written([session], self._write)

    def save_many(self, sessions: Sequence[Session]) -> None:
        """`save` each of `sessions`, in order, in one transaction: all are saved or none.

        A writer with many sessions to save commits once for them all (the pages they
        share, such as the indexes' and the message table's, are written once).
        """
        if sessions:
            save_as_written(list(sessions), self._write)

    def _write(self, sessions: Sequence[Session]) -> None:
        ids = [session.session_id for session in sessions]
        (action, what) = (
            ("save", f"save session {ids[0]!r}") if len(ids) == 1 else (f"save {len(ids)} sessions",) * 2
        )
        check_writable(self, what)
        with self._transaction(action, ", ".join(ids[:3]), write=True) as conn:
            text_rows: list[tuple[str, int, str]] = []
            for session_id, session in zip(ids, sessions, strict=True):
                text_rows += self._save_in(conn, session_id, session)
            _index_loop_texts(conn, text_rows)

    def _save_in(
        self, conn: sqlite3.Connection, session_id: str, session: Session
    ) -> list[tuple[str, int, str]]:
        """`save`, inside the writing transaction `conn` is in, but for the ``loop_text``
        rows of the loops written, which it returns (`_index_loop_texts`).

        Only the stored loops the merge may change are read whole (`loops_a_merge_touches`):
        a conversation saved loop by loop costs what each loop touches, not the whole
        session again. The others are known by their outlines (the session's summary)."""
        stored = self._read_for_merge(conn, session_id, session)
        book = stored.book if stored is not None else MessageBook()
        ids = stored.ids if stored is not None else []
        if stored is None:
            pairs, outlines = list(enumerate(session.loops)), []
        else:
            session, pairs = merge_part(stored.session, stored.positions, len(stored.outlines), session)
            outlines = list(stored.outlines)
        total = max(len(outlines), pairs[-1][0] + 1) if pairs else len(outlines)
        outlines += [None] * (total - len(outlines))
        kept = {} if stored is None else dict(zip(stored.positions, stored.session.loops, strict=True))
        replaced: list[int] = []  # stored loops rewritten: the messages they used may be used no more
        used: set[int] = set()  # the message numbers of the loops written or read whole
        loop_rows: list[list[Any]] = []
        model_rows: list[list[Any]] = []
        text_rows: list[tuple[str, int, str]] = []
        for position, record in pairs:
            stored_template = None if stored is None else stored.templates.get(position)
            if record is kept.get(position):  # the stored version won the merge
                if stored_template is not None:
                    used |= numbers_in(stored_template)
                if outlines[position] is None:
                    outlines[position] = loop_outline(record)
                continue
            template, numbers = book.template(record)
            used |= numbers
            outline = outlines[position] = loop_outline(record)
            if template == stored_template:
                continue
            if stored_template is not None:
                replaced.append(position)
            loop_rows.append(
                [session_id, position, *_loop_row(record), pack(template), *encode_outline_parts(outline)]
            )
            model_rows += (
                _loop_model_row(session_id, position, part) for part in outline_model_rows(outline)
            )
            text_rows.append((session_id, position, _indexed_text(loop_text(record))))
        ids = _register_messages(conn, book, ids)
        if stored is not None and replaced:
            # The numbers only replaced versions used, unless a loop not read whole uses them too.
            freed = set().union(*(numbers_in(stored.templates[p]) for p in replaced)) - used
            if freed:
                freed -= self._numbers_used_elsewhere(conn, session_id, {p for p, _ in pairs}, freed)
            if freed:  # the numbers stay, unassigned
                _release_messages(conn, [ids[n] for n in freed if ids[n]])
                for n in freed:
                    ids[n] = 0
        summary = summarize_outline(session_outline(session, cast(list[LoopOutline], outlines)))
        conn.execute(_UPSERT_SESSION, _session_row(session, summary, ids))
        conn.executemany(_UPSERT_LOOP, loop_rows)
        # An upsert keeps the loop row: the models of the version it replaced go with it.
        conn.executemany(
            "DELETE FROM loop_models WHERE session_id = ? AND position = ?", [row[:2] for row in loop_rows]
        )
        conn.executemany(_INSERT_LOOP_MODEL, model_rows)
        return text_rows

    def _read_for_merge(
        self, conn: sqlite3.Connection, session_id: str, incoming: Session
    ) -> _StoredPart | None:
        """What merging `incoming` into the stored `session_id` reads, or None (not stored).
        A corrupt one is never overwritten: reading it raises."""
        row = conn.execute(_HEAD_SQL, (session_id,)).fetchone()
        if row is None:
            return None
        loops = conn.execute(
            "SELECT loop_id, outline FROM loops WHERE session_id = ? ORDER BY position", (session_id,)
        ).fetchall()
        with self._reading(session_id):
            outlines = [None if outline is None else decode_loop_outline(outline) for _, outline in loops]
            family = [
                (loop_id, None if outline is None else outline.parent_loop_id)
                for (loop_id, _), outline in zip(loops, outlines, strict=True)
            ]
            wanted = set(loops_a_merge_touches(family, incoming))
            wanted.update(position for position, outline in enumerate(outlines) if outline is None)
            positions = sorted(wanted)
            blobs = self._templates(conn, session_id, positions)
            templates = dict(zip(positions, map(unpack, blobs), strict=True))
            ids = _unpack_ids(row[1])
            numbers = set().union(*map(numbers_in, templates.values()))
            bodies = _message_rows(conn, [ids[n] for n in numbers if n < len(ids)])
            found = [bodies.get(message_id) for message_id in ids]
            texts = [None if m is None else m[1] for m in found]
            records = [expand(templates[position], texts) for position in positions]
            # The book numbers every message: the digests of those not read with a body.
            digests = {message_id: row[0] for message_id, row in bodies.items()}
            digests.update(_message_digests(conn, (m for m in ids if m not in digests)))
        header = self._decode(session_id, row[0], records)
        book = MessageBook(digests.get(message_id) for message_id in ids)
        return _StoredPart(header, positions, outlines, templates, ids, book)

    @staticmethod
    def _templates(conn: sqlite3.Connection, session_id: str, positions: Sequence[int]) -> list[bytes]:
        """The packed templates of the loops at `positions` (sorted), in that order."""
        blobs: list[bytes] = []
        for chunk, marks in _in_chunks(list(positions)):
            sql = f"SELECT record FROM loops WHERE session_id = ? AND position IN ({marks}) ORDER BY position"
            blobs += [blob for (blob,) in conn.execute(sql, (session_id, *chunk))]
        return blobs

    def _numbers_used_elsewhere(
        self, conn: sqlite3.Connection, session_id: str, read: set[int], numbers: set[int]
    ) -> set[int]:
        """Which of `numbers` a stored loop other than those at positions `read` refers to."""
        found: set[int] = set()
        rows = conn.execute("SELECT position, record FROM loops WHERE session_id = ?", (session_id,))
        with self._reading(session_id):
            for position, blob in rows:
                if position not in read:
                    found |= numbers & numbers_in(unpack(blob))
        return found

    def delete(self, session_id: str) -> None:
        validate_session_id(session_id)
        check_writable(self, f"delete session {session_id!r}")
        with self._transaction("delete", session_id, write=True) as conn:
            row = conn.execute(_MESSAGE_IDS_SQL, (session_id,)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
                _release_sessions(conn, [row[0]])
        if row is None:
            raise SessionNotFound(f"no session {session_id!r} in {self.path}")

    def prune(self, criteria: PruneCriteria) -> int:
        """Delete the whole sessions `criteria` selects; return how many.

        The freed pages are then given back to the file system: ``PRAGMA
        incremental_vacuum`` after the deleting transaction, which moves only what is
        needed to truncate the file (a full ``VACUUM`` would rewrite the whole
        database on every prune).
        """
        check_type("criteria", criteria, PruneCriteria)
        check_writable(self, "prune")
        agent_id, keep_last, older_than = criteria.agent_id, criteria.keep_last, criteria.older_than
        scope = "agent_id = ?" if agent_id is not None else "1"
        scope_params: list[Any] = [agent_id] if agent_id is not None else []
        conditions, params = [scope], list(scope_params)
        if older_than is not None:
            conditions.append("last_active_at_ns < ?")
            params.append(_clamp(older_than.ns))
        if keep_last is not None:
            conditions.append(
                f"session_id NOT IN (SELECT session_id FROM sessions WHERE {scope} "
                f"ORDER BY {_ORDER_SQL['newest']} LIMIT ?)"
            )
            params += [*scope_params, keep_last]
        where = " AND ".join(conditions)
        with self._transaction("prune", write=True) as conn:
            doomed = conn.execute(f"SELECT message_ids FROM sessions WHERE {where}", params).fetchall()
            deleted: int = conn.execute(f"DELETE FROM sessions WHERE {where}", params).rowcount
            _release_sessions(conn, [blob for (blob,) in doomed])
        if deleted:
            # Best effort: the sessions are gone, which the caller must learn; a writer
            # holding the lock meanwhile only leaves the pages free until the next prune.
            try:
                with self._connected("reclaim space after prune") as conn:
                    _reclaim_space(conn)
            except StoreError as error:  # SessionLocked too
                logger.warning("pruned %d sessions, but could not reclaim their space: %s", deleted, error)
        return deleted

    # -- Queries ---------------------------------------------------------------------------

    def query(self, query: SessionQuery | None = None) -> list[SessionSummary]:
        """Summaries of the sessions `query` selects (see `SessionQuery`), from the indexed columns only."""
        query = as_query(query)
        with self._transaction("query") as conn:
            first = self._summaries(conn, *_select_summaries(query))
            past = []
            if conn.execute(_ANY_SATURATED_SQL, _SATURATED).fetchone() is not None:
                past = self._summaries(conn, *_select_summaries(query, saturated=True))
        return past_the_columns(query, past, first)

    def _summaries(self, conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[SessionSummary]:
        """The summaries of the `_SUMMARY_SQL` rows `sql` selects (an inexact one's from its session)."""
        return [
            _summary_from_row(row) if row[-1] else summarize(self._read_session(conn, row[0]))
            for row in conn.execute(sql, params).fetchall()
        ]

    def search(
        self, text: str, query: SessionQuery | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[SearchHit]:
        """See `SessionStore.search`. The FTS5 index picks the sessions with a loop holding
        every word; only those are read, to find and cut the matching texts."""
        words = search_words(text, limit)
        if not words or not limit:
            return []
        match = " AND ".join('"' + word.replace('"', '""') + '"' for word in words)
        with self._connected("search") as conn:
            candidates = {
                session_id
                for (session_id,) in conn.execute(
                    "SELECT DISTINCT t.session_id FROM loop_text_fts JOIN loop_text AS t "
                    "ON t.rowid = loop_text_fts.rowid WHERE loop_text_fts MATCH ?",
                    (match,),
                )
            }
        return collect_hits(self, words, query, limit, candidates)

    def explain_query(self, query: SessionQuery | None = None) -> str:
        """SQLite's ``EXPLAIN QUERY PLAN`` of `query`, one step a line."""
        sql, params = _select_summaries(as_query(query))
        with self._connected("explain query") as conn:
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
        return "\n".join(str(row[-1]) for row in rows)

    def usage_totals(self, group_by: GroupBy = "agent", *, pricer: Pricer | None = None) -> list[UsageTotal]:
        """Usage per agent, per ``provider/model`` that served the calls (``"unknown"``:
        loops without a config) or per UTC day of the sessions' creation (``YYYY-MM-DD``),
        sorted by key; see `SessionStore.usage_totals`. One SQL aggregate over the summary
        columns (by model, ``loop_models``); with a `pricer`, the loops' rows are read too
        (one snapshot, by model split by `serving_rows`) and priced."""
        group_by = parse_group_by(group_by)
        check_pricer(pricer)
        rows: list[UsageRow] = []
        with self._transaction("usage totals") as conn:
            if conn.execute("SELECT 1 FROM sessions WHERE NOT exact LIMIT 1").fetchone() is not None:
                totals = self._usage_totals_from_records(conn, group_by, rows if pricer is not None else None)
            else:
                totals = [
                    UsageTotal(
                        key=key,
                        sessions=sessions,
                        loops=loops,
                        usage=_usage_of(tokens),
                    )
                    for key, sessions, loops, *tokens in conn.execute(_TOTALS_SQL[group_by]).fetchall()
                ]
                if pricer is not None:
                    rows = totalled_rows(
                        (
                            stored_usage_row(
                                key, provider, model, calls, Timestamp.from_ns(started), _usage_of(tokens)
                            )
                            for key, provider, model, calls, started, *tokens in conn.execute(
                                _ROWS_SQL[group_by]
                            )
                        ),
                        group_by,
                    )
        return totals if pricer is None else pricer.price_totals(totals, rows)

    def _usage_totals_from_records(
        self, conn: sqlite3.Connection, group_by: GroupBy, rows: list[UsageRow] | None
    ) -> list[UsageTotal]:
        """`usage_totals` computed from the records, for when some numbers overflow the
        columns; the loops' `UsageRow` are added to `rows` unless it is None."""
        totals: dict[str, tuple[int, int, Usage]] = {}
        for (session_id,) in conn.execute("SELECT session_id FROM sessions").fetchall():
            session = self._read_session(conn, session_id)
            for key, (loops, usage) in _usage_by_key(session, group_by).items():
                sessions, total_loops, total = totals.get(key, (0, 0, ZERO_USAGE))
                totals[key] = (sessions + 1, total_loops + loops, total + usage)
            if rows is not None:
                rows.extend(usage_rows(session, group_by))
        return [
            UsageTotal(key=key, sessions=sessions, loops=loops, usage=usage)
            for key, (sessions, loops, usage) in sorted(totals.items())
        ]
