"""The NATS JetStream path against the real services: nats-server with JetStream on
127.0.0.1:4222 (``.ci/run`` starts it) and PostgreSQL ($PHI_SESSION_TEST_POSTGRES_DSN).

Every test uses its own stream, subject prefix, schema and spill directory, removed
afterwards. The reference for "recorded exactly once" is the same events recorded by
one `SessionRecorder` in this process: the stored sessions must equal it byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

import phi_session as ps
from phi_session import AgentSession, LoopConfigSnapshot, Tracer
from phi_session.codec import decode_event, encode_event, encode_session
from phi_session.errors import BrokerError, UsedAfterFork
from phi_session.journal import MAGIC, Journal, read_records, recover
from phi_session.journal.format import DirectoryLock
from phi_session.persist import AutoPersistingRecorder
from phi_session.recorder import SessionRecorder

from .conftest import full_disk_after, in_forked_child, needs_fork, read_only
from .nats_support import PrivateServer, listening

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import workload

nats = pytest.importorskip("nats", reason="the nats extra is not installed (pip install 'phi-session[nats]')")
psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")

from phi_session.broker import IngestWorker, JetStreamSink, SinkStats, ingest_status  # noqa: E402
from phi_session.stores.postgres import PostgresStore  # noqa: E402

URL = "nats://127.0.0.1:4222"
DSN = os.environ.get("PHI_SESSION_TEST_POSTGRES_DSN", "")
HELPER = Path(__file__).with_name("broker_processes.py")
CLI = (sys.executable, "-c", "from phi_session.cli import main; main()")


if not DSN:
    pytest.skip("PHI_SESSION_TEST_POSTGRES_DSN is not set", allow_module_level=True)
if not listening(4222):
    pytest.skip(
        "no nats-server on 127.0.0.1:4222 (.ci/run starts one: nats-server -js)", allow_module_level=True
    )


@dataclass
class Names:
    stream: str
    prefix: str
    schema: str
    spill: Path
    url: str = URL

    def sink(self, **options: Any) -> JetStreamSink:
        return JetStreamSink(
            self.url, stream=self.stream, subject_prefix=self.prefix, spill_dir=self.spill, **options
        )

    def worker(self, **options: Any) -> IngestWorker:
        options = {"ack_wait": 1.0, "checkpoint_interval": 0.2, "rebalance_interval": 0.2, **options}
        return IngestWorker(
            self.url, DSN, schema=self.schema, stream=self.stream, subject_prefix=self.prefix, **options
        )


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


@pytest.fixture
def names() -> Iterator[Names]:
    tag = uuid.uuid4().hex[:12]
    spill = Path(tempfile.mkdtemp(prefix="phi-spill-"))
    made = Names(stream=f"PHI_TEST_{tag}", prefix=f"phitest.{tag}", schema=f"phi_test_{tag}", spill=spill)
    yield made
    asyncio.run(_delete_stream(made.url, made.stream))
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(made.schema))
        )
    shutil.rmtree(spill, ignore_errors=True)


def _reference(streams: list[list[Any]]) -> dict[str, bytes]:
    """Each stream recorded in one process: session id -> phi-core JSON."""
    expected = {}
    for events in streams:
        recorder = SessionRecorder()
        for event in events:
            recorder.on_json(encode_event(event))
        recorder.flush()
        expected.update((s.session_id, encode_session(s)) for s in recorder.drain_completed())
    return expected


def _stored(schema: str) -> dict[str, bytes]:
    with PostgresStore(DSN, schema=schema) as store:
        return {sid: encode_session(store.load(sid)) for sid in store.list_ids()}


def _wait_stored(schema: str, expected: dict[str, bytes], timeout: float = 180) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stored = _stored(schema)
        except Exception:  # the schema is not created yet
            stored = {}
        if stored == expected or time.monotonic() > deadline:
            return stored
        time.sleep(0.3)


def _staged_ids_or_none(schema: str) -> list[str]:
    try:
        return _staged_ids(schema)
    except psycopg.Error:  # no table yet
        return []


def _staged_ids(schema: str) -> list[str]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        query = psycopg.sql.SQL("SELECT event_id FROM {}.broker_events").format(
            psycopg.sql.Identifier(schema)
        )
        return [row[0] for row in conn.execute(query)]


async def _run_until(worker: IngestWorker, done: Any, timeout: float = 180) -> None:
    await _stop_when(worker, asyncio.create_task(worker.run()), done, timeout)


async def _stop_when(worker: IngestWorker, task: asyncio.Task[None], done: Any, timeout: float = 180) -> None:
    """Wait until `done()` (or the timeout), then stop the running worker."""
    deadline = time.monotonic() + timeout
    try:
        while not await asyncio.to_thread(done) and time.monotonic() < deadline:
            if task.done():
                task.result()
            await asyncio.sleep(0.2)
    finally:
        worker.stop()
        await task


def _helper(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _started_worker(args: tuple[str, ...]) -> subprocess.Popen[str]:
    worker = _helper(*args)
    assert worker.stdout is not None
    line = worker.stdout.readline()
    assert line == "ready\n", (line, worker.communicate(timeout=30))
    return worker


# -- the fleet ------------------------------------------------------------------------------------


def test_four_producers_two_workers_one_killed_and_restarted(names: Names) -> None:
    sessions = 3
    seeds = [11, 12, 13, 14]
    expected = _reference([list(workload.events(sessions, seed=seed)) for seed in seeds])
    worker_args = ("worker", URL, DSN, names.schema, names.stream, names.prefix)
    first, second = _started_worker(worker_args), _started_worker(worker_args)
    producers = [
        _helper("producer", URL, names.stream, names.prefix, str(names.spill), str(seed), str(sessions))
        for seed in seeds
    ]
    deadline = time.monotonic() + 30
    while len(_staged_ids_or_none(names.schema)) < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)  # mid-stream: the workers hold some events, others are still coming
    first.kill()  # SIGKILL: whatever it held unacknowledged is redelivered, what it staged is replayed
    first.wait()
    for producer in producers:
        _, err = producer.communicate(timeout=180)
        assert producer.returncode == 0, err
    # The others may have stored everything already: the SIGTERM must not come before it can stop.
    restarted = _started_worker(worker_args)
    try:
        stored = _wait_stored(names.schema, expected)
    finally:
        for worker in (second, restarted):
            worker.send_signal(signal.SIGTERM)
        outputs = [worker.communicate(timeout=30) for worker in (second, restarted)]
    assert [w.returncode for w in (second, restarted)] == [0, 0], outputs
    assert stored.keys() == expected.keys()
    assert stored == expected
    ids = _staged_ids(names.schema)
    total = sum(workload.EVENTS_PER_SESSION * sessions for _ in seeds)
    assert len(ids) == len(set(ids)) == total  # every event staged exactly once
    status = asyncio.run(
        ingest_status(URL, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix)
    )
    assert [(s.in_stream, s.unacknowledged, s.staged) for s in status] == [(0, 0, 0)] * 4


def test_workers_starting_together_on_a_fresh_schema_both_run(names: Names) -> None:
    """CREATE TABLE IF NOT EXISTS is not safe against itself: without the migration lock
    one of two workers starting at once died on a unique violation (seen in CI)."""
    from phi_session.broker.staging import Staging

    async def create_together() -> None:
        connections = [await psycopg.AsyncConnection.connect(DSN, autocommit=True) for _ in range(4)]
        try:
            await connections[0].execute(
                psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(names.schema))
            )
            stagings = [
                Staging(conn, schema=names.schema, stream=names.stream, durable="d") for conn in connections
            ]
            await asyncio.gather(*(staging.create() for staging in stagings))
            assert await stagings[1].counts() == {}
        finally:
            for conn in connections:
                await conn.close()

    for _ in range(5):
        asyncio.run(create_together())
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(psycopg.sql.Identifier(names.schema))
            )


def test_a_worker_starting_on_a_table_being_read_changes_nothing_and_waits_for_nothing(names: Names) -> None:
    """ALTER TABLE ... ADD COLUMN IF NOT EXISTS ran at every start: it waits for any open
    reader of the table (pg_dump, a report) even with the column there, and every running
    worker's insert queued behind it, for as long as the reader read."""
    from phi_session.broker.staging import StagedEvent, Staging

    async def scenario() -> None:
        setup, reader, starting = [
            await psycopg.AsyncConnection.connect(DSN, autocommit=True) for _ in range(3)
        ]
        try:
            await setup.execute(
                psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(names.schema))
            )
            running = Staging(setup, schema=names.schema, stream=names.stream, durable="d")
            await running.create()
            await reader.execute("BEGIN")
            await reader.execute(
                psycopg.sql.SQL("SELECT count(*) FROM {}.broker_events").format(
                    psycopg.sql.Identifier(names.schema)
                )
            )
            await starting.execute("SET lock_timeout = '200ms'")  # a wait for the reader fails
            await Staging(starting, schema=names.schema, stream=names.stream, durable="d").create()
            assert await running.insert(0, "c", [StagedEvent(1, "e1", "s", b"{}")]) == {"e1"}
        finally:
            for conn in (setup, reader, starting):
                await conn.close()

    asyncio.run(scenario())


def test_a_worker_adds_the_columns_an_older_workers_table_lacks(names: Names) -> None:
    """Rows an older worker staged keep no stream: they are taken for the current one's;
    nor are they pieces."""
    from phi_session.broker.staging import Staging

    table = psycopg.sql.SQL("{}.broker_events").format(psycopg.sql.Identifier(names.schema))

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            await conn.execute(
                psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(names.schema))
            )
            staging = Staging(conn, schema=names.schema, stream=names.stream, durable="d")
            await staging.create()
            await conn.execute(
                psycopg.sql.SQL(
                    "ALTER TABLE {} DROP COLUMN stream_created, DROP COLUMN piece_of,"
                    " DROP COLUMN piece_index, DROP COLUMN piece_count"
                ).format(table)
            )
            await conn.execute(
                psycopg.sql.SQL(
                    "INSERT INTO {} (stream, part, stream_seq, event_id, session_id, payload)"
                    " VALUES (%s, 0, 1, 'e1', 's', '')"
                ).format(table),
                (names.stream,),
            )
            await staging.create()
            rows = await (
                await conn.execute(psycopg.sql.SQL("SELECT event_id, stream_created FROM {}").format(table))
            ).fetchall()
            assert rows == [("e1", None)]
            assert [(event.event_id, event.piece) for event in await staging.pending(0)] == [("e1", None)]

    asyncio.run(scenario())


# -- duplicates and order ---------------------------------------------------------------------------


def _publish_raw(names: Names, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
    async def publish() -> None:
        nc = await nats.connect(names.url)
        js = nc.jetstream()
        for subject, payload, headers in messages:
            await js.publish(subject, payload, headers=headers)
        await nc.close()

    asyncio.run(publish())


@pytest.fixture
def short_window(names: Names) -> Names:
    """The stream created up front with a one-second duplicate window."""

    async def create() -> None:
        from phi_session.broker.settings import StreamSettings, ensure_stream

        nc = await nats.connect(names.url)
        await ensure_stream(
            nc.jetstream(),
            StreamSettings(
                stream=names.stream, subject_prefix=names.prefix, partitions=1, duplicate_window=1
            ),
        )
        await nc.close()

    asyncio.run(create())
    return names


def test_duplicate_publish_after_the_window_is_recorded_once(short_window: Names) -> None:
    names = short_window
    events = list(workload.events(1, seed=3))
    with names.sink(partitions=1) as sink:
        # A one-second duplicate window: a retry later than that reaches the stream twice.
        for event in events:
            sink(event)
        assert sink.flush(30)
        producer = sink.producer_id
    time.sleep(1.5)
    session = events[0].session_id
    # The same event (same id) again, as a producer retrying after the window would send it.
    _publish_raw(
        names,
        [
            (
                f"{names.prefix}.0",
                encode_event(events[5]),
                {"Nats-Msg-Id": f"{producer}-6", "Phi-Session": session},
            )
        ],
    )
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(
        _run_until(worker, lambda: _stored(names.schema) == expected and worker.stats.received > len(events))
    )
    assert _stored(names.schema) == expected
    assert worker.stats.duplicates == 1
    assert worker.stats.recorded == len(events)


def test_out_of_order_redelivery_is_applied_in_order(names: Names) -> None:
    events = list(workload.events(1, seed=4))
    with names.sink(partitions=1) as sink:
        for event in events:
            sink(event)
        assert sink.flush(30)
    # A long ack_wait: JetStream must not redeliver on its own (under load a worker can
    # take longer than a short ack_wait to start, and then everything arrives in order).
    worker = names.worker(batch=50, ack_wait=60.0)
    expected = _reference([events])

    async def scenario() -> None:
        """Another worker took the first 20 messages and gave them back (nak) only after
        this worker had fetched the later ones: they come back behind them."""
        from nats.js import api

        nc = await nats.connect(names.url)
        try:
            js = nc.jetstream()
            await js.add_consumer(
                names.stream,
                api.ConsumerConfig(
                    durable_name="phi-ingest-0",
                    filter_subject=f"{names.prefix}.0",
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=worker.ack_wait,
                    max_deliver=-1,
                    max_ack_pending=worker.batch * 4,
                ),
            )
            subscription = await js.pull_subscribe_bind(durable="phi-ingest-0", stream=names.stream)
            taken = await subscription.fetch(20, timeout=5)
            assert len(taken) == 20
            task = asyncio.create_task(worker.run())
            deadline = time.monotonic() + 60
            while worker.stats.held_back == 0 and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.05)
            for message in taken:
                await message.nak()
            await nc.flush()
        finally:
            await nc.close()
        await _stop_when(worker, task, lambda: _stored(names.schema) == expected)

    asyncio.run(scenario())
    assert _stored(names.schema) == expected
    assert worker.stats.recorded == len(events)
    assert worker.stats.held_back > 0  # later events did wait for the redelivered ones


