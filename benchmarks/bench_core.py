"""Core benchmark: decode, record and encode phi-core event streams (issue 3, item 8).

Usage: ``python benchmarks/bench_core.py [--quick]``

Everything runs in one process on the same lines (`workload.lines`), next to a
*null recorder* (``orjson.loads`` + append to per-loop lists), so the targets are
ratios that do not depend on the machine:

* decode+record (``on_json`` + ``flush``) at least 3x faster than the null recorder;
* that plus encoding every session at least 2x faster than null decode + append +
  ``orjson.dumps`` of each loop's list;
* W2 (1,000 sessions) per-event cost of ``on_json`` at most 1.10x W1's (100 sessions).

Timings are the best of N runs (``time.perf_counter``) with the cyclic GC left on,
as a user would run it; ``gc.collect()`` runs between runs, outside the timed region,
and each run's result is released after its clock stops. Memory is measured with
`tracemalloc` once W1 is recorded. The script always exits 0: it reports PASS/MISS
next to each target rather than asserting.
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson

import phi_session
from phi_session.recorder import SessionRecorder

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # lives next to this script

PHI_CORE_BYTES_PER_EVENT = 950


# -- the measured operations -----------------------------------------------------------
# Each returns what it built, so that the timer can release it outside the timed region.


def decode_lenient(lines: Sequence[bytes]) -> None:
    decode = phi_session.decode_event
    for line in lines:
        decode(line, strict=False)


def decode_strict(lines: Sequence[bytes]) -> None:
    decode = phi_session.decode_event
    for line in lines:
        decode(line, strict=True)


def record_events(events: Sequence[phi_session.AgentEvent]) -> SessionRecorder:
    recorder = SessionRecorder()
    on_event = recorder.on_event
    for event in events:
        on_event(event)
    recorder.flush()
    return recorder


def record_lines(lines: Sequence[bytes]) -> SessionRecorder:
    recorder = SessionRecorder()
    on_json = recorder.on_json
    for line in lines:
        on_json(line)
    recorder.flush()
    return recorder


def encode_sessions(sessions: Sequence[phi_session.Session]) -> list[bytes]:
    encode = phi_session.encode
    return [encode(session) for session in sessions]


def record_and_encode(lines: Sequence[bytes]) -> tuple[list[phi_session.Session], list[bytes]]:
    sessions = record_lines(lines).drain_completed()
    return sessions, encode_sessions(sessions)


def null_record(lines: Sequence[bytes]) -> dict[str, list[Any]]:
    """The baseline: decoded dicts appended to per-loop lists (session-scoped events by session)."""
    loops: dict[str, list[Any]] = {}
    loads = orjson.loads
    for line in lines:
        event = loads(line)
        key = event.get("loop_id") or event.get("session_id")
        bucket = loops.get(key)
        if bucket is None:
            bucket = loops[key] = []
        bucket.append(event)
    return loops


def null_record_and_dump(lines: Sequence[bytes]) -> tuple[dict[str, list[Any]], list[bytes]]:
    loops = null_record(lines)
    dumps = orjson.dumps
    return loops, [dumps(bucket) for bucket in loops.values()]


# -- timing and memory -------------------------------------------------------------------


class Timing:
    """The best (fastest) of several runs of one operation over `count` input events.

    Besides wall time it keeps, for that run, the time spent in the cyclic GC and the
    system CPU time (mostly page faults of freshly allocated memory): both explain
    why a bigger workload can cost more per event.
    """

    __slots__ = ("count", "gc_seconds", "label", "seconds", "sys_seconds")

    def __init__(self, label: str, count: int) -> None:
        self.label = label
        self.count = count
        self.seconds = float("inf")
        self.gc_seconds = 0.0
        self.sys_seconds = 0.0

    @property
    def per_event(self) -> float:
        return self.seconds / self.count

    @property
    def rate(self) -> float:
        return self.count / self.seconds


class _GcClock:
    """Sums the time the cyclic GC spends while installed (via `gc.callbacks`)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


def run_once(timing: Timing, fn: Callable[[], object]) -> None:
    """Run `fn` once from a collected heap, GC on; keep it in `timing` if it is the best so far."""
    gc.collect()
    clock = _GcClock()
    gc.callbacks.append(clock)
    try:
        sys_before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        sys_after = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    finally:
        gc.callbacks.remove(clock)
    del result  # freeing what a run built is not part of its cost
    if elapsed < timing.seconds:
        timing.seconds = elapsed
        timing.gc_seconds = clock.total
        timing.sys_seconds = sys_after - sys_before


