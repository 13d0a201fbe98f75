"""SessionRecorder: phi-core's rules (re-expressed from its session tests) and our fixes."""

from __future__ import annotations

import collections
import gc
import logging
import pathlib
import re
import threading
import tracemalloc
import types
import weakref
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

import phi_session as ps
from phi_session import recorder as recorder_module
from phi_session.recorder import SessionRecorder, SessionRecorderConfig, SpawnGap

from .conftest import EXAMPLES
from .test_model import CountedLoops

T0 = 1_750_000_000 * 10**9


def ts(ms: int) -> ps.Timestamp:
    return ps.Timestamp.from_ns(T0 + ms * 10**6)


def usage(n: int) -> ps.Usage:
    return ps.Usage(input=n, output=n, total_tokens=2 * n)


def assistant(text: str, *, calls: int = 0, loop_id: str | None = None, turn: int = 0) -> ps.AssistantMessage:
    content: list[Any] = [ps.TextContent(text=text)]
    content += [ps.ToolCall(id=f"call{i}", name="read", arguments={"i": i}) for i in range(calls)]
    return ps.AssistantMessage(
        content=tuple(content),
        stop_reason="toolUse" if calls else "stop",
        model="claude",
        provider="anthropic",
        usage=usage(10),
        timestamp=1,
        turn_id=ps.TurnId(loop_id=loop_id, turn_index=turn) if loop_id else None,
    )


def tool_result(call: str) -> ps.ToolResultMessage:
    return ps.ToolResultMessage(
        tool_call_id=call, tool_name="read", content=(ps.TextContent(text="ok"),), is_error=False, timestamp=2
    )


def start(
    loop_id: str,
    session: str,
    *,
    at: int = 0,
    parent: str | None = None,
    agent: str = "agent",
    kind: ps.ContinuationKind = ps.INITIAL,
) -> ps.AgentStart:
    return ps.AgentStart(
        agent_id=agent,
        session_id=session,
        loop_id=loop_id,
        parent_loop_id=parent,
        continuation_kind=kind,
        timestamp=ts(at),
    )


def end(
    loop_id: str, *, at: int = 1, rejection: str | None = None, messages: tuple[Any, ...] = ()
) -> ps.AgentEnd:
    return ps.AgentEnd(
        loop_id=loop_id,
        messages=messages,
        usage=usage(10) if messages else usage(0),
        timestamp=ts(at),
        rejection=rejection,
    )


def turn(loop_id: str, index: int = 0, *, calls: int = 0, at: int = 0) -> list[ps.AgentEvent]:
    """One complete turn, as phi-core's loop emits it."""
    out = assistant("answer", calls=calls)
    events: list[ps.AgentEvent] = [
        ps.TurnStart(
            loop_id=loop_id,
            turn_index=index,
            triggered_by="User" if index == 0 else "Continuation",
            timestamp=ts(at),
        ),
        ps.MessageStart(loop_id=loop_id, message=out),
        ps.MessageUpdate(loop_id=loop_id, message=out, delta=ps.StreamDelta.text("ans")),
        ps.MessageEnd(loop_id=loop_id, message=out),
    ]
    results = []
    for i in range(calls):
        result = tool_result(f"call{i}")
        results.append(result)
        events += [
            ps.ToolExecutionStart(loop_id=loop_id, tool_call_id=f"call{i}", tool_name="read", args={"i": i}),
            ps.ToolExecutionEnd(
                loop_id=loop_id,
                tool_call_id=f"call{i}",
                tool_name="read",
                result=ps.ToolResult(content=result.content),
                is_error=False,
            ),
            ps.MessageStart(loop_id=loop_id, message=result),
            ps.MessageEnd(loop_id=loop_id, message=result),
        ]
    events.append(
        ps.TurnEnd(
            loop_id=loop_id,
            message=assistant("answer", calls=calls, loop_id=loop_id, turn=index),
            usage=usage(10),
            timestamp=ts(at + 1),
            tool_results=tuple(results),
        )
    )
    return events


def record(events: list[ps.AgentEvent], **config: Any) -> tuple[SessionRecorder, list[ps.Session]]:
    recorder = SessionRecorder(**config)
    recorder.record_all(events)
    recorder.flush()
    return recorder, recorder.drain_completed()


# -- phi-core's rules -----------------------------------------------------------------


def test_one_loop_becomes_one_session_with_contiguous_sequences() -> None:
    events = [start("s.c.1", "s"), *turn("s.c.1", calls=2), end("s.c.1", at=5, messages=(assistant("x"),))]
    _, [session] = record(events)
    [loop] = session.loops
    assert loop.status == "Completed" and loop.ended_at == ts(5)
    assert [e.sequence for e in loop.events] == list(range(len(loop.events)))
    assert not any(isinstance(e.event, ps.MessageUpdate) for e in loop.events)  # deltas dropped by default
    assert session.formation == ps.SessionFormation.first_loop(ts(0))
    assert session.created_at == ts(0) and session.agent_id == "agent"


def test_streaming_events_are_stored_when_asked() -> None:
    events = [start("s.c.1", "s"), *turn("s.c.1"), end("s.c.1")]
    _, [session] = record(events, include_streaming_events=True)
    assert sum(isinstance(e.event, ps.MessageUpdate) for e in session.loops[0].events) == 1


def test_turns_collect_inputs_and_stamp_tool_results() -> None:
    events = [start("s.c.1", "s"), *turn("s.c.1", calls=2), end("s.c.1")]
    _, [session] = record(events)
    [materialized] = session.loops[0].turns
    assert materialized.turn_id == ps.TurnId(loop_id="s.c.1", turn_index=0)
    # phi-core quirk kept for byte compatibility: tool results are inputs too (without turnId)
    assert [m.turn_id for m in materialized.input_messages] == [None, None]
    assert [m.turn_id for m in materialized.tool_results] == [materialized.turn_id] * 2
    assert materialized.has_tool_calls() and len(materialized.all_messages()) == 5
    assert materialized.duration() == pytest.approx(0.001)
    assert session.loops[0].config == ps.LoopConfigSnapshot(
        model="claude", provider="anthropic", config_id="c"
    )


def test_a_turns_tool_results_are_plain_whichever_way_they_arrive() -> None:
    """`TurnEnd.tool_results` are plain messages: a result with agent metadata kept it in
    the turn through `on_event`, and lost it through `on_json` (a journal's replay)."""
    result = msgspec.structs.replace(tool_result("call0"), node_id=7, tags=("x",))
    events: list[ps.AgentEvent] = [
        start("s.c.1", "s"),
        ps.TurnStart(loop_id="s.c.1", turn_index=0, triggered_by="User", timestamp=ts(0)),
        ps.TurnEnd(
            loop_id="s.c.1", message=assistant("a"), usage=usage(1), timestamp=ts(1), tool_results=(result,)
        ),
        end("s.c.1", at=2),
    ]
    _, [direct] = record(events)
    recorder = SessionRecorder()
    for event in events:
        recorder.on_json(ps.encode_event(event))
    recorder.flush()
    [decoded] = recorder.drain_completed()
    [stamped] = direct.loops[0].turns[0].tool_results
    assert (stamped.node_id, stamped.tags, stamped.turn_id) == (
        None,
        (),
        ps.TurnId(loop_id="s.c.1", turn_index=0),
    )
    assert ps.encode(direct) == ps.encode(decoded)


def test_a_turns_inputs_are_its_messages_of_any_role_but_assistant() -> None:
    # By role (wire-format §3.5): an extension message whose role is "assistant" is no input.
    said = [ps.extension_message(role, "note", {"x": 1}) for role in ("assistant", "user", "system")]
    events = [start("s.c.1", "s"), *turn("s.c.1")]
    events[2:2] = [ps.MessageEnd(loop_id="s.c.1", message=message) for message in said]  # after TurnStart
    _, [session] = record([*events, end("s.c.1")])
    [materialized] = session.loops[0].turns
    assert list(materialized.input_messages) == said[1:]


def test_capture_turn_requests_fills_request_payload() -> None:
    payload = ps.AnnotatedRequestPayload(
        system_prompt="sys",
        messages=(),
        provenance=(),
        tools=(),
        model_id="claude",
        thinking_level="off",
        response_format=ps.messages.TextFormat(),
    )
    events = [
        start("s.c.1", "s"),
        *turn("s.c.1")[:1],
        ps.TurnRequest(loop_id="s.c.1", turn_index=0, payload=payload, timestamp=ts(0)),
        *turn("s.c.1")[1:],
        end("s.c.1"),
    ]
    _, [plain] = record(events)
    _, [captured] = record(events, capture_turn_requests=True)
    assert plain.loops[0].turns[0].request_payload is None
    assert captured.loops[0].turns[0].request_payload == payload
    assert any(isinstance(e.event, ps.TurnRequest) for e in plain.loops[0].events)


def test_rejected_loop() -> None:
    events = [
        start("s.c.1", "s"),
        ps.InputRejected(loop_id="s.c.1", reason="PII"),
        end("s.c.1", rejection="PII"),
    ]
    _, [session] = record(events)
    assert session.loops[0].status == "Rejected" and session.loops[0].rejection == "PII"


def test_continuations_link_children_in_finish_order() -> None:
    events = [
        start("s.c.1", "s"),
        end("s.c.1", at=1),
        start("s.c.2", "s", at=2, parent="s.c.1", kind=ps.DEFAULT),
        start("s.c.3", "s", at=3, parent="s.c.1", kind=ps.ContinuationKind.rerun("t")),
        end("s.c.3", at=4),
        end("s.c.2", at=5),
    ]
    _, [session] = record(events)
    root = session.get_loop("s.c.1")
    assert root is not None and root.children_loop_ids == ("s.c.3", "s.c.2")
    assert [r.loop_id for r in session.root_loops()] == ["s.c.1"]
    assert session.loop_chain_to("s.c.2") == ["s.c.1", "s.c.2"]
    assert [r.loop_id for r in session.loops] == ["s.c.1", "s.c.3", "s.c.2"]  # completion order


def test_a_look_at_an_open_session_does_not_gather_its_children_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each look made the next child of a parent gather all its siblings again (from the
    # record's tuple): with a journal, every AgentStart looked, so each cost more than the last.
    made = []

    class CountedChildren(recorder_module._Children):
        __slots__ = ()

        def __init__(self, record: ps.LoopRecord) -> None:
            made.append(record.loop_id)
            super().__init__(record)

    monkeypatch.setattr(recorder_module, "_Children", CountedChildren)
    recorder = SessionRecorder()
    recorder.record_all([start("s.c.0", "s"), end("s.c.0", at=1), start("s.open", "s", at=1, parent="s.c.0")])
    for i in range(1, 40):
        kind = ps.ContinuationKind.rerun(f"r{i}")
        recorder.record_all([start(f"s.c.{i}", "s", at=2, parent="s.c.0", kind=kind), end(f"s.c.{i}", at=3)])
        assert recorder.holds("s")
        session = recorder.get_session("s")
        assert session is not None and session.get_loop("s.c.0").children_loop_ids[-1] == f"s.c.{i}"  # type: ignore[union-attr]
    assert made == ["s.c.0"]
    recorder.flush()
    (session,) = recorder.drain_completed()
    assert session.get_loop("s.c.0").children_loop_ids == (  # type: ignore[union-attr]
        *(f"s.c.{i}" for i in range(1, 40)),
        "s.open",
    )
    assert not recorder.holds("s")


def test_a_loop_sent_again_takes_its_place_without_a_scan_of_the_loops() -> None:
    # The record it replaced was searched for among every loop of the session: a
    # session of 8,000 loops each sent again (an OTLP ingest linking a caller) cost 105 us a loop.
    loops = [
        [start(f"s.c.{i}", "s", at=i), *turn(f"s.c.{i}", at=i), end(f"s.c.{i}", at=i + 1)] for i in range(30)
    ]
    recorder = SessionRecorder()
    for events in loops:
        recorder.record_all(events)
    session = recorder.get_session("s")
    assert session is not None
    session.loops = CountedLoops(session.loops)
    for events in reversed(loops):
        recorder.record_all(events)
    assert session.loops.passes == 0  # type: ignore[attr-defined]
    recorder.flush()
    (drained,) = recorder.drain_completed()
    assert [record.loop_id for record in drained.loops] == [f"s.c.{i}" for i in range(30)]
    assert all(len(record.turns) == 1 for record in drained.loops)


def test_sub_agent_links_both_ways() -> None:
    events = [
        start("p.c.1", "p"),
        ps.ToolExecutionStart(loop_id="p.c.1", tool_call_id="t9", tool_name="researcher", args={}),
        start("k.sub.1", "k", parent="p.c.1", agent="child"),
        end("k.sub.1"),
        ps.ToolExecutionEnd(
            loop_id="p.c.1",
            tool_call_id="t9",
            tool_name="researcher",
            result=ps.ToolResult(content=(), child_loop_id="k.sub.1"),
            is_error=False,
        ),
        end("p.c.1", at=3),
    ]
    _, sessions = record(events)
    by_id = {s.session_id: s for s in sessions}
    assert by_id["p"].loops[0].child_loop_refs == (
        ps.ChildLoopRef(
            tool_call_id="t9", tool_name="researcher", child_loop_id="k.sub.1", child_session_id="k"
        ),
    )
    assert by_id["k"].parent_spawn_ref == ps.SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="t9", tool_name="researcher"
    )
    assert by_id["p"].loops[0].children_loop_ids == ()


def test_parallel_group_marks_the_winner() -> None:
    events = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
        start("s.a.1", "s"),
        start("s.b.2", "s"),
        end("s.b.2", at=2),
        end("s.a.1", at=3),
        ps.ParallelLoopEnd(
            session_id="s",
            selected_loop_id="s.b.2",
            selected_config_index=1,
            evaluation_usage=usage(1),
            timestamp=ts(4),
        ),
    ]
    _, [session] = record(events)
    groups = {r.loop_id: r.parallel_group for r in session.loops}
    assert groups["s.b.2"] is not None and groups["s.b.2"].is_selected
    assert groups["s.a.1"] is not None and not groups["s.a.1"].is_selected
    assert groups["s.a.1"].all_loop_ids == ("s.a.1", "s.b.2")
    assert [r.loop_id for r in session.parallel_siblings("s.a.1")] == ["s.b.2", "s.a.1"]
    assert session.session_events is msgspec.UNSET  # phi-core's bytes by default


def test_checkpoint_completes_idle_sessions_only() -> None:
    recorder = SessionRecorder()
    recorder.record_all([start("a.c.1", "a"), end("a.c.1"), start("b.c.1", "b")])
    assert recorder.checkpoint() == 1
    assert [s.session_id for s in recorder.drain_completed()] == ["a"]
    assert recorder.current_loop("b.c.1") is not None
    assert recorder.drain_completed() == []


# -- the fixes --------------------------------------------------------------------------


def test_before_task_false_marks_the_session_rejected_but_records_it() -> None:
    calls: list[str] = []

    def veto(session: ps.Session) -> bool:
        calls.append(session.session_id)
        return session.session_id != "bad"

    events = [
        start("bad.c.1", "bad"),
        end("bad.c.1"),
        start("ok.c.1", "ok"),
        end("ok.c.1"),
        start("bad.c.2", "bad", at=2),
        end("bad.c.2", at=3),
    ]
    _, sessions = record(events, before_task=veto)
    by_id = {s.session_id: s for s in sessions}
    assert calls == ["bad", "ok"]
    assert by_id["bad"].is_rejected and len(by_id["bad"].loops) == 2
    assert b'"rejected": true' in ps.encode(by_id["bad"])
    assert b"rejected" not in ps.encode(by_id["ok"])


def test_after_task_fires_once_per_completion_by_flush_or_checkpoint() -> None:
    completed: list[str] = []
    recorder = SessionRecorder(after_task=lambda s: completed.append(s.session_id))
    recorder.record_all([start("a.c.1", "a"), end("a.c.1"), start("b.c.1", "b")])
    recorder.checkpoint()
    recorder.checkpoint()
    recorder.flush()
    recorder.flush()
    assert completed == ["a", "b"]


def test_unknown_loops_become_orphans_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    recorder = SessionRecorder()
    with caplog.at_level(logging.WARNING, logger="phi_session.recorder"):
        recorder.record_all(
            [
                ps.InputRejected(loop_id="ghost", reason="r"),
                ps.InputRejected(loop_id="ghost", reason="again"),
                start("s.c.1", "s"),
                end("s.c.1"),
                ps.InputRejected(loop_id="s.c.1", reason="too late"),
                end("never.started"),
                ps.ProgressMessage(loop_id="", tool_call_id="t", tool_name="judge", text="budget"),
            ]
        )
    assert [o.event.loop_id for o in recorder.orphans()] == ["ghost", "ghost", "s.c.1", "never.started", ""]
    assert sum("ghost" in r.message for r in caplog.records) == 1