def _one_partition_stream(names: Names) -> None:
    async def create() -> None:
        from phi_session.broker.settings import StreamSettings, ensure_stream

        nc = await nats.connect(names.url)
        await ensure_stream(
            nc.jetstream(), StreamSettings(stream=names.stream, subject_prefix=names.prefix, partitions=1)
        )
        await nc.close()

    asyncio.run(create())


def _partitions_used(schema: str) -> set[int]:
    """The partitions of the events staged."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        query = psycopg.sql.SQL("SELECT DISTINCT part FROM {}.broker_events").format(
            psycopg.sql.Identifier(schema)
        )
        return {row[0] for row in conn.execute(query)}


def _staged_pending(schema: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as conn:
        query = psycopg.sql.SQL("SELECT count(*) FROM {}.broker_events WHERE state = 0").format(
            psycopg.sql.Identifier(schema)
        )
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


def test_events_published_without_headers_are_marked_saved(names: Names) -> None:
    """Another publisher sends no Phi-Session header: the saved session's events must not
    stay staged (replayed by every worker taking the partition, their payload kept)."""
    events = list(workload.events(1, seed=12))
    lines = [encode_event(event) for event in events]
    # A key its event type does not have: the recorder ignores it, and so must the worker.
    lines[1] = lines[1].replace(b'"type":"TurnStart",', b'"type":"TurnStart","session_id":5,')
    _one_partition_stream(names)
    _publish_raw(names, [(f"{names.prefix}.0", line, {}) for line in lines])
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(
        _run_until(
            worker, lambda: _stored(names.schema) == expected and _staged_pending(names.schema) == 0, 30
        )
    )
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0


def test_a_message_without_an_event_id_staged_by_an_older_worker_is_applied_once(names: Names) -> None:
    """Rolling upgrade: an older worker named a message without an event id ``STREAM:SEQ``,
    staged it and died before acknowledging it. Its redelivery to a newer worker was named
    ``STREAM:SEQ@CREATED``, taken for a new event and applied a second time."""
    from phi_session.broker.staging import Staging

    events = list(workload.events(1, seed=44))
    lines = [encode_event(event) for event in events]
    _one_partition_stream(names)
    _publish_raw(names, [(f"{names.prefix}.0", line, {}) for line in lines])

    async def staged_by_an_older_worker() -> None:
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            await conn.execute(
                psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(names.schema))
            )
            await Staging(conn, schema=names.schema, stream=names.stream, durable="d").create()
            for sequence, line in enumerate(lines, 1):
                await conn.execute(
                    psycopg.sql.SQL(
                        "INSERT INTO {}.broker_events"
                        " (stream, part, stream_seq, event_id, session_id, payload)"
                        " VALUES (%s, 0, %s, %s, %s, %s)"
                    ).format(psycopg.sql.Identifier(names.schema)),
                    (names.stream, sequence, f"{names.stream}:{sequence}", "", line),
                )

    asyncio.run(staged_by_an_older_worker())
    worker = names.worker(partitions=1)
    expected = _reference([events])
    asyncio.run(
        _run_until(
            worker,
            lambda: (
                worker.stats.received == len(events)
                and _stored(names.schema) == expected
                and _staged_pending(names.schema) == 0
            ),
            60,
        )
    )
    assert _stored(names.schema) == expected
    assert worker.stats.duplicates == len(events)
    assert worker.stats.rejected == 0
    assert sorted(_staged_ids(names.schema)) == sorted(
        f"{names.stream}:{n}" for n in range(1, len(lines) + 1)
    )


def test_hostile_session_ids_are_recorded_or_rejected_never_left_staged(names: Names) -> None:
    """NATS trims header values and turns line breaks into spaces: the Phi-Session header
    named another session than the events', whose rows then stayed staged for ever."""
    lines = workload.lines(1, seed=16)
    session_id = decode_event(lines[0]).session_id.encode()

    def renamed(hostile: bytes) -> list[Any]:
        return [decode_event(line.replace(session_id, hostile)) for line in lines]

    storable = [renamed(hostile) for hostile in (b" padded ", b"line\\r\\nbreak", b"caf\\u00e9")]
    unstorable = [renamed(hostile) for hostile in (b"nul\\u0000id", b"x" * 5000)]
    with names.sink(partitions=1) as sink:
        for events in [*storable, *unstorable]:
            for event in events:
                sink(event)
        assert sink.flush(30)
    worker = names.worker()
    expected = _reference(storable)
    assert len(expected) == len(storable)
    asyncio.run(
        _run_until(
            worker, lambda: _stored(names.schema) == expected and _staged_pending(names.schema) == 0, 60
        )
    )
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0
    assert worker.stats.rejected == len(lines) * len(unstorable)  # no store takes them: kept as rejected


def _publish_headers_as_written(subject: str, headers: bytes, payload: bytes) -> None:
    """Publish as any client may: nats-py writes no header block beginning with a status."""
    with socket.create_connection(("127.0.0.1", 4222), timeout=10) as raw:
        raw.recv(4096)  # INFO
        raw.sendall(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n')
        size = len(headers) + len(payload)
        raw.sendall(
            b"HPUB %s %d %d\r\n%s%s\r\nPING\r\n" % (subject.encode(), len(headers), size, headers, payload)
        )
        raw.recv(4096)  # PONG: the server took it


def test_a_message_whose_headers_begin_with_a_status_is_data_not_held_up_for_ever(names: Names) -> None:
    """nats-py's fetch takes it for the server's own status (404 no messages) and drops
    it: never acknowledged, it held every later event of its partition back for good."""
    statuses = (b"404 No Messages", b"408 Request Timeout", b"503")
    _odd_headers_are_rejected_in_order(
        names, [b"NATS/1.0 %s\r\n\r\n" % status for status in statuses], seed=31
    )


def test_a_message_whose_header_status_is_not_utf8_stops_no_partition(names: Names) -> None:
    """nats-py decodes a header status line as UTF-8 in its reading task: one that is not
    ended that task, and the worker heard nothing more on any partition, for good, idle to
    all appearances and holding its partitions."""
    headers = [b"NATS/1.0 \xff\xfe\xfd\r\n\r\n", b"NATS/1.0 404 \xc3(\r\n\r\n"]
    _odd_headers_are_rejected_in_order(names, headers, seed=32)


def _odd_headers_are_rejected_in_order(names: Names, headers: list[bytes], seed: int) -> None:
    """Messages of `headers` published amid a session's events: each is rejected (kept
    staged, as any payload that is no event) and every event is stored."""
    events = list(workload.events(1, seed=seed))
    with names.sink(partitions=1) as sink:
        sink(events[0])
        assert sink.flush(30)
        for written in headers:
            _publish_headers_as_written(f"{names.prefix}.0", written, b"{}")
        for event in events[1:]:
            sink(event)
        assert sink.flush(30)
    worker = names.worker()
    expected = _reference([events])

    def done() -> bool:
        return _stored(names.schema) == expected and worker.stats.rejected == len(headers)

    asyncio.run(_run_until(worker, done, 60))
    assert _stored(names.schema) == expected
    assert worker.stats.rejected == len(headers)


def test_a_session_id_with_a_lone_surrogate_holds_up_nothing(names: Names) -> None:
    """Text from undecodable bytes (``surrogateescape``) holds lone surrogates: the payload
    escapes them, but the Phi-Session header could not be encoded, so the event was retried
    for ever and nothing after it was sent; `close()` then raised UnicodeEncodeError."""
    first, second = list(workload.events(1, seed=23)), list(workload.events(1, seed=24))
    session_id = first[0].session_id

    def renamed(event: Any) -> Any:
        ids = {
            name: value.replace(session_id, "caf\udce9")
            for name in ("session_id", "loop_id", "parent_loop_id")
            if isinstance(value := getattr(event, name, None), str)
        }
        return msgspec.structs.replace(event, **ids)

    hostile = [renamed(event) for event in first]
    with names.sink(partitions=1) as sink:
        for event in [*hostile, *second]:
            sink(event)
        assert sink.flush(30)
    worker = names.worker()
    expected = _reference([second])  # the escaped id holds backslashes: no store takes it

    def done() -> bool:
        return _stored(names.schema) == expected and worker.stats.rejected == len(hostile)

    asyncio.run(_run_until(worker, done, 60))
    assert _stored(names.schema) == expected
    assert worker.stats.rejected == len(hostile)  # kept staged, with their payload


def test_an_event_of_no_open_loop_is_kept_as_rejected_not_replayed_for_ever(names: Names) -> None:
    """The recorder keeps it as an orphan, in no session: it stayed staged (and in the
    worker's memory), and every worker taking the partition replayed it again."""
    events = list(workload.events(1, seed=17))
    sink = names.sink(partitions=1)
    for event in events:
        sink(event)
    assert sink.flush(30)
    worker = names.worker()
    expected = _reference([events])

    def late_event_handled() -> bool:
        if _stored(names.schema) != expected:
            return False
        if worker.stats.received == len(events):
            sink(events[1])  # a TurnStart again: its loop ended long ago
            assert sink.flush(30)
        return worker.stats.received > len(events) and _staged_pending(names.schema) == 0

    try:
        asyncio.run(_run_until(worker, late_event_handled, 30))
    finally:
        sink.close()
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0
    assert worker.stats.rejected == 1


def test_a_session_whose_agent_died_mid_loop_is_saved_aborted_once_idle(names: Names) -> None:
    """Its loop never ends: the worker never saved the session (recording the stream and
    flushing stores it, the loop Aborted), and its events stayed staged for ever."""
    events = list(workload.events(2, seed=18))
    cut = 800  # in the second session's second loop: its agent dies there
    sink = names.sink(partitions=1)
    for event in events[:cut]:
        sink(event)
    assert sink.flush(30)
    worker = names.worker(idle_timeout=1.0)
    expected = _reference([events[:cut]])

    def late_event_handled() -> bool:
        if _stored(names.schema) != expected or _staged_pending(names.schema):
            return False
        if worker.stats.received == cut:
            sink(events[cut])  # the loop aborted: handled as an event of a closed loop
            assert sink.flush(30)
        return worker.stats.received > cut and _staged_pending(names.schema) == 0

    try:
        asyncio.run(_run_until(worker, late_event_handled, 30))
    finally:
        sink.close()
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0
    assert worker.stats.rejected == 1


def test_a_loop_of_a_killed_agent_leaves_no_route_in_use_once_its_session_is_aborted(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker kept the route of a loop whose id does not name its session while the loop
    ran; aborted once idle, it never ends: every killed loop's route was held for the
    worker's lifetime."""
    from phi_session.broker import settings as broker_settings
    from phi_session.broker import worker as broker_worker

    monkeypatch.setattr(broker_settings, "_MAX_ROUTES", 0)  # an ended route is forgotten at once
    tables: list[broker_settings.Routes] = []

    class Watched(broker_settings.Routes):
        def __init__(self) -> None:
            super().__init__()
            tables.append(self)

    monkeypatch.setattr(broker_worker, "Routes", Watched)
    events = [
        _start("S", "run-1"),
        ps.TurnStart(loop_id="run-1", turn_index=0, timestamp=_at(1), triggered_by="User"),
    ]
    with names.sink(partitions=1) as sink:
        for event in events:
            sink(event)
        assert sink.flush(30)
    worker = names.worker(idle_timeout=1.0)
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, 30))
    assert _stored(names.schema) == expected
    assert [table.get("run-1") for table in tables] == [None]


