"""The async recorder task: queues and async iterables into a store, losing nothing."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

import phi_session as ps
from phi_session.consume import consume
from phi_session.identity import AgentSession, FakeClock
from phi_session.instrument import Tracer
from phi_session.recorder import SessionRecorder
from phi_session.sinks import QueueSink
from phi_session.stores.base import SessionStore, merge_sessions

SNAP = ps.LoopConfigSnapshot(model="m", provider="p")


class MemoryStore:
    """Just enough of a SessionStore: merging saves, optionally failing some of them."""

    def __init__(self, failures: int = 0) -> None:
        self.sessions: dict[str, ps.Session] = {}
        self.saves = 0
        self.failures = failures

    def save(self, session: ps.Session) -> None:
        if self.failures:
            self.failures -= 1
            raise ps.StoreError("disk full")
        stored = self.sessions.get(session.session_id)
        self.sessions[session.session_id] = session if stored is None else merge_sessions(stored, session)
        self.saves += 1

    async def asave(self, session: ps.Session) -> None:
        await asyncio.to_thread(self.save, session)


def store(memory: MemoryStore) -> SessionStore:
    return cast(SessionStore, memory)


def agent_work(tracer: Tracer, loops: int = 3) -> None:
    first = None
    for n in range(loops):
        with tracer.loop(continues=first) as loop:
            first = first or loop.loop_id
            loop.user(f"question {n}")
            with loop.turn() as turn, turn.assistant() as reply:
                reply.text_delta("answer")
                reply.finish(usage=ps.Usage(input=n, output=n))


def identity() -> AgentSession:
    """Of session "s", numbering its loops alone (its id made by an injected factory): the
    identities of a session id given in a process share its loop counter, and `reference`
    records the same loops again, as a process of its own would."""
    return AgentSession(agent_id="a", clock=FakeClock(), id_factory=lambda: "s")


def reference(loops: int = 3) -> list[bytes]:
    recorder = SessionRecorder()
    agent_work(
        Tracer(identity(), sinks=[recorder], config=SNAP),
        loops,
    )
    recorder.flush()
    return [ps.encode(s) for s in recorder.drain_completed()]


def tracer_into(queue: asyncio.Queue[Any], agent: AgentSession | None = None) -> tuple[Tracer, QueueSink]:
    sink = QueueSink(queue)
    return Tracer(agent or identity(), sinks=[sink], config=SNAP), sink


def other_agent() -> AgentSession:
    """An agent of session "t", feeding a queue beside `identity()`'s."""
    return AgentSession(agent_id="b", clock=FakeClock(), id_factory=lambda: "t")


def test_a_queue_fed_by_a_tracer_is_recorded_and_saved_at_the_end() -> None:
    memory = MemoryStore()

    async def main() -> Any:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tracer, sink = tracer_into(queue)
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
        agent_work(tracer)
        sink.close()
        return await task

    stats = asyncio.run(main())
    assert [ps.encode(s) for s in memory.sessions.values()] == reference()
    assert stats.saved == 1 and stats.events > 10 and stats.unsaved == []


def test_events_from_another_thread_all_arrive() -> None:
    memory = MemoryStore()

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tracer, sink = tracer_into(queue)
        task = asyncio.create_task(consume(queue, store(memory)))
        worker = threading.Thread(target=agent_work, args=(tracer,))
        worker.start()
        await asyncio.to_thread(worker.join)
        sink.close()
        await task

    asyncio.run(main())
    assert [ps.encode(s) for s in memory.sessions.values()] == reference()


def test_json_lines_from_an_async_iterable_with_a_bad_line() -> None:
    events: list[ps.AgentEvent] = []
    agent_work(Tracer(identity(), sinks=[events.append], config=SNAP))
    lines: list[bytes | str] = [ps.encode(e) for e in events]
    lines.insert(3, b'{"type": "Nope"}')
    lines[5] = lines[5].decode()  # type: ignore[union-attr]
    memory = MemoryStore()

    async def source() -> AsyncIterator[bytes | str]:
        for line in lines:
            yield line
            await asyncio.sleep(0)

    stats = asyncio.run(consume(source(), store(memory)))
    assert stats.decode_errors == 1 and stats.events == len(lines)
    assert [ps.encode(s) for s in memory.sessions.values()] == reference()


