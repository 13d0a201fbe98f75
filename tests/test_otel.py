"""OpenTelemetry GenAI export and ingest, on every demo session."""

from __future__ import annotations

import gc
import logging
import math
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import pytest
from msgspec.structs import replace

pytest.importorskip("opentelemetry.sdk.trace", reason="needs the otel extra: pip install 'phi-session[otel]'")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from phi_session import (
    AgentSession,
    LoopConfigSnapshot,
    SessionRecorder,
    Timestamp,
    Tracer,
    decode_session,
    encode_session,
)
from phi_session import persist as persist_module
from phi_session.demo import run_demo
from phi_session.errors import ExportError, InvalidArgument
from phi_session.events import (
    COMPACTION,
    AgentEnd,
    AgentEvent,
    AgentStart,
    CompactionEnded,
    CompactionStarted,
    MessageEnd,
    ParallelLoopEnd,
    ParallelLoopStart,
    PrunApplied,
    ToolExecutionEnd,
    TurnEnd,
    TurnStart,
)
from phi_session.messages import ZERO_USAGE, AssistantMessage, TextContent, ToolCall, Usage, UserMessage
from phi_session.model import ParallelGroupRecord, Session
from phi_session.otel import IngestSpanProcessor, OtelExportSink, SpanIngestor, export_session, ingest_otlp
from phi_session.otel import attributes as attr
from phi_session.otel import ingest as ingest_module
from phi_session.otel.export import loop_span_id, session_spans, tool_span_id, turn_span_id
from phi_session.otel.ingest import LOSSES
from phi_session.otel.spans import SpanData, SpanEvent, spans_from_sdk
from phi_session.stores.json_dir import JsonDirStore

from .otel_support import services_calling_a_sub_agent, tool_loop_events, tool_loop_session
from .test_model import chain_of
from .test_recorder import assistant


@pytest.fixture(scope="module")
def demo_sessions(tmp_path_factory: pytest.TempPathFactory) -> list[Session]:
    return run_demo(JsonDirStore(tmp_path_factory.mktemp("demo")))


def _export(sessions: list[Session], *, capture_content: bool = False) -> list:
    exporter = InMemorySpanExporter()
    for session in sessions:
        export_session(session, exporter, capture_content=capture_content)
    return list(exporter.get_finished_spans())


def _by_id(spans: list) -> dict:
    return {span.context.span_id: span for span in spans}


def test_import_phi_session_imports_no_opentelemetry() -> None:
    code = (
        "import sys, phi_session, phi_session.otel; print([m for m in sys.modules if 'opentelemetry' in m])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_extra_names_the_pip_install() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import phi_session.otel as otel\n"
        "try:\n    otel.export_session\nexcept ImportError as error:\n"
        "    print(type(error).__name__, error)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MissingExtra ") and "pip install 'phi-session[otel]'" in out


def test_every_loop_turn_and_tool_call_is_one_span(demo_sessions: list[Session]) -> None:
    spans = _export(demo_sessions)
    by_id = _by_id(spans)
    assert len(by_id) == len(spans)  # ids unique
    for session in demo_sessions:
        for record in session.loops:
            loop = by_id[loop_span_id(record.loop_id)]
            assert loop.name == f"invoke_agent {record.agent_id}"
            assert loop.kind is SpanKind.INTERNAL
            assert loop.attributes[attr.OPERATION_NAME] == "invoke_agent"
            assert loop.attributes[attr.CONVERSATION_ID] == session.session_id
            assert loop.attributes[attr.PHI_LOOP_ID] == record.loop_id
            assert loop.attributes[attr.PHI_CONTINUATION_KIND] == record.kind.kind
            assert loop.attributes[attr.USAGE_OUTPUT_TOKENS] == record.usage.output
            assert loop.attributes[attr.USAGE_INPUT_TOKENS] == (
                record.usage.input + record.usage.cache_read + record.usage.cache_write
            )
            assert loop.start_time == record.started_at.ns
            assert record.ended_at is not None and loop.end_time == record.ended_at.ns
            for turn in record.turns:
                chat = by_id[turn_span_id(record.loop_id, turn.index)]
                assert chat.kind is SpanKind.CLIENT
                assert chat.name == f"chat {record.config.model}"  # type: ignore[union-attr]
                assert chat.parent.span_id == loop.context.span_id
                assert chat.context.trace_id == loop.context.trace_id
                assert chat.attributes[attr.RESPONSE_FINISH_REASONS] == (turn.output_message.stop_reason,)
                assert chat.attributes[attr.USAGE_OUTPUT_TOKENS] == turn.usage.output
                for result in turn.tool_results:
                    tool = by_id[tool_span_id(record.loop_id, result.tool_call_id)]
                    assert tool.name == f"execute_tool {result.tool_name}"
                    assert tool.kind is SpanKind.INTERNAL
                    assert tool.parent.span_id == chat.context.span_id
                    assert tool.attributes[attr.TOOL_CALL_ID] == result.tool_call_id
                    assert (tool.status.status_code is StatusCode.ERROR) == result.is_error
            # No content unless asked for.
            assert not any(
                key in span.attributes
                for span in spans
                for key in (attr.PHI_EVENTS, attr.INPUT_MESSAGES, attr.TOOL_CALL_ARGUMENTS)
            )


def test_links_and_sub_agent_placement(demo_sessions: list[Session]) -> None:
    by_id = _by_id(_export(demo_sessions))
    kinds = set()
    for session in demo_sessions:
        for record in session.loops:
            span = by_id[loop_span_id(record.loop_id)]
            spawn = session.parent_spawn_ref
            if spawn is not None and record.parent_loop_id == spawn.parent_loop_id:
                tool = by_id[tool_span_id(spawn.parent_loop_id, spawn.tool_call_id)]
                assert span.parent.span_id == tool.context.span_id  # under the spawning tool call
                assert span.context.trace_id == tool.context.trace_id
                assert tool.attributes[attr.PHI_CHILD_LOOP_ID] == record.loop_id
                kinds.add("sub-agent")
                continue
            assert span.parent is None  # one trace per loop
            links = {link.context.span_id: link for link in span.links}
            if record.parent_loop_id not in (None, record.loop_id):
                link = links[loop_span_id(record.parent_loop_id)]
                assert link.attributes[attr.PHI_LINK_KIND] == "continuation"
                assert link.attributes[attr.PHI_CONTINUATION_KIND] == record.kind.kind
                kinds.add(record.kind.kind)
            group = record.parallel_group
            if group is not None:
                for sibling in group.all_loop_ids:
                    if sibling != record.loop_id:
                        link = links[loop_span_id(sibling)]
                        assert link.attributes[attr.PHI_LINK_KIND] == "parallel"
                        selected = sibling == group.selected_loop_id
                        assert link.attributes[attr.PHI_PARALLEL_SELECTED] == selected
                        kinds.add("parallel")
    assert kinds >= {"sub-agent", "Default", "Rerun", "Branch", "Compaction", "parallel"}


def test_a_session_is_exported_with_a_few_passes_over_its_loops() -> None:
    # Each loop looked up itself, its parent and every parallel sibling by a scan of the
    # loops: 20,000 chained loops took 6 s.
    session = chain_of(100)
    ids = tuple(record.loop_id for record in session.loops)
    for record in session.loops:
        record.parallel_group = ParallelGroupRecord(
            all_loop_ids=ids,
            selected_loop_id=ids[0],
            selected_config_index=0,
            evaluation_usage=ZERO_USAGE,
            is_selected=record.loop_id == ids[0],
        )
    session.loops.passes = 0  # type: ignore[attr-defined]
    spans = session_spans(session)
    assert sum(len(span.links) for span in spans) == 100 * 99 + 99  # siblings, continuations
    assert session.loops.passes <= 2  # type: ignore[attr-defined]


def test_span_events_and_content_capture(demo_sessions: list[Session]) -> None:
    plain = _export(demo_sessions)
    names = {event.name for span in plain for event in span.events}
    assert {
        attr.EVENT_COMPACTION_STARTED,
        attr.EVENT_COMPACTION_ENDED,
        attr.EVENT_INPUT_REJECTED,
        attr.EVENT_PROGRESS,
    } <= names
    assert all(
        "phi.text" not in event.attributes and "phi.reason" not in event.attributes
        for span in plain
        for event in span.events
    )
    captured = _export(demo_sessions, capture_content=True)
    chats = [span for span in captured if span.kind is SpanKind.CLIENT]
    first = msgspec.json.decode(chats[0].attributes[attr.OUTPUT_MESSAGES])
    assert first[0]["role"] == "assistant" and first[0]["parts"]
    tools = [span for span in captured if span.attributes[attr.OPERATION_NAME] == "execute_tool"]
    assert all(
        attr.TOOL_CALL_ARGUMENTS in span.attributes and attr.TOOL_CALL_RESULT in span.attributes
        for span in tools
    )


def test_finished_spans_end_at_their_loops_and_turns_ends() -> None:
    # Message times (ms, from another clock maybe) after the AgentEnd and TurnEnd pushed the
    # spans' ends past them, and ingest without content then ended the loop and turn late.
    late = 60_000  # ms: after the loop's end at 30 s
    events = tool_loop_events("L", [("c1", "t", {}, "ok")])
    events.insert(
        1, MessageEnd(loop_id="L", message=UserMessage(content=(TextContent(text="hi"),), timestamp=late))
    )
    events = [
        replace(event, message=replace(event.message, timestamp=late))
        if isinstance(event, (MessageEnd, TurnEnd)) and isinstance(event.message, AssistantMessage)
        else event
        for event in events
    ]
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    [record] = session.loops
    [turn] = record.turns
    spans = _by_id(session_spans(session))
    assert spans[loop_span_id("L")].end_time == record.ended_at.ns  # type: ignore[union-attr]
    assert spans[turn_span_id("L", 0)].end_time == turn.ended_at.ns
    [back] = _ingest(list(spans.values()))
    assert (back.loops[0].ended_at, back.loops[0].turns[0].ended_at) == (record.ended_at, turn.ended_at)


def test_tool_results_keep_their_times_and_order_from_a_clock_ahead_of_the_loops() -> None:
    # A message clock hours ahead of the events' (as in 44 of the golden recorder cases): every
    # tool span was cut to start and end at the loop's AgentEnd, so the ingest without content
    # rebuilt every result at that instant and, their starts equal, the calls out of order.
    ahead = 3_600_000  # ms: an hour after the loop's end at 30 s
    calls = [(call_id, "t", {}, "ok") for call_id in ("c3", "c1", "c2")]
    events = tool_loop_events("L", calls[:1])
    turn_end = events[5]
    assert type(turn_end) is TurnEnd
    reply = replace(
        turn_end.message,
        content=tuple(ToolCall(id=call_id, name="t", arguments={}) for call_id, *_ in calls),
        timestamp=ahead,
    )
    results = tuple(
        replace(turn_end.tool_results[0], tool_call_id=call_id, timestamp=ahead + 100 * (place + 1))
        for place, (call_id, *_) in enumerate(calls)
    )
    tools = [
        event
        for call_id, *_ in calls
        for event in (
            replace(events[3], tool_call_id=call_id),
            replace(events[4], tool_call_id=call_id),
        )
    ]
    events[2:6] = [
        MessageEnd(loop_id="L", message=reply),
        *tools,
        replace(turn_end, message=reply, tool_results=results),
    ]
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    # Spans come in any order (a batch holds them as they ended): their times order the calls.
    [back] = _ingest(session_spans(session)[::-1])
    assert [(m.tool_call_id, m.timestamp) for m in back.loops[0].turns[0].tool_results] == [
        (m.tool_call_id, m.timestamp) for m in results
    ]


def test_export_is_deterministic(demo_sessions: list[Session]) -> None:
    first = [span.to_json() for span in _export(demo_sessions, capture_content=True)]
    second = [span.to_json() for span in _export(demo_sessions, capture_content=True)]
    assert first == second


def _feed(sink: OtelExportSink, session: Session) -> None:
    for record in session.loops:
        for stored in record.events:
            sink(stored.event)


def _exported_ids(exporter: InMemorySpanExporter) -> set[int]:
    return {span.context.span_id for span in exporter.get_finished_spans()}


def test_sink_exports_each_session_as_it_completes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    sink = OtelExportSink(exporter)
    sessions = run_demo(JsonDirStore(tmp_path), sinks=[sink])
    assert sink.flush(timeout=10)
    assert sink.exported_sessions >= len(sessions)  # continuations may export as their own batches
    sink.close()
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(sessions)}


class _DownAtFirst(InMemorySpanExporter):
    """A backend that refuses its first exports (restarting), then takes everything.
    With `raising`, the exporter raises it instead of reporting FAILURE."""

    def __init__(self, refusals: int, raising: BaseException | None = None) -> None:
        super().__init__()
        self.refusals = refusals
        self.raising = raising

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.refusals:
            self.refusals -= 1
            if self.raising is not None:
                raise self.raising
            return SpanExportResult.FAILURE
        return super().export(spans)


class _Unanswered(InMemorySpanExporter):
    """A collector that does not answer until `answer` is set (at most `patience` seconds),
    as an exporter waits out its timeout on an unreachable one."""

    def __init__(self, patience: float = 5.0) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.patience = patience

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.answer.wait(self.patience)
        return super().export(spans)


def test_the_agent_never_waits_for_the_exporter(demo_sessions: list[Session]) -> None:
    # It waited out the exporter's timeout in the call with the session's AgentEnd.
    exporter = _Unanswered()
    sink = OtelExportSink(exporter)
    started = time.monotonic()
    _feed(sink, demo_sessions[0])
    assert time.monotonic() - started < 1
    assert sink.flush(timeout=0.05) is False  # still being exported
    exporter.answer.set()
    assert sink.flush(timeout=10)
    sink.close()
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:1])}


def test_a_loops_end_costs_the_agent_its_own_session_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each AgentEnd checkpointed the whole recorder on the agent's thread, a scan of every
    open session: 3.2 ms per loop with 80,000 sessions open."""
    exporter = InMemorySpanExporter()
    sink = OtelExportSink(exporter)
    session = tool_loop_session([("c1", "read", {}, "ok")])
    for index in range(50):  # other agents' sessions, running
        sink(tool_loop_events(f"o{index}.c.1", [], session_id=f"o{index}")[0])
    checkpoints: list[str | None] = []
    full = sink.recorder.checkpoint

    def spied(*, loop_id: str | None = None) -> int:
        if threading.current_thread() is threading.main_thread():  # not the worker's idle ones
            checkpoints.append(loop_id)
        return full(loop_id=loop_id)

    monkeypatch.setattr(sink.recorder, "checkpoint", spied)
    _feed(sink, session)
    assert checkpoints == ["L"]  # its AgentEnd looks at its own session
    assert sink.flush(timeout=10)
    assert _exported_ids(exporter) == {span.context.span_id for span in _export([session])}
    sink.close()


def test_a_transient_export_failure_is_retried_off_the_agents_path(tmp_path: Path) -> None:
    exporter = _DownAtFirst(refusals=2)
    sink = OtelExportSink(exporter)
    sessions = run_demo(JsonDirStore(tmp_path), sinks=[sink])
    assert sink.flush(timeout=10)  # the worker tried again, and the exporter took them
    sink.close()
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(sessions)}


def test_flush_keeps_to_its_timeout_behind_a_lagging_exporter(demo_sessions: list[Session]) -> None:
    """flush(0.1) returned after 5.98 s: it handed the finished sessions over first, waiting
    with no time limit for room behind an exporter that lagged."""
    exporter = _Unanswered(patience=3)
    sink = OtelExportSink(exporter, max_pending_bytes=1)
    _feed(sink, demo_sessions[0])  # being exported, the collector not answering
    producer = threading.Thread(target=_feed, args=(sink, demo_sessions[1]))
    producer.start()  # blocked by the backpressure: no room behind the first
    for _ in range(100):
        if sink._worker.stats()["sessions_waiting"]:
            break
        time.sleep(0.02)
    started = time.monotonic()
    assert sink.flush(0.1) is False
    assert time.monotonic() - started < 1
    exporter.answer.set()
    producer.join()
    assert sink.flush(10)
    sink.close()
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:2])}


def test_export_errors_reach_flush_and_close_never_the_agent(demo_sessions: list[Session]) -> None:
    with pytest.raises(ExportError, match="collector down"):
        export_session(demo_sessions[0], _DownAtFirst(1, ConnectionRefusedError("collector down")))
    exporter = _DownAtFirst(10**6, ConnectionRefusedError("collector down"))
    sink = OtelExportSink(exporter, retry_for=0)
    _feed(sink, demo_sessions[0])  # raised ExportError into the agent's event path
    with pytest.raises(ExportError, match="did not take 1 sessions"):
        sink.flush(timeout=10)
    assert {s.session_id for s in sink.failed_sessions()} == {demo_sessions[0].session_id}
    with pytest.raises(ExportError):
        sink.close()  # kept, not dropped: the next close sends it
    exporter.refusals = 0
    sink.close()
    assert sink.failed_sessions() == []
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:1])}


def test_a_retry_for_longer_than_a_float_holds_exports_after_a_failure(demo_sessions: list[Session]) -> None:
    """retry_for=10**400 was kept as the int: the first failed export's deadline raised
    OverflowError in the worker and close's (retry_for + CLOSE_GRACE) in close."""
    exporter = _DownAtFirst(2, ConnectionRefusedError("collector down"))
    sink = OtelExportSink(exporter, retry_for=10**400)
    _feed(sink, demo_sessions[0])
    sink.close()
    assert sink.failed_sessions() == []
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:1])}