_USAGE = ps.Usage(input=10, output=1, total_tokens=11)


def _at(seconds: int) -> ps.Timestamp:
    return ps.Timestamp.from_ns(1_750_000_000 * 10**9 + seconds * 10**9)


def _start(session: str, loop_id: str, seconds: int = 0, parent: str | None = None) -> ps.AgentStart:
    return ps.AgentStart(
        agent_id="ag",
        session_id=session,
        loop_id=loop_id,
        parent_loop_id=parent,
        continuation_kind=ps.INITIAL,
        timestamp=_at(seconds),
    )


def _end(loop_id: str, seconds: int = 0) -> ps.AgentEnd:
    return ps.AgentEnd(loop_id=loop_id, messages=(), usage=_USAGE, timestamp=_at(seconds))


def _spawned(loop_id: str, tool_call_id: str, tool_name: str, child_loop_id: str) -> ps.ToolExecutionEnd:
    """The end of the tool call that ran the sub-agent loop `child_loop_id`."""
    return ps.ToolExecutionEnd(
        loop_id=loop_id,
        tool_call_id=tool_call_id,
        tool_name=tool_name,
        result=ps.ToolResult(content=(), child_loop_id=child_loop_id),
        is_error=False,
        child_loop_id=child_loop_id,
    )


def _recorded_across_a_worker_change(
    names: Names, before: list[Any], after: list[Any], handed_over: Any
) -> IngestWorker:
    """Publish `before` to one partition, recorded by a worker stopped once `handed_over()`;
    then `after`, recorded by the next worker: the two store what one recorder would.
    That next worker."""
    expected = _reference([before + after])
    with names.sink(partitions=1) as sink:
        for event in before:
            sink(event)
        assert sink.flush(30)
        asyncio.run(_run_until(names.worker(), handed_over, 30))
        for event in after:
            sink(event)
        assert sink.flush(30)
    second = names.worker()
    asyncio.run(
        _run_until(
            second, lambda: _stored(names.schema) == expected and _staged_pending(names.schema) == 0, 30
        )
    )
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0
    return second


def test_a_worker_restarted_before_a_late_amendment_still_makes_it(names: Names) -> None:
    """A session saved while still owed its group's end, or the tool call that spawned it,
    had its events marked saved: the next owner of the partition, replaying only pending
    ones, knew nothing to amend. The group was lost (its ParallelLoopEnd rejected) and the
    sub-agent kept a spawn ref without its tool call."""
    before = [
        ps.ParallelLoopStart(session_id="G", loop_ids=("G.a.1", "G.b.2"), timestamp=_at(0)),
        _start("G", "G.a.1", 1),
        _start("G", "G.b.2", 1),
        _end("G.a.1", 4),
        _end("G.b.2", 5),
        _start("P", "P.c.1", 0),
        ps.ToolExecutionStart(loop_id="P.c.1", tool_call_id="call-7", tool_name="researcher", args={}),
        _start("C", "C.c.1", 1, parent="P.c.1"),
        _end("C.c.1", 2),
    ]
    after = [
        ps.ParallelLoopEnd(
            session_id="G",
            selected_loop_id="G.b.2",
            selected_config_index=1,
            evaluation_usage=_USAGE,
            timestamp=_at(9),
        ),
        _spawned("P.c.1", "call-7", "researcher", "C.c.1"),
        _end("P.c.1", 3),
    ]
    # The judge's verdict, the tool's result: once the worker restarted.
    second = _recorded_across_a_worker_change(
        names, before, after, lambda: {"G", "C"} <= set(_stored(names.schema))
    )
    assert second.stats.rejected == 0


def test_a_sub_agent_starting_after_its_spawner_was_saved_by_another_worker_keeps_its_tool_call(
    names: Names,
) -> None:
    """Its spawner's loop ended and was saved, its events marked saved, by the worker that
    held the partition before: the next one, replaying nothing of it, gave the sub-agent a
    spawn ref without its tool call (as one recorder, or a journal's recovery, does not)."""
    spawner = [
        _start("p", "p.c.1"),
        _spawned("p.c.1", "t", "sub", "k.sub.1"),
        _end("p.c.1", 1),
    ]
    sub_agent = [_start("k", "k.sub.1", 2, parent="p.c.1"), _end("k.sub.1", 3)]
    _recorded_across_a_worker_change(
        names, spawner, sub_agent, lambda: "p" in _stored(names.schema) and _staged_pending(names.schema) == 0
    )


def test_a_spawner_read_failing_once_is_read_again_and_its_sub_agents_keep_their_tool_calls(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker kept a failed read of the spawner's session as the spawner holding no
    tool call: once the store failed for a moment, every later sub-agent of it was saved
    without its tool call, the store back or not."""
    spawner = [
        _start("p", "p.c.1"),
        _spawned("p.c.1", "t1", "sub", "k.sub.1"),
        _spawned("p.c.1", "t2", "sub", "m.sub.1"),
        _end("p.c.1", 1),
    ]
    sub_agents = [
        _start("k", "k.sub.1", 2, parent="p.c.1"),
        _end("k.sub.1", 3),
        _start("m", "m.sub.1", 4, parent="p.c.1"),
        _end("m.sub.1", 5),
    ]
    load_outline = PostgresStore.load_outline
    reads: list[str] = []

    def failing_once(store: PostgresStore, session_id: str) -> Any:
        # (The spawner's worker reads k and m too, not stored yet: its links to complete.)
        reads.append(session_id)
        if reads.count("p") == 1 and session_id == "p":
            raise ps.StoreError("connection to server lost (simulated)")
        return load_outline(store, session_id)

    monkeypatch.setattr(PostgresStore, "load_outline", failing_once)
    _recorded_across_a_worker_change(
        names,
        spawner,
        sub_agents,
        lambda: "p" in _stored(names.schema) and _staged_pending(names.schema) == 0,
    )
    assert [read for read in reads if read == "p"][:2] == ["p", "p"]  # failed, then read again


def test_a_spawner_read_failing_for_good_holds_its_partition_back_only_for_a_while(
    names: Names, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store error that never passes (a permission denied) was read again at every
    checkpoint for ever: the sub-agent's start, and every later event of its partition (an
    unrelated session's too), waited with no end, warned of at each checkpoint."""
    spawner = [_start("p", "p.c.1"), _spawned("p.c.1", "t1", "sub", "k.sub.1"), _end("p.c.1", 1)]
    after = [
        _start("k", "k.sub.1", 2, parent="p.c.1"),
        _end("k.sub.1", 3),
        _start("z", "z.c.1", 4),  # another session of the same partition
        _end("z.c.1", 5),
    ]
    with names.sink(partitions=1) as sink:
        for event in spawner:
            sink(event)
        assert sink.flush(30)
        asyncio.run(_run_until(names.worker(), lambda: "p" in _stored(names.schema), 30))
    load_outline = PostgresStore.load_outline

    def failing_for_p(store: PostgresStore, session_id: str) -> Any:
        if session_id == "p":
            raise ps.StoreError("permission denied for table sessions (simulated)")
        return load_outline(store, session_id)

    monkeypatch.setattr(PostgresStore, "load_outline", failing_for_p)
    with names.sink(partitions=1) as sink:
        for event in after:
            sink(event)
        assert sink.flush(30)
    caplog.set_level(logging.WARNING)
    worker = names.worker()
    asyncio.run(_run_until(worker, lambda: {"k", "z"} <= set(_stored(names.schema)), 30))
    assert {"k", "z"} <= set(_stored(names.schema))
    warnings = [record for record in caplog.records if "where sub-agents were spawned" in record.getMessage()]
    assert len(warnings) == 2  # read again for a while, then given up
    assert worker.stats.spawner_waits > 0


def test_a_sub_agent_published_by_another_process_goes_with_its_parent(names: Names) -> None:
    """The README said such a sub-agent is partitioned by its own session; its sink knows
    nothing of the parent but its loop id, and sends it with the session that names."""
    from phi_session.broker.settings import partition_of

    partitions = 16
    child = next(
        f"k{n}" for n in range(100) if partition_of(f"k{n}", partitions) != partition_of("p", partitions)
    )
    spawned_by = [_start("p", "p.c.1"), _spawned("p.c.1", "t", "sub", f"{child}.sub.1")]
    sub_agent = [_start(child, f"{child}.sub.1", 1, parent="p.c.1"), _end(f"{child}.sub.1", 2)]
    with names.sink(partitions=partitions) as parent_process, names.sink() as other_process:
        for events, sink in ((spawned_by, parent_process), (sub_agent, other_process)):
            for event in events:
                sink(event)
            assert sink.flush(30)
        parent_process(_end("p.c.1", 3))
    expected = _reference([[*spawned_by, *sub_agent, _end("p.c.1", 3)]])
    asyncio.run(_run_until(names.worker(), lambda: _stored(names.schema) == expected, 30))
    assert _stored(names.schema) == expected
    assert _partitions_used(names.schema) == {partition_of("p", partitions)}


def test_a_nested_sub_agent_published_by_another_process_keeps_its_tool_call(names: Names) -> None:
    """n spawns m (one process's sink), m spawns g, published by another process's sink,
    which never saw m start: it sends g with m's session, not m's root n, and the worker of
    that partition, holding no loop of m (still running, not saved), saved g with a spawn
    ref without its tool call, for good."""
    from phi_session.broker.settings import partition_of

    partitions = 16
    n = "n"
    m, g = (
        next(
            f"{name}{k}"
            for k in range(100)
            if partition_of(f"{name}{k}", partitions) != partition_of(n, partitions)
        )
        for name in "mg"
    )
    started = [_start(n, f"{n}.c.1"), _start(m, f"{m}.sub.1", 1, parent=f"{n}.c.1")]
    sub_sub_agent = [_start(g, f"{g}.sub.1", 2, parent=f"{m}.sub.1"), _end(f"{g}.sub.1", 3)]
    ended = [
        _spawned(f"{m}.sub.1", "toolu_02B", "researcher", f"{g}.sub.1"),
        _end(f"{m}.sub.1", 4),
        _spawned(f"{n}.c.1", "toolu_01A", "researcher", f"{m}.sub.1"),
        _end(f"{n}.c.1", 5),
    ]
    expected = _reference([[*started, *sub_sub_agent, *ended]])
    assert json.loads(expected[g])["parent_spawn_ref"]["tool_call_id"] == "toolu_02B"

    async def recorded(parent_process: JetStreamSink) -> None:
        worker = names.worker()
        # g is saved before m is: its worker finds no spawner in the store.
        await _stop_when(worker, asyncio.create_task(worker.run()), lambda: g in _stored(names.schema), 30)
        for event in ended:
            parent_process(event)
        assert parent_process.flush(30)
        await _run_until(names.worker(), lambda: _stored(names.schema) == expected, 30)

    with names.sink(partitions=partitions) as parent_process:
        with names.sink() as other_process:
            for events, sink in ((started, parent_process), (sub_sub_agent, other_process)):
                for event in events:
                    sink(event)
                assert sink.flush(30)
        asyncio.run(recorded(parent_process))
    assert _stored(names.schema) == expected


def test_message_ids_postgresql_cannot_hold_do_not_stop_the_worker(names: Names) -> None:
    """A NUL, or an id over the primary key's size limit, failed the staging INSERT: the
    worker died, and again on every start (the message is redelivered): a poison message."""
    events = list(workload.events(1, seed=13))
    _one_partition_stream(names)
    hostile = ["nul\x00" + str(n) if n % 2 else secrets.token_hex(2000) for n in range(len(events))]
    _publish_raw(
        names,
        [
            (f"{names.prefix}.0", encode_event(event), {"Nats-Msg-Id": msg_id})
            for event, msg_id in zip(events, hostile, strict=True)
        ],
    )
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, 30))
    assert _stored(names.schema) == expected
    assert len(_staged_ids(names.schema)) == len(events)


