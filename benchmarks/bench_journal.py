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
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

from phi_session import AgentEvent
from phi_session.journal import Durability, Journal, JournaledRecorder
from phi_session.persist import AutoPersistingRecorder
from phi_session.recorder import SessionRecorder
from phi_session.stores.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import workload  # lives next to this script

from journal_kill_worker import stream  # the tests' small-session stream

POLICIES: tuple[Durability, ...] = ("interval", "os", "always")
TARGET = 0.30


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
    print(
        f"W1: {len(events)} events ({sum(map(len, lines)) / 1e6:.1f} MB of JSON lines), "
        f"{runs} interleaved rounds ({max(1, runs // 2)} for 'always')\n"
    )
    print(f"{'feed':<9} {'recorder':<18} {'best s':>7} {'events/s':>10} {'overhead':>9} {'median':>8}")
    met = True
    for feed, data in (("on_json", lines), ("on_event", events)):
        variants: dict[str, Callable[[], float]] = {"bare": _bare(feed, data)}
        variants.update({f"journal {p}": _journaled(feed, data, p) for p in POLICIES})
        times: dict[str, list[float]] = {name: [] for name in variants}
        # Rounds alternate the variants, so that a noisy neighbour slows them all alike.
        for round_ in range(runs):
            for name, once in variants.items():
                if name != "journal always" or round_ < max(1, runs // 2):  # fsync per event is slow
                    times[name].append(once())
        bare_best, bare_median = min(times["bare"]), statistics.median(times["bare"])
        for name, measured in times.items():
            best = min(measured)
            overhead = best / bare_best - 1
            median = statistics.median(measured) / bare_median - 1
            if feed == "on_json" and name == "journal interval":
                met = overhead <= TARGET
            shown = ("", "") if name == "bare" else (f"{overhead:+8.0%}", f"{median:+7.0%}")
            print(f"{feed:<9} {name:<18} {best:7.3f} {len(data) / best:10,.0f} {shown[0]:>9} {shown[1]:>8}")
    print(
        f"\ninterval policy on the on_json path (best of runs): {'meets' if met else 'MISSES'} the "
        f"{TARGET:.0%} overhead target"
    )
    print(
        "notes: on_event records pre-built events, which costs the bare recorder ~0.5 us/event\n"
        "(deltas are dropped, the rest kept by reference); journaling must serialise each kept\n"
        "event (codec.encode_event), which alone costs more than that. On on_json, the overhead\n"
        "is the journal's own work: queueing each kept event under the recorder's lock, then\n"
        "framing, CRC-32 and writing it in the flusher thread (which shares the GIL)."
    )
    return met


def _small_sessions(count: int) -> Iterator[AgentEvent]:
    return itertools.islice(stream(loops=1, turns=1, deltas=0), count)


def bench_persist(count: int, with_journal: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore(Path(directory) / "sessions.db")
        tracemalloc.start()
        started = time.perf_counter()
        recorder = AutoPersistingRecorder(
            store, journal=Path(directory) / "journal" if with_journal else None
        )
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
    print(
        f"auto-persist {count:,} events ({label}): {elapsed:.1f} s under tracemalloc, "
        f"{saved:,} sessions stored, {stats['backpressure_waits']:.0f} backpressure waits "
        f"({stats['backpressure_seconds']:.1f} s blocked)"
    )
    print(
        f"  heap after 10%: {tenth / 1e6:.2f} MB, after 100%: {full / 1e6:.2f} MB "
        f"(difference {(full - tenth) / 1e3:+.0f} kB), peak {peak / 1e6:.2f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