def test_parallel_branches_are_pending_until_they_start_and_aborted_if_never() -> None:
    recorder = SessionRecorder()
    recorder.record_all(
        [
            start("s.c.1", "s"),
            end("s.c.1"),
            ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.2", "s.b.3"), timestamp=ts(5)),
        ]
    )
    pending = recorder.current_loop("s.b.3")
    assert pending is not None and pending.status == "Pending"
    recorder.record_all([start("s.a.2", "s", at=6), end("s.a.2", at=7)])
    assert recorder.checkpoint() == 1  # a Pending branch does not hold its session open (phi-core)
    recorder.flush()
    [session] = recorder.drain_completed()
    statuses = {r.loop_id: r.status for r in session.loops}
    assert statuses == {"s.c.1": "Completed", "s.a.2": "Completed", "s.b.3": "Aborted"}


def test_repeated_agent_start_keeps_the_open_record() -> None:
    events = [start("s.c.1", "s"), *turn("s.c.1"), start("s.c.1", "s", at=9), end("s.c.1", at=10)]
    _, [session] = record(events)
    [loop] = session.loops
    assert len(loop.turns) == 1 and loop.started_at == ts(0)
    assert sum(isinstance(e.event, ps.AgentStart) for e in loop.events) == 2


def test_a_repeated_agent_start_for_an_open_loop_opens_no_session_and_changes_no_header() -> None:
    """The repeat named another session (or a parent): it opened an empty session of that
    id (before_task fired for it) and set the loop's session's spawn link, though the
    repeat itself was kept only in the open loop's log."""
    opened: list[str] = []
    recorder = SessionRecorder(before_task=lambda s: opened.append(s.session_id))
    again = [start("a.c.1", "b", at=5), start("a.c.1", "a", at=6, parent="x.c.1")]
    recorder.record_all([start("a.c.1", "a"), *again, end("a.c.1", at=7)])
    recorder.flush()
    [session] = recorder.drain_completed()
    assert opened == ["a"]
    assert (session.session_id, session.parent_spawn_ref, session.last_active_at) == ("a", None, ts(0))
    [loop] = session.loops
    assert [e.event for e in loop.events if isinstance(e.event, ps.AgentStart)][1:] == again  # nothing lost


def test_an_agent_start_for_a_closed_loop_before_its_end_is_an_orphan_not_a_second_record() -> None:
    """The loop had ended but its session was not drained yet: a repeat from within its
    run opened a second record of the same id, and the session held the loop twice."""
    again = start("s.c.1", "s", at=1)
    late = [again, *turn("s.c.1", at=2), end("s.c.1", at=9)]
    recorder, [session] = record([start("s.c.1", "s"), *turn("s.c.1"), end("s.c.1", at=5), *late])
    [loop] = session.loops
    assert (loop.started_at, loop.ended_at, len(loop.turns)) == (ts(0), ts(5), 1)
    orphans = recorder.orphans()
    assert [orphan.event for orphan in orphans] == late  # nothing lost
    assert orphans[0].reason == "repeated AgentStart for an already closed loop"


def test_a_closed_loops_id_started_again_after_its_end_is_a_second_record() -> None:
    """phi-core names loops `{segment}.{N}` and parallel branches `{segment}.{k}`, so ids
    come again (wire-format §8.1): its recorder makes a second record, and so do we (the
    second loop was an orphan, lost to every store)."""
    recorder, [session] = record(
        [
            start("s.c.1", "s"),
            *turn("s.c.1"),
            end("s.c.1", at=2),
            start("s.c.1", "s", at=5),
            end("s.c.1", at=6),
        ]
    )
    assert [(r.loop_id, r.started_at, r.status) for r in session.loops] == [
        ("s.c.1", ts(0), "Completed"),
        ("s.c.1", ts(5), "Completed"),
    ]
    assert recorder.orphans() == []


def _evaluation(at: int, winner: str, tokens: tuple[int, int]) -> list[ps.AgentEvent]:
    """A parallel evaluation of two configurations, named as phi-core names its branches."""
    events: list[ps.AgentEvent] = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.claude.1", "s.gpt.2"), timestamp=ts(at))
    ]
    for loop_id, n in zip(("s.claude.1", "s.gpt.2"), tokens, strict=True):
        answer = assistant(f"{loop_id} at {at}")
        events += [
            start(loop_id, "s", at=at + 1),
            ps.AgentEnd(loop_id=loop_id, messages=(answer,), usage=usage(n), timestamp=ts(at + 2)),
        ]
    events.append(group_end("s", winner, at=at + 3))
    return events


def _saved_after_every_event(events: list[ps.AgentEvent]) -> dict[str, bytes]:
    """The session files of `events` checkpointed, drained and saved (merged) after each one."""
    from phi_session.stores.base import merge_sessions

    recorder = SessionRecorder()
    saved: dict[str, ps.Session] = {}
    for event in [*events, None]:
        if event is None:
            recorder.flush()
        else:
            recorder.on_event(event)
            recorder.checkpoint()
        for session in recorder.drain_completed():
            previous = saved.get(session.session_id)
            saved[session.session_id] = session if previous is None else merge_sessions(previous, session)
    return {session_id: ps.encode(session) for session_id, session in saved.items()}


@pytest.mark.parametrize("agent_loop_first", [False, True])
def test_a_second_parallel_evaluation_reusing_branch_ids_keeps_both_groups(agent_loop_first: bool) -> None:
    """A second `agent_loop_parallel` in a session names its branches as the first did (and
    branch 1 as the agent's own first loop of that configuration): its loops were orphans,
    and its winner was written over the first group's records."""
    before = [start("s.claude.1", "s"), end("s.claude.1")] if agent_loop_first else []
    events = [*before, *_evaluation(10, "s.claude.1", (1, 2)), *_evaluation(20, "s.gpt.2", (3, 4))]
    recorder, [session] = record(events)
    assert recorder.orphans() == []
    loops = session.loops[len(before) // 2 :]
    assert [(r.loop_id, r.started_at) for r in loops] == [
        ("s.claude.1", ts(11)),
        ("s.gpt.2", ts(11)),
        ("s.claude.1", ts(21)),
        ("s.gpt.2", ts(21)),
    ]
    assert [(g.selected_loop_id, g.is_selected) for g in (r.parallel_group for r in loops) if g] == [
        ("s.claude.1", True),
        ("s.claude.1", False),
        ("s.gpt.2", False),
        ("s.gpt.2", True),
    ]
    assert session.billed_usage().input == 1 + 2 + 3 + 4
    if agent_loop_first:
        assert session.loops[0].parallel_group is None
    assert _saved_after_every_event(events) == {"s": ps.encode(session)}


def test_a_lone_agent_end_of_a_branch_that_never_started_aborts_it() -> None:
    """phi-core's loop sends only an AgentEnd when a `before_loop` hook vetoes a branch:
    the Pending branch was recorded Completed, with no AgentStart in its log."""
    veto = end("s.b.2", at=2)
    events = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
        start("s.a.1", "s", at=1, agent="agent-x"),
        veto,
        end("s.a.1", at=3),
        group_end("s", "s.a.1", at=4),
    ]
    recorder, [session] = record(events)
    branch = session.get_loop("s.b.2")
    assert branch is not None and branch.status == "Aborted" and branch.ended_at == ts(2)
    assert [e.event for e in branch.events] == [veto]  # kept, as the loop's only event
    assert recorder.orphans() == []
    assert _saved_after_every_event(events) == {"s": ps.encode(session)}


def test_a_lone_agent_end_before_any_branch_started_makes_up_no_session() -> None:
    """Before any branch started, the veto made the session up: no agent id, created at the
    group's announcement, and `before_task` never called."""
    opened: list[str] = []
    veto = end("s.b.2", at=2)
    events = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
        veto,
        start("s.a.1", "s", at=3, agent="agent-x"),
        end("s.a.1", at=4),
        group_end("s", "s.a.1", at=5),
    ]
    recorder, [session] = record(events, before_task=lambda s: opened.append(s.session_id))
    assert (session.agent_id, session.created_at, opened) == ("agent-x", ts(3), ["s"])
    assert recorder.orphans() == []
    branch = session.get_loop("s.b.2")
    assert branch is not None and branch.status == "Aborted"  # at flush, as documented
    assert [e.event for e in branch.events] == [veto]


def test_a_branch_that_never_started_keeps_a_drained_sessions_header() -> None:
    """Drained before `flush` aborted its never-started branch, the session was amended
    with a header made up from the branch: created at the group's announcement."""
    events = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
        start("s.a.1", "s", at=1),
        end("s.a.1", at=2),
        group_end("s", "s.a.1", at=3),
    ]
    _, [whole] = record(events)
    assert whole.created_at == ts(1)
    assert _saved_after_every_event(events) == {"s": ps.encode(whole)}


def test_a_bare_id_continuation_after_its_parent_was_drained_is_no_sub_agent() -> None:
    """Once the parent's session was drained, the continuation's parent fell back to the
    id's prefix, which for a bare id is the id itself: a bogus `parent_spawn_ref`."""
    events = [
        start("0f1e2d3c", "s"),
        end("0f1e2d3c"),
        start("s.c.2", "s", at=2, parent="0f1e2d3c", kind=ps.DEFAULT),
    ]
    _, [whole] = record([*events, end("s.c.2", at=3)])
    assert whole.parent_spawn_ref is None
    assert _saved_after_every_event([*events, end("s.c.2", at=3)]) == {"s": ps.encode(whole)}


def test_a_compaction_pass_links_to_its_loop_after_a_drain_too() -> None:
    """phi-core links a compaction pass's record into its loop's first record (its own id);
    a store's merge skipped self-parented loops, so a drain in between lost the link."""
    events = [
        start("s.c.1", "s"),
        end("s.c.1"),
        start("s.c.1", "s", at=5, parent="s.c.1", kind=ps.COMPACTION),
        end("s.c.1", at=6),
        start("s.c.2", "s", at=7, parent="s.c.1", kind=ps.DEFAULT),
        end("s.c.2", at=8),
    ]
    _, [whole] = record(events)
    assert whole.loops[0].children_loop_ids == ("s.c.1", "s.c.2")
    assert _saved_after_every_event(events) == {"s": ps.encode(whole)}


def test_a_closed_loop_started_again_at_the_same_instant_is_replaced_in_its_place() -> None:
    """The loop sent again by a producer that learned more (an OTLP ingest that found the
    sub-agent's caller): the new record takes the ended one's place, as a store's merge
    of the two saves would, instead of an orphan."""
    again = [start("s.c.1", "s", parent="p.c.1"), *turn("s.c.1"), *turn("s.c.1", 1, at=1), end("s.c.1", at=2)]
    first = [start("s.c.1", "s"), *turn("s.c.1"), end("s.c.1", at=2)]
    recorder, [session] = record([*first, start("s.c.2", "s", at=3), end("s.c.2", at=4), *again])
    assert recorder.orphans() == []
    assert [(loop.loop_id, loop.parent_loop_id, len(loop.turns)) for loop in session.loops] == [
        ("s.c.1", "p.c.1", 2),
        ("s.c.2", None, 0),
    ]


def _sent_again_in_part(part: list[ps.AgentEvent]) -> None:
    """A loop of a duplicated or partly redelivered stream, started again at the same
    instant but never ended: the ended record stays, untouched, and the part sent again
    is kept in the orphans."""
    first = [start("s.c.1", "s"), *turn("s.c.1"), *turn("s.c.1", 1, at=1), end("s.c.1", at=2)]
    recorder = SessionRecorder(include_streaming_events=True)  # every event kept
    recorder.record_all([*first, start("s.c.2", "s", at=3), end("s.c.2", at=4)])
    before = ps.encode(recorder.get_session("s"))  # type: ignore[arg-type]
    recorder.record_all(part)
    assert ps.encode(recorder.get_session("s")) == before  # type: ignore[arg-type]
    recorder.flush()
    [session] = recorder.drain_completed()
    assert ps.encode(session) == before
    orphans = recorder.orphans()
    assert [orphan.event for orphan in orphans] == part  # nothing lost
    assert {orphan.reason for orphan in orphans} == {
        "loop sent again that never ended: its ended record is kept"
    }


def test_a_closed_loop_whose_agent_start_alone_is_sent_again_keeps_its_record() -> None:
    _sent_again_in_part([start("s.c.1", "s")])


def test_a_closed_loop_whose_first_half_is_sent_again_keeps_its_record() -> None:
    _sent_again_in_part([start("s.c.1", "s"), *turn("s.c.1")])


def test_a_closed_loop_sent_again_with_fewer_events_keeps_its_record() -> None:
    """Ended, but holding less than the record it would replace: a store's merge would keep
    the record (`merge_sessions`: of two finished versions, the one with more events)."""
    first = [start("s.c.1", "s"), *turn("s.c.1"), *turn("s.c.1", 1, at=1), end("s.c.1", at=2)]
    again = [start("s.c.1", "s", parent="p.c.1"), *turn("s.c.1"), end("s.c.1", at=2)]
    recorder, [whole] = record(first, include_streaming_events=True)
    recorder, [session] = record([*first, *again], include_streaming_events=True)
    assert ps.encode(session) == ps.encode(whole)
    orphans = recorder.orphans()
    assert [orphan.event for orphan in orphans] == again
    assert orphans[0].reason == "loop sent again with fewer events than its ended record, which is kept"


def test_a_session_whose_loop_is_being_sent_again_stays_complete() -> None:
    """Until the loop sent again ends, its session is what it was: complete once its loops
    ended, drained with the ended record; the record sent again, once it ends, comes back
    as an amendment, which a store merges in its place."""
    from phi_session.stores.base import merge_sessions

    first = [start("s.c.1", "s"), *turn("s.c.1"), end("s.c.1", at=2)]
    again = [start("s.c.1", "s", parent="p.c.1"), *turn("s.c.1"), *turn("s.c.1", 1, at=1), end("s.c.1", at=2)]
    completed: list[ps.Session] = []
    recorder = SessionRecorder(after_task=completed.append)
    recorder.record_all([*first, *again[:3]])
    assert recorder.checkpoint() == 1
    assert recorder.may_amend("s")  # the loop sent again may still replace its record
    [drained] = recorder.drain_completed()
    held = ps.encode(drained)
    assert [len(loop.turns) for loop in drained.loops] == [1]
    recorder.record_all(again[3:])
    recorder.flush()
    [amendment] = recorder.drain_completed()
    assert ps.encode(drained) == held  # handed over, never changed
    assert not recorder.may_amend("s")
    _, [whole] = record(again)
    assert ps.encode(merge_sessions(drained, amendment)) == ps.encode(whole)
    assert recorder.orphans() == [] and len(completed) == 1


def test_a_loop_sent_again_into_a_held_session_replaces_its_record_when_it_ends() -> None:
    """Held (not drained) meanwhile: the session is complete with the ended record until the
    record sent again ends; then it is completed again, with the new record in its place."""
    first = [start("s.c.1", "s"), *turn("s.c.1"), end("s.c.1", at=2)]
    again = [start("s.c.1", "s", parent="p.c.1"), *turn("s.c.1"), end("s.c.1", at=2)]
    completed: list[list[int]] = []
    recorder = SessionRecorder(
        include_streaming_events=True, after_task=lambda s: completed.append([len(r.events) for r in s.loops])
    )
    recorder.record_all([*first, *again[:-1]])
    assert recorder.checkpoint() == 1
    assert [r.parent_loop_id for r in recorder.get_session("s").loops] == [None]  # type: ignore[union-attr]
    recorder.on_event(again[-1])
    assert recorder.checkpoint() == 1
    [session] = recorder.drain_completed()
    assert [(r.parent_loop_id, len(r.events)) for r in session.loops] == [("p.c.1", len(again))]
    assert session.parent_spawn_ref is not None and session.parent_spawn_ref.parent_loop_id == "p.c.1"
    assert completed == [[len(first)], [len(again)]]


def test_a_compaction_pass_reusing_the_closed_loop_id_is_a_second_record() -> None:
    """phi-core's compaction pass reuses the last loop's id (wire-format §8.1, §14 item 10)."""
    compaction = start("s.c.1", "s", at=5, parent="s.c.1", kind=ps.COMPACTION)
    recorder, [session] = record([start("s.c.1", "s"), end("s.c.1"), compaction, end("s.c.1", at=6)])
    assert [(r.loop_id, r.continuation_kind) for r in session.loops] == [
        ("s.c.1", ps.INITIAL),
        ("s.c.1", ps.COMPACTION),
    ]
    assert recorder.orphans() == []


