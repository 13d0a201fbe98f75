"""`PostgresStore`: sessions in a PostgreSQL database, shared by many processes and machines.

Install with ``pip install 'phi-session[postgres]'`` (psycopg 3). psycopg is imported
only when a store is opened, so ``import phi_session`` never needs it.

Layout (all tables live in one schema, ``phi_session`` by default):

* ``meta``: ``schema_version`` and future settings. Opening a store applies the
  missing forward migrations in one transaction under a transaction-level advisory
  lock, so processes starting together never race; a database written by a newer
  phi-session is refused with `StoreError`.
* ``sessions``: one row per session: the filterable summary columns (agent, times
  as BIGINT nanoseconds, formation, parent, per-status loop counts, token sums,
  models) and ``header``, the session's compact JSON without its loops.
* ``loops``: one row per LoopRecord, in session order (``position``): the columns
  the queries group by and ``record``, the loop's compact phi-core JSON
  (`codec.encode_loop`). Rows go with their session (``ON DELETE CASCADE``).

Header and records are stored as the exact bytes phi-session writes (BYTEA, not
JSONB, which would reorder keys), so ``encode_session(load(id))`` equals
``encode_session(saved)`` byte for byte.

Concurrency: `save` locks the session row (``SELECT … FOR UPDATE``; a new session
is inserted with ``ON CONFLICT DO NOTHING`` and re-read if another writer won),
reads the stored loops, merges with `merge_sessions` and writes back only what
changed, all in one transaction. Saves of one session therefore serialize across
threads, processes and machines and never lose a loop. A wait for a row lock
longer than ``lock_timeout`` raises `SessionLocked`.

Connections: a small built-in pool (``pool_size`` connections, opened on demand,
each in autocommit mode with explicit transactions). A connection found broken is
dropped and the next call opens a new one; the failed call itself raises
`StoreError` (it is not retried, since it may have committed).

Async twins run the sync methods in a worker thread (`AsyncTwins`): one code path,
one set of transaction rules; at most ``pool_size`` of them use the database at once.

Times in the index columns are clamped to what BIGINT nanoseconds can hold
(1677-09-21 to 2262-04-11); the stored JSON keeps the exact instants.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, get_args

import msgspec

from .._time import Timestamp
from ..codec import decode_loop, decode_session, encode_loop, encode_session
from ..errors import SessionLocked, SessionNotFound, StoreError
from ..messages import Usage
from ..model import LoopRecord, LoopStatus, Session
from .base import (
    AsyncTwins,
    GroupBy,
    Order,
    SessionSummary,
    UsageTotal,
    merge_sessions,
    summarize,
    validate_session_id,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

SCHEMA_VERSION = 1
"""The schema version this code writes; `PostgresStore` migrates older databases to it."""

_STATUSES: tuple[str, ...] = get_args(LoopStatus)
_STATUS_COLUMNS = {status: f"loops_{status.lower()}" for status in _STATUSES}
_USAGE_FIELDS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")
_USAGE_COLUMNS = ("input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens",
                  "cache_write_tokens", "total_tokens")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Advisory-lock class id ("ph") of schema migrations; the object id is hashtext(schema).
_MIGRATION_LOCK_CLASS = 0x7068
# Migrations may rewrite tables, so other processes wait for them longer than for a session.
_MIGRATION_LOCK_TIMEOUT = 60.0
# A save retries when its session vanished (deleted) between its insert attempt and its lock.
_SAVE_ATTEMPTS = 8

# Forward migrations: _MIGRATIONS[n] takes the schema from version n to n + 1.
# "{s}" is the schema, quoted. Never edit a released entry; append a new one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {{s}}.sessions (
            session_id TEXT PRIMARY KEY,
            agent_id TEXT NOT NULL,
            created_at_ns BIGINT NOT NULL,
            last_active_at_ns BIGINT NOT NULL,
            formation TEXT NOT NULL,
            parent_session_id TEXT,
            rejected BOOLEAN NOT NULL,
            loop_count INTEGER NOT NULL,
            turn_count BIGINT NOT NULL,
            {", ".join(f"{c} INTEGER NOT NULL" for c in _STATUS_COLUMNS.values())},
            {", ".join(f"{c} NUMERIC NOT NULL" for c in _USAGE_COLUMNS)},
            models TEXT[] NOT NULL,
            model_keys TEXT[] NOT NULL,
            header BYTEA NOT NULL
        )""",
        "CREATE INDEX sessions_agent_active ON {s}.sessions (agent_id, last_active_at_ns DESC)",
        "CREATE INDEX sessions_active ON {s}.sessions (last_active_at_ns DESC)",
        "CREATE INDEX sessions_tokens ON {s}.sessions (total_tokens DESC)",
        "CREATE INDEX sessions_parent ON {s}.sessions (parent_session_id)"
        " WHERE parent_session_id IS NOT NULL",
        "CREATE INDEX sessions_model_keys ON {s}.sessions USING GIN (model_keys)",
        # Completed is the common status (an index would not help); the others are rare.
        *(
            f"CREATE INDEX sessions_with_{status.lower()} ON {{s}}.sessions (last_active_at_ns DESC)"
            f" WHERE {column} > 0"
            for status, column in _STATUS_COLUMNS.items() if status != "Completed"
        ),
        f"""CREATE TABLE {{s}}.loops (
            session_id TEXT NOT NULL REFERENCES {{s}}.sessions (session_id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            loop_id TEXT NOT NULL,
            occurrence INTEGER NOT NULL,
            status TEXT NOT NULL,
            started_at_ns BIGINT NOT NULL,
            started_day TEXT NOT NULL,
            provider TEXT,
            model TEXT,
            turn_count INTEGER NOT NULL,
            {", ".join(f"{c} NUMERIC NOT NULL" for c in _USAGE_COLUMNS)},
            record BYTEA NOT NULL,
            PRIMARY KEY (session_id, position),
            UNIQUE (session_id, loop_id, occurrence)
        )""",
        "CREATE INDEX loops_loop_id ON {s}.loops (loop_id)",
        "CREATE INDEX loops_model ON {s}.loops (provider, model)",
        "CREATE INDEX loops_day ON {s}.loops (started_day)",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_SESSION_COLUMNS = (
    "agent_id", "created_at_ns", "last_active_at_ns", "formation", "parent_session_id",
    "rejected", "loop_count", "turn_count", *_STATUS_COLUMNS.values(), *_USAGE_COLUMNS,
    "models", "model_keys", "header",
)
_LOOP_COLUMNS = (
    "loop_id", "occurrence", "status", "started_at_ns", "started_day", "provider", "model",
    "turn_count", *_USAGE_COLUMNS, "record",
)
_ORDER_BY = {
    "newest": "last_active_at_ns DESC, session_id",
    "oldest": "last_active_at_ns ASC, session_id",
    "tokens": "total_tokens DESC, last_active_at_ns DESC, session_id",
}
_GROUP_KEY = {
    "agent": "s.agent_id",
    "model": "l.provider || '/' || l.model",
    "day": "l.started_day",
}