def test_postgresql_going_away_stops_the_worker_with_a_store_error(names: Names) -> None:
    """It ended with psycopg's OperationalError ("the connection is closed", from releasing
    the partitions on the dead connection, hiding why): the CLI called it an internal error."""
    from phi_session.errors import StoreError

    with names.sink(partitions=1) as sink:
        sink(next(workload.events(1, seed=14)))
        assert sink.flush(30)
    worker = names.worker()

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 30
        while not worker.stats.owned and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        status = await ingest_status(
            names.url, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix
        )
        with psycopg.connect(DSN, autocommit=True) as conn:  # as a PostgreSQL restart would
            conn.execute("SELECT pg_terminate_backend(%s)", (status[0].owner,))
        with pytest.raises(StoreError, match="PostgreSQL failed while ingesting: terminating connection"):
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())


# -- the sink -----------------------------------------------------------------------------------------


def _on_own_server(names: Names, server: PrivateServer) -> Iterator[Names]:
    server.start()
    names.url = server.url
    names.server = server  # type: ignore[attr-defined]
    yield names
    server.stop()
    names.url = URL  # the private server and its stream go with tmp_path


@pytest.fixture
def private(names: Names, tmp_path: Path) -> Iterator[Names]:
    yield from _on_own_server(names, PrivateServer(tmp_path / "jetstream"))


SMALL_PAYLOAD = 64 << 10


@pytest.fixture
def small_payload(names: Names, tmp_path: Path) -> Iterator[Names]:
    """`names` on a nats-server of its own taking messages of at most `SMALL_PAYLOAD` bytes."""
    yield from _on_own_server(names, PrivateServer(tmp_path / "jetstream", max_payload=SMALL_PAYLOAD))


def test_sink_spills_while_the_broker_is_down_and_sends_later(private: Names) -> None:
    names, server = private, private.server  # type: ignore[attr-defined]
    events = list(workload.events(2, seed=5))
    half = len(events) // 2
    sink = names.sink(buffer=100, publish_timeout=0.5)
    for event in events[:half]:
        sink(event)
    assert sink.flush(30)
    server.stop()
    for event in events[half:]:
        sink(event)  # never blocks: the buffer fills, then the rest goes to the spill journal
    assert not sink.flush(0.5)
    assert sink.stats().spilled > 0
    assert any(names.spill.iterdir())
    server.start()
    assert sink.flush(30)
    sink.close()
    assert sink.stats().published == len(events)
    assert not any(names.spill.iterdir())  # sent, then removed
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected))
    assert _stored(names.schema) == expected
    assert worker.stats.recorded == len(events)


def test_flush_can_give_up_at_once_while_nats_is_unreachable(private: Names) -> None:
    """`flush(timeout)` waits out its timeout for a broker that is down (its promise); with
    `fail_fast` it ends once an attempt to connect failed, and `unreachable` says why (the
    reason was "TimeoutError", after 4 s of nats-py retrying a refused connection)."""
    names, server = private, private.server  # type: ignore[attr-defined]
    server.stop()
    events = list(workload.events(1, seed=7))
    sink = names.sink()
    assert sink.unreachable is None  # nothing to send: no attempt yet
    for event in events:
        sink(event)
    assert not sink.flush(60, fail_fast=True)
    assert sink.unreachable is not None
    assert sink.unreachable.startswith(f"cannot reach NATS at {names.url}: ")
    assert "Connect call failed" in sink.unreachable
    server.start()
    assert sink.flush(60)  # still retrying: sent once NATS is back
    assert sink.unreachable is None
    sink.close()
    assert sink.stats().published == len(events)


def test_a_spill_journal_on_a_full_disk_loses_nothing_and_stops_nothing(private: Names) -> None:
    """A spill journal that failed on a full disk raised again when closed: the publishing
    thread died once it had sent that journal (nothing later was published), and
    `close()` raised into the agent, leaving the events after it unwritten."""
    names, server = private, private.server  # type: ignore[attr-defined]
    server.stop()
    producer = _helper(
        "spill_limited", names.url, names.stream, names.prefix, str(names.spill), "21", "100000"
    )
    assert producer.stdout is not None and producer.stdout.readline() == "spilled\n"
    server.start()
    out, err = producer.communicate(timeout=120)
    events = list(workload.events(1, seed=21))
    assert producer.returncode == 0, err
    assert "File too large" in err  # the journals did fill up
    assert out.split() == ["flushed", str(len(events))]
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, 60))
    assert _stored(names.schema) == expected
    assert worker.stats.recorded == len(events)


def test_workers_ride_out_a_broker_restart(private: Names) -> None:
    names, server = private, private.server  # type: ignore[attr-defined]
    events = list(workload.events(3, seed=8))
    expected = _reference([events])
    worker = names.worker()
    thread = threading.Thread(target=asyncio.run, args=(worker.run(),))
    sink = names.sink(partitions=2, publish_timeout=0.5)
    thread.start()
    try:
        for event in events[:1000]:
            sink(event)
        assert sink.flush(30)
        time.sleep(0.5)  # the worker is taking them
        server.stop()
        for event in events[1000:]:
            sink(event)
        time.sleep(1.0)  # the worker's fetches fail meanwhile
        server.start()
        assert sink.flush(30)
        sink.close()
        stored = _wait_stored(names.schema, expected)
    finally:
        worker.stop()
        thread.join(30)
    assert stored == expected
    # Partitions that failed on NATS restarted and replayed what was staged: `recorded` may
    # count events twice, the store never does (the sessions above are exact).
    ids = _staged_ids(names.schema)
    assert len(ids) == len(set(ids)) == len(events)


def test_a_worker_whose_connection_stops_answering_stops_saying_so(private: Names) -> None:
    """A connection open to the client that hears nothing more (its reading task ended, the
    server hangs) left the worker idle to all appearances, its partitions held, for as long
    as nats-py took to notice, if ever."""
    names, server = private, private.server  # type: ignore[attr-defined]
    worker = names.worker(partitions=1)

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        await _until(lambda: worker.stats.owned, task)
        server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BrokerError, match=r"^NATS at .* does not answer on an open connection"):
                await asyncio.wait_for(task, 90)
        finally:
            server.process.send_signal(signal.SIGCONT)

    asyncio.run(scenario())


def test_a_worker_stopped_while_nats_is_down_stops_cleanly(
    private: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the connection NATS had dropped raised ``ConnectionResetError`` out of
    `run()`: ``phi-session ingest`` printed "error: Connection lost" and no summary."""
    from phi_session.broker import worker as worker_module

    names, server = private, private.server  # type: ignore[attr-defined]
    clients = []
    connect = worker_module.connect

    async def connect_and_keep(*args: Any, **kwargs: Any) -> Any:
        clients.append(await connect(*args, **kwargs))
        return clients[-1]

    monkeypatch.setattr(worker_module, "connect", connect_and_keep)
    worker = names.worker(partitions=2)

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        while not worker.stats.owned:
            assert not task.done(), task.result()
            await asyncio.sleep(0.1)
        await asyncio.to_thread(server.stop)
        # Stopped once a request waits to be sent: closing flushes it, into the lost connection.
        await _stop_when(
            worker, task, lambda: clients[0].is_reconnecting and clients[0].pending_data_size > 0
        )

    asyncio.run(scenario())  # returns, raising nothing
    assert worker.stats.partitions_taken == 2


def _offline(names: Names) -> Names:
    """`names` with the URL of a port no broker listens on."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = free.getsockname()[1]
    return Names(names.stream, names.prefix, names.schema, names.spill, url=f"nats://127.0.0.1:{dead}")


def _spilled_offline(names: Names, events: list[Any]) -> JetStreamSink:
    """A closed sink that took `events` with no broker to reach: all left in `names.spill`."""
    sink = _offline(names).sink(buffer=10, publish_timeout=0.2)
    for event in events:
        sink(event)
    sink.close(timeout=0.5)
    return sink


def test_events_spilled_by_a_closed_sink_are_sent_by_the_next(names: Names) -> None:
    events = list(workload.events(1, seed=6))
    sink = _spilled_offline(names, events)  # nothing reached a broker: everything is kept on disk
    assert sink.stats().pending == len(events)
    with names.sink() as resender:
        assert resender.flush(30)
    assert not any(names.spill.iterdir())
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected))
    assert _stored(names.schema) == expected
    assert worker.stats.recorded == len(events)


def test_a_sink_counts_and_waits_for_the_spilled_events_of_dead_processes_it_sends(names: Names) -> None:
    """A new sink said pending=0, and its flush() returned True at once, while it had not
    sent what an earlier process left spilled yet (NATS unreachable)."""
    events = list(workload.events(1, seed=6))
    _spilled_offline(names, events)
    resender = _offline(names).sink(publish_timeout=0.2)
    assert resender.stats().pending == len(events)
    assert not resender.flush(1)
    resender.close(0)
    assert resender.stats().pending == len(events)  # still on disk, for the next sink
    with names.sink() as sender:
        assert sender.stats().pending == len(events)
        assert sender.flush(30)
        assert sender.stats() == SinkStats(published=len(events), spilled=0, pending=0)
    assert not any(names.spill.iterdir())


def _contents(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()
    }


def _refused_untouched_and_sent_later(names: Names, tmp_path: Path, events: list[Any], refusal: str) -> None:
    """Each spilled episode is refused by recovery and the recorder's journal (`refusal`
    naming why), nothing is touched or stored, and a sink sends every event after."""
    before = _contents(names.spill)
    store = ps.JsonDirStore(tmp_path / "store")
    for episode in names.spill.iterdir():
        with pytest.raises(ps.NotAJournal, match=refusal + r".*nothing was touched"):
            recover(episode, store)
        with pytest.raises(ps.NotAJournal, match=refusal):
            AutoPersistingRecorder(store, journal=episode)
        with pytest.raises(ps.NotAJournal):
            Journal(episode)
    assert _contents(names.spill) == before
    assert not (tmp_path / "store").exists()
    with names.sink() as resender:
        assert resender.flush(30)
        assert resender.stats().published == len(events)
    assert not any(names.spill.iterdir())


def test_a_spill_journal_is_refused_by_recover_and_the_recorders_journal_and_sent_later(
    names: Names, tmp_path: Path
) -> None:
    """`recover` on a spill journal (``record --to`` with the broker down) took its
    [msg_id, session, key, event] records for undecodable events: it wrote them all to
    orphans.jsonl and deleted the segments, and the next sink sent 0 of 60."""
    events = list(workload.events(1, seed=6))
    _spilled_offline(names, events)
    _refused_untouched_and_sent_later(names, tmp_path, events, r"is a broker spill journal")


def test_a_spill_journal_an_earlier_version_wrote_is_refused_by_recover_and_sent_later(
    names: Names, tmp_path: Path
) -> None:
    """Spill journals written before they had a header of their own begin as a recorder's
    journal: told by their records ([msg_id, session, key, event]), they are refused."""
    events = list(workload.events(1, seed=6))
    _spilled_offline(names, events)
    for segment in names.spill.glob("*/*.wal"):
        data = segment.read_bytes()
        segment.write_bytes(MAGIC + data[len(MAGIC) :])  # the header an earlier version wrote
    _refused_untouched_and_sent_later(names, tmp_path, events, r"is a broker spill journal.*earlier version")


def test_large_events_are_spilled_once_buffer_bytes_wait(names: Names) -> None:
    """The buffer counted events only: with the broker down, 500 events of 0.9 MB each
    took 430 MB of the agent's memory (10,000 of them would take 9 GB)."""
    texts = [line for line in workload.lines(1, seed=26) if b'"text":"' in line][:40]
    large = [decode_event(line.replace(b'"text":"', b'"text":"' + b"x" * 100_000)) for line in texts]
    sink = _offline(names).sink(buffer_bytes=1 << 20, publish_timeout=0.2)
    for event in large:
        sink(event)
    assert len(large) - sink.stats().spilled <= 12  # 1 MiB waiting, and the batch being sent
    sink.close(timeout=0.5)
    assert sink.stats().pending == len(large)  # all kept on disk


def test_a_dead_producers_spill_is_sent_in_order_by_one_sink(names: Names) -> None:
    """Sinks starting together on one spill directory shared a dead producer's spill
    journals: one that found the first held by another sink took the later ones and sent
    them first, so a session's events reached the stream out of order."""
    events = list(workload.events(1, seed=25))
    _spilled_offline(names, events)
    spilled = sorted(names.spill.iterdir())
    assert len(spilled) >= 2
    first = DirectoryLock(spilled[0])  # another sink is sending it
    try:
        with names.sink():
            pass  # closing waits for the spill journals it took to be sent
    finally:
        first.release()
    assert sorted(names.spill.iterdir()) == spilled  # all left to the sink holding the first
    with names.sink():
        pass
    assert not any(names.spill.iterdir())
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, 60))
    assert _stored(names.schema) == expected