def test_a_held_session_id_seen_again_joins_its_session() -> None:
    opened: list[str] = []
    recorder = SessionRecorder(before_task=lambda s: opened.append(s.session_id))
    recorder.record_all([start("s.c.1", "s"), end("s.c.1")])
    recorder.checkpoint()
    recorder.record_all([start("s.c.2", "s", at=5, parent="s.c.1", kind=ps.DEFAULT), end("s.c.2", at=6)])
    recorder.flush()
    [session] = recorder.drain_completed()
    assert opened == ["s"]
    assert [r.loop_id for r in session.loops] == ["s.c.1", "s.c.2"]
    assert session.get_loop("s.c.1").children_loop_ids == ("s.c.2",)  # type: ignore[union-attr]
    assert session.last_active_at == ts(5)


def test_revert_applied_is_stored() -> None:
    revert = ps.RevertApplied(
        loop_id="s.c.1", category="failure", target=3, abandoned_node_ids=(4,), applied=True, timestamp=ts(1)
    )
    _, [session] = record([start("s.c.1", "s"), revert, end("s.c.1", at=2)])
    assert session.loops[0].events[1].event == revert


def test_flush_aborts_open_loops_in_start_order_and_links_them() -> None:
    events = [
        start("s.c.1", "s"),
        end("s.c.1"),
        start("s.c.3", "s", at=3, parent="s.c.1"),
        start("s.c.2", "s", at=2, parent="s.c.1"),
        *turn("s.c.2")[:2],
    ]
    _, [session] = record(events)
    assert [(r.loop_id, r.status) for r in session.loops] == [
        ("s.c.1", "Completed"),
        ("s.c.3", "Aborted"),
        ("s.c.2", "Aborted"),
    ]
    assert session.get_loop("s.c.1").children_loop_ids == ("s.c.3", "s.c.2")  # type: ignore[union-attr]
    assert all(r.ended_at is None for r in session.loops[1:])


def test_sub_agent_detection_uses_what_the_recorder_saw() -> None:
    # A same-session continuation of a bare-UUID loop: phi-core mistakes it for a sub-agent.
    events = [
        start("0f1e2d3c", "s"),
        end("0f1e2d3c"),
        start("s.c.2", "s", parent="0f1e2d3c", kind=ps.DEFAULT),
        end("s.c.2"),
    ]
    _, [session] = record(events)
    assert session.parent_spawn_ref is None
    assert session.get_loop("0f1e2d3c").children_loop_ids == ("s.c.2",)  # type: ignore[union-attr]


def test_child_started_after_the_tool_ended_still_gets_a_complete_spawn_ref() -> None:
    events = [
        start("p.c.1", "p"),
        ps.ToolExecutionEnd(
            loop_id="p.c.1",
            tool_call_id="t1",
            tool_name="sub",
            result=ps.ToolResult(content=(), child_loop_id="k.sub.1"),
            is_error=False,
        ),
        start("k.sub.1", "k", parent="p.c.1"),
        end("k.sub.1"),
        end("p.c.1"),
    ]
    _, sessions = record(events)
    child = next(s for s in sessions if s.session_id == "k")
    assert child.parent_spawn_ref == ps.SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="t1", tool_name="sub"
    )


def test_session_events_are_kept_and_optionally_written() -> None:
    events = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1",), timestamp=ts(0)),
        start("s.a.1", "s"),
        end("s.a.1"),
        ps.ParallelLoopEnd(
            session_id="s",
            selected_loop_id="s.a.1",
            selected_config_index=0,
            evaluation_usage=usage(0),
            timestamp=ts(2),
        ),
    ]
    recorder = SessionRecorder(keep_session_events=True)
    recorder.record_all(events)
    assert [type(e).__name__ for e in recorder.session_events("s")] == [
        "ParallelLoopStart",
        "ParallelLoopEnd",
    ]
    recorder.flush()
    [session] = recorder.drain_completed()
    again = ps.decode_session(ps.encode(session))
    assert again.session_events == [events[0], events[3]]


def least_peak(recorder: SessionRecorder, batches: list[list[ps.AgentEvent]]) -> int:
    """The least memory that recording one of `batches` took at its peak: the least of a
    few, as a list's rare regrowth is no copy per event."""
    tracemalloc.start()
    try:
        peaks = []
        for batch in batches:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            recorder.record_all(batch)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return min(peaks)


@pytest.mark.parametrize("keep", [False, True])
def test_a_session_event_costs_the_same_however_many_came_before(keep: bool) -> None:
    """Each parallel event copied all its session's earlier ones (twice when kept in the
    file): a long session of parallel groups was recorded in quadratic time."""
    recorder = SessionRecorder(keep_session_events=keep)
    recorder.on_event(start("s.c.1", "s"))
    group = [ps.ParallelLoopStart(session_id="s", loop_ids=(), timestamp=ts(0)), group_end("s", "s.c.1")]
    recorder.record_all(group * 2000)
    assert least_peak(recorder, [[event] for event in group * 4]) < 4000  # 4000 references take 32 kB
    assert len(recorder.session_events("s")) == 4008


@pytest.mark.parametrize("parent_ends_first", [True, False])
def test_a_child_loop_costs_the_same_however_many_came_before(parent_ends_first: bool) -> None:
    """Each child loop copied its parent's children ids: 16,000 continuations of one
    loop took 3.8 s to record, quadratic in the number of children."""
    recorder = SessionRecorder()
    recorder.on_event(start("s.c.1", "s"))
    if parent_ends_first:
        recorder.on_event(end("s.c.1"))

    def child(n: int) -> list[ps.AgentEvent]:
        return [start(f"s.c.{n}", "s", parent="s.c.1", kind=ps.DEFAULT), end(f"s.c.{n}")]

    recorder.record_all([event for n in range(2, 4002) for event in child(n)])
    assert least_peak(recorder, [child(n) for n in range(4002, 4006)]) < 8000  # 4000 ids take 32 kB
    expected = tuple(f"s.c.{n}" for n in range(2, 4006))
    if parent_ends_first:
        assert recorder.get_session("s").loops[0].children_loop_ids == expected  # type: ignore[union-attr]
    else:
        assert recorder.current_loop("s.c.1").children_loop_ids == expected  # type: ignore[union-attr]
        recorder.on_event(end("s.c.1"))
    recorder.flush()
    [session] = recorder.drain_completed()
    assert session.get_loop("s.c.1").children_loop_ids == expected  # type: ignore[union-attr]


def test_drained_orphans_leave_nothing_behind(caplog: pytest.LogCaptureFixture) -> None:
    """Each orphan's loop id stayed in the set that limits warnings to one per loop, after
    the orphans were drained: a long-running recorder (a persisting one drains them at
    every checkpoint) grew by every loop that ever had a late event."""
    recorder = SessionRecorder()
    recorder.on_event(end("x.c.0"))
    recorder.drain_orphans()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with caplog.at_level(logging.ERROR, logger="phi_session.recorder"):  # no log records kept
            for n in range(2000):
                recorder.on_event(end(f"{'x' * 1000}.c.{n}"))
        recorder.drain_orphans()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000  # 2000 ids of 1 kB are 2 MB
    with caplog.at_level(logging.WARNING, logger="phi_session.recorder"):
        recorder.on_event(end("x.c.0"))
    assert "x.c.0" in caplog.text  # warned again: once per loop between drains


def test_failed_loop_is_visible_and_still_phi_core_shaped() -> None:
    failure = ps.AgentEnd(loop_id="s.c.1", messages=(), usage=usage(0), timestamp=ts(1), error="Boom: bad")
    _, [session] = record([start("s.c.1", "s"), failure])
    loop = session.loops[0]
    assert loop.status == "Aborted" and loop.error == "Boom: bad"
    assert ps.decode_session(ps.encode(session)).loops[0].error == "Boom: bad"


@pytest.mark.spec
def test_on_json_decodes_and_drops_deltas_cheaply() -> None:
    recorder = SessionRecorder()
    for raw in (EXAMPLES / "events-basic.jsonl").read_bytes().splitlines():
        recorder.on_json(raw)
    assert recorder.dropped_deltas == 4
    with pytest.raises(ps.DecodeError):
        recorder.on_json(b'{"type":"TurnStart"}')


def test_an_agent_end_whose_own_error_key_holds_null_completes_its_loop_as_phi_core_does() -> None:
    """The line was refused as malformed, and the loop saved Aborted with 0 tokens."""
    reply = assistant("hi")
    recorder = SessionRecorder()
    recorder.on_json(ps.encode(start("s.c.1", "s")))
    recorder.on_json(ps.encode(end("s.c.1", messages=(reply,)))[:-1] + b',"error":null}')
    recorder.flush()
    (loop,) = recorder.drain_completed()[0].loops
    assert (loop.status, loop.usage.total_tokens, loop.messages, loop.error) == (
        "Completed",
        20,
        (reply,),
        msgspec.UNSET,
    )


def test_drain_forgets_everything_about_drained_sessions() -> None:
    recorder = SessionRecorder()
    for i in range(50):
        recorder.record_all([start(f"s{i}.c.1", f"s{i}"), *turn(f"s{i}.c.1", calls=1), end(f"s{i}.c.1")])
        recorder.checkpoint()
        recorder.drain_completed()
    assert recorder.stats()["open_loops"] == 0
    assert not recorder._loop_session and not recorder._closed_by_id and not recorder._spawns