def test_sessions_a_failed_close_kept_are_exported_by_a_later_close_or_flush(
    demo_sessions: list[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the deadline the first close() set (retry_for plus a second), the collector back,
    a later close() or flush() tried none of the kept sessions: they were never exported."""
    monkeypatch.setattr(persist_module, "CLOSE_GRACE", 0.0)  # the deadline passes at once
    for again in ("close", "flush"):
        exporter = _DownAtFirst(10**6)
        sink = OtelExportSink(exporter, retry_for=0)
        _feed(sink, demo_sessions[0])
        with pytest.raises(ExportError):
            sink.close()
        exporter.refusals = 0  # the collector is back
        assert getattr(sink, again)() in (None, True)
        assert sink.failed_sessions() == []
        assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:1])}


class _Dead(InMemorySpanExporter):
    """A collector that never takes a batch, each attempt waiting out `patience` seconds."""

    def __init__(self, patience: float) -> None:
        super().__init__()
        self.patience = patience
        self.attempts = 0
        self.down = True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.down:
            return super().export(spans)
        self.attempts += 1
        time.sleep(self.patience)
        return SpanExportResult.FAILURE


def test_flush_and_a_later_close_keep_to_their_time_on_a_dead_exporter() -> None:
    """With the exporter dead, flush(0.1) gave every kept session a full attempt (12 sessions:
    6 s), and so did a second close (12 attempts, 6 s): neither had a time bound."""
    from phi_session import AgentSession, LoopConfigSnapshot, Tracer

    exporter = _Dead(patience=0.2)
    sink = OtelExportSink(exporter, retry_for=0)
    config = LoopConfigSnapshot(model="m", provider="p")
    for _ in range(12):
        with Tracer(AgentSession(), sinks=[sink], config=config).loop() as loop:
            loop.user("x")
    for _ in range(200):
        if len(sink.failed_sessions()) == 12:
            break
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(ExportError, match="12 sessions"):  # kept, not dropped, and said so
        sink.flush(0.1)
    assert time.monotonic() - started < 0.8  # the attempt under way finishes
    assert len(sink.failed_sessions()) == 12
    with pytest.raises(ExportError):
        sink.close()  # bounded by retry_for and a second, as it was
    attempts, started = exporter.attempts, time.monotonic()
    with pytest.raises(ExportError, match="12 sessions"):
        sink.close()
    assert time.monotonic() - started < 1.8  # retry_for and a second, and the attempt under way
    assert exporter.attempts - attempts < 12
    assert len(sink.failed_sessions()) == 12
    exporter.down = False  # back: the next close exports them all
    sink.close()
    assert sink.failed_sessions() == []
    assert len({span.context.trace_id for span in exporter.get_finished_spans()}) == 12


def test_a_sub_agent_whose_spawner_another_sink_records_is_not_held_for_its_tool_call() -> None:
    """The sink held every sub-agent exported before its tool call was named, whole, for the
    amendment naming it (up to 1,000 sessions, no byte bound): one whose spawner another sink
    records (an adapter's ``sub_agent(tracer=...)``) never gets it here, and stayed held
    (300 spawns: 32.5 MB held, 1.6 MB before)."""
    from phi_session import AgentSession, LoopConfigSnapshot, Tracer, Usage

    config = LoopConfigSnapshot(model="m", provider="p")
    usage = Usage(input=1, output=1, total_tokens=2)
    big = "y" * 300_000  # the sub-agents' texts dwarf what the spans and caches hold (~2 MB)
    spawners, recording = InMemorySpanExporter(), InMemorySpanExporter()
    spawner_sink, sink = OtelExportSink(spawners), OtelExportSink(recording)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(30):
            other = Tracer(sinks=[sink], config=config)
            with Tracer(AgentSession(), sinks=[spawner_sink], config=config).loop() as loop:
                loop.user("go")
                with loop.turn() as turn:
                    with turn.assistant() as reply:
                        call = ToolCall(id=f"c{i}", name="research", arguments={})
                        reply.finish(tool_calls=[call], usage=usage)
                    with turn.tool(turn.tool_calls[0]) as tool:
                        with tool.sub_agent(tracer=other) as sub:
                            sub.user(big + str(i))
                            with sub.turn() as sub_turn, sub_turn.assistant() as sub_reply:
                                sub_reply.text_delta(big)
                                sub_reply.finish(usage=usage)
                        tool.result("ok")
        assert sink.flush(10) and spawner_sink.flush(10)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 6_000_000  # 30 sub-agents of 600 kB held: 18 MB
    sink.close()
    spawner_sink.close()
    assert len({span.context.trace_id for span in recording.get_finished_spans()}) == 30  # all exported


def test_flush_checks_its_timeout_and_waits_forever_for_an_infinite_one(demo_sessions: list[Session]) -> None:
    """flush(inf) raised OverflowError, flush("5") a bare TypeError of an addition, and
    flush(True) waited a second; flush(1e10) and flush(10**400) raised OverflowError."""
    exporter = _Unanswered(patience=0.2)
    sink = OtelExportSink(exporter)
    _feed(sink, demo_sessions[0])
    wrongs = (("5", TypeError), (True, TypeError), (math.nan, InvalidArgument))
    for wrong, error in wrongs:
        with pytest.raises(error, match="timeout"):
            sink.flush(wrong)  # type: ignore[arg-type]
    assert sink.flush(math.inf) is True
    # past what a thread can wait (threading.TIMEOUT_MAX), or float() holds: OverflowError
    for endless in (1e10, sys.float_info.max, 10**400):
        assert sink.flush(endless) is True
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:1])}
    sink.close()


def test_spans_are_of_the_service_the_environment_names(
    demo_sessions: list[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default resource's service.name was always phi-session: OTEL_SERVICE_NAME was ignored."""
    from phi_session.otel import export as export_module

    def service() -> object:
        monkeypatch.setattr(export_module, "_default_resource", None)
        return _export(demo_sessions[:1])[0].resource.attributes["service.name"]

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service() == "phi-session"  # the SDK would say unknown_service
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert service() == "from-attributes"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-agent")
    assert service() == "billing-agent"


def test_the_loops_request_settings_are_on_its_chat_and_loop_spans() -> None:
    """gen_ai.request.max_tokens and gen_ai.request.temperature were never written, though
    the loop's config has them; a temperature reads as written (0.2, not its 32-bit expansion)."""
    from phi_session import LoopConfigSnapshot, Tracer, Usage

    def requested(config: LoopConfigSnapshot) -> dict[str, list[tuple[object, object]]]:
        recorder = SessionRecorder()
        with Tracer(sinks=[recorder], config=config).loop() as loop:
            loop.user("hi")
            with loop.turn() as turn, turn.assistant() as reply:
                reply.text_delta("x")
                reply.finish(usage=Usage(input=1, output=1, total_tokens=2))
        recorder.flush()
        found: dict[str, list[tuple[object, object]]] = {}
        for span in _export(recorder.drain_completed()):
            attributes = span.attributes or {}
            found.setdefault(span.name.split()[0], []).append(
                (attributes.get(attr.REQUEST_MAX_TOKENS), attributes.get(attr.REQUEST_TEMPERATURE))
            )
        return found

    settings = LoopConfigSnapshot(model="m", provider="openai", max_tokens=512, temperature=0.2)
    assert requested(settings) == {"chat": [(512, 0.2)], "invoke_agent": [(512, 0.2)]}
    unset = LoopConfigSnapshot(model="m", provider="openai")
    assert requested(unset) == {"chat": [(None, None)], "invoke_agent": [(None, None)]}


def _latest(exporter: InMemorySpanExporter) -> dict[int, ReadableSpan]:
    """The spans a backend ends up with: a span exported again replaces the earlier."""
    return {span.context.span_id: span for span in exporter.get_finished_spans()}


def test_flush_waits_for_a_parallel_groups_selection_to_be_exported() -> None:
    """Only a loop's AgentEnd had its session exported: flush() right after a parallel
    group's selection returned True with the branches exported without it."""
    from phi_session import LoopConfigSnapshot, Tracer, Usage

    first, second = LoopConfigSnapshot(model="a", provider="p"), LoopConfigSnapshot(model="b", provider="p")
    exporter = InMemorySpanExporter()
    sink = OtelExportSink(exporter)
    tracer = Tracer(sinks=[sink], config=first)
    with tracer.parallel([first, second]) as group:
        for index in range(2):
            with group.branch(index) as branch:
                branch.user("q")
                with branch.turn() as turn, turn.assistant() as reply:
                    reply.text_delta("answer")
                    reply.finish(usage=Usage(input=1, output=1, total_tokens=2))
        group.select(0)
    assert sink.flush(10)
    loops = [span for span in _latest(exporter).values() if span.name.startswith("invoke_agent")]
    assert sorted((span.attributes or {}).get(attr.PHI_PARALLEL_SELECTED) for span in loops) == [False, True]
    sink.close()


def test_a_sub_agent_exported_before_its_tool_call_ended_is_sent_again_under_the_tool_span() -> None:
    """A sub-agent's session ends, and is exported, before its spawner's ToolExecutionEnd
    names the tool call: its loop span stayed under the spawner's loop span, as the
    amendment naming the call holds no loops, where export_session puts it under the tool span."""
    from phi_session import LoopConfigSnapshot, Tracer, Usage

    exporter = InMemorySpanExporter()
    sink, recorder = OtelExportSink(exporter), SessionRecorder()
    tracer = Tracer(sinks=[sink, recorder], config=LoopConfigSnapshot(model="m", provider="p"))
    with tracer.loop() as loop:
        loop.user("research this")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                reply.finish(tool_calls=[ToolCall(id="call-1", name="research", arguments={})])
            with turn.tool(turn.tool_calls[0]) as tool:
                with tool.sub_agent() as sub:
                    sub.user("x")
                    with sub.turn() as sub_turn, sub_turn.assistant() as sub_reply:
                        sub_reply.text_delta("found")
                        sub_reply.finish(usage=Usage(input=1, output=1, total_tokens=2))
                assert sink.flush(10)  # exported before the tool call ends
                tool.result("found")
    tracer.close()
    assert sink.flush(10)
    recorder.flush()
    expected = _by_id(_export(recorder.drain_completed()))
    exported = _latest(exporter)
    assert {i: (s.parent and s.parent.span_id, s.context.trace_id) for i, s in exported.items()} == {
        i: (s.parent and s.parent.span_id, s.context.trace_id) for i, s in expected.items()
    }
    sink.close()


def test_a_full_backlog_blocks_the_producer_rather_than_dropping(
    demo_sessions: list[Session], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = _Unanswered()
    sink = OtelExportSink(exporter, max_pending_bytes=1)  # one session waits at a time
    producer = threading.Thread(target=lambda: [_feed(sink, s) for s in demo_sessions[:3]])
    with caplog.at_level(logging.WARNING, logger="phi_session.persist"):
        producer.start()
        producer.join(0.5)
        assert producer.is_alive()  # blocked: the exporter has not taken the first session yet
        exporter.answer.set()
        producer.join(10)
    assert not producer.is_alive()
    assert "blocking the producer" in caplog.text
    sink.close()
    assert _exported_ids(exporter) == {span.context.span_id for span in _export(demo_sessions[:3])}


def test_sessions_in_flight_are_exported_at_interpreter_exit(tmp_path: Path) -> None:
    script = f"""
import time
from opentelemetry.sdk.trace.export import SpanExportResult, SpanExporter
from phi_session.demo import run_demo
from phi_session.otel import OtelExportSink
from phi_session.stores.json_dir import JsonDirStore

class Slow(SpanExporter):
    def export(self, spans):
        time.sleep(0.2)
        print(*[span.context.span_id for span in spans], flush=True)
        return SpanExportResult.SUCCESS

run_demo(JsonDirStore({str(tmp_path)!r}), sinks=[OtelExportSink(Slow())])
"""  # never flushed nor closed
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    exported = {int(span_id) for span_id in done.stdout.split()}
    store = JsonDirStore(tmp_path)
    assert exported == {span.context.span_id for span in _export([store.load(i) for i in store.list_ids()])}


def test_a_first_export_at_interpreter_exit_is_made(tmp_path: Path) -> None:
    # The loop is left open: nothing is exported before the exit hook closes the sink, so
    # the default resource is not made by an earlier export (its detectors start a thread
    # pool, which interpreter shutdown refuses).
    names = tmp_path / "names"
    script = f"""
from opentelemetry.sdk.trace.export import SpanExportResult, SpanExporter
from phi_session import AgentStart, Timestamp
from phi_session.otel import OtelExportSink

class Names(SpanExporter):
    def export(self, spans):
        with open({str(names)!r}, "a") as out:
            out.writelines(span.name + "\\n" for span in spans)
        return SpanExportResult.SUCCESS

sink = OtelExportSink(Names())
start = Timestamp.parse("2025-06-01T09:00:00Z")
sink(AgentStart(agent_id="a", session_id="s", loop_id="s.p.m.1", timestamp=start))
"""  # never flushed nor closed
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr, done.stderr
    assert names.read_text().split("\n") == ["invoke_agent a", ""]


def _ingest(spans: list) -> list[Session]:
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add(spans_from_sdk(span) for span in spans)
    ingestor.flush()
    recorder.flush()
    return sorted(recorder.drain_completed(), key=lambda s: s.created_at)


def test_round_trip_with_content_is_lossless(demo_sessions: list[Session]) -> None:
    back = _ingest(_export(demo_sessions, capture_content=True))
    assert [encode_session(s) for s in back] == [encode_session(s) for s in demo_sessions]


def _cached_session() -> Session:
    """Two calls of a 1000-token prompt of which 400 were read from the cache: as phi-core's
    OpenAI-compatible provider records one (the cache inside ``input``, total = prompt +
    completion), then as its Anthropic provider does (the cache apart, no total)."""
    from phi_session import AgentSession, LoopConfigSnapshot, Tracer, Usage
    from phi_session.identity import FakeClock

    recorder = SessionRecorder()
    config = LoopConfigSnapshot(model="gpt-4o", provider="openai")
    tracer = Tracer(
        AgentSession(clock=FakeClock("2025-06-01T09:00:00Z", tick=0.5)), sinks=[recorder], config=config
    )
    with tracer.loop() as loop:
        loop.user("hi")
        for usage in (
            Usage(input=1000, output=200, cache_read=400, total_tokens=1200),
            Usage(input=600, output=200, cache_read=400),
        ):
            with loop.turn() as turn, turn.assistant() as reply:
                reply.finish("ok", usage=usage)
    tracer.close()
    recorder.flush()
    return recorder.drain_completed()[0]


def test_input_tokens_count_a_cache_inside_input_once() -> None:
    # The OpenAI-compatible call was exported as 1400 input tokens (its cache counted twice),
    # the loop as 2400; ingested back it cost $0.005 instead of $0.004.
    from phi_session.cost import Pricer

    session = _cached_session()
    spans = _export([session])
    chats = sorted((span for span in spans if span.kind is SpanKind.CLIENT), key=lambda span: span.start_time)
    assert [chat.attributes[attr.USAGE_INPUT_TOKENS] for chat in chats] == [1000, 1000]
    assert [chat.attributes[attr.USAGE_CACHE_READ_TOKENS] for chat in chats] == [400, 400]
    [loop] = [span for span in spans if span.attributes[attr.OPERATION_NAME] == attr.OP_INVOKE_AGENT]
    assert loop.attributes[attr.USAGE_INPUT_TOKENS] == 2000
    pricer = Pricer({"openai/gpt-4o": {"input": 2.5, "output": 10, "cache_read": 1.25}}, use_table=False)
    [back] = _ingest(spans)
    assert pricer.session(back).usd == pytest.approx(pricer.session(session).usd) == pytest.approx(0.008)


def _turn_shape(session: Session) -> list:
    return [
        (
            r.loop_id,
            r.agent_id,
            r.parent_loop_id,
            r.kind,
            r.status,
            r.started_at,
            r.ended_at,
            r.config,
            r.parallel_group,
            r.children_loop_ids,
            r.child_loop_refs,
            [
                (
                    t.turn_id,
                    t.triggered_by,
                    t.usage.output,
                    t.started_at,
                    t.ended_at,
                    [(m.tool_call_id, m.tool_name, m.is_error) for m in t.tool_results],
                )
                for t in r.turns
            ],
        )
        for r in session.loops
    ]


def test_round_trip_without_content_keeps_the_structure(demo_sessions: list[Session]) -> None:
    back = _ingest(_export(demo_sessions))
    assert [s.session_id for s in back] == [s.session_id for s in demo_sessions]
    for got, want in zip(back, demo_sessions, strict=True):
        assert got.parent_spawn_ref == want.parent_spawn_ref
        assert _turn_shape(got) == _turn_shape(want)
        # The stated losses: messages, tool arguments/results, metadata, formation.
        assert all(not record.messages for record in got.loops)
        assert "messages" in LOSSES["phi-session export without content"][0]


def _with_span_events() -> Session:
    """`tool_loop_session` of two calls with a prun within turn 0 (on its chat span) and a
    compaction between turns 0 and 1 (on the loop span)."""
    at = lambda seconds: Timestamp.from_ns(int(seconds * 10**9))  # noqa: E731
    events = tool_loop_events("L", [("c1", "t", {}, "ok"), ("c2", "t", {}, "ok")])
    events.insert(
        5,
        PrunApplied(
            loop_id="L", tokens_removed=50, messages_removed=2, pruned_timestamps=(3,), timestamp=at(4.5)
        ),
    )
    events[7:7] = [
        CompactionStarted(loop_id="L", estimated_tokens=900, message_count=12, timestamp=at(7)),
        CompactionEnded(
            loop_id="L",
            messages_before=12,
            messages_after=3,
            estimated_tokens_before=900,
            estimated_tokens_after=200,
            loops_compacted=1,
            timestamp=at(7),  # of one time: kept in order
        ),
    ]
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    return session


def test_span_events_come_back_in_place_without_content() -> None:
    want = _with_span_events()
    [got] = _ingest(_export([want]))
    shape = (AgentStart, TurnStart, ToolExecutionEnd, TurnEnd, AgentEnd, PrunApplied, CompactionStarted)
    kept = [
        event.event for event in want.loops[0].events if isinstance(event.event, (*shape, CompactionEnded))
    ]
    back = [
        event.event for event in got.loops[0].events if isinstance(event.event, (*shape, CompactionEnded))
    ]
    assert [type(event) for event in back] == [type(event) for event in kept]
    spans = (PrunApplied, CompactionStarted, CompactionEnded)
    assert [e for e in back if isinstance(e, spans)] == [e for e in kept if isinstance(e, spans)]


def test_a_span_event_that_cannot_be_rebuilt_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    agent = _span(1, None, "invoke_agent a", 0, 100, **{attr.OPERATION_NAME: attr.OP_INVOKE_AGENT})
    agent = replace(
        agent, events=[SpanEvent(attr.EVENT_COMPACTION_STARTED, 10, {"phi.estimated_tokens": "many"})]
    )
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    with caplog.at_level(logging.WARNING, logger="phi_session.otel.ingest"):
        ingestor.add([agent])
    assert ingestor.counters["unreadable_span_events"] == 1
    assert attr.EVENT_COMPACTION_STARTED in caplog.text


def test_span_processor_records_in_process(demo_sessions: list[Session]) -> None:
    recorder = SessionRecorder()
    provider = TracerProvider()
    provider.add_span_processor(IngestSpanProcessor(recorder))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        "invoke_agent helper",
        attributes={
            attr.OPERATION_NAME: "invoke_agent",
            attr.AGENT_NAME: "helper",
            attr.CONVERSATION_ID: "conv-1",
        },
    ):
        with tracer.start_as_current_span(
            "chat gpt-x",
            kind=SpanKind.CLIENT,
            attributes={
                attr.OPERATION_NAME: "chat",
                attr.REQUEST_MODEL: "gpt-x",
                attr.PROVIDER_NAME: "openai",
                attr.USAGE_INPUT_TOKENS: 10,
                attr.USAGE_OUTPUT_TOKENS: 3,
                attr.RESPONSE_FINISH_REASONS: ("tool_calls",),
            },
        ):
            pass
        with tracer.start_as_current_span(
            "execute_tool search", attributes={attr.OPERATION_NAME: "execute_tool", attr.TOOL_NAME: "search"}
        ):
            pass
    provider.shutdown()
    recorder.flush()
    (session,) = recorder.drain_completed()
    assert session.session_id == "conv-1" and session.agent_id == "helper"
    (record,) = session.loops
    assert record.status == "Completed" and record.config is not None and record.config.model == "gpt-x"
    (turn,) = record.turns
    assert turn.output_message.stop_reason == "toolUse" and turn.usage.input == 10
    (result,) = turn.tool_results
    assert result.tool_name == "search" and result.tool_call_id.startswith("otel-")
    assert record.metadata["otel"]["synthesized"] == ["loop_id", f"tool_call_id:{result.tool_call_id}"]


def test_a_trace_whose_root_never_ends_is_recorded_as_aborted_after_the_timeout() -> None:
    spans = [s for s in _export(run_demo_once(), capture_content=False) if s.parent is not None][:3]
    now = [0.0]
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder, trace_timeout=5, clock=lambda: now[0])
    ingestor.add(spans_from_sdk(span) for span in spans)
    assert ingestor.buffered_spans == 3
    now[0] = 6
    assert ingestor.expire() >= 1
    assert ingestor.buffered_spans == 0
    recorder.flush()
    sessions = recorder.drain_completed()
    assert sessions and all(record.status == "Aborted" for s in sessions for record in s.loops)


_ONCE: list[Session] = []


def run_demo_once() -> list[Session]:
    if not _ONCE:
        import tempfile

        _ONCE.extend(run_demo(JsonDirStore(tempfile.mkdtemp())))
    return _ONCE


def test_session_spans_rejects_non_sessions() -> None:
    with pytest.raises(TypeError):
        session_spans("nope")  # type: ignore[arg-type]


def test_the_exports_and_the_ingest_check_their_arguments() -> None:
    """Values of the wrong type were taken (and failed later, in the OTLP encoder, or as an
    `ExportError` or `AttributeError`), bad ones recorded with."""
    session, exporter = tool_loop_session([("c1", "read", {}, "ok")]), InMemorySpanExporter()
    wrong: list[tuple[Any, str]] = [
        (lambda: export_session(session, exporter, capture_content="no"), "capture_content must be bool"),
        (lambda: export_session(session, exporter, resource="x"), "resource must be Resource or None"),
        (lambda: export_session(session, None), "exporter must be a SpanExporter, not NoneType"),
        (lambda: session_spans(session, first_ordinals={"L": "a"}), "first_ordinals\\['L'\\] must be int"),
        (lambda: session_spans(session, first_ordinals={1: 0}), "first_ordinals keys must be str"),
        (lambda: SpanIngestor(print, max_buffered_spans=1.5), "max_buffered_spans must be int"),
        (lambda: SpanIngestor(print, max_buffered_bytes="1"), "max_buffered_bytes must be int"),
        (lambda: SpanIngestor(print, store="s.db"), "store must be SessionStore or None"),
        (lambda: SpanIngestor(print, trace_timeout="1"), "trace_timeout must be a number of seconds"),
        (lambda: SpanIngestor(print, clock=1), "clock must be callable"),
        (lambda: ingest_otlp(b"{}", None, SpanIngestor(print)), "content_type must be str"),
        (lambda: ingest_otlp("{}", "application/json", SpanIngestor(print)), "payload must be bytes"),
        (lambda: ingest_otlp(b"{}", "application/json", None), "ingestor must be SpanIngestor"),
        (lambda: SpanIngestor(print).add([1]), "spans\\[0\\] must be SpanData, not int"),
    ]
    for call, message in wrong:
        with pytest.raises(TypeError, match=message):
            call()
    bad: list[tuple[Any, str]] = [
        (
            lambda: session_spans(session, first_ordinals={"L": -1}),
            "first_ordinals\\['L'\\]: expected a count",
        ),
        (
            lambda: SpanIngestor(print, trace_timeout=float("nan")),
            "trace_timeout must be a number of seconds > 0",
        ),
        (lambda: SpanIngestor(print, max_buffered_spans=0), "max_buffered_spans must be at least 1"),
        (lambda: SpanIngestor(print, max_buffered_bytes=0), "max_buffered_bytes must be at least 1"),
    ]
    for call, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            call()
    assert exporter.get_finished_spans() == ()  # nothing exported with a bad argument


def test_simple_span_processor_exports_to_in_memory_via_sdk() -> None:
    # The exporter is any SDK SpanExporter: a processor pipeline works too.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    export_session(run_demo_once()[0], exporter)
    assert exporter.get_finished_spans()


# -- a foreign producer: pydantic-ai's own instrumentation, offline with its TestModel -------------


class _OpenInferenceOnly(IngestSpanProcessor):
    """Ingests spans with the GenAI attributes removed: what a pure OpenInference producer sends."""

    def on_end(self, span: ReadableSpan) -> None:
        data = spans_from_sdk(span)
        assert data is not None
        data.attributes = {k: v for k, v in data.attributes.items() if not k.startswith("gen_ai.")}
        self.ingestor.add((data,))


@pytest.mark.parametrize("producer", ["pydantic-ai", "openinference"])
def test_pydantic_ai_spans_become_a_session(producer: str) -> None:
    pydantic_ai = pytest.importorskip("pydantic_ai", reason="needs pydantic-ai-slim")
    from pydantic_ai.models.instrumented import InstrumentationSettings
    from pydantic_ai.models.test import TestModel

    recorder = SessionRecorder()
    provider = TracerProvider()
    if producer == "openinference":
        processors = pytest.importorskip(
            "openinference.instrumentation.pydantic_ai",
            reason="needs openinference-instrumentation-pydantic-ai",
        )
        provider.add_span_processor(processors.OpenInferenceSpanProcessor())
        provider.add_span_processor(_OpenInferenceOnly(recorder))
    else:
        provider.add_span_processor(IngestSpanProcessor(recorder))
    agent = pydantic_ai.Agent(TestModel(), name="weather", system_prompt="Be brief.")
    agent.instrument = InstrumentationSettings(tracer_provider=provider, include_content=True)

    @agent.tool_plain
    def get_weather(city: str) -> str:
        return f"sunny in {city}"

    first = agent.run_sync("What's the weather in Paris?")
    agent.run_sync("And in Rome?", message_history=first.all_messages())
    provider.shutdown()
    recorder.flush()
    (session,) = recorder.drain_completed()  # one conversation id across both runs
    assert session.agent_id == "weather"
    one, two = session.loops
    assert (one.kind.kind, one.parent_loop_id) == ("Initial", None)
    assert (two.kind.kind, two.parent_loop_id) == ("Default", one.loop_id)  # inferred continuation
    assert one.config is not None and (one.config.model, one.config.provider) == ("test", "test")
    assert [turn.index for turn in one.turns] == [0, 1]
    call, reply = one.turns
    (result,) = call.tool_results
    assert (result.tool_name, result.tool_call_id) == ("get_weather", "pyd_ai_tool_call_id__get_weather")
    assert result.content[0].text == "sunny in a"  # type: ignore[union-attr]
    assert call.output_message.content[0].name == "get_weather"  # type: ignore[union-attr]
    assert call.input_messages[0].content[0].text == "What's the weather in Paris?"  # type: ignore[union-attr]
    assert reply.output_message.content[0].text == first.output  # type: ignore[union-attr]
    assert one.usage.input + one.usage.output == sum(t.usage.input + t.usage.output for t in one.turns) > 0
    assert two.turns[0].input_messages[0].content[0].text == "And in Rome?"  # type: ignore[union-attr]
    assert [type(m).__name__ for m in one.messages] == [
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
    ]
    assert one.metadata["otel"]["synthesized"] == ["loop_id"]  # tool call ids were the producer's own


def test_a_config_with_a_temperature_exports_and_comes_back() -> None:
    # Regression: Float32 temperatures are phi-core JSON, which plain msgspec cannot encode.
    from phi_session import AgentEnd, AgentStart, LoopConfigSnapshot, Timestamp, Usage

    config = LoopConfigSnapshot(model="m", provider="p", temperature=0.7)
    recorder = SessionRecorder()
    recorder.on_event(
        AgentStart(
            agent_id="a",
            session_id="s",
            loop_id="s.p.m.1",
            config_snapshot=config,
            timestamp=Timestamp.parse("2025-06-01T09:00:00Z"),
        )
    )
    recorder.on_event(
        AgentEnd(
            loop_id="s.p.m.1",
            messages=(),
            usage=Usage(input=1, output=2),
            timestamp=Timestamp.parse("2025-06-01T09:00:01Z"),
        )
    )
    recorder.flush()
    (session,) = recorder.drain_completed()
    for capture in (False, True):
        (span,) = _export([session], capture_content=capture)
        assert msgspec.json.decode(span.attributes[attr.PHI_CONFIG])["temperature"] == 0.7
        (back,) = _ingest([span])
        assert back.loops[0].config == config


def test_damaged_phi_attributes_fall_back_to_rebuilding_from_the_spans(demo_sessions: list[Session]) -> None:
    spans = [spans_from_sdk(span) for span in _export(demo_sessions[:1], capture_content=True)]
    for data, damage in zip(
        spans, ['[[0, {"type": "Nope"}]]', "not json", "[1, 2]", "{}"] * 100, strict=False
    ):
        assert data is not None
        data.attributes[attr.PHI_EVENTS] = damage
        data.attributes[attr.PHI_CONTINUATION_KIND] = "Bogus"
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add(span for span in spans if span is not None)
    ingestor.flush()
    recorder.flush()
    (session,) = recorder.drain_completed()
    assert [r.loop_id for r in session.loops] == [r.loop_id for r in demo_sessions[0].loops]
    assert [len(r.turns) for r in session.loops] == [len(r.turns) for r in demo_sessions[0].loops]


def test_openinference_openai_calls_become_loops_of_one_session() -> None:
    # Another framework and producer: OpenInference's instrumentation of the OpenAI SDK (no agent
    # span: each call is a loop).
    openai = pytest.importorskip("openai", reason="needs openai")
    httpx = pytest.importorskip("httpx2", reason="needs openai's httpx2")
    instrumentation = pytest.importorskip(
        "openinference.instrumentation.openai", reason="needs openinference-instrumentation-openai"
    )
    from openinference.instrumentation import using_session

    def reply(request: object) -> object:
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o-mini-2024",
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls",
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": "lookup", "arguments": '{"q": 1}'},
                                }
                            ],
                        },
                    }
                ],
            },
        )

    recorder = SessionRecorder()
    provider = TracerProvider()
    provider.add_span_processor(IngestSpanProcessor(recorder))
    instrumentor = instrumentation.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        client = openai.OpenAI(
            api_key="offline",
            base_url="http://127.0.0.1:9/v1",
            http_client=httpx.Client(transport=httpx.MockTransport(reply)),
        )
        with using_session("conv-7"):
            for prompt in ("Hi", "Again"):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
                )
    finally:
        instrumentor.uninstrument()
    provider.shutdown()
    recorder.flush()
    (session,) = recorder.drain_completed()
    assert session.session_id == "conv-7"
    one, two = session.loops
    assert (two.kind.kind, two.parent_loop_id) == ("Default", one.loop_id)
    for record, prompt in ((one, "Hi"), (two, "Again")):
        (turn,) = record.turns
        assert turn.input_messages[0].content[0].text == prompt  # type: ignore[union-attr]
        output = turn.output_message
        assert (output.model, output.provider, output.stop_reason) == (  # type: ignore[union-attr]
            "gpt-4o-mini-2024",
            "openai",
            "toolUse",
        )
        call = output.content[0]  # type: ignore[union-attr]
        assert (call.id, call.name, call.arguments) == ("call_1", "lookup", {"q": 1})
        assert (turn.usage.input, turn.usage.output) == (12, 3)


