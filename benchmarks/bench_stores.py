"""Store benchmark: save/load throughput of every backend, SQLite query latency (issue 5, item 7).

Usage: ``python benchmarks/bench_stores.py [--sessions N] [--query-sessions N] [--repeat N]``

1. Throughput. The W1 workload (`workload.events`: 100 sessions x 5 loops x 4
   turns, deterministic) is recorded with `SessionRecorder`, then each backend
   saves every session into an empty store (``save``), saves them all again
   (``re-save``: the merge path, nothing changes) and loads them all (``load``).
   Sizes are the sessions' phi-core JSON files (`encode_session`), so MB/s is
   comparable across backends. Best of ``--repeat`` runs, each on a fresh store.
   Backends: JSON directory and SQLite in a temporary directory (``--dir``), and
   PostgreSQL when ``PHI_SESSION_TEST_POSTGRES_DSN`` is set (in a throwaway schema).
2. Query latency. ``--query-sessions`` (10,000) synthetic sessions (10 agents,
   5 loops each over 3 models, a few aborted/rejected loops, 10% sub-agent
   sessions, 30 days of activity) are saved into a new SQLite store; each query
   then runs ``--query-runs`` times and the median is printed with SQLite's
   ``EXPLAIN QUERY PLAN``. Their loop records are small: queries and totals read
   only indexed columns, never records, so record size does not change them.
3. PostgreSQL search (when the DSN is set). ``--search-sessions`` (3,000) copies of
   the W1 sessions (5 loops, 20 turns of prose, tool calls and results each), one in
   a thousand saying a rare word, are saved into a throwaway schema; each search then
   runs with the index (`PostgresStore.search`) and as the old scan (`scan_search`,
   which reads every selected session), median of ``--search-runs``, with the plan
   (``EXPLAIN ANALYZE``) of the indexed candidate query.

Nothing is asserted: the script prints figures and always exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from phi_session import LoopConfigSnapshot, LoopRecord, Session, SessionFormation, SpawnRef, Timestamp, Usage
from phi_session.codec import encode_session
from phi_session.messages import TextContent, UserMessage
from phi_session.model import LoopStatus
from phi_session.recorder import SessionRecorder
from phi_session.stores.base import SessionStore, scan_search
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.query import GroupBy, SessionQuery
from phi_session.stores.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload

POSTGRES_ENV = "PHI_SESSION_TEST_POSTGRES_DSN"
MB = 1_000_000


def w1_sessions(count: int) -> list[Session]:
    recorder = SessionRecorder()
    recorder.record_all(workload.events(count))
    recorder.flush()
    return recorder.drain_completed()


# -- throughput --------------------------------------------------------------------------------


@contextmanager
def json_dir_store(root: Path) -> Iterator[SessionStore]:
    directory = Path(tempfile.mkdtemp(prefix="json-", dir=root))
    try:
        yield JsonDirStore(directory)
    finally:
        shutil.rmtree(directory)


@contextmanager
def sqlite_store(root: Path) -> Iterator[SessionStore]:
    directory = Path(tempfile.mkdtemp(prefix="sqlite-", dir=root))
    store = SqliteStore(directory / "sessions.db")
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(directory)


def postgres_factory(dsn: str) -> Callable[[Path], Any]:
    import psycopg
    from psycopg import sql

    from phi_session.stores.postgres import PostgresStore

    @contextmanager
    def postgres_store(_root: Path) -> Iterator[SessionStore]:
        schema = f"phi_bench_{uuid.uuid4().hex[:12]}"
        store = PostgresStore(dsn, schema=schema)
        try:
            yield store
        finally:
            store.close()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    return postgres_store


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def save_all(store: SessionStore, sessions: Sequence[Session]) -> None:
    for session in sessions:
        store.save(session)


def load_all(store: SessionStore, ids: Sequence[str]) -> None:
    for session_id in ids:
        store.load(session_id)


def throughput(
    open_store: Callable[[Path], Any], sessions: Sequence[Session], root: Path, repeat: int
) -> dict[str, float]:
    """Best-of-`repeat` seconds for save (into an empty store), re-save and load of `sessions`."""
    best: dict[str, float] = {}
    ids = [session.session_id for session in sessions]
    for _ in range(repeat):
        with open_store(root) as store:
            runs = {
                "save": timed(partial(save_all, store, sessions)),
                "re-save": timed(partial(save_all, store, sessions)),
                "load": timed(partial(load_all, store, ids)),
            }
        for name, seconds in runs.items():
            best[name] = min(seconds, best.get(name, seconds))
    return best


def print_throughput(results: dict[str, dict[str, float] | str], count: int, size: int) -> None:
    header = f"{'store':<10}" + "".join(
        f"{name + ' MB/s':>14}{name + ' ses/s':>15}" for name in ("save", "re-save", "load")
    )
    print(header)
    print("-" * len(header))
    for store, figures in results.items():
        if isinstance(figures, str):
            print(f"{store:<10}  {figures}")
            continue
        cells = "".join(
            f"{size / MB / figures[name]:>14.1f}{count / figures[name]:>15.0f}"
            for name in ("save", "re-save", "load")
        )
        print(f"{store:<10}{cells}")


# -- query latency -------------------------------------------------------------------------------

MODELS = (("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4o"), ("anthropic", "claude-haiku-4-5"))
AGENTS = [str(uuid.UUID(int=random.Random(n).getrandbits(128))) for n in range(10)]
DAY_NS = 86_400 * 10**9
EPOCH = Timestamp.parse("2025-06-01T00:00:00Z").ns


def synthetic_sessions(count: int, *, seed: int = 7) -> Iterator[Session]:
    """`count` small sessions with realistic summaries (see the module docstring)."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(count)]
    for n, session_id in enumerate(ids):
        agent = AGENTS[n % len(AGENTS)]
        created = EPOCH + rng.randrange(30 * DAY_NS)
        loops = []
        clock = created
        for index in range(1, 6):
            provider, model = MODELS[rng.randrange(len(MODELS))]
            roll = rng.random()
            status: LoopStatus = "Aborted" if roll < 0.03 else "Rejected" if roll < 0.04 else "Completed"
            record = LoopRecord.start(
                loop_id=f"{session_id}.{provider}.{model}.{index}",
                session_id=session_id,
                agent_id=agent,
                started_at=Timestamp.from_ns(clock),
                status=status,
                config=LoopConfigSnapshot(model=model, provider=provider, config_id=None),
                parent_loop_id=None if index == 1 else f"{session_id}.{provider}.{model}.1",
            )
            clock += rng.randrange(1, 120) * 10**9
            record.ended_at = Timestamp.from_ns(clock)
            tokens_in, tokens_out = rng.randrange(500, 20_000), rng.randrange(50, 2_000)
            record.usage = Usage(input=tokens_in, output=tokens_out, total_tokens=tokens_in + tokens_out)
            loops.append(record)
        spawn = None
        if n % 10 == 9:
            parent = ids[n - 1 - rng.randrange(min(n, 50))]
            spawn = SpawnRef(
                parent_session_id=parent,
                parent_loop_id=f"{parent}.x.1",
                tool_call_id=f"call-{n}",
                tool_name="delegate",
            )
        yield Session(
            session_id=session_id,
            agent_id=agent,
            created_at=Timestamp.from_ns(created),
            last_active_at=Timestamp.from_ns(clock),
            formation=SessionFormation.first_loop(Timestamp.from_ns(created)),
            parent_spawn_ref=spawn,
            loops=loops,
        )