def best_of(repeat: int, operations: Sequence[tuple[Timing, Callable[[], object]]]) -> None:
    """Best of `repeat` rounds; each round runs every operation once, in turn.

    Interleaving means that operations compared in a ratio see the same machine
    load, which matters on a shared machine.
    """
    for _ in range(repeat):
        for timing, fn in operations:
            run_once(timing, fn)
        print("  .", end="", file=sys.stderr, flush=True)


def time_pre_decoded(repeat: int, lines: Sequence[bytes]) -> Timing:
    """`on_event` over events decoded beforehand (the decoded events alive only meanwhile)."""
    decoded = [phi_session.decode_event(line, strict=False) for line in lines]
    timing = Timing("record pre-decoded (on_event + flush)", len(lines))
    best_of(repeat, [(timing, lambda: record_events(decoded))])
    return timing


def time_encode(repeat: int, lines: Sequence[bytes]) -> tuple[Timing, int, int]:
    """Encoding every recorded session; also returns the session count and total bytes."""
    sessions = record_lines(lines).drain_completed()
    size = sum(len(data) for data in encode_sessions(sessions))
    timing = Timing("encode every session (encode)", len(lines))
    best_of(repeat, [(timing, lambda: encode_sessions(sessions))])
    return timing, len(sessions), size


