"""Sinks: recorder, queue, JSONL file, callables; fan-out with failure isolation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import phi_session as ps
from phi_session._failures import FailureTally
from phi_session.codec import encode_event
from phi_session.identity import AgentSession, FakeClock
from phi_session.instrument import Tracer
from phi_session.recorder import SessionRecorder
from phi_session.sinks import CallableSink, FanOut, JsonlSink, QueueSink, RecorderSink, as_sink

SNAP = ps.LoopConfigSnapshot(model="m", provider="p")


def run_loop(tracer: Tracer, turns: int = 2) -> None:
    with tracer.loop() as loop:
        loop.user("hi")
        for _ in range(turns):
            with loop.turn() as turn, turn.assistant() as reply:
                reply.text_delta("a")
                reply.text_delta("b")
                reply.finish(usage=ps.Usage(input=1, output=1))


def tracer(*sinks: Any) -> Tracer:
    return Tracer(AgentSession(clock=FakeClock()), sinks=sinks, config=SNAP)


class Boom:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, event: ps.AgentEvent) -> None:
        self.calls += 1
        raise RuntimeError("sink down")


def test_a_failing_sink_is_isolated_reported_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    before: list[ps.AgentEvent] = []
    after: list[ps.AgentEvent] = []
    boom = Boom()
    t = tracer(before.append, boom, after.append)
    with caplog.at_level(logging.ERROR, logger="phi_session.sinks"):
        run_loop(t)  # never raises into the agent
    assert len(before) == len(after) == boom.calls > 10
    assert [type(e) for e in before] == [type(e) for e in after]
    assert t.sink_errors == {repr(boom): boom.calls} and t.fanout.error_count == boom.calls
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_a_single_failing_sink_does_not_raise() -> None:
    boom = Boom()
    t = tracer(boom)
    run_loop(t)
    assert t.sink_errors == {repr(boom): boom.calls}
    fan = FanOut([boom])
    fan(ps.InputRejected(loop_id="l", reason="r"))
    assert fan.errors == {repr(boom): 1}


def test_a_recorder_is_accepted_as_a_sink() -> None:
    recorder = SessionRecorder()
    run_loop(tracer(recorder))
    recorder.flush()
    [session] = recorder.drain_completed()
    assert len(session.loops[0].turns) == 2
    assert isinstance(as_sink(recorder), RecorderSink)
    with pytest.raises(TypeError):
        as_sink(42)  # type: ignore[arg-type]


def test_a_persisting_recorder_is_accepted_as_a_sink(tmp_path: Path) -> None:
    # As a SessionRecorder is: `Tracer(sinks=[AutoPersistingRecorder(store)])` was "not a sink".
    store = ps.SqliteStore(tmp_path / "s.db")
    streaming = ps.SessionRecorderConfig(include_streaming_events=True)
    with ps.AutoPersistingRecorder(store, config=streaming) as persisting:
        t = tracer(persisting)
        assert isinstance(as_sink(persisting), RecorderSink) and t.wants_deltas
        run_loop(t)
        t.close()  # the tracer's close leaves the recorder to its owner
        persisting.flush()
    [session_id] = store.list_ids()
    assert len(store.load(session_id).loops[0].turns) == 2
    with ps.AutoPersistingRecorder(ps.SqliteStore(tmp_path / "t.db")) as quiet:
        assert not tracer(quiet).wants_deltas


def test_deltas_are_built_only_if_some_sink_keeps_them() -> None:
    class NoDeltas(list[ps.AgentEvent]):
        wants_deltas = False

        def __call__(self, event: ps.AgentEvent) -> None:
            self.append(event)

    quiet = NoDeltas()
    t = tracer(quiet, SessionRecorder())
    assert not t.wants_deltas
    run_loop(t)
    assert not any(isinstance(e, ps.MessageUpdate) for e in quiet)
    assert tracer(SessionRecorder(include_streaming_events=True)).wants_deltas
    assert tracer(quiet, print).wants_deltas  # a plain callable is assumed to want them


def test_jsonl_sink_writes_one_flushed_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    t = tracer(sink)
    with t.loop() as loop:
        loop.user("hi")
        # Flushed per line: a reader sees the events while the loop still runs.
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and [json.loads(line)["type"] for line in lines[:-1]] == ["AgentStart"]
    t.close()
    assert sink.file.closed
    data = path.read_bytes()
    assert data.endswith(b"\n")
    recorder = SessionRecorder()
    for line in data.splitlines():
        recorder.on_json(line)
    recorder.flush()
    assert recorder.drain_completed()[0].loops[0].status == "Completed"


def test_jsonl_sink_leaves_a_given_file_open_and_never_interleaves_lines() -> None:
    buffer = io.BytesIO()
    sink = JsonlSink(buffer)
    event = ps.ProgressMessage(loop_id="l", tool_call_id="t", tool_name="n", text="x" * 5000)

    def write() -> None:
        for _ in range(50):
            sink(event)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sink.close()
    assert not buffer.closed
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 400 and all(ps.decode_event(line) == event for line in lines)


def test_jsonl_sink_appends(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    event = ps.InputRejected(loop_id="l", reason="r")
    for _ in range(2):
        with JsonlSink(path) as sink:
            sink(event)
    assert len(path.read_bytes().splitlines()) == 2


def test_jsonl_sink_ends_a_line_torn_by_a_crash_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    torn = b'{"type":"InputRejected","loop_id":"l"'  # an earlier run killed mid-line
    path.write_bytes(torn)
    event = ps.InputRejected(loop_id="l", reason="r")
    with JsonlSink(path) as sink:
        sink(event)
    assert path.read_bytes().splitlines() == [torn, encode_event(event)]


def test_jsonl_sink_keeps_the_events_after_a_write_a_full_disk_cut_short(
    tmp_path: Path, file_size_limit: Callable[[int | None], None]
) -> None:
    path = tmp_path / "e.jsonl"
    big = [ps.InputRejected(loop_id=f"big{n}", reason="r" * 20_000) for n in range(2)]
    after = ps.InputRejected(loop_id="after", reason="disk freed")
    with JsonlSink(path) as sink:
        sink(big[0])
        file_size_limit(30_000)  # the second line is cut short
        with pytest.raises(OSError):
            sink(big[1])
        file_size_limit(None)
        sink(after)
    # The line cut short is taken back: the event that failed is not in the file (a
    # buffered writer wrote its rest later, or left a torn line, which a reader chokes on).
    assert path.read_bytes().splitlines() == [encode_event(big[0]), encode_event(after)]


def test_jsonl_sink_never_writes_an_event_it_reported_failed(
    tmp_path: Path, file_size_limit: Callable[[int | None], None]
) -> None:
    """On a full disk the line stayed in the file object's buffer and was written by the
    next event's flush: counted failed, yet in the file (a retry would write it twice)."""
    path = tmp_path / "e.jsonl"
    events = [ps.InputRejected(loop_id=f"l{n}", reason="r") for n in range(3)]
    with JsonlSink(path) as sink:
        sink(events[0])
        file_size_limit(path.stat().st_size)  # the disk is full
        with pytest.raises(OSError):
            sink(events[1])
        file_size_limit(None)  # space comes back
        sink(events[2])
    assert path.read_bytes().splitlines() == [encode_event(events[0]), encode_event(events[2])]