def test_on_event_is_safe_from_several_threads() -> None:
    recorder = SessionRecorder()

    def feed(n: int) -> None:
        for j in range(20):
            loop_id = f"t{n}.c.{j}"
            recorder.record_all([start(loop_id, f"t{n}"), *turn(loop_id, calls=1), end(loop_id)])

    threads = [threading.Thread(target=feed, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.flush()
    sessions = recorder.drain_completed()
    assert len(sessions) == 8 and all(len(s.loops) == 20 for s in sessions)
    assert all(
        [e.sequence for e in r.events] == list(range(len(r.events))) for s in sessions for r in s.loops
    )


def test_config_must_not_be_given_twice() -> None:
    with pytest.raises(TypeError):
        SessionRecorder(SessionRecorderConfig(), include_streaming_events=True)


def test_a_config_of_another_type_is_a_type_error() -> None:
    """It raised AttributeError (no include_streaming_events)."""
    with pytest.raises(TypeError, match=r"^config must be SessionRecorderConfig or None, not int$"):
        SessionRecorder(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        # "false" from a config file turned streaming events on.
        (
            {"include_streaming_events": "false"},
            TypeError,
            r"^include_streaming_events must be bool, not str$",
        ),
        ({"capture_turn_requests": 1}, TypeError, r"^capture_turn_requests must be bool, not int$"),
        ({"keep_session_events": "no"}, TypeError, r"^keep_session_events must be bool, not str$"),
        # These failed at every session, logged, the hook lost.
        ({"before_task": 42}, TypeError, r"^before_task must be callable or None, not int$"),
        ({"after_task": "x"}, TypeError, r"^after_task must be callable or None, not str$"),
        # "1h" failed at a checkpoint; -5, NaN and infinity were taken as given.
        ({"group_end_timeout": "1h"}, TypeError, r"^group_end_timeout must be a number of seconds or None"),
        ({"group_end_timeout": -5}, ps.InvalidArgument, r"^group_end_timeout must be a finite number .* -5$"),
        ({"group_end_timeout": float("nan")}, ps.InvalidArgument, r"^group_end_timeout must be .*, got nan$"),
        ({"group_end_timeout": float("inf")}, ps.InvalidArgument, r"^group_end_timeout must be .*, got inf$"),
    ],
)
def test_config_values_are_checked_where_given(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        SessionRecorderConfig(**options)
    with pytest.raises(error, match=message):
        SessionRecorder(**options)


def test_config_values_that_are_accepted() -> None:
    config = SessionRecorderConfig(
        include_streaming_events=True, before_task=print, after_task=None, group_end_timeout=0
    )
    assert config.group_end_timeout == 0 and config.before_task is print
    assert SessionRecorderConfig(group_end_timeout=None).group_end_timeout is None
    assert SessionRecorderConfig(group_end_timeout=1.5).group_end_timeout == 1.5
    # Decoding checks too (nothing decodes a config now; msgspec runs __post_init__ there).
    assert msgspec.convert({"keep_session_events": True}, SessionRecorderConfig).keep_session_events
    with pytest.raises(msgspec.ValidationError, match="group_end_timeout must be"):
        msgspec.convert({"group_end_timeout": -1.0}, SessionRecorderConfig)


# -- properties ------------------------------------------------------------------------------


@st.composite
def interleaved_streams(draw: st.DrawFn) -> tuple[list[ps.AgentEvent], int]:
    """Several loops over several sessions, each well formed, shuffled together."""
    n_sessions = draw(st.integers(min_value=1, max_value=3))
    streams: list[list[ps.AgentEvent]] = []
    for s in range(n_sessions):
        for n in range(draw(st.integers(min_value=1, max_value=3))):
            loop_id = f"sess{s}.cfg.{n + 1}"
            events: list[ps.AgentEvent] = [
                start(loop_id, f"sess{s}", at=n, parent=f"sess{s}.cfg.1" if n else None)
            ]
            for t in range(draw(st.integers(min_value=0, max_value=2))):
                events += turn(loop_id, t, calls=draw(st.integers(min_value=0, max_value=2)), at=10 * t)
            if draw(st.booleans()):
                events.append(end(loop_id, at=99))
            streams.append(events)
    merged: list[ps.AgentEvent] = []
    cursors = [0] * len(streams)
    while any(c < len(s) for c, s in zip(cursors, streams, strict=True)):
        live = [i for i, s in enumerate(streams) if cursors[i] < len(s)]
        pick = draw(st.sampled_from(live))
        merged.append(streams[pick][cursors[pick]])
        cursors[pick] += 1
    return merged, sum(1 for s in streams for _ in s)


@settings(max_examples=60, deadline=None)
@given(interleaved_streams(), st.booleans())
def test_interleaved_loops_lose_nothing(stream: tuple[list[ps.AgentEvent], int], keep_deltas: bool) -> None:
    events, total = stream
    recorder, sessions = record(events, include_streaming_events=keep_deltas)
    stored = sum(len(r.events) for s in sessions for r in s.loops)
    assert stored + recorder.dropped_deltas + len(recorder.orphans()) == total
    assert not recorder.orphans()
    loop_ids = [r.loop_id for s in sessions for r in s.loops]
    assert len(loop_ids) == len(set(loop_ids))  # each loop in exactly one session
    expected_loops = {e.loop_id for e in events if isinstance(e, ps.AgentStart)}
    assert set(loop_ids) == expected_loops
    for session in sessions:
        for loop in session.loops:
            assert loop.session_id == session.session_id
            assert [e.sequence for e in loop.events] == list(range(len(loop.events)))
        data = ps.encode(session)
        assert ps.encode(ps.decode_session(data)) == data


def _example_events() -> list[ps.AgentEvent]:
    return [ps.decode_event(line) for path in sorted(EXAMPLES.glob("events-*.jsonl")) for line in path.open()]


@pytest.mark.spec
@settings(max_examples=80, deadline=None)
@given(st.data(), st.booleans())
def test_any_reordering_truncation_or_repeat_of_real_streams_loses_nothing(
    data: st.DataObject, keep_deltas: bool
) -> None:
    """phi-core's own streams, shuffled, cut, repeated, checkpointed and drained at random,
    and loops sent again (from the same instant, whole or cut) anywhere: nothing raises, and
    every event is in exactly one place: a loop's log, its session's events or the orphans
    (deltas may be dropped, and counted), but for a loop sent again whole, whose record
    may replace the first (the same events); drained sessions are never written to again."""
    pool = _example_events()
    events = data.draw(st.lists(st.sampled_from(pool), max_size=120) | st.just(pool))
    loops: list[list[ps.AgentEvent]] = []  # each loop's events, from its AgentStart
    latest: dict[str, list[ps.AgentEvent]] = {}
    for event in pool:
        if isinstance(event, ps.AgentStart):
            latest[event.loop_id] = []
            loops.append(latest[event.loop_id])
        if getattr(event, "loop_id", None) in latest:
            latest[event.loop_id].append(event)  # type: ignore[attr-defined]
    resent: set[int] = set()  # the events of loops sent again whole
    for loop in data.draw(st.lists(st.sampled_from(loops), max_size=4)):
        again = loop[: data.draw(st.just(len(loop)) | st.integers(min_value=1, max_value=len(loop)))]
        if len(again) == len(loop):
            resent.update(map(id, again))
        at = data.draw(st.integers(min_value=0, max_value=len(events)) | st.just(len(events)))
        events = [*events[:at], *again, *events[at:]]
    # Some runs drain rarely or never, so that a loop is sent again into a session still held.
    kinds = data.draw(st.sampled_from([["", "", "", "checkpoint", "drain"], ["", "", "checkpoint"], [""]]))
    actions = data.draw(st.lists(st.sampled_from(kinds), min_size=len(events)))
    recorder = SessionRecorder(include_streaming_events=keep_deltas, keep_session_events=True)
    drained: list[ps.Session] = []
    for event, action in zip(events, actions, strict=False):
        recorder.on_event(event)
        if action == "checkpoint":
            recorder.checkpoint()
        elif action == "drain":
            drained += recorder.drain_completed()
    frozen = [ps.encode(session) for session in drained]
    recorder.flush()
    drained += recorder.drain_completed()
    assert [ps.encode(session) for session in drained[: len(frozen)]] == frozen
    found = [orphan.event for orphan in recorder.orphans()]
    logs = {id(loop.events): loop.events for session in drained for loop in session.loops}
    found += [e.event for log in logs.values() for e in log]  # an amendment's copy shares its log
    for session in drained:
        found += session.session_events or []
    sent, kept = _identities(events), _identities(found)
    assert not kept - sent  # nothing twice
    replaced = sent - kept  # what a loop sent again whole replaced: its own events again
    assert all(kept[identity] and identity in resent for identity in replaced)
    deltas = sum(type(event) is ps.MessageUpdate for event in found) + recorder.dropped_deltas
    sent_deltas = [event for event in events if type(event) is ps.MessageUpdate]
    assert 0 <= len(sent_deltas) - deltas <= sum(id(event) in resent for event in sent_deltas)


def _identities(events: list[ps.AgentEvent]) -> collections.Counter[int]:
    """Each event but the deltas, as often as it occurs (the deltas may be dropped)."""
    return collections.Counter(id(event) for event in events if type(event) is not ps.MessageUpdate)


def test_parallel_end_after_its_session_was_drained_is_an_orphan_not_a_leak() -> None:
    recorder = SessionRecorder()
    recorder.record_all([start("s.a.1", "s"), end("s.a.1")])
    recorder.checkpoint()
    recorder.drain_completed()
    late = ps.ParallelLoopEnd(
        session_id="s",
        selected_loop_id="s.a.1",
        selected_config_index=0,
        evaluation_usage=usage(0),
        timestamp=ts(3),
    )
    recorder.on_event(late)
    assert [o.event for o in recorder.orphans()] == [late]
    assert not recorder._early_events


def test_write_ahead_sees_kept_events_in_order_before_they_apply() -> None:
    seen: list[bytes | str] = []
    recorder = SessionRecorder()

    def hook(line: bytes | str) -> None:
        event = ps.decode_event(line)
        loop = recorder.current_loop(getattr(event, "loop_id", ""))
        assert loop is None or all(e.event != event for e in loop.events)  # not applied yet
        seen.append(line)

    recorder.set_write_ahead(hook)
    events = [start("s.c.1", "s"), *turn("s.c.1"), end("s.c.1")]
    recorder.on_json(ps.encode(events[0]))
    recorder.record_all(events[1:])
    kept = [e for e in events if not isinstance(e, ps.MessageUpdate)]
    assert [ps.decode_event(line) for line in seen] == kept  # the dropped delta is not passed
    with pytest.raises(ps.DecodeError):
        recorder.on_json(b"{broken")
    assert len(seen) == len(kept)


def group_end(session: str, selected: str, *, at: int = 2) -> ps.ParallelLoopEnd:
    return ps.ParallelLoopEnd(
        session_id=session,
        selected_loop_id=selected,
        selected_config_index=1,
        evaluation_usage=usage(1),
        timestamp=ts(at),
    )


def spawn_end(parent: str, child: str, call: str = "t") -> ps.ToolExecutionEnd:
    return ps.ToolExecutionEnd(
        loop_id=parent,
        tool_call_id=call,
        tool_name="sub",
        result=ps.ToolResult(content=(), child_loop_id=child),
        is_error=False,
    )


def test_checkpoint_completes_a_sub_agent_session_before_its_tool_call_ends() -> None:
    recorder = SessionRecorder()
    recorder.record_all([start("p.c.1", "p"), start("k.sub.1", "k", parent="p.c.1"), end("k.sub.1")])
    assert recorder.checkpoint() == 1  # phi-core: every loop of k has ended
    recorder.on_event(spawn_end("p.c.1", "k.sub.1"))  # promoted, not drained: enriched in place
    [child] = recorder.drain_completed()
    assert child.parent_spawn_ref == ps.SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="t", tool_name="sub"
    )


def test_checkpoint_completes_a_session_whose_branches_ended_before_their_group() -> None:
    recorder = SessionRecorder()
    recorder.record_all(
        [
            ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
            start("s.a.1", "s"),
            start("s.b.2", "s"),
            end("s.a.1"),
            end("s.b.2"),
        ]
    )
    assert recorder.checkpoint() == 1  # phi-core: every loop of s has ended
    recorder.on_event(group_end("s", "s.b.2"))
    [session] = recorder.drain_completed()
    assert [(r.loop_id, r.parallel_group and r.parallel_group.is_selected) for r in session.loops] == [
        ("s.a.1", False),
        ("s.b.2", True),
    ]


def test_what_a_drained_session_learns_later_comes_back_as_an_amendment() -> None:
    from phi_session.stores.base import merge_sessions

    events: list[ps.AgentEvent] = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
        start("s.a.1", "s"),
        end("s.a.1"),
        start("s.b.2", "s", at=1),
        end("s.b.2", at=2),
        start("p.c.1", "p", at=2),
        start("k.sub.1", "k", at=3, parent="p.c.1"),
        end("k.sub.1", at=4),
        start("s.c.3", "s", at=4),
        group_end("s", "s.b.2", at=5),
        end("s.c.3", at=6),
        spawn_end("p.c.1", "k.sub.1"),
        end("p.c.1", at=7),
    ]
    _, whole = record(events, keep_session_events=True)
    recorder = SessionRecorder(keep_session_events=True)
    saved: dict[str, ps.Session] = {}
    handed: list[tuple[ps.Session, bytes]] = []
    for event in events:
        recorder.on_event(event)
        recorder.checkpoint()
        for session in recorder.drain_completed():
            handed.append((session, ps.encode(session)))
            previous = saved.get(session.session_id)
            saved[session.session_id] = session if previous is None else merge_sessions(previous, session)
        if isinstance(event, ps.AgentEnd) and event.loop_id == "k.sub.1":
            assert recorder.may_amend("k")  # drained, still owed its tool call
    recorder.flush()
    assert recorder.drain_completed() == []
    assert not recorder.may_amend("s") and not recorder.may_amend("k")
    assert {sid: ps.encode(s) for sid, s in saved.items()} == {s.session_id: ps.encode(s) for s in whole}
    assert all(ps.encode(session) == data for session, data in handed)  # handed over, never changed
    amendment = [s for s, _ in handed if s.session_id == "k"][-1]
    assert amendment.loops == [] and amendment.parent_spawn_ref is not None
    assert amendment.parent_spawn_ref.tool_call_id == "t"


# A spawner p.c.1 whose tool call t runs the sub-agent k.sub.1, in every order a producer
# may send them in.
_SPAWN_STEPS: dict[str, ps.AgentEvent] = {
    "p starts": start("p.c.1", "p"),
    "k starts": start("k.sub.1", "k", at=1, parent="p.c.1"),
    "k ends": end("k.sub.1", at=2),
    "t ends": spawn_end("p.c.1", "k.sub.1"),
    "p ends": end("p.c.1", at=3),
}
_SPAWN_ORDERS = [
    ("p starts", "k starts", "k ends", "t ends", "p ends"),  # phi-core's: k runs in the tool call
    ("p starts", "k starts", "t ends", "k ends", "p ends"),
    ("p starts", "t ends", "k starts", "k ends", "p ends"),
    ("p starts", "t ends", "k starts", "p ends", "k ends"),
    ("p starts", "t ends", "p ends", "k starts", "k ends"),  # an OTLP ingest's: the caller's loop whole first
]


@pytest.mark.parametrize("drained_after", ["never", "each event", *range(5)])
@pytest.mark.parametrize("order", _SPAWN_ORDERS, ids=", ".join)
def test_a_sub_agent_gets_its_whole_spawn_ref_however_its_sessions_are_drained(
    order: tuple[str, ...], drained_after: str | int
) -> None:
    """A spawner drained before its sub-agent started took its tool call with it: the
    sub-agent's spawn ref was saved without it (by the OTLP endpoint, when its periodic
    checkpoint fell between a caller's payload and its sub-agent's)."""
    from phi_session.stores.base import merge_sessions

    events = [_SPAWN_STEPS[step] for step in order]
    _, whole = record(events)
    recorder = SessionRecorder()
    saved: dict[str, ps.Session] = {}
    handed: list[ps.Session] = []

    def save(drained: list[ps.Session]) -> None:
        for session in drained:
            handed.append(session)
            previous = saved.get(session.session_id)
            saved[session.session_id] = session if previous is None else merge_sessions(previous, session)

    for index, event in enumerate(events):
        recorder.on_event(event)
        if drained_after in ("each event", index):
            recorder.checkpoint()
            save(recorder.drain_completed())
    recorder.checkpoint()  # every loop has ended: the stream may go on
    save(recorder.drain_completed())
    spawn = ps.SpawnRef(parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="t", tool_name="sub")
    assert [s.parent_spawn_ref for s in handed if s.session_id == "k"][-1] == spawn  # the recorder's
    assert {sid: ps.encode(s) for sid, s in saved.items()} == {s.session_id: ps.encode(s) for s in whole}
    assert not recorder._spawns and not recorder._awaited_spawns  # nothing kept for what is saved


def test_a_hub_s_tool_calls_ending_find_their_drained_sub_agents_without_a_scan() -> None:
    """A hub loop's sub-agents, each checkpointed as its loop ended and drained while the
    tool call that spawned it ran: each tool call's end looked through the loops of every
    sibling still owed its own (961 us an event at 20,000 children, the ends in reverse)."""
    recorder = SessionRecorder()
    children = [f"k{i}" for i in range(40)]
    recorder.on_event(start("hub.c.1", "hub"))
    drained: list[ps.Session] = []
    for child in children:
        recorder.record_all([start(f"{child}.sub.1", child, parent="hub.c.1"), end(f"{child}.sub.1")])
        assert recorder.checkpoint(loop_id=f"{child}.sub.1") == 1
        drained += recorder.drain_completed()
    assert all(recorder.may_amend(child) for child in children)
    for session in drained:
        session.loops = CountedLoops(session.loops)
    recorder.record_all(spawn_end("hub.c.1", f"{child}.sub.1", call=child) for child in reversed(children))
    assert max(session.loops.passes for session in drained) == 1  # type: ignore[attr-defined]
    amended = recorder.drain_completed()
    assert [(s.session_id, s.parent_spawn_ref.tool_call_id) for s in amended] == [  # type: ignore[union-attr]
        (child, child) for child in reversed(children)
    ]
    assert not any(recorder.may_amend(child) for child in children)


def test_a_spawn_learned_outside_the_stream_completes_the_sub_agents_ref() -> None:
    """`await_spawn`: what a journal's recovery reads from the store for a spawner it no
    longer replays; `lacks_spawner` says when the recorder needs it."""
    recorder = SessionRecorder()
    assert recorder.lacks_spawner("k.sub.1", "p.c.1")
    recorder.on_event(start("q.c.1", "q"))
    assert not recorder.lacks_spawner("j.sub.1", "q.c.1")  # its parent loop is here
    ref = ps.ChildLoopRef(tool_call_id="t", tool_name="sub", child_loop_id="k.sub.1", child_session_id="k")
    recorder.await_spawn("p", "p.c.1", ref)
    assert not recorder.lacks_spawner("k.sub.1", "p.c.1")
    recorder.record_all([start("k.sub.1", "k", parent="p.c.1"), end("k.sub.1")])
    recorder.flush()
    [child] = [s for s in recorder.drain_completed() if s.session_id == "k"]
    assert child.parent_spawn_ref == ps.SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="t", tool_name="sub"
    )


def test_a_sub_agent_that_never_starts_is_awaited_until_flush_among_the_latest_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from phi_session import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "_AWAITED_SPAWNS", 2)
    recorder = SessionRecorder()
    for n in range(3):
        recorder.record_all(
            [start(f"p{n}.c.1", f"p{n}"), spawn_end(f"p{n}.c.1", f"k{n}.sub.1"), end(f"p{n}.c.1")]
        )
        recorder.checkpoint()
        recorder.drain_completed()
    assert list(recorder._awaited_spawns) == ["k1.sub.1", "k2.sub.1"]  # the oldest given up
    recorder.record_all([start("k0.sub.1", "k0", parent="p0.c.1"), start("k1.sub.1", "k1", parent="p1.c.1")])
    recorder.flush()
    refs = {s.session_id: s.parent_spawn_ref for s in recorder.drain_completed()}
    assert refs["k0"] is not None and refs["k0"].tool_call_id == ""  # phi-core's provisional ref
    assert refs["k1"] is not None and refs["k1"].tool_call_id == "t"
    assert not recorder._spawns and not recorder._awaited_spawns  # k2 never came: the stream ended


def test_a_debt_that_lapses_is_forgotten() -> None:
    recorder = SessionRecorder()
    recorder.record_all([start("p.c.1", "p"), start("k.sub.1", "k", parent="p.c.1"), end("k.sub.1")])
    recorder.checkpoint()
    recorder.drain_completed()
    assert recorder.may_amend("k")
    recorder.on_event(end("p.c.1", at=3))  # the parent ended without naming its sub-agent
    assert not recorder.may_amend("k")
    recorder.checkpoint()
    assert [s.session_id for s in recorder.drain_completed()] == ["p"]


def _groups_recorded(starts: list[ps.AgentEvent], ends: list[ps.AgentEvent]) -> SessionRecorder:
    """Parallel `starts`, three branches of session s, `ends`: checkpointed and drained."""
    recorder = SessionRecorder()
    branches = [event for loop in ("s.a.1", "s.b.1", "s.a.2") for event in (start(loop, "s"), end(loop))]
    recorder.record_all([*starts, *branches, *ends])
    recorder.checkpoint()
    recorder.drain_completed()
    return recorder


GROUP_1 = ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.1"), timestamp=ts(0))
GROUP_2 = ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.2", "s.b.2"), timestamp=ts(0))


def reaches(root: object, target: object) -> bool:
    """Whether `target` can be reached from `root` through references."""
    seen, todo = {id(root)}, [root]
    while todo:
        for referent in gc.get_referents(todo.pop()):
            if referent is target:
                return True
            if id(referent) not in seen and not isinstance(referent, type | types.ModuleType):
                seen.add(id(referent))
                todo.append(referent)
    return False