@pytest.mark.parametrize("older_names", [False, True])
def test_spills_of_several_dead_producers_are_sent_oldest_first(
    names: Names, monkeypatch: pytest.MonkeyPatch, older_names: bool
) -> None:
    """Spill journals were sent in the order of their producer ids (random): a session
    one process began and the next continued, both spilled, was sent second half first,
    its events rejected as of no open loop, and the session never saved."""
    from phi_session.broker import sink as sink_module

    events = list(workload.events(1, seed=27))
    half = len(events) // 2
    for producer, part in (("f" * 16, events[:half]), ("0" * 16, events[half:])):  # ids sort backwards
        monkeypatch.setattr(sink_module.uuid, "uuid4", lambda producer=producer: uuid.UUID(producer * 2))
        _spilled_offline(names, part)
    monkeypatch.undo()
    if older_names:  # as versions up to 0.1 named them: no start time, the files' times tell
        for index, path in enumerate(sorted(names.spill.iterdir())):  # as they were made
            for file in path.iterdir():
                os.utime(file, ns=(index * 10**9, index * 10**9))
            path.rename(path.with_name(path.name[-29:]))
    with names.sink() as resender:
        assert resender.flush(30)
    assert not any(names.spill.iterdir())
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, 60))
    assert _stored(names.schema) == expected
    assert worker.stats.rejected == 0