def test_queue_sink_in_the_loop_and_from_other_threads() -> None:
    async def main() -> list[Any]:
        queue: asyncio.Queue[ps.AgentEvent | None] = asyncio.Queue()
        sink = QueueSink(queue)
        event = ps.InputRejected(loop_id="l", reason="in loop")
        sink(event)
        assert queue.get_nowait() is event  # same thread: put at once
        thread = threading.Thread(
            target=lambda: [sink(ps.InputRejected(loop_id="l", reason=str(i))) for i in range(100)]
        )
        thread.start()
        thread.join()
        sink.close()
        items = []
        while True:
            item = await queue.get()
            items.append(item)
            if item is None:
                return items

    items = asyncio.run(main())
    assert [i.reason for i in items[:-1]] == [str(i) for i in range(100)] and items[-1] is None


def test_queue_sink_keeps_the_order_of_emission_across_threads() -> None:
    # A sync step in the loop's thread joining its tools' worker threads: their events
    # waited in the loop's callbacks while TurnEnd and AgentEnd were put at once, ahead
    # of them, and the tools' events became orphans.
    async def main() -> list[Any]:
        queue: asyncio.Queue[ps.AgentEvent | None] = asyncio.Queue()
        sink = QueueSink(queue)
        sink(ps.InputRejected(loop_id="l", reason="0"))
        worker = threading.Thread(target=lambda: sink(ps.InputRejected(loop_id="l", reason="1")))
        worker.start()
        worker.join()
        sink(ps.InputRejected(loop_id="l", reason="2"))  # the loop's thread again, the worker's still waiting
        sink(ps.InputRejected(loop_id="l", reason="3"))
        await asyncio.sleep(0)  # the waiting ones are put: direct puts again
        sink(ps.InputRejected(loop_id="l", reason="4"))
        assert queue.qsize() == 5
        sink.close()
        return [await queue.get() for _ in range(6)]

    items = asyncio.run(main())
    assert [item.reason for item in items[:-1]] == ["0", "1", "2", "3", "4"] and items[-1] is None