def _span_usage(span: ReadableSpan) -> tuple[int, ...]:
    names = (
        attr.USAGE_INPUT_TOKENS,
        attr.USAGE_OUTPUT_TOKENS,
        attr.USAGE_CACHE_READ_TOKENS,
        attr.USAGE_CACHE_WRITE_TOKENS,
        attr.USAGE_REASONING_TOKENS,
    )
    return tuple(int(span.attributes.get(name, 0)) for name in names)


def _total_usage(spans: list[ReadableSpan]) -> tuple[int, ...]:
    usages = [_span_usage(span) for span in spans]
    return tuple(sum(usage[field] for usage in usages) for field in range(5))


def test_a_cut_off_turn_is_exported_with_what_it_billed() -> None:
    """A stream cut after every event: the chat spans (the cut-off turn's marked
    unfinished) and the loop spans each add up to the tokens the MessageEnds reported,
    what the roll-ups bill, and so does the session ingested back from them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import workload  # lives in benchmarks/, not in the package

    from phi_session.stores.conformance import reported_usage

    lines = workload.lines(1)
    unfinished_seen = 0
    for cut in range(1, len(lines) + 1):
        if b'"type":"MessageUpdate"' in lines[cut - 1]:
            continue  # dropped unstored: the same session as the cut before it
        recorder = SessionRecorder()
        for line in lines[:cut]:
            recorder.on_json(line)
        recorder.flush()
        sessions = recorder.drain_completed()
        reported = reported_usage(lines[:cut])
        want = (
            reported.input + reported.cache_read + reported.cache_write,
            reported.output,
            reported.cache_read,
            reported.cache_write,
            reported.reasoning,
        )
        spans = _export(sessions)
        chats = [span for span in spans if span.kind is SpanKind.CLIENT]
        loops = [span for span in spans if span.attributes[attr.OPERATION_NAME] == attr.OP_INVOKE_AGENT]
        assert _total_usage(chats) == want, cut
        assert _total_usage(loops) == want, cut
        cut_off = [span for span in chats if span.attributes.get(attr.PHI_TURN_UNFINISHED)]
        if cut_off and any(_span_usage(span)[1] for span in cut_off):
            unfinished_seen += 1
            [span] = cut_off
            assert span.attributes[attr.RESPONSE_MODEL] == "claude-sonnet-4-5"
            assert span.name == "chat claude-sonnet-4-5"
        if cut % 5 == 0:  # ingested back (which closes the cut loop), it bills the same
            back = _ingest(_export(sessions, capture_content=True))
            assert sum((s.billed_usage() for s in back), ZERO_USAGE) == reported, cut
    assert unfinished_seen > 20


def test_a_cut_off_turn_and_a_call_that_never_ended_come_back_unfinished_without_content() -> None:
    # Cut off in turn 1 while its tool ran: no TurnEnd for that turn, no ToolExecutionEnd for that call.
    recorder = SessionRecorder()
    recorder.record_all(tool_loop_events("L", [("c1", "t", {}, "ok"), ("c2", "t", {}, "ok")])[:9])
    recorder.flush()
    [want] = recorder.drain_completed()
    [got] = _ingest(_export([want]))
    names = [type(e.event).__name__ for e in want.loops[0].events if type(e.event).__name__ != "MessageEnd"]
    assert [type(e.event).__name__ for e in got.loops[0].events] == [*names, "AgentEnd"]
    assert [(m.tool_call_id, m.is_error) for t in got.loops[0].turns for m in t.tool_results] == [
        ("c1", False)
    ]
    assert got.loops[0].status == "Aborted"


def test_a_replayed_turn_is_exported_marked_and_without_usage() -> None:
    """A replay's turns called no model: their chat spans carry no usage, so a backend
    summing the chat spans, or the loop spans, bills the original run once."""
    from phi_session import AgentSession, LoopConfigSnapshot, LoopScope, Tracer
    from phi_session.messages import AgentMessage, AssistantMessage, TextContent, Usage
    from phi_session.replay import RecordedModel, replay_lineage

    def live(messages: Sequence[AgentMessage]) -> AssistantMessage:
        usage = Usage(input=40, output=5, total_tokens=45)
        return AssistantMessage(
            content=(TextContent(text="hi"),),
            stop_reason="stop",
            model="m",
            provider="p",
            usage=usage,
            timestamp=0,
        )

    def agent(loop: LoopScope, model: Callable[[Sequence[AgentMessage]], AssistantMessage]) -> None:
        prompt = loop.user("hello")
        with loop.turn() as turn, turn.assistant() as reply:
            reply.finish(message=model([prompt]))

    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(), sinks=[recorder], config=LoopConfigSnapshot(model="m", provider="p"))
    with tracer.loop() as loop:
        agent(loop, live)
    recorder.flush()
    (original,) = recorder.drain_completed()
    replay = RecordedModel(original)
    with replay_lineage(replay.script).loop(tracer) as loop:
        agent(loop, replay.next)
    recorder.flush()
    (replayed,) = recorder.drain_completed()  # the replay's loop, in the original's session
    spans = _export([original, replayed])
    chats = [span for span in spans if span.kind is SpanKind.CLIENT]
    loops = [span for span in spans if span.attributes[attr.OPERATION_NAME] == attr.OP_INVOKE_AGENT]
    assert [bool(span.attributes.get(attr.PHI_TURN_REPLAYED)) for span in chats] == [False, True]
    assert _span_usage(chats[1]) == (0, 0, 0, 0, 0)
    assert _total_usage(chats) == _total_usage(loops) == (40, 5, 0, 0, 0)


def test_a_cut_off_fork_bills_the_same_after_a_round_trip() -> None:
    # A fork repeats a recorded turn (100 tokens, served), then calls the model (7), and is
    # cut off. Its loop span's usage counts what was billed (7), which ingest gave the
    # AgentEnd it makes up: the served turn was then taken out of it again (billed 0,
    # reported 7 instead of 7 and 107). It now gives the figure a loop's AgentEnd reports.
    # Cut off in the served turn itself, the served reply's usage was left out of that
    # figure, and the turn it was cut off in was not looked at for served replies once
    # ingest ended the loop: it came back reporting 0, not 100.
    from phi_session import AgentSession, FakeClock, LoopConfigSnapshot, Tracer
    from phi_session.events import TurnEnd
    from phi_session.messages import AssistantMessage, TextContent, ToolCall, Usage
    from phi_session.replay import RequestShape, fork

    def model(tokens: int) -> Callable[[RequestShape], AssistantMessage]:
        def reply(request: RequestShape) -> AssistantMessage:
            return AssistantMessage(
                content=(
                    TextContent(text="x"),
                    ToolCall(id=f"c{len(request.messages)}", name="t", arguments={}),
                ),
                stop_reason="toolUse",
                model="m",
                provider="p",
                usage=Usage(input=tokens, output=0, total_tokens=tokens),
                timestamp=0,
            )

        return reply

    clock, config = FakeClock(), LoopConfigSnapshot(model="m", provider="p")
    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(clock=clock), sinks=[recorder], config=config)
    with tracer.loop() as loop:
        context = [loop.user("go")]
        for _ in range(2):
            with loop.turn() as turn:
                with turn.assistant() as reply:
                    context.append(reply.finish(message=model(100)(RequestShape(messages=tuple(context)))))
                for call in turn.tool_calls:
                    with turn.tool(call) as tool:
                        tool.result("ok")
                context += turn.tool_results
    recorder.flush()
    [original] = recorder.drain_completed()
    events: list[AgentEvent] = []
    forked = Tracer(AgentSession(clock=clock), sinks=[events.append], config=config)
    fork(original, original.loops[0].loop_id, 1, model=model(7), tracer=forked, max_turns=2)
    served_turn_end = next(i for i, event in enumerate(events) if type(event) is TurnEnd)
    checked = cut_in_served = 0
    for cut in range(1, len(events)):
        recorder = SessionRecorder()
        recorder.record_all(events[:cut])
        recorder.flush()
        [session] = recorder.drain_completed()
        [cut_off] = session.loops
        if cut_off.ended_at is not None:
            continue
        [back] = _ingest(session_spans(session, capture_content=True))
        [ingested] = back.loops
        assert ingested.billed_usage() == cut_off.billed_usage(), cut
        assert ingested.reported_usage() == cut_off.reported_usage(), cut
        assert ingested.replayed_usage() == cut_off.replayed_usage(), cut
        checked += cut_off.billed_usage().input == 7 and cut_off.reported_usage().input == 107
        cut_in_served += cut <= served_turn_end and cut_off.reported_usage().input == 100
    assert checked > 0
    assert cut_in_served > 0


@pytest.mark.parametrize("name", [attr.CONVERSATION_ID, attr.PHI_SESSION_ID])
@pytest.mark.parametrize(
    "conversation",
    ["user/42", ".hidden", "..", "a\\b", "x" * 201, "support.ticket-7", "from undecodable bytes \udc80"],
)
def test_a_conversation_id_no_store_takes_is_a_session_a_store_takes(
    conversation: str, name: str, tmp_path: Path
) -> None:
    # As the adapters do with a framework's session id: its UUIDv5, the original kept. A
    # phi.session.id was taken as it came: its session went to the orphans, never the store.
    recorder = SessionRecorder()
    provider = TracerProvider()
    provider.add_span_processor(IngestSpanProcessor(recorder))
    tracer = provider.get_tracer("test")
    for _ in range(2):
        agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, name: conversation}
        with tracer.start_as_current_span("invoke_agent helper", attributes=agent):
            with tracer.start_as_current_span("chat m", attributes={attr.REQUEST_MODEL: "m"}):
                pass
    provider.shutdown()
    recorder.flush()
    [session] = recorder.drain_completed()
    store = JsonDirStore(tmp_path)
    store.save(session)
    assert store.list_ids() == [session.session_id]
    kept = conversation.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")  # JSON text
    assert [loop.metadata["otel"]["conversation_id"] for loop in session.loops] == [kept] * 2


def _retried_after_a_failure(payload: list[SpanData]) -> tuple[SessionRecorder, SpanIngestor]:
    """`payload` taken, recording its first event failing, then taken again (retried)."""
    recorder = SessionRecorder()
    failures = [OSError("the journal's disk is full")]

    def target(event: object) -> None:
        if failures:
            raise failures.pop()
        recorder.on_event(event)

    ingestor = SpanIngestor(target)
    with pytest.raises(OSError):
        ingestor.add(payload)
    ingestor.add(payload)  # the exporter retries the payload it got no 200 for
    return recorder, ingestor


def test_a_trace_whose_recording_failed_is_taken_again_when_retried(demo_sessions: list[Session]) -> None:
    session = demo_sessions[0]
    first = session.loops[0].loop_id
    spans = [
        spans_from_sdk(span)
        for span in _export([session], capture_content=True)
        if span.attributes and span.attributes.get(attr.PHI_LOOP_ID) == first
    ]
    recorder, _ = _retried_after_a_failure(spans)
    recorder.flush()
    [back] = recorder.drain_completed()
    assert back.get_loop(first).events == session.get_loop(first).events


def test_a_trace_failing_to_record_keeps_no_other_trace_of_its_payload_waiting() -> None:
    # Two bare model calls, two traces, one payload; recording the first fails. The second's
    # root had been seen: it waited for the trace timeout (its retried spans being
    # duplicates), then came back Aborted as if its trace had never ended.
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m", attr.CONVERSATION_ID: "c"}
    payload = [_span(trace, None, "chat m", trace, trace + 1, trace_id=trace, **chat) for trace in (1, 2)]
    recorder, ingestor = _retried_after_a_failure(payload)
    assert ingestor.buffered_spans == 0
    recorder.checkpoint()
    [session] = recorder.drain_completed()
    assert [loop.status for loop in session.loops] == ["Completed", "Completed"]
    # The loop that failed was no loop to continue: each had the other as its parent. (Nor is
    # one started later: the first, retried, continues none.)
    second, first = session.loops
    assert (second.parent_loop_id, first.parent_loop_id) == (None, None)


def test_a_loop_whose_rebuild_fails_midway_reaches_the_recorder_whole_or_not_at_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The ingest handed each event to the recorder as it rebuilt it: a value the recorder
    # refused midway (a count past u64 in its second turn) left the loop's first events in
    # it, saved as an Aborted loop without its turns, which the retried payload met open.
    session = tool_loop_session([("c1", "t", {}, "r1"), ("c2", "t", {}, "r2")])
    spans = [spans_from_sdk(span) for span in session_spans(session)]
    read_usage = ingest_module._usage

    def past_u64_in_the_second_turn(attributes: dict[str, Any]) -> Any:
        if attributes.get(attr.PHI_TURN_INDEX) == 1:
            return replace(ZERO_USAGE, output=2**64)
        return read_usage(attributes)

    monkeypatch.setattr(ingest_module, "_usage", past_u64_in_the_second_turn)
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    with pytest.raises(InvalidArgument):
        ingestor.add(spans)
    recorder.flush()
    assert recorder.drain_completed() == []
    monkeypatch.setattr(ingest_module, "_usage", read_usage)
    ingestor.add(spans)  # the exporter retries the payload it got no 200 for
    recorder.flush()
    [got] = recorder.drain_completed()
    assert encode_session(got) == encode_session(_ingest(session_spans(session))[0])


def test_a_failing_recorder_never_reaches_the_instrumented_code_nor_other_processors() -> None:
    def target(event: object) -> None:
        raise OSError("the journal's disk is full")

    exporter = InMemorySpanExporter()
    processor = IngestSpanProcessor(target)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # e.g. to a tracing backend
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        "invoke_agent helper", attributes={attr.OPERATION_NAME: "invoke_agent"}
    ):
        pass
    provider.shutdown()
    assert [span.name for span in exporter.get_finished_spans()] == ["invoke_agent helper"]
    assert processor.failures.total == 1


def test_span_ids_are_remembered_for_the_last_traces_recorded_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_module, "_RECORDED_MEMORY", 2)  # span ids, whatever their traces
    ingestor = SpanIngestor(lambda event: None)

    def root(trace: int) -> SpanData:
        agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT}
        return SpanData(
            trace_id=trace,
            span_id=1,
            parent_id=None,
            name="invoke_agent a",
            kind="INTERNAL",
            start=1,
            end=2,
            attributes=agent,
        )

    for trace in (1, 2, 3):
        ingestor.add([root(trace)])
    ingestor.add([root(3)])  # remembered: a duplicate
    ingestor.add([root(1)])  # forgotten: recorded again
    assert (ingestor.counters["duplicate_spans"], ingestor.counters["traces"]) == (1, 4)


class _Batches(InMemorySpanExporter):
    """Keeps each export call's spans apart."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[ReadableSpan]] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS


@pytest.mark.parametrize("capture_content", [True, False])
def test_sessions_amended_after_their_export_come_back_whole(tmp_path: Path, capture_content: bool) -> None:
    # The sink exports a session once its loops have ended: the demo's parallel branches
    # before their group ends. The group's end amends them, and they are exported again:
    # the same span ids, with the group's attributes and links. The ingest kept the first
    # version, so the groups were lost.
    exporter = _Batches()
    sink = OtelExportSink(exporter, capture_content=capture_content)
    originals = run_demo(JsonDirStore(tmp_path), sinks=[sink])
    sink.close()
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for batch in exporter.batches:
        ingestor.add(spans_from_sdk(span) for span in batch)
    ingestor.flush()
    recorder.flush()
    back = {session.session_id: session for session in recorder.drain_completed()}
    assert ingestor.counters["updated_spans"] > 0
    assert any(loop.parallel_group for session in originals for loop in session.loops)
    assert any(session.parent_spawn_ref for session in originals)
    for original in originals:
        session = back[original.session_id]
        if capture_content:
            assert encode_session(session) == encode_session(original)
        assert session.parent_spawn_ref == original.parent_spawn_ref
        assert [(loop.loop_id, loop.parallel_group) for loop in session.loops] == [
            (loop.loop_id, loop.parallel_group) for loop in original.loops
        ]