def test_items_it_cannot_record_go_to_the_rejected_sink_as_taken() -> None:
    """They were logged, counted and dropped: nothing held them."""
    events: list[ps.AgentEvent] = []
    agent_work(
        Tracer(identity(), sinks=[events.append], config=SNAP),
        loops=1,
    )
    stray = {"type": "x"}  # neither an event nor a JSON line
    bad: list[object] = [b"{not json", '{"type": "Nope"}', b"\xff\xfe not utf-8", stray]
    items: list[object] = [*bad[:2], *map(ps.encode, events), *bad[2:]]
    kept: list[object] = []
    memory = MemoryStore()

    async def source() -> AsyncIterator[Any]:
        for item in items:
            yield item

    stats = asyncio.run(consume(source(), store(memory), rejected=kept.append))
    assert kept == bad and kept[3] is stray
    assert stats.decode_errors == stats.rejected_kept == 4
    assert [ps.encode(s) for s in memory.sessions.values()] == reference(loops=1)


def test_a_rejected_sink_that_raises_is_logged_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def broken(item: object) -> None:
        raise OSError(28, "No space left on device")

    async def source() -> AsyncIterator[bytes]:
        yield b"{not json"

    stats = asyncio.run(consume(source(), store(MemoryStore()), rejected=broken))
    assert stats.decode_errors == 1 and stats.rejected_kept == 0
    assert "LOST a skipped item" in caplog.text and "No space left" in caplog.text


def test_periodic_checkpoints_save_finished_sessions_while_running() -> None:
    memory = MemoryStore()

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tracer, sink = tracer_into(queue)
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=0.01))
        agent_work(tracer, loops=1)
        for _ in range(100):  # the first loop is saved before the stream ends
            await asyncio.sleep(0.01)
            if memory.saves:
                break
        assert memory.saves == 1
        with tracer.loop() as loop:  # later loops of the same session are merged in
            loop.user("more")
        sink.close()
        stats = await task
        assert stats.checkpoints >= 1

    asyncio.run(main())
    [session] = memory.sessions.values()
    assert [r.status for r in session.loops] == ["Completed", "Completed"]


def test_cancellation_records_and_saves_everything_already_queued() -> None:
    memory = MemoryStore()

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tracer, _ = tracer_into(queue)
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=3600))
        await asyncio.sleep(0)
        agent_work(tracer, loops=2)
        open_loop = tracer.loop().start()  # still running at shutdown
        open_loop.user("unanswered")
        assert queue.qsize() > 10  # nothing consumed yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [session] = memory.sessions.values()
    assert [r.status for r in session.loops] == ["Completed", "Completed", "Aborted"]


def test_a_failing_store_is_retried_and_what_never_saves_is_handed_back() -> None:
    flaky = MemoryStore(failures=1)
    asyncio.run(consume(_stream(), store(flaky)))
    assert len(flaky.sessions) == 1

    broken = MemoryStore(failures=100)
    stats = asyncio.run(consume(_stream(), store(broken), retry_for=0.1))
    assert broken.sessions == {} and [s.session_id for s in stats.unsaved] == ["s"]


async def _stream() -> AsyncIterator[ps.AgentEvent | None]:
    events: list[ps.AgentEvent] = []
    agent_work(
        Tracer(identity(), sinks=[events.append], config=SNAP),
        loops=1,
    )
    for event in events:
        yield event
    yield None  # ends the stream even if the iterable would go on
    raise AssertionError("read past the end marker")


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ps.InvalidArgument, match="checkpoint_interval"):  # was a bare ValueError
        asyncio.run(consume(_stream(), store(MemoryStore()), checkpoint_interval=0))