def test_a_group_that_never_ends_is_given_up_after_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A killed agent's group never ends: its drained session stayed in the recorder, owed
    (`may_amend`, which pins its journal records), and its never-started branch stayed
    open, until flush. Now the checkpoint after ``group_end_timeout`` of stream time
    gives the group up; its session had been complete all along (phi-core's rule)."""
    recorder = SessionRecorder(group_end_timeout=60)
    branches = ("s.a.1", "s.b.1", "s.c.1")  # s.c.1 never starts
    group = ps.ParallelLoopStart(session_id="s", loop_ids=branches, timestamp=ts(0))
    recorder.record_all([group, start("s.a.1", "s"), start("s.b.1", "s"), end("s.a.1"), end("s.b.1")])
    assert recorder.checkpoint() == 1
    [drained] = recorder.drain_completed()
    recorder.record_all([start("t.c.1", "t", at=59_000), end("t.c.1", at=59_001)])
    recorder.checkpoint()
    recorder.drain_completed()
    assert recorder.may_amend("s") and recorder.open_loop_ids() == ["s.c.1"]  # within the timeout
    assert reaches(recorder, drained)
    recorder.record_all([start("t.c.2", "t", at=61_000), end("t.c.2", at=61_001)])
    with caplog.at_level(logging.WARNING, logger="phi_session.recorder"):
        assert recorder.checkpoint() == 2  # t, and s with its branch that never started
    assert len(caplog.records) == 1
    assert not recorder.may_amend("s") and recorder.open_loop_ids() == []
    amended = {session.session_id: session for session in recorder.drain_completed()}["s"]
    assert [(loop.loop_id, loop.status) for loop in amended.loops] == [("s.c.1", "Aborted")]
    assert not reaches(recorder, drained) and recorder._late_since == {}  # the recorder keeps nothing of it
    late = group_end("s", "s.b.1")
    recorder.on_event(late)
    assert [orphan.event for orphan in recorder.orphans()] == [late]


def test_a_group_announced_by_an_agent_that_died_before_its_branches_is_given_up_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An agent killed between its ParallelLoopStart and its first branch: the group, its
    Pending branches and the announcement waiting for the session's first loop were kept
    until flush (20,000 sessions later: 2 open loops, 2 groups, 1 early event, and an
    AutoPersistingRecorder's journal pinned from the announcement on). Now the checkpoint
    after ``group_end_timeout`` of stream time gives it up as `abort_session` would: its
    branches Aborted in a session of their own, drained; a later end is an orphan."""
    recorder = SessionRecorder(group_end_timeout=60)
    group = ps.ParallelLoopStart(session_id="dead", loop_ids=("dead.a.1", "dead.b.2"), timestamp=ts(0))
    recorder.record_all([start("t.c.0", "t", at=0), end("t.c.0", at=1), group])
    recorder.record_all([start("t.c.1", "t", at=59_000), end("t.c.1", at=59_001)])
    assert recorder.checkpoint() == 1
    recorder.drain_completed()
    assert recorder.has_early_events("dead") and recorder.stats()["open_loops"] == 2  # within the timeout
    recorder.record_all([start("t.c.2", "t", at=61_000), end("t.c.2", at=61_001)])
    with caplog.at_level(logging.WARNING, logger="phi_session.recorder"):
        assert recorder.checkpoint() == 2  # t, and dead with its branches that never started
    assert [record.getMessage() for record in caplog.records] == [
        "session dead: parallel group without ParallelLoopEnd after 60 s given up"
    ]
    dead = {session.session_id: session for session in recorder.drain_completed()}["dead"]
    assert [(loop.loop_id, loop.status) for loop in dead.loops] == [
        ("dead.a.1", "Aborted"),
        ("dead.b.2", "Aborted"),
    ]
    assert recorder.session_events("dead") == [] and recorder.orphans() == []
    assert not recorder.has_early_events("dead") and recorder.stats()["open_loops"] == 0
    assert (recorder._groups, recorder._open_groups, recorder._early_events, recorder._early_since) == (
        {},
        {},
        {},
        {},
    )
    late = group_end("dead", "dead.a.1", at=62_000)
    recorder.on_event(late)
    assert [orphan.event for orphan in recorder.orphans()] == [late]


def test_a_group_announced_behind_another_host_s_clock_waits_for_its_branches() -> None:
    """Another host's clock 61 s ahead set the stream time; a group announced on this one
    (its ParallelLoopStart at 0 ms) was taken as 61 s old by the next checkpoint, before
    its branches started milliseconds later: given up, its branches Aborted, their real
    AgentStart and AgentEnd orphans ('repeated AgentStart for an already closed loop').
    Now its age counts from the stream time it arrived at, so it waits for them."""
    recorder = SessionRecorder(group_end_timeout=60)
    recorder.record_all([start("t.c.1", "t", at=61_000), end("t.c.1", at=61_001)])
    recorder.on_event(ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)))
    assert recorder.checkpoint() == 1  # t only
    recorder.record_all([start("s.a.1", "s", at=100), end("s.a.1", at=200)])
    recorder.record_all([start("s.b.2", "s", at=150), end("s.b.2", at=300), group_end("s", "s.a.1", at=400)])
    recorder.checkpoint()
    s = {session.session_id: session for session in recorder.drain_completed()}["s"]
    assert [(loop.loop_id, loop.status, loop.parallel_group is not None) for loop in s.loops] == [
        ("s.a.1", "Completed", True),
        ("s.b.2", "Completed", True),
    ]
    assert recorder.orphans() == []


@pytest.mark.parametrize("at", [2, 100])  # at the announcement's instant, or later
def test_a_branch_starting_after_its_group_was_given_up_replaces_its_aborted_record(at: int) -> None:
    """The stream time jumped past ``group_end_timeout`` (another host's clock ahead) in
    the milliseconds between a group's announcement and its branches' start: the
    checkpoint gave it up, its branches Aborted in a session made up for them. Their
    real runs, come while that session was still held, were orphans ('repeated
    AgentStart for an already closed loop'), and so was the group's end: the session
    stored the branches Aborted, the runs lost. Now a run replaces its branch's Aborted
    record, and the group's end marks the branches, as after `flush`."""
    recorder = SessionRecorder(group_end_timeout=60)
    recorder.record_all([start("t.c.1", "t", at=0), end("t.c.1", at=1)])
    recorder.on_event(ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(2)))
    recorder.record_all([start("t.c.2", "t", at=61_000), end("t.c.2", at=61_001)])
    assert recorder.checkpoint() == 2  # t, and s given up
    recorder.record_all([start("s.a.1", "s", at=at), end("s.a.1", at=200)])
    recorder.record_all([start("s.b.2", "s", at=at), end("s.b.2", at=300), group_end("s", "s.a.1", at=400)])
    recorder.checkpoint()
    s = {session.session_id: session for session in recorder.drain_completed()}["s"]
    assert [(loop.loop_id, loop.status, _groups_of([s])[loop.loop_id]) for loop in s.loops] == [
        ("s.a.1", "Completed", (("s.a.1", "s.b.2"), True)),
        ("s.b.2", "Completed", (("s.a.1", "s.b.2"), False)),
    ]
    assert recorder.orphans() == [] and recorder.open_loop_ids() == []
    assert not recorder.may_amend("s")


def test_a_branch_running_after_its_group_was_given_up_is_aborted_by_flush_as_any_loop() -> None:
    """The run of a branch its given-up group had Aborted, still running at `flush`: its
    events were orphans, the Aborted record that never ran kept. Now the run is that
    record, Aborted as `flush` aborts any loop, its events kept."""
    recorder = SessionRecorder(group_end_timeout=60)
    recorder.record_all([start("t.c.1", "t", at=0), end("t.c.1", at=1)])
    recorder.on_event(ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1",), timestamp=ts(2)))
    recorder.record_all([start("t.c.2", "t", at=61_000), end("t.c.2", at=61_001)])
    assert recorder.checkpoint() == 2  # t, and s given up
    recorder.on_event(start("s.a.1", "s", at=100))
    recorder.flush()
    s = {session.session_id: session for session in recorder.drain_completed()}["s"]
    [loop] = s.loops
    assert (loop.status, loop.started_at, [type(kept.event) for kept in loop.events]) == (
        "Aborted",
        ts(100),
        [ps.AgentStart],
    )
    assert recorder.orphans() == []


def test_a_group_announced_before_any_loop_started_counts_its_age_from_the_first_start() -> None:
    """A group announced before the stream's first AgentStart has no stream time to count
    from: its own timestamp, 61 s behind another host's clock, got it given up by the first
    checkpoint. Now its age counts from the stream time that checkpoint found."""
    recorder = SessionRecorder(group_end_timeout=60)
    recorder.on_event(ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1",), timestamp=ts(0)))
    recorder.record_all([start("t.c.1", "t", at=61_000), end("t.c.1", at=61_001)])
    assert recorder.checkpoint() == 1  # t only
    assert recorder.has_early_events("s")
    recorder.record_all([start("t.c.2", "t", at=121_000), end("t.c.2", at=121_001)])
    assert recorder.checkpoint() == 1 and recorder.has_early_events("s")  # 60 s: not yet
    recorder.record_all([start("t.c.3", "t", at=121_002), end("t.c.3", at=121_003)])
    assert recorder.checkpoint() == 2  # t, and s given up
    assert not recorder.has_early_events("s") and recorder.stats()["open_loops"] == 0


def test_a_drained_session_s_group_behind_another_host_s_clock_waits_for_its_end() -> None:
    """A session drained with its group open, waiting for the winner, while another host's
    clock 61 s ahead set the stream time: the next checkpoint took the group as 61 s idle
    (its session's own last timestamp against the stream time), gave it up, and its
    ParallelLoopEnd was an orphan. Now its idle time counts from the stream time it was
    drained at."""
    recorder = SessionRecorder(group_end_timeout=60)
    recorder.record_all([start("t.c.1", "t", at=61_000), end("t.c.1", at=61_001)])
    group = ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0))
    recorder.record_all([group, start("s.a.1", "s"), start("s.b.2", "s"), end("s.a.1"), end("s.b.2")])
    assert recorder.checkpoint() == 2
    recorder.drain_completed()
    recorder.record_all([start("t.c.2", "t", at=61_100), end("t.c.2", at=61_101)])
    assert recorder.checkpoint() == 1  # t only
    recorder.drain_completed()
    recorder.on_event(group_end("s", "s.a.1", at=500))
    recorder.checkpoint()
    amended = recorder.drain_completed()
    assert [(loop.loop_id, loop.parallel_group is not None) for s in amended for loop in s.loops] == [
        ("s.a.1", True),
        ("s.b.2", True),
    ]
    assert recorder.orphans() == []


def test_abort_session_is_flush_for_one_session_alone() -> None:
    """A broker worker ends the session of an agent that died mid-loop (no event for its
    idle timeout) while others keep recording: as `flush` would, for that session only."""
    events = [
        start("s.c.1", "s"),
        end("s.c.1"),
        start("s.c.2", "s", at=2, parent="s.c.1"),
        *turn("s.c.2")[:2],
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.x.3", "s.y.4"), timestamp=ts(3)),
        start("s.x.3", "s", at=3),
        start("t.c.1", "t", at=4),
    ]
    _, [want, _t] = record(events)
    recorder = SessionRecorder()
    recorder.record_all(events)
    assert recorder.abort_session("s") == 3  # s.c.2, s.x.3 and s.y.4 (never started)
    assert recorder.abort_session("s") == 0
    [session] = recorder.drain_completed()
    assert ps.encode(session) == ps.encode(want)
    assert recorder.open_loop_ids() == ["t.c.1"] and not recorder.may_amend("s")
    late = turn("s.c.2")[2]
    recorder.on_event(late)
    assert [orphan.event for orphan in recorder.orphans()] == [late]


def _groups_of(sessions: list[ps.Session]) -> dict[str, tuple[tuple[str, ...], bool] | None]:
    """Loop id -> its group's branch ids and whether it won, over `sessions`."""
    groups = {loop.loop_id: loop.parallel_group for session in sessions for loop in session.loops}
    return {loop_id: group and (group.all_loop_ids, group.is_selected) for loop_id, group in groups.items()}


def _group_ended_then(stop: str) -> tuple[SessionRecorder, ps.ParallelLoopEnd]:
    """A group of two branches, both ended, then `stop` ("flush", "abort_session", "none")
    before the group's end, which comes before the session is drained."""
    recorder = SessionRecorder()
    group = ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0))
    recorder.record_all(
        [group, start("s.a.1", "s"), start("s.b.2", "s"), end("s.a.1", at=3), end("s.b.2", at=4)]
    )
    if stop == "flush":
        recorder.flush()
    elif stop == "abort_session":
        recorder.abort_session("s")
    late = group_end("s", "s.b.2", at=9)
    recorder.on_event(late)
    return recorder, late


def test_a_group_end_after_flush_marks_every_branch_as_phi_core_keeps_partial_groups() -> None:
    """Its branch list was forgotten at flush: the end marked the winner as a group of one,
    the other branch not at all."""
    recorder, late = _group_ended_then("flush")
    assert recorder.session_events("s")[-1] == late and recorder.orphans() == []
    assert _groups_of(recorder.drain_completed()) == {
        "s.a.1": (("s.a.1", "s.b.2"), False),
        "s.b.2": (("s.a.1", "s.b.2"), True),
    }
    again = group_end("s", "s.b.2", at=10)
    recorder.on_event(again)  # its session drained: nothing left to mark
    assert [orphan.event for orphan in recorder.orphans()] == [again]
    assert recorder._ended_groups == {}  # nothing kept past the drain


@pytest.mark.parametrize("stop", ["none", "flush"])
def test_a_repeated_group_end_keeps_the_winners_group(stop: str) -> None:
    """An end delivered twice: the repeat, finding no open group, fell back to a group of
    its winner alone, over the winner's whole group. That fallback (phi-core's) is kept
    for a loop holding no group."""
    recorder, late = _group_ended_then(stop)
    recorder.on_event(late)
    recorder.record_all([start("s.d.3", "s", at=10), end("s.d.3", at=11), group_end("s", "s.d.3", at=12)])
    recorder.flush()
    assert _groups_of(recorder.drain_completed()) == {
        "s.a.1": (("s.a.1", "s.b.2"), False),
        "s.b.2": (("s.a.1", "s.b.2"), True),
        "s.d.3": (("s.d.3",), True),
    }


@pytest.mark.parametrize("flushed", [False, True])
def test_a_group_end_after_flush_marks_the_branches_drained_before_it(flushed: bool) -> None:
    """Two branches ended and were drained, the third was still Pending at flush: the end
    marked the third alone (flush forgot what the drained ones were owed), and the winner
    had no group while its sibling named it. Now they come back as amendments, as without
    flush."""
    branches = ("s.a.1", "s.b.2", "s.c.3")
    recorder = SessionRecorder()
    recorder.record_all(
        [
            ps.ParallelLoopStart(session_id="s", loop_ids=branches, timestamp=ts(0)),
            *(start(loop, "s") for loop in branches[:2]),
            *(end(loop, at=3) for loop in branches[:2]),
        ]
    )
    recorder.checkpoint()
    recorder.drain_completed()
    if flushed:
        recorder.flush()
    recorder.on_event(group_end("s", "s.b.2", at=9))
    recorder.flush()
    assert _groups_of(recorder.drain_completed()) == {
        "s.a.1": (branches, False),
        "s.b.2": (branches, True),
        "s.c.3": (branches, False),
    }
    assert recorder.orphans() == []


def test_a_group_end_after_abort_session_is_an_orphan_as_its_group_was_given_up() -> None:
    """Its branch list was forgotten: the end marked the winner as a group of one."""
    recorder, late = _group_ended_then("abort_session")
    assert [orphan.event for orphan in recorder.orphans()] == [late]
    [session] = recorder.drain_completed()
    assert [loop.parallel_group for loop in session.loops] == [None, None]
    assert recorder._ended_groups == {}  # nothing kept past the drain


def _group_drained_after(recorder: SessionRecorder, stop: str, session: str = "s") -> None:
    """A group of two branches of `session`, both ended, then `stop` ("flush",
    "abort_session", "group_end_timeout": drained with its group open, for longer than
    the recorder's), which ends the group or gives it up, and the session's drain."""
    branches = (f"{session}.a.1", f"{session}.b.2")
    recorder.record_all(
        [
            ps.ParallelLoopStart(session_id=session, loop_ids=branches, timestamp=ts(0)),
            *(start(loop, session) for loop in branches),
            *(end(loop, at=3) for loop in branches),
        ]
    )
    if stop == "flush":
        recorder.flush()
    elif stop == "abort_session":
        recorder.abort_session(session)
    else:
        recorder.checkpoint()
        recorder.drain_completed()
        recorder.record_all([start("t.c.1", "t", at=61_000), end("t.c.1", at=61_001)])
        recorder.checkpoint()  # gives the group up
    recorder.drain_completed()


@pytest.mark.parametrize("stop", ["flush", "abort_session", "group_end_timeout"])
def test_a_group_end_after_its_session_was_drained_is_an_orphan_even_if_the_session_goes_on(
    stop: str,
) -> None:
    """The end of a group that flush ended or that was given up, once its session was
    drained, was an orphan only while the session stayed away: with the agent going on
    under the session's id, it was kept in that session's events. A new group reusing
    the branch ids takes its own end."""
    recorder = SessionRecorder(group_end_timeout=60)
    _group_drained_after(recorder, stop)
    recorder.record_all([start("s.c.3", "s", at=70_000), end("s.c.3", at=70_001)])
    late = group_end("s", "s.b.2", at=70_002)
    recorder.on_event(late)
    assert [orphan.event for orphan in recorder.orphans()] == [late]
    assert recorder.session_events("s") == []
    again = ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(80_000))
    recorder.record_all(
        [again, start("s.a.1", "s", at=80_000), end("s.a.1", at=80_001), group_end("s", "s.a.1", at=80_002)]
    )
    recorder.flush()
    assert _groups_of(recorder.drain_completed()) == {
        "s.c.3": None,
        "s.a.1": (("s.a.1", "s.b.2"), True),
        "s.b.2": (("s.a.1", "s.b.2"), False),  # never started: Aborted at flush
    }
    assert len(recorder.orphans()) == 1