class _Times(msgspec.Struct):
    """The two header fields a listing needs, read without decoding the whole header."""

    created_at: str
    last_active_at: str


_times_decoder = msgspec.json.Decoder(_Times)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "PostgresStore needs psycopg 3: pip install 'phi-session[postgres]'"
        ) from None
    return psycopg


def _clamped_ns(ts: Timestamp) -> int:
    return min(max(ts.ns, _I64_MIN), _I64_MAX)


def _day(ts: Timestamp) -> str:
    return str(ts).split("T", 1)[0]


def _usage_values(usage: Usage) -> tuple[int, ...]:
    return tuple(getattr(usage, name) for name in _USAGE_FIELDS)


def _header(session: Session) -> bytes:
    return encode_session(msgspec.structs.replace(session, loops=[]), pretty=False)


def _session_values(session: Session) -> tuple[Any, ...]:
    """The ``sessions`` row of `session`, in `_SESSION_COLUMNS` order."""
    summary = summarize(session)
    bare = {record.config.model: None for record in session.loops if record.config is not None}
    return (
        session.agent_id, _clamped_ns(session.created_at), _clamped_ns(session.last_active_at),
        summary.formation, summary.parent_session_id, summary.rejected, summary.loop_count,
        summary.turn_count, *(summary.loops_by_status.get(s, 0) for s in _STATUSES),
        *_usage_values(summary.usage), list(summary.models), list({**dict.fromkeys(summary.models), **bare}),
        _header(session),
    )


def _loop_values(record: LoopRecord, occurrence: int, data: bytes) -> tuple[Any, ...]:
    """The ``loops`` row of `record` (encoded as `data`), in `_LOOP_COLUMNS` order."""
    config = record.config
    return (
        record.loop_id, occurrence, record.status, _clamped_ns(record.started_at), _day(record.started_at),
        config.provider if config is not None else None, config.model if config is not None else None,
        len(record.turns), *_usage_values(record.usage), data,
    )


def _describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, never its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # its message may quote the DSN, password included
        return "<unparsable DSN>"
    user = params.get("user")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port")
    dbname = params.get("dbname") or "default database"
    return f"{f'{user}@' if user else ''}{host}{f':{port}' if port else ''}/{dbname}"


class _Pool:
    """At most `size` connections, opened on demand and reused; broken ones are dropped."""

    def __init__(self, connect: Any, size: int) -> None:
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._slots:
            with self._lock:
                if self._closed:
                    raise StoreError("the PostgresStore is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            try:
                yield conn
            finally:
                self._release(conn)

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg.pq import TransactionStatus

        # After an error the connection is usually still fine (a constraint, a lock
        # timeout): keep it when it is open and outside any transaction.
        reusable = not conn.closed and not conn.broken and (
            conn.info.transaction_status == TransactionStatus.IDLE
        )
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
