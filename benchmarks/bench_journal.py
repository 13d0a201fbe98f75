"""Recording throughput with the write-ahead journal, and auto-persistence memory.

Part 1 records W1 (100 sessions, 62,000 events) through the bare `SessionRecorder`
and through a `JournaledRecorder` at each durability policy, in this process,
best of N runs, both from JSON lines (``on_json``, what a recorder reading an event
stream does) and from pre-built events (``on_event``). It prints events/s and the
journal's overhead over the bare recorder. Target: the ``interval`` policy adds at
most 30% (checked on the ``on_json`` path; see the note printed for ``on_event``).

Part 2 records `--persist-events` small-session events (default 1,000,000) through
an `AutoPersistingRecorder` into a SQLite store (optionally with a journal) and
prints the Python heap (tracemalloc) after 10% and after 100% of the stream: it
must stay flat.

Usage: python benchmarks/bench_journal.py [--runs N] [--persist-events N] [--skip-persist]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import workload  # noqa: E402  (benchmarks/ on sys.path)
from journal_kill_worker import stream  # noqa: E402  (tests/ on sys.path)

from phi_session import AgentEvent  # noqa: E402
from phi_session.journal import Durability, Journal, JournaledRecorder  # noqa: E402
from phi_session.persist import AutoPersistingRecorder  # noqa: E402
from phi_session.recorder import SessionRecorder  # noqa: E402
from phi_session.stores.sqlite import SqliteStore  # noqa: E402

POLICIES: tuple[Durability, ...] = ("interval", "os", "always")
TARGET = 0.30


def _best(runs: int, once: Callable[[], float]) -> float:
    return min(once() for _ in range(runs))


def _bare(feed: str, data: list[AgentEvent] | list[bytes]) -> Callable[[], float]:
    def once() -> float:
        recorder = SessionRecorder()
        apply = getattr(recorder, feed)
        gc.collect()
        started = time.perf_counter()
        for item in data:
            apply(item)
        recorder.flush()
        return time.perf_counter() - started
    return once


def _journaled(feed: str, data: list[AgentEvent] | list[bytes], policy: Durability) -> Callable[[], float]:
    def once() -> float:
        with tempfile.TemporaryDirectory() as directory:
            journal = Journal(Path(directory) / "journal", durability=policy)
            sink = JournaledRecorder(journal)
            apply = getattr(sink, feed)
            gc.collect()
            started = time.perf_counter()
            for item in data:
                apply(item)
            sink.recorder.flush()
            elapsed = time.perf_counter() - started
            journal.close()  # the final fsync is not part of recording
            return elapsed
    return once


def bench_recording(runs: int) -> bool:
    events = list(workload.events(workload.W1))
    lines = workload.lines(workload.W1)
    print(f"W1: {len(events)} events ({sum(map(len, lines)) / 1e6:.1f} MB of JSON lines), best of {runs}\n")
    print(f"{'feed':<9} {'recorder':<18} {'seconds':>8} {'events/s':>10} {'overhead':>9}")
    met = True
    for feed, data in (("on_json", lines), ("on_event", events)):
        bare = _best(runs, _bare(feed, data))
        print(f"{feed:<9} {'bare':<18} {bare:8.3f} {len(data) / bare:10,.0f} {'':>9}")
        for policy in POLICIES:
            # fsync per event is slow; fewer runs of it keep the benchmark short.
            seconds = _best(max(1, runs // 2) if policy == "always" else runs, _journaled(feed, data, policy))
            overhead = seconds / bare - 1
            if feed == "on_json" and policy == "interval":
                met = overhead <= TARGET
            print(f"{feed:<9} {'journal ' + policy:<18} {seconds:8.3f} {len(data) / seconds:10,.0f} "
                  f"{overhead:+8.0%}")
    print(f"\ninterval policy on the on_json path: {'meets' if met else 'MISSES'} the "
          f"{TARGET:.0%} overhead target")
    print("note: on_event records pre-built events, which costs the bare recorder ~0.5 us/event\n"
          "(deltas are dropped, the rest stored by reference); journaling must serialise each\n"
          "kept event (codec.encode_event), which alone costs more than that.")
    return met


def _small_sessions(count: int) -> Iterator[AgentEvent]:
    return itertools.islice(stream(loops=1, turns=1, deltas=0), count)


def bench_persist(count: int, with_journal: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore(Path(directory) / "sessions.db")
        tracemalloc.start()
        started = time.perf_counter()
        recorder = AutoPersistingRecorder(
            store, journal=Path(directory) / "journal" if with_journal else None)
        heap = {}
        for index, event in enumerate(_small_sessions(count), 1):
            recorder.on_event(event)
            if index in (count // 10, count):
                recorder.checkpoint()
                recorder.wait_saved()
                gc.collect()
                heap[index] = tracemalloc.get_traced_memory()[0]
        recorder.close()
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stats = recorder.stats()
        saved = len(store.list_ids())
        store.close()
    tenth, full = heap[count // 10], heap[count]
    label = "with journal" if with_journal else "no journal"
    print(f"auto-persist {count:,} events ({label}): {elapsed:.1f} s under tracemalloc, "
          f"{saved:,} sessions stored, {stats['backpressure_waits']:.0f} backpressure waits "
          f"({stats['backpressure_seconds']:.1f} s blocked)")
    print(f"  heap after 10%: {tenth / 1e6:.2f} MB, after 100%: {full / 1e6:.2f} MB "
          f"(difference {(full - tenth) / 1e3:+.0f} kB), peak {peak / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--persist-events", type=int, default=1_000_000)
    parser.add_argument("--skip-persist", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # backpressure warnings are expected here
    bench_recording(args.runs)
    if not args.skip_persist:
        print()
        bench_persist(args.persist_events, with_journal=False)
        bench_persist(args.persist_events, with_journal=True)


if __name__ == "__main__":
    main()