def test_events_sent_after_a_queue_sinks_close_are_counted_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run still going when its tracer closed: its events went behind the end-of-stream
    # marker, where no consumer reads, and nothing counted or logged them.
    async def main() -> tuple[Tracer, QueueSink, list[Any], int]:
        queue: asyncio.Queue[ps.AgentEvent | None] = asyncio.Queue()
        sink = QueueSink(queue)
        t = tracer(sink)
        loop = t.loop().start()
        t.close()
        with loop.turn() as turn, turn.assistant() as reply:
            reply.finish("late")
        worker = threading.Thread(target=loop.end)  # from another thread too
        worker.start()
        worker.join()
        await asyncio.sleep(0)
        items = [await queue.get(), await queue.get()]
        return t, sink, items, queue.qsize()

    with caplog.at_level(logging.ERROR, logger="phi_session.sinks"):
        t, sink, items, left = asyncio.run(main())
    assert isinstance(items[0], ps.AgentStart) and items[1] is None and left == 0
    assert t.sink_errors == {repr(sink): 5}  # TurnStart, MessageStart, MessageEnd, TurnEnd, AgentEnd
    [logged] = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "QueueSink is closed" in str(logged.exc_info[1])  # type: ignore[index]


def test_queue_sink_refuses_a_bounded_queue() -> None:
    with pytest.raises(ps.InvalidArgument, match="unbounded"):  # was a bare ValueError
        QueueSink(asyncio.Queue(maxsize=10))


def test_queue_sink_refuses_what_is_no_queue() -> None:
    """It raised AttributeError ('int' object has no attribute 'maxsize')."""
    with pytest.raises(TypeError, match=r"^queue must be an asyncio.Queue, not int$"):
        QueueSink(5)  # type: ignore[arg-type]


def test_queue_sink_outside_a_running_loop_needs_an_explicit_loop() -> None:
    # Binding to the first caller's loop would pick the agent's loop in another
    # thread, and the consumer would never see the events.
    with pytest.raises(RuntimeError, match="loop="):
        QueueSink(asyncio.Queue())