def test_a_newer_version_of_a_waiting_span_takes_its_place_and_a_copy_counts_once() -> None:
    spans = [spans_from_sdk(span) for span in session_spans(tool_loop_session([("c", "t", {}, "r")]))]
    tool = next(span for span in spans if span.name == "execute_tool t")
    failed = msgspec.structs.replace(tool, attributes={**tool.attributes, attr.PHI_TOOL_IS_ERROR: True})
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add([tool, tool, failed, failed])  # waits for its root
    ingestor.add(span for span in spans if span is not tool)
    recorder.flush()
    [session] = recorder.drain_completed()
    assert [message.is_error for message in session.loops[0].turns[0].tool_results] == [True]
    assert (ingestor.counters["duplicate_spans"], ingestor.counters["updated_spans"]) == (2, 1)


def test_a_span_under_a_remote_parent_is_its_traces_root() -> None:
    # A model call made while serving a request that came with a traceparent: the caller's
    # span is in another process. Waiting for it, the loop was recorded only after the
    # trace timeout, and Aborted as unfinished.
    recorder = SessionRecorder()
    provider = TracerProvider()
    provider.add_span_processor(IngestSpanProcessor(recorder))
    caller = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m", attr.USAGE_INPUT_TOKENS: 3}
    context = set_span_in_context(NonRecordingSpan(caller))
    with provider.get_tracer("test").start_as_current_span("chat m", context=context, attributes=chat):
        pass
    recorder.checkpoint()
    [session] = recorder.drain_completed()
    assert [loop.status for loop in session.loops] == ["Completed"]


def _span(
    span_id: int,
    parent_id: int | None,
    name: str,
    start: int,
    end: int,
    *,
    trace_id: int = 0xA1,
    **attributes: object,
) -> SpanData:
    return SpanData(
        trace_id=trace_id,
        span_id=span_id,
        kind="CLIENT",
        parent_id=parent_id,
        name=name,
        attributes=dict(attributes),
        start=start,
        end=end,
    )


def test_a_model_call_two_instrumentations_traced_is_one_turn_billed_once() -> None:
    # pydantic-ai's instrumentation with the OpenAI SDK's (or OpenInference's LangChain one with
    # its OpenAI one): the framework's chat span holds the SDK's chat span of the same call.
    # Each was a turn, and the loop without its own usage counted the tokens twice.
    agent = _span(1, None, "invoke_agent a", 0, 100, **{attr.OPERATION_NAME: attr.OP_INVOKE_AGENT})
    tokens = {attr.USAGE_INPUT_TOKENS: 10, attr.USAGE_OUTPUT_TOKENS: 5}
    outer = _span(2, 1, "chat m", 10, 50, **{attr.OPERATION_NAME: attr.OP_CHAT, **tokens})
    inner = _span(
        3,
        2,
        "chat m-2024",
        11,
        49,
        **{attr.OPERATION_NAME: attr.OP_CHAT, attr.RESPONSE_MODEL: "m-2024", **tokens},
    )
    second = _span(4, 1, "chat m", 60, 90, **{attr.OPERATION_NAME: attr.OP_CHAT, **tokens})
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add([inner, outer, second, agent])
    recorder.flush()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    assert [(turn.usage.input, turn.usage.output) for turn in loop.turns] == [(10, 5), (10, 5)]
    assert (loop.usage.input, loop.usage.output) == (20, 10)
    assert loop.turns[0].output_message.model == "m-2024"  # type: ignore[union-attr]  # what only the inner knew


def test_a_call_id_reused_in_a_later_turn_is_its_own_tool_span() -> None:
    # One span took both calls: under the first turn, from its start to the second's end,
    # with the second's arguments and result; the second turn had no tool span.
    # As providers that number their calls per response ("call_0") do.
    session = tool_loop_session([("call_0", "t", {"i": index}, f"r{index}") for index in (0, 1)])
    spans = session_spans(session, capture_content=True)
    tools = sorted((s for s in spans if s.name == "execute_tool t"), key=lambda s: s.start_time or 0)
    assert [(s.parent.span_id if s.parent else None) for s in tools] == [
        turn_span_id("L", 0),
        turn_span_id("L", 1),
    ]
    assert [s.attributes[attr.TOOL_CALL_ARGUMENTS] for s in tools] == ['{"i":0}', '{"i":1}']
    assert [(s.start_time, s.end_time) for s in tools] == [(2 * 10**9, 4 * 10**9), (12 * 10**9, 14 * 10**9)]
    assert len({s.context.span_id for s in spans}) == len(spans)
    assert [s.context.span_id for s in tools] == [tool_span_id("L", "call_0"), tool_span_id("L", "call_0", 1)]
    [back] = _ingest(session_spans(session))
    assert [len(turn.tool_results) for turn in back.loops[0].turns] == [1, 1]
    [back] = _ingest(spans)
    assert encode_session(back) == encode_session(session)