def test_a_queue_sink_and_consume_share_a_typed_queue(tmp_path: Path) -> None:
    """Under mypy --strict the documented pairing needed a cast whatever the queue's item
    type: consume took an ``asyncio.Queue[AgentEvent | bytes | str | None]``, QueueSink an
    ``asyncio.Queue[AgentEvent | None]``, and ``asyncio.Queue`` is invariant."""
    pytest.importorskip("mypy")
    source = tmp_path / "pairing.py"
    source.write_text(
        textwrap.dedent(
            """
            import asyncio

            from phi_session import AgentEvent, QueueSink, SessionStore, consume


            async def events_only(store: SessionStore) -> None:
                queue: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
                QueueSink(queue)
                await consume(queue, store)


            async def lines_too(store: SessionStore) -> None:
                queue: asyncio.Queue[AgentEvent | bytes | str | None] = asyncio.Queue()
                QueueSink(queue)
                await consume(queue, store)
            """
        )
    )
    # In a process of its own: mypy raises the recursion limit of the one it runs in.
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(source)],
        env={**os.environ, "MYPYPATH": str(Path(ps.__file__).parents[1])},  # this checkout's package
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


class _OtherQueue:
    """A queue with asyncio.Queue's methods but not its class (janus' async side, say)."""

    def __init__(self) -> None:
        self.inner: asyncio.Queue[Any] = asyncio.Queue()
        self.maxsize = 0

    def put_nowait(self, item: Any) -> None:
        self.inner.put_nowait(item)

    async def get(self) -> Any:
        return await self.inner.get()

    def get_nowait(self) -> Any:
        return self.inner.get_nowait()


def test_any_queue_with_asyncio_queues_methods_pairs_them() -> None:
    memory = MemoryStore()

    async def main() -> None:
        queue = _OtherQueue()
        tracer, sink = tracer_into(queue)  # type: ignore[arg-type]
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
        agent_work(tracer)
        sink.close()
        await task

    asyncio.run(main())
    assert [ps.encode(s) for s in memory.sessions.values()] == reference()


def test_a_given_recorder_is_used() -> None:
    recorder = SessionRecorder(include_streaming_events=True)
    memory = MemoryStore()
    asyncio.run(consume(_stream(), store(memory), recorder=recorder))
    [session] = memory.sessions.values()
    assert any(isinstance(e.event, ps.MessageUpdate) for e in session.loops[0].events)


def test_a_stray_queue_item_is_counted_and_skipped_not_fatal() -> None:
    memory = MemoryStore()

    async def main() -> Any:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        events: list[ps.AgentEvent] = []
        agent = identity()
        agent_work(Tracer(agent, sinks=[events.append], config=SNAP), loops=1)
        queue.put_nowait({"type": "x"})  # neither an event nor a JSON line
        for event in events:
            queue.put_nowait(event)
        queue.put_nowait(42)
        queue.put_nowait(None)
        return await consume(queue, store(memory), checkpoint_interval=None)

    stats = asyncio.run(main())
    assert stats.decode_errors == 2 and len(memory.sessions) == 1


class _OwnProgress(ps.ProgressMessage):
    """A subclass of an event type: the recorder refuses it (`TypeError`)."""


def test_an_instance_of_a_subclass_of_an_event_type_is_counted_and_skipped_not_fatal() -> None:
    """It passed the isinstance check, then the recorder's TypeError ended the consumer."""
    mine = _OwnProgress(loop_id="s.p.m.1", tool_call_id="c", tool_name="t", text="mine")
    stray = ps.ProgressMessage(loop_id="nobody.p.m.1", tool_call_id="c", tool_name="t", text="kept")

    async def source() -> AsyncIterator[ps.AgentEvent]:
        yield mine
        yield stray

    stats = asyncio.run(consume(source(), store(MemoryStore())))
    assert stats.decode_errors == 1
    assert [orphan.event for orphan in stats.orphans] == [stray]


