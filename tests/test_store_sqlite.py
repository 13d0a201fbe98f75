"""SqliteStore: the shared conformance suite, plus what only an SQLite file can show."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from phi_session import (
    AgentMessage,
    AnnotatedRequestPayload,
    InvalidArgument,
    LoopConfigSnapshot,
    Timestamp,
    ToolCall,
    Usage,
)
from phi_session.codec import (
    decode_session,
    encode_loop,
    encode_message,
    encode_session,
)
from phi_session.cost import Cost, Pricer, prices_available
from phi_session.errors import SessionLocked, SessionNotFound, StoredSessionUnusable, StoreError
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.messages import TextFormat
from phi_session.model import LoopRecord, LoopStatus, ModelCall, Session
from phi_session.recorder import SessionRecorder
from phi_session.stores import search as search_module
from phi_session.stores import sqlite as sqlite_module
from phi_session.stores.base import SessionStore, UsageTotal, summarize
from phi_session.stores.conformance import (
    EXAMPLE_SESSIONS,
    EXAMPLES_DIR,
    TIERED_CALL,
    StoreConformance,
    at,
    calls_loop,
    cut_loop,
    make_loop,
    make_session,
    reported_usage,
    talking_loop,
)
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.message_book import numbers_in, unpack
from phi_session.stores.outline import session_outline
from phi_session.stores.query import PageCursor, PruneCriteria, SessionQuery
from phi_session.stores.search import loop_text
from phi_session.stores.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteStore

from .conftest import in_forked_child, needs_fork
from .store_support import (
    check_cut_loops_have_prompts,
    check_saves_in_parts,
    check_saves_read_only_touched_loops,
    check_untotalled_calls_counted,
    conversation_parts,
    save_as_before_cut_loops_had_prompts,
    save_as_before_untotalled_calls_counted,
)


class TestSqliteConformance(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[SqliteStore]:
        store = SqliteStore(tmp_path / "sessions.db")
        yield store
        store.close()

    def open_read_only(self, store: SessionStore) -> SessionStore:
        assert isinstance(store, SqliteStore)
        return SqliteStore(store.path, read_only=True)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(db)
    yield store
    store.close()


def connection_of(store: SqliteStore) -> sqlite3.Connection:
    """The calling thread's connection of `store` (for single-threaded inspection)."""
    with store._connected("inspect") as conn:
        return conn