def test_a_turn_restarted_under_its_index_is_its_own_chat_span() -> None:
    # A TurnStart replaces an unfinished turn (a model call retried), and a later turn may
    # reuse an index: one chat span took every turn of an index, the last, so the earlier
    # ones' events and tool calls were lost in the round trip (2 turns and an attempt in, 1 out).
    events = tool_loop_events("L", [("c1", "t", {}, "r1"), ("c2", "t", {}, "r2")])
    events = [replace(event, turn_index=0) if type(event) is TurnStart else event for event in events]
    reply = events[2]
    assert type(reply) is MessageEnd
    cut = replace(reply.message, content=(TextContent(text="cut"),), stop_reason="error", timestamp=1000)
    events[1:1] = [
        TurnStart(loop_id="L", turn_index=0, timestamp=Timestamp.from_ns(10**9), triggered_by="User"),
        MessageEnd(loop_id="L", message=cut),
    ]
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    assert [turn.index for turn in session.loops[0].turns] == [0, 0]
    spans = session_spans(session, capture_content=True)
    chats = sorted((s for s in spans if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert [s.context.span_id for s in chats] == [turn_span_id("L", 0, repeat) for repeat in range(3)]
    assert [s.attributes.get(attr.PHI_TURN_UNFINISHED) for s in chats] == [True, None, None]
    tools = sorted((s for s in spans if s.name == "execute_tool t"), key=lambda s: s.start_time or 0)
    assert [s.parent.span_id for s in tools] == [turn_span_id("L", 0, 1), turn_span_id("L", 0, 2)]
    assert [s.end_time for s in tools] == [4 * 10**9, 14 * 10**9]
    [back] = _ingest(spans)
    assert encode_session(back) == encode_session(session)
    [back] = _ingest(session_spans(session))
    assert [[m.tool_call_id for m in turn.tool_results] for turn in back.loops[0].turns] == [["c1"], ["c2"]]


def test_a_retried_turn_leaves_the_later_turns_indices_without_content() -> None:
    # The attempt a retry replaced is a chat span of its own, and the ingest numbered turns by
    # their chat spans: the retry and every later turn came back one index up ([0, 1] -> [1, 2]).
    events = tool_loop_events("L", [("c1", "t", {}, "r1"), ("c2", "t", {}, "r2")])
    reply = events[2]
    assert type(reply) is MessageEnd
    events[1:1] = [
        TurnStart(loop_id="L", turn_index=0, timestamp=Timestamp.from_ns(11 * 10**8), triggered_by="User"),
        replace(reply, message=replace(reply.message, timestamp=1100)),
        *events[3:5],  # it ran the call its retry runs again
    ]
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    [back] = _ingest(session_spans(session))
    assert _turn_shape(back) == _turn_shape(session)
    starts = [
        (e.event.turn_index, e.event.timestamp) for e in back.loops[0].events if type(e.event) is TurnStart
    ]
    assert starts == [(e.turn_index, e.timestamp) for e in events if type(e) is TurnStart]


def _reused_ids_session() -> Session:
    """The session of `_reused_ids_events`."""
    recorder = SessionRecorder()
    recorder.record_all(_reused_ids_events())
    recorder.flush()
    [session] = recorder.drain_completed()
    return session


def _reused_ids_events() -> list[AgentEvent]:
    """Loops reusing ids, as phi-core's do: ``s.a.1``, its compaction pass (``s.a.1`` again),
    then two parallel evaluations of ``s.p.1`` and ``s.p.2``; every loop makes the call ``c``."""

    def loop(loop_id: str, at: int, **start: Any) -> list[AgentEvent]:
        return tool_loop_events(loop_id, [("c", "t", {"at": at}, f"{loop_id} at {at}")], at=at, **start)

    def evaluation(at: int, selected: str) -> list[AgentEvent]:
        return [
            ParallelLoopStart(
                session_id="s", loop_ids=("s.p.1", "s.p.2"), timestamp=Timestamp.from_ns((at + 1) * 10**9)
            ),
            *loop("s.p.1", at, parent="s.a.1"),
            *loop("s.p.2", at, parent="s.a.1"),
            ParallelLoopEnd(
                session_id="s",
                selected_loop_id=selected,
                selected_config_index=int(selected[-1]) - 1,
                evaluation_usage=ZERO_USAGE,
                timestamp=Timestamp.from_ns((at + 30) * 10**9),
            ),
        ]

    return [
        *loop("s.a.1", 0),
        *loop("s.a.1", 100, parent="s.a.1", kind=COMPACTION),
        *evaluation(200, "s.p.1"),
        *evaluation(300, "s.p.2"),
    ]


def test_every_record_of_a_loop_id_used_again_has_its_spans_and_comes_back() -> None:
    # A compaction pass and a second parallel evaluation reuse loop ids: their records shared
    # their first records' span ids, and ingest kept one record of each id, the last.
    session = _reused_ids_session()
    assert [record.loop_id for record in session.loops] == [
        "s.a.1",
        "s.a.1",
        "s.p.1",
        "s.p.2",
        "s.p.1",
        "s.p.2",
    ]
    spans = session_spans(session, capture_content=True)
    by_id = _by_id(spans)
    assert len(by_id) == len(spans) == 6 * 3  # a loop, a turn and a tool call span per record
    # The first record of an id keeps the ids it always had; links name it.
    firsts = {record.loop_id: record for record in reversed(session.loops)}
    for loop_id, record in firsts.items():
        assert by_id[loop_span_id(loop_id)].start_time == record.started_at.ns
        assert by_id[turn_span_id(loop_id, 0)].parent.span_id == loop_span_id(loop_id)
        assert by_id[tool_span_id(loop_id, "c")].parent.span_id == turn_span_id(loop_id, 0)
    [compaction] = [span for span in spans if span.attributes.get(attr.PHI_CONTINUATION_KIND) == "Compaction"]
    assert compaction.context.span_id != loop_span_id("s.a.1")
    assert [(link.context.span_id, link.attributes[attr.PHI_LINK_KIND]) for link in compaction.links] == [
        (loop_span_id("s.a.1"), "continuation")
    ]
    [back] = _ingest(spans)
    assert encode_session(back) == encode_session(session)
    # Each record in a trace of its own: a payload per loop, in the session's order, too.
    [back] = _ingest_payloads(
        *(
            session_spans(replace(session, loops=session.loops[: n + 1]), capture_content=True)
            for n in range(6)
        )
    )
    assert encode_session(back) == encode_session(session)


def _overlapping_evaluations() -> list[AgentEvent]:
    """Two evaluations (from 0 s and 100 s) of the parallel group ``s.p.1``, ``s.p.2``: ``s.p.2``
    starts first and ends last, so the session's loops (in the order they ended) are not in
    the order they started."""
    events: list[AgentEvent] = []
    for at in (0, 100):
        second = tool_loop_events("s.p.2", [("c", "t", {}, "ok")], at=at)
        first = tool_loop_events("s.p.1", [("c", "t", {}, "ok")], at=at + 1)
        first[-1] = replace(first[-1], timestamp=Timestamp.from_ns((at + 25) * 10**9))
        group = ("s.p.1", "s.p.2")
        events += [
            ParallelLoopStart(session_id="s", loop_ids=group, timestamp=Timestamp.from_ns((at + 1) * 10**9)),
            second[0],
            *first,
            *second[1:],
            ParallelLoopEnd(
                session_id="s",
                selected_loop_id="s.p.1",
                selected_config_index=0,
                evaluation_usage=ZERO_USAGE,
                timestamp=Timestamp.from_ns((at + 30) * 10**9),
            ),
        ]
    return events


def test_parallel_branches_come_back_formed_and_started_by_the_first_to_start() -> None:
    recorder = SessionRecorder()
    recorder.record_all(_overlapping_evaluations())
    recorder.flush()
    [session] = recorder.drain_completed()
    assert [record.loop_id for record in session.loops] == ["s.p.1", "s.p.2"] * 2
    spans = session_spans(session, capture_content=True)
    [back] = _ingest(spans)
    assert encode_session(back) == encode_session(session)  # created at the first start, loops as they ended
    events: list[AgentEvent] = []
    ingestor = SpanIngestor(events.append)
    ingestor.add(spans_from_sdk(span) for span in spans)
    assert [
        (type(e).__name__, e.timestamp.ns // 10**9) for e in events if "Parallel" in type(e).__name__
    ] == [
        ("ParallelLoopStart", 1),
        ("ParallelLoopEnd", 30),
        ("ParallelLoopStart", 101),
        ("ParallelLoopEnd", 130),
    ]


def test_the_sink_numbers_a_loop_ids_records_across_its_exports() -> None:
    # The sink exports each drain on its own (it checkpoints at every AgentEnd): the
    # compaction pass and the second evaluation's branches, drained after their ids' first
    # records, were numbered as first records and overwrote those records' spans. The
    # amendments (each evaluation's end, after its branches were exported) keep their numbers.
    session = _reused_ids_session()
    exporter = _Batches()
    sink = OtelExportSink(exporter, capture_content=True)
    for event in _reused_ids_events():
        sink(event)
    sink.close()
    assert len(exporter.batches) > 4  # a drain per loop record, and amendments
    whole = session_spans(session, capture_content=True)
    last = _by_id([span for batch in exporter.batches for span in batch])  # a later version wins
    assert len(last) == len(whole) == 6 * 3
    assert {span_id: span.start_time for span_id, span in last.items()} == {
        span.context.span_id: span.start_time for span in whole
    }
    firsts = {record.loop_id: record for record in reversed(session.loops)}
    for loop_id, record in firsts.items():
        assert last[loop_span_id(loop_id)].start_time == record.started_at.ns
    [back] = _ingest_payloads(*exporter.batches)
    assert encode_session(back) == encode_session(session)
    with pytest.raises(TypeError, match="first_ordinals must be Mapping or None, not list"):
        session_spans(session, first_ordinals=[1])  # type: ignore[arg-type]


def test_the_sink_keeps_apart_records_of_a_loop_id_starting_at_one_instant() -> None:
    # Compaction passes starting at their loop's very instant (a clock of ms), each drained
    # on its own: the sink knew a record by its loop id and start, gave the passes the first
    # record's span ids (3 distinct of 9), and a backend keeping a span per id lost records.
    first = tool_loop_events("s.a.1", [("c", "t", {}, "r")])
    events = list(first)
    for at in (100, 200):
        compaction = tool_loop_events(
            "s.a.1", [("c", "t", {}, f"r{at}")], at=at, parent="s.a.1", kind=COMPACTION
        )
        events += [replace(compaction[0], timestamp=first[0].timestamp), *compaction[1:]]
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    assert [record.started_at for record in session.loops] == [session.loops[0].started_at] * 3
    exporter = _Batches()
    sink = OtelExportSink(exporter, capture_content=True)
    for event in events:
        sink(event)
    sink.close()
    assert len(exporter.batches) == 3
    sent = _by_id([span for batch in exporter.batches for span in batch])
    assert sent.keys() == _by_id(session_spans(session, capture_content=True)).keys()
    assert len(sent) == 9


def test_the_sink_keeps_apart_a_compaction_pass_cut_short_at_its_loops_instant() -> None:
    # A loop and two passes starting in one ms, the second still open at close (Aborted, no
    # end): having no end, it took the first pass's number, and its spans overwrote that pass's.
    first = tool_loop_events("s.a.1", [("c", "t", {}, "r")])
    compaction = tool_loop_events("s.a.1", [("c", "t", {}, "r1")], at=100, parent="s.a.1", kind=COMPACTION)
    compaction = [replace(compaction[0], timestamp=first[0].timestamp), *compaction[1:]]
    events = [*first, *compaction, compaction[0]]
    exporter = _Batches()
    sink = OtelExportSink(exporter, capture_content=True)
    for event in events:
        sink(event)
    sink.close()
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    assert [record.status for record in session.loops] == ["Completed", "Completed", "Aborted"]
    sent = _by_id([span for batch in exporter.batches for span in batch])
    assert sent.keys() == _by_id(session_spans(session, capture_content=True)).keys()


def test_a_sub_agents_compaction_pass_comes_back_with_its_first_record() -> None:
    # Both records of the sub-agent's loop are under the tool span that spawned it, in its
    # spawner's trace: ingest replayed them as one loop.
    spawner = tool_loop_events("s.a.1", [("c", "t", {}, "done")])
    ended = next(i for i, event in enumerate(spawner) if type(event) is ToolExecutionEnd)
    spawn = spawner[ended]
    assert type(spawn) is ToolExecutionEnd
    sub_agent = [("c", "t", {}, "sub")]
    recorder = SessionRecorder()
    recorder.record_all(
        [
            *spawner[:ended],
            *tool_loop_events("k.b.1", sub_agent, at=2, session_id="k", parent="s.a.1"),
            *tool_loop_events("k.b.1", sub_agent, at=40, session_id="k", parent="k.b.1", kind=COMPACTION),
            replace(spawn, result=replace(spawn.result, child_loop_id="k.b.1")),
            *spawner[ended + 1 :],
        ]
    )
    recorder.flush()
    sessions = sorted(recorder.drain_completed(), key=lambda session: session.created_at)
    [_, sub] = sessions
    assert sub.parent_spawn_ref is not None and [record.loop_id for record in sub.loops] == ["k.b.1"] * 2
    spans = session_spans(sub, capture_content=True)
    [first, compaction] = sorted(
        (s for s in spans if s.name == "invoke_agent a"), key=lambda s: s.start_time or 0
    )
    assert first.context.span_id == loop_span_id("k.b.1") != compaction.context.span_id
    assert first.parent.span_id == compaction.parent.span_id == tool_span_id("s.a.1", "c")
    assert [link.context.span_id for link in compaction.links] == [loop_span_id("k.b.1")]
    [back] = _ingest(spans)  # alone: which call of its spawner spawned it is not known
    assert encode_session(replace(back, parent_spawn_ref=sub.parent_spawn_ref)) == encode_session(sub)
    assert [encode_session(s) for s in _ingest(_export(sessions, capture_content=True))] == [
        encode_session(s) for s in sessions
    ]


class _CountedTurns(tuple):  # type: ignore[type-arg]
    """A loop's turns, counting the scans of them."""

    scans = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _CountedTurns.scans += 1
        return super().__iter__()


def test_exporting_a_loop_scans_its_turns_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tool call's end time is its result's, looked up in its turn: a scan of every turn
    # per tool call made exporting a long loop quadratic.
    session = tool_loop_session([(f"c{index}", "t", {}, "ok") for index in range(50)])
    expected = session_spans(session, capture_content=True)
    [record] = session.loops
    monkeypatch.setattr(record, "turns", _CountedTurns(record.turns))
    monkeypatch.setattr(_CountedTurns, "scans", 0)
    spans = session_spans(session, capture_content=True)
    assert _CountedTurns.scans <= 5
    assert [(s.name, s.context, s.parent, s.start_time, s.end_time, s.attributes) for s in spans] == [
        (s.name, s.context, s.parent, s.start_time, s.end_time, s.attributes) for s in expected
    ]


def test_openinference_cached_and_reasoning_tokens_are_counted_apart() -> None:
    # OpenInference counts cached tokens inside llm.token_count.prompt and details them
    # apart (as the GenAI conventions do): read as uncached input, they were billed at
    # the full input rate, and the reasoning tokens were lost.
    chat = _span(
        1,
        None,
        "ChatCompletion",
        0,
        10,
        **{
            attr.OPENINFERENCE_SPAN_KIND: "LLM",
            attr.OPENINFERENCE_MODEL_NAME: "claude",
            attr.OPENINFERENCE_PROMPT_TOKENS: 100,
            attr.OPENINFERENCE_COMPLETION_TOKENS: 20,
            "llm.token_count.prompt_details.cache_read": 80,
            "llm.token_count.prompt_details.cache_write": 10,
            "llm.token_count.completion_details.reasoning": 5,
        },
    )
    recorder = SessionRecorder()
    SpanIngestor(recorder).add([chat])
    recorder.flush()
    [session] = recorder.drain_completed()
    usage = session.loops[0].turns[0].usage
    assert (usage.input, usage.cache_read, usage.cache_write, usage.output, usage.reasoning) == (
        10,
        80,
        10,
        20,
        5,
    )
    assert usage.total_tokens == 120


def test_span_text_from_undecodable_bytes_is_recorded_not_the_trace_lost() -> None:
    # In process, attributes are Python text, which may hold lone surrogates (a file name
    # os.listdir decoded): the JSON reader refused them with UnicodeEncodeError, and the
    # whole trace was lost.
    name = "report-\udcff.txt"
    agent = _span(
        1,
        None,
        "invoke_agent a",
        0,
        100,
        **{attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, attr.PHI_CONFIG: name},
    )
    said = msgspec.json.encode([{"role": "user", "parts": [{"type": "text", "content": "ls"}]}]).decode()
    chat = _span(
        2,
        1,
        "chat m",
        10,
        50,
        **{attr.OPERATION_NAME: attr.OP_CHAT, attr.INPUT_MESSAGES: said.replace("ls", f"ls {name}")},
    )
    tool = _span(
        3,
        2,
        "execute_tool ls",
        20,
        30,
        **{attr.OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.TOOL_CALL_RESULT: name},
    )
    agent.events.append(SpanEvent(attr.EVENT_PRUN, 60, {"phi.pruned_timestamps": name}))  # not ours
    recorder = SessionRecorder()
    SpanIngestor(recorder).add([tool, chat, agent])
    recorder.flush()
    [session] = recorder.drain_completed()
    [turn] = session.loops[0].turns
    assert turn.tool_results[0].content[0].text == name  # type: ignore[union-attr]
    assert encode_session(session)  # and a store takes it (escaped)


def test_ids_from_undecodable_bytes_are_hashed_as_the_sink_exports_them() -> None:
    # A loop id and a tool call id holding lone surrogates (text from undecodable bytes, which
    # the recorder takes): hashing them into span ids raised a bare UnicodeEncodeError out of
    # export_session, which promises ExportError only.
    events = tool_loop_events("L\udcff", [("c\udcff", "t", {}, "r")])
    recorder = SessionRecorder()
    recorder.record_all(events)
    recorder.flush()
    [session] = recorder.drain_completed()
    spans = _export([session])
    assert loop_span_id("L\\xed\\xb3\\xbf") in _by_id(spans)
    # The sink exports the session as stores save it, its ids escaped: the same span ids.
    exporter = InMemorySpanExporter()
    sink = OtelExportSink(exporter)
    for event in events:
        sink(event)
    sink.close()
    assert _exported_ids(exporter) == _by_id(spans).keys()


def test_tool_calls_of_a_loop_without_model_spans_are_kept() -> None:
    # OpenInference's CrewAI instrumentation, its model calls not instrumented: an AGENT
    # span and its TOOL spans. With no chat span to hang them on, the tool calls vanished.
    agent = _span(1, None, "Crew.kickoff", 0, 100, **{attr.OPENINFERENCE_SPAN_KIND: "AGENT"})
    tools = [
        _span(
            2 + index,
            1,
            "search",
            10 + 20 * index,
            20 + 20 * index,
            **{
                attr.OPENINFERENCE_SPAN_KIND: "TOOL",
                attr.OPENINFERENCE_TOOL_NAME: "search",
                attr.OPENINFERENCE_OUTPUT_VALUE: f"hit {index}",
            },
        )
        for index in (0, 1)
    ]
    recorder = SessionRecorder()
    SpanIngestor(recorder).add([*tools, agent])
    recorder.flush()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    [turn] = loop.turns
    assert [result.content[0].text for result in turn.tool_results] == ["hit 0", "hit 1"]  # type: ignore[union-attr]
    assert "turn" in loop.metadata["otel"]["synthesized"]


def _ingest_payloads(*payloads: list[ReadableSpan]) -> list[Session]:
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for payload in payloads:
        ingestor.add(spans_from_sdk(span) for span in payload)
    ingestor.flush()
    recorder.flush()
    return recorder.drain_completed()


def _link(sessions: list[Session]) -> tuple[str | None, str | None, str]:
    """(the child loop id in the caller's tool result, the sub-agent loop's parent and kind),
    by agent; the sub-agent is expected in a session of its own."""
    loops = {loop.agent_id: (session.session_id, loop) for session in sessions for loop in session.loops}
    (caller_session, caller), (helper_session, helper) = loops["caller"], loops["helper"]
    child = next(e.event.result.child_loop_id for e in caller.events if type(e.event) is ToolExecutionEnd)
    if caller_session == helper_session:
        return child, None, "same session"
    return child, helper.parent_loop_id, helper.kind.kind


def _expected_link(sessions: list[Session]) -> tuple[str, str, str]:
    loops = {loop.agent_id: loop.loop_id for session in sessions for loop in session.loops}
    return loops["helper"], loops["caller"], "Initial"


def test_a_sub_agent_of_another_service_is_linked_to_the_tool_that_called_it() -> None:
    # Its root's parent is remote, so it was a root: the caller's next loop (a Default
    # continuation in the trace's session), not its sub-agent, and the tool result had no child.
    calling, serving, _ = services_calling_a_sub_agent()
    sessions = _ingest_payloads([*serving, *calling])  # one payload (a collector batched both)
    assert _link(sessions) == _expected_link(sessions)


def test_a_sub_agent_arriving_while_its_callers_trace_waits_is_linked() -> None:
    calling, serving, _ = services_calling_a_sub_agent()
    first_chat = [span for span in calling if span.name == "chat m"]
    rest = [span for span in calling if span.name != "chat m"]
    # The caller's first spans, then the sub-agent's service, then the caller's tool and root.
    sessions = _ingest_payloads(first_chat, serving, rest)
    assert _link(sessions) == _expected_link(sessions)


def test_a_remote_parent_that_never_comes_is_kept_in_the_loops_metadata() -> None:
    _, serving, tool_span = services_calling_a_sub_agent()
    recorder = SessionRecorder()
    SpanIngestor(recorder).add(spans_from_sdk(span) for span in serving)  # recorded at once
    recorder.checkpoint()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    assert loop.status == "Completed" and loop.parent_loop_id is None
    assert loop.metadata is not None and loop.metadata["otel"]["parent_span_id"] == f"{tool_span:016x}"


def _encoded(sessions: list[Session]) -> dict[str, bytes]:
    return {session.session_id: encode_session(session) for session in sessions}


@pytest.mark.parametrize("first", ["sub-agent", "caller"])
def test_a_sub_agent_is_linked_whichever_service_exports_first(first: str) -> None:
    # The sub-agent's service exporting first: recorded at once in the trace's session, then
    # the caller came as its Default continuation, and neither link was made. The caller
    # exporting first (its root ended, so recorded): the sub-agent became its continuation.
    calling, serving, _ = services_calling_a_sub_agent()
    sessions = _ingest_payloads(*((serving, calling) if first == "sub-agent" else (calling, serving)))
    assert _link(sessions) == _expected_link(sessions)
    assert _encoded(sessions) == _encoded(_ingest_payloads([*serving, *calling]))


def _saved_one_by_one(root: Path, *payloads: list[ReadableSpan]) -> list[Session]:
    """The store's sessions after each payload was ingested and what completed saved."""
    store, recorder = JsonDirStore(root), SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for payload in payloads:
        ingestor.add(spans_from_sdk(span) for span in payload)
        recorder.checkpoint()
        for session in recorder.drain_completed():
            store.save(session)
    return [store.load(session_id) for session_id in store.list_ids()]


def test_a_sub_agent_exported_after_its_caller_was_saved_keeps_the_tool_call_that_spawned_it(
    demo_sessions: list[Session], tmp_path: Path
) -> None:
    # Each session exported apart, as `export_session` does: the caller's trace is recorded
    # and saved (the OTLP endpoint's periodic checkpoint) before its sub-agent's spans,
    # which join that trace, are recorded when it times out (here: flushed).
    assert any(session.parent_spawn_ref is not None for session in demo_sessions)
    store, recorder = JsonDirStore(tmp_path), SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for session in demo_sessions:
        ingestor.add(spans_from_sdk(span) for span in _export([session], capture_content=True))
        recorder.checkpoint()
        for done in recorder.drain_completed():
            store.save(done)
    ingestor.flush()
    recorder.flush()
    for done in recorder.drain_completed():
        store.save(done)
    saved = [store.load(session_id) for session_id in store.list_ids()]
    assert {s.session_id: s.parent_spawn_ref for s in saved} == {
        s.session_id: s.parent_spawn_ref for s in demo_sessions
    }
    assert _encoded(saved) == _encoded(demo_sessions)


@pytest.mark.parametrize("first", ["sub-agent", "caller"])
def test_a_sub_agent_saved_before_the_other_side_came_is_linked_in_the_store(
    tmp_path: Path, first: str
) -> None:
    calling, serving, _ = services_calling_a_sub_agent()
    apart = _saved_one_by_one(
        tmp_path / "apart", *((serving, calling) if first == "sub-agent" else (calling, serving))
    )
    assert _link(apart) == _expected_link(apart)
    assert _encoded(apart) == _encoded(_saved_one_by_one(tmp_path / "together", [*serving, *calling]))


def test_a_sub_agent_whose_caller_never_comes_is_recorded_once_and_complete() -> None:
    _, serving, tool_span = services_calling_a_sub_agent()
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add(spans_from_sdk(span) for span in serving)
    assert ingestor.buffered_spans == 0  # no wait for a caller that may never come
    recorder.checkpoint()
    [session] = recorder.drain_completed()
    ingestor.flush()
    recorder.flush()
    assert recorder.drain_completed() == [] and recorder.orphans() == []
    [loop] = session.loops
    assert (loop.status, loop.parent_loop_id, session.parent_spawn_ref) == ("Completed", None, None)
    assert loop.metadata is not None and loop.metadata["otel"]["parent_span_id"] == f"{tool_span:016x}"
    # Its own session, named as when its caller's spans are here: a caller exporting later
    # may link it in place.
    assert session.session_id == f"{loop.metadata['otel']['trace_id']}-{loop.metadata['otel']['span_id']}"


@pytest.mark.parametrize("saved", [False, True], ids=["held", "saved"])
def test_a_caller_sent_again_keeps_its_place_in_its_conversation(tmp_path: Path, saved: bool) -> None:
    # The caller's loop is sent again, linked, once its sub-agent's service exports: it must
    # still continue the loop it continued, and the conversation's next loop still follows
    # the latest one, not it.
    first, second, third = (services_calling_a_sub_agent("chat-1") for _ in range(3))
    late = [[*first[1], *first[0]], second[0], [*third[1], *third[0]], second[1]]
    together = [[*first[1], *first[0]], [*second[1], *second[0]], [*third[1], *third[0]]]
    if saved:
        apart, want = (
            _saved_one_by_one(tmp_path / "apart", *late),
            _saved_one_by_one(tmp_path / "in", *together),
        )
    else:
        apart, want = _ingest_payloads(*late), _ingest_payloads(*together)
    assert _encoded(apart) == _encoded(want)
    [chat] = [session for session in apart if session.session_id == "chat-1"]
    assert [(loop.kind.kind, loop.parent_loop_id) for loop in chat.loops] == [
        ("Initial", None),
        ("Default", chat.loops[0].loop_id),
        ("Default", chat.loops[1].loop_id),
    ]


def test_a_run_longer_than_the_timeout_is_one_loop_while_its_spans_keep_coming() -> None:
    # A batch processor exports each model call as it ends, the agent span only at the end:
    # a run of a few minutes must not be cut into an Aborted stand-in and an empty loop.
    now = [0.0]
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder, trace_timeout=60, clock=lambda: now[0])
    agent = {"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": "conv-1"}
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    second = 10**9
    for index, at in enumerate((10, 50, 90, 130)):
        now[0] = at
        usage = {"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10}
        ingestor.add([_span(0x10 + index, 1, "chat m", (at - 5) * second, at * second, **chat, **usage)])
        assert ingestor.expire() == 0
    now[0] = 135
    ingestor.add([_span(1, None, "invoke_agent a", 0, 135 * second, **agent)])
    recorder.flush()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    assert (session.session_id, loop.status, loop.turn_count()) == ("conv-1", "Completed", 4)
    assert (loop.usage.input, loop.usage.output) == (400, 40)
    assert ingestor.counters["incomplete_traces"] == 0


@pytest.mark.parametrize("export", ["now", "older"])
def test_a_loop_span_coming_after_the_trace_timeout_is_stored_with_its_stand_in_as_one_loop(
    tmp_path: Path, export: str
) -> None:
    # Our export put the agent id on the loop span only: a chat span standing in for it (its
    # batch came after the timeout) had the loop's id and an agent guessed from the service,
    # so the store kept the stand-in and the loop as two records run by two agents.
    session = tool_loop_session([("c1", "search", {"q": "x"}, "hit")], agent_id="a")
    spans = [spans_from_sdk(span) for span in session_spans(session)]
    assert all(span.attributes[attr.AGENT_ID] == "a" for span in spans)
    if export == "older":  # an exporter not upgraded yet: made up, merged with any agent's
        for span in spans:
            if span.attributes[attr.OPERATION_NAME] != attr.OP_INVOKE_AGENT:
                del span.attributes[attr.AGENT_ID]
    late = [span for span in spans if span.parent_id is None]
    now, recorder, store = [0.0], SessionRecorder(), JsonDirStore(tmp_path)
    ingestor = SpanIngestor(recorder, trace_timeout=60, clock=lambda: now[0])
    for batch in ([span for span in spans if span.parent_id is not None], late):
        ingestor.add(batch)
        now[0] += 61
        ingestor.expire()
        recorder.flush()
        for part in recorder.drain_completed():
            store.save(part)
    [loop] = store.load(session.session_id).loops
    assert (loop.loop_id, loop.agent_id, loop.status) == ("L", "a", "Completed")


@pytest.mark.parametrize("capture_content", [False, True], ids=["rebuilt", "exact"])
def test_spans_coming_after_their_roots_were_recorded_join_them(
    demo_sessions: list[Session], capture_content: bool
) -> None:
    # A payload retried after a 429, or batches an exporter sends concurrently: the children
    # come after the root's payload was taken and recorded.
    spans = _export(demo_sessions, capture_content=capture_content)
    roots = [span for span in spans if span.parent is None]
    children = [span for span in spans if span.parent is not None]
    assert _encoded(_ingest_payloads(roots, children)) == _encoded(_ingest_payloads(spans))


def test_spans_of_a_sub_agent_whose_loop_span_comes_last_wait_for_it(demo_sessions: list[Session]) -> None:
    # The spawner's root came with the sub-agent's turn and tool spans, cut off from the
    # sub-agent's loop span, still to come: replayed then without their AgentStart, they
    # were orphans for good, besides the loop recorded whole once its span came.
    spans = _export(demo_sessions, capture_content=True)
    late = [
        span
        for span in spans
        if span.parent is not None and span.attributes[attr.OPERATION_NAME] == attr.OP_INVOKE_AGENT
    ]
    assert late  # the demo has sub-agents
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add(spans_from_sdk(span) for span in spans if span not in late)
    ingestor.add(spans_from_sdk(span) for span in late)
    assert ingestor.buffered_spans == 0
    ingestor.flush()
    recorder.flush()
    assert recorder.orphans() == []
    assert _encoded(recorder.drain_completed()) == _encoded(_ingest_payloads(spans))
    # A loop span that never comes: its spans wait no longer than the trace timeout.
    now = [0.0]
    ingestor = SpanIngestor(SessionRecorder(), trace_timeout=5, clock=lambda: now[0])
    ingestor.add(spans_from_sdk(span) for span in spans if span not in late)
    assert ingestor.buffered_spans > 0
    now[0] = 6
    assert ingestor.expire() and ingestor.buffered_spans == 0


def test_a_loop_whose_model_call_stands_in_for_it_bills_every_turn() -> None:
    # Model calls of a called service with no agent span: the first stands in for the loop,
    # and is one of its turns, not the loop's total.
    remote = 0xBEEF
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    usage = {"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10}
    spans = [
        msgspec.structs.replace(
            _span(0x20 + i, None, "chat m", i, i + 1, **chat, **usage), remote_parent_id=remote
        )
        for i in range(3)
    ]
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add(spans)
    ingestor.flush()
    recorder.flush()
    [loop] = [loop for session in recorder.drain_completed() for loop in session.loops]
    assert loop.turn_count() == 3
    assert (loop.usage.input, loop.usage.output) == (300, 30)


def test_an_export_sink_refuses_an_exporter_that_cannot_export() -> None:
    # Every session recorded was then given up at export.
    with pytest.raises(TypeError, match="exporter must be a SpanExporter, not int"):
        OtelExportSink(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="capture_content must be bool, not str"):
        OtelExportSink(InMemorySpanExporter(), capture_content="yes")  # type: ignore[arg-type]


def test_tool_arguments_nested_deeper_than_phi_core_reads_are_clipped_and_counted() -> None:
    # Arguments nested deeper than fits inside a session made the whole ingested session
    # unreadable by phi-core; as in recording, their deepest containers become JSON text.
    def nested(levels: int) -> Any:
        value: Any = "leaf"
        for _ in range(levels):
            value = {"k": value}
        return value

    said = [
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "c1", "name": "t", "arguments": nested(125)}],
        }
    ]
    agent = _span(1, None, "invoke_agent a", 0, 100, **{attr.OPERATION_NAME: attr.OP_INVOKE_AGENT})
    chat = _span(
        2,
        1,
        "chat m",
        10,
        50,
        **{attr.OPERATION_NAME: attr.OP_CHAT, attr.OUTPUT_MESSAGES: msgspec.json.encode(said).decode()},
    )
    tool = _span(
        3,
        1,
        "execute_tool t",
        55,
        60,
        **{
            attr.OPERATION_NAME: attr.OP_EXECUTE_TOOL,
            attr.TOOL_CALL_ID: "c1",
            attr.TOOL_CALL_ARGUMENTS: msgspec.json.encode(nested(125)).decode(),
        },
    )
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add([chat, tool, agent])
    recorder.flush()
    [session] = recorder.drain_completed()
    assert decode_session(encode_session(session), strict=True) == session
    assert ingestor.counters["clipped_arguments"] == 2
    [call] = session.loops[0].turns[0].output_message.content
    deepest = call.arguments  # type: ignore[union-attr]
    for _ in range(116):
        deepest = deepest["k"]
    assert deepest == {"k": msgspec.json.encode(nested(8)).decode()}  # the 117th level holds text


_ASKED = [{"role": "user", "parts": [{"type": "text", "content": "Capital of France?"}]}]
_ANSWERED = [
    {
        "role": "assistant",
        "parts": [
            {"type": "text", "content": "Paris."},
            {"type": "tool_call", "id": "c1", "name": "look", "arguments": {"city": "Paris"}},
        ],
    }
]
_OPENAI_ASKED = [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]
_OPENAI_ANSWERED = [
    {
        "role": "assistant",
        "content": "Paris.",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "look", "arguments": '{"city": "Paris"}'}}
        ],
    }
]