def test_events_of_no_known_loop_are_handed_back_not_dropped() -> None:
    stray = ps.ProgressMessage(loop_id="nobody.p.m.1", tool_call_id="c", tool_name="t", text="lost?")

    async def source() -> AsyncIterator[ps.AgentEvent]:
        yield stray

    stats = asyncio.run(consume(source(), store(MemoryStore())))
    assert [orphan.event for orphan in stats.orphans] == [stray]


def test_an_event_built_with_a_field_phi_core_cannot_read_is_counted_and_skipped_not_fatal() -> None:
    """The recorder took it, and the session holding it could not be saved (nor its
    neighbours'); now the recorder refuses it and the consumer goes on."""
    memory = MemoryStore()

    async def main() -> Any:
        events: list[ps.AgentEvent] = []
        agent_work(Tracer(identity(), sinks=[events.append], config=SNAP), loops=1)
        turn_start = next(event for event in events if isinstance(event, ps.TurnStart))
        bad = msgspec.structs.replace(turn_start, turn_index=-1)
        kept: list[object] = []

        async def source() -> AsyncIterator[ps.AgentEvent]:
            for event in events:
                if event is turn_start:
                    yield bad
                yield event

        return (
            await consume(source(), store(memory), checkpoint_interval=None, rejected=kept.append),
            kept,
            bad,
        )

    stats, kept, bad = asyncio.run(main())
    assert stats.decode_errors == 1 and kept == [bad]
    assert len(memory.sessions) == 1


def test_tracers_sharing_one_queue_end_the_stream_when_the_last_sink_closes() -> None:
    # The first sink's close() put the end-of-stream marker: consume stopped there and
    # the other tracer's later events stayed in the queue, unread (1 of its 2 loops
    # saved), nothing counted or logged.
    memory = MemoryStore()

    async def main() -> tuple[ps.ConsumeStats, int]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
        first, first_sink = tracer_into(queue)
        second, _ = tracer_into(queue, other_agent())
        dropped = QueueSink(queue)  # never closed, gone: it holds no stream open
        del dropped
        gc.collect()
        agent_work(first)
        agent_work(second, loops=1)
        first_sink.close()
        first_sink.close()  # twice: still one sink
        await asyncio.sleep(0.01)
        agent_work(second, loops=1)
        second.close()
        stats = await asyncio.wait_for(task, 5)
        return stats, queue.qsize()

    stats, left = asyncio.run(main())
    assert left == 0 and stats.saved == 2
    assert len(memory.sessions["s"].loops) == 3 and len(memory.sessions["t"].loops) == 2


def test_a_sink_collected_unclosed_after_the_others_closed_ends_the_stream() -> None:
    # Tracer B dropped without close() (a tracer sits in reference cycles: its sink lives
    # until gc), then A closed: A was not the last open sink and put no end marker; gc
    # later freed B's sink and nothing ever put it: consume waited for good.
    memory = MemoryStore()

    async def main() -> tuple[ps.ConsumeStats, bool]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        first, first_sink = tracer_into(queue)
        second, second_sink = tracer_into(queue, other_agent())
        agent_work(first)
        agent_work(second, loops=1)
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
        first_sink.close()
        await asyncio.sleep(0.01)
        ended_while_open = task.done()  # the open sink may still send
        del second, second_sink
        gc.collect()
        stats = await asyncio.wait_for(task, 5)
        return stats, ended_while_open

    stats, ended_while_open = asyncio.run(main())
    assert not ended_while_open
    assert stats.saved == 2 and len(memory.sessions["s"].loops) == 3 and len(memory.sessions["t"].loops) == 1