def retained_bytes(build: Callable[[], object]) -> int:
    """Bytes still allocated once `build()` has returned (its result alive), per tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        result = build()
        gc.collect()
        size, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return size


def memory_after_recording(lines: Sequence[bytes]) -> tuple[int, int]:
    """(bytes held by the recorder after flush, bytes held by recorder + drained sessions)."""
    gc.collect()
    tracemalloc.start()
    try:
        recorder = record_lines(lines)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        sessions = recorder.drain_completed()
        gc.collect()
        drained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del recorder, sessions
    return held, drained


# -- report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_target(label: str, value: str, goal: str, ok: bool | None) -> None:
    line = f"{label:<54} {value:>8} {goal:>9}  {'' if ok is None else verdict(ok)}"
    print(line.rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="phi-session core benchmark (see module docstring)")
    parser.add_argument("--quick", action="store_true", help="best of 2 runs instead of 5")
    args = parser.parse_args(argv)
    repeat = 2 if args.quick else 5

    print("generating W1 and W2 ...", file=sys.stderr, flush=True)
    # Tuples of bytes drop out of the cyclic GC after their first collection, so the
    # inputs do not make the collector slower for the recorders under test.
    w1 = tuple(workload.lines(workload.W1))
    w2 = tuple(workload.lines(workload.W2))
    gc.collect()
    n1, n2 = len(w1), len(w2)

    def timing(label: str, count: int = n1) -> Timing:
        return Timing(label, count)

    # Recorder against null recorder, W1 against W2: interleaved, only the lines on the heap.
    on_json_w1 = timing("decode+record (on_json + flush)")
    null_w1 = timing("null: orjson.loads + append")
    on_json_w2 = timing("W2 decode+record (on_json + flush)", n2)
    null_w2 = timing("W2 null: orjson.loads + append", n2)
    print("recorder and null recorder, W1 and W2 ", end="", file=sys.stderr, flush=True)
    best_of(
        repeat,
        [
            (on_json_w1, lambda: record_lines(w1)),
            (null_w1, lambda: null_record(w1)),
            (on_json_w2, lambda: record_lines(w2)),
            (null_w2, lambda: null_record(w2)),
        ],
    )

    # The full job: record, then write every session; against null decode+append+dumps.
    full = timing("on_json + flush + drain + encode all")
    null_dump = timing("null: loads + append + orjson.dumps")
    print("\nfull job ", end="", file=sys.stderr, flush=True)
    best_of(repeat, [(full, lambda: record_and_encode(w1)), (null_dump, lambda: null_record_and_dump(w1))])

    # The parts, each with only its own input alive.
    decode_lax = timing("decode_event(strict=False)")
    decode_strict_ = timing("decode_event(strict=True)")
    print("\nparts ", end="", file=sys.stderr, flush=True)
    best_of(repeat, [(decode_lax, lambda: decode_lenient(w1)), (decode_strict_, lambda: decode_strict(w1))])
    on_event = time_pre_decoded(repeat, w1)
    encode, session_count, encoded_bytes = time_encode(repeat, w1)
    print(file=sys.stderr)

    print("memory ...", file=sys.stderr, flush=True)
    held, drained = memory_after_recording(w1)
    null_held = retained_bytes(lambda: null_record(w1))

    w1_bytes = sum(map(len, w1))
    deltas = sum(1 for line in w1 if line.startswith(b'{"type":"MessageUpdate"'))
    print()
    print(
        f"phi-session core benchmark: best of {repeat}, GC on; Python {platform.python_version()}, "
        f"msgspec {msgspec.__version__}, orjson {orjson.__version__}"
    )
    print(
        f"W1: {workload.W1} sessions, {n1:,} events, {w1_bytes / 1e6:.1f} MB "
        f"(MessageUpdate: {deltas / n1:.0%} of events); W2: {workload.W2} sessions, {n2:,} events"
    )
    print(f"W1 session files: {session_count} sessions, {encoded_bytes / 1e6:.1f} MB")
    print()
    print(
        f"{'measurement (W1 unless W2)':<40} {'events':>9} {'best ms':>9} {'events/s':>11} "
        f"{'gc':>5} {'sys':>5}"
    )
    print("-" * 84)
    for row in (
        decode_lax,
        decode_strict_,
        on_event,
        on_json_w1,
        encode,
        full,
        null_w1,
        null_dump,
        on_json_w2,
        null_w2,
    ):
        print(
            f"{row.label:<40} {row.count:>9,} {row.seconds * 1e3:>9.1f} {row.rate:>11,.0f} "
            f"{row.gc_seconds / row.seconds:>5.0%} {row.sys_seconds / row.seconds:>5.0%}"
        )
    print("encode: W1 input events per second of encoding all W1 sessions. gc: share of the best run")
    print("spent in the cyclic GC; sys: system CPU share (page faults of new memory).")

    print()
    speedup = null_w1.seconds / on_json_w1.seconds
    speedup_full = null_dump.seconds / full.seconds
    growth = on_json_w2.per_event / on_json_w1.per_event
    growth_no_gc = ((on_json_w2.seconds - on_json_w2.gc_seconds) / n2) / (
        (on_json_w1.seconds - on_json_w1.gc_seconds) / n1
    )
    growth_no_sys = ((on_json_w2.seconds - on_json_w2.sys_seconds) / n2) / (
        (on_json_w1.seconds - on_json_w1.sys_seconds) / n1
    )
    null_growth = null_w2.per_event / null_w1.per_event
    print(f"{'target':<54} {'value':>8} {'goal':>9}")
    print("-" * 84)
    print_target("null recorder time / on_json time", f"{speedup:.2f}x", ">= 3x", speedup >= 3)
    print_target(
        "null+dumps time / (on_json+flush+drain+encode) time",
        f"{speedup_full:.2f}x",
        ">= 2x",
        speedup_full >= 2,
    )
    print_target("W2/W1 per-event cost of on_json", f"{growth:.3f}", "<= 1.10", growth <= 1.10)
    print_target("  diagnostic: the same without the time spent in GC", f"{growth_no_gc:.3f}", "", None)
    print_target("  diagnostic: the same without system time", f"{growth_no_sys:.3f}", "", None)
    print_target("  reference: W2/W1 per-event cost of null recorder", f"{null_growth:.3f}", "", None)

    print()
    print("memory held once W1 is recorded (tracemalloc, bytes per input event)")
    print("-" * 84)
    for label, size in (("recorder after flush", held), ("recorder + drained sessions", drained)):
        per_event = size / n1
        print_target(
            label,
            f"{per_event:,.0f} B",
            f"< {PHI_CORE_BYTES_PER_EVENT}",
            per_event < PHI_CORE_BYTES_PER_EVENT,
        )
    print_target("reference: null recorder (dicts)", f"{null_held / n1:,.0f} B", "", None)
    print_target("reference: input JSON", f"{w1_bytes / n1:,.0f} B", "", None)
    print(f"(phi-core holds about {PHI_CORE_BYTES_PER_EVENT} B per input event)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