def test_a_spill_journal_is_sent_a_chunk_at_a_time(names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sending a spill journal read all of it into one list first: the memory it took grew
    with the outage (177 MB spilled, 468 MB at the peak)."""
    from phi_session.broker import sink as sink_module

    events = list(workload.events(3, seed=28))
    _spilled_offline(names, events)
    # Records read by the reading under way and events of it handed to send; events sent in all.
    counts = {"read": 0, "sent": 0, "total": 0}
    held: list[int] = []  # at each publish: read but not yet sent
    read_records, send = sink_module.read_records, sink_module._Publisher.send

    def counting_reads(*args: Any) -> Iterator[Any]:
        counts["read"] = counts["sent"] = 0
        for record in read_records(*args):
            counts["read"] += 1
            yield record

    async def counting_send(publisher: Any, messages: list[Any]) -> Any:
        held.append(counts["read"] - counts["sent"])
        counts["sent"] += len(messages)
        counts["total"] += len(messages)
        return await send(publisher, messages)

    monkeypatch.setattr(sink_module, "read_records", counting_reads)
    monkeypatch.setattr(sink_module._Publisher, "send", counting_send)
    with names.sink(batch=16) as resender:
        assert resender.flush(30)
    assert counts["total"] == len(events)  # in however many journals the outage's timing made
    assert len(held) > len(events) // 16 and max(held) <= 16
    assert not any(names.spill.iterdir())


def test_a_spill_journal_damaged_past_reading_is_reported_and_kept(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """Its segment overwritten whole, it was taken for a journal another sink holds and
    skipped for ever, without a word."""
    events = list(workload.events(1, seed=29))
    _spilled_offline(names, events)
    episode = max(names.spill.iterdir(), key=lambda path: sum(1 for _ in read_records(path)))
    (episode / "0000000000.wal").write_bytes(b"garbage" * 100)
    with names.sink() as resender:
        assert resender.flush(30)
    kept = names.spill / "rejected" / episode.name
    assert not episode.exists() and (kept / "0000000000.wal").read_bytes() == b"garbage" * 100
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert any(f"spill journal {episode} is unreadable" in error and str(kept) in error for error in errors)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_spill_journal_is_reported_and_kept(
    names: Names, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Damage in a spill journal was skipped without a word, and the journal deleted once
    the rest was sent: events lost, and the evidence with them."""
    events = list(workload.events(1, seed=29))
    _spilled_offline(names, events)
    episode = max(names.spill.iterdir(), key=lambda path: sum(1 for _ in read_records(path)))
    segment = episode / "0000000000.wal"
    data = bytearray(segment.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    segment.write_bytes(bytes(data))
    with names.sink() as resender:
        assert resender.flush(30)
    kept = names.spill / "rejected" / episode.name
    assert not episode.exists() and kept.is_dir()
    assert (kept / segment.name).read_bytes() == bytes(data)
    lost = "an unknown number of" if damage == "truncate" else r"\d+"
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    damaged = (
        f"LOST {lost} events: spill journal {episode} is damaged .*; its (\\d+) readable events were sent"
    )
    found = [match for match in map(re.compile(damaged).match, errors) if match]
    assert found and 0 < int(found[0][1]) < len(events)


def _events_with_prompt(size: int) -> list[Any]:
    """A workload session whose first prompt is `size` bytes: its MessageStart and MessageEnd,
    and the loop's AgentEnd, carry it."""
    lines = workload.lines(1, seed=10)
    prompt = json.loads(lines[2])["message"]["content"][0]["text"].encode()
    return [decode_event(line.replace(prompt, b"x" * size)) for line in lines]


def _big(events: list[Any], size: int) -> list[int]:
    """The positions of the events of `events` whose JSON is over `size` bytes."""
    return [index for index, event in enumerate(events) if len(encode_event(event)) > size]


def _stream_headers(url: str, stream: str) -> list[dict[str, str]]:
    """The headers of each message in `stream` that has some, in order."""

    async def read() -> list[dict[str, str]]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        stored = [await js.get_msg(stream, seq) for seq in range(state.first_seq, state.last_seq + 1)]
        await nc.close()
        return [message.headers for message in stored if message.headers]

    return asyncio.run(read())


def _stream_ids(url: str, stream: str) -> list[str]:
    """The Nats-Msg-Id of each message in `stream`, in order."""
    return [headers["Nats-Msg-Id"] for headers in _stream_headers(url, stream)]


def test_an_event_over_the_max_payload_is_sent_in_pieces_and_recorded_whole(small_payload: Names) -> None:
    """NATS refuses a message over its max_payload: the event was set aside, never sent. An
    AgentEnd carries every message of its loop, so any long loop's was (its session then
    stored Aborted, without its messages, once idle_timeout passed)."""
    names = small_payload
    events = _events_with_prompt(200_000)
    big = _big(events, SMALL_PAYLOAD)
    assert len(big) == 3
    with names.sink(partitions=1) as sink:
        for event in events:
            sink(event)
        assert sink.flush(30)
        assert sink.stats() == SinkStats(published=len(events), spilled=0, pending=0, rejected=0)
    assert not (names.spill / "rejected").exists()
    assert len(_stream_ids(names.url, names.stream)) > len(events) + 2 * len(big)  # 4 pieces each
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(
        _run_until(worker, lambda: _stored(names.schema) == expected and _staged_pending(names.schema) == 0)
    )
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0
    assert (worker.stats.recorded, worker.stats.duplicates, worker.stats.rejected) == (len(events), 0, 0)


def _down_after(monkeypatch: pytest.MonkeyPatch, taken: int) -> list[int]:
    """Have NATS take `taken` publications, then time out on every one: the count still
    taken, to set (``1 << 30``: NATS is back)."""
    from nats.js.client import JetStreamContext

    open_for = [taken]
    publish = JetStreamContext.publish

    async def until_down(self: Any, *args: Any, **kwargs: Any) -> Any:
        if open_for[0] <= 0:
            raise nats.errors.TimeoutError
        open_for[0] -= 1
        return await publish(self, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "publish", until_down)
    return open_for


def _staged_by_a_killed_worker(names: Names, count: int) -> None:
    """Run a worker that acknowledges nothing (killed before it could) until `count` messages
    are staged: they are pending, and the stream delivers them again."""
    from nats.aio.msg import Msg

    async def killed_before(self: Any) -> None:
        pass

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Msg, "ack", killed_before)
        first = names.worker()
        asyncio.run(_run_until(first, lambda: len(_staged_ids_or_none(names.schema)) == count, 60))
    assert _staged_pending(names.schema) == count


def test_pieces_a_killed_worker_staged_are_replayed_and_their_redelivery_dropped(
    small_payload: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed with half an event's pieces staged (and not yet acknowledged): the
    next replays them, drops their redelivered copies, and takes the rest from the stream."""
    names = small_payload
    events = _events_with_prompt(200_000)
    taken = _big(events, SMALL_PAYLOAD)[0] + 2  # the events before the first large one, two pieces of it
    open_for = _down_after(monkeypatch, taken)
    sink = names.sink(partitions=1, publish_timeout=1)
    for event in events:
        sink(event)
    assert not sink.flush(1)
    _staged_by_a_killed_worker(names, taken)
    open_for[0] = 1 << 30  # NATS is back: the sink sends the rest
    assert sink.flush(30)
    sink.close()
    expected = _reference([events])
    second = names.worker()
    asyncio.run(_run_until(second, lambda: _stored(names.schema) == expected))
    assert _stored(names.schema) == expected
    assert (second.stats.recorded, second.stats.duplicates) == (len(events), taken)


def test_an_event_sent_again_cut_otherwise_is_recorded_once(
    small_payload: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spill journal sent twice (its sink killed before removing it), the second time to a
    server of a smaller max_payload: the large events' pieces differ, and are no duplicates
    of the first ones, but each event is recorded once (the pieces of the second cut: duplicates)."""
    from nats.aio.client import Client

    names = small_payload
    events = _events_with_prompt(200_000)
    _spilled_offline(names, events)
    copy_dir = names.spill.with_name(f"{names.spill.name}-copy")
    copy = Names(names.stream, names.prefix, names.schema, copy_dir, url=names.url)
    shutil.copytree(names.spill, copy.spill)
    try:
        with names.sink() as sender:
            assert sender.flush(30)
        sent = len(_stream_ids(names.url, names.stream))
        monkeypatch.setattr(Client, "max_payload", property(lambda self: SMALL_PAYLOAD // 2))
        with copy.sink() as resender:
            assert resender.flush(30)
        monkeypatch.undo()
    finally:
        shutil.rmtree(copy_dir, ignore_errors=True)
    resent = len(_stream_ids(names.url, names.stream)) - sent  # the others: duplicates of whole events
    assert resent > 6 * len(_big(events, SMALL_PAYLOAD))
    expected = _reference([events])
    worker = names.worker()
    asyncio.run(
        _run_until(worker, lambda: _stored(names.schema) == expected and _staged_pending(names.schema) == 0)
    )
    assert _stored(names.schema) == expected
    assert _staged_pending(names.schema) == 0
    assert (worker.stats.recorded, worker.stats.duplicates) == (len(events), resent)


@pytest.mark.parametrize("replayed", [False, True], ids=["taken", "replayed"])
def test_stray_pieces_of_an_event_recorded_whole_or_joined_are_duplicates(
    small_payload: Names, monkeypatch: pytest.MonkeyPatch, replayed: bool
) -> None:
    """An event cut under a smaller max_payload (another server), one piece of it taken, then
    sent whole (the limit allows it now); and, after it and an event joined from its pieces,
    one piece of each cut otherwise (a spill journal sent again, its sink killed after one
    piece). Each stray piece was held until idle_timeout, then kept as rejected (counted by
    `ingest status`, payload kept), though its event was recorded once, whole. Replayed: a
    worker killed before acknowledging had staged them all."""
    from nats.aio.client import Client

    from phi_session.broker.settings import PIECE_OF_HEADER, SESSION_HEADER, publications

    names = small_payload
    limit = SMALL_PAYLOAD // 2
    # Its large events: whole under SMALL_PAYLOAD, in two pieces under `limit`.
    events = _events_with_prompt(40_000)
    big = _big(events, limit)
    open_for = _down_after(monkeypatch, 1 << 30)
    monkeypatch.setattr(Client, "max_payload", property(lambda self: limit))
    sink = names.sink(partitions=1, publish_timeout=1)
    for event in events[: big[1]]:
        sink(event)
    assert sink.flush(30)  # the first large event in two pieces
    open_for[0] = 1  # one piece of the second
    for event in events[big[1] :]:
        sink(event)
    assert not sink.flush(2)
    monkeypatch.undo()  # NATS is back, and takes the second large event whole
    assert sink.flush(30)
    sink.close()
    headers = _stream_headers(names.url, names.stream)
    cut = list(dict.fromkeys(piece[PIECE_OF_HEADER] for piece in headers if PIECE_OF_HEADER in piece))
    assert [sum(piece.get(PIECE_OF_HEADER) == event_id for piece in headers) for event_id in cut] == [2, 1]
    strays = [
        publications(event_id, headers[0][SESSION_HEADER], encode_event(events[index]), limit // 2)[0]
        for event_id, index in zip(cut, big[:2], strict=True)
    ]

    async def send_strays() -> None:
        nc = await nats.connect(names.url)
        for payload, piece_headers in strays:
            await nc.jetstream().publish(f"{names.prefix}.0", payload, headers=piece_headers)
        await nc.close()

    asyncio.run(send_strays())
    sent = len(headers) + len(strays)
    redelivered = sent if replayed else 0
    if replayed:
        _staged_by_a_killed_worker(names, sent)
    expected = _reference([events])
    worker = names.worker(idle_timeout=1.0)
    asyncio.run(
        _run_until(
            worker,
            lambda: (
                _stored(names.schema) == expected
                and len(_staged_ids(names.schema)) > sent  # the joined event too
                and _staged_pending(names.schema) == 0
            ),
            60,
        )
    )
    assert _stored(names.schema) == expected
    stats = worker.stats
    assert (stats.recorded, stats.duplicates - redelivered, stats.rejected) == (len(events), 3, 0)
    status = asyncio.run(
        ingest_status(names.url, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix)
    )
    assert [(row.staged, row.rejected) for row in status] == [(0, 0)]


TINY_PAYLOAD = 100  # too few bytes for a piece's headers


def test_an_event_nats_takes_not_even_in_pieces_is_set_aside(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose max_payload leaves no room beside a piece's headers refuses an event
    every time: retried, it would hold up every later event, and from the spill journal
    every later sink too."""
    from nats.aio.client import Client

    events = list(workload.events(1, seed=10))
    with monkeypatch.context() as patched:
        patched.setattr(Client, "max_payload", property(lambda self: TINY_PAYLOAD))
        with names.sink(partitions=1, publish_timeout=1) as sink:
            for event in events:
                sink(event)
            assert sink.flush(30)
            stats = sink.stats()
    assert (stats.published, stats.rejected, stats.pending) == (0, len(events), 0)
    kept = sorted((names.spill / "rejected").iterdir())
    assert sorted(path.read_bytes() for path in kept) == sorted(map(encode_event, events))  # kept whole
    with names.sink(partitions=1) as resender:
        assert resender.stats().pending == 0  # the set-aside events are not sent again


def test_a_backlog_of_large_messages_is_taken_without_the_server_cutting_the_worker_off(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """A pull asked for 256 messages whatever their size: of ~1 MB each, more than the
    server holds for one client (max_pending, 64 MiB), which cut the worker off as a slow
    consumer, silently; what was in flight came again only after ack_wait, over and over."""
    _one_partition_stream(names)
    events = list(workload.events(1, seed=6))
    subject = f"{names.prefix}.0"
    padding = b'{"pad":"' + b"x" * 1_000_000 + b'"}'  # no event: kept as rejected
    big = [(subject, padding, {"Nats-Msg-Id": f"big-{n}"}) for n in range(150)]
    session = {"Phi-Session": events[0].session_id}
    small = [(subject, encode_event(e), {"Nats-Msg-Id": f"e-{n}", **session}) for n, e in enumerate(events)]
    _publish_raw(names, big + small)
    expected = _reference([events])
    worker = names.worker(ack_wait=5.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="phi_session.broker"):
        asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, timeout=120))
    assert _stored(names.schema) == expected
    assert time.monotonic() - started < 30
    assert (worker.stats.received, worker.stats.rejected) == (len(big) + len(small), len(big))
    assert not [record for record in caplog.records if "NATS connection" in record.getMessage()]


def test_a_connection_failing_once_connected_is_warned_of_once_a_minute(
    private: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """Once connected, the client's errors (the server cutting it off as a slow consumer, a
    dropped connection) went unsaid: a worker cut off over and over logged nothing."""
    from phi_session.broker.settings import close_quietly, connect

    names, server = private, private.server  # type: ignore[attr-defined]

    async def cut_off() -> None:
        nc = await connect(names.url, name="test")
        server.stop()
        await asyncio.sleep(2)  # reconnecting every 0.5 s, failing each time
        await close_quietly(nc)

    with caplog.at_level(logging.WARNING, logger="phi_session.broker"):
        asyncio.run(cut_off())
    warned = [record.getMessage() for record in caplog.records if "NATS connection" in record.getMessage()]
    assert len(warned) == 1 and names.url in warned[0], warned


def test_events_refused_by_a_full_stream_are_stored_in_order_once_it_has_room(names: Names) -> None:
    """A full stream (discard new) refused the large events of a batch sent at once and took
    the smaller ones after them; the whole batch was sent again, so the refused ones were
    stored after those: their session recorded out of order. (Each refusal also waited
    out publish_timeout: nats-py never resolved its future.)"""
    events = _events_with_prompt(300_000)[:60]
    assert sum(len(encode_event(event)) > 100_000 for event in events) == 2

    async def fill() -> list[int]:
        from phi_session.broker.settings import StreamSettings, ensure_stream

        nc = await nats.connect(names.url)
        js = nc.jetstream()
        settings = StreamSettings(
            stream=names.stream, subject_prefix=names.prefix, partitions=1, max_bytes=1 << 20
        )
        await ensure_stream(js, settings)
        # ~150 KB left: room for the small events, not for the 300 KB ones.
        filler = [(await js.publish(settings.subject(0), b"f" * 100_000)).seq for _ in range(9)]
        await nc.close()
        return filler

    async def make_room(filler: list[int]) -> None:
        nc = await nats.connect(names.url)
        for seq in filler:
            await nc.jetstream().delete_msg(names.stream, seq)
        await nc.close()

    filler = asyncio.run(fill())
    with names.sink(partitions=1, publish_timeout=30) as sink:
        for event in events:
            sink(event)
        assert not sink.flush(3)
        asyncio.run(make_room(filler))
        made_room = time.monotonic()
        assert sink.flush(60)
        assert time.monotonic() - made_room < 10  # a refusal is known at once: no publish_timeout
        stats = sink.stats()
    assert (stats.published, stats.pending) == (len(events), 0)
    ids = _stream_ids(names.url, names.stream)
    assert [int(msg_id.rsplit("-", 1)[1]) for msg_id in ids] == list(range(1, len(events) + 1))


def test_an_event_nats_takes_not_even_in_pieces_that_cannot_be_set_aside_is_counted_lost(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was logged, and counted nowhere: `close` returned, ``stats()`` said nothing."""
    from nats.aio.client import Client

    events = list(workload.events(1, seed=10))[:5]
    monkeypatch.setattr(Client, "max_payload", property(lambda self: TINY_PAYLOAD))
    read_only(monkeypatch, names.spill / "rejected")
    sink = names.sink(partitions=1, publish_timeout=1)
    for event in events:
        sink(event)
    assert sink.flush(30)
    with pytest.raises(BrokerError) as raised:
        sink.close()
    assert sink.stats() == SinkStats(published=0, spilled=0, pending=0, rejected=0, lost=5)
    assert str(raised.value) == (
        f"LOST 5 events: 5 over the max_payload of NATS at {URL} even in pieces and not written to"
        f" {names.spill / 'rejected'} (Read-only file system)"
    )


def test_a_sink_left_open_at_exit_keeps_its_events(names: Names) -> None:
    """A program that ends without `close`: the publishing thread is a daemon, and the
    events it had not sent vanished with it, without a word. With NATS never reached, the
    exit then waited out `close`'s 10 s flush before keeping them."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = free.getsockname()[1]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import workload\n"
        "from phi_session.broker import JetStreamSink\n"
        "sink = JetStreamSink(sys.argv[2], spill_dir=sys.argv[3], publish_timeout=0.2)\n"
        "for event in workload.events(1, seed=15):\n"
        "    sink(event)\n"
    )
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", script, benchmarks, f"nats://127.0.0.1:{dead}", str(names.spill)],
        env=env,
        check=True,
        timeout=120,
    )
    assert time.monotonic() - started < 8
    kept = sum(1 for episode in names.spill.iterdir() for _ in read_records(episode))
    assert kept == workload.EVENTS_PER_SESSION


def test_a_flush_timeout_longer_than_a_float_holds_is_no_limit(tmp_path: Path) -> None:
    """flush(timeout=10**400) raised OverflowError adding it to the clock."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        unreachable = f"nats://127.0.0.1:{free.getsockname()[1]}"
    sink = JetStreamSink(unreachable, spill_dir=tmp_path, publish_timeout=0.2)
    try:
        assert sink.flush(10**400)  # nothing queued
        assert sink.flush(math.inf)
    finally:
        sink.close(timeout=0)


@needs_fork
def test_a_sink_is_refused_in_a_forked_child_and_a_tracer_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A child's events went into a copy of the queue that no thread sends, and its exit
    hook is its parent's: they were lost, without a word."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        unreachable = f"nats://127.0.0.1:{free.getsockname()[1]}"
    events = list(workload.events(1, seed=4))
    sink = JetStreamSink(unreachable, spill_dir=tmp_path, publish_timeout=0.2)
    sink(events[0])

    def child() -> None:
        with pytest.raises(UsedAfterFork, match="a forked process must make its own JetStreamSink"):
            sink(events[1])
        tracer = Tracer(AgentSession(), sinks=[sink])
        with caplog.at_level(logging.ERROR, logger="phi_session.sinks"):
            with tracer.loop(LoopConfigSnapshot(model="m", provider="p")) as loop:
                loop.user("hi")
        assert list(tracer.sink_errors) == [repr(sink)]  # every event failed, and was counted
        (logged,) = [r for r in caplog.records if r.exc_info and r.exc_info[0] is UsedAfterFork]
        assert "failed with UsedAfterFork" in logged.getMessage()
        sink.close(timeout=0)  # the parent's events are the parent's to send or spill

    assert in_forked_child(child) == 0
    sink(events[1])
    sink.close(timeout=0)
    assert sum(1 for episode in tmp_path.iterdir() for _ in read_records(episode)) == 2


def test_a_sink_touches_nothing_in_spill_dir_but_its_own(names: Names) -> None:
    """Every directory found in `spill_dir` was taken for a spill journal a dead sink left,
    "sent" (it held no records) and removed: ``spill_dir="."`` deleted the project."""
    (names.spill / "precious").mkdir()
    (names.spill / "precious" / "data.txt").write_text("keep me")
    with names.sink() as sink:
        sink(next(workload.events(1, seed=18)))
        assert sink.flush(30)
    assert (names.spill / "precious" / "data.txt").read_text() == "keep me"
    assert sorted(path.name for path in (names.spill / "precious").iterdir()) == ["data.txt"]


def test_a_spill_dir_that_is_not_a_directory_is_refused_at_once(tmp_path: Path) -> None:
    """It was found once the broker was down: every spill journal failed to open (a
    traceback each time), the events stayed in memory, and `close` lost them."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for spill in (blocker, blocker / "spill"):
        with pytest.raises(BrokerError, match=f"^spill_dir {spill}: {blocker} is not a directory$"):
            JetStreamSink(URL, spill_dir=spill)


def test_a_spill_dir_that_cannot_be_written_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was taken: with the broker down, no spill journal could be made, and `close`
    logged the events as lost, returned, and counted them nowhere."""
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    for spill in (tmp_path / "ro", tmp_path / "ro" / "not" / "yet"):
        with pytest.raises(
            BrokerError, match=f"^spill_dir {spill}: cannot write there: Read-only file system$"
        ):
            JetStreamSink(URL, spill_dir=spill)
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("writes", [0, 3])
def test_events_a_full_disk_refuses_at_close_are_counted_and_raised(
    names: Names, monkeypatch: pytest.MonkeyPatch, writes: int
) -> None:
    """`close` logged them as lost and returned; `stats()` counted them nowhere (and
    ``record --to`` said they were kept)."""
    offline = _offline(names)
    events = list(workload.events(1, seed=4))[:20]
    sink = offline.sink(batch=8, publish_timeout=0.2)
    for event in events:
        sink(event)
    with monkeypatch.context() as patched, pytest.raises(BrokerError) as raised:
        full_disk_after(patched, writes)  # the segment's header, then records
        sink.close(timeout=0)
    stats = sink.stats()
    kept = sum(1 for episode in names.spill.iterdir() for _ in read_records(episode))
    if writes == 0:
        assert (stats.lost, stats.pending) == (len(events), 0)
        assert list(names.spill.iterdir()) == []  # no empty journal for the next sink to "send"
    else:  # what was written before the disk filled is kept, and said to be
        assert 0 < stats.pending < len(events)
        assert stats.lost == len(events) - stats.pending
    assert kept == stats.pending
    kept_too = f"; {kept} kept in {names.spill} for the next sink" if kept else ""
    assert str(raised.value) == (
        f"LOST {stats.lost} events: {stats.lost} not taken by NATS at {offline.url} and not"
        f" written to a spill journal in {names.spill} (No space left on device){kept_too}"
    )
    sink.close()  # once: already closed


def test_a_close_interrupted_while_spilling_is_finished_by_the_next(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `close` spilled what NATS had not taken, then `close` again: the second
    returned at once, and the events not yet written died with the process."""
    events = list(workload.events(1, seed=4))[:20]
    sink = _offline(names).sink(batch=8, publish_timeout=0.2)
    for event in events:
        sink(event)
    appended = 0
    append_json = Journal.append_json

    def interrupted_once(journal: Journal, data: bytes | str, *, commit: bool = True) -> int:
        nonlocal appended
        appended += 1
        if appended == 10:  # in the second batch
            raise KeyboardInterrupt
        return append_json(journal, data, commit=commit)

    monkeypatch.setattr(Journal, "append_json", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        sink.close(timeout=0)
    with pytest.raises(BrokerError, match="is closed"):  # no event is taken meanwhile
        sink(events[0])
    sink.close(timeout=0)
    assert sink.stats() == SinkStats(published=0, spilled=0, pending=len(events))
    kept = [
        msgspec.json.decode(record.payload)[3]
        for episode in sorted(names.spill.iterdir())
        for record in read_records(episode)
    ]
    assert kept == [json.loads(encode_event(event)) for event in events]  # each once, in order


def test_sinks_spilling_at_once_create_their_spill_dir_together(tmp_path: Path) -> None:
    """Creating the spill directory is idempotent: sinks closing at the same moment on
    a `spill_dir` none of them has created yet all keep their events there."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        unreachable = f"nats://127.0.0.1:{free.getsockname()[1]}"
    spill = tmp_path / "not" / "yet" / "spill"
    events = list(workload.events(1, seed=3))
    sinks = [JetStreamSink(unreachable, spill_dir=spill) for _ in range(8)]
    for sink in sinks:
        for event in events:
            sink(event)
    together = threading.Barrier(len(sinks))

    def close(sink: JetStreamSink) -> None:
        together.wait()
        sink.close(timeout=0)

    closing = [threading.Thread(target=close, args=(sink,)) for sink in sinks]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()
    assert [sink.stats().pending for sink in sinks] == [len(events)] * len(sinks)
    kept = sum(1 for episode in spill.iterdir() for _ in read_records(episode))
    assert kept == len(events) * len(sinks)


def test_sink_checks_its_arguments(names: Names) -> None:
    with pytest.raises(ValueError, match="buffer"):
        names.sink(buffer=0)
    with pytest.raises(ValueError, match="stream"):
        JetStreamSink(URL, stream="bad.name")
    with pytest.raises(TypeError):
        JetStreamSink(42)  # type: ignore[arg-type]


def test_a_url_that_is_not_nats_is_refused_at_once(names: Names, tmp_path: Path) -> None:
    """It was found only by the publishing thread, which retried it forever: `record --to`
    spent its whole flush timeout, then said the events were kept for later."""
    for make in (lambda url: JetStreamSink(url, spill_dir=names.spill), lambda url: IngestWorker(url, DSN)):
        with pytest.raises(ValueError, match="not a NATS server URL"):
            make("http://127.0.0.1:4222")
    source = tmp_path / "events.jsonl"
    source.write_bytes(encode_event(next(workload.events(1, seed=1))) + b"\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    out = subprocess.run(
        [*CLI, "record", str(source), "--to", "http://127.0.0.1:4222"],
        env=env,
        text=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2 and "not a NATS server URL" in out.stderr, out.stderr
    assert time.monotonic() - started < 30


def test_a_bad_durable_name_is_named_as_such() -> None:
    """`phi-session ingest --durable a.b` said "stream: expected ...": the wrong option."""
    with pytest.raises(ValueError, match=r"^durable: expected 1-64 letters"):
        IngestWorker(URL, DSN, durable="a.b")


def test_seconds_nats_cannot_hold_are_refused_at_once() -> None:
    """``--ack-wait inf`` crashed with an internal OverflowError; 1e10 (over the int64 of
    nanoseconds NATS takes) had the server refuse the consumer, and the worker ran on idle."""
    for value in (math.inf, math.nan, 1e10, 0):
        with pytest.raises(ValueError, match=r"^ack_wait must be a positive number of seconds up to 9e\+09"):
            IngestWorker(URL, DSN, ack_wait=value)
    IngestWorker(URL, DSN, ack_wait=9e9)
    with pytest.raises(ValueError, match=r"^idle_timeout must be a positive number of seconds"):
        IngestWorker(URL, DSN, idle_timeout=0)


def test_fetch_bytes_too_few_for_a_pull_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match=r"^fetch_bytes must be at least 1 MiB"):
        IngestWorker(URL, DSN, fetch_bytes=1000)
    with pytest.raises(TypeError, match=r"fetch_bytes"):
        IngestWorker(URL, DSN, fetch_bytes=2.5e7)  # type: ignore[arg-type]


def test_a_consumer_the_server_refuses_stops_the_worker_saying_why(names: Names) -> None:
    """A second consumer group on the work-queue stream is refused by the server: the
    refusal was taken for a consumer that exists, whose lookup then failed and was taken
    for NATS being down, so the worker ran for ever doing nothing."""
    first = names.worker(partitions=1)
    asyncio.run(_run_until(first, lambda: first.stats.owned))
    second = names.worker(durable="other")
    with pytest.raises(BrokerError, match=r"^cannot create consumer other-0 on stream .*: filtered consumer"):
        asyncio.run(asyncio.wait_for(second.run(), 120))


def test_a_stream_whose_subjects_another_stream_takes_is_a_configuration_error(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refused the stream (subjects overlap another stream's): the refusal was
    taken for the other side having created it, whose lookup failed. The worker crashed with
    "internal error: NotFoundError"; the sink said "stream not found" and asked every 2 s."""
    _one_partition_stream(names)
    other = Names(stream=f"{names.stream}_B", prefix=names.prefix, schema=names.schema, spill=names.spill)
    refusal = rf"^cannot create stream {other.stream} on subjects {names.prefix}\.\*: subjects overlap"
    with pytest.raises(BrokerError, match=refusal):
        asyncio.run(asyncio.wait_for(other.worker().run(), 60))
    from phi_session.broker import sink as sink_module

    asked = []

    async def counted(*args: Any) -> Any:
        asked.append(time.monotonic())
        return await ensure_stream(*args)

    ensure_stream = sink_module.ensure_stream
    monkeypatch.setattr(sink_module, "ensure_stream", counted)
    sink = other.sink(publish_timeout=1.0)
    try:
        sink(next(iter(workload.events(1, seed=3))))
        assert not sink.flush(10, fail_fast=True)
        assert re.match(refusal, sink.unreachable or "")
        time.sleep(3)
        assert len(asked) == 1  # a configuration error: not asked again and again
    finally:
        sink.close(0)
    assert sink.stats().pending == 1  # kept in the spill journal for the next sink


def test_a_worker_of_another_store_is_refused_the_consumers_of_a_stream(names: Names) -> None:
    """Workers with the same durable recording into two schemas (or databases) shared the
    consumers, each taking part of every session: partition locks are per store."""
    first = names.worker(partitions=2)
    asyncio.run(_run_until(first, lambda: len(first.stats.owned) == 2))
    other = Names(names.stream, names.prefix, f"{names.schema}_b", names.spill)
    try:
        refusal = (
            rf"^consumer phi-ingest-[01] of stream {names.stream} records into another store \(schema"
            rf" {names.schema} of database .*\), not schema {other.schema} of database .*: a store needs"
            r" a stream of its own"
        )
        with pytest.raises(BrokerError, match=refusal):
            asyncio.run(asyncio.wait_for(other.worker().run(), 60))
        again = names.worker()  # its own store's worker still takes them
        asyncio.run(_run_until(again, lambda: len(again.stats.owned) == 2))
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(other.schema)
                )
            )


def test_importing_phi_session_imports_no_broker_client() -> None:
    code = "import sys, phi_session, phi_session.broker; print('nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the command line ----------------------------------------------------------------------------------


def test_record_to_nats_then_ingest_and_status(names: Names, tmp_path: Path) -> None:
    events = list(workload.events(2, seed=7))
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(encode_event(event) for event in events) + b"\n{not json\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PHI_SESSION_NATS_PARTITIONS": "2",
        "PHI_SESSION_NATS_STREAM": names.stream,
        "PHI_SESSION_NATS_SUBJECT_PREFIX": names.prefix,
    }
    store = f"{DSN}{'&' if '?' in DSN else '?'}schema={names.schema}"

    def cli(*args: str, **options: Any) -> Any:
        return subprocess.run([*CLI, *args], env=env, text=True, capture_output=True, cwd=tmp_path, **options)

    published = cli("record", str(source), "--to", URL, "--json")
    assert published.returncode == 0, published.stderr
    assert '"published": 1240' in published.stdout and "line 1,241" in published.stderr
    status = cli("ingest", URL, "--store", store, "--status", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert [row["partition"] for row in rows] == [0, 1]
    assert sum(row["in_stream"] for row in rows) == len(events)  # the lag: nothing ingested yet
    worker = subprocess.Popen(
        [*CLI, "ingest", URL, "--store", store],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    expected = _reference([events])
    stored = _wait_stored(names.schema, expected)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "recorded 1,240 events" in out
    assert stored == expected
    assert cli("ingest", URL, "--store", str(tmp_path / "x.db")).returncode == 2


def test_a_second_signal_stops_ingest_at_once_while_postgresql_does_not_answer(names: Names) -> None:
    """Every SIGTERM and Ctrl-C only asked for the clean stop, which waited for PostgreSQL
    (its staging SQL blocked) for ever: nothing but SIGKILL ended `phi-session ingest`."""
    _one_partition_stream(names)
    store = f"{DSN}{'&' if '?' in DSN else '?'}schema={names.schema}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["ingest", URL, "--store", store, "--stream", names.stream, "--subject-prefix", names.prefix]
    worker = subprocess.Popen(
        [*CLI, *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    blocker = psycopg.connect(DSN)
    try:

        def owned() -> bool:
            status = ingest_status(
                URL, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix
            )
            return any(row.owner is not None for row in asyncio.run(status))

        deadline = time.monotonic() + 60
        while not owned():
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.2)
        table = psycopg.sql.SQL("LOCK TABLE {}.broker_events").format(psycopg.sql.Identifier(names.schema))
        blocker.execute(table)  # held, in its open transaction: staging SQL waits for it
        with names.sink() as sink:
            sink(next(workload.events(1, seed=15)))
            assert sink.flush(30)
        time.sleep(1)  # the worker is staging it
        worker.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert worker.poll() is None  # the clean stop waits for PostgreSQL
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=10)
        assert worker.returncode == 130
        assert err.splitlines()[-1] == "phi-session: interrupted"
    finally:
        blocker.close()
        if worker.poll() is None:
            worker.kill()
            worker.communicate()


@pytest.mark.parametrize("deleted", ["consumer", "stream"])
def test_a_worker_sets_up_its_consumer_again_once_it_is_gone(
    names: Names, deleted: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pull on a consumer that is gone (deleted, or NATS restarted without its storage)
    has no answer: taken for an idle partition, the worker waited for ever, saying nothing."""
    first, second = list(workload.events(1, seed=16)), list(workload.events(1, seed=17))
    worker = names.worker(partitions=1)

    async def delete() -> None:
        nc = await nats.connect(names.url)
        js = nc.jetstream()
        if deleted == "stream":
            await js.delete_stream(names.stream)
        else:
            await js.delete_consumer(names.stream, "phi-ingest-0")
        await nc.close()

    def publish(events: list[Any]) -> None:
        with names.sink(partitions=1) as sink:
            for event in events:
                sink(event)
            assert sink.flush(30)

    _one_partition_stream(names)

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        try:
            publish(first)
            expected = _reference([first])
            await _until(lambda: _stored(names.schema) == expected, task)
            await delete()
            publish(second)
            expected = _reference([first, second])
            await _until(lambda: _stored(names.schema) == expected, task, 90)
        finally:
            worker.stop()
            await task

    asyncio.run(scenario())
    gone = [record.getMessage() for record in caplog.records if "is gone" in record.getMessage()]
    assert gone == [
        f"partition 0: consumer phi-ingest-0 of stream {names.stream} is gone (NATS lost its storage,"
        " or it was deleted); setting it up again"
    ]


def test_events_without_headers_after_the_stream_is_created_again_are_not_taken_for_duplicates(
    names: Names,
) -> None:
    """A message without an event id is named by its stream position: the stream created
    again numbers its messages from 1 again, and each was dropped as a duplicate of the
    earlier stream's message at that position."""
    first, second = list(workload.events(1, seed=41)), list(workload.events(1, seed=42))
    worker = names.worker(partitions=1)

    def publish(events: list[Any]) -> None:
        _one_partition_stream(names)
        _publish_raw(names, [(f"{names.prefix}.0", encode_event(event), {}) for event in events])

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.to_thread(publish, first)
            await _until(lambda: _stored(names.schema) == _reference([first]), task)
            await _delete_stream(names.url, names.stream)
            await asyncio.to_thread(publish, second)
            expected = _reference([first, second])
            await _until(lambda: worker.stats.received == len(first) + len(second), task, 90)
            await _until(lambda: _stored(names.schema) == expected, task, 30)
        finally:
            worker.stop()
            await task

    asyncio.run(scenario())
    assert worker.stats.duplicates == 0
    assert _stored(names.schema) == _reference([first, second])
    assert _staged_pending(names.schema) == 0


@pytest.mark.parametrize("event_ids", [True, False], ids=["event ids", "no event ids"])
def test_events_staged_before_the_stream_is_created_again_are_replayed_first(
    names: Names, event_ids: bool
) -> None:
    """Staged events keep their stream sequence: those of a session still open when its
    stream was deleted and created again were replayed, by the next worker, interleaved
    with the new stream's (numbered from 1 again), and the session was recorded wrong.
    Messages without an event id are named by their position: the new stream's are not
    taken for the earlier one's staged at that position."""
    events = list(workload.events(1, seed=43))
    cut = len(events) // 2
    expected = _reference([events])

    def publish(part: list[Any]) -> None:
        if not event_ids:
            _one_partition_stream(names)
            _publish_raw(names, [(f"{names.prefix}.0", encode_event(event), {}) for event in part])
            return
        with names.sink(partitions=1) as sink:
            for event in part:
                sink(event)
            assert sink.flush(30)

    publish(events[:cut])
    first = names.worker(partitions=1)
    asyncio.run(_run_until(first, lambda: first.stats.recorded == cut, 60))
    assert first.stats.recorded == cut and _staged_pending(names.schema) == cut  # its loop is open
    asyncio.run(_delete_stream(names.url, names.stream))
    publish(events[cut:])
    second = names.worker(partitions=1)
    asyncio.run(
        _run_until(
            second, lambda: _stored(names.schema) == expected and _staged_pending(names.schema) == 0, 60
        )
    )
    assert _stored(names.schema) == expected
    assert second.stats.rejected == second.stats.duplicates == 0
    assert _staged_pending(names.schema) == 0


async def _until(done: Any, task: asyncio.Task[None], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(done):
        assert time.monotonic() < deadline, "timed out"
        if task.done():
            task.result()
        await asyncio.sleep(0.2)


def test_a_nats_server_without_jetstream_is_named_as_such(names: Names, tmp_path: Path) -> None:
    """A server started without -js: `ingest` and `ingest --status` ended in an
    "internal error: ServiceUnavailableError ..." rather than saying what is wrong."""
    server = PrivateServer(tmp_path, jetstream=False)
    server.start()
    store = f"{DSN}{'&' if '?' in DSN else '?'}schema={names.schema}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        for status in ([], ["--status"]):
            args = ["ingest", server.url, "--store", store, "--stream", names.stream, *status]
            done = subprocess.run([*CLI, *args], env=env, text=True, capture_output=True, timeout=60)
            assert done.returncode == 1
            assert done.stderr.splitlines()[-1] == (
                "phi-session: error: the NATS server does not run JetStream (start nats-server with -js)"
            )
    finally:
        server.stop()


def test_status_creates_nothing(names: Names) -> None:
    """`ingest --status` is read-only: it created the store's schema and tables (even when
    there was no stream to report on) and the broker_events table."""

    def status() -> list[Any]:
        return asyncio.run(
            ingest_status(URL, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix)
        )

    def schema_exists() -> bool:
        with psycopg.connect(DSN, autocommit=True) as conn:
            query = "SELECT 1 FROM pg_namespace WHERE nspname = %s"
            return conn.execute(query, (names.schema,)).fetchone() is not None

    with pytest.raises(BrokerError, match="no stream"):
        status()
    events = list(workload.events(1, seed=22))[:10]
    with names.sink(partitions=2) as sink:
        for event in events:
            sink(event)
        assert sink.flush(30)
    rows = status()
    assert [(row.partition, row.staged, row.owner) for row in rows] == [(0, 0, None), (1, 0, None)]
    assert sum(row.in_stream for row in rows) == len(events)
    assert not schema_exists()


def test_a_session_no_store_accepts_stays_staged_as_rejected(names: Names) -> None:
    good = list(workload.events(1, seed=9))
    session_id = good[0].session_id.encode()
    bad = [decode_event(line.replace(session_id, b"../etc")) for line in workload.lines(1, seed=9)]
    with names.sink(partitions=1) as sink:
        for event in bad + good:
            sink(event)
        assert sink.flush(30)
    worker = names.worker()
    expected = _reference([good])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected and worker.stats.rejected > 0))
    assert _stored(names.schema) == expected
    assert worker.stats.rejected == len(bad)  # kept with their payload, not replayed forever
    status = asyncio.run(
        ingest_status(names.url, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix)
    )
    assert [(row.staged, row.rejected) for row in status] == [(0, len(bad))]


def _refuse_session(schema: str, session_id: str, sqlstate: str) -> None:
    """A trigger making PostgreSQL refuse every save of `session_id` with `sqlstate`."""
    with PostgresStore(DSN, schema=schema), psycopg.connect(DSN, autocommit=True) as conn:
        function = psycopg.sql.SQL(
            "CREATE FUNCTION {}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.session_id = {} THEN RAISE EXCEPTION 'row refused' USING ERRCODE = {}; END IF;"
            " RETURN NEW; END $$"
        ).format(
            psycopg.sql.Identifier(schema), psycopg.sql.Literal(session_id), psycopg.sql.Literal(sqlstate)
        )
        conn.execute(function)
        conn.execute(
            psycopg.sql.SQL(
                "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {0}.sessions"
                " FOR EACH ROW EXECUTE FUNCTION {0}.refuse()"
            ).format(psycopg.sql.Identifier(schema))
        )


@pytest.mark.parametrize("sqlstate", ["23514", "53100"])
def test_a_session_postgresql_refuses_holds_up_no_other(names: Names, sqlstate: str) -> None:
    """The worker retried every unsaved session for 10 s at each checkpoint once another had
    saved, so one session PostgreSQL refused (a check, a full disk) stalled its partition for
    good, and a refusal for good (SQLSTATE class 23) was retried as if it could pass."""
    _one_partition_stream(names)
    bad = list(workload.events(1, seed=21))
    goods = [list(workload.events(1, seed=100 + n)) for n in range(8)]
    _refuse_session(names.schema, bad[0].session_id, sqlstate)
    expected = _reference(goods)
    refused = sqlstate.startswith("23")
    worker = names.worker(checkpoint_interval=0.5)

    async def trickle() -> float:
        task = asyncio.create_task(worker.run())
        with names.sink() as sink:
            for event in bad:
                sink(event)
            assert sink.flush(30)
            await asyncio.sleep(2 if refused else 12)  # given up: at once, or after `retry_for`
            started = time.monotonic()
            for good in goods:  # a checkpoint each: each saves a session
                for event in good:
                    sink(event)
                assert sink.flush(30)
                await asyncio.sleep(0.5)
        await _stop_when(worker, task, lambda: _stored(names.schema) == expected, timeout=60)
        return time.monotonic() - started

    waited = asyncio.run(trickle())
    assert _stored(names.schema) == expected
    assert waited < 10, waited  # 8 sessions at 0.5 s apart, and the stop
    status = asyncio.run(
        ingest_status(names.url, DSN, schema=names.schema, stream=names.stream, subject_prefix=names.prefix)
    )
    # Refused for good: kept as rejected, with its payload; else kept staged for a later try.
    kept = (0, len(bad)) if refused else (len(bad), 0)
    assert [(row.staged, row.rejected) for row in status] == [kept]


def test_a_tracer_publishes_through_the_sink_and_a_sub_agent_goes_with_its_parent(names: Names) -> None:
    from phi_session import AgentSession, LoopConfigSnapshot, ToolCall, Tracer, Usage

    events: list[Any] = []
    agent = AgentSession()
    config = LoopConfigSnapshot(model="claude-sonnet-4-5", provider="anthropic")
    sink = names.sink(partitions=16)
    tracer = Tracer(agent, sinks=[sink, events.append], config=config)
    for question in ("first", "second"):
        with tracer.loop() as loop:
            loop.user(question)
            with loop.turn() as turn:
                with turn.assistant() as reply:
                    reply.text_delta("Asking a helper.")
                    reply.finish(
                        tool_calls=[ToolCall(id="c1", name="delegate", arguments={})],
                        usage=Usage(input=10, output=5, total_tokens=15),
                    )
                for call in turn.tool_calls:
                    with turn.tool(call) as tool:
                        with tool.sub_agent() as child:
                            child.user("help")
                            with child.turn() as child_turn, child_turn.assistant() as answer:
                                answer.finish(usage=Usage(input=3, output=2, total_tokens=5))
                        tool.result("done")
            with loop.turn() as turn, turn.assistant() as reply:
                reply.finish(usage=Usage(input=1, output=1, total_tokens=2))
    tracer.close()  # flushes the sink: everything is acknowledged
    assert sink.stats().pending == 0 and sink.stats().published == len(events)
    sessions = {event.session_id for event in events if hasattr(event, "session_id")}
    assert len(sessions) == 3  # the parent's and two sub-agents'
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected))
    stored = _stored(names.schema)
    assert stored == expected  # the spawn links are exact: one worker recorded parent and children
    assert len(_partitions_used(names.schema)) == 1  # 3 sessions, 16 partitions: routed together


def test_a_sub_agent_running_while_many_others_start_and_end_still_goes_with_its_parent(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's routing table forgot its oldest routes, however recently used: a sub-agent
    still running while the table filled up (100,000 others in a busy service) sent its
    AgentEnd to its own session's partition, where no worker knew its loop; it was kept
    as rejected, and the session saved Aborted."""
    from phi_session.broker import settings as broker_settings
    from phi_session.broker.settings import partition_of

    monkeypatch.setattr(broker_settings, "_MAX_ROUTES", 4)
    partitions = 3
    root = "root"
    child = next(
        f"child{n}"
        for n in range(100)
        if partition_of(f"child{n}", partitions) != partition_of(root, partitions)
    )
    usage = ps.Usage(input=1, output=1, total_tokens=2)

    def at(ms: int) -> ps.Timestamp:
        return ps.Timestamp.from_ns(1_750_000_000 * 10**9 + ms * 10**6)

    def start(session: str, parent: str | None = None) -> ps.AgentStart:
        return ps.AgentStart(
            agent_id="ag",
            session_id=session,
            loop_id=f"{session}.c.1",
            parent_loop_id=parent,
            continuation_kind=ps.INITIAL,
            timestamp=at(0),
        )

    def end(session: str) -> ps.AgentEnd:
        return ps.AgentEnd(loop_id=f"{session}.c.1", messages=(), usage=usage, timestamp=at(9))

    others = [f"other{n}" for n in range(12)]  # three times the table's bound, each started and ended
    events = [
        start(root),
        start(child, parent=f"{root}.c.1"),
        ps.TurnStart(loop_id=f"{child}.c.1", turn_index=0, timestamp=at(1), triggered_by="SubAgent"),
        *(event for other in others for event in (start(other, parent=f"{root}.c.1"), end(other))),
        end(child),
        end(root),
    ]
    with names.sink(partitions=partitions) as sink:
        for event in events:
            sink(event)
        assert sink.flush(30)
    worker = names.worker()
    expected = _reference([events])
    asyncio.run(_run_until(worker, lambda: _stored(names.schema) == expected, 30))
    assert _stored(names.schema) == expected
    assert worker.stats.rejected == 0
    assert _partitions_used(names.schema) == {partition_of(root, partitions)}