def test_the_branches_of_drained_groups_are_remembered_among_the_latest_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recorder_module, "_DRAINED_GROUP_BRANCHES", 2)
    recorder = SessionRecorder()
    for session in ("s", "u"):
        _group_drained_after(recorder, "abort_session", session)
    assert list(recorder._drained_groups) == ["u.a.1", "u.b.2"]  # the oldest forgotten


def test_abort_sessions_ends_many_sessions_as_abort_session_ends_each() -> None:
    """A broker worker ended each idle session by its own `abort_session`, every call a
    scan of every open loop and group: 20,000 sessions of a dead host blocked its event
    loop for seconds. `abort_sessions` ends them all in one pass, to the same records."""

    def sessions(n: int) -> list[ps.AgentEvent]:
        events: list[ps.AgentEvent] = []
        for i in range(n):
            s = f"s{i}"
            events += [
                start(f"{s}.c.1", s, at=i),
                end(f"{s}.c.1", at=i),
                start(f"{s}.c.2", s, at=i, parent=f"{s}.c.1"),
                *turn(f"{s}.c.2")[:2],
            ]
            if i % 2:  # a parallel group, one branch started
                events += [
                    ps.ParallelLoopStart(session_id=s, loop_ids=(f"{s}.x.3", f"{s}.y.4"), timestamp=ts(i)),
                    start(f"{s}.x.3", s, at=i),
                ]
        return [*events, start("t.c.1", "t", at=n)]

    one_by_one, at_once = SessionRecorder(), SessionRecorder()
    one_by_one.record_all(sessions(6))
    at_once.record_all(sessions(6))
    ids = ["s0", "s1", "s2", "s3", "s4", "s5", "s3", "unknown"]
    counts = {session_id: one_by_one.abort_session(session_id) for session_id in ids}
    assert counts == {"s0": 1, "s1": 3, "s2": 1, "s3": 0, "s4": 1, "s5": 3, "unknown": 0}
    assert at_once.abort_sessions(ids) == {**counts, "s3": 3}  # an id given twice is ended once
    assert at_once.abort_sessions([]) == {} and at_once.abort_sessions(["s1"]) == {"s1": 0}
    for recorder in (one_by_one, at_once):
        assert recorder.open_loop_ids() == ["t.c.1"]
    assert [ps.encode(s) for s in at_once.drain_completed()] == [
        ps.encode(s) for s in one_by_one.drain_completed()
    ]
    late = turn("s1.c.2")[2]
    at_once.on_event(late)
    assert [orphan.event for orphan in at_once.orphans()] == [late]
    with pytest.raises(TypeError, match=r"session_ids must be a sequence of str, not str"):
        at_once.abort_sessions("s1")
    with pytest.raises(TypeError, match=r"session_id must be str, not int"):
        at_once.abort_session(5)  # type: ignore[arg-type]


def test_without_a_group_end_timeout_a_drained_session_waits_for_its_group_until_flush() -> None:
    recorder = SessionRecorder(group_end_timeout=None)
    group = ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1",), timestamp=ts(0))
    recorder.record_all([group, start("s.a.1", "s"), end("s.a.1"), start("t.c.1", "t", at=10**9)])
    recorder.checkpoint()
    recorder.drain_completed()
    assert recorder.may_amend("s")
    recorder.on_event(group_end("s", "s.a.1"))
    [amended] = recorder.drain_completed()
    assert amended.loops[0].parallel_group is not None


def test_a_repeated_parallel_start_is_not_a_group_the_session_stays_owed() -> None:
    """It was counted as a second group, which never ended: the drained session stayed
    owed (`may_amend`, which pins its journal records) until flush."""
    recorder = _groups_recorded([GROUP_1, GROUP_1], [group_end("s", "s.a.1")])
    assert not recorder.may_amend("s")


def test_a_repeated_parallel_end_does_not_end_another_group() -> None:
    """It ended the session's other open group too: that group's end, once the session
    was drained, found nothing owed and was an orphan."""
    ended = group_end("s", "s.a.1")
    recorder = _groups_recorded([GROUP_1, GROUP_2], [ended, ended])
    assert recorder.may_amend("s")
    recorder.on_event(group_end("s", "s.a.2"))
    assert not recorder.may_amend("s")
    assert recorder.orphans() == []


def test_parallel_events_naming_another_sessions_loops_leave_that_session_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Session a's ParallelLoopEnd naming session b's loops (a loop id's session is its
    prefix) set b's parallel_group and ended b's group; a's ParallelLoopStart naming them
    made them Pending branches of a. Now both stay in a's session events, unapplied."""
    b_group = ps.ParallelLoopStart(session_id="b", loop_ids=("b.c.1", "b.c.2"), timestamp=ts(0))
    misrouted = [
        group_end("a", "b.c.1"),
        group_end("a", "b.c.2"),
        ps.ParallelLoopStart(session_id="a", loop_ids=("a.c.2", "b.c.3"), timestamp=ts(0)),
    ]
    recorder = SessionRecorder(keep_session_events=True)
    with caplog.at_level(logging.WARNING, logger="phi_session.recorder"):
        recorder.record_all(
            [start("a.c.1", "a"), b_group, start("b.c.1", "b"), start("b.c.2", "b"), *misrouted]
        )
    assert len(caplog.records) == 2  # once per foreign loop named, not per event
    assert recorder.session_events("a") == misrouted
    assert recorder.open_loop_ids() == ["a.c.1", "b.c.1", "b.c.2"]  # no branch pre-registered in a
    assert recorder.current_loop("b.c.1").parallel_group is None  # type: ignore[union-attr]
    recorder.record_all([end("b.c.1"), end("b.c.2"), end("a.c.1")])
    assert recorder.checkpoint() == 2
    recorder.drain_completed()
    assert recorder.may_amend("b")  # b's own group is still open
    recorder.on_event(group_end("b", "b.c.2"))
    assert not recorder.may_amend("b")
    [amended] = recorder.drain_completed()
    assert [loop.parallel_group.is_selected for loop in amended.loops] == [False, True]  # type: ignore[union-attr]
    recorder.flush()
    assert recorder.orphans() == []


@pytest.mark.parametrize("drained_as_it_goes", [False, True])
def test_a_session_id_holding_dots_keeps_its_parallel_group(drained_as_it_goes: bool) -> None:
    """phi-core's own stream may carry a session id holding dots (only ours refuses one).
    Its branches, not yet started at ParallelLoopStart or drained by ParallelLoopEnd, were
    taken for loops of the session before the first dot: both events were kept unapplied,
    and the branches lost their group (phi-core gives them theirs)."""
    session = "run.7"
    branches = ("run.7.a.1", "run.7.b.2", "run.7.c.3")  # run.7.c.3 never starts
    events: list[ps.AgentEvent] = [
        ps.ParallelLoopStart(session_id=session, loop_ids=branches, timestamp=ts(0)),
        *(event for loop in branches[:2] for event in (start(loop, session), end(loop))),
        group_end(session, "run.7.b.2"),
    ]
    recorder = SessionRecorder()
    sessions: list[ps.Session] = []
    for event in events:
        recorder.on_event(event)
        if drained_as_it_goes:
            recorder.checkpoint()
            sessions += recorder.drain_completed()
    recorder.flush()
    sessions += recorder.drain_completed()
    assert recorder.orphans() == []
    groups = {loop.loop_id: loop.parallel_group for saved in sessions for loop in saved.loops}
    assert {loop_id: group is not None and group.is_selected for loop_id, group in groups.items()} == {
        "run.7.a.1": False,
        "run.7.b.2": True,
        "run.7.c.3": False,  # Aborted at flush, as a Pending branch of its session
    }
    assert {saved.session_id for saved in sessions} == {session}


def test_a_session_id_holding_dots_has_its_stale_group_given_up() -> None:
    """Its drained branch was taken for one of the session before the first dot, so the
    group was never given up: the branch that never started stayed open until flush."""
    recorder = SessionRecorder(group_end_timeout=60)
    group = ps.ParallelLoopStart(session_id="run.7", loop_ids=("run.7.a.1", "run.7.b.1"), timestamp=ts(0))
    recorder.record_all([group, start("run.7.a.1", "run.7"), end("run.7.a.1")])
    assert recorder.checkpoint() == 1
    recorder.drain_completed()
    recorder.record_all([start("t.c.1", "t", at=61_000), end("t.c.1", at=61_001)])
    assert recorder.checkpoint() == 2  # t, and run.7 with its branch that never started
    assert not recorder.in_open_group("run.7.a.1") and recorder.open_loop_ids() == []


def test_a_continuation_in_a_session_id_holding_dots_is_no_spawn() -> None:
    """Its parent, drained, was taken for a loop of the session before the first dot: the
    continuation's session got a spawn ref naming that session."""
    recorder = SessionRecorder()
    recorder.record_all([start("run.7.a.1", "run.7"), end("run.7.a.1")])
    recorder.checkpoint()
    recorder.drain_completed()
    recorder.record_all(
        [start("run.7.a.2", "run.7", at=2, parent="run.7.a.1", kind=ps.DEFAULT), end("run.7.a.2", at=3)]
    )
    recorder.flush()
    [session] = recorder.drain_completed()
    assert session.parent_spawn_ref is None


def test_callbacks_run_outside_the_lock_so_they_may_wait_for_other_threads() -> None:
    opened: list[str] = []
    blocked: list[str] = []
    workers: list[threading.Thread] = []

    def wait_for_another_thread(session: ps.Session, action: Any) -> None:
        worker = threading.Thread(target=action)
        workers.append(worker)
        worker.start()
        worker.join(timeout=5)  # under the recorder's lock, the worker would wait for us
        if worker.is_alive():
            blocked.append(session.session_id)  # give up, so a regression fails instead of hanging

    def before(session: ps.Session) -> bool:
        opened.append(session.session_id)
        if session.session_id == "s":  # another thread opens "t" meanwhile
            wait_for_another_thread(session, lambda: recorder.on_event(start("t.c.1", "t")))
        return session.session_id != "t"

    recorder = SessionRecorder(
        before_task=before, after_task=lambda session: wait_for_another_thread(session, recorder.stats)
    )
    recorder.record_all([start("s.c.1", "s"), end("s.c.1")])
    assert recorder.checkpoint() == 1
    for worker in workers:
        worker.join()
    assert blocked == []
    assert opened == ["s", "t"]  # in order: "t"'s callback waited for "s"'s to return
    assert recorder.get_session("t").is_rejected  # type: ignore[union-attr]


def veto_while_another_thread_runs_callbacks() -> tuple[SessionRecorder, threading.Event, threading.Thread]:
    """A recorder whose ``before_task`` rejects "blocked", with "slow"'s running in another
    thread (until the event returned is set), so that "blocked"'s waits for that thread."""
    running, release = threading.Event(), threading.Event()

    def before(session: ps.Session) -> bool:
        if session.session_id == "slow":
            running.set()
            release.wait(timeout=5)
        return session.session_id != "blocked"

    recorder = SessionRecorder(before_task=before)
    slow = threading.Thread(target=lambda: recorder.on_event(start("slow.c.1", "slow")))
    slow.start()
    assert running.wait(timeout=5)
    recorder.record_all([start("blocked.c.1", "blocked"), end("blocked.c.1")])
    return recorder, release, slow


def test_a_session_is_not_completed_before_its_before_task_ran() -> None:
    """Its ``before_task``, left to another thread running callbacks, set ``rejected`` on
    the session after a checkpoint had handed it over: the rejection was lost."""
    recorder, release, slow = veto_while_another_thread_runs_callbacks()
    assert recorder.checkpoint() == 0
    assert recorder.drain_completed() == []
    release.set()
    slow.join()
    assert recorder.checkpoint() == 1
    [blocked] = recorder.drain_completed()
    assert blocked.is_rejected


def test_a_rejection_after_flush_handed_the_session_over_is_an_amendment() -> None:
    recorder, release, slow = veto_while_another_thread_runs_callbacks()
    recorder.flush()
    drained = {session.session_id: session for session in recorder.drain_completed()}
    release.set()
    slow.join()
    assert not drained["blocked"].is_rejected  # never modified once handed over
    [amendment] = recorder.drain_completed()
    assert amendment.session_id == "blocked" and amendment.is_rejected and amendment.loops == []
    from phi_session.stores.base import merge_sessions

    assert merge_sessions(drained["blocked"], amendment).is_rejected


def test_callbacks_run_in_order_and_a_wrapper_can_defer_them() -> None:
    order: list[str] = []
    recorder = SessionRecorder(
        before_task=lambda s: order.append(f"open {s.session_id}"),
        after_task=lambda s: order.append(f"done {s.session_id}"),
    )
    wrapper_lock = threading.Lock()
    with recorder.deferred_callbacks():
        with wrapper_lock:
            recorder.record_all([start("a.c.1", "a"), start("b.c.1", "b"), end("a.c.1")])
            recorder.checkpoint()
            assert order == []  # held back while the wrapper's lock is held
    assert order == ["open a", "open b", "done a"]


# -- what the cyclic GC walks (issue 11: per-event cost must not grow with what is held) --


def sub_agent_session(session: str) -> list[ps.AgentEvent]:
    """A loop with a tool turn whose tool spawns a sub-agent, then a continuation of it."""
    root, child = f"{session}.c.1", f"{session}-k.sub.1"
    return [
        start(root, session),
        *turn(root, calls=1),
        start(child, f"{session}-k", parent=root, agent="child"),
        end(child),
        ps.ToolExecutionEnd(
            loop_id=root,
            tool_call_id="t9",
            tool_name="researcher",
            result=ps.ToolResult(content=(), child_loop_id=child),
            is_error=False,
        ),
        end(root, at=3, messages=(assistant("done"),)),
        start(f"{session}.c.2", session, at=4, parent=root, kind=ps.DEFAULT),
        *turn(f"{session}.c.2", at=5),
        end(f"{session}.c.2", at=7, messages=(assistant("more"),)),
    ]


def test_finished_records_hold_tuples_the_collector_stops_tracking() -> None:
    _, sessions = record(sub_agent_session("s"))
    gc.collect()
    [root] = [r for s in sessions for r in s.loops if r.loop_id == "s.c.1"]
    assert root.children_loop_ids == ("s.c.2",) and len(root.child_loop_refs) == 1
    assert len(root.turns) == 1 and len(root.messages) == 1
    for session in sessions:
        for loop in session.loops:
            assert type(loop.events) is tuple
            for name in ("messages", "turns", "children_loop_ids", "child_loop_refs"):
                value = getattr(loop, name)
                assert type(value) is tuple and not gc.is_tracked(value), (loop.loop_id, name)


def test_a_finished_loops_timestamps_leave_the_collector() -> None:
    # Each holds one str and can be in no cycle; tracked, they were half of what every
    # full collection walked at 1,000 held sessions.
    _, sessions = record(sub_agent_session("s"))
    stamps = [
        e.event.timestamp
        for s in sessions
        for r in s.loops
        for e in r.events
        if hasattr(e.event, "timestamp")
    ]
    assert len(stamps) > 5 and not any(gc.is_tracked(stamp) for stamp in stamps)
    for s in sessions:
        for r in s.loops:
            assert not gc.is_tracked(r.started_at) and not any(gc.is_tracked(t.ended_at) for t in r.turns)


def test_a_timestamp_subclass_which_could_hold_a_cycle_stays_tracked() -> None:
    from phi_session._collector import release_leaves

    class Noted(ps.Timestamp):
        __slots__ = ("note",)

    plain, noted = ps.Timestamp.parse("2025-06-01T09:00:00Z"), Noted("2025-06-01T09:00:00Z")
    release_leaves([plain, noted, "not a timestamp"], ps.Timestamp)
    assert not gc.is_tracked(plain) and gc.is_tracked(noted)


def test_a_finished_loops_events_and_record_leave_the_collector() -> None:
    # One tracked event (an AgentStart: gc=True, for its metadata) kept the loop's whole
    # event tuple tracked, and every full collection walked each event of every held loop.
    _, sessions = record(sub_agent_session("s"))
    gc.collect()
    for session in sessions:
        for loop in session.loops:
            assert not gc.is_tracked(loop.events), loop.loop_id
            assert not any(map(gc.is_tracked, loop.events)), loop.loop_id
            assert not gc.is_tracked(loop.events[0].event.continuation_kind)  # type: ignore[union-attr]
    [continuation] = [r for s in sessions for r in s.loops if r.loop_id == "s.c.2"]
    assert not gc.is_tracked(continuation)