def _json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


@pytest.mark.parametrize(
    ("attributes", "events"),
    [
        ({attr.INPUT_MESSAGES: _json_text(_ASKED), attr.OUTPUT_MESSAGES: _json_text(_ANSWERED)}, []),
        (  # the conventions since 1.37: on the operation-details event
            {},
            [
                SpanEvent(
                    attr.EVENT_OPERATION_DETAILS,
                    90,
                    {attr.INPUT_MESSAGES: _json_text(_ASKED), attr.OUTPUT_MESSAGES: _json_text(_ANSWERED)},
                )
            ],
        ),
        (  # the older conventions' content events: OpenAI's message format, as JSON
            {},
            [
                SpanEvent(attr.EVENT_LEGACY_PROMPT, 10, {attr.LEGACY_PROMPT: _json_text(_OPENAI_ASKED)}),
                SpanEvent(
                    attr.EVENT_LEGACY_COMPLETION, 90, {attr.LEGACY_COMPLETION: _json_text(_OPENAI_ANSWERED)}
                ),
            ],
        ),
    ],
    ids=["span attributes", "operation details event", "content events"],
)
def test_messages_are_read_wherever_the_conventions_put_them(
    attributes: dict[str, str], events: list[SpanEvent]
) -> None:
    """Messages carried on span events, as the GenAI conventions put them now and did before,
    were lost: only the span's own attributes were read."""
    chat = _span(1, None, "chat gpt-4o", 0, 100, **{attr.OPERATION_NAME: "chat", **attributes})
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    ingestor.add([replace(chat, events=events)])
    recorder.flush()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    [turn] = loop.turns
    assert [m.content for m in turn.input_messages] == [(TextContent(text="Capital of France?"),)]
    assert turn.output_message.content == (
        TextContent(text="Paris."),
        ToolCall(id="c1", name="look", arguments={"city": "Paris"}),
    )
    assert loop.messages  # content captured: the loop's AgentEnd holds its messages


def test_messages_on_the_per_message_events_are_a_stated_loss() -> None:
    chat = _span(1, None, "chat gpt-4o", 0, 100, **{attr.OPERATION_NAME: "chat"})
    user = SpanEvent("gen_ai.user.message", 10, {"content": "Capital of France?"})
    recorder = SessionRecorder()
    SpanIngestor(recorder).add([replace(chat, events=[user])])
    recorder.flush()
    [session] = recorder.drain_completed()
    assert not session.loops[0].turns[0].input_messages
    assert any(
        "gen_ai.user.message" in loss
        for loss in LOSSES["other producers (GenAI conventions, pydantic-ai, OpenInference)"]
    )


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
@pytest.mark.parametrize("root", ["agent", "http"])
def test_a_conversation_named_only_on_its_model_calls_is_one_session(root: str, served: bool) -> None:
    # The conventions ask for gen_ai.conversation.id on the model call's span; the agent span
    # (or a web server's root standing in for the loop) often lacks it: each trace was a
    # session of its own, one conversation of two requests two sessions. So too, served under
    # a remote parent (a frontend calling the agent's API with a traceparent): then each was
    # its served root's session.
    second = 10**9
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for trace in (1, 2):
        at = trace * 100 * second
        if root == "agent":
            loop = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, attr.AGENT_NAME: "bot"}
            top = _span(trace * 16, None, "invoke_agent bot", at, at + 5 * second, trace_id=trace, **loop)
        else:
            top = _span(trace * 16, None, "POST /chat", at, at + 5 * second, trace_id=trace)
        if served:
            top = replace(top, remote_parent_id=0xF0 + trace)
        chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m", attr.CONVERSATION_ID: "conv-A"}
        ingestor.add(
            [
                _span(
                    trace * 16 + 1, trace * 16, "chat m", at + second, at + 2 * second, trace_id=trace, **chat
                ),
                top,
            ]
        )
    recorder.flush()
    [session] = recorder.drain_completed()
    assert session.session_id == "conv-A"
    assert [(loop.kind.kind, loop.parent_loop_id) for loop in session.loops] == [
        ("Initial", None),
        ("Default", session.loops[0].loop_id),
    ]