def pragma(db: Path, name: str) -> int:
    with closing(sqlite3.connect(db)) as conn:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def raw_execute(db: Path, *statements: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def back_to_v7(db: Path) -> None:
    """Rewrite the store at `db` as schema version 7 left it: each loop's whole searchable
    text, indexed by the unicode61 tokenizer."""
    with SqliteStore(db) as store:
        sessions = [store.load(session_id) for session_id in store.list_ids()]
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for session in sessions:
            conn.executemany(
                "UPDATE loop_text SET text = ? WHERE session_id = ? AND position = ?",
                [(loop_text(record), session.session_id, n) for n, record in enumerate(session.loops)],
            )
        conn.execute("DROP TABLE loop_text_fts")
        conn.execute(
            "CREATE VIRTUAL TABLE loop_text_fts USING fts5(text, content='loop_text', "
            "tokenize='unicode61 remove_diacritics 0')"
        )
        conn.execute("INSERT INTO loop_text_fts (loop_text_fts) VALUES ('rebuild')")
        conn.execute("DROP TABLE loop_models")
        conn.execute("PRAGMA user_version = 7")


def back_to_v5(db: Path) -> None:
    """Rewrite the store at `db` as phi-session wrote it at schema version 5: each loop's
    whole compact record, no message table."""
    with SqliteStore(db) as store:
        sessions = [store.load(session_id) for session_id in store.list_ids()]
    back_to_v7(db)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for session in sessions:
            conn.executemany(
                "UPDATE loops SET record = ? WHERE session_id = ? AND position = ?",
                [
                    (encode_loop(record, pretty=False), session.session_id, position)
                    for position, record in enumerate(session.loops)
                ],
            )
        conn.execute("DROP TABLE messages")
        conn.execute("ALTER TABLE sessions DROP COLUMN message_ids")
        conn.execute("ALTER TABLE loops DROP COLUMN calls")
        conn.execute("PRAGMA user_version = 5")
    finally:
        conn.close()


def back_to_v6(db: Path) -> None:
    """Rewrite the store at `db` as schema version 6 left it: no model calls, in the
    loops' rows or in their outlines."""
    back_to_v7(db)
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for session_id, position, outline in conn.execute(
            "SELECT session_id, position, outline FROM loops"
        ).fetchall():
            fields = msgspec.json.decode(outline)
            del fields["calls"]
            conn.execute(
                "UPDATE loops SET outline = ? WHERE session_id = ? AND position = ?",
                (msgspec.json.encode(fields), session_id, position),
            )
        conn.execute("ALTER TABLE loops DROP COLUMN calls")
        conn.execute("PRAGMA user_version = 6")


# -- the file --------------------------------------------------------------------------------


def test_new_file_is_configured(store: SqliteStore, db: Path) -> None:
    assert store.schema_version() == SCHEMA_VERSION == pragma(db, "user_version")
    assert pragma(db, "application_id") == APPLICATION_ID
    assert pragma(db, "auto_vacuum") == 2  # incremental: prune can give pages back
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_parent_directories_are_created(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a" / "b" / "s.db") as store:
        store.save(make_session("x"))
    assert (tmp_path / "a" / "b" / "s.db").is_file()


@pytest.mark.parametrize("path", ["", ":memory:", "file::memory:?cache=shared"])
def test_in_memory_databases_are_refused(path: str) -> None:
    with pytest.raises(StoreError, match="file path"):
        SqliteStore(path)


def test_synchronous_setting(db: Path) -> None:
    with SqliteStore(db, synchronous="FULL") as store:
        assert connection_of(store).execute("PRAGMA synchronous").fetchone()[0] == 2
    with SqliteStore(db) as store:
        assert connection_of(store).execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(InvalidArgument, match="synchronous"):  # was a bare ValueError
        SqliteStore(db, synchronous="OFF")  # type: ignore[arg-type]


def test_sessions_survive_reopening(db: Path) -> None:
    session = make_session("kept", loops=[make_loop("kept", 1, events=3), make_loop("kept", 2)])
    with SqliteStore(db) as store:
        store.save(session)
    with SqliteStore(db) as store:
        assert encode_session(store.load("kept")) == encode_session(session)


def test_close_releases_connections_and_the_store_reconnects(db: Path) -> None:
    store = SqliteStore(db)
    store.save(make_session("x"))
    conn = connection_of(store)
    store.close()
    store.close()  # idempotent
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
    assert [record.loop_id for record in store.load("x").loops] == ["x.cfg.1"]
    store.close()


@pytest.mark.parametrize("recreated", [True, False], ids=["recreated", "removed"])
def test_a_file_removed_under_an_open_store_is_made_again_not_written_unlinked(
    db: Path, recreated: bool
) -> None:
    store = SqliteStore(db)
    store.save(make_session("before"))
    for file in db.parent.glob(f"{db.name}*"):  # `rm sessions.db*` while the store is open
        file.unlink()
    if recreated:  # and another process opens the default store again
        SqliteStore(db).close()
    store.save(make_session("after"))
    assert store.list_ids() == ["after"]
    store.close()
    with SqliteStore(db) as fresh:
        assert fresh.list_ids() == ["after"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, SessionLocked], ids=["interrupt", "locked"])
def test_a_store_whose_reopen_failed_migrates_the_file_it_opens_next(
    db: Path, failure: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(db)
    store.save(make_session("before"))
    for file in db.parent.glob(f"{db.name}*"):
        file.unlink()
    migrate = SqliteStore._migrate

    def fails(self: SqliteStore, conn: sqlite3.Connection) -> None:
        raise failure

    monkeypatch.setattr(SqliteStore, "_migrate", fails)  # Ctrl-C, or the lock, as it reopens
    with pytest.raises(failure):
        store.save(make_session("lost"))
    monkeypatch.setattr(SqliteStore, "_migrate", migrate)
    # The next use took the file made again for one of the store, unmigrated: every
    # later save raised StoreError 'no such table: sessions'.
    store.save(make_session("after"))
    assert store.list_ids() == ["after"]
    store.close()


def test_a_file_that_never_stays_the_same_while_opening_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening retried while the file at the path changed; a file system whose inode numbers
    # do not stay would have kept it retrying for ever.
    store = SqliteStore(tmp_path / "s.db")
    store.close()
    ids = iter(range(10**6))
    monkeypatch.setattr(SqliteStore, "_file_id", lambda self: (0, next(ids)))
    with pytest.raises(StoreError, match="kept changing"):
        store.list_ids()


@pytest.mark.parametrize("recreated", [True, False], ids=["recreated", "removed"])
def test_a_file_removed_while_a_connection_opens_is_not_taken_for_the_one_it_opened(
    db: Path, recreated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(db)
    connect = store._connect

    def removed_once_connected(file: Path, *, read_only: bool) -> sqlite3.Connection:
        conn = connect(file, read_only=read_only)
        if not removed:  # another thread's `rm sessions.db*` as this one connects
            removed.append(file)
            for other in db.parent.glob(f"{db.name}*"):
                other.unlink()
            if recreated:  # and it opened the store again, making a new file
                SqliteStore(db).close()
        return conn

    removed: list[Path] = []
    monkeypatch.setattr(store, "_connect", removed_once_connected)
    # The connection noted no file (it was missing), or the new one, while writing the
    # unlinked: this save was lost, and every later one.
    store.save(make_session("first"))
    assert removed == [db]
    store.save(make_session("second"))
    store.close()
    with SqliteStore(db) as fresh:
        assert sorted(fresh.list_ids()) == ["first", "second"]


def test_close_closes_every_threads_connection(store: SqliteStore) -> None:
    connections: list[sqlite3.Connection] = []

    def use() -> None:
        store.list_ids()
        connections.append(connection_of(store))

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    connections.append(connection_of(store))
    assert connections[0] is not connections[1]  # one connection per thread
    store.close()
    for conn in connections:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")


# -- schema versions ---------------------------------------------------------------------------


def test_newer_schema_is_refused(db: Path) -> None:
    SqliteStore(db).close()
    raw_execute(db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        SqliteStore(db)


def test_foreign_databases_are_refused_and_left_unchanged(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    raw_execute(other, "CREATE TABLE notes (text TEXT)", "INSERT INTO notes VALUES ('keep me')")
    marked = tmp_path / "marked.db"
    raw_execute(marked, "PRAGMA application_id = 42", "PRAGMA user_version = 1")
    text = tmp_path / "text.db"
    text.write_text("not a database at all, just some text that is long enough " * 20)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(StoreError, match="another application"):
        SqliteStore(other)
    with pytest.raises(StoreError, match="not a phi-session database"):
        SqliteStore(marked)
    with pytest.raises(StoreError):
        SqliteStore(text)
    # Not a byte changed (a switch to WAL rewrites the header), and no -wal/-shm files appeared.
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


class _Rows:
    """What a cursor gives back, read to the end (so that its statement holds no lock)."""

    def __init__(self, rows: list[object]) -> None:
        self.rows = rows

    def fetchone(self) -> object:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[object]:
        return self.rows


def test_a_new_file_another_process_creates_the_schema_in_meanwhile_opens(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes opening a new file at once: the other one creates the whole schema
    right after our first statement, and we still read one consistent version."""
    other_process = [lambda: SqliteStore(db).close()]
    connect = sqlite3.connect

    class Interrupted(sqlite3.Connection):
        def execute(self, *args: object) -> object:  # type: ignore[override]
            if not other_process:
                return super().execute(*args)  # type: ignore[arg-type]
            rows = super().execute(*args).fetchall()  # type: ignore[arg-type]
            other_process.pop()()
            return _Rows(rows)

    def connect_interrupted(*args: object, **kwargs: object) -> sqlite3.Connection:
        kwargs["factory"] = Interrupted if other_process else sqlite3.Connection
        return connect(*args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(sqlite3, "connect", connect_interrupted)
    with SqliteStore(db) as store:
        assert not other_process and store.schema_version() == SCHEMA_VERSION


def test_migration_from_an_older_version(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = make_session("old", loops=[make_loop("old", 1, events=2)])
    with SqliteStore(db) as store:
        store.save(session)

    def add_notes(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE sessions ADD COLUMN note TEXT")
        conn.execute("UPDATE sessions SET note = 'migrated'")

    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, add_notes))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION + 1
        assert encode_session(store.load("old")) == encode_session(session)
        store.save(make_session("new"))
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT note FROM sessions WHERE session_id = 'old'").fetchone() == ("migrated",)


def test_a_store_opened_while_another_process_migrates_waits_for_it(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SqliteStore(db).close()
    ran: list[str] = []
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, lambda conn: ran.append("")))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    waiting = threading.Event()

    class Noticed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "migrat" in record.getMessage():
                waiting.set()

    handler = Noticed()
    sqlite_module.logger.addHandler(handler)
    migrating = sqlite3.connect(db, isolation_level=None)  # the other process, migrating
    migrating.execute("BEGIN IMMEDIATE")
    opened: list[object] = []

    def open_store() -> None:
        try:
            with SqliteStore(db, timeout=0.01) as store:  # its lock wait long over
                opened.append(store.schema_version())
        except Exception as error:
            opened.append(error)

    worker = threading.Thread(target=open_store)
    try:
        worker.start()
        while not waiting.is_set() and worker.is_alive():
            waiting.wait(0.01)
        migrating.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        migrating.execute("COMMIT")
        worker.join()
    finally:
        migrating.close()
        sqlite_module.logger.removeHandler(handler)
    assert opened == [SCHEMA_VERSION + 1]
    assert ran == []  # the other process migrated it


def test_failed_migration_leaves_the_database_as_it_was(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SqliteStore(db) as store:
        store.save(make_session("old"))

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE extra (x)")
        conn.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, half_done))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="no_such_table"):
        SqliteStore(db)
    assert pragma(db, "user_version") == SCHEMA_VERSION
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None


# -- read-only -------------------------------------------------------------------------------


def files_next_to(db: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(db.parent.iterdir()) if p.is_file()}


def test_a_read_only_store_needs_the_file_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.db"
    with pytest.raises(StoreError, match="no SQLite store at"):
        SqliteStore(missing, read_only=True)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="no SQLite store at"):
        SqliteStore(empty, read_only=True)
    assert [(p.name, p.stat().st_size) for p in tmp_path.iterdir()] == [("empty.db", 0)]


def test_a_read_only_store_changes_nothing_and_sees_what_writers_commit(db: Path) -> None:
    with SqliteStore(db) as writer:
        writer.save(make_session("first"))
    before = files_next_to(db)
    with SqliteStore(db, read_only=True) as reader:
        assert reader.list_ids() == ["first"]
        with pytest.raises(StoreError, match="is open read-only: cannot"):
            reader.save(make_session("second"))
        with pytest.raises(StoreError, match="is open read-only: cannot"):
            reader.delete("first")
    assert files_next_to(db) == before  # not a byte changed, no -wal or -shm left
    with SqliteStore(db, read_only=True) as reader, SqliteStore(db) as writer:
        assert reader.list_ids() == ["first"]
        writer.save(make_session("second"))  # while the reader is open, as under `serve`
        assert sorted(reader.list_ids()) == ["first", "second"]


def test_a_read_only_store_read_by_threads_at_once_leaves_nothing_behind(db: Path) -> None:
    # The first thread's connection made the -wal; the others, seeing it, opened
    # mode=ro, and one of them closing last could not remove it (as under `serve`).
    with SqliteStore(db) as writer:
        writer.save(make_session("first"))
    before = files_next_to(db)
    reader = SqliteStore(db, read_only=True)
    all_open, first_gone = threading.Barrier(4), threading.Event()

    def read(n: int) -> None:
        assert reader.list_ids() == ["first"]
        all_open.wait(10)  # every thread's connection open at once
        if n:  # the first thread's (which made the -wal) closes first, as it ends
            first_gone.wait(10)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # one after the other
    threads[0].join()
    first_gone.set()
    for thread in threads:
        thread.join()
    reader.close()
    assert files_next_to(db) == before


def _open_files_of(db: Path) -> list[str]:
    """This process's file descriptors on `db` and the files beside it (-wal, -shm)."""
    targets = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    return [target for target in targets if os.path.basename(target).startswith(db.name)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_a_read_only_store_closed_while_threads_read_leaves_no_connection_open(db: Path) -> None:
    # close() drops every thread's local storage; a connection opened while it closed the
    # others, in use at that moment, was skipped then, and the store's record of the
    # connections it opened mode=rw kept it open for good (-wal, -shm and fds too).
    with SqliteStore(db) as writer:
        writer.save(make_session("first"))
    before = files_next_to(db)
    reader = SqliteStore(db, read_only=True)
    first_in_use, second_in_use, first_done, second_done = (threading.Event() for _ in range(4))

    def read(started: threading.Event, done: threading.Event) -> None:
        with reader._connected("read") as conn:
            assert conn.execute("SELECT session_id FROM sessions").fetchall() == [("first",)]
            started.set()
            done.wait(10)

    first = threading.Thread(target=read, args=(first_in_use, first_done))
    first.start()
    assert first_in_use.wait(10)
    closer = threading.Thread(target=reader.close)  # waits for the first thread's use to end
    closer.start()
    while reader._open:  # until close() took the connections it closes
        time.sleep(0.001)
    second = threading.Thread(target=read, args=(second_in_use, second_done))
    second.start()
    assert second_in_use.wait(10)
    first_done.set()  # close() closes the first's, then drops the second's, in use
    closer.join(10)
    second_done.set()
    for thread in (first, second):
        thread.join(10)
    assert reader.list_ids() == ["first"]  # the store in use again, then closed
    reader.close()
    gc.collect()
    assert _open_files_of(db) == []
    assert files_next_to(db) == before


_SAVE_AND_DIE = """
import os, sys
from phi_session.stores.conformance import make_session
from phi_session.stores.sqlite import SqliteStore

store = SqliteStore(sys.argv[1])
for n in range(3):
    store.save(make_session(f"s{n}"))
os._exit(0)  # as if killed: its connection never closes, its commits stay in the WAL
"""


def test_a_read_only_store_never_checkpoints_what_a_killed_writer_left(db: Path) -> None:
    # Closing a read-write connection (the last one) checkpointed the WAL into the file.
    SqliteStore(db).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(db)], env=env, check=True)
    before = files_next_to(db)
    assert len(before[f"{db.name}-wal"]) > 0
    with SqliteStore(db, read_only=True) as reader:
        assert sorted(reader.list_ids()) == ["s0", "s1", "s2"]
    after = files_next_to(db)  # (its -shm, SQLite's shared memory, readers write)
    assert after[db.name] == before[db.name] and after[f"{db.name}-wal"] == before[f"{db.name}-wal"]


def test_a_read_only_store_whose_file_went_away_creates_none(db: Path) -> None:
    # A read-only `serve` made an empty store when the file was moved: each thread's
    # connection was opened in create mode.
    with SqliteStore(db) as writer:
        writer.save(make_session("first"))
    reader = SqliteStore(db, read_only=True)
    assert reader.list_ids() == ["first"]
    moved = db.with_name("moved.db")
    db.rename(moved)
    caught: list[BaseException] = []

    def read() -> None:
        try:
            reader.list_ids()
        except BaseException as error:
            caught.append(error)

    thread = threading.Thread(target=read)  # a new thread: a new connection
    thread.start()
    thread.join()
    reader.close()
    assert [str(error) for error in caught] == [f"no SQLite store at {db}"]
    assert not db.exists()


needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
_NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory user nobody may enter and read but not write (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="phi-session-ro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _as_nobody(work: Any) -> int:
    def run() -> None:
        os.setgid(_NOBODY)
        os.setuid(_NOBODY)
        work()

    return in_forked_child(run)


@needs_fork
@needs_root
def test_a_read_only_store_reads_a_file_this_user_may_only_read(shared_dir: Path) -> None:
    db = shared_dir / "sessions.db"
    with SqliteStore(db) as writer:
        writer.save(make_session("first"))
        db.chmod(0o644)

        def read_while_a_writer_has_it_open() -> None:
            assert not os.access(db, os.W_OK)
            with SqliteStore(db, read_only=True) as reader:
                assert reader.list_ids() == ["first"]

        # It failed: "attempt to write a readonly database".
        assert _as_nobody(read_while_a_writer_has_it_open) == 0

    def refused_without_its_wal() -> None:
        with pytest.raises(StoreError, match=r"cannot read it as this user: .* \(it may not write "):
            SqliteStore(db, read_only=True)

    assert not db.with_name("sessions.db-wal").exists()
    assert _as_nobody(refused_without_its_wal) == 0


@needs_fork
@needs_root
def test_a_read_only_store_makes_no_wal_beside_a_file_this_user_may_not_write(shared_dir: Path) -> None:
    shared_dir.chmod(0o777)  # a shared directory: anyone may make files there
    db = shared_dir / "sessions.db"
    with SqliteStore(db) as writer:
        writer.save(make_session("first"))
    db.chmod(0o644)

    def refused() -> None:
        # Its -wal and -shm, left owned by this user, made the owner's next save fail
        # ("attempt to write a readonly database").
        with pytest.raises(StoreError, match=r"cannot read it as this user: .* \(the file is another user's"):
            SqliteStore(db, read_only=True)

    assert _as_nobody(refused) == 0
    assert sorted(path.name for path in shared_dir.iterdir()) == ["sessions.db"]


@needs_fork
@needs_root
def test_a_read_only_store_reads_its_owners_file_made_read_only(shared_dir: Path) -> None:
    os.chown(shared_dir, _NOBODY, _NOBODY)  # this user's own directory

    def read_own_archived_store() -> None:
        db = shared_dir / "sessions.db"
        with SqliteStore(db) as writer:
            writer.save(make_session("first"))
        db.chmod(0o444)  # archived read-only by its owner
        # It was refused: StoreError 'cannot read it as this user ... it may not write'.
        with SqliteStore(db, read_only=True) as reader:
            assert reader.list_ids() == ["first"]

    assert _as_nobody(read_own_archived_store) == 0


@needs_root
def test_a_read_only_store_reads_a_file_on_a_read_only_file_system(shared_dir: Path) -> None:
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(shared_dir)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        db = shared_dir / "sessions.db"
        with SqliteStore(db) as writer:
            writer.save(make_session("first", loops=[talking_loop("first", 1, "brew coffee")]))
        subprocess.run(["mount", "-o", "remount,ro", str(shared_dir)], check=True)
        # It failed: "unable to open database file" (no -wal, and none can be made).
        with SqliteStore(db, read_only=True) as reader:
            assert reader.list_ids() == ["first"]
            assert [hit.session_id for hit in reader.search("coffee")] == ["first"] * 5
        assert sorted(path.name for path in shared_dir.iterdir()) == ["sessions.db"]
    finally:
        subprocess.run(["umount", str(shared_dir)], check=True)


def test_a_read_only_store_reads_an_older_schema_from_a_copy_and_leaves_the_file(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = [make_session("a", loops=[talking_loop("a", 1, "brew coffee")]), make_session("b")]
    with SqliteStore(db) as store:
        store.save_many(sessions)
    back_to_v5(db)
    before = files_next_to(db)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    reader = SqliteStore(db, read_only=True)
    assert {session_id: encode_session(reader.load(session_id)) for session_id in reader.list_ids()} == {
        session.session_id: encode_session(session) for session in sessions
    }
    assert {hit.session_id for hit in reader.search("coffee")} == {"a"}
    assert "schema version 5" in caplog.text and "left as it is" in caplog.text
    reader.close()
    assert files_next_to(db) == before and pragma(db, "user_version") == 5
    del reader
    assert list(temporary.iterdir()) == []  # the copy went with the store


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_SESSIONS, ids=lambda path: path.name)
def test_examples_round_trip_after_reopening(db: Path, path: Path) -> None:
    data = path.read_bytes()
    session = decode_session(data)
    with SqliteStore(db) as store:
        store.save(session)
        store.save(decode_session(data))  # merging an identical copy changes nothing
    with SqliteStore(db) as store:
        assert encode_session(store.load(session.session_id)) == data


def test_numbers_beyond_sqlite_integers_stay_exact(store: SqliteStore) -> None:
    huge = 2**64 - 1
    loop = make_loop("big", 1, started_at=Timestamp.parse("9999-12-31T23:59:58.999999999Z"))
    loop.usage = Usage(
        input=huge, output=huge, reasoning=huge, cache_read=huge, cache_write=huge, total_tokens=huge
    )
    session = make_session(
        "big",
        created_at=Timestamp.parse("0001-01-01T00:00:00Z"),
        last_active_at=Timestamp.parse("9999-12-31T23:59:59Z"),
        loops=[loop],
    )
    store.save(session)
    store.save(make_session("small", loops=[make_loop("small", 1, tokens=7)]))
    ancient = make_session("ancient", created_at=Timestamp.parse("1000-01-01T00:00:00.5Z"), loops=[])
    store.save(ancient)
    assert encode_session(store.load("big")) == encode_session(session)
    rows = {row.session_id: row for row in store.query()}
    assert rows["big"] == summarize(session)
    assert rows["ancient"] == summarize(ancient)
    oldest_first = store.query(SessionQuery(order="oldest"))
    assert [row.session_id for row in oldest_first] == ["ancient", "small", "big"]
    assert store.query(SessionQuery(min_tokens=2**63))[0].session_id == "big"
    small = make_loop("u", 1, tokens=7).usage
    assert store.usage_totals("agent") == [
        UsageTotal(key="agent", sessions=3, loops=2, usage=loop.usage + small)
    ]
    assert store.usage_totals("day") == [
        UsageTotal(key="0001-01-01", sessions=1, loops=1, usage=loop.usage),
        UsageTotal(key="1000-01-01", sessions=1, loops=0, usage=Usage(input=0, output=0)),
        UsageTotal(key="2024-05-01", sessions=1, loops=1, usage=small),
    ]
    assert store.usage_totals("model") == [
        UsageTotal(key="openai/gpt-4o", sessions=2, loops=2, usage=loop.usage + small)
    ]
    # Priced from the records too (the columns saturate): every token at its price.
    pricer = Pricer({"gpt-4o": {"input": 1, "output": 1}}, use_table=False)
    [total] = store.usage_totals("model", pricer=pricer)
    assert isinstance(total.cost, Cost) and total.cost.usd == pytest.approx(4 * huge / 1e6)


def test_days_outside_the_integer_range(store: SqliteStore) -> None:
    for session_id, created in (("early", "1000-01-01T23:59:59Z"), ("late", "2400-12-31T00:00:00Z")):
        store.save(
            make_session(
                session_id,
                created_at=Timestamp.parse(created),
                loops=[make_loop(session_id, 1, tokens=5, started_at=Timestamp.parse(created))],
            )
        )
    assert [(total.key, total.sessions) for total in store.usage_totals("day")] == [
        ("1000-01-01", 1),
        ("2400-12-31", 1),
    ]


def test_instants_beyond_the_integer_columns_sort_and_filter_exactly(store: SqliteStore) -> None:
    """Times before 1677 or after 2262 saturate the nanosecond columns: such sessions were
    listed in id order and selected by the bound's year, whatever their own time."""
    times = {
        "a-late": "2262-04-13T00:00:00Z",
        "b-late": "2262-04-12T00:00:00Z",
        "now": "2024-05-01T00:00:00Z",
    }
    times |= {"c-early": "1601-01-01T00:00:00Z", "d-early": "1600-01-01T00:00:00Z"}
    for session_id, when in times.items():
        store.save(make_session(session_id, created_at=Timestamp.parse(when)))
    newest = ["a-late", "b-late", "now", "c-early", "d-early"]
    assert [row.session_id for row in store.query()] == newest
    assert [row.session_id for row in store.query(SessionQuery(order="oldest"))] == newest[::-1]
    since = SessionQuery(since=Timestamp.parse("2262-04-12T12:00:00Z"))
    until = SessionQuery(until=Timestamp.parse("1601-01-01T00:00:00Z"))
    assert [row.session_id for row in store.query(since)] == ["a-late"]
    assert [row.session_id for row in store.query(until)] == ["d-early"]
    pages: list[str] = []
    cursor = None
    while page := store.query(SessionQuery(limit=2, after=cursor)):
        pages += [row.session_id for row in page]
        cursor = PageCursor.after("newest", page[-1])
    assert pages == newest


def test_unchanged_loops_are_not_rewritten(store: SqliteStore) -> None:
    loops = [make_loop("u", i, events=2) for i in range(1, 4)]
    store.save(make_session("u", loops=loops))
    conn = connection_of(store)
    before = conn.total_changes
    store.save(make_session("u", loops=[*loops, make_loop("u", 4)]))
    changes = conn.total_changes - before
    before = conn.total_changes
    store.save(make_session("v", loops=[make_loop("v", 4)]))
    # As many changes as storing a new session of one loop (its row, the loop's row and
    # search text): the three stored loops stay as they are.
    assert changes == conn.total_changes - before


# -- each distinct message stored once ---------------------------------------------------------


def message_refs(db: Path) -> dict[bytes, int]:
    """Each stored message's body and how many sessions refer to it; asserts that the
    counts are those the sessions' message ids give, so no message is kept that no
    session uses."""
    with closing(sqlite3.connect(db)) as conn:
        stored = {
            message_id: (body, refs)
            for message_id, body, refs in conn.execute("SELECT id, body, refs FROM messages")
        }
        used: dict[int, int] = {}
        for (blob,) in conn.execute("SELECT message_ids FROM sessions"):
            for message_id in set(sqlite_module._unpack_ids(blob)) - {0}:
                used[message_id] = used.get(message_id, 0) + 1
    assert {message_id: refs for message_id, (_, refs) in stored.items()} == used
    return {body: refs for body, refs in stored.values()}


def recorded_session(loops: int = 2, turns: int = 2) -> Session:
    """A session recorded through `Tracer` with every streamed chunk, each turn's request
    carrying the whole conversation so far (as phi-core's agent sends it)."""
    recorder = SessionRecorder(include_streaming_events=True)
    tracer = Tracer(AgentSession("agent"), sinks=[recorder])
    config = LoopConfigSnapshot(model="m", provider="p", config_id="p.m")
    conversation: list[AgentMessage] = []
    first: str | None = None
    for n in range(loops):
        with tracer.loop(config, continues=first) as loop:
            first = first or loop.loop_id
            conversation.append(loop.user(f"task {n}"))
            for t in range(turns):
                request = AnnotatedRequestPayload(
                    system_prompt="be brief",
                    messages=tuple(conversation),  # type: ignore[arg-type]
                    provenance=(),
                    tools=(),
                    model_id="m",
                    thinking_level="off",
                    response_format=TextFormat(),
                )
                call = ToolCall(id=f"call-{n}-{t}", name="lookup", arguments={"q": f"q{n}{t}"})
                with loop.turn(request=request) as turn:
                    with turn.assistant() as reply:
                        reply.text_delta(f"looking {n}")
                        reply.text_delta(f" up {t}")
                        reply.finish(tool_calls=[call], usage=Usage(input=10, output=5, total_tokens=15))
                    with turn.tool(call) as tool:
                        tool.result(f"found {n}.{t}")
                conversation.append(turn.message)
                conversation.extend(turn.tool_results)
    recorder.flush()
    [session] = recorder.drain_completed()
    return session


def test_each_distinct_message_is_stored_once(store: SqliteStore, db: Path) -> None:
    session = recorded_session()
    store.save(session)
    assert encode_session(store.load(session.session_id)) == encode_session(session)
    written = [encode_loop(loop, pretty=False) for loop in session.loops]
    bodies = message_refs(db)
    # Every stored body is a message as the records write it, in one of its forms (and
    # stored once: the digests are unique)...
    assert all(any(body in loop for loop in written) for body in bodies)
    assert {encode_message(m) for loop in session.loops for m in loop.messages} <= set(bodies)
    # ...so the conversation repeated in every request takes no room.
    with closing(sqlite3.connect(db)) as conn:
        (stored,) = conn.execute("SELECT SUM(length(record)) FROM loops").fetchone()
    assert stored + sum(map(len, bodies)) < sum(map(len, written)) / 2
    # The same conversation in another session: its messages are already stored.
    store.save(msgspec.structs.replace(session, session_id="copy"))
    assert message_refs(db) == {body: 2 for body in bodies}


def test_sessions_share_messages_until_the_last_one_goes(store: SqliteStore, db: Path) -> None:
    store.save(make_session("a", loops=[talking_loop("a", 1, "brew coffee")]))
    store.save(make_session("b", loops=[talking_loop("b", 1, "brew coffee")]))
    store.save(make_session("c", created_at=at(10), loops=[talking_loop("c", 1, "water plants")]))
    bodies = message_refs(db)
    shared = [body for body, refs in bodies.items() if refs == 2]
    assert shared and all(b"coffee" in body for body in shared)
    store.delete("a")  # its messages stamped with its loop's id go, the shared ones stay
    assert message_refs(db) == {body: 1 for body in bodies if b'"a.cfg.1"' not in body}
    assert store.prune(PruneCriteria(keep_last=1)) == 1  # b goes, c stays
    assert all(b"plants" in body for body in message_refs(db))
    assert encode_session(store.load("c")) == encode_session(
        make_session("c", created_at=at(10), loops=[talking_loop("c", 1, "water plants")])
    )
    store.delete("c")
    assert message_refs(db) == {}


def test_a_save_adding_stored_and_new_messages_refers_to_each_row(store: SqliteStore, db: Path) -> None:
    """A save offers the messages it adds as new rows: those already stored (by digest)
    are referred to instead, the others inserted, and the ids left unused harm nothing."""
    sessions = [
        make_session("a", loops=[talking_loop("a", 1, "brew coffee")]),
        make_session(
            "b",
            loops=[
                talking_loop("b", 1, "brew coffee"),
                talking_loop("b", 2, "grind beans", started_at=at(5)),
            ],
        ),
        make_session("c", created_at=at(10), loops=[talking_loop("c", 1, "water plants")]),
    ]
    for session in sessions:
        store.save(session)
    bodies = message_refs(db)
    assert {b"coffee" in body for body, refs in bodies.items() if refs == 2} == {True}
    assert any(b"beans" in body for body in bodies) and any(b"plants" in body for body in bodies)
    for session in sessions:
        assert encode_session(store.load(session.session_id)) == encode_session(session)


def test_a_replaced_loop_releases_the_messages_only_it_used(store: SqliteStore, db: Path) -> None:
    running = talking_loop("r", 1, "brew coffee")
    running.status, running.ended_at = "Running", None
    store.save(make_session("r", loops=[running, talking_loop("r", 2, "grind beans", started_at=at(5))]))
    finished = talking_loop("r", 1, "water plants")
    store.save(make_session("r", loops=[finished]))  # the finished version wins the merge
    bodies = message_refs(db)
    assert not any(b"coffee" in body for body in bodies)
    assert any(b"plants" in body for body in bodies) and any(b"beans" in body for body in bodies)
    loaded = store.load("r")
    assert [loop.messages for loop in loaded.loops] == [
        finished.messages,
        talking_loop("r", 2, "grind beans", started_at=at(5)).messages,
    ]
    store.save(make_session("r", loops=[talking_loop("r", 3, "brew coffee", started_at=at(9))]))
    assert any(b"coffee" in body for body in message_refs(db))  # numbered again, stored again
    assert [loop.loop_id for loop in store.load("r").loops] == ["r.cfg.1", "r.cfg.2", "r.cfg.3"]


def test_concurrent_writers_and_readers_keep_every_message_they_need(db: Path) -> None:
    """Threads, each with its own store (and so connection), save, re-save and delete
    sessions sharing messages while others read them: every read sees whole sessions,
    and in the end exactly the messages still used are stored."""
    with SqliteStore(db) as store:
        store.save(make_session("keep", loops=[talking_loop("keep", 1, "topic0")]))
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(worker: int) -> None:
        try:
            with SqliteStore(db, timeout=30) as own:
                for n in range(12):
                    session_id = f"w{worker}-{n % 3}"
                    said = f"topic{(worker + n) % 4}"
                    own.save(
                        make_session(session_id, loops=[talking_loop(session_id, n, said, started_at=at(n))])
                    )
                    if n % 4 == 3:
                        own.delete(session_id)
        except BaseException as error:  # reported below
            errors.append(error)

    def read() -> None:
        try:
            with SqliteStore(db) as own:
                while not stop.is_set():
                    for session_id in own.list_ids():
                        try:
                            session = own.load(session_id)
                        except SessionNotFound:
                            continue  # deleted meanwhile
                        assert all(loop.messages for loop in session.loops)
        except BaseException as error:  # reported below
            errors.append(error)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in (*readers, *writers):
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []
    bodies = message_refs(db)
    with SqliteStore(db) as store:
        for session_id in store.list_ids():
            store.load(session_id)
        for session_id in store.list_ids():
            store.delete(session_id)
    assert bodies and message_refs(db) == {}


def test_the_v6_migration_stores_each_message_once(db: Path) -> None:
    recorded = recorded_session()
    sessions = [
        recorded,
        make_session("talk", loops=[talking_loop("talk", 1, "brew coffee"), make_loop("talk", 2, events=3)]),
        make_session("bad", loops=[talking_loop("bad", 1, "brew tea")]),
        *(decode_session(path.read_bytes()) for path in EXAMPLE_SESSIONS),
    ]
    with SqliteStore(db) as store:
        for session in sessions:
            store.save(session)
        saved = {session.session_id: encode_session(store.load(session.session_id)) for session in sessions}
    back_to_v5(db)  # as the previous version wrote them: whole records
    raw_execute(db, "UPDATE loops SET record = 'not json' WHERE session_id = 'bad'")
    size = db.stat().st_size
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert {sid: encode_session(store.load(sid)) for sid in saved if sid != "bad"} == {
            sid: data for sid, data in saved.items() if sid != "bad"
        }
        with pytest.raises(StoreError, match="'bad' is corrupt"):
            store.load("bad")
        assert store.load_outline("talk") == session_outline(store.load("talk"))
        assert store.load_loops(recorded.session_id, 1, 2) == store.load(recorded.session_id).loops[1:]
        assert [hit.session_id for hit in store.search("coffee")] == ["talk"] * 5
        store.delete("bad")
    assert db.stat().st_size < size
    bodies = message_refs(db)
    assert bodies
    with SqliteStore(db) as store:
        for session_id in store.list_ids():
            store.delete(session_id)
    assert message_refs(db) == {}


@pytest.mark.skipif(not prices_available(), reason="needs the prices extra (genai-prices)")
def test_the_v7_migration_stores_the_model_calls(db: Path) -> None:
    # Priced per call after the migration: two calls of 150k input tokens, each below the tier.
    tiered = make_session(
        "tiered",
        loops=[calls_loop("tiered", 1, [TIERED_CALL, TIERED_CALL]), make_loop("tiered", 2, tokens=100)],
    )
    bad = make_session("bad", "broken", loops=[calls_loop("bad", 1, [TIERED_CALL, TIERED_CALL])])
    with SqliteStore(db) as store:
        store.save(tiered)
        store.save(bad)
    back_to_v6(db)
    raw_execute(db, "UPDATE loops SET record = x'00' WHERE session_id = 'bad'")
    pricer = Pricer()
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.load_outline("tiered") == session_outline(store.load("tiered"))
        costs = {row.key: row.cost for row in store.usage_totals("agent", pricer=pricer)}
        per_call = pricer.session(tiered)
        assert costs["agent"] == per_call and per_call.usd is not None
        assert per_call.usd < pricer.price(tiered.billed_usage(), "google", "gemini-2.5-pro", at(1)).usd
        # A record that does not decode keeps no calls: its billed usage stands in for them.
        stand_in = pricer.price(bad.billed_usage(), "google", "gemini-2.5-pro", bad.loops[0].started_at)
        assert costs["broken"] == stand_in
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT session_id, calls IS NOT NULL FROM loops ORDER BY 1, position").fetchall()
    assert rows == [("bad", 0), ("tiered", 1), ("tiered", 1)]


def test_stored_model_calls_that_do_not_decode_are_priced_as_one_call(
    store: SqliteStore, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session("s", loops=[calls_loop("s", 1, [TIERED_CALL, TIERED_CALL], model="acme/m")])
    store.save(session)
    raw_execute(db, "UPDATE loops SET calls = x'5b5b' WHERE session_id = 's'")  # "[[": cut short
    pricer = Pricer({"acme/m": {"input": 1, "output": 1}}, use_table=False)
    with caplog.at_level(logging.WARNING):
        [row] = store.usage_totals("model", pricer=pricer)
    assert row.cost == pricer.price(session.billed_usage(), "acme", "m", session.loops[0].started_at)
    assert "model calls do not decode" in caplog.text


# -- queries -----------------------------------------------------------------------------------


def _populate_many(store: SqliteStore, count: int = 60) -> None:
    for n in range(count):
        session_id = f"s{n:03}"
        store.save(
            make_session(
                session_id,
                f"agent-{n % 5}",
                created_at=at(n),
                last_active_at=at(n + 1),
                parent_session_id="s000" if n % 7 == 0 and n else None,
                loops=[
                    make_loop(
                        session_id,
                        1,
                        agent_id=f"agent-{n % 5}",
                        tokens=n * 10,
                        status="Aborted" if n % 3 == 0 else "Completed",
                        model="anthropic/claude-sonnet-4-5" if n % 2 else "openai/gpt-4o",
                    )
                ],
            )
        )
    connection_of(store).execute("ANALYZE")


@pytest.mark.parametrize(
    "filters",
    [
        {"agent_id": "agent-1"},
        {"agent_id": "agent-1", "since": at(10)},
        {"since": at(10)},
        {"since": at(10), "until": at(20)},
        {"parent_session_id": "s000"},
    ],
)
def test_session_filters_use_an_index(store: SqliteStore, filters: dict[str, object]) -> None:
    _populate_many(store)
    plan = store.explain_query(SessionQuery(**filters))  # type: ignore[arg-type]
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    assert "SCAN sessions" not in plan, plan


@pytest.mark.parametrize("limit", [None, 10])
@pytest.mark.parametrize(
    "filters",
    [
        {"status": "Aborted"},
        {"model": "claude-sonnet-4-5"},
        {"model": "anthropic/claude-sonnet-4-5"},
    ],
)
def test_loop_filters_use_a_covering_index(
    store: SqliteStore, filters: dict[str, object], limit: int | None
) -> None:
    _populate_many(store)
    plan = store.explain_query(SessionQuery(limit=limit, **filters))  # type: ignore[arg-type]
    assert "SEARCH loops USING COVERING INDEX" in plan, plan
    assert "SCAN loops" not in plan, plan


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"agent_id": "agent-2"},
        {"order": "tokens"},
        {"status": "Aborted"},
        {"model": "gpt-4o"},
        {"agent_id": "agent-2", "model": "openai/gpt-4o"},
    ],
)
def test_limited_listing_reads_in_index_order(store: SqliteStore, filters: dict[str, object]) -> None:
    _populate_many(store)
    plan = store.explain_query(SessionQuery(limit=10, **filters))  # type: ignore[arg-type]
    assert "TEMP B-TREE" not in plan, plan  # no sort: the scan stops after 10 matches


def test_model_names_with_slashes(store: SqliteStore) -> None:
    store.save(make_session("r", loops=[make_loop("r", 1, model="openrouter/meta-llama/llama-3")]))
    for name in ("openrouter/meta-llama/llama-3", "meta-llama/llama-3"):
        assert [row.session_id for row in store.query(SessionQuery(model=name))] == ["r"]
    assert store.query(SessionQuery(model="llama-3")) == []
    assert store.query(SessionQuery(model="openrouter/meta-llama")) == []


_statuses: st.SearchStrategy[LoopStatus] = st.sampled_from(
    ["Pending", "Running", "Completed", "Rejected", "Aborted"]
)
_models = st.sampled_from([None, "openai/gpt-4o", "anthropic/claude-sonnet-4-5", "local/llama"])


@st.composite
def _sessions(draw: st.DrawFn) -> list[Session]:
    sessions = []
    for n in range(draw(st.integers(min_value=0, max_value=8))):
        session_id = f"s{n}"
        agent = draw(st.sampled_from(["a", "b", "c"]))
        created = at(draw(st.integers(min_value=0, max_value=3 * 86_400)))
        loops = [
            make_loop(
                session_id,
                i,
                agent_id=agent,
                status=draw(_statuses),
                model=draw(_models),
                tokens=draw(st.integers(min_value=0, max_value=500)),
                started_at=created,
            )
            for i in range(draw(st.integers(min_value=0, max_value=3)))
        ]
        last_active = Timestamp.from_ns(created.ns + draw(st.integers(min_value=0, max_value=3)) * 10**9)
        sessions.append(
            make_session(
                session_id,
                agent,
                created_at=created,
                last_active_at=last_active,
                loops=loops,
                parent_session_id=draw(st.sampled_from([None, "s0"])),
            )
        )
    return sessions


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sessions=_sessions(),
    agent_id=st.sampled_from([None, "a", "b"]),
    since=st.sampled_from([None, at(0), at(86_400)]),
    until=st.sampled_from([None, at(86_400), at(2 * 86_400)]),
    status=st.none() | _statuses,
    model=st.sampled_from([None, "gpt-4o", "anthropic/claude-sonnet-4-5", "local"]),
    min_tokens=st.sampled_from([None, 0, 300]),
    parent_session_id=st.sampled_from([None, "s0"]),
    limit=st.sampled_from([None, 0, 2]),
    order=st.sampled_from(["newest", "oldest", "tokens"]),
    group_by=st.sampled_from(["agent", "model", "day"]),
    keep_last=st.sampled_from([None, 0, 2]),
)
def test_agrees_with_the_json_directory_store(
    sessions: list[Session], group_by: str, keep_last: int | None, **filters: object
) -> None:
    """Differential test: SQL over the columns against JsonDirStore's Python over summaries."""
    assume(filters["since"] is None or filters["until"] is None or filters["until"] > filters["since"])
    query = SessionQuery(**filters)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        with SqliteStore(Path(tmp) / "s.db") as sqlite_store:
            json_store = JsonDirStore(Path(tmp) / "json")
            for session in sessions:
                sqlite_store.save(session)
                json_store.save(session)
            assert sqlite_store.query(query) == json_store.query(query)
            assert sqlite_store.usage_totals(group_by) == json_store.usage_totals(group_by)  # type: ignore[arg-type]
            if filters["until"] is not None or keep_last is not None:
                prune = PruneCriteria(
                    older_than=filters["until"],
                    keep_last=keep_last,  # type: ignore[arg-type]
                    agent_id=filters["agent_id"],
                )  # type: ignore[arg-type]
                assert sqlite_store.prune(prune) == json_store.prune(prune)
                assert sqlite_store.list_ids() == json_store.list_ids()


# -- interpreter exit ------------------------------------------------------------------------

_SAVE_UNTIL_EXIT = """
import sys, threading
from phi_session.stores.conformance import make_loop, make_session
from phi_session.stores.sqlite import SqliteStore

store = SqliteStore(sys.argv[1])
saving = threading.Event()

def save_forever():
    n = 0
    while True:
        n += 1
        store.save(make_session(f"s{n % 7}", loops=[make_loop(f"s{n % 7}", n, events=20)]))
        saving.set()

threading.Thread(target=save_forever, daemon=True).start()
saving.wait()  # then the main thread ends while the daemon thread is saving
"""


def test_exit_while_a_daemon_thread_saves_does_not_crash(tmp_path: Path) -> None:
    # The exit hook used to close the daemon thread's connection under a running
    # statement: SIGSEGV about 3 runs in 10. Three runs at a time, 30 in all.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for batch in range(10):
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", _SAVE_UNTIL_EXIT, str(tmp_path / f"{batch}-{n}.db")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for n in range(3)
        ]
        for run in runs:
            _, stderr = run.communicate(timeout=120)
            assert (run.returncode, stderr.decode()) == (0, "")


# -- prune -----------------------------------------------------------------------------------


def test_prune_gives_space_back(store: SqliteStore, db: Path) -> None:
    conn = connection_of(store)
    empty = conn.execute("PRAGMA page_count").fetchone()[0]  # the schema's pages
    for n in range(40):
        store.save(
            make_session(
                f"p{n}",
                created_at=at(n),
                loops=[make_loop(f"p{n}", i, events=60, started_at=at(n)) for i in range(3)],
            )
        )
    pages_before = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size_before = db.stat().st_size
    assert store.prune(PruneCriteria(keep_last=4)) == 36
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    pages_after = conn.execute("PRAGMA page_count").fetchone()[0]
    assert pages_after - empty < (pages_before - empty) / 3
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    assert db.stat().st_size - empty * page_size < (size_before - empty * page_size) / 3
    assert sorted(store.list_ids()) == ["p36", "p37", "p38", "p39"]
    assert conn.execute("SELECT COUNT(*) FROM loops").fetchone()[0] == 12  # loops went with sessions


def test_prune_returns_what_it_deleted_when_another_writer_holds_off_the_reclaim(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(db, timeout=0.01)
    for n in range(3):
        store.save(make_session(f"p{n}", created_at=at(n)))
    other = sqlite3.connect(db, isolation_level=None)
    reclaim = sqlite_module._reclaim_space

    def another_writer_first(conn: sqlite3.Connection) -> None:
        other.execute("BEGIN IMMEDIATE")  # another process saves right after the prune commits
        reclaim(conn)

    monkeypatch.setattr(sqlite_module, "_reclaim_space", another_writer_first)
    try:
        with caplog.at_level(logging.WARNING, logger=sqlite_module.logger.name):
            assert store.prune(PruneCriteria(keep_last=1)) == 2
    finally:
        other.rollback()
        other.close()
    assert store.list_ids() == ["p2"]
    assert "reclaim" in caplog.text
    store.close()


# -- errors --------------------------------------------------------------------------------------


def test_a_held_write_lock_raises_session_locked(db: Path) -> None:
    with SqliteStore(db, timeout=0.1) as store:
        store.save(make_session("x"))
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(SessionLocked, match="locked"):
                store.save(make_session("x", loops=[make_loop("x", 2)]))
            assert [r.loop_id for r in store.load("x").loops] == ["x.cfg.1"]  # readers are not blocked
        finally:
            blocker.close()
        store.save(make_session("x", loops=[make_loop("x", 2)]))
        assert len(store.load("x").loops) == 2


def test_a_timeout_sqlite_cannot_wait_is_refused(db: Path) -> None:
    # SQLite takes its busy wait as a C int of milliseconds: beyond 2**31-1 ms (inf, 1e9)
    # it got none at all, and a save raised SessionLocked "for more than inf s" at once.
    for seconds in (float("inf"), float("nan"), 1e300, 2_147_484.0, -1.0):
        refused = r"^timeout must be a number of seconds >= 0 and <= 2147483.647, got"
        with pytest.raises(InvalidArgument, match=refused):
            SqliteStore(db, timeout=seconds)
    with pytest.raises(TypeError, match="timeout"):
        SqliteStore(db, timeout="5")  # type: ignore[arg-type]
    with SqliteStore(db, timeout=2_147_483.647) as store:  # the longest wait: it waits
        store.save(make_session("x"))
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.5, blocker.commit)
        release.start()
        try:
            started = time.monotonic()
            store.save(make_session("x", loops=[make_loop("x", 2)]))
            assert time.monotonic() - started >= 0.3
        finally:
            release.join()
            blocker.close()


def test_opening_and_reading_never_wait_for_another_writer(db: Path) -> None:
    """Another process's long write (a big save) holds the write lock: opening the store
    and reading from a thread with no connection yet neither wait for it nor fail."""
    with SqliteStore(db) as store:
        store.save(make_session("x"))
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with SqliteStore(db, timeout=0.1) as store:
            read: list[object] = []

            def reads() -> None:
                read.append([r.loop_id for r in store.load("x").loops])
                read.append([o.loop_id for o in store.load_outline("x").loops])
                read.append([s.session_id for s in store.query()])

            thread = threading.Thread(target=reads)
            thread.start()
            thread.join()
            assert read == [["x.cfg.1"], ["x.cfg.1"], ["x"]]
    finally:
        blocker.close()


def test_full_database_leaves_the_stored_session_whole(store: SqliteStore) -> None:
    first = make_session("f", loops=[make_loop("f", 1, events=2)])
    store.save(first)
    conn = connection_of(store)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    big = make_session("f", loops=[make_loop("f", i, events=200) for i in range(2, 12)])
    with pytest.raises(StoreError, match="full"):
        store.save(big)
    assert encode_session(store.load("f")) == encode_session(first)
    assert store.list_ids() == ["f"]


def test_corrupt_record(store: SqliteStore, db: Path, caplog: pytest.LogCaptureFixture) -> None:
    store.save(make_session("good", "x"))
    store.save(make_session("bad", "x"))
    raw_execute(db, "UPDATE loops SET record = X'7b7d' WHERE session_id = 'bad'")
    with pytest.raises(StoreError, match="'bad' is corrupt"):
        store.load("bad")
    with caplog.at_level(logging.WARNING):
        assert [s.session_id for s in store.list_for_agent("x")] == ["good"]
    assert "bad" in caplog.text
    # Never overwritten by a merge, which fails so until it is deleted: not worth a retry.
    with pytest.raises(StoredSessionUnusable, match="corrupt"):
        store.save(make_session("bad", "x", loops=[make_loop("bad", 1)]))
    # A save that does not touch it (a loop of its own) is kept, beside it as it was.
    store.save(make_session("bad", "x", loops=[make_loop("bad", 2)]))
    assert [loop.loop_id for loop in store.load_outline("bad").loops] == ["bad.cfg.1", "bad.cfg.2"]
    assert [loop.loop_id for loop in store.load_loops("bad", 1, 2)] == ["bad.cfg.2"]
    with pytest.raises(StoreError, match="'bad' is corrupt"):
        store.load("bad")
    store.delete("bad")


def test_search_skips_a_corrupt_session(
    store: SqliteStore, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As PostgresStore.search and the listings do: one corrupt record failed every search.
    store.save(make_session("good", loops=[talking_loop("good", 1, "brew coffee")]))
    store.save(make_session("bad", loops=[talking_loop("bad", 1, "brew coffee")]))
    raw_execute(db, "UPDATE loops SET record = X'7b7d' WHERE session_id = 'bad'")
    with caplog.at_level(logging.WARNING):
        assert {hit.session_id for hit in store.search("coffee")} == {"good"}
    assert "skipping unreadable session 'bad'" in caplog.text


def test_a_session_with_corrupt_message_ids_is_reported_and_can_be_deleted(
    store: SqliteStore, db: Path
) -> None:
    store.save(make_session("good", loops=[talking_loop("good", 1, "brew coffee")]))
    store.save(make_session("bad", loops=[talking_loop("bad", 1, "brew coffee")]))
    raw_execute(db, "UPDATE sessions SET message_ids = X'0102' WHERE session_id = 'bad'")
    with pytest.raises(StoreError, match="'bad' is corrupt"):
        store.load("bad")
    store.delete("bad")  # its messages stay (the ids cannot be read): none of good's goes
    assert encode_session(store.load("good")) == encode_session(
        make_session("good", loops=[talking_loop("good", 1, "brew coffee")])
    )


# -- concurrency -------------------------------------------------------------------------------


def test_threads_saving_overlapping_sessions_lose_no_loop(store: SqliteStore) -> None:
    threads, rounds, shared = 6, 8, ["c0", "c1", "c2"]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for n in range(rounds):
                session_id = shared[(worker + n) % len(shared)]
                index = worker * 100 + n
                store.save(
                    make_session(session_id, loops=[make_loop(session_id, index, status="Running", events=1)])
                )
                store.save(make_session(session_id, loops=[make_loop(session_id, index, events=2)]))
        except BaseException as error:  # reported below
            errors.append(error)

    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    expected = {
        f"{shared[(w + n) % len(shared)]}.cfg.{w * 100 + n}" for w in range(threads) for n in range(rounds)
    }
    loaded = [record for session_id in shared for record in store.load(session_id).loops]
    assert {record.loop_id for record in loaded} == expected
    assert len(loaded) == len(expected)
    assert all(record.status == "Completed" for record in loaded)
    assert sum(row.loop_count for row in store.query()) == len(expected)


def _use_in_child(store: SqliteStore, session_id: str, inherited_connections: bool) -> None:
    if inherited_connections:
        try:
            store.list_ids()
        except StoreError as error:
            assert "fork" in str(error)
        else:
            os._exit(3)  # the inherited connection was used
        store.close()  # leaves the inherited connections alone, then reconnects
    store.save(make_session(session_id))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
@pytest.mark.parametrize("close_before_fork", [False, True])
def test_fork(store: SqliteStore, close_before_fork: bool) -> None:
    store.save(make_session("parent-1"))
    if close_before_fork:
        store.close()
    child = multiprocessing.get_context("fork").Process(
        target=_use_in_child, args=(store, "child", not close_before_fork)
    )
    child.start()
    child.join(30)
    assert child.exitcode == 0
    store.save(make_session("parent-2"))  # the parent's connection was left working
    assert sorted(store.list_ids()) == ["child", "parent-1", "parent-2"]


def _indexed_loops(db: Path) -> tuple[int, int]:
    """Rows of the search text table and of its FTS5 index."""
    with closing(sqlite3.connect(db)) as conn:
        texts = conn.execute("SELECT COUNT(*) FROM loop_text").fetchone()[0]
        indexed = conn.execute(
            "SELECT COUNT(*) FROM loop_text_fts WHERE loop_text_fts MATCH 'please'"
        ).fetchone()[0]
    return texts, indexed


def test_the_v2_migration_indexes_the_stored_loops(db: Path) -> None:
    with SqliteStore(db) as store:
        store.save(make_session("old", loops=[talking_loop("old", 1, "brew coffee")]))
    # Back to version 1: the stored loops, no search tables.
    back_to_v5(db)
    raw_execute(
        db,
        "DROP TABLE loop_text_fts",
        "DROP TABLE loop_text",
        "ALTER TABLE loops DROP COLUMN outline",
        "ALTER TABLE sessions DROP COLUMN first_prompt",
        "PRAGMA user_version = 1",
    )
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        kinds = [hit.kind for hit in store.search("coffee")]
        assert kinds == ["text", "thinking", "text", "tool_call", "tool_result"]
    assert _indexed_loops(db) == (1, 1)


def test_the_v8_migration_indexes_the_rule_s_words(db: Path) -> None:
    with SqliteStore(db) as store:
        store.save(make_session("old", loops=[talking_loop("old", 1, "the cafe\u0301 opens")]))
    back_to_v7(db)  # unicode61 kept "cafe\u0301" one token: the rule's word was not found
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [hit.kind for hit in store.search("caf\u00e9 opens")] == [
            "text",
            "thinking",
            "text",
            "tool_call",
            "tool_result",
        ]
        store.save(make_session("new", loops=[talking_loop("new", 1, "alpha\ue000beta")]))
        assert {hit.session_id for hit in store.search("alpha beta")} == {"new"}
    with closing(sqlite3.connect(db)) as conn:
        assert (
            conn.execute("SELECT text FROM loop_text WHERE session_id = 'old'")
            .fetchone()[0]
            .startswith("please the caf\u00e9 opens plan")
        )
    assert _indexed_loops(db) == (2, 2)


def _json_escaped_arguments(arguments: object) -> str:
    """How a tool call's arguments were read before schema version 9: their JSON as written."""
    return msgspec.json.encode(arguments).decode()


def test_the_v9_migration_reads_tool_call_arguments_as_text(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:
        before.setattr(search_module, "_arguments_text", _json_escaped_arguments)
        with SqliteStore(db) as store:
            store.save(make_session("old", loops=[talking_loop("old", 1, "import os\nimport sys")]))
            store.save(make_session("plain", loops=[talking_loop("plain", 1, "brew coffee")]))
            assert [hit.kind for hit in store.search("nimport")] == ["tool_call"]
        raw_execute(db, "DROP TABLE loop_models", "PRAGMA user_version = 8")
    with closing(sqlite3.connect(db)) as conn:
        before_texts = dict(conn.execute("SELECT session_id, text FROM loop_text").fetchall())
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [hit.kind for hit in store.search("sys")][3] == "tool_call"
        assert store.search("nimport") == []
    with closing(sqlite3.connect(db)) as conn:
        after_texts = dict(conn.execute("SELECT session_id, text FROM loop_text").fetchall())
    assert after_texts["plain"] == before_texts["plain"]  # only the loops whose words change
    assert "nimport" in before_texts["old"].split() and "nimport" not in after_texts["old"].split()
    assert _indexed_loops(db) == (2, 2)


def test_the_v10_migration_indexes_what_loops_that_never_ended_said(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:  # a loop's messages only, as before version 10
        before.setattr(LoopRecord, "conversation", lambda record: record.messages)
        with SqliteStore(db) as store:
            store.save(make_session("cut", loops=[cut_loop("cut", 1, "brew coffee")]))
            store.save(make_session("plain", loops=[talking_loop("plain", 1, "brew coffee")]))
        raw_execute(db, "DROP TABLE loop_models", "PRAGMA user_version = 9")
    with closing(sqlite3.connect(db)) as conn:
        before_texts = dict(conn.execute("SELECT session_id, text FROM loop_text").fetchall())
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [hit.session_id for hit in store.search("coffee")] == ["cut"] * 5 + ["plain"] * 5
    with closing(sqlite3.connect(db)) as conn:
        after_texts = dict(conn.execute("SELECT session_id, text FROM loop_text").fetchall())
    assert after_texts["plain"] == before_texts["plain"] and before_texts["cut"] == ""
    assert after_texts["cut"] == after_texts["plain"]
    assert _indexed_loops(db) == (2, 2)


def test_the_v4_migration_outlines_the_stored_loops(db: Path) -> None:
    with SqliteStore(db) as store:
        store.save(make_session("old", loops=[talking_loop("old", 1, "brew coffee"), make_loop("old", 2)]))
        store.save(make_session("bad", loops=[talking_loop("bad", 1, "brew tea")]))
    back_to_v5(db)
    raw_execute(
        db,
        "ALTER TABLE loops DROP COLUMN outline",
        "ALTER TABLE sessions DROP COLUMN first_prompt",
        "UPDATE loops SET record = 'not json' WHERE session_id = 'bad'",
        "PRAGMA user_version = 3",
    )
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.load_outline("old") == session_outline(store.load("old"))
        with pytest.raises(StoreError, match="'bad' is corrupt"):
            store.load_outline("bad")  # not outlined: its record is read, and reported
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT session_id, outline IS NOT NULL FROM loops ORDER BY 1, position"
        ).fetchall()
    assert rows == [("bad", 0), ("old", 1), ("old", 1)]
    with SqliteStore(db) as store:  # v5 stores the first prompts (of what v4 outlined)
        prompts = {row.session_id: row.first_prompt for row in store.query()}
    assert prompts == {"old": "Please brew coffee", "bad": None}


def test_outlines_stored_in_their_first_form_still_load(store: SqliteStore, db: Path) -> None:
    # Schema 4 stored an outline as the bare record, then the counts (no flat fields):
    # such rows are read as they are, their flat fields taken from the record.
    session = make_session("first", loops=[talking_loop("first", 1, "brew coffee"), make_loop("first", 2)])
    store.save(session)
    expected = session_outline(store.load("first"))
    with closing(sqlite3.connect(db)) as conn, conn:
        for position, loop in enumerate(expected.loops):
            first_form = msgspec.json.encode(
                {
                    "record": loop.record_json,
                    "turn_count": loop.turn_count,
                    "tool_calls": loop.tool_calls,
                    "event_types": loop.event_types,
                    "billed_usage": loop.billed_usage,
                    "unfinished_usage": loop.unfinished_usage,
                    "prompt": loop.prompt,
                }
            )
            conn.execute(
                "UPDATE loops SET outline = ? WHERE session_id = 'first' AND position = ?",
                (first_form, position),
            )
    # Without the model calls (added later): the billed usage stands in for them.
    first = store.load_outline("first")
    assert first == msgspec.structs.replace(
        expected, loops=tuple(msgspec.structs.replace(loop, calls=None) for loop in expected.loops)
    )
    assert [loop.model_calls() for loop in first.loops] == [
        (ModelCall.of(loop.started_at, loop.billed_usage),) for loop in expected.loops
    ]
    assert [loop.record.loop_id for loop in expected.loops] == [loop.loop_id for loop in expected.loops]


def test_the_index_follows_saves_deletes_and_prunes(store: SqliteStore, db: Path) -> None:
    store.save(make_session("a", loops=[talking_loop("a", 1, "brew coffee")]))
    store.save(make_session("a", loops=[talking_loop("a", 2, "grind beans", started_at=at(5))]))
    store.save(make_session("b", last_active_at=at(50), loops=[talking_loop("b", 1, "water plants")]))
    assert _indexed_loops(db) == (3, 3)
    store.delete("a")
    assert _indexed_loops(db) == (1, 1)  # no stale rows: the index is not merely filtered
    assert store.prune(PruneCriteria(keep_last=0)) == 1
    assert _indexed_loops(db) == (0, 0)


def test_save_many_indexes_the_last_version_of_a_session_given_twice(store: SqliteStore, db: Path) -> None:
    # The batch's loop texts are written together at its end: the later one must win.
    store.save_many(
        [
            make_session("a", loops=[talking_loop("a", 1, "brew coffee")]),
            make_session("a", loops=[talking_loop("a", 1, "grind beans")], last_active_at=at(9)),
            make_session("b", loops=[talking_loop("b", 1, "water plants")]),
        ]
    )
    assert store.search("coffee") == []
    assert {hit.session_id for hit in store.search("beans")} == {"a"}
    assert {hit.session_id for hit in store.search("plants")} == {"b"}
    assert _indexed_loops(db) == (2, 2)


def test_search_reads_only_the_sessions_the_index_names(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(5):
        store.save(make_session(f"s{index}", loops=[talking_loop(f"s{index}", 1, f"topic{index}")]))
    loaded: list[str] = []
    real_load = SqliteStore.load

    def load(self: SqliteStore, session_id: str) -> Session:
        loaded.append(session_id)
        return real_load(self, session_id)

    monkeypatch.setattr(SqliteStore, "load", load)
    assert {hit.session_id for hit in store.search("topic3")} == {"s3"}
    assert loaded == ["s3"]


@pytest.mark.spec  # phi-core's example stream
def test_the_v3_migration_bills_the_loops_cut_off_mid_turn(db: Path) -> None:
    lines = (EXAMPLES_DIR / "events-basic.jsonl").read_bytes().split(b"\n")[:9]  # inside loop 1's turn
    recorder = SessionRecorder()
    for line in lines:
        recorder.on_json(line)
    recorder.flush()
    [session] = recorder.drain_completed()
    with SqliteStore(db) as store:
        store.save(session)
    # Back to version 2, as it saved this session: the cut loop and the session at zero tokens.
    tokens = (
        "input_tokens, output_tokens, reasoning_tokens, cache_read_tokens, cache_write_tokens, total_tokens"
    )
    back_to_v5(db)
    raw_execute(
        db,
        f"UPDATE loops SET ({tokens}) = (0, 0, 0, 0, 0, 0)",
        f"UPDATE sessions SET ({tokens}) = (0, 0, 0, 0, 0, 0)",
        "ALTER TABLE loops DROP COLUMN outline",
        "ALTER TABLE sessions DROP COLUMN first_prompt",
        "PRAGMA user_version = 2",
    )
    reported = reported_usage(lines)
    assert reported.output > 0
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [row.usage for row in store.query()] == [reported]
        assert [row.usage for row in store.usage_totals("model")] == [reported]
        assert encode_session(store.load(session.session_id)) == encode_session(session)  # records untouched


def test_save_many_keeps_a_batch_holding_lone_surrogates(tmp_path: Path) -> None:
    """One session's undecodable text made the whole batch (all or none) fail."""
    recorder = SessionRecorder()
    for session_id, text in (("plain", "hello"), ("bytes", "caf\udce9")):
        with Tracer(AgentSession("a", session_id=session_id), sinks=[recorder]).loop(
            LoopConfigSnapshot(model="m", provider="p")
        ) as loop:
            loop.user(text)
    recorder.flush()
    batch = recorder.drain_completed()
    store = SqliteStore(tmp_path / "s.db")
    store.save_many(batch)
    assert sorted(store.list_ids()) == ["bytes", "plain"]
    assert store.load("plain") == batch[0] and store.load("bytes") != batch[1]
    assert encode_session(store.load("bytes")) == encode_session(batch[1])


def test_saving_a_loop_into_a_long_session_reads_only_the_loops_it_touches(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_saves_read_only_touched_loops(store, sqlite_module, monkeypatch)


def numbered_but_unused(db: Path) -> dict[str, set[int]]:
    """Per session, the message numbers its message ids assign that none of its loops uses."""
    with closing(sqlite3.connect(db)) as conn:
        found: dict[str, set[int]] = {}
        for session_id, blob in conn.execute("SELECT session_id, message_ids FROM sessions"):
            assigned = {n for n, message_id in enumerate(sqlite_module._unpack_ids(blob)) if message_id}
            for (record,) in conn.execute("SELECT record FROM loops WHERE session_id = ?", (session_id,)):
                assigned -= numbers_in(unpack(record))
            if assigned:
                found[session_id] = assigned
    return found


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=conversation_parts)
def test_saves_in_parts_store_what_merging_them_gives_and_keep_no_unused_message(
    db: Path, parts: list[list[tuple[int, bool]]]
) -> None:
    """Whatever parts of a conversation are saved, in whatever order (running snapshots
    and finished loops, some loops again): the store holds what merging the parts gives,
    its summary, and exactly the messages its loops use."""
    with SqliteStore(db) as store:
        session_id = check_saves_in_parts(store, parts)
        assert numbered_but_unused(db) == {}
        message_refs(db)
        store.delete(session_id)
    assert message_refs(db) == {}


def test_an_interrupt_as_a_write_transaction_begins_leaves_no_lock_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C handled as `BEGIN IMMEDIATE` returned (a signal handler runs when the C call
    returns): the transaction stayed open, every later save from the thread was refused
    ("cannot start a transaction within a transaction") and other writers were locked out."""
    from phi_session.stores import sqlite as sqlite_module

    armed = [False]

    class Interrupted(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            cursor = super().execute(sql, *args)
            if armed[0] and sql == "BEGIN IMMEDIATE":
                armed[0] = False
                raise KeyboardInterrupt
            return cursor

    connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite_module.sqlite3, "connect", lambda *a, **k: connect(*a, factory=Interrupted, **k)
    )
    store = SqliteStore(tmp_path / "s.db")
    first, second = make_session("first"), make_session("second")
    store.save(first)
    armed[0] = True
    with pytest.raises(KeyboardInterrupt):
        store.save(second)
    store.save(second)  # the same thread saves again
    monkeypatch.undo()
    with SqliteStore(tmp_path / "s.db", timeout=1) as other:  # and another writer is not locked out
        other.save(make_session("third"))
        assert sorted(other.list_ids()) == ["first", "second", "third"]
    store.close()


def test_the_v11_migration_names_the_models_that_served_the_calls(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi_session.model as model_module
    from tests.test_cost import SERVED_PRICES, _served_session

    session = _served_session()
    with monkeypatch.context() as before:  # calls without their serving model, as before version 11
        before.setattr(model_module, "served_by", lambda reply, config: None)
        with SqliteStore(db) as store:
            store.save(session)
        raw_execute(db, "DROP TABLE loop_models", "PRAGMA user_version = 10")
    pricer = Pricer(SERVED_PRICES, use_table=False)
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        [row] = store.usage_totals("model", pricer=pricer)
        assert row.cost == pricer.session(session) and row.cost.usd == 0.15
        assert store.load_outline(session.session_id) == session_outline(session)


def test_the_v12_migration_indexes_the_composed_words(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decomposed = "send the re\u0301sume\u0301"
    with monkeypatch.context() as before:  # words split at each combining accent, as before version 12
        before.setattr(search_module, "_composed", lambda text: text)
        with SqliteStore(db) as store:
            store.save(make_session("nfd", loops=[talking_loop("nfd", 1, decomposed)]))
            assert store.search("r\u00e9sum\u00e9") == []
        raw_execute(db, "DROP TABLE loop_models", "PRAGMA user_version = 11")
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert {hit.session_id for hit in store.search("r\u00e9sum\u00e9")} == {"nfd"}
        assert store.search("sume") == []


def test_the_v15_migration_indexes_the_casefolded_words(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as before:  # words lower-cased, not case-folded, as before version 15
        before.setattr(search_module, "_folded", str.lower)
        with SqliteStore(db) as store:
            store.save(make_session("old", loops=[talking_loop("old", 1, "the Stra\u00dfe \ufb01le")]))
            store.save(make_session("plain", loops=[talking_loop("plain", 1, "brew coffee")]))
            assert store.search("strasse") == []
        raw_execute(db, "PRAGMA user_version = 14")
    with closing(sqlite3.connect(db)) as conn:
        before_texts = dict(conn.execute("SELECT session_id, text FROM loop_text").fetchall())
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert {hit.session_id for hit in store.search("STRASSE FILE")} == {"old"}
        assert {hit.session_id for hit in store.search("stra\u00dfe \ufb01le")} == {"old"}
    with closing(sqlite3.connect(db)) as conn:
        after_texts = dict(conn.execute("SELECT session_id, text FROM loop_text").fetchall())
    assert after_texts["plain"] == before_texts["plain"]
    assert "strasse" in after_texts["old"].split() and "stra\u00dfe" not in after_texts["old"].split()
    assert _indexed_loops(db) == (2, 2)


@pytest.mark.parametrize("written_at", [6, 13])
def test_the_v14_migration_lists_the_prompts_of_loops_that_never_ended(
    db: Path, monkeypatch: pytest.MonkeyPatch, written_at: int
) -> None:
    # Version 6: what the sessions list was kept; 13 (written at 7-9 before 41544bf): the outlines too.
    with SqliteStore(db) as store:
        bad = make_session("bad", loops=[cut_loop("bad", 1, "brew tea")])
        save_as_before_cut_loops_had_prompts(store, monkeypatch, bad)
    if written_at == 6:
        back_to_v6(db)
    else:
        raw_execute(db, "PRAGMA user_version = 13")
    raw_execute(db, "UPDATE loops SET record = X'7b7d' WHERE session_id = 'bad'")  # left as it is
    with SqliteStore(db, read_only=True) as reader:  # reads a migrated copy, leaves the file
        check_cut_loops_have_prompts(reader)
    assert pragma(db, "user_version") == written_at
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        check_cut_loops_have_prompts(store)
        assert [row.first_prompt for row in store.query() if row.session_id == "bad"] == [None]


def test_totals_by_model_read_no_loop_row(store: SqliteStore) -> None:
    # Each call counts under the model that served it, from one aggregate of what each
    # loop added (``loop_models``): reading every loop's calls took seconds on large stores.
    from tests.test_cost import SERVED_TOTAL, _served_session

    store.save(_served_session())
    read: set[str] = set()

    def authorize(action: int, table: str | None, *_: Any) -> int:
        if action == sqlite3.SQLITE_READ and table is not None:
            read.add(table)
        return sqlite3.SQLITE_OK

    conn = connection_of(store)
    conn.set_authorizer(authorize)
    try:
        assert store.usage_totals("model") == [SERVED_TOTAL]
    finally:
        conn.set_authorizer(None)
    assert read == {"sessions", "loop_models"}


def test_the_v13_migration_sums_the_loops_by_serving_model(db: Path) -> None:
    from tests.test_cost import _served_session, check_migrated_served_totals

    session = _served_session()
    with SqliteStore(db) as store:
        store.save(session)
        store.save(make_session("bad", loops=[make_loop("bad", 1, tokens=7)]))
    raw_execute(
        db,
        "DROP TABLE loop_models",
        "UPDATE loops SET calls = NULL WHERE session_id = 'bad'",  # its billed usage stands in
        "PRAGMA user_version = 12",
    )
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        check_migrated_served_totals(store, session)


def test_the_v16_migration_recounts_calls_without_a_total_and_turns_of_several_replies(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqliteStore(db) as store:
        sessions = save_as_before_untotalled_calls_counted(store, monkeypatch)
    raw_execute(db, "PRAGMA user_version = 15")
    with SqliteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION == 16
        check_untotalled_calls_counted(store, sessions)