def query_latency(root: Path, count: int, runs: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="sqlite-query-", dir=root))
    store = SqliteStore(directory / "sessions.db")
    try:
        sessions = list(synthetic_sessions(count))
        fill = timed(partial(save_all, store, sessions))
        parent = next(s.parent_spawn_ref.parent_session_id for s in sessions if s.parent_spawn_ref)
        recent = Timestamp.from_ns(EPOCH + 29 * DAY_NS)
        size = os.path.getsize(directory / "sessions.db") + os.path.getsize(directory / "sessions.db-wal")
        print(
            f"\nSQLite query latency: {count:,} sessions x 5 loops saved in {fill:.1f} s "
            f"({count / fill:,.0f} sessions/s), file {size / MB:.1f} MB; median of {runs} runs\n"
        )
        queries: list[tuple[str, SessionQuery]] = [
            ("newest 20", SessionQuery(limit=20)),
            ("agent, newest 20", SessionQuery(agent_id=AGENTS[3], limit=20)),
            ("agent, all", SessionQuery(agent_id=AGENTS[3])),
            ("agent + since (last day)", SessionQuery(agent_id=AGENTS[3], since=recent)),
            ("since (last day)", SessionQuery(since=recent)),
            ("status Aborted, newest 20", SessionQuery(status="Aborted", limit=20)),
            ("status Rejected, all", SessionQuery(status="Rejected")),
            ("model gpt-4o, newest 20", SessionQuery(model="gpt-4o", limit=20)),
            ("model openai/gpt-4o + agent", SessionQuery(model="openai/gpt-4o", agent_id=AGENTS[3])),
            ("top 20 by tokens", SessionQuery(order="tokens", limit=20)),
            ("min_tokens 80,000", SessionQuery(min_tokens=80_000)),
            ("children of a session", SessionQuery(parent_session_id=parent)),
        ]
        print(f"{'query':<30}{'rows':>7}{'median ms':>11}")
        print("-" * 48)
        plans = []
        for label, query in queries:
            rows = len(store.query(query))
            median = statistics.median(timed(partial(store.query, query)) for _ in range(runs))
            print(f"{label:<30}{rows:>7}{median * 1000:>11.3f}")
            plans.append((label, store.explain_query(query)))
        group_bys: tuple[GroupBy, ...] = ("agent", "model", "day")
        for group_by in group_bys:
            rows = len(store.usage_totals(group_by))
            median = statistics.median(timed(partial(store.usage_totals, group_by)) for _ in range(runs))
            print(f"{'usage_totals ' + group_by:<30}{rows:>7}{median * 1000:>11.3f}")
        print("\nEXPLAIN QUERY PLAN")
        for label, plan in plans:
            print(f"  {label}:")
            for line in plan.splitlines():
                print(f"      {line}")
    finally:
        store.close()
        shutil.rmtree(directory)


