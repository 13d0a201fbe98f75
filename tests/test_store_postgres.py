"""PostgresStore against a real server: set PHI_SESSION_TEST_POSTGRES_DSN to run these.

The shared conformance suite, plus what only PostgreSQL shows: several processes
saving one session, row locks, schema migrations, SQL-side queries. Every test
works in its own schema (``phi_test_<uuid>``), dropped afterwards, so runs never
see each other's data.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from phi_session import Timestamp, Usage
from phi_session.codec import decode_session, encode_session
from phi_session.cost import Pricer, prices_available
from phi_session.errors import (
    InvalidArgument,
    MissingExtra,
    SessionLocked,
    StoreClosed,
    StoredSessionUnusable,
    StoreError,
    UsedAfterFork,
)
from phi_session.model import LoopRecord, Session
from phi_session.recorder import SessionRecorder
from phi_session.stores import postgres
from phi_session.stores import search as search_module
from phi_session.stores.base import SessionStore
from phi_session.stores.conformance import (
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
from phi_session.stores.outline import session_outline
from phi_session.stores.query import PruneCriteria, SessionQuery
from phi_session.stores.urls import open_store

from .pg_concurrency_worker import SESSION_IDS, SHARED_LOOPS, own_loop_index, shared_loop_index
from .store_support import (
    check_cut_loops_have_prompts,
    check_saves_in_parts,
    check_saves_read_only_touched_loops,
    check_untotalled_calls_counted,
    conversation_parts,
    save_as_before_cut_loops_had_prompts,
    save_as_before_untotalled_calls_counted,
)

DSN = os.environ.get("PHI_SESSION_TEST_POSTGRES_DSN", "")
if not DSN:
    pytest.skip(
        "PHI_SESSION_TEST_POSTGRES_DSN is not set (a PostgreSQL DSN the tests may create schemas in)",
        allow_module_level=True,
    )
psycopg = pytest.importorskip("psycopg")
sql = psycopg.sql

PostgresStore = postgres.PostgresStore
WORKER = Path(__file__).with_name("pg_concurrency_worker.py")


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"phi_test_{uuid.uuid4().hex}"
    yield name
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def store(schema: str) -> Iterator[postgres.PostgresStore]:
    with PostgresStore(DSN, schema=schema) as opened:
        yield opened


@pytest.fixture
def admin() -> Iterator[Any]:
    """A separate autocommit connection, for looking under the store and holding locks."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        yield conn


class TestPostgresConformance(StoreConformance):
    @pytest.fixture
    def store(self, schema: str) -> Iterator[postgres.PostgresStore]:
        with PostgresStore(DSN, schema=schema) as opened:
            yield opened

    def open_read_only(self, store: SessionStore) -> SessionStore:
        assert isinstance(store, PostgresStore)
        return PostgresStore(DSN, schema=store.schema, read_only=True)


def _table(schema: str, name: str) -> Any:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def _loop_ids(session: Session) -> list[str]:
    return [record.loop_id for record in session.loops]


# -- Concurrency ----------------------------------------------------------------------------


def test_processes_saving_overlapping_sessions_lose_no_loop(
    store: postgres.PostgresStore, admin: Any
) -> None:
    workers, rounds = 4, 12
    gate = uuid.uuid4().int % 2**62
    admin.execute("SELECT pg_advisory_lock(%s)", (gate,))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), DSN, store.schema, str(w), str(rounds), str(gate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    try:
        # Open the gate only when every worker waits at it, so that all start together.
        deadline = time.monotonic() + 60
        while (
            admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND ((classid::bigint << 32) | objid::bigint) = %s",
                (gate,),
            ).fetchone()[0]
            < workers
        ):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the workers did not reach the start gate"
            time.sleep(0.02)
    finally:
        admin.execute("SELECT pg_advisory_unlock(%s)", (gate,))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "done"

    summaries = {s.session_id: s for s in store.query()}
    for session_id in SESSION_IDS:
        loaded = store.load(session_id)
        counts = Counter(_loop_ids(loaded))
        own = {f"{session_id}.cfg.{own_loop_index(w, r)}" for w in range(workers) for r in range(rounds)}
        shared = {f"{session_id}.cfg.{shared_loop_index(r)}" for r in range(SHARED_LOOPS)}
        assert set(counts) == own | shared
        assert set(counts.values()) == {1}
        # Every loop was also saved finished (own loops in the next round, but for the
        # last round's; shared ones by the even workers): the finished version won.
        running = {r.loop_id for r in loaded.loops if r.status != "Completed"}
        assert running == {f"{session_id}.cfg.{own_loop_index(w, rounds - 1)}" for w in range(workers)}
        assert all(len(r.events) == 3 for r in loaded.loops if r.loop_id in own - running)
        assert encode_session(decode_session(encode_session(loaded))) == encode_session(loaded)
        summary = summaries[session_id]
        assert summary.loop_count == len(counts)
        assert summary.loops_by_status == {"Completed": len(counts) - workers, "Running": workers}