def test_a_queue_sink_on_a_queue_whose_stream_ended_is_refused() -> None:
    # Requests one after another, each a tracer with a QueueSink of its own: request 0's
    # close() ended the stream; request 1's first events were put ahead of its pending
    # marker (stored Aborted, 0 turns), request 2's stayed in the queue (2 of 3 sessions
    # stored), nothing counted or logged. Now a sink made after the marker is refused.
    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        closing = QueueSink(queue)
        closing.close()  # the marker is on its way
        with pytest.raises(ps.InvalidArgument, match=r"^QueueSink: the stream of this queue ended"):
            QueueSink(queue)
        await asyncio.sleep(0)  # the marker is put: still ended
        with pytest.raises(ps.InvalidArgument, match="ended when its last QueueSink closed"):
            QueueSink(queue)
        assert [queue.get_nowait() for _ in range(queue.qsize())] == [None]

        collected = asyncio.Queue[Any]()
        kept, dropped = QueueSink(collected), QueueSink(collected)
        kept.close()  # the other still open: the last to leave owes the marker
        del dropped
        gc.collect()
        await asyncio.sleep(0)  # the collection counted in the loop: the marker on its way
        with pytest.raises(ps.InvalidArgument, match="ended"):
            QueueSink(collected)
        await asyncio.sleep(0)
        assert [collected.get_nowait() for _ in range(collected.qsize())] == [None]

    asyncio.run(main())


def test_a_queue_whose_consumer_took_the_end_marker_takes_a_new_stream() -> None:
    # One queue, consumers one after another: each batch starts consume, makes a sink and
    # a tracer, closes it, awaits the consumer. The first consumer took the marker and left
    # the queue empty, yet batch 1's QueueSink was refused (InvalidArgument: 1 of 2 stored).
    # Taken by consume (read, or taken as it is cancelled), the marker ends nothing more.
    memory = MemoryStore()

    async def main() -> list[int | None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        saved: list[int | None] = []
        for batch in range(3):
            consumer = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
            await asyncio.sleep(0)  # the consumer waits for the queue
            agent = AgentSession(agent_id="a", clock=FakeClock(), id_factory=f"b{batch}".format)
            tracer, sink = tracer_into(queue, agent)
            agent_work(tracer, 1)
            sink.close()
            if batch == 1:  # cancelled before reading: the marker is taken as it shuts down
                consumer.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await consumer
                saved.append(None)
            else:
                saved.append((await consumer).saved)
            assert queue.empty()
        return saved

    assert asyncio.run(main()) == [1, None, 1]
    assert sorted(memory.sessions) == ["b0", "b1", "b2"]
    assert all(s.loops[0].status == "Completed" for s in memory.sessions.values())


def test_per_request_tracers_feed_one_consumer_while_the_app_holds_a_sink_open() -> None:
    # The server pattern: one long-lived consumer, a tracer per request closed at its end.
    memory = MemoryStore()

    async def request(queue: asyncio.Queue[Any], n: int) -> None:
        agent = AgentSession(agent_id="a", clock=FakeClock(), id_factory=lambda: f"r{n}")
        with Tracer(agent, sinks=[QueueSink(queue)], config=SNAP) as tracer:
            async with tracer.loop() as loop:
                loop.user(f"request {n}")
                async with loop.turn() as turn, turn.assistant() as reply:
                    await asyncio.sleep(0)
                    reply.finish(usage=ps.Usage(input=1, output=1))

    async def main() -> ps.ConsumeStats:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stream = QueueSink(queue)  # held open by the app: the stream lasts until it closes
        task = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
        for n in range(3):
            await request(queue, n)
        await asyncio.sleep(0)
        assert not task.done()
        stream.close()  # shutting down
        return await asyncio.wait_for(task, 5)

    stats = asyncio.run(main())
    assert stats.saved == 3 and stats.decode_errors == 0 and stats.orphans == []
    assert sorted(memory.sessions) == ["r0", "r1", "r2"]
    for session in memory.sessions.values():
        [loop] = session.loops
        assert loop.status == "Completed" and loop.turn_count() == 1


async def _cleanup(kind: str) -> None:
    """What an agent's cleanup awaits before it writes its ends: nothing, loop turns
    (closing a stream, a generator's aclose), or a timer (I/O)."""
    if kind == "loop turns":
        for _ in range(8):
            await asyncio.sleep(0)
    elif kind == "a timer":
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("checkpoint_interval", [None, 3600])
@pytest.mark.parametrize("cleanup", ["nothing", "loop turns", "a timer"])
def test_events_agent_tasks_emit_as_they_are_cancelled_with_the_consumer_are_recorded(
    cleanup: str, checkpoint_interval: float | None
) -> None:
    # asyncio.run ending cancels the agent tasks and the consumer together: the consumer
    # took what was queued as its cancellation arrived, then settled and saved; what the
    # agent tasks' finally blocks emitted meanwhile (a tool's result, ToolExecutionEnd,
    # TurnEnd, AgentEnd) was never read (lost in 4 sessions of 10). Taken once as it
    # shut down, the ends of a cleanup that awaited a few times first were still lost
    # (4 awaits, or 1 with checkpoint_interval=None: 0 of 10 kept).
    memory = MemoryStore()

    async def agent(tracer: Tracer, started: asyncio.Event) -> None:
        async with tracer.loop() as loop:
            loop.user("run the long tool")
            async with loop.turn() as turn:
                async with turn.assistant() as reply:
                    reply.finish(tool_calls=[ps.ToolCall(id="c", name="t", arguments={})])
                async with turn.tool(turn.tool_calls[0]) as tool:
                    try:
                        started.set()
                        await asyncio.Event().wait()  # a long tool, until cancelled
                    finally:
                        await _cleanup(cleanup)
                        tool.result("partial result written on cancellation")

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tracer, _ = tracer_into(queue)
        consumer = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=checkpoint_interval))
        agents: list[asyncio.Task[None]] = []
        started: list[asyncio.Event] = []
        for n in range(10):
            started.append(asyncio.Event())
            twin = tracer.for_agent(AgentSession(agent_id="a", clock=FakeClock(), id_factory=f"s{n}".format))
            agents.append(asyncio.create_task(agent(twin, started[-1])))
        for event in started:
            await event.wait()
        consumer.cancel()  # delivered first: the agents emit their ends after it
        for task in agents:
            task.cancel()
        await asyncio.gather(consumer, *agents, return_exceptions=True)

    asyncio.run(main())
    assert sorted(memory.sessions) == [f"s{n}" for n in range(10)]
    for session in memory.sessions.values():
        [loop] = session.loops
        kinds = [type(recorded.event).__name__ for recorded in loop.events]
        assert "ToolExecutionEnd" in kinds and kinds[-1] == "AgentEnd", (session.session_id, kinds[-3:])