def test_a_loop_whose_start_holds_a_dict_stays_tracked_so_a_cycle_through_it_is_collected() -> None:
    # A dict can change in place: a user could put the record in its own metadata.
    class Marker:
        pass

    metadata: dict[str, object] = {"framework_session_id": "t"}
    recorder = SessionRecorder()
    recorder.record_all([msgspec.structs.replace(start("s.c.1", "s"), metadata=metadata), end("s.c.1")])
    recorder.flush()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    gc.collect()
    assert gc.is_tracked(loop.events[0].event) and gc.is_tracked(loop)
    marker = Marker()
    metadata["self"], metadata["marker"] = loop, marker  # metadata -> record -> event -> metadata
    probe = weakref.ref(marker)
    del loop, session, metadata, marker, recorder
    gc.collect()
    assert probe() is None


def test_variants_are_never_tracked_but_a_subclass_that_could_hold_more_is() -> None:
    class Noted(ps.ContinuationKind):
        __slots__ = ("note",)

    class NotedStamp(ps.Timestamp):
        __slots__ = ("note",)

    assert not gc.is_tracked(ps.ContinuationKind.branch("b")) and not gc.is_tracked(ps.DEFAULT)
    assert not gc.is_tracked(ps.SessionFormation.first_loop(ts(0)))
    assert gc.is_tracked(Noted("Default"))
    assert gc.is_tracked(ps.SessionFormation.first_loop(NotedStamp("2025-06-01T09:00:00Z")))


def tracked_containers(root: object) -> collections.Counter[str]:
    """The lists, tuples and dicts the cyclic GC tracks that `root` reaches through tracked objects
    (not through functions: their globals are every module's state, which other tests change)."""
    seen, stack, found = {id(root)}, [root], collections.Counter[str]()
    while stack:
        for ref in gc.get_referents(stack.pop()):
            if (
                id(ref) in seen
                or not gc.is_tracked(ref)
                or isinstance(ref, type | types.ModuleType | types.FunctionType)
            ):
                continue
            seen.add(id(ref))
            stack.append(ref)
            if type(ref) in (list, tuple, dict):
                found[type(ref).__name__] += 1
    return found


def test_a_held_session_adds_few_containers_for_the_collector_to_walk() -> None:
    # What each held session adds: its loop list and its first-record-per-loop dict; the
    # event tuples are out (`test_a_finished_loops_events_and_record_leave_the_collector`).
    counts = []
    for sessions in (2, 4):
        recorder = SessionRecorder()
        for n in range(sessions):
            recorder.record_all(sub_agent_session(f"s{n}"))
        recorder.flush()
        gc.collect()
        counts.append(tracked_containers(vars(recorder)))
        recorder.drain_completed()
    per_session = {kind: (counts[1][kind] - counts[0][kind]) // 2 for kind in counts[1] | counts[0]}
    # two sessions each time (the sub-agent's, with one loop): 2 lists, 2 dicts
    assert {kind: count for kind, count in per_session.items() if count} == {"list": 2, "dict": 2}


def test_current_loop_is_a_snapshot_and_has_open_loop_asks_without_one() -> None:
    recorder = SessionRecorder()
    recorder.record_all([start("s.c.1", "s"), *turn("s.c.1")])
    loop = recorder.current_loop("s.c.1")
    assert loop is not None and len(loop.turns) == 1 and type(loop.events) is tuple
    recorder.on_event(end("s.c.1"))
    assert len(loop.events) == 5  # what it was when taken
    [session] = recorder.sessions()
    assert len(session.loops[0].events) == 6
    assert recorder.has_open_loop("s.c.2") is False and recorder.current_loop("s.c.1") is None
    recorder.on_event(start("s.c.2", "s"))
    assert recorder.has_open_loop("s.c.2") and not recorder.has_open_loop("s.c.1")


def _ghost(loop_id: str) -> list[ps.AgentEvent]:
    """One event of each type stored in its loop (with or without a step of its own)."""
    out = assistant("answer", calls=1)
    return [
        ps.TurnStart(loop_id=loop_id, turn_index=0, triggered_by="User", timestamp=ts(0)),
        ps.MessageStart(loop_id=loop_id, message=out),
        ps.MessageEnd(loop_id=loop_id, message=tool_result("call0")),
        ps.ToolExecutionStart(loop_id=loop_id, tool_call_id="call0", tool_name="read", args={"i": 0}),
        ps.ToolExecutionEnd(
            loop_id=loop_id,
            tool_call_id="call0",
            tool_name="read",
            result=ps.ToolResult(content=()),
            is_error=False,
        ),
        ps.TurnEnd(loop_id=loop_id, message=out, usage=usage(1), timestamp=ts(1)),
        ps.InputRejected(loop_id=loop_id, reason="r"),
        end(loop_id),
    ]


@pytest.mark.parametrize("hooked", [False, True])
def test_every_stored_type_for_an_unknown_loop_is_an_orphan(hooked: bool) -> None:
    recorder = SessionRecorder()
    if hooked:  # every event then takes its handler instead of the inline path
        recorder.set_write_ahead(lambda line: None)
    events = [start("s.c.1", "s"), end("s.c.1"), *_ghost("s.c.1"), *_ghost("ghost")]
    recorder.record_all(events)
    assert [o.event for o in recorder.orphans()] == events[2:]
    assert [e.event for e in recorder.sessions()[0].loops[0].events] == events[:2]


def test_not_an_event_is_refused_with_or_without_write_ahead() -> None:
    recorder = SessionRecorder()
    with pytest.raises(TypeError, match="not an AgentEvent: Usage"):
        recorder.on_event(usage(1))  # type: ignore[arg-type]
    recorder.set_write_ahead(lambda line: None)
    with pytest.raises(TypeError, match="not an AgentEvent: Usage"):
        recorder.on_event(usage(1))  # type: ignore[arg-type]


def test_write_ahead_attached_and_removed_mid_loop_records_the_same_session() -> None:
    events = [start("s.c.1", "s"), *turn("s.c.1", calls=2), *turn("s.c.1", 1, at=5), end("s.c.1", at=9)]
    plain = SessionRecorder()
    plain.record_all(events)
    plain.flush()
    seen: list[bytes | str] = []
    recorder = SessionRecorder()
    recorder.record_all(events[:3])
    recorder.set_write_ahead(seen.append)
    recorder.record_all(events[3:9])
    recorder.set_write_ahead(None)
    recorder.record_all(events[9:])
    recorder.flush()
    kept = [e for e in events[3:9] if not isinstance(e, ps.MessageUpdate)]
    assert [ps.decode_event(line) for line in seen] == kept  # stored types too, none inline
    (session,) = recorder.drain_completed()
    assert ps.encode(session) == ps.encode(plain.drain_completed()[0])
    assert [e.sequence for e in session.loops[0].events] == list(range(len(session.loops[0].events)))


def test_a_pending_branch_numbers_its_events_on_from_those_kept_before_it_started() -> None:
    recorder = SessionRecorder(include_streaming_events=True)
    recorder.on_event(start("s.c.0", "s"))
    recorder.on_event(ps.ParallelLoopStart(session_id="s", loop_ids=("s.c.1", "s.c.2"), timestamp=ts(1)))
    early = ps.InputRejected(loop_id="s.c.1", reason="before its start")
    recorder.on_event(early)
    branch = [start("s.c.1", "s", at=2), *turn("s.c.1", at=3)]
    recorder.record_all(branch)
    snapshot = recorder.current_loop("s.c.1")
    assert snapshot is not None
    assert [(e.sequence, e.event) for e in snapshot.events] == list(enumerate([early, *branch]))
    recorder.on_event(end("s.c.1", at=4))
    recorder.flush()
    record = next(r for s in recorder.sessions() for r in s.loops if r.loop_id == "s.c.1")
    assert [(e.sequence, e.event) for e in record.events] == list(
        enumerate([early, *branch, end("s.c.1", at=4)])
    )


def test_only_exact_tuples_without_a_dict_leave_the_collector() -> None:
    from phi_session._collector import release_tuple

    class Pair(tuple[object, ...]):
        pass

    enabled = gc.isenabled()
    gc.disable()  # a collection would untrack `leaves` itself
    try:
        leaves, with_dict, a_list, pair = tuple(["a", 1]), ("a", {"k": "v"}), ["a"], Pair(("a",))
        assert gc.is_tracked(leaves)  # built at run time: tracked until a collection sees it
        for value in (leaves, with_dict, a_list, pair):
            release_tuple(value)  # type: ignore[arg-type]
        assert not gc.is_tracked(leaves)
    finally:
        if enabled:
            gc.enable()
    assert gc.is_tracked(with_dict) and gc.is_tracked(a_list) and gc.is_tracked(pair)


def test_a_vetoed_branch_of_a_drained_session_is_handed_over_at_once() -> None:
    """Its session drained with the group open, the branch's lone AgentEnd left it Pending:
    a journal or a broker worker then took the event for stored, and a crash lost it."""
    veto = end("s.b.2", at=2)
    recorder = SessionRecorder()
    recorder.record_all(
        [
            ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
            start("s.a.1", "s"),
            end("s.a.1"),
        ]
    )
    recorder.checkpoint()
    assert len(recorder.drain_completed()) == 1
    recorder.on_event(veto)
    recorder.checkpoint()
    [amendment] = recorder.drain_completed()
    [branch] = amendment.loops
    assert (branch.loop_id, branch.status, [e.event for e in branch.events]) == ("s.b.2", "Aborted", [veto])


def test_an_id_used_again_after_its_branch_was_vetoed_is_a_second_record() -> None:
    """A vetoed branch's record had no end, so a later evaluation's branch of its id was
    taken for a repeat: it was swallowed, Aborted, its usage lost."""
    first = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.claude.1", "s.gpt.2"), timestamp=ts(10)),
        start("s.claude.1", "s", at=11),
        end("s.gpt.2", at=11),
        end("s.claude.1", at=12),
        group_end("s", "s.claude.1", at=13),
    ]
    recorder, [session] = record(
        [start("s.main.0", "s"), end("s.main.0"), *first, *_evaluation(20, "s.gpt.2", (3, 4))]
    )
    assert recorder.orphans() == []
    assert [(r.loop_id, r.status) for r in session.loops if r.loop_id == "s.gpt.2"] == [
        ("s.gpt.2", "Aborted"),
        ("s.gpt.2", "Completed"),
    ]
    assert session.loops[-1].parallel_group is not None and session.loops[-1].parallel_group.is_selected


def test_a_group_ending_while_its_winners_compaction_pass_runs_marks_the_winner() -> None:
    """phi-core marks the open loop of the id and its closed record; with a loop of the id
    open the closed record was left without its group."""
    events = [
        ps.ParallelLoopStart(session_id="s", loop_ids=("s.a.1", "s.b.2"), timestamp=ts(0)),
        start("s.a.1", "s", at=1),
        end("s.a.1", at=2),
        start("s.b.2", "s", at=1),
        end("s.b.2", at=2),
        start("s.a.1", "s", at=3, parent="s.a.1", kind=ps.COMPACTION),
        group_end("s", "s.a.1", at=4),
        end("s.a.1", at=5),
    ]
    _, [session] = record(events)
    groups = [
        (r.loop_id, r.parallel_group is not None and r.parallel_group.is_selected) for r in session.loops
    ]
    assert groups == [("s.a.1", True), ("s.b.2", False), ("s.a.1", True)]


def test_the_second_record_of_an_id_sent_again_whole_is_replaced() -> None:
    """`_resend` looked only at an id's first record: the second one sent again with more
    events was orphaned, and the thinner record stayed."""
    second = [start("s.c.1", "s", at=5), end("s.c.1", at=6)]
    fuller = [start("s.c.1", "s", at=5), *turn("s.c.1", at=5), end("s.c.1", at=6)]
    recorder, [session] = record([start("s.c.1", "s"), end("s.c.1", at=2), *second, *fuller])
    assert recorder.orphans() == []
    kept = len(fuller) - 1  # (its streamed delta is not kept)
    assert [(r.started_at, len(r.events)) for r in session.loops] == [(ts(0), 2), (ts(5), kept)]


def test_a_before_task_interrupted_does_not_hold_its_session_back() -> None:
    """Ctrl-C inside `before_task`: its session waited for it for ever, never completed by
    a checkpoint."""

    def before(session: ps.Session) -> None:
        raise KeyboardInterrupt

    recorder = SessionRecorder(before_task=before)
    with pytest.raises(KeyboardInterrupt):
        recorder.on_event(start("s.c.1", "s"))
    recorder.on_event(end("s.c.1"))
    assert recorder.checkpoint() == 1


def _branch_sent_again(group_end_before_it_ends: bool) -> list[ps.AgentEvent]:
    """A parallel branch recorded in part, then sent again whole at the same instant (an
    OTLP ingest given its late span in a later payload), before its group ends."""
    branches = ("s.a.1", "s.b.2")
    first = [start("s.a.1", "s"), *turn("s.a.1"), end("s.a.1", at=3)]
    again = [start("s.a.1", "s"), *turn("s.a.1"), *turn("s.a.1", 1, at=1), end("s.a.1", at=3)]
    other = [start("s.b.2", "s", at=1), end("s.b.2", at=2)]
    tail = [group_end("s", "s.a.1", at=4)]
    if group_end_before_it_ends:
        again, tail = again[:-1], [*tail, again[-1]]
    group_start = ps.ParallelLoopStart(session_id="s", loop_ids=branches, timestamp=ts(0))
    return [group_start, *first, *again, *other, *tail]


@pytest.mark.parametrize("group_end_before_it_ends", [False, True])
@pytest.mark.parametrize("drained_after", ["each event", 7, 8, 9])  # 7: its first end, 8: its start again
def test_a_branch_sent_again_after_its_session_was_drained_is_saved_once(
    drained_after: int | str, group_end_before_it_ends: bool
) -> None:
    """The drained record of a branch sent again was still owed its group's end: the end
    amended that stale record too, next to the one sent again, and the store held the loop
    twice (the same id and start)."""
    from phi_session.stores.base import merge_sessions

    events = _branch_sent_again(group_end_before_it_ends)
    _, [whole] = record(events)
    recorder = SessionRecorder()
    saved: ps.Session | None = None
    for index, event in enumerate([*events, None]):
        if event is None:
            recorder.flush()
        else:
            recorder.on_event(event)
            recorder.checkpoint()
        if event is None or drained_after in ("each event", index):
            for session in recorder.drain_completed():
                saved = session if saved is None else merge_sessions(saved, session)
    assert saved is not None
    assert [(r.loop_id, len(r.turns)) for r in saved.loops] == [("s.a.1", 2), ("s.b.2", 0)]
    assert ps.encode(saved) == ps.encode(whole)
    assert recorder.orphans() == []


def test_a_continuation_that_closed_before_its_parent_is_linked_to_it() -> None:
    """An OTLP ingest given the continuation's trace first: its parent, recorded after it,
    never got it in its ``children_loop_ids``, held or drained between the two."""
    events = [
        start("s.c.2", "s", at=5, parent="s.c.1", kind=ps.DEFAULT),
        end("s.c.2", at=6),
        start("s.c.1", "s"),
        end("s.c.1", at=1),
    ]
    _, [whole] = record(events)
    saved = ps.decode_session(_saved_after_every_event(events)["s"])
    for session in (whole, saved):
        assert [(r.loop_id, r.children_loop_ids) for r in session.loops] == [
            ("s.c.2", ()),
            ("s.c.1", ("s.c.2",)),
        ]