def test_a_loop_takes_its_session_from_its_own_first_span_naming_one() -> None:
    # Not from a sub-agent's spans (its loop's own), and among its own in start order, then by
    # span id: whatever order they arrive in.
    second = 10**9
    agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT}
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m"}
    spans = [
        _span(1, None, "invoke_agent a", 0, 100 * second, **agent),
        _span(
            2, 1, "execute_tool ask", 1 * second, 50 * second, **{attr.OPERATION_NAME: attr.OP_EXECUTE_TOOL}
        ),
        _span(3, 2, "invoke_agent helper", 2 * second, 40 * second, **agent),
        _span(4, 3, "chat m", 3 * second, 4 * second, **chat, **{attr.CONVERSATION_ID: "helper-conv"}),
        _span(7, 1, "chat m", 60 * second, 61 * second, **chat, **{attr.OPENINFERENCE_SESSION_ID: "later"}),
        _span(6, 1, "chat m", 55 * second, 56 * second, **chat, **{attr.CONVERSATION_ID: "tied-second"}),
        _span(5, 1, "chat m", 55 * second, 57 * second, **chat, **{attr.CONVERSATION_ID: "tied-first"}),
    ]
    for order in (spans, spans[::-1]):
        recorder = SessionRecorder()
        SpanIngestor(recorder).add(order)
        recorder.flush()
        sessions = {session.session_id: session for session in recorder.drain_completed()}
        assert sorted(sessions) == ["helper-conv", "tied-first"]
        [helper] = sessions["helper-conv"].loops
        [caller] = sessions["tied-first"].loops
        assert helper.parent_loop_id == caller.loop_id


def test_spans_waiting_for_their_roots_are_bounded_in_bytes_too() -> None:
    # Only their count was: 30 model calls of 12 MiB each, waiting, took 370 MB. Past the
    # bytes allowed, the oldest traces are recorded early, as past the count: none is dropped.
    mib = 2**20
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder, max_buffered_bytes=3 * mib)
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m", attr.INPUT_MESSAGES: "x" * mib}
    for trace in (1, 2):
        ingestor.add([_span(0x10, 1, "chat m", 0, 10, trace_id=trace, **chat)])
    assert (ingestor.buffered_spans, ingestor.counters["traces"]) == (2, 0)
    assert 2 * mib < ingestor.buffered_bytes < 3 * mib
    ingestor.add([_span(0x10, 1, "chat m", 0, 10, trace_id=3, **chat)])  # over: the oldest is recorded
    assert (ingestor.buffered_spans, ingestor.counters["incomplete_traces"]) == (2, 1)
    ingestor.flush()
    assert (ingestor.buffered_spans, ingestor.buffered_bytes) == (0, 0)
    recorder.flush()
    assert len(recorder.drain_completed()) == 3


def test_a_loop_recorded_before_the_span_naming_its_session_stays_where_it_was() -> None:
    # The agent span's batch came first and recorded the trace, in a session of its own; the
    # model call naming conv-L joined it later and its loop was rebuilt in conv-L under a new
    # loop id: the first record stayed behind, an empty loop in a session of its own.
    second = 10**9
    agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, attr.AGENT_NAME: "bot"}
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m", attr.CONVERSATION_ID: "conv-L"}
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for trace in (1, 2):
        at = trace * 100 * second
        top = trace * 16
        ingestor.add([_span(top, None, "invoke_agent bot", at, at + 5 * second, trace_id=trace, **agent)])
        ingestor.add([_span(top + 1, top, "chat m", at + second, at + 2 * second, trace_id=trace, **chat)])
    recorder.flush()
    loops = {
        (s.session_id, loop.loop_id, loop.turn_count())
        for s in recorder.drain_completed()
        for loop in s.loops
    }
    assert loops == {(f"{trace:032x}", f"{trace:032x}.otel.{trace * 16:016x}", 1) for trace in (1, 2)}
    assert any("does not move it" in loss for losses in LOSSES.values() for loss in losses)


@pytest.mark.parametrize("with_store", [False, True], ids=["memory", "store"])
def test_a_loop_arriving_after_a_later_one_continues_the_latest_started_before_it(
    tmp_path: Path, with_store: bool
) -> None:
    # Traces 1, 3, 2 of one conversation (trace 2's batch retried after trace 3's went
    # through): loop 2 continued loop 3, started after it, or with a store (not saved to
    # yet) was Initial without a parent, memory knowing only loop 3.
    second = 10**9
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder, store=JsonDirStore(tmp_path) if with_store else None)
    agent = {
        attr.OPERATION_NAME: attr.OP_INVOKE_AGENT,
        attr.AGENT_NAME: "bot",
        attr.CONVERSATION_ID: "conv-O",
    }
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m"}
    for trace in (1, 3, 2):
        at, top = trace * 100 * second, trace * 16
        ingestor.add(
            [
                _span(top + 1, top, "chat m", at + second, at + 2 * second, trace_id=trace, **chat),
                _span(top, None, "invoke_agent bot", at, at + 5 * second, trace_id=trace, **agent),
            ]
        )
    recorder.flush()
    [session] = recorder.drain_completed()
    loops = {loop.loop_id: (loop.kind.kind, loop.parent_loop_id) for loop in session.loops}
    first = f"conv-O.otel.{16:016x}"
    assert loops == {
        first: ("Initial", None),
        f"conv-O.otel.{48:016x}": ("Default", first),
        f"conv-O.otel.{32:016x}": ("Default", first),
    }


def test_the_loops_remembered_are_bounded_per_session_and_all_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_module, "_LOOPS_PER_SESSION", 2)  # the latest started of each session
    monkeypatch.setattr(ingest_module, "_MEMORY", 3)  # loops of all sessions
    ingestor = SpanIngestor(lambda event: None)
    for start in (3, 1, 2):
        ingestor.loop_recorded("a", f"a{start}", start)
    assert [ingestor.latest_loop("a", "next", start) for start in (1, 2, 9)] == [None, "a2", "a3"]
    ingestor.loop_recorded("b", "b1", 1)
    ingestor.loop_recorded("b", "b2", 2)  # four: the session used least lately is let go
    assert (ingestor.latest_loop("a", "next", 9), ingestor.latest_loop("b", "next", 9)) == (None, "b2")


@pytest.mark.parametrize("order", ["together", "callee first", "caller first"])
def test_a_called_services_loop_is_recorded_once_and_never_continued_by_its_caller(order: str) -> None:
    # Two turns of conv-X, named on the caller's agent span; each calls a service (under a
    # remote parent) whose agent span lacks the id, its model call carrying it (propagated).
    # The callee's part exported first is recorded at once in conv-X, the session its own
    # spans name, a top-level loop; the caller's spans coming later link it as the sub-agent
    # of the tool span that called it, and it stays where it was recorded (a record elsewhere
    # would leave this one behind). The caller's next loop continued it (Default of the first
    # turn's helper), a caller parented on a callee.
    second = 10**9
    agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT}
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m"}
    tool = {attr.OPERATION_NAME: attr.OP_EXECUTE_TOOL}
    conversation = {attr.CONVERSATION_ID: "conv-X"}

    def turn(trace: int) -> tuple[list[SpanData], list[SpanData]]:
        at, ids = trace * 1000 * second, trace * 16  # span ids: a loop id is its session's and its span's

        def span(
            span_id: int, parent: int | None, name: str, start: int, end: int, **more: object
        ) -> SpanData:
            return _span(
                ids + span_id,
                None if parent is None else ids + parent,
                name,
                at + start * second,
                at + end * second,
                trace_id=trace,
                **more,
            )

        caller = [
            span(1, None, "invoke_agent bot", 0, 100, **agent, **conversation),
            span(2, 1, "chat m", 1, 2, **chat),
            span(3, 1, "execute_tool ask", 3, 50, **tool),
        ]
        callee = [
            replace(span(10, None, "invoke_agent helper", 4, 40, **agent), remote_parent_id=ids + 3),
            span(11, 10, "chat m", 5, 6, **chat, **conversation),
        ]
        return caller, callee

    turns = [turn(1), turn(2)]
    payloads = {
        "together": [caller + callee for caller, callee in turns],
        "callee first": [payload for caller, callee in turns for payload in (callee, caller)],
        "caller first": [payload for caller, callee in turns for payload in (caller, callee)],
    }
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder)
    for payload in payloads[order]:
        ingestor.add(payload)
    recorder.flush()
    sessions = recorder.drain_completed()
    loops = {loop.loop_id[-2:]: (session.session_id, loop) for session in sessions for loop in session.loops}
    assert sum(len(session.loops) for session in sessions) == len(loops) == 4  # each recorded once
    (_, bot1), (_, bot2) = loops["11"], loops["21"]
    assert [(bot.session_id, bot.kind.kind, bot.parent_loop_id) for bot in (bot1, bot2)] == [
        ("conv-X", "Initial", None),
        ("conv-X", "Default", bot1.loop_id),
    ]
    for trace, bot in ((1, bot1), (2, bot2)):
        session_id, helper = loops[f"{trace}a"]
        assert (helper.kind.kind, helper.parent_loop_id) == ("Initial", bot.loop_id)
        # Its served root's session, as any sub-agent's, unless recorded before its caller came.
        served = f"{trace:032x}-{trace * 16 + 10:016x}"
        assert session_id == ("conv-X" if order == "callee first" else served)
    assert any("its caller's conversation" in loss for losses in LOSSES.values() for loss in losses)


def test_the_store_is_read_once_per_conversation_and_never_for_a_session_made_up_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every trace without a conversation id (a session of its own) read the store for its
    # loop's latest predecessor, under the ingestor's lock: 2000 traces, 2000 reads (+28% a
    # trace on SQLite); a loop of a conversation arriving before the ones remembered, again.
    store = JsonDirStore(tmp_path)
    reads: list[str] = []
    read = store.loop_starts

    def counted(session_id: str, start: int) -> list[tuple[str, int]]:
        reads.append(session_id)
        return read(session_id, start)

    monkeypatch.setattr(store, "loop_starts", counted)
    second = 10**9
    recorder = SessionRecorder()
    ingestor = SpanIngestor(recorder, store=store)
    agent = {attr.OPERATION_NAME: attr.OP_INVOKE_AGENT, attr.AGENT_NAME: "bot"}
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m"}
    for trace in (1, 2, 3, 5, 6, 4):
        at, top = trace * 100 * second, trace * 16
        named = {attr.CONVERSATION_ID: "conv-A"} if trace > 3 else {}
        ingestor.add(
            [
                _span(top + 1, top, "chat m", at + second, at + 2 * second, trace_id=trace, **chat),
                _span(top, None, "invoke_agent bot", at, at + 5 * second, trace_id=trace, **agent, **named),
            ]
        )
    assert reads == ["conv-A"]
    recorder.flush()
    [conversation] = [session for session in recorder.drain_completed() if session.session_id == "conv-A"]
    assert [(loop.loop_id[-2:], loop.kind.kind, loop.parent_loop_id) for loop in conversation.loops] == [
        ("50", "Initial", None),
        ("60", "Default", conversation.loops[0].loop_id),
        ("40", "Initial", None),  # (loop 5 was recorded before it came)
    ]


def _float_vectors(span_id: int) -> SpanData:
    """An embedding call's span as OpenInference records it: 20 vectors of 1536 floats."""
    vectors = {
        f"embedding.embeddings.{n}.embedding.vector": tuple(0.1 * i for i in range(1536)) for n in range(20)
    }
    return _span(span_id, 1, "embeddings m", 1, 2, **vectors)


def _bare_events(span_id: int) -> SpanData:
    """A span with 20 000 events without attributes (a log of ticks)."""
    span = _span(span_id, 1, "work", 1, 2)
    span.events.extend(SpanEvent(f"tick {n % 10}", n, {}) for n in range(20_000))
    return span


def _model_call(span_id: int) -> SpanData:
    """A model call's span of the GenAI conventions, its content captured."""
    attributes: dict[str, Any] = {
        attr.OPERATION_NAME: attr.OP_CHAT,
        attr.REQUEST_MODEL: "gpt-4o",
        attr.RESPONSE_MODEL: "gpt-4o-2024-08-06",
        attr.PROVIDER_NAME: "openai",
        attr.USAGE_INPUT_TOKENS: 1234,
        attr.USAGE_OUTPUT_TOKENS: 321,
        attr.RESPONSE_FINISH_REASONS: ("stop",),
        attr.CONVERSATION_ID: "conv-1234",
        "gen_ai.request.temperature": 0.7,
        "server.port": 443,
        attr.INPUT_MESSAGES: _json_text(
            [{"role": "user", "parts": [{"type": "text", "content": "x" * 1500}]}]
        ),
        attr.OUTPUT_MESSAGES: _json_text(
            [{"role": "assistant", "parts": [{"type": "text", "content": "y" * 500}]}]
        ),
    }
    span = _span(span_id, 1, "chat gpt-4o", 1, 2, **attributes)
    span.events.append(SpanEvent(attr.EVENT_OPERATION_DETAILS, 2, {}))
    return span


@pytest.mark.parametrize("make", [_float_vectors, _bare_events, _model_call], ids=lambda make: make.__name__)
def test_the_bytes_counted_of_waiting_spans_are_near_the_memory_they_hold(
    make: Callable[[int], SpanData],
) -> None:
    # Only texts were counted: 5 spans of float vectors held 24.7 MB counted 48 KB, spans of
    # bare events 105 MB counted 3.5 KB; max_buffered_bytes bounded nothing for such spans.
    ingestor = SpanIngestor(lambda event: None)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for trace in range(1, 6):
            ingestor.add([replace(make(0x10 + trace), trace_id=trace)])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert ingestor.buffered_spans == 5
    assert held / 2 <= ingestor.buffered_bytes <= held * 2


def test_a_tracers_events_reach_the_export_sink_checked_once() -> None:
    """A `Tracer` checks its events as it makes them: the sink took each again through
    `SessionRecorder.on_event`'s checks (1,100 of 3,100 events re-checked, 329 vs 97 ms
    per 62,000); now only an event given to the sink directly is checked there."""
    from phi_session import recorder as recorder_module

    exporter = InMemorySpanExporter()
    sink = OtelExportSink(exporter)
    with mock.patch.object(
        recorder_module, "recordable_event", wraps=recorder_module.recordable_event
    ) as checks:
        tracer = Tracer(AgentSession("agent"), sinks=[sink])
        with tracer.loop(LoopConfigSnapshot(model="m", provider="p")) as loop, loop.turn() as scope:
            with scope.assistant() as reply:
                reply.finish("hi")
        assert checks.call_count == 0
        assert sink.flush(timeout=10)
        assert len(exporter.get_finished_spans()) >= 2  # the loop and its turn
        bad = MessageEnd(loop_id="l2", message=replace(assistant("x"), content=(TextContent(text=5),)))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="text"):
            sink(bad)
        assert checks.call_count == 1
    sink.close()


@pytest.mark.parametrize(
    "usages",
    [
        (
            Usage(input=100_000, output=2_000, total_tokens=102_000),
            Usage(input=100_000, output=500, total_tokens=100_500),
        ),
        (
            Usage(input=100_000, output=2_000, cache_read=50_000),
            Usage(input=1_000, output=100, cache_read=400, total_tokens=1_100),
        ),
    ],
    ids=["totalled", "an untotalled reply, then one counting the cache inside"],
)
def test_a_turn_of_several_replies_comes_back_a_call_per_reply_without_content_capture(
    usages: tuple[Usage, Usage],
) -> None:
    # An errored claude-opus-4-1 reply, then a gpt-4o-mini fallback: without content
    # capture the ingest made them one gpt-4o-mini call ($0.0315 of $1.6653).
    from phi_session.cost import Pricer

    from .store_support import replies_session

    opus, mini = usages
    session = replies_session((("anthropic", "claude-opus-4-1", opus), ("openai", "gpt-4o-mini", mini)))
    [back] = _ingest(_export([session]))
    record, ingested = session.loops[0], back.loops[0]
    calls = [(call.usage, call.served_by) for call in record.model_calls()]
    assert [(call.usage, call.served_by) for call in ingested.model_calls()] == calls
    assert [(c.usage, c.served_by) for c in ingested.turn_calls(ingested.turns[0])] == calls
    assert ingested.turns[0].usage == record.turns[0].usage and ingested.usage == record.usage
    assert ingested.turns[0].output_message.model == "gpt-4o-mini"
    pricer = Pricer()
    assert pricer.session(back).usd == pricer.session(session).usd > 1.6
