"""The worker's state in PostgreSQL: received events, and which worker holds which partition.

``{schema}.broker_events`` (next to the store's tables, created if missing) holds
every event a worker took from the stream, keyed by its event id:

* a row is written, in one statement with the rest of its batch, *before* the
  message is acknowledged to JetStream: an acknowledged event is never only in a
  worker's memory, so a worker killed at any point loses nothing;
* a second copy of an event id (a redelivery, or a producer's retry after the
  stream's duplicate window) finds the row and is dropped: each event is recorded
  once, across restarts;
* ``payload`` is kept until the session the event belongs to is saved (state
  ``saved``, payload dropped); a worker that takes a partition over replays the
  partition's ``pending`` rows, so sessions left half-recorded by a dead worker
  are completed by the next one. Events no recorder accepts are kept as
  ``rejected`` with their payload.

A piece of an event published in pieces (over the server's max_payload) is a row of its
own, under its own id, naming its event (``piece_of``, ``piece_index``, ``piece_count``):
staged and acknowledged as any event is, so a worker killed holding some of an event's
pieces loses none. Once all are staged, the joined event is staged as a row of its own
(at the last piece's position) in one statement with its pieces marked saved: either the
event or its pieces are pending, never both, and an event staged already (sent again, cut
otherwise) is a duplicate. So is a piece of an event staged otherwise (sent again whole, or
cut otherwise): marked saved when it is applied, or when its event is, before that event's
session is saved, so a new owner replaying them drops them again.

Rows of saved events (ids only) are removed after the stream's ``max_age``: no copy
of them can be delivered after that.

A row's ``stream_seq`` orders it among the others of its partition; ``stream_created``
names the stream it came from (its creation time): a stream deleted and created again
numbers its messages from 1 again, so a worker that sets its consumer up on such a
stream first moves the rows of the earlier one below it (`rekey`), keeping their order.

Partition ownership uses session-level advisory locks on the worker's connection:
a worker holds ``(partition class, n)`` while it consumes partition ``n`` and
``(member class, its id)`` while it runs. PostgreSQL releases both the moment the
connection ends (a SIGKILLed worker included), so another worker takes its
partitions on its next rebalance.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .settings import Piece

if TYPE_CHECKING:
    import psycopg

__all__ = ["PENDING", "REJECTED", "SAVED", "StagedEvent", "Staging"]

PENDING, SAVED, REJECTED = 0, 1, 2

logger = logging.getLogger("phi_session.broker")

_DDL_LOCK_WAIT = 1.0  # seconds a schema change waits for the table at a time
# Columns added since the first version, and their types: an older worker's table lacks them.
_ADDED_COLUMNS = {
    "stream_created": 'TEXT COLLATE "C"',
    "piece_of": 'TEXT COLLATE "C"',
    "piece_index": "INTEGER",
    "piece_count": "INTEGER",
}


class StagedEvent(NamedTuple):
    stream_seq: int
    event_id: str
    session_id: str
    payload: bytes
    piece: Piece | None = None


def _lock_class(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode()) & 0x7FFFFFFF


class Staging:
    """SQL over one autocommit async connection; every call is a single statement."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], *, schema: str, stream: str, durable: str) -> None:
        from psycopg import sql

        self.conn = conn
        self.schema = schema
        self.stream = stream
        self.table = sql.SQL("{}.broker_events").format(sql.Identifier(schema))
        self.partition_class = _lock_class(schema, stream, durable, "partitions")
        self.member_class = _lock_class(schema, stream, durable, "members")

    async def _execute(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cursor = await self.conn.execute(query, params)
        return await cursor.fetchall() if cursor.description is not None else []

    async def create(self) -> None:
        """Create the table and its index, or add what an older worker's lacks. Nothing is
        done when all is there: DDL on the table, IF NOT EXISTS too, waits for every open
        reader (pg_dump, a report) and holds up every worker's insert behind it."""
        import psycopg

        from ..stores.postgres import MIGRATION_LOCK_CLASS

        warned = False
        while not await self._complete():
            # CREATE ... IF NOT EXISTS races with itself (workers starting together on a fresh
            # schema fail on a unique violation): the DDL runs under the store's migration lock.
            try:
                async with self.conn.transaction():
                    # Waits in turns: the other workers' inserts pass between them.
                    await self._execute(
                        "SELECT set_config('lock_timeout', %s, true)", (f"{_DDL_LOCK_WAIT * 1000:.0f}ms",)
                    )
                    await self._execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (MIGRATION_LOCK_CLASS, self.schema)
                    )
                    await self._create_tables()
                return
            except psycopg.errors.LockNotAvailable:
                if not warned:
                    logger.warning(
                        "waiting for a lock on %s.broker_events to bring it up to date", self.schema
                    )
                    warned = True
                await asyncio.sleep(_DDL_LOCK_WAIT)

    async def _complete(self) -> bool:
        """Whether the table, its added columns and its index are there."""
        rows = await self._execute(
            "SELECT to_regclass(format('%%I.broker_events_pending', %(schema)s::text)) IS NOT NULL"
            " AND (SELECT count(*) FROM pg_attribute WHERE attname = ANY(%(added)s) AND NOT attisdropped"
            "   AND attrelid = to_regclass(format('%%I.broker_events', %(schema)s::text))) = %(count)s",
            {"schema": self.schema, "added": list(_ADDED_COLUMNS), "count": len(_ADDED_COLUMNS)},
        )
        return bool(rows[0][0])

    async def _create_tables(self) -> None:
        from psycopg import sql

        await self._execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                stream TEXT COLLATE "C" NOT NULL,
                event_id TEXT COLLATE "C" NOT NULL,
                part INTEGER NOT NULL,
                stream_seq BIGINT NOT NULL,
                session_id TEXT COLLATE "C" NOT NULL,
                payload BYTEA,
                state SMALLINT NOT NULL DEFAULT 0,
                received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (stream, event_id)
            )"""
            ).format(self.table)
        )
        # In a table of workers before `stream_created`, rows are taken for the current stream's;
        # before the pieces, every row is an event.
        for column, kind in _ADDED_COLUMNS.items():
            await self._execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    self.table, sql.Identifier(column), sql.SQL(kind)
                )
            )
        await self._execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS broker_events_pending ON {} (stream, part, stream_seq)"
                " WHERE state = 0"
            ).format(self.table)
        )

    async def insert(
        self, part: int, created: str | None, events: list[StagedEvent], replacing: Sequence[str] = ()
    ) -> set[str]:
        """Stage `events`, taken from the stream created at `created`; returns the ids that
        were new (the others are duplicates). The rows of `replacing` (the pieces of an event
        joined) are marked saved in the same statement."""
        from psycopg import sql

        replaced = sql.SQL(
            "WITH replaced AS (UPDATE {} SET state = %(saved)s, payload = NULL"
            " WHERE stream = %(stream)s AND event_id = ANY(%(replacing)s)) "
        )
        rows = await self._execute(
            sql.SQL(
                "{}INSERT INTO {} (stream, part, stream_created, stream_seq, event_id, session_id, payload,"
                " piece_of, piece_index, piece_count)"
                " SELECT %(stream)s, %(part)s, %(created)s, * FROM unnest(%(seq)s::bigint[], %(id)s::text[],"
                " %(session)s::text[], %(payload)s::bytea[], %(piece_of)s::text[], %(index)s::int[],"
                " %(count)s::int[])"
                " ON CONFLICT DO NOTHING RETURNING event_id"
            ).format(replaced.format(self.table) if replacing else sql.SQL(""), self.table),
            {
                "stream": self.stream,
                "part": part,
                "created": created,
                "seq": [e.stream_seq for e in events],
                "id": [e.event_id for e in events],
                "session": [e.session_id for e in events],
                "payload": [e.payload for e in events],
                "piece_of": [e.piece and e.piece.event_id for e in events],
                "index": [e.piece and e.piece.number for e in events],
                "count": [e.piece and e.piece.total for e in events],
                "saved": SAVED,
                "replacing": list(replacing),
            },
        )
        return {row[0] for row in rows}

    async def position_ids(self, created: str | None, sequences: list[int]) -> dict[int, str]:
        """Event ids for messages that carry none (sequence -> id), named by their position:
        ``{stream}:{seq}``, as older workers named them, unless an earlier stream's message
        at that position has that id (a stream created again numbers from 1 again): then
        ``{stream}:{seq}@{created}``. A message staged already, under either id, gets it
        again: its redelivery is a duplicate whichever worker staged it."""
        from psycopg import sql

        names = {seq: f"{self.stream}:{seq}" for seq in sequences}
        dated = {seq: f"{name}@{created}" for seq, name in names.items()}
        rows = await self._execute(
            sql.SQL(
                "SELECT event_id, stream_seq, stream_created FROM {} WHERE stream = %s AND event_id = ANY(%s)"
            ).format(self.table),
            (self.stream, [*names.values(), *dated.values()]),
        )
        found = {event_id: (seq, stream) for event_id, seq, stream in rows}
        ids = {}
        for seq, name in names.items():
            # Rows of an earlier stream keep theirs, or moved below this one's sequences (`rekey`);
            # those of no known stream (an older worker's) are this one's.
            theirs = found.get(name, (seq, None))
            earlier = theirs[0] != seq or theirs[1] not in (None, created)
            ids[seq] = dated[seq] if earlier or dated[seq] in found else name
        return ids

    async def has(self, event_id: str) -> bool:
        """Whether `event_id` is staged, in any state."""
        from psycopg import sql

        rows = await self._execute(
            sql.SQL("SELECT 1 FROM {} WHERE stream = %s AND event_id = %s").format(self.table),
            (self.stream, event_id),
        )
        return bool(rows)

    async def pending(self, part: int) -> list[StagedEvent]:
        from psycopg import sql

        rows = await self._execute(
            sql.SQL(
                "SELECT stream_seq, event_id, session_id, payload, piece_of, piece_index, piece_count FROM {}"
                " WHERE stream = %s AND part = %s AND state = 0 ORDER BY stream_seq"
            ).format(self.table),
            (self.stream, part),
        )
        return [
            StagedEvent(
                seq, event_id, session, bytes(payload), Piece(*piece) if piece[0] is not None else None
            )
            for seq, event_id, session, payload, *piece in rows
        ]

    async def rekey(self, part: int, created: str) -> int:
        """Move the pending rows of `part` staged from an earlier stream than the one created
        at `created` below every sequence of that one (to 0 and under, in their order), and
        count them as its; returns how far they moved. Rows of no known stream (staged by an
        older worker) are taken for this one's, as they are."""
        from psycopg import sql

        rows = await self._execute(
            sql.SQL(
                "WITH earlier AS (SELECT coalesce(max(stream_seq), 0) AS top FROM {0}"
                "   WHERE stream = %(stream)s AND part = %(part)s AND state = 0"
                "   AND stream_created <> %(created)s),"
                " moved AS (UPDATE {0} SET stream_created = %(created)s, stream_seq = CASE"
                "   WHEN stream_created IS NULL THEN stream_seq"
                "   ELSE stream_seq - (SELECT top FROM earlier) END"
                "   WHERE stream = %(stream)s AND part = %(part)s AND state = 0"
                "   AND stream_created IS DISTINCT FROM %(created)s)"
                " SELECT top FROM earlier"
            ).format(self.table),
            {"stream": self.stream, "part": part, "created": created},
        )
        return int(rows[0][0])

    async def mark(self, event_ids: list[str], state: int) -> None:
        from psycopg import sql

        if not event_ids:
            return
        payload = sql.SQL(", payload = NULL") if state == SAVED else sql.SQL("")
        await self._execute(
            sql.SQL("UPDATE {} SET state = %s{} WHERE stream = %s AND event_id = ANY(%s)").format(
                self.table, payload
            ),
            (state, self.stream, event_ids),
        )

    async def prune(self, older_than: float) -> int:
        from psycopg import sql

        rows = await self._execute(
            sql.SQL(
                "DELETE FROM {} WHERE stream = %s AND state = 1"
                " AND received_at < now() - make_interval(secs => %s) RETURNING 1"
            ).format(self.table),
            (self.stream, older_than),
        )
        return len(rows)

    async def counts(self) -> dict[int, dict[int, int]]:
        """Rows per partition and state (none before a worker created the table)."""
        from psycopg import sql

        exists = await self._execute(
            "SELECT to_regclass(format('%%I.broker_events', %s::text)) IS NOT NULL", (self.schema,)
        )
        if not exists[0][0]:
            return {}
        rows = await self._execute(
            sql.SQL("SELECT part, state, count(*) FROM {} WHERE stream = %s GROUP BY part, state").format(
                self.table
            ),
            (self.stream,),
        )
        counts: dict[int, dict[int, int]] = {}
        for part, state, count in rows:
            counts.setdefault(part, {})[state] = count
        return counts

    async def store_name(self) -> str:
        """The store's schema, database and PostgreSQL cluster: the same whichever address
        a worker reaches it by."""
        rows = await self._execute(
            "SELECT current_database(), (SELECT system_identifier FROM pg_control_system())::text"
        )
        database, system = rows[0]
        return f"schema {self.schema} of database {database} (PostgreSQL system {system})"

    # -- ownership -------------------------------------------------------------------------------

    async def join(self, member: int) -> bool:
        return await self._try_lock(self.member_class, member)

    async def take(self, part: int) -> bool:
        return await self._try_lock(self.partition_class, part)

    async def release(self, part: int) -> None:
        await self._execute("SELECT pg_advisory_unlock(%s, %s)", (self.partition_class, part))

    async def _try_lock(self, lock_class: int, key: int) -> bool:
        rows = await self._execute("SELECT pg_try_advisory_lock(%s, %s)", (lock_class, key))
        return bool(rows[0][0])

    async def members(self) -> int:
        return len(await self._holders(self.member_class))

    async def owners(self) -> dict[int, int]:
        """Partition -> the PostgreSQL backend pid of the worker holding it."""
        return dict(await self._holders(self.partition_class))

    async def _holders(self, lock_class: int) -> list[tuple[int, int]]:
        rows = await self._execute(
            "SELECT objid::bigint, pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 2 AND classid::bigint = %s"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (lock_class,),
        )
        return [(int(key), int(pid)) for key, pid in rows]