@pytest.mark.parametrize("agent", ["waits", "keeps emitting"])
def test_a_cancelled_consumer_saves_a_loop_that_never_ends_as_it_is(agent: str) -> None:
    # After a cancellation the consumer takes the ends of open loops a while: an agent
    # that never ends (not cancelled, its tool waiting, or emitting all the time) does
    # not hold shutdown; its loop is saved Aborted with what it recorded.
    memory = MemoryStore()

    async def endless(tracer: Tracer, started: asyncio.Event) -> None:
        async with tracer.loop() as loop:
            loop.user("never done")
            async with loop.turn() as turn, turn.assistant() as reply:
                started.set()
                while agent == "keeps emitting":
                    reply.text_delta("more ")
                    await asyncio.sleep(0)
                await asyncio.Event().wait()

    async def main() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tracer, _ = tracer_into(queue)
        consumer = asyncio.create_task(consume(queue, store(memory), checkpoint_interval=None))
        started = asyncio.Event()
        running = asyncio.create_task(endless(tracer, started))
        await started.wait()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(consumer, 30)  # (a hang guard)
        assert not running.done()
        running.cancel()

    asyncio.run(main())
    [session] = memory.sessions.values()
    [loop] = session.loops
    kinds = [type(recorded.event).__name__ for recorded in loop.events]
    assert loop.status == "Aborted" and "MessageStart" in kinds and "AgentEnd" not in kinds
