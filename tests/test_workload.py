"""The benchmark workload generator: deterministic, shaped as documented, phi-core exact."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

import phi_session
from phi_session import AssistantMessage
from phi_session.recorder import SessionRecorder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import workload  # lives in benchmarks/, not in the package

SESSIONS = 2


@pytest.fixture(scope="module")
def small() -> list[bytes]:
    return workload.lines(SESSIONS)


def test_same_seed_same_lines(small: list[bytes]) -> None:
    assert workload.lines(SESSIONS, seed=0) == small
    assert workload.lines(SESSIONS, seed=1) != small


def test_lines_are_the_encoded_events(small: list[bytes]) -> None:
    assert [phi_session.encode_event(e) for e in workload.events(SESSIONS)] == small
    assert not any(line.endswith(b"\n") for line in small)


def test_workload_sizes() -> None:
    assert (workload.W1, workload.W2) == (100, 1000)
    assert workload.EVENTS_PER_LOOP == 124
    assert workload.EVENTS_PER_SESSION == workload.LOOPS_PER_SESSION * workload.EVENTS_PER_LOOP


def test_event_counts_per_type(small: list[bytes]) -> None:
    counts = Counter(type(phi_session.decode_event(line)).__name__ for line in small)
    loops = SESSIONS * workload.LOOPS_PER_SESSION
    turns = loops * workload.TURNS_PER_LOOP
    tool_calls = loops * (workload.TURNS_PER_LOOP - 1) * workload.TOOLS_PER_TURN
    assert counts == {
        "AgentStart": loops,
        "AgentEnd": loops,
        "TurnStart": turns,
        "TurnEnd": turns,
        # the user prompt, each turn's assistant message and each tool result
        "MessageStart": loops + turns + tool_calls,
        "MessageEnd": loops + turns + tool_calls,
        "MessageUpdate": turns * workload.DELTAS_PER_TURN,
        "ToolExecutionStart": tool_calls,
        "ToolExecutionEnd": tool_calls,
    }
    assert sum(counts.values()) == len(small) == SESSIONS * workload.EVENTS_PER_SESSION


def test_every_line_decodes_and_reencodes_byte_for_byte(small: list[bytes]) -> None:
    for line in small:
        assert phi_session.encode_event(phi_session.decode_event(line)) == line


def test_loop_structure() -> None:
    starts = [e for e in workload.events(SESSIONS) if isinstance(e, phi_session.AgentStart)]
    by_session: dict[str, list[phi_session.AgentStart]] = {}
    for start in starts:
        by_session.setdefault(start.session_id, []).append(start)
    assert len(by_session) == SESSIONS
    for session_id, loops in by_session.items():
        first = loops[0]
        assert first.loop_id == f"{session_id}.anthropic.claude-sonnet-4-5.1"
        assert first.parent_loop_id is None and first.continuation_kind == phi_session.INITIAL
        assert [s.loop_id.rsplit(".", 1)[1] for s in loops] == ["1", "2", "3", "4", "5"]
        for later in loops[1:]:
            assert later.parent_loop_id == first.loop_id
            assert later.continuation_kind == phi_session.DEFAULT


def test_deltas_spell_the_final_message() -> None:
    text: list[str] = []
    checked = 0
    for event in workload.events(1):
        if isinstance(event, phi_session.MessageUpdate) and event.delta.kind == "Text":
            text.append(event.delta.delta)
        elif isinstance(event, phi_session.MessageEnd) and isinstance(event.message, AssistantMessage):
            blocks = [b.text for b in event.message.content if isinstance(b, phi_session.TextContent)]
            assert blocks == ["".join(text)]
            text.clear()
            checked += 1
    assert checked == workload.LOOPS_PER_SESSION * workload.TURNS_PER_LOOP


def test_recording_gives_the_expected_sessions(small: list[bytes]) -> None:
    recorder = SessionRecorder()
    for line in small:
        recorder.on_json(line)
    recorder.flush()
    sessions = recorder.drain_completed()
    assert not recorder.orphans()
    assert len(sessions) == SESSIONS
    for session in sessions:
        assert len(session.loops) == workload.LOOPS_PER_SESSION
        assert all(r.status == "Completed" for r in session.loops)
        assert [r.turn_count() for r in session.loops] == [workload.TURNS_PER_LOOP] * len(session.loops)
        first = session.loops[0]
        assert first.children_loop_ids == tuple(r.loop_id for r in session.loops[1:])
        assert first.tool_call_count() == (workload.TURNS_PER_LOOP - 1) * workload.TOOLS_PER_TURN
        stop_reasons = [
            t.output_message.stop_reason
            for t in first.turns
            if isinstance(t.output_message, AssistantMessage)
        ]
        assert stop_reasons == ["toolUse"] * (workload.TURNS_PER_LOOP - 1) + ["stop"]
        # AgentEnd's summed usage equals the sum of the turns' usage.
        turn_total = phi_session.Usage(input=0, output=0)
        for turn in first.turns:
            turn_total = turn_total + turn.usage
        assert first.usage == turn_total
        # Streaming deltas are not stored: the default configuration drops them.
        stored = workload.EVENTS_PER_LOOP - workload.TURNS_PER_LOOP * workload.DELTAS_PER_TURN
        assert [len(r.events) for r in session.loops] == [stored] * workload.LOOPS_PER_SESSION