def test_a_queue_sink_refused_does_not_hold_its_queue_open() -> None:
    # Built in a thread with no running loop, refused, its error kept: it still counted
    # as open on the queue, so the other sink's close() put no end-of-stream marker.
    async def main() -> list[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        refused: list[BaseException] = []

        def build() -> None:
            try:
                QueueSink(queue)
            except RuntimeError as error:
                refused.append(error)

        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
        sink = QueueSink(queue)
        sink(("y",))  # type: ignore[arg-type]
        sink.close()
        await asyncio.sleep(0.01)
        assert refused
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(main()) == [("y",), None]


def test_queue_sink_with_an_explicit_loop_from_another_thread() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue: asyncio.Queue[ps.AgentEvent | None] = asyncio.Queue()
        sink = QueueSink(queue, loop=loop, wants_deltas=False)
        assert not sink.wants_deltas
        sink(ps.InputRejected(loop_id="l", reason="r"))
        sink.close()

        async def drain() -> list[Any]:
            return [await queue.get(), await queue.get()]

        first, last = loop.run_until_complete(drain())
        assert isinstance(first, ps.InputRejected) and last is None
    finally:
        loop.close()


def test_fan_out_close_closes_what_can_be_closed(caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    class Closable:
        def __call__(self, event: ps.AgentEvent) -> None: ...

        def close(self) -> None:
            closed.append("ok")

    class BadClose(Closable):
        def close(self) -> None:
            raise OSError("cannot close")

    with caplog.at_level(logging.ERROR), Tracer(sinks=[BadClose(), Closable(), print]):
        pass
    assert closed == ["ok"] and "closing sink" in caplog.text


def test_every_built_in_sink_implements_the_whole_sink_interface(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        sinks = [
            RecorderSink(SessionRecorder()),
            QueueSink(asyncio.Queue(), loop=loop),
            JsonlSink(tmp_path / "e.jsonl"),
        ]
        for sink in sinks:
            assert isinstance(sink, ps.Sink) and as_sink(sink) is sink
            sink.flush()
            sink.close()
    finally:
        loop.close()


def test_a_callable_becomes_a_sink_keeping_the_parts_it_has(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    class Partial:
        wants_deltas = False

        def __call__(self, event: ps.AgentEvent) -> None:
            calls.append("event")

        def flush(self) -> None:
            calls.append("flush")

    class FailingFlush(Partial):
        def flush(self) -> None:
            raise OSError("disk gone")

    partial = Partial()
    adapted = as_sink(partial)
    assert isinstance(adapted, CallableSink) and isinstance(adapted, ps.Sink)
    assert not adapted.wants_deltas and repr(adapted) == repr(partial)
    plain = as_sink(print)
    assert plain.wants_deltas
    plain.flush()  # a plain callable has nothing to flush or close
    plain.close()
    t = tracer(partial, FailingFlush())
    run_loop(t, turns=1)
    with caplog.at_level(logging.ERROR, logger="phi_session.sinks"):
        t.flush()  # never raises into the agent
    assert calls.count("flush") == 1 and "flushing sink" in caplog.text
    t.close()  # Partial has no close: nothing to call


def test_failing_components_of_equal_repr_are_reported_apart() -> None:
    # Keyed by repr: two sinks of one repr showed {...: 2} for four failures.
    class Equal(Boom):
        def __repr__(self) -> str:
            return "HttpSink('http://collector')"

    first, second = Equal(), Equal()
    t = tracer(first, second, lambda event: None)
    with t.loop():
        pass
    assert t.sink_errors == {"HttpSink('http://collector')": 2, "HttpSink('http://collector') #2": 2}
    assert sum(t.sink_errors.values()) == t.fanout.error_count == 4


def test_failures_are_counted_per_component_and_each_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    test_logger = logging.getLogger("phi_session.test_failures")
    quiet = FailureTally(test_logger, "part", "it is skipped", traceback=False)
    loud = FailureTally(test_logger, "part", "it is skipped", traceback=True)
    first, second = Boom(), Boom()
    with caplog.at_level(logging.DEBUG, logger="phi_session.test_failures"):
        for _ in range(3):
            quiet.record(first, ValueError("the secret"))
        quiet.record(second, KeyError("k"))
        loud.record(first, RuntimeError("boom"))
    assert quiet.counts == {repr(first): 3, repr(second): 1} and quiet.total == 4
    assert loud.counts == {repr(first): 1} and loud.total == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3  # once per component and tally
    assert [r.exc_info is not None for r in errors] == [False, False, True]
    assert "the secret" not in "".join(r.getMessage() for r in errors)
    assert sum(r.levelno == logging.DEBUG and r.exc_info is not None for r in caplog.records) == 2


def test_sink_and_processor_failures_share_one_accounting(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: ps.AgentEvent) -> ps.AgentEvent:
        raise ValueError("no")

    boom = Boom()
    t = Tracer(AgentSession(clock=FakeClock()), sinks=[boom], processors=[broken], config=SNAP)
    with caplog.at_level(logging.ERROR):
        run_loop(t, turns=1)
    assert t.sink_errors == {repr(boom): boom.calls} and t.processor_failures == {repr(broken): boom.calls}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(messages) == 2
    assert messages[0].startswith("processor ") and "failed with ValueError" in messages[0]
    assert messages[1].startswith("sink ") and "failed with RuntimeError" in messages[1]


def test_a_jsonl_sink_refuses_a_file_it_cannot_write_lines_of_bytes_to(tmp_path: Path) -> None:
    # A text-mode file refused every line (logged once): the run's file stayed empty.
    with open(tmp_path / "events.jsonl", "w") as text_file:
        with pytest.raises(TypeError, match="target must be a path or a binary file, not TextIOWrapper"):
            JsonlSink(text_file)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="target must be a path or a binary file, not int"):
        JsonlSink(5)  # type: ignore[arg-type]
    (tmp_path / "read.jsonl").write_bytes(b"")
    with open(tmp_path / "read.jsonl", "rb") as read_only:
        with pytest.raises(ps.InvalidArgument, match="not open for writing"):
            JsonlSink(read_only)
    closed = io.BytesIO()
    closed.close()
    with pytest.raises(ps.InvalidArgument, match="not open for writing"):
        JsonlSink(closed)


def test_a_jsonl_sink_refuses_fsync_for_a_file_without_a_descriptor(tmp_path: Path) -> None:
    # It wrote every line, then reported each event as a failed delivery (fileno() raised).
    with pytest.raises(ps.InvalidArgument, match="fsync=True needs a file with a descriptor"):
        JsonlSink(io.BytesIO(), fsync=True)
    with open(tmp_path / "events.jsonl", "wb") as file:
        t = tracer(JsonlSink(file, fsync=True))
        run_loop(t, turns=1)
        assert t.sink_errors == {}
    assert (tmp_path / "events.jsonl").read_bytes().count(b"\n") > 0


def test_sinks_refuse_what_they_cannot_deliver_to_at_once() -> None:
    with pytest.raises(TypeError, match=r"recorder must be a recorder \(with on_event\), not int"):
        RecorderSink(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="target must be callable, not int"):
        CallableSink(5)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(TypeError, match=r"queue must be an asyncio\.Queue, not list"):
            QueueSink([], loop=loop)  # type: ignore[arg-type]
        with pytest.raises(ps.InvalidArgument, match="unbounded"):
            QueueSink(asyncio.Queue(maxsize=1), loop=loop)
    finally:
        loop.close()