# -- search (PostgreSQL) ---------------------------------------------------------------------------

RARE_WORD = "zebracorn"


def search_corpus(count: int) -> Iterator[Session]:
    """`count` copies of the W1 sessions under new ids; every 1000th one's first prompt says `RARE_WORD`."""
    templates = w1_sessions(workload.W1)
    for n in range(count):
        template = templates[n % len(templates)]
        session_id = f"search-{n:06d}"
        loops = [msgspec.structs.replace(record, session_id=session_id) for record in template.loops]
        if n % 1000 == 500:
            first = loops[0]
            said = UserMessage(content=(TextContent(text=f"Find the {RARE_WORD} please"),), timestamp=0)
            loops[0] = msgspec.structs.replace(first, messages=[said, *first.messages[1:]])
        yield msgspec.structs.replace(template, session_id=session_id, loops=loops)


def search_latency(dsn: str, count: int, runs: int) -> None:
    import psycopg
    from psycopg import sql

    from phi_session.stores.postgres import PostgresStore

    schema = f"phi_bench_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(dsn, schema=schema)
    try:
        fill = timed(partial(save_all, store, list(search_corpus(count))))
        print(
            f"\nPostgreSQL search: {count:,} W1-shaped sessions ({count * 5:,} loops) saved in {fill:.1f} s;"
            f" median of {runs} runs\n"
        )
        searches = [
            (f"rare word ({RARE_WORD})", RARE_WORD, 50),
            ("absent word", "nonexistentword", 50),
            ("two common words, 50 hits", "retry timeout", 50),
            ("two common words, 500 hits", "retry timeout", 500),
        ]
        print(f"{'search':<30}{'hits':>6}{'index ms':>11}{'scan ms':>11}{'speed-up':>10}")
        print("-" * 68)
        for label, text, limit in searches:
            hits = store.search(text, limit=limit)
            assert hits == scan_search(store, text, None, limit), label  # the two paths agree
            indexed = statistics.median(timed(partial(store.search, text, limit=limit)) for _ in range(runs))
            scanned = statistics.median(
                timed(partial(scan_search, store, text, None, limit)) for _ in range(max(1, runs // 5))
            )
            print(
                f"{label:<30}{len(hits):>6}{indexed * 1000:>11.1f}{scanned * 1000:>11.1f}"
                f"{scanned / indexed:>9.0f}x"
            )
        print(f"\nEXPLAIN ANALYZE of the candidate query for {RARE_WORD!r}:")
        for line in store.explain_search(RARE_WORD, analyze=True).splitlines():
            print(f"    {line}")
    finally:
        store.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sessions",
        type=int,
        default=workload.W1,
        help="sessions in the throughput workload (default: W1 = 100; 0 skips it)",
    )
    parser.add_argument(
        "--query-sessions",
        type=int,
        default=10_000,
        help="sessions stored for the query benchmark (default 10,000; 0 skips it)",
    )
    parser.add_argument(
        "--search-sessions",
        type=int,
        default=3_000,
        help=f"sessions searched in PostgreSQL (default 3,000; 0 skips it; needs {POSTGRES_ENV})",
    )
    parser.add_argument(
        "--search-runs", type=int, default=11, help="runs per search, median kept (default 11)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs, best kept (default 3)")
    parser.add_argument("--query-runs", type=int, default=31, help="runs per query, median kept (default 31)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the stores are created (default: a new temporary directory)",
    )
    args = parser.parse_args(argv)

    root = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="phi-bench-stores-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"phi-session store benchmark - Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}, {platform.machine()}, stores under {root}"
    )
    dsn = os.environ.get(POSTGRES_ENV)
    if args.sessions > 0:
        sessions = w1_sessions(args.sessions)
        size = sum(len(encode_session(session)) for session in sessions)
        loops = sum(len(session.loops) for session in sessions)
        print(
            f"\nThroughput: {len(sessions)} sessions, {loops} loops, {size / MB:.1f} MB of session files "
            f"({size / len(sessions) / 1000:.0f} kB each); best of {args.repeat}\n"
        )
        backends: dict[str, Callable[[Path], Any] | str] = {
            "json-dir": json_dir_store,
            "sqlite": sqlite_store,
        }
        backends["postgres"] = postgres_factory(dsn) if dsn else f"skipped: {POSTGRES_ENV} is not set"
        results: dict[str, dict[str, float] | str] = {}
        for name, factory in backends.items():
            results[name] = (
                factory if isinstance(factory, str) else throughput(factory, sessions, root, args.repeat)
            )
        print_throughput(results, len(sessions), size)

    if args.query_sessions > 0:
        query_latency(root, args.query_sessions, args.query_runs)
    if args.search_sessions > 0 and dsn:
        search_latency(dsn, args.search_sessions, args.search_runs)
    if args.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