def test_lock_wait_beyond_lock_timeout_raises_session_locked(schema: str, admin: Any) -> None:
    with PostgresStore(DSN, schema=schema, lock_timeout=0.2) as store:
        store.save(make_session("busy"))
        store.save(make_session("idle", last_active_at=at(-10)))
        with admin.transaction():
            admin.execute(
                sql.SQL("SELECT 1 FROM {} WHERE session_id = 'busy' FOR UPDATE").format(
                    _table(schema, "sessions")
                )
            )
            started = time.monotonic()
            with pytest.raises(SessionLocked, match="busy"):
                store.save(make_session("busy", loops=[make_loop("busy", 2)]))
            assert time.monotonic() - started < 5
            with pytest.raises(SessionLocked):
                store.delete("busy")
            assert _loop_ids(store.load("busy")) == ["busy.cfg.1"]  # readers never wait
            # prune skips the session being written instead of waiting for it
            assert store.prune(PruneCriteria(keep_last=0)) == 1
        assert store.list_ids() == ["busy"]
        store.save(make_session("busy", loops=[make_loop("busy", 2)]))  # the lock is gone
        assert _loop_ids(store.load("busy")) == ["busy.cfg.1", "busy.cfg.2"]


def test_repeated_loop_ids_are_matched_by_occurrence(store: postgres.PostgresStore) -> None:
    store.save(make_session("s", loops=[make_loop("s", 1, status="Running"), make_loop("s", 1, tokens=1)]))
    store.save(
        make_session(
            "s", loops=[make_loop("s", 1, events=5), make_loop("s", 1, tokens=1), make_loop("s", 1, tokens=2)]
        )
    )
    loaded = store.load("s")
    assert _loop_ids(loaded) == ["s.cfg.1"] * 3
    assert [(r.status, len(r.events), r.usage.total_tokens) for r in loaded.loops] == [
        ("Completed", 5, 0),
        ("Completed", 0, 1),
        ("Completed", 0, 2),
    ]


# -- Schema and migrations ------------------------------------------------------------------


def test_schema_version_is_recorded(store: postgres.PostgresStore, admin: Any) -> None:
    row = admin.execute(
        sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(_table(store.schema, "meta"))
    ).fetchone()
    assert row == (str(postgres.SCHEMA_VERSION),)


def test_newer_schema_version_is_refused(store: postgres.PostgresStore, admin: Any) -> None:
    admin.execute(
        sql.SQL("UPDATE {} SET value = %s WHERE key = 'schema_version'").format(_table(store.schema, "meta")),
        (str(postgres.SCHEMA_VERSION + 1),),
    )
    with pytest.raises(StoreError, match=f"version {postgres.SCHEMA_VERSION + 1}.*newer"):
        PostgresStore(DSN, schema=store.schema)


@pytest.mark.parametrize("value", ["v7", "", " 7", "\u0667", "9" * 5000])
def test_a_schema_version_that_is_no_number_is_a_store_error(
    store: postgres.PostgresStore, admin: Any, value: str
) -> None:
    admin.execute(
        sql.SQL("UPDATE {} SET value = %s WHERE key = 'schema_version'").format(_table(store.schema, "meta")),
        (value,),
    )
    for read_only in (False, True):
        with pytest.raises(StoreError, match=r"records schema_version .*: not a version phi-session writes"):
            PostgresStore(DSN, schema=store.schema, read_only=read_only)


def test_a_read_only_store_creates_and_migrates_nothing(schema: str, admin: Any) -> None:
    url = f"{DSN}{'&' if '?' in DSN else '?'}schema={schema}"
    with pytest.raises(StoreError, match=f"no phi-session schema '{schema}'"):
        open_store(url, read_only=True)
    assert admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None
    with PostgresStore(DSN, schema=schema) as writer:
        writer.save(make_session("kept"))
    with open_store(url, read_only=True) as reader:
        assert reader.list_ids() == ["kept"]
    meta = _table(schema, "meta")
    admin.execute(sql.SQL("UPDATE {} SET value = '1' WHERE key = 'schema_version'").format(meta))
    with pytest.raises(StoreError, match="has version 1, older than this phi-session's"):
        open_store(url, read_only=True)
    assert admin.execute(
        sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(meta)
    ).fetchone() == ("1",)


def _schema_exists(admin: Any, schema: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def test_discard_new_schema_drops_only_a_schema_its_opening_created_and_nothing_was_saved_in(
    schema: str, admin: Any
) -> None:
    with PostgresStore(DSN, schema=schema) as store:
        assert store.discard_new_schema()
    assert not _schema_exists(admin, schema)
    with PostgresStore(DSN, schema=schema) as store:
        store.save(make_session("kept"))
        assert not store.discard_new_schema()
    with PostgresStore(DSN, schema=schema) as store:  # it exists now: never this opening's
        store.delete("kept")
        assert not store.discard_new_schema()
    assert _schema_exists(admin, schema)
    admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))  # an administrator's
    with PostgresStore(DSN, schema=schema) as store:
        assert not store.discard_new_schema()
    assert _schema_exists(admin, schema)


@pytest.mark.parametrize(
    ("command", "content"), [("record", "not json\n"), ("import", "[1]")], ids=["record", "import"]
)
def test_a_cli_command_that_saved_nothing_leaves_no_new_schema(
    schema: str, admin: Any, tmp_path: Path, command: str, content: str
) -> None:
    from click.testing import CliRunner

    from phi_session.cli import main

    url = f"{DSN}{'&' if '?' in DSN else '?'}schema={schema}"
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = CliRunner().invoke(main, [command, str(bad), "--store", url])
    assert result.exit_code == 1, result.stderr
    assert not _schema_exists(admin, schema)