def test_a_checkpoint_after_a_loops_end_looks_at_its_session_only() -> None:
    recorder = SessionRecorder()
    recorder.record_all([start("a.c.1", "a"), start("b.c.1", "b"), start("o.c.1", "o"), end("a.c.1")])
    recorder.on_event(end("b.c.1"))
    assert recorder.checkpoint(loop_id="b.c.1") == 1  # not a's, whose loop ended too
    assert [session.session_id for session in recorder.drain_completed()] == ["b"]
    assert recorder.checkpoint(loop_id="o.c.1") == 0  # still running
    assert recorder.checkpoint(loop_id="unknown.c.1") == 0
    assert recorder.checkpoint() == 1
    with pytest.raises(TypeError, match="loop_id must be str or None"):
        recorder.checkpoint(loop_id=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (
            ps.TurnStart(loop_id="s.a", turn_index=0, triggered_by="User", timestamp="2025-06-01T09:00:00Z"),  # type: ignore[arg-type]
            TypeError,
            "event.timestamp must be Timestamp, not str",
        ),
        (
            ps.TurnStart(loop_id="s.a", turn_index=0, triggered_by="User", timestamp=T0),  # type: ignore[arg-type]
            TypeError,
            "event.timestamp must be Timestamp, not int",
        ),
        (
            ps.TurnStart(loop_id="s.a", turn_index=-1, triggered_by="User", timestamp=ts(1)),
            ps.InvalidArgument,
            r"event.turn_index: expected `int` >= 0; got -1",
        ),
        (
            ps.TurnStart(loop_id="s.a", turn_index=True, triggered_by="User", timestamp=ts(1)),
            TypeError,
            "event.turn_index must be int, not bool",
        ),
        (
            ps.TurnStart(loop_id="s.a", turn_index=0, triggered_by="Someone", timestamp=ts(1)),  # type: ignore[arg-type]
            ps.InvalidArgument,
            "event.triggered_by",
        ),
        (
            ps.AgentEnd(loop_id="s.a", messages=(), usage=ps.Usage(input=-1, output=0), timestamp=ts(2)),
            ps.InvalidArgument,
            r"event.usage.input: expected `int` >= 0; got -1",
        ),
        (
            ps.AgentEnd(loop_id="s.a", messages=(), usage=ps.Usage(input=2**64, output=0), timestamp=ts(2)),
            ps.InvalidArgument,
            "event.usage.input: 18446744073709551616 is beyond",
        ),
        (
            ps.ToolExecutionEnd(
                loop_id="s.a", tool_call_id="c", tool_name="t", result=ps.ToolResult(content=()), is_error=0
            ),  # type: ignore[arg-type]
            TypeError,
            "event.is_error must be bool, not int",
        ),
        (
            ps.AgentStart(agent_id="agent", session_id="s", loop_id=7, timestamp=ts(0)),  # type: ignore[arg-type]
            TypeError,
            "event.loop_id must be str, not int",
        ),
    ],
)
def test_an_event_built_with_a_field_phi_core_cannot_read_is_refused_and_nothing_changes(
    bad: ps.AgentEvent, error: type[Exception], message: str
) -> None:
    """Built events are not validated by msgspec: the recorder took them, and the session
    could be neither encoded as phi-core reads it nor saved (nor, through an
    `AutoPersistingRecorder`, any session drained with it)."""
    recorder = SessionRecorder()
    recorder.on_event(start("s.a", "s"))
    with pytest.raises(error, match=message):
        recorder.on_event(bad)
    assert len(recorder.current_loop("s.a").events) == 1 and not recorder.drain_orphans()
    recorder.record_all(turn("s.a", at=1))
    recorder.on_event(end("s.a", at=3))
    recorder.flush()
    (session,) = recorder.drain_completed()
    assert ps.decode_session(ps.encode(session)).loops[0].events == session.loops[0].events


class Counter(int):
    """An int subclass of the caller's (a counter type of its own)."""


def counted(n: type[int]) -> list[ps.AgentEvent]:
    """Events whose counters are `n`s."""
    return [
        ps.TurnStart(loop_id="s.a", turn_index=n(0), triggered_by="User", timestamp=ts(1)),
        ps.CompactionStarted(
            loop_id="s.a", estimated_tokens=n(2**64 - 1), message_count=n(3), timestamp=ts(1)
        ),
        ps.AgentEnd(loop_id="s.a", messages=(), usage=ps.Usage(*map(n, range(1, 7))), timestamp=ts(2)),
    ]


def test_an_events_int_subclass_counters_are_recorded_as_the_integers_they_hold(tmp_path: Any) -> None:
    # check_event_fields refused them ("event.turn_index must be int, not Counter") where
    # an IntEnum passed, so consume skipped such events; and encode_event could not write them.
    recorder = SessionRecorder()
    with ps.JournaledRecorder(ps.Journal(tmp_path / "j", durability="os"), recorder) as journaled:
        journaled.on_event(start("s.a", "s"))
        journaled.record_all(counted(Counter))
    recorder.flush()
    (session,) = recorder.drain_completed()
    loop = ps.decode_session(ps.encode(session)).loops[0]
    assert [stored.event for stored in loop.events[1:]] == counted(int)
    assert loop.usage == ps.Usage(1, 2, 3, 4, 5, 6)
    with pytest.raises(ps.InvalidArgument, match=r"event\.turn_index"):
        SessionRecorder().on_event(
            ps.TurnStart(loop_id="s.a", turn_index=Counter(-1), triggered_by="User", timestamp=ts(1))
        )


K_SPAWNED = ps.ToolExecutionEnd(
    loop_id="p.c.1",
    tool_call_id="t1",
    tool_name="research",
    result=ps.ToolResult(content=(), child_loop_id="k.sub.1"),
    is_error=False,
)
"""The tool call t1 of the loop p.c.1 spawning the sub-agent loop k.sub.1."""


def test_links_to_sub_agents_recorded_elsewhere_are_noted_for_the_store() -> None:
    """A recorder holding one end of a sub-agent link notes it (`drain_spawn_gaps`) as the
    session holding that end is drained, for a saver to complete from the store; one
    holding both ends, or seeing the sub-agent start after the tool call, notes nothing."""
    spawner = [start("p.c.1", "p"), K_SPAWNED, end("p.c.1", at=4)]
    sub_agent = [start("k.sub.1", "k", at=1, parent="p.c.1"), end("k.sub.1", at=2)]
    gaps = {}
    for side, events in (("spawner", spawner), ("sub-agent", sub_agent)):
        recorder = SessionRecorder()
        recorder.record_all(events)
        recorder.flush()
        assert recorder.drain_spawn_gaps() == []  # none until the session is drained
        recorder.drain_completed()
        gaps[side] = recorder.drain_spawn_gaps()
        assert recorder.drain_spawn_gaps() == []
    [noted] = gaps["spawner"]
    assert (noted.session_id, noted.loop_ids, noted.header, noted.noted_by) == ("k", ("k.sub.1",), None, "p")
    assert noted.spawn == ps.SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="t1", tool_name="research"
    )
    [noted] = gaps["sub-agent"]
    assert (noted.session_id, noted.loop_ids, noted.noted_by) == ("k", ("k.sub.1",), "k")
    assert noted.spawn == ps.SpawnRef(
        parent_session_id="p", parent_loop_id="p.c.1", tool_call_id="", tool_name=""
    )
    assert noted.header is not None and noted.header.loops == [] and noted.header.session_id == "k"
    for events in ([spawner[0], *sub_agent, *spawner[1:]], [*spawner[:2], *sub_agent, spawner[2]]):
        recorder = SessionRecorder()
        for event in events:
            recorder.on_event(event)
            recorder.checkpoint()
            recorder.drain_completed()
        recorder.flush()
        recorder.drain_completed()
        assert recorder.drain_spawn_gaps() == []


def _gaps_noted(events: list[ps.AgentEvent], *, every_event: bool) -> list[SpawnGap]:
    """The links a recorder of `events` leaves to the store, drained at every event or at the end."""
    recorder = SessionRecorder()
    gaps: list[SpawnGap] = []
    for event in events:
        recorder.on_event(event)
        if every_event:
            recorder.checkpoint()
            recorder.drain_completed()
            gaps += recorder.drain_spawn_gaps()
    recorder.flush()
    recorder.drain_completed()
    return gaps + recorder.drain_spawn_gaps()


@pytest.mark.parametrize("every_event", [False, True])
def test_a_recorder_holding_both_ends_leaves_no_link_to_the_store_in_edge_cases(every_event: bool) -> None:
    """A tool end delivered again once its sub-agent was drained (its link complete), and a
    spawner loop ending without naming a sub-agent it held (aborted), each left a link for
    the store: a read of the other end, which the recorder had held. A spawner's loop sent
    again once drained, naming a sub-agent not started, left its link a second time."""
    p_start, p_end = start("p.c.1", "p"), end("p.c.1", at=4)
    k_start, k_end = start("k.sub.1", "k", at=1, parent="p.c.1"), end("k.sub.1", at=2)
    cases = {
        "delivered again, sub-agent drained late": [p_start, k_start, k_end, K_SPAWNED, K_SPAWNED, p_end],
        "delivered again, sub-agent started late": [p_start, K_SPAWNED, k_start, k_end, K_SPAWNED, p_end],
        "never named, sub-agent ends first": [p_start, k_start, k_end, p_end],
        "never named, spawner ends first": [p_start, k_start, p_end, k_end],
    }
    noted = {
        case: [gap.noted_by for gap in _gaps_noted(events, every_event=every_event)]
        for case, events in cases.items()
    }
    assert noted == {case: [] for case in cases}
    # A sub-agent named by a spawner drained before it started may be recorded elsewhere,
    # and saved before the spawner: the spawner's side reads it once, to know (so too when
    # that loop is sent again and names it again).
    for events in (
        [p_start, K_SPAWNED, p_end, k_start, k_end],
        [p_start, K_SPAWNED, p_end, p_start, K_SPAWNED, p_end],
    ):
        assert [gap.noted_by for gap in _gaps_noted(events, every_event=True)] == ["p"]


# -- what on_event is given by hand -----------------------------------------------------


def _odd_records() -> list[tuple[str, ps.AgentEvent, type, str]]:
    """Events built by hand carrying a record phi-core cannot hold, the error and field."""
    loop = "s1-l1"
    good = assistant("ok")
    text_int = replace(good, content=(ps.TextContent(text=5),))  # type: ignore[arg-type]
    return [
        (
            "text",
            ps.MessageEnd(loop_id=loop, message=text_int),
            TypeError,
            "event.message.content[0].text must be str, not int",
        ),
        (
            "usage negative",
            ps.TurnEnd(
                loop_id=loop,
                message=replace(good, usage=ps.Usage(input=-1, output=1, total_tokens=0)),
                usage=usage(1),
                timestamp=ts(1),
            ),
            ps.InvalidArgument,
            "event.message.usage.input: expected `int` >= 0; got -1",
        ),
        (
            "usage float",
            ps.MessageStart(
                loop_id=loop,
                message=replace(good, usage=ps.Usage(input=1.5, output=1, total_tokens=0)),  # type: ignore[arg-type]
            ),
            TypeError,
            "event.message.usage.input must be int, not float",
        ),
        (
            "agent end",
            ps.AgentEnd(loop_id=loop, messages=(text_int,), usage=usage(1), timestamp=ts(2)),
            TypeError,
            "event.messages[0].content[0].text must be str, not int",
        ),
        (
            "tool result",
            ps.ToolExecutionEnd(
                loop_id=loop,
                tool_call_id="c",
                tool_name="read",
                result=ps.ToolResult(content=(ps.TextContent(text=None),)),  # type: ignore[arg-type]
                is_error=False,
            ),
            TypeError,
            "event.result.content[0].text must be str, not None",
        ),
        (
            "config snapshot",
            replace(
                start(loop, "s1"),
                config_snapshot=ps.LoopConfigSnapshot(model="m", provider="p", max_tokens=-5),
            ),
            ps.InvalidArgument,
            "event.config_snapshot.max_tokens",
        ),
    ]


@pytest.mark.parametrize(
    ("name", "event", "error", "field"), _odd_records(), ids=[c[0] for c in _odd_records()]
)
def test_on_event_refuses_a_record_phi_core_cannot_hold(
    name: str, event: ps.AgentEvent, error: type, field: str
) -> None:
    """Only the event's own plain fields were checked: a message, tool result or config
    snapshot it carries holding a wrong type or a count out of range was recorded, and
    the session then failed to encode (or wrote what phi-core cannot read) at save."""
    recorder = SessionRecorder()
    opening = [start("s1-l1", "s1")] if type(event) is not ps.AgentStart else []
    recorder.record_all([*opening, *turn("s1-l1")[:1]])
    with pytest.raises(error, match=re.escape(field)):
        recorder.on_event(event)
    recorder.flush()
    (session,) = recorder.drain_completed() or [None]
    if session is not None:  # nothing of the refused event is recorded; what was, loads
        assert event not in [e.event for e in session.loops[0].events]
        assert ps.decode_session(ps.encode(session)) == session


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


class _Token:
    def __str__(self) -> str:
        return "token"


@pytest.mark.parametrize(
    "args",
    [
        {1: "x"},
        {"path": pathlib.Path("/tmp/x")},
        {"tags": {"a"}},
        {"token": _Token()},
        {"x": float("nan")},
        {"x": float("-inf")},
        {"x": 2**70},
        {"x": b"hello"},
        {"x": _nested(300)},
    ],
    ids=["int key", "path", "set", "object", "nan", "infinity", "int beyond 64 bits", "bytes", "deep"],
)
def test_on_event_records_free_form_values_as_a_tracer_records_them(args: dict[Any, Any]) -> None:
    """Tool arguments holding a dict key that is no text, a Path or an object were recorded
    as given: encoding the session (a store saving it) then failed, the session lost. A NaN
    (saved as null, where a Tracer records 'NaN'), an integer beyond 64 bits, bytes (base64,
    where a Tracer records their text) were recorded unlike a Tracer's, and 300 nested lists
    as given: the saved session did not decode ("nesting deeper than 128 levels")."""
    call = ps.ToolCall(id="c", name="read", arguments=args)
    message = replace(assistant("ok"), content=(call,), stop_reason="toolUse")
    events = [
        start("s1-l1", "s1"),
        *turn("s1-l1")[:1],
        ps.MessageEnd(loop_id="s1-l1", message=message),
        ps.ToolExecutionStart(loop_id="s1-l1", tool_call_id="c", tool_name="read", args=args),
        ps.ToolExecutionEnd(
            loop_id="s1-l1",
            tool_call_id="c",
            tool_name="read",
            result=ps.ToolResult(content=(), details=args),
            is_error=False,
        ),
    ]
    _, (direct,) = record(events)
    traced = SessionRecorder()
    tracer = ps.Tracer(ps.AgentSession("agent"), sinks=[traced], redact=False)
    for event in events:
        tracer.emit(event)
    traced.flush()
    (via_tracer,) = traced.drain_completed()
    assert ps.decode_session(ps.encode(direct)) == ps.decode_session(ps.encode(via_tracer))
    recorded = [e.event for e in direct.loops[0].events]
    assert recorded[2].message.content[0].arguments == recorded[3].args == recorded[4].result.details  # type: ignore[union-attr]


def test_a_tracers_events_skip_the_checks_a_hand_built_event_takes_but_a_spy_sees_them() -> None:
    """A `Tracer` checked and copied its events as it made them: its recorder takes them
    without checking their records again (`on_checked_event`), unless `on_event` is
    replaced on the recorder (a spy), or overridden by a subclass alone."""
    seen: list[ps.AgentEvent] = []

    class Watching(SessionRecorder):
        def on_event(self, event: ps.AgentEvent) -> None:
            seen.append(event)
            super().on_event(event)

    spied = SessionRecorder()
    spy_on = spied.on_event

    def spy(event: ps.AgentEvent) -> None:
        seen.append(event)
        spy_on(event)

    spied.on_event = spy  # type: ignore[method-assign]
    for recorder in (spied, Watching()):
        tracer = ps.Tracer(ps.AgentSession("agent"), sinks=[recorder])
        with tracer.loop(ps.LoopConfigSnapshot(model="m", provider="p")) as loop, loop.turn() as scope:
            with scope.assistant() as reply:
                reply.finish("hi")
        assert len(seen) == 6
        seen.clear()
    recorder = SessionRecorder()
    assert ps.FanOut([recorder]).lone[1] == recorder.on_checked_event  # type: ignore[index]
    assert ps.FanOut([recorder.on_event]).lone[1] == recorder.on_checked_event  # type: ignore[index]


@pytest.mark.parametrize("kind", ["SessionRecorder", "AutoPersistingRecorder"])
def test_a_tracers_events_reach_on_event_patched_on_the_class(kind: str, tmp_path: pathlib.Path) -> None:
    """`mock.patch.object(SessionRecorder, "on_event", autospec=True)` sees every event a
    `Tracer` delivers (6 of 6), as it did before a tracer's events took `on_checked_event`:
    only the library's own `on_event` may be skipped so."""
    cls = getattr(ps, kind)
    with mock.patch.object(cls, "on_event", autospec=True) as spy:
        recorder = ps.SessionRecorder() if kind == "SessionRecorder" else cls(ps.JsonDirStore(tmp_path))
        tracer = ps.Tracer(ps.AgentSession("agent"), sinks=[recorder])
        with tracer.loop(ps.LoopConfigSnapshot(model="m", provider="p")) as loop, loop.turn() as scope:
            with scope.assistant() as reply:
                reply.finish("hi")
        assert spy.call_count == 6
    if kind != "SessionRecorder":
        recorder.close()
