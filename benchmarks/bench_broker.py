"""The NATS JetStream path: the sink's cost to the agent, and end-to-end throughput.

Needs nats-server with JetStream (``nats-server -js``, default nats://127.0.0.1:4222)
and PostgreSQL ($PHI_SESSION_TEST_POSTGRES_DSN or --dsn). Every run uses its own
stream and schema, removed at the end.

Part 1, the producer side: W1 (62,000 events) through `JetStreamSink` and through
`JsonlSink`, in this process, best of N runs: microseconds per event the agent
spends in the sink call (the publishing thread competes for the GIL, so its cost
shows up here too). Target: at most 2x the JSONL sink.

Part 2, end to end: 4 producer processes publish W1 between them (25 sessions each)
while 1, then 2 ``phi-session ingest`` workers record them into PostgreSQL: events/s
from the first publish until every session is stored. Then with 2 workers, one is
SIGKILLed mid-stream and restarted a second later: the lag (events in the stream)
when it comes back and how long until it is 0.

Usage: python benchmarks/bench_broker.py [--runs N] [--url URL] [--dsn DSN] [--sessions N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # lives next to this script

from phi_session.broker import JetStreamSink, ingest_status
from phi_session.sinks import JsonlSink

PRODUCERS = 4


def _per_event(make_sink: object, events: list[object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        sink = make_sink()  # type: ignore[operator]
        started = time.perf_counter()
        for event in events:
            sink(event)
        best = min(best, time.perf_counter() - started)
        if isinstance(sink, JetStreamSink):
            sink.flush(120)
        sink.close()
    return best / len(events) * 1e6


def producer_side(url: str, runs: int) -> None:
    events = list(workload.events(workload.W1))
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = _per_event(lambda: JsonlSink(Path(tmp) / f"{uuid.uuid4().hex}.jsonl"), events, runs)
        stream = f"BENCH_{uuid.uuid4().hex[:10]}"
        broker = _per_event(
            lambda: JetStreamSink(
                url,
                stream=stream,
                subject_prefix=stream.lower(),
                buffer=len(events) + 1,
                spill_dir=Path(tmp) / "spill",
            ),
            events,
            runs,
        )
        asyncio.run(_delete_stream(url, stream))
    print(f"producer side, W1 ({len(events):,} events), best of {runs}:")
    print(f"  JsonlSink      {jsonl:6.2f} us/event")
    verdict = "PASS" if broker <= 2 * jsonl else "MISS"
    print(
        f"  JetStreamSink  {broker:6.2f} us/event  ({broker / jsonl:.2f}x the JSONL sink; target <= 2x) "
        f"{verdict}"
    )


def _produce(url: str, stream: str, seed: int, sessions: int, spill: str) -> None:
    with JetStreamSink(url, stream=stream, subject_prefix=stream.lower(), spill_dir=spill) as sink:
        for event in workload.events(sessions, seed=seed):
            sink(event)
        sink.flush(600)


def _worker(url: str, store: str, stream: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PHI_SESSION_NATS_STREAM": stream, "PHI_SESSION_NATS_SUBJECT_PREFIX": stream.lower()}
    return subprocess.Popen(
        [sys.executable, "-c", "from phi_session.cli import main; main()", "ingest", url, "--store", store],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _lag(url: str, dsn: str, schema: str, stream: str) -> tuple[int, int]:
    rows = asyncio.run(ingest_status(url, dsn, schema=schema, stream=stream, subject_prefix=stream.lower()))
    return sum(r.in_stream for r in rows), sum(r.staged for r in rows)


def end_to_end(url: str, dsn: str, workers: int, sessions: int, *, kill: bool = False) -> float:
    """Events/s from the first publish until every session is stored."""
    from phi_session.stores.postgres import PostgresStore

    stream, schema = f"BENCH_{uuid.uuid4().hex[:10]}", f"bench_{uuid.uuid4().hex[:10]}"
    store = f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    total_sessions = PRODUCERS * sessions
    total_events = total_sessions * workload.EVENTS_PER_SESSION
    spill = tempfile.mkdtemp()
    running = [_worker(url, store, stream) for _ in range(workers)]
    time.sleep(1.0)  # the workers are up and hold their partitions
    started = time.perf_counter()
    producers = [
        multiprocessing.Process(target=_produce, args=(url, stream, 100 + n, sessions, spill))
        for n in range(PRODUCERS)
    ]
    for process in producers:
        process.start()
    restarted_at = lag_at_restart = None
    if kill:
        time.sleep(2.0)
        running[0].send_signal(signal.SIGKILL)
        running[0].wait()
        time.sleep(1.0)
        lag_at_restart = _lag(url, dsn, schema, stream)
        running[0] = _worker(url, store, stream)
        restarted_at = time.perf_counter()
    with PostgresStore(dsn, schema=schema) as sessions_store:
        while True:
            stored = len(sessions_store.list_ids())
            if stored >= total_sessions and _lag(url, dsn, schema, stream) == (0, 0):
                break
            time.sleep(0.2)
    finished = time.perf_counter()
    elapsed = finished - started
    for process in producers:
        process.join()
    for worker in running:
        worker.send_signal(signal.SIGTERM)
        worker.wait()
    label = f"{workers} worker{'s' if workers > 1 else ''}"
    label += ", one SIGKILLed and restarted" if kill else ""
    print(f"  {label}: {total_events:,} events in {elapsed:.1f} s = {total_events / elapsed:,.0f} events/s")
    if restarted_at is not None and lag_at_restart is not None:
        print(
            f"    lag when the killed worker came back: {lag_at_restart[0]:,} in the stream, "
            f"{lag_at_restart[1]:,} staged; 0 after {finished - restarted_at:.1f} s"
        )
    asyncio.run(_delete_stream(url, stream))
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return total_events / elapsed


async def _delete_stream(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PHI_SESSION_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=workload.W1 // PRODUCERS,
        help="sessions per producer (default: W1 between the 4 producers)",
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs")
    producer_side(args.url, args.runs)
    print(f"end to end, {PRODUCERS} producers x {args.sessions} sessions:")
    one, two = (end_to_end(args.url, args.dsn, workers, args.sessions) for workers in (1, 2))
    verdict = (
        "PASS"
        if two >= 1.5 * one
        else f"MISS (CPU-bound: {os.cpu_count()} CPUs run the producers, "
        "nats-server, PostgreSQL and the workers)"
    )
    print(f"  2 workers / 1 worker: {two / one:.2f}x (target >= 1.5x where the machine allows) {verdict}")
    end_to_end(args.url, args.dsn, 2, args.sessions, kill=True)


if __name__ == "__main__":
    main()