def test_forward_migrations_run_in_order_and_atomically(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save(make_session("kept"))
    version = postgres.SCHEMA_VERSION
    meta = sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(_table(store.schema, "meta"))
    extra = _table(store.schema, "extra")
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", version + 2)

    # A failing migration leaves nothing behind: not its first step, not the version.
    monkeypatch.setattr(
        postgres,
        "_MIGRATIONS",
        (*postgres._MIGRATIONS, ("CREATE TABLE {s}.extra (n INTEGER)",), ("SELECT no_such_function()",)),
    )
    with pytest.raises(StoreError, match="no_such_function"):
        PostgresStore(DSN, schema=store.schema)
    assert admin.execute(meta).fetchone() == (str(version),)
    assert admin.execute("SELECT to_regclass(%s)", (f"{store.schema}.extra",)).fetchone() == (None,)

    # The second migration needs the first one's table.
    monkeypatch.setattr(
        postgres,
        "_MIGRATIONS",
        (
            *postgres._MIGRATIONS[:version],
            ("CREATE TABLE {s}.extra (n INTEGER)",),
            ("INSERT INTO {s}.extra SELECT count(*) FROM {s}.sessions",),
        ),
    )
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert _loop_ids(migrated.load("kept")) == ["kept.cfg.1"]
    assert admin.execute(meta).fetchone() == (str(version + 2),)
    assert admin.execute(sql.SQL("SELECT n FROM {}").format(extra)).fetchall() == [(1,)]


def test_processes_opening_a_new_schema_together_do_not_race(schema: str) -> None:
    openers = 6
    barrier = threading.Barrier(openers)
    results: list[object] = []

    def open_store() -> None:
        barrier.wait()
        try:
            with PostgresStore(DSN, schema=schema, pool_size=1) as opened:
                results.append(opened.list_ids())
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[]] * openers


# -- What the columns hold ------------------------------------------------------------------


def test_values_beyond_bigint_survive_in_records_and_summaries(store: postgres.PostgresStore) -> None:
    huge = 2**64 - 1
    first = make_loop("s", 1, started_at=Timestamp.parse("9999-12-31T23:59:58.999999999Z"))
    first.usage = Usage(
        input=huge, output=huge, reasoning=huge, cache_read=huge, cache_write=huge, total_tokens=huge
    )
    ancient = Timestamp.parse("0001-01-01T00:00:00Z")  # before what BIGINT nanoseconds reach
    session = make_session(
        "s", loops=[first, make_loop("s", 2, tokens=8)], created_at=ancient, last_active_at=at(0)
    )
    session.rejected = True
    session.scope = "persistent"
    store.save(session)
    assert encode_session(store.load("s")) == encode_session(session)
    [summary] = store.query(SessionQuery(min_tokens=huge))
    assert summary.usage.total_tokens == huge + 8  # the token columns are NUMERIC
    assert summary.created_at == ancient  # exact, from the stored header
    assert summary.rejected
    [day] = store.usage_totals("day")
    assert (day.key, day.usage.total_tokens) == ("0001-01-01", huge + 8)


def test_a_prompt_holding_a_nul_character_is_saved(store: postgres.PostgresStore) -> None:
    """PostgreSQL text cannot hold NUL: the listing's ``first_prompt`` column refused the
    whole save, every time (a pasted binary, a tool's output quoted back)."""
    session = make_session("nul-prompt", loops=[talking_loop("nul-prompt", 1, "read\x00this")])
    store.save(session)
    assert encode_session(store.load("nul-prompt")) == encode_session(session)  # the exact text
    [summary] = store.query()
    assert summary.first_prompt == "Please read\x00this"  # exact, from the outline (not the column)
    assert store.search("this") and store.search("read")


