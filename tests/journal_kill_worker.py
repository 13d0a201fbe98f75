"""Child process of the journal crash test, and the deterministic stream it records.

Run as ``python journal_kill_worker.py DIRECTORY DURABILITY MODE``: records `stream()`
(endless) through a journal (see `main`) and prints, one per line and flushed, the
index of every event of the stream once the journal has acknowledged it. The parent
kills it with SIGKILL at some point and checks that `recover` brings back every event
it was told about.

`stream` is also the tests' cheap event source: the same ``seed`` gives the same
events (timestamps included), so a test can rebuild what the child recorded.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from phi_session import (
    DEFAULT,
    INITIAL,
    AgentEnd,
    AgentEvent,
    AgentStart,
    AssistantMessage,
    MessageEnd,
    MessageUpdate,
    ProgressMessage,
    StreamDelta,
    TextContent,
    Timestamp,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResult,
    TurnEnd,
    TurnStart,
    Usage,
    UserMessage,
)
from phi_session.journal import Journal, JournaledRecorder
from phi_session.persist import AutoPersistingRecorder
from phi_session.stores.sqlite import SqliteStore

_BASE_NS = 1_750_000_000 * 10**9


class _Clock:
    def __init__(self) -> None:
        self.ns = _BASE_NS

    def tick(self) -> Timestamp:
        self.ns += 1_000_000
        return Timestamp.from_ns(self.ns)

    @property
    def ms(self) -> int:
        return self.ns // 1_000_000


def _loop(
    rng: random.Random, clock: _Clock, session: str, loop_id: str, turns: int, parent: str | None, deltas: int
) -> Iterator[AgentEvent]:
    """One loop: start, `turns` turns (a tool call in some), end."""
    yield AgentStart(
        agent_id="agent-" + session[-1],
        session_id=session,
        loop_id=loop_id,
        parent_loop_id=parent,
        continuation_kind=DEFAULT if parent else INITIAL,
        timestamp=clock.tick(),
    )
    usage = Usage(input=0, output=0)
    for turn in range(turns):
        yield TurnStart(loop_id=loop_id, turn_index=turn, triggered_by="User", timestamp=clock.tick())
        yield MessageEnd(
            loop_id=loop_id,
            message=UserMessage(
                content=(TextContent(text=f"question {turn} of {loop_id}"),), timestamp=clock.ms
            ),
        )
        answer = AssistantMessage(
            content=(TextContent(text="x" * rng.randrange(10, 200)),),
            stop_reason="stop",
            model="m",
            provider="p",
            usage=Usage(input=10, output=turn + 1, total_tokens=turn + 11),
            timestamp=clock.ms,
        )
        for index in range(deltas):
            yield MessageUpdate(loop_id=loop_id, message=answer, delta=StreamDelta.text(f"part {index}"))
        if rng.random() < 0.3:
            call = f"call-{loop_id}-{turn}"
            yield ToolExecutionStart(loop_id=loop_id, tool_call_id=call, tool_name="search", args={"q": turn})
            yield ToolExecutionEnd(
                loop_id=loop_id,
                tool_call_id=call,
                tool_name="search",
                result=ToolResult(content=(TextContent(text="found"),)),
                is_error=False,
            )
        yield MessageEnd(loop_id=loop_id, message=answer)
        yield TurnEnd(loop_id=loop_id, message=answer, usage=answer.usage, timestamp=clock.tick())
        usage = usage + answer.usage
    yield AgentEnd(loop_id=loop_id, messages=(), usage=usage, timestamp=clock.tick())


def _session(
    rng: random.Random, clock: _Clock, number: int, loops: int, turns: int, deltas: int
) -> Iterator[AgentEvent]:
    session = f"s{number:07d}"
    first = f"{session}.p.m.1"
    for index in range(loops):
        yield from _loop(
            rng, clock, session, f"{session}.p.m.{index + 1}", turns, first if index else None, deltas
        )


def stream(
    seed: int = 0,
    *,
    loops: int = 2,
    turns: int = 2,
    deltas: int = 2,
    interleave: int = 3,
    sessions: int | None = None,
) -> Iterator[AgentEvent]:
    """Sessions of `loops` loops x `turns` turns; `interleave` of them in flight at once,
    their events alternating, so any prefix leaves several sessions open. Endless unless
    `sessions` is given."""
    rng = random.Random(seed)
    clock = _Clock()
    active: deque[Iterator[AgentEvent]] = deque()
    started = 0
    while True:
        while len(active) < interleave and (sessions is None or started < sessions):
            active.append(_session(rng, clock, started, loops, turns, deltas))
            started += 1
        if not active:
            return
        current = active.popleft()
        event = next(current, None)
        if event is not None:
            yield event
            active.append(current)


def with_strays(events: Iterator[AgentEvent], every: int = 7) -> Iterator[AgentEvent]:
    """`events` with, after every `every`-th, an event of a loop nobody started (an orphan)."""
    for index, event in enumerate(events, 1):
        yield event
        if index % every == 0:
            yield ProgressMessage(loop_id=f"stray.p.m.{index}", tool_call_id="c", tool_name="t", text="?")


def main(directory: str, durability: str, mode: str) -> None:
    """Record `stream()` forever, printing the index of each acknowledged event.

    `mode` ``journal``: a bare `JournaledRecorder` (finished sessions are discarded:
    only the journal keeps them). ``persist``: an `AutoPersistingRecorder` saving into
    ``DIRECTORY/sessions.db`` and releasing journal segments as it goes. ``orphans``:
    the same, recording `with_strays(stream())`.
    """
    journal = Journal(
        Path(directory) / "journal",
        durability=durability,  # type: ignore[arg-type]
        interval_ms=5,
        segment_bytes=16 * 1024,
    )
    persist = None
    if mode in ("persist", "orphans"):
        persist = AutoPersistingRecorder(
            SqliteStore(Path(directory) / "sessions.db"),
            journal=journal,
            checkpoint_every=100,
            checkpoint_interval=0.05,
        )
    else:
        sink = JournaledRecorder(journal)
    waiting: deque[tuple[int, int]] = deque()  # (stream index, sequence number) not yet acknowledged
    for index, event in enumerate(with_strays(stream()) if mode == "orphans" else stream()):
        if persist is not None:
            persist.on_event(event)
            waiting.append((index, journal.last_seq))
        else:
            waiting.append((index, sink.on_event(event)))
            if index % 500 == 0:  # keep memory flat in an endless run
                sink.recorder.checkpoint()
                sink.recorder.drain_completed()
        acknowledged = journal.acknowledged_seq
        told = None
        while waiting and waiting[0][1] <= acknowledged:
            told = waiting.popleft()[0]
        if told is not None:
            sys.stdout.write(f"{told}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