def test_a_listing_reads_the_outlines_only_of_sessions_whose_text_held_nul(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first prompt holding a real U+FFFD (a mis-decoded file pasted) cannot be told from
    a NUL in the column: every such summary loaded its whole outline, one per row listed."""
    for index in range(3):
        sid = f"fffd-{index}"
        store.save(make_session(sid, loops=[talking_loop(sid, 1, "caf\ufffd r\u00e9sum\ufffd")]))
    store.save(make_session("nul", loops=[talking_loop("nul", 1, "read\x00this")]))
    store.save(make_session("plain", loops=[talking_loop("plain", 1, "brew coffee")]))
    outlines: list[str] = []
    real = store.load_outline
    monkeypatch.setattr(store, "load_outline", lambda sid: outlines.append(sid) or real(sid))
    prompts = {row.session_id: row.first_prompt for row in store.query()}
    assert prompts == {
        "nul": "Please read\x00this",
        "plain": "Please brew coffee",
        **{f"fffd-{index}": "Please caf\ufffd r\u00e9sum\ufffd" for index in range(3)},
    }
    assert outlines == ["nul"]
    # Back to version 8: rows showing U+FFFD may stand for NUL, read exact until saved again.
    meta, sessions = _table(store.schema, "meta"), _table(store.schema, "sessions")
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN listing_nul").format(sessions))
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '8' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        migrated_real = migrated.load_outline
        monkeypatch.setattr(migrated, "load_outline", lambda sid: outlines.append(sid) or migrated_real(sid))
        outlines.clear()
        assert {row.session_id: row.first_prompt for row in migrated.query()} == prompts
        assert sorted(outlines) == ["fffd-0", "fffd-1", "fffd-2", "nul"]


def test_nul_characters_in_ids_and_names_are_saved_and_loaded_exactly(store: postgres.PostgresStore) -> None:
    """NUL in an agent id, a parent session id, a loop id or a model name: the text columns
    refused the whole save. The columns (filters, listings) hold U+FFFD; the JSON, what
    `load`, the summaries and the totals' keys read, keeps the exact text."""
    agent, parent, model = "agent\x00x", "parent\x00x", "open\x00ai/gpt\x004o"
    nul_loop = talking_loop("nul", 1, "read this", agent_id=agent)
    nul_loop.loop_id = "loop\x00x"
    twin = make_loop("nul", 2, agent_id=agent, model=model)
    twin.loop_id = "loop\ufffdx"  # the same column text as the NUL one: both are kept
    session = make_session("nul", agent, loops=[nul_loop, twin], parent_session_id=parent)
    store.save(session)
    store.save(session)  # merged into itself
    assert encode_session(store.load("nul")) == encode_session(session)
    [summary] = store.query(SessionQuery(agent_id=agent, parent_session_id=parent, model=model))
    assert (summary.agent_id, summary.parent_session_id) == (agent, parent)  # exact, from the header
    assert summary.models == ("openai/gpt-4o", model)  # exact, from the outlines (not the column)
    assert [s.session_id for s in store.list_for_agent(agent)] == ["nul"]
    assert store.list_for_agent("agent\ufffdx") == []  # another agent, not its listing's copy
    assert model in [t.key for t in store.usage_totals("model")]  # exact, from the JSON


def test_model_names_containing_slashes(store: postgres.PostgresStore) -> None:
    store.save(make_session("r", loops=[make_loop("r", 1, model="openrouter/meta-llama/llama-3")]))
    store.save(make_session("o", loops=[make_loop("o", 1, model="openai/gpt-4o")]))
    for name in ("openrouter/meta-llama/llama-3", "meta-llama/llama-3"):
        assert [s.session_id for s in store.query(SessionQuery(model=name))] == ["r"]
    assert store.query(SessionQuery(model="openrouter")) == []
    assert store.query(SessionQuery(model="llama-3")) == []
    assert [t.key for t in store.usage_totals("model")] == ["openai/gpt-4o", "openrouter/meta-llama/llama-3"]


def test_explain_query_shows_the_plan(store: postgres.PostgresStore) -> None:
    store.save(make_session("s"))
    plan = store.explain_query(SessionQuery(agent_id="agent", order="newest", limit=1))
    assert "sessions" in plan and "Limit" in plan
    assert "actual time" in store.explain_query(SessionQuery(model="gpt-4o"), analyze=True)


def _indexed_loops(store: postgres.PostgresStore, admin: Any) -> list[tuple[str, int, bool]]:
    """``(session id, position, has words)`` of every loop row."""
    return admin.execute(
        sql.SQL("SELECT session_id, position, words IS NOT NULL FROM {} ORDER BY 1, 2").format(
            _table(store.schema, "loops")
        )
    ).fetchall()


def test_the_v2_migration_indexes_the_stored_loops(
    store: postgres.PostgresStore, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(make_session("old", loops=[talking_loop("old", 1, "brew coffee"), make_loop("old", 2)]))
    store.save(make_session("bad", loops=[talking_loop("bad", 1, "brew tea")]))
    # Back to version 1: the stored loops, no search column (its indexes go with it), no outlines.
    loops, meta = _table(store.schema, "loops"), _table(store.schema, "meta")
    admin.execute(
        sql.SQL("ALTER TABLE {} DROP COLUMN words, DROP COLUMN outline, DROP COLUMN calls").format(loops)
    )
    sessions = _table(store.schema, "sessions")
    admin.execute(
        sql.SQL("ALTER TABLE {} DROP COLUMN first_prompt, DROP COLUMN listing_nul").format(sessions)
    )
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '1' WHERE key = 'schema_version'").format(meta))
    admin.execute(sql.SQL("UPDATE {} SET record = 'not json' WHERE session_id = 'bad'").format(loops))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        kinds = [hit.kind for hit in migrated.search("coffee")]
        assert kinds == ["text", "thinking", "text", "tool_call", "tool_result"]
        with caplog.at_level(logging.WARNING):
            assert migrated.search("tea") == []  # left unindexed, read, found corrupt: skipped
    assert "'bad' is corrupt" in caplog.text
    assert _indexed_loops(store, admin) == [("bad", 0, False), ("old", 0, True), ("old", 1, True)]
    outlined = sql.SQL("SELECT session_id FROM {} WHERE outline IS NOT NULL ORDER BY 1").format(loops)
    assert admin.execute(outlined).fetchall() == [("old",), ("old",)]  # v3 outlines the loops too
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert migrated.load_outline("old") == session_outline(migrated.load("old"))
        with pytest.raises(StoreError, match="'bad' is corrupt"):
            migrated.load_outline("bad")
        prompts = {row.session_id: row.first_prompt for row in migrated.query()}
        assert prompts == {"old": "Please brew coffee", "bad": None}  # v4, from the outlines
    indexes = admin.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND indexname LIKE 'loops_%%'",
        (store.schema,),
    ).fetchall()
    assert {"loops_words", "loops_unindexed"} <= {name for (name,) in indexes}


def test_the_v5_migration_lists_a_prompt_holding_a_nul_character(
    store: postgres.PostgresStore, admin: Any
) -> None:
    """Migration 5 wrote the first prompt as it is: a NUL in one failed the migration, and
    so every opening of that database."""
    session = make_session("nul-prompt", loops=[talking_loop("nul-prompt", 1, "read\x00this")])
    store.save(session)
    # Back to version 4: no first_prompt column, no calls column (v6's).
    sessions, meta = _table(store.schema, "sessions"), _table(store.schema, "meta")
    admin.execute(
        sql.SQL("ALTER TABLE {} DROP COLUMN first_prompt, DROP COLUMN listing_nul").format(sessions)
    )
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN calls").format(_table(store.schema, "loops")))
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '4' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert [row.first_prompt for row in migrated.query()] == ["Please read\x00this"]
        assert encode_session(migrated.load("nul-prompt")) == encode_session(session)


def test_search_reads_only_the_loops_the_index_names(
    store: postgres.PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loops = [talking_loop("s", index, f"topic{index}", started_at=at(index)) for index in range(1, 6)]
    store.save(make_session("s", loops=loops))
    store.save(make_session("other", loops=[talking_loop("other", 1, "elsewhere")]))
    decoded: list[str] = []
    real_decode = postgres.decode_loop

    def decode(data: bytes, **options: Any) -> Any:
        record = real_decode(data, **options)
        decoded.append(record.loop_id)
        return record

    monkeypatch.setattr(postgres, "decode_loop", decode)
    assert {(hit.session_id, hit.loop_id) for hit in store.search("topic3")} == {("s", "s.cfg.3")}
    assert decoded == ["s.cfg.3"]


def test_long_words_and_wordy_loops_are_still_found(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_word = "x" * 3000  # beyond a tsvector lexeme: indexed cut
    store.save(make_session("long", loops=[talking_loop("long", 1, f"{long_word} tail")]))
    assert [hit.kind for hit in store.search(long_word)][:1] == ["text"]
    assert store.search("x" * 2999) == []  # cut alike, then the exact rule decides
    monkeypatch.setattr(postgres, "_LEXEME_BUDGET", 10)
    store.save(make_session("wordy", loops=[talking_loop("wordy", 1, "many many words here")]))
    assert ("wordy", 0, False) in _indexed_loops(store, admin)  # too wordy: not indexed, always read
    assert {hit.session_id for hit in store.search("words")} == {"wordy"}


def test_explain_search_shows_the_plan(store: postgres.PostgresStore) -> None:
    store.save(make_session("s", loops=[talking_loop("s", 1, "brew coffee")]))
    assert "@@" in store.explain_search("coffee")
    assert "actual time" in store.explain_search("coffee", SessionQuery(limit=5), analyze=True)


def test_prune_removes_the_loop_rows_too(store: postgres.PostgresStore, admin: Any) -> None:
    store.save(make_session("old", loops=[make_loop("old", 1), make_loop("old", 2)], last_active_at=at(0)))
    store.save(make_session("new", last_active_at=at(100)))
    assert store.prune(PruneCriteria(older_than=at(50))) == 1
    rows = admin.execute(
        sql.SQL("SELECT session_id, count(*) FROM {} GROUP BY 1").format(_table(store.schema, "loops"))
    ).fetchall()
    assert rows == [("new", 1)]


def test_corrupt_rows_raise_store_error_and_are_skipped_in_listings(
    store: postgres.PostgresStore, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(make_session("good"))
    store.save(make_session("bad"))
    admin.execute(
        sql.SQL("UPDATE {} SET record = 'not json' WHERE session_id = 'bad'").format(
            _table(store.schema, "loops")
        )
    )
    with pytest.raises(StoreError, match="'bad' is corrupt"):
        store.load("bad")
    with caplog.at_level(logging.WARNING):
        assert [s.session_id for s in store.list_for_agent("agent")] == ["good"]
    assert "'bad' is corrupt" in caplog.text
    # Never overwritten by a merge, which fails so until it is deleted: not worth a retry.
    with pytest.raises(StoredSessionUnusable, match="'bad' is corrupt"):
        store.save(make_session("bad", loops=[make_loop("bad", 1)]))
    # A save that does not touch it (a loop of its own) is kept, beside it as it was.
    store.save(make_session("bad", loops=[make_loop("bad", 2)]))
    assert [loop.loop_id for loop in store.load_outline("bad").loops] == ["bad.cfg.1", "bad.cfg.2"]
    assert [loop.loop_id for loop in store.load_loops("bad", 1, 2)] == ["bad.cfg.2"]
    with pytest.raises(StoreError, match="'bad' is corrupt"):
        store.load("bad")


# -- Errors and lifecycle -------------------------------------------------------------------


def test_connection_failure_names_the_server_not_the_password() -> None:
    with pytest.raises(StoreError) as info:
        PostgresStore("postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere", connect_timeout=2)
    assert "someone@127.0.0.1:1/nowhere" in str(info.value)
    assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in str(info.value.__cause__)


def test_invalid_arguments_are_refused(schema: str) -> None:
    # InvalidArgument: a PhiSessionError (they were bare ValueErrors) and a ValueError.
    with pytest.raises(InvalidArgument, match="schema must be a PostgreSQL identifier"):
        PostgresStore(DSN, schema="x" * 64)  # PostgreSQL would silently truncate it
    with pytest.raises(InvalidArgument, match="lock_timeout"):
        PostgresStore(DSN, schema=schema, lock_timeout=0)  # PostgreSQL reads 0 as "forever"
    with pytest.raises(InvalidArgument, match="pool_size"):
        PostgresStore(DSN, schema=schema, pool_size=0)
    # Taken, they failed every save (OverflowError, ValueError, or PostgreSQL refusing them).
    for name in ("lock_timeout", "connect_timeout"):
        for seconds in (float("inf"), float("nan"), 1e7, -1.0):
            refused = rf"^{name} must be a number of seconds > 0 and <= 2147483.647, got"
            with pytest.raises(InvalidArgument, match=refused):
                PostgresStore(DSN, schema=schema, **{name: seconds})
    with PostgresStore(DSN, schema=schema, lock_timeout=2_147_483.647) as store:
        store.save(make_session("longest wait"))
    # psycopg's AttributeError ('int' object has no attribute 'encode').
    with pytest.raises(TypeError, match=r"^dsn must be str, not int$"):
        PostgresStore(5, schema=schema)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^schema must be str, not int$"):
        PostgresStore(DSN, schema=5)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="invalid PostgreSQL connection string") as info:
        PostgresStore("host=x password=s3cret =oops", schema=schema)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("odd", ["50%off", "%s %% '\\\" \\0025"])
def test_a_schema_holding_a_percent_sign_works(odd: str) -> None:
    # psycopg reads a "%" in a statement with parameters as a placeholder, even inside the
    # quoted schema: every statement failed.
    name = f"phi_test_{uuid.uuid4().hex[:12]} {odd}"
    try:
        with PostgresStore(DSN, schema=name) as store:
            store.save(make_session("pct", loops=[talking_loop("pct", 1, "hello")]))
            store.save(make_session("pct", loops=[make_loop("pct", 2)]))
            assert store.list_ids() == ["pct"] and len(store.load("pct").loops) == 2
            assert [row.session_id for row in store.query()] == ["pct"]
            assert store.search("hello") and store.usage_totals()
        with PostgresStore(DSN, schema=name, read_only=True) as reader:
            assert reader.list_ids() == ["pct"]
        with psycopg.connect(DSN, autocommit=True) as conn:
            assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone()
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def test_missing_psycopg_is_a_missing_extra_and_a_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "_MISSING_PSYCOPG", ImportError("No module named 'psycopg'"))
    with pytest.raises(MissingExtra, match=r"phi-session\[postgres\]") as caught:
        PostgresStore(DSN)
    assert isinstance(caught.value, StoreError)


def _named_dsn() -> tuple[str, str]:
    """A DSN whose connections carry an application name of their own, and that name."""
    name = f"phi_test_{uuid.uuid4().hex[:16]}"
    return psycopg.conninfo.make_conninfo(DSN, application_name=name), name


def _backends(admin: Any, name: str) -> set[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return {pid for (pid,) in rows}


def _pids_at_once(store: postgres.PostgresStore, calls: int) -> set[int]:
    """The backends of `calls` calls made at once (each holds a pooled connection)."""
    with ExitStack() as stack:
        cursors = [stack.enter_context(store._cursor(f"call {n}")) for n in range(calls)]
        return {cur.execute("SELECT pg_backend_pid()").fetchall()[0][0] for cur in cursors}


def test_connections_the_server_closed_while_idle_are_replaced_before_use(schema: str, admin: Any) -> None:
    """A restart, idle_session_timeout or pg_terminate_backend closes the idle pooled
    connections: each of the next pool_size calls failed on one of them."""
    dsn, name = _named_dsn()
    with PostgresStore(dsn, schema=schema, pool_size=3) as store:
        store.save(make_session("s"))
        old = _pids_at_once(store, 3)
        assert _backends(admin, name) == old
        # The timeout waits until each backend has gone (its farewell sent, its socket closed).
        admin.execute(
            "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        )
        assert _backends(admin, name) == set()
        assert store.list_ids() == ["s"]
        assert _pids_at_once(store, 3).isdisjoint(old)
        store.save(make_session("s", loops=[make_loop("s", 2)]))
        assert _loop_ids(store.load("s")) == ["s.cfg.1", "s.cfg.2"]


def test_a_connection_broken_during_a_call_fails_that_call_and_drops_the_idle_ones(schema: str) -> None:
    """The call is not retried (it may have committed); the idle connections went through
    the same outage (perhaps unseen: a dropped network path), so the next calls open new ones."""
    with PostgresStore(DSN, schema=schema, pool_size=2) as store:
        store.save(make_session("s"))
        old = _pids_at_once(store, 2)
        with pytest.raises(StoreError, match="ending its backend failed"):
            with store._cursor("ending its backend") as cur:
                cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        assert store.list_ids() == ["s"]
        assert _pids_at_once(store, 2).isdisjoint(old)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_must_open_its_own_store(store: postgres.PostgresStore) -> None:
    store.save(make_session("s"))
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child() -> None:
        try:
            store.list_ids()
            results.put("the child used its parent's connection")
        except UsedAfterFork as exc:
            results.put(str(exc))

    process = context.Process(target=child)
    process.start()
    process.join(30)
    assert "a forked process must open its own" in results.get(timeout=5)
    assert store.list_ids() == ["s"]  # the parent's connection is intact


def test_closed_store_refuses_work(schema: str) -> None:
    store = PostgresStore(DSN, schema=schema)
    store.close()
    store.close()
    with pytest.raises(StoreClosed, match="closed"):  # a StoreError the saver does not retry
        store.list_ids()


@pytest.mark.spec  # phi-core's example stream
def test_the_v4_migration_bills_the_loops_cut_off_mid_turn(store: postgres.PostgresStore, admin: Any) -> None:
    lines = (EXAMPLES_DIR / "events-basic.jsonl").read_bytes().split(b"\n")[:9]  # inside loop 1's turn
    recorder = SessionRecorder()
    for line in lines:
        recorder.on_json(line)
    recorder.flush()
    [session] = recorder.drain_completed()
    store.save(session)
    # Back to version 3, as it saved this session: the cut loop and the session at zero tokens.
    tokens = (
        "(input_tokens, output_tokens, reasoning_tokens, cache_read_tokens, cache_write_tokens, total_tokens)"
    )
    for table in ("loops", "sessions"):
        admin.execute(
            sql.SQL(f"UPDATE {{}} SET {tokens} = (0, 0, 0, 0, 0, 0)").format(_table(store.schema, table))
        )
    meta = _table(store.schema, "meta")
    sessions = _table(store.schema, "sessions")
    admin.execute(
        sql.SQL("ALTER TABLE {} DROP COLUMN first_prompt, DROP COLUMN listing_nul").format(sessions)
    )
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN calls").format(_table(store.schema, "loops")))  # v6's
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '3' WHERE key = 'schema_version'").format(meta))
    reported = reported_usage(lines)
    assert reported.output > 0
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert [row.usage for row in migrated.query()] == [reported]
        assert [row.usage for row in migrated.usage_totals("model")] == [reported]
        assert encode_session(migrated.load(session.session_id)) == encode_session(
            session
        )  # records untouched
    assert admin.execute(
        sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(meta)
    ).fetchone() == (str(postgres.SCHEMA_VERSION),)


@pytest.mark.skipif(not prices_available(), reason="needs the prices extra (genai-prices)")
def test_the_v6_migration_stores_the_model_calls(store: postgres.PostgresStore, admin: Any) -> None:
    # Priced per call after the migration: two calls of 150k input tokens, each below the tier.
    tiered = make_session(
        "tiered",
        loops=[calls_loop("tiered", 1, [TIERED_CALL, TIERED_CALL]), make_loop("tiered", 2, tokens=100)],
    )
    bad = make_session("bad", "broken", loops=[calls_loop("bad", 1, [TIERED_CALL, TIERED_CALL])])
    store.save(tiered)
    store.save(bad)
    # Back to version 5: no calls column, outlines without calls.
    loops, meta = _table(store.schema, "loops"), _table(store.schema, "meta")
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN calls").format(loops))
    admin.execute(sql.SQL("UPDATE {} SET outline = NULL").format(loops))
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN listing_nul").format(_table(store.schema, "sessions")))
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '5' WHERE key = 'schema_version'").format(meta))
    admin.execute(sql.SQL("UPDATE {} SET record = 'not json' WHERE session_id = 'bad'").format(loops))
    pricer = Pricer()
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert migrated.load_outline("tiered") == session_outline(migrated.load("tiered"))
        costs = {row.key: row.cost for row in migrated.usage_totals("agent", pricer=pricer)}
        per_call = pricer.session(tiered)
        assert costs["agent"] == per_call and per_call.usd is not None
        assert per_call.usd < pricer.price(tiered.billed_usage(), "google", "gemini-2.5-pro", at(1)).usd
        # A record that does not decode keeps no calls: its billed usage stands in for them.
        stand_in = pricer.price(bad.billed_usage(), "google", "gemini-2.5-pro", bad.loops[0].started_at)
        assert costs["broken"] == stand_in
    calls = sql.SQL("SELECT session_id, calls IS NOT NULL FROM {} ORDER BY 1, position").format(loops)
    assert admin.execute(calls).fetchall() == [("bad", False), ("tiered", True), ("tiered", True)]
    assert admin.execute(
        sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(meta)
    ).fetchone() == (str(postgres.SCHEMA_VERSION),)


def test_the_v7_migration_reads_tool_call_arguments_as_text(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:  # the arguments' JSON as written, as before version 7
        before.setattr(
            search_module, "_arguments_text", lambda arguments: msgspec.json.encode(arguments).decode()
        )
        store.save(make_session("old", loops=[talking_loop("old", 1, "import os\nimport sys")]))
        assert [hit.kind for hit in store.search("nimport")] == ["tool_call"]
    meta = _table(store.schema, "meta")
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN listing_nul").format(_table(store.schema, "sessions")))
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '6' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert migrated.search("nimport") == []
        assert [hit.kind for hit in migrated.search("sys")][3] == "tool_call"
    words = sql.SQL("SELECT words::text FROM {}").format(_table(store.schema, "loops"))
    [(indexed,)] = admin.execute(words).fetchall()
    assert "'nimport'" not in indexed and "'import'" in indexed


def test_the_v8_migration_indexes_what_loops_that_never_ended_said(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:  # a loop's messages only, as before version 8
        before.setattr(LoopRecord, "conversation", lambda record: record.messages)
        store.save(make_session("cut", loops=[cut_loop("cut", 1, "brew coffee")]))
    meta = _table(store.schema, "meta")
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN listing_nul").format(_table(store.schema, "sessions")))
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '7' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert [hit.kind for hit in migrated.search("coffee")] == [
            "text",
            "thinking",
            "text",
            "tool_call",
            "tool_result",
        ]
    words = sql.SQL("SELECT words::text FROM {}").format(_table(store.schema, "loops"))
    [(indexed,)] = admin.execute(words).fetchall()
    assert "'coffee'" in indexed


def test_the_v10_migration_names_the_models_that_served_the_calls(
    store: postgres.PostgresStore, monkeypatch: pytest.MonkeyPatch, admin: Any
) -> None:
    import phi_session.model as model_module

    from .test_cost import SERVED_PRICES, _served_session

    session = _served_session()
    with monkeypatch.context() as before:  # calls without their serving model, as before version 10
        before.setattr(model_module, "served_by", lambda reply, config: None)
        store.save(session)
    meta = _table(store.schema, "meta")
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '9' WHERE key = 'schema_version'").format(meta))
    pricer = Pricer(SERVED_PRICES, use_table=False)
    with PostgresStore(DSN, schema=store.schema) as migrated:
        [row] = migrated.usage_totals("model", pricer=pricer)
        assert row.cost == pricer.session(session) and row.cost.usd == 0.15
        assert migrated.load_outline(session.session_id) == session_outline(session)


def test_totals_by_model_read_no_loop_row(
    store: postgres.PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each call counts under the model that served it, from one aggregate of what each
    # loop added (``loop_models``): reading every loop's calls took long on large stores.
    from .test_cost import SERVED_TOTAL, _served_session

    store.save(_served_session())
    statements: list[str] = []
    execute = psycopg.Cursor.execute

    def recorded(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(query if isinstance(query, str) else query.as_string(cursor))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", recorded)
    assert store.usage_totals("model") == [SERVED_TOTAL]
    assert statements and not any(".loops" in statement for statement in statements)


def test_the_v12_migration_sums_the_loops_by_serving_model(store: postgres.PostgresStore, admin: Any) -> None:
    from .test_cost import _served_session, check_migrated_served_totals

    session = _served_session()
    store.save(session)
    store.save(make_session("bad", loops=[make_loop("bad", 1, tokens=7)]))
    loops, meta = _table(store.schema, "loops"), _table(store.schema, "meta")
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(
        sql.SQL("UPDATE {} SET calls = NULL WHERE session_id = 'bad'").format(loops)
    )  # billed stands in
    admin.execute(sql.SQL("UPDATE {} SET value = '11' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        check_migrated_served_totals(migrated, session)


def test_the_v11_migration_indexes_the_composed_words(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:  # words split at each combining accent, as before version 11
        before.setattr(search_module, "_composed", lambda text: text)
        store.save(make_session("nfd", loops=[talking_loop("nfd", 1, "send the re\u0301sume\u0301")]))
    meta = _table(store.schema, "meta")
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '10' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert {hit.session_id for hit in migrated.search("r\u00e9sum\u00e9")} == {"nfd"}
    words = sql.SQL("SELECT words::text FROM {}").format(_table(store.schema, "loops"))
    [(indexed,)] = admin.execute(words).fetchall()
    assert "'sume'" not in indexed and "r\u00e9sum\u00e9" in indexed


def test_the_v13_migration_lists_the_prompts_of_loops_that_never_ended(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = make_session("bad", loops=[cut_loop("bad", 1, "brew tea")])
    save_as_before_cut_loops_had_prompts(store, monkeypatch, bad)
    # Back to version 5, as phi-session wrote it before 41544bf (version 10 outlines every loop again).
    loops, meta = _table(store.schema, "loops"), _table(store.schema, "meta")
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN calls").format(loops))
    admin.execute(sql.SQL("ALTER TABLE {} DROP COLUMN listing_nul").format(_table(store.schema, "sessions")))
    admin.execute(sql.SQL("DROP TABLE {}").format(_table(store.schema, "loop_models")))
    admin.execute(sql.SQL("UPDATE {} SET value = '5' WHERE key = 'schema_version'").format(meta))
    admin.execute(sql.SQL("UPDATE {} SET record = 'not json' WHERE session_id = 'bad'").format(loops))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        check_cut_loops_have_prompts(migrated)
        assert [row.first_prompt for row in migrated.query() if row.session_id == "bad"] == [None]


def test_the_v14_migration_indexes_the_casefolded_words(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:  # words lower-cased, not case-folded, as before version 14
        before.setattr(search_module, "_folded", str.lower)
        store.save(make_session("old", loops=[talking_loop("old", 1, "the Stra\u00dfe \ufb01le")]))
        assert store.search("strasse") == []
    meta = _table(store.schema, "meta")
    admin.execute(sql.SQL("UPDATE {} SET value = '13' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        assert {hit.session_id for hit in migrated.search("STRASSE FILE")} == {"old"}
    words = sql.SQL("SELECT words::text FROM {}").format(_table(store.schema, "loops"))
    [(indexed,)] = admin.execute(words).fetchall()
    assert "'strasse'" in indexed and "stra\u00dfe" not in indexed


def test_a_session_holding_lone_surrogates_is_saved_with_them_escaped(store: postgres.PostgresStore) -> None:
    from phi_session.persist import AutoPersistingRecorder

    from .test_hostile import record_with_lone_surrogates

    persisting = AutoPersistingRecorder(store)
    record_with_lone_surrogates([persisting.on_event])
    persisting.close()
    assert persisting.failed_sessions() == []
    [session_id] = store.list_ids()
    assert store.load(session_id).agent_id == "agent-\\xed\\xb3\\xbf"


def test_saving_a_loop_into_a_long_session_reads_only_the_loops_it_touches(
    store: postgres.PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_saves_read_only_touched_loops(store, postgres, monkeypatch)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=conversation_parts)
def test_saves_in_parts_store_what_merging_them_gives(
    store: postgres.PostgresStore, parts: list[list[tuple[int, bool]]]
) -> None:
    store.delete(check_saves_in_parts(store, parts))


def test_the_v15_migration_recounts_calls_without_a_total_and_turns_of_several_replies(
    store: postgres.PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = save_as_before_untotalled_calls_counted(store, monkeypatch)
    meta = _table(store.schema, "meta")
    admin.execute(sql.SQL("UPDATE {} SET value = '14' WHERE key = 'schema_version'").format(meta))
    with PostgresStore(DSN, schema=store.schema) as migrated:
        check_untotalled_calls_counted(migrated, sessions)
