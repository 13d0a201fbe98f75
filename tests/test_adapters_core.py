"""The adapter core: the rules every framework adapter shares (phi_session.adapters)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi_session import (
    INITIAL,
    AgentSession,
    ContinuationKind,
    FakeClock,
    JsonDirStore,
    LoopConfigSnapshot,
    Redactor,
    SessionRecorder,
    SqliteStore,
    decode_session,
    encode_session,
)
from phi_session._strict import MAX_VALUE_DEPTH
from phi_session.adapters import (
    FRAMEWORK_SESSION_NAMESPACE,
    AdapterCore,
    enter_tool,
    leave_tool,
    require_extra,
    session_id_for,
    usage_of,
)
from phi_session.adapters._core import jsonable
from phi_session.adapters._sessions import SessionBook
from phi_session.cost import uncached_input
from phi_session.errors import InvalidArgument, MissingExtra, SessionLocked
from phi_session.events import ToolExecutionEnd, ToolExecutionStart
from phi_session.instrument import ToolScope
from phi_session.messages import ToolCall
from phi_session.stores.base import SessionStore, validate_session_id
from phi_session.stores.outline import SessionOutline, loop_prompt

from .conftest import needs_fork

CONFIG = LoopConfigSnapshot(model="m-1", provider="fake")


def make_core(recorder: SessionRecorder, **kwargs: object) -> AdapterCore:
    return AdapterCore("fake-fw", [recorder], agent=AgentSession("agent-1", clock=FakeClock()), **kwargs)  # type: ignore[arg-type]


def one_turn(core: AdapterCore, key: str, text: str = "hi") -> None:
    run = core.run(key)
    assert run is not None
    run.loop.user(text)
    with run.loop.turn() as turn, turn.assistant() as reply:
        reply.finish(text, usage=usage_of(3, 2))


def assert_round_trip(recorder: SessionRecorder) -> None:
    for session in recorder.sessions():
        data = encode_session(session)
        assert encode_session(decode_session(data)) == data


def test_session_ids_usable_as_is_stay() -> None:
    assert session_id_for("thread-42") == "thread-42"


@pytest.mark.parametrize("raw", ["", "conv.1", "a/b", "nul\x00", ".hidden", "x" * 300, "back\\slash"])
def test_unusable_session_ids_become_uuid5(raw: str) -> None:
    assert session_id_for(raw) == str(uuid.uuid5(FRAMEWORK_SESSION_NAMESPACE, raw))


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(exclude_categories=())))  # lone surrogates too
def test_every_text_has_one_storable_session_id(raw: str) -> None:
    """Text decoded from undecodable bytes holds lone surrogates, which UTF-8 (and so
    uuid5) refuses: session_id_for raised."""
    session_id = session_id_for(raw)
    assert validate_session_id(session_id) == session_id_for(raw)  # storable, deterministic
    if session_id != raw:
        assert session_id == str(uuid.UUID(session_id))
        assert session_id != session_id_for(raw + "\udc80")  # lone surrogates are not dropped
    with contextlib.suppress(UnicodeEncodeError):  # the UUIDv5 of valid text, as before
        assert session_id in (raw, str(uuid.uuid5(FRAMEWORK_SESSION_NAMESPACE, raw)))


def test_a_later_run_in_a_session_continues_its_last_loop() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    for key in ("r1", "r2"):
        core.start_run(key, CONFIG, framework_session_id="thread-1")
        one_turn(core, key)
        core.end_run(key)
    (session,) = recorder.sessions()
    first, second = session.loops
    assert session.session_id == "thread-1"
    assert (first.loop_id, second.loop_id) == ("thread-1.fake.m-1.1", "thread-1.fake.m-1.2")
    assert second.parent_loop_id == first.loop_id
    assert second.continuation_kind is not None and second.continuation_kind.kind == "Default"
    assert first.metadata == {"framework": "fake-fw"}
    assert_round_trip(recorder)


def test_a_run_may_continue_the_session_as_another_kind() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    for key in ("r1", "r2"):  # the first loop is Initial whatever kind is asked
        core.start_run(key, CONFIG, framework_session_id="thread-1", kind=ContinuationKind.branch("cp-7"))
        one_turn(core, key)
        core.end_run(key)
    (session,) = recorder.sessions()
    first, second = session.loops
    assert first.continuation_kind is not None and first.continuation_kind.kind == "Initial"
    assert second.parent_loop_id == first.loop_id
    assert second.continuation_kind == ContinuationKind.branch("cp-7")
    assert_round_trip(recorder)


def test_a_session_id_with_a_lone_surrogate_is_kept_escaped_in_the_metadata() -> None:
    # The session could not be encoded, so not saved, with the lone surrogate in its metadata.
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("r", CONFIG, framework_session_id="user-\udc80")
    one_turn(core, "r")
    core.end_run("r")
    (session,) = recorder.sessions()
    assert session.session_id == session_id_for("user-\udc80")
    assert session.loops[0].metadata["framework_session_id"] == "user-\\xed\\xb2\\x80"
    assert core.fault_count == 0
    assert_round_trip(recorder)


def test_derived_session_id_keeps_the_original_in_metadata() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("r", CONFIG, framework_session_id="conv.7")
    core.end_run("r")
    (session,) = recorder.sessions()
    assert session.session_id == session_id_for("conv.7")
    assert session.loops[0].metadata == {"framework": "fake-fw", "framework_session_id": "conv.7"}


def test_continuation_after_a_restart_comes_from_the_store(tmp_path: Path) -> None:
    store = JsonDirStore(tmp_path)
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("r1", CONFIG, framework_session_id="t")
    one_turn(core, "r1")
    core.end_run("r1")
    for session in recorder.sessions():
        store.save(session)
    # A new process: nothing in memory, the store knows the last loop and the counter.
    recorder2 = SessionRecorder()
    core2 = make_core(recorder2, store=store)
    core2.start_run("r2", CONFIG, framework_session_id="t")
    core2.end_run("r2")
    (loop,) = recorder2.sessions()[0].loops
    assert loop.loop_id == "t.fake.m-1.2"
    assert loop.parent_loop_id == "t.fake.m-1.1"


def test_a_run_whose_stored_session_cannot_be_read_is_recorded_in_a_session_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Continuing a session the store cannot read (a corrupt file, a store down) could
    # reuse a stored loop's id: the run was refused, a fault, and every run of that
    # framework session after it went unrecorded.
    store = JsonDirStore(tmp_path)
    (tmp_path / "t.json").write_text("{ not json")
    recorder = SessionRecorder()
    core = make_core(recorder, store=store)
    for key in ("r1", "r2"):
        with caplog.at_level(logging.WARNING, logger="phi_session.adapters"):
            core.start_run(key, CONFIG, framework_session_id="t")
        one_turn(core, key)
        core.end_run(key)
    assert core.fault_count == 0
    sessions = recorder.sessions()
    assert len(sessions) == 2 and "t" not in {s.session_id for s in sessions}
    for session in sessions:
        (loop,) = session.loops
        assert loop.kind == INITIAL and loop.metadata["framework_session_id"] == "t"
    assert "session 't' could not be read from the store" in caplog.text
    assert_round_trip(recorder)


def test_a_run_whose_stored_session_is_locked_is_recorded_whole_in_a_session_of_its_own(
    tmp_path: Path,
) -> None:
    # SessionLocked (another writer held the store past its timeout) slipped past the
    # fallback: the run failed to start and its prompt and first turn were lost.
    class LockedStore(JsonDirStore):
        def load_outline(self, session_id: str) -> SessionOutline:
            raise SessionLocked(f"{session_id!r}: the database stayed locked by another writer")

    recorder = SessionRecorder()
    core = make_core(recorder, store=LockedStore(tmp_path))
    core.start_run("r1", CONFIG, framework_session_id="t")
    one_turn(core, "r1", "the prompt")
    core.end_run("r1")
    assert core.fault_count == 0
    ((loop,),) = [session.loops for session in recorder.sessions()]
    assert loop.kind == INITIAL and loop.metadata["framework_session_id"] == "t"
    assert [type(m).__name__ for m in loop.messages] == ["UserMessage", "AssistantMessage"]
    assert loop.turn_count() == 1


def test_runs_without_session_use_the_adapters_agent_session() -> None:
    recorder = SessionRecorder()
    agent = AgentSession("agent-1", clock=FakeClock())
    core = AdapterCore("fake-fw", [recorder], agent=agent)
    core.start_run("r", CONFIG)
    core.end_run("r")
    assert recorder.sessions()[0].session_id == agent.session_id


def test_a_run_under_a_running_tool_is_its_sub_agent() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    parent = core.start_run("outer", CONFIG, framework_session_id="s")
    parent.loop.user("go")
    with parent.loop.turn() as turn:
        with turn.assistant() as reply:
            reply.finish(tool_calls=[ToolCall(id="c1", name="ask", arguments={})])
        with turn.tool(id="c1", name="ask", args={}) as tool:
            token = enter_tool(lambda: tool)  # started on demand, as a framework may need
            try:
                child = core.start_run("inner", CONFIG, framework_session_id="s")
                one_turn(core, "inner", "sub question")
                core.end_run("inner")
            finally:
                leave_tool(token)
            tool.result("sub answer")
    core.end_run("outer")
    sessions = {session.session_id: session for session in recorder.sessions()}
    child_session = sessions[child.loop.session_id]
    assert child.loop.session_id != "s"
    (child_loop,) = child_session.loops
    assert child_loop.parent_loop_id == parent.loop.loop_id
    assert child_loop.turns[0].triggered_by == "SubAgent"
    (parent_loop,) = sessions["s"].loops
    assert [ref.child_loop_id for ref in parent_loop.child_loop_refs] == [child_loop.loop_id]
    assert child_session.parent_spawn_ref is not None
    assert child_session.parent_spawn_ref.parent_loop_id == parent.loop.loop_id
    assert_round_trip(recorder)


@contextlib.contextmanager
def ask_running(core: AdapterCore) -> Iterator[tuple[Any, ToolScope]]:
    """Run "outer" of session "s", whose turn calls tool ``ask`` (id c1), running here."""
    parent = core.start_run("outer", CONFIG, framework_session_id="s")
    with parent.loop.turn() as turn:
        with turn.assistant() as reply:
            reply.finish(tool_calls=[ToolCall(id="c1", name="ask", arguments={})])
        with turn.tool(id="c1", name="ask", args={}) as tool:
            token = enter_tool(tool)
            try:
                yield parent, tool
            finally:
                leave_tool(token)
    core.end_run("outer")


SECRET = "key sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789ABCD"


def test_a_sub_agent_another_core_records_goes_to_its_sinks_and_processors() -> None:
    # The tool is the outer core's, the sub-agent's runs the inner core's: each run goes
    # where its own adapter records, the links alone tie them together.
    outer_recorder, inner_recorder = SessionRecorder(), SessionRecorder()
    outer = make_core(outer_recorder, redact=False)
    inner = make_core(inner_recorder, redact=Redactor(redact_text=True))
    with ask_running(outer) as (parent, tool):
        first = inner.start_run("first", CONFIG)
        one_turn(inner, "first", SECRET)
        inner.handoff("first", CONFIG)
        one_turn(inner, "first")
        inner.end_run("first")
        tool.result("answered")
    (parent_session,) = outer_recorder.sessions()
    (child_session,) = inner_recorder.sessions()
    assert child_session.session_id == first.loop.session_id
    started, handed = child_session.loops
    assert started.parent_loop_id == parent.loop.loop_id and started.continuation_kind == INITIAL
    assert started.loop_id == f"{child_session.session_id}.sub.1"
    assert started.turns[0].triggered_by == "SubAgent" and handed.parent_loop_id == started.loop_id
    assert SECRET not in encode_session(child_session).decode()  # the inner core's redactor
    (parent_loop,) = parent_session.loops
    assert [ref.child_loop_id for ref in parent_loop.child_loop_refs] == [started.loop_id]
    assert parent_loop.turns[0].tool_results[0].tool_call_id == "c1"
    # The tool call is named in the outer recorder's session alone.
    assert child_session.parent_spawn_ref is not None
    assert child_session.parent_spawn_ref.parent_loop_id == parent.loop.loop_id
    assert_round_trip(outer_recorder)
    assert_round_trip(inner_recorder)


def test_a_run_spawned_outside_any_tool_is_a_sub_agent_linked_one_way() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    parent = core.start_run("outer", CONFIG, framework_session_id="s")
    child = core.start_sub_agent("inner", CONFIG, parent.loop.loop_id)
    with child.loop.turn("SubAgent") as turn, turn.assistant() as reply:
        reply.finish("sub answer")
    core.end_run("inner")
    core.end_run("outer")
    sessions = {session.session_id: session for session in recorder.sessions()}
    child_session = sessions[child.loop.session_id]
    (child_loop,) = child_session.loops
    assert child_loop.loop_id == f"{child_session.session_id}.sub.1"
    assert child_loop.parent_loop_id == parent.loop.loop_id and child_loop.continuation_kind == INITIAL
    assert child_session.parent_spawn_ref is not None
    assert child_session.parent_spawn_ref.parent_loop_id == parent.loop.loop_id
    assert child_session.parent_spawn_ref.tool_call_id == ""
    (parent_loop,) = sessions["s"].loops
    assert not parent_loop.child_loop_refs
    assert_round_trip(recorder)


def test_later_runs_under_one_tool_call_continue_its_sub_agents_session() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    with ask_running(core) as (parent, tool):
        for key in ("first", "second"):
            core.start_run(key, CONFIG)
            one_turn(core, key)
            core.end_run(key)
        tool.result("both answered")
    (child_session,) = [session for session in recorder.sessions() if session.session_id != "s"]
    first, second = child_session.loops
    assert (first.parent_loop_id, second.parent_loop_id) == (parent.loop.loop_id, first.loop_id)
    assert second.continuation_kind == ContinuationKind("Default")
    (parent_loop,) = next(session for session in recorder.sessions() if session.session_id == "s").loops
    assert [ref.child_loop_id for ref in parent_loop.child_loop_refs] == [first.loop_id]
    assert child_session.parent_spawn_ref is not None
    assert child_session.parent_spawn_ref.tool_call_id == "c1"
    assert_round_trip(recorder)


def test_handoff_ends_the_loop_and_the_next_agent_continues_it() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    run = core.start_run("r", CONFIG, framework_session_id="h")
    run.loop.user("help")
    with run.loop.turn() as turn, turn.assistant() as reply:
        reply.finish("over to billing", stop_reason="handoff")
    other = LoopConfigSnapshot(model="m-2", provider="fake")
    successor = core.handoff("r", other, metadata={"agent": "billing"})
    assert successor is not None
    one_turn(core, "r", "more")
    core.end_run("r")
    first, second = recorder.sessions()[0].loops
    assert first.messages[-1].stop_reason == "handoff"  # type: ignore[union-attr]
    assert second.parent_loop_id == first.loop_id
    assert second.loop_id == "h.fake.m-2.1"
    assert second.metadata == {"framework": "fake-fw", "agent": "billing"}


def test_branches_fork_from_one_loop_without_a_winner() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("root", CONFIG, framework_session_id="p")
    one_turn(core, "root")
    core.run("root").loop.end()  # type: ignore[union-attr]  # a branch may fork from an ended loop
    for tag in ("p.a", "p.b"):
        branch = core.branch(tag, "root", CONFIG, tag, metadata={"branch": tag})
        assert branch is not None
        one_turn(core, tag, tag)
        core.end_run(tag)
    core.end_run("root")
    assert core.branch("x", "gone", CONFIG, "x") is None
    root, *branches = recorder.sessions()[0].loops
    assert [(b.parent_loop_id, b.continuation_kind, b.metadata["branch"]) for b in branches] == [
        (root.loop_id, ContinuationKind.branch(tag), tag) for tag in ("p.a", "p.b")
    ]
    assert all(b.turns[0].triggered_by == "Branch" and b.parallel_group is None for b in branches)
    assert_round_trip(recorder)


def test_an_exception_in_the_run_ends_its_loop_aborted() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("r", CONFIG, framework_session_id="e")
    core.end_run("r", RuntimeError("model exploded"))
    (loop,) = recorder.sessions()[0].loops
    assert loop.status == "Aborted"
    assert_round_trip(recorder)


def test_an_adapter_fault_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    core = make_core(SessionRecorder())

    def broken() -> None:
        raise KeyError("bug")

    with caplog.at_level(logging.ERROR, logger="phi_session.adapters"):
        assert core.safely(broken) is None
        with core.guard():
            broken()
    assert core.fault_count == 2
    assert len(caplog.records) == 1


def test_close_ends_open_runs_as_failed() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("r", CONFIG, framework_session_id="c")
    core.close()
    assert core.open_runs == 0
    assert recorder.sessions()[0].loops[0].status == "Aborted"


def test_default_sink_saves_into_the_embedded_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI_SESSION_STORE", str(tmp_path / "sessions.db"))
    core = AdapterCore("fake-fw", agent=AgentSession(clock=FakeClock()))
    core.start_run("r", CONFIG, framework_session_id="d")
    one_turn(core, "r")
    core.end_run("r")
    core.close()
    assert core.store is not None
    assert [loop.loop_id for loop in core.store.load("d").loops] == ["d.fake.m-1.1"]


def test_a_core_used_again_after_close_records_into_the_embedded_store_again(tmp_path: Path) -> None:
    # An ADK runner closes its plugins; the same plugin may then serve the next runner.
    store = SqliteStore(tmp_path / "sessions.db")
    core = AdapterCore("fake-fw", store=store, agent=AgentSession(clock=FakeClock()))
    for _ in range(2):
        core.start_run("r", CONFIG, framework_session_id="d")
        one_turn(core, "r")
        core.end_run("r")
        core.close()
    first, second = store.load("d").loops
    assert (first.loop_id, second.loop_id) == ("d.fake.m-1.1", "d.fake.m-1.2")
    assert second.parent_loop_id == first.loop_id and second.status == "Completed"
    assert core.fault_count == 0 and core.tracer.sink_errors == {}


_ONE_HOP = """
import sys
from phi_session import LoopConfigSnapshot
from phi_session.adapters import AdapterCore

core = AdapterCore("fake-fw")  # the embedded store: $PHI_SESSION_STORE
core.start_run("r", LoopConfigSnapshot(model="m-1", provider="fake"), framework_session_id=sys.argv[1])
core.end_run("r")
core.close()
"""


def test_a_session_held_in_memory_goes_on_after_the_loops_another_process_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web app's workers: a conversation's requests land on one worker, then another,
    then the first again. The first held the session in memory from its earlier run and
    went on from it: its next loop took a number the other worker had saved (a second
    record of that id) and continued its own stale last loop."""
    database = tmp_path / "sessions.db"
    monkeypatch.setenv("PHI_SESSION_STORE", str(database))
    core = AdapterCore("fake-fw")  # on the clock the other process's runs are on

    def here(key: str) -> None:
        core.start_run(key, CONFIG, framework_session_id="conv")
        one_turn(core, key)
        core.end_run(key)
        core.flush()  # saved before the next request lands elsewhere

    def elsewhere() -> None:
        worker = subprocess.run(
            [sys.executable, "-c", _ONE_HOP, "conv"], capture_output=True, text=True, timeout=60
        )
        assert (worker.returncode, worker.stderr) == (0, "")

    here("r1")
    elsewhere()
    here("r3")
    elsewhere()
    core.close()
    loops = SqliteStore(database).load("conv").loops
    assert [(loop.loop_id, loop.parent_loop_id) for loop in loops] == [
        ("conv.fake.m-1.1", None),
        ("conv.fake.m-1.2", "conv.fake.m-1.1"),
        ("conv.fake.m-1.3", "conv.fake.m-1.2"),
        ("conv.fake.m-1.4", "conv.fake.m-1.3"),
    ]


def test_overlapping_runs_of_one_session_in_two_processes_are_both_kept(tmp_path: Path) -> None:
    """Both runs started before either was saved: each process numbered its loop 2, and
    the store merged the two records of that id, alive at the same time, into one: a
    whole run was lost. They are two records now (their agents differ), still of one id."""
    store = SqliteStore(tmp_path / "sessions.db")
    clock = FakeClock()
    recorders = [SessionRecorder(), SessionRecorder()]  # two processes: two books, one store
    workers = [
        AdapterCore("fake-fw", [recorder], store=store, agent=AgentSession(f"worker-{n}", clock=clock))
        for n, recorder in enumerate(recorders)
    ]

    def save(recorder: SessionRecorder) -> None:
        for session in recorder.sessions():
            store.save(session)

    workers[0].start_run("r1", CONFIG, framework_session_id="conv")
    workers[0].end_run("r1")
    save(recorders[0])
    for n, core in enumerate(workers):
        core.start_run(n, CONFIG, framework_session_id="conv")
        one_turn(core, n, f"request {n}")
    for n, core in enumerate(workers):
        core.end_run(n)
        save(recorders[n])
    loops = store.load("conv").loops
    assert [(loop.loop_id, loop.agent_id) for loop in loops] == [
        ("conv.fake.m-1.1", "worker-0"),
        ("conv.fake.m-1.2", "worker-0"),
        ("conv.fake.m-1.2", "worker-1"),
    ]
    assert [loop_prompt(loop) for loop in loops[1:]] == ["request 0", "request 1"]


class _StoreOfTheEarlierProtocol:
    """A user's store written to `SessionStore` before ``loop_starts``: each method of
    that protocol delegated to a store here."""

    def __init__(self, inner: SessionStore) -> None:
        self._inner = inner


_EARLIER = ("save", "load", "delete", "list_ids", "list_for_agent", "query", "usage_totals", "prune")
_EARLIER += ("search", "load_outline", "load_loops")
for _method in (*_EARLIER, *(f"a{name}" for name in _EARLIER), "close"):
    setattr(
        _StoreOfTheEarlierProtocol,
        _method,
        lambda self, *args, _method=_method, **kwargs: getattr(self._inner, _method)(*args, **kwargs),
    )


def test_a_store_without_loop_starts_is_taken_and_its_loops_saved_elsewhere_are_gone_on_after(
    tmp_path: Path,
) -> None:
    # loop_starts was added to the runtime-checked SessionStore: such a store was refused
    # (TypeError) by the adapters and the views. Its outline tells what was saved since.
    inner = SqliteStore(tmp_path / "sessions.db")
    assert isinstance(_StoreOfTheEarlierProtocol(inner), SessionStore)
    workers = []
    for _ in range(2):  # two processes' adapters, each with its view of the store
        recorder = SessionRecorder()
        store = _StoreOfTheEarlierProtocol(inner)
        workers.append((AdapterCore("fake-fw", [recorder], store=store), recorder, store))
    for key, (core, recorder, store) in zip(["r1", "r2", "r3"], [*workers, workers[0]], strict=True):
        core.start_run(key, CONFIG, framework_session_id="conv")
        one_turn(core, key)
        core.end_run(key)
        for session in recorder.sessions():
            store.save(session)
    assert [(loop.loop_id, loop.parent_loop_id) for loop in inner.load("conv").loops] == [
        ("conv.fake.m-1.1", None),
        ("conv.fake.m-1.2", "conv.fake.m-1.1"),
        ("conv.fake.m-1.3", "conv.fake.m-1.2"),
    ]


def test_cores_given_the_same_sinks_continue_each_others_sessions() -> None:
    # A handler made per call: each call's core must go on from the last one's loops.
    recorder = SessionRecorder()
    for key in ("r1", "r2"):
        core = make_core(recorder)
        core.start_run(key, CONFIG, framework_session_id="s")
        one_turn(core, key)
        core.end_run(key)
    first, second = recorder.sessions()[0].loops
    assert (first.loop_id, second.loop_id, second.parent_loop_id) == (
        "s.fake.m-1.1",
        "s.fake.m-1.2",
        first.loop_id,
    )
    other = SessionRecorder()  # another destination: sessions of its own
    core = make_core(other)
    core.start_run("r3", CONFIG, framework_session_id="s")
    core.end_run("r3")
    assert [loop.loop_id for loop in other.sessions()[0].loops] == ["s.fake.m-1.1"]


def test_cores_on_the_embedded_store_share_one_writer_and_its_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHI_SESSION_STORE", str(tmp_path / "sessions.db"))
    first = AdapterCore("fake-fw", agent=AgentSession(clock=FakeClock()))
    threads = threading.active_count()
    cores = [first, *(AdapterCore("fake-fw", agent=AgentSession(clock=FakeClock())) for _ in range(20))]
    assert threading.active_count() == threads  # one writer thread for them all
    for key, core in zip(("r1", "r2"), cores, strict=False):
        core.start_run(key, CONFIG, framework_session_id="d")
        one_turn(core, key)
        core.end_run(key)
    first.close()  # others still record there: the writer saves what is finished, and goes on
    store = SqliteStore(tmp_path / "sessions.db")
    assert [loop.loop_id for loop in store.load("d").loops] == ["d.fake.m-1.1", "d.fake.m-1.2"]
    cores[1].start_run("last", CONFIG, framework_session_id="d")
    one_turn(cores[1], "last")
    cores[1].end_run("last")
    for core in cores[1:]:
        core.close()
    loops = store.load("d").loops
    assert [(loop.loop_id, loop.parent_loop_id) for loop in loops[1:]] == [
        ("d.fake.m-1.2", "d.fake.m-1.1"),
        ("d.fake.m-1.3", "d.fake.m-1.2"),
    ]
    assert threading.active_count() < threads  # the last core out closed the writer


def test_a_handler_made_per_call_goes_on_after_the_last_one_was_collected() -> None:
    recorder = SessionRecorder()
    for key in ("r1", "r2", "r3"):
        core = make_core(recorder)
        core.start_run(key, CONFIG, framework_session_id="s")
        core.end_run(key)
        del core
        gc.collect()  # the core is gone; the recorder it wrote to is not
    loops = recorder.sessions()[0].loops
    assert [(loop.loop_id, loop.parent_loop_id) for loop in loops[1:]] == [
        ("s.fake.m-1.2", "s.fake.m-1.1"),
        ("s.fake.m-1.3", "s.fake.m-1.2"),
    ]


def test_sinks_share_a_book_in_any_order_and_two_methods_of_one_object_do_not() -> None:
    first, second = SessionRecorder(), SessionRecorder()
    for key, sinks in (("r1", [first, second]), ("r2", [second, first])):
        core = AdapterCore("fake-fw", sinks, agent=AgentSession(clock=FakeClock()))
        core.start_run(key, CONFIG, framework_session_id="s")
        core.end_run(key)
    assert [loop.loop_id for loop in first.sessions()[0].loops] == ["s.fake.m-1.1", "s.fake.m-1.2"]
    for key, sink in (("r3", first), ("r4", first.on_event)):  # a recorder is its on_event
        core = AdapterCore("fake-fw", sink, agent=AgentSession(clock=FakeClock()))
        core.start_run(key, CONFIG, framework_session_id="t")
        core.end_run(key)
    assert [loop.loop_id for loop in first.sessions()[1].loops] == ["t.fake.m-1.1", "t.fake.m-1.2"]

    class TwoPlaces:
        def __init__(self) -> None:
            self.a, self.b = SessionRecorder(), SessionRecorder()

        def to_a(self, event: object) -> None:
            self.a.on_event(event)  # type: ignore[arg-type]

        def to_b(self, event: object) -> None:
            self.b.on_event(event)  # type: ignore[arg-type]

    places = TwoPlaces()
    for key, sink in (("r1", places.to_a), ("r2", places.to_b)):
        core = AdapterCore("fake-fw", sink, agent=AgentSession(clock=FakeClock()))
        core.start_run(key, CONFIG, framework_session_id="s")
        core.end_run(key)
    assert [loop.loop_id for loop in places.b.sessions()[0].loops] == ["s.fake.m-1.1"]


def test_a_first_run_that_lost_a_race_takes_the_identity_that_won_it() -> None:
    book = SessionBook(max_idle=0)
    clock = FakeClock()
    assert book.hold("s", clock, lambda: "unused") is None
    winner = AgentSession(session_id="s", clock=clock)
    assert book.add(winner) is winner  # another core's first run of "s"...
    book.release(winner)  # ...ended
    book.let_go()  # and was let go of: only its progress is left
    late = book.add(AgentSession(session_id="s", clock=clock))
    assert late is not winner and late.progress() == winner.progress()


def test_a_bad_store_variable_is_named_in_the_adapters_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the CLI's: "unknown store URL scheme 'bogus'" alone did not say where it came from."""
    from phi_session.errors import InvalidStoreUrl

    monkeypatch.setenv("PHI_SESSION_STORE", "bogus://x")
    with pytest.raises(InvalidStoreUrl, match=r"^environment variable PHI_SESSION_STORE='bogus://x' is not"):
        AdapterCore("fake-fw", agent=AgentSession(clock=FakeClock()))


def test_one_store_named_two_ways_has_one_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHI_SESSION_STORE", "sessions.db")  # relative: resolved now
    cores = [
        AdapterCore("fake-fw", agent=AgentSession(clock=FakeClock())),
        AdapterCore(
            "fake-fw", store=SqliteStore(tmp_path / "sessions.db"), agent=AgentSession(clock=FakeClock())
        ),
    ]
    for number, core in enumerate(cores):
        core.start_run(number, CONFIG, framework_session_id="d")
        core.end_run(number)
    for core in cores:
        core.close()
    loops = SqliteStore(tmp_path / "sessions.db").load("d").loops
    assert [(loop.loop_id, loop.parent_loop_id) for loop in loops] == [
        ("d.fake.m-1.1", None),
        ("d.fake.m-1.2", "d.fake.m-1.1"),
    ]


def test_continuations_keep_the_framework_session_id() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder)
    core.start_run("r", CONFIG, framework_session_id="tenant/7.chat")
    core.handoff("r", CONFIG, metadata={"agent": "b"})
    core.branch("x", "r", CONFIG, "x")
    for key in ("x", "r"):
        core.end_run(key)
    loops = recorder.sessions()[0].loops
    assert [loop.metadata["framework_session_id"] for loop in loops] == ["tenant/7.chat"] * 3


def test_runs_open_at_interpreter_exit_end_failed_and_are_saved(tmp_path: Path) -> None:
    database = tmp_path / "sessions.db"
    code = """
import atexit
from phi_session import LoopConfigSnapshot
from phi_session.adapters import AdapterCore

# Exit hooks run last in, first out: the core's first, then the framework's late end.
atexit.register(lambda: print("the late end found", core.end_run("r", "the framework's own late end")))
core = AdapterCore("fake-fw")
core.start_run("r", LoopConfigSnapshot(model="m-1", provider="fake"), framework_session_id="d")
"""
    env = {**os.environ, "PHI_SESSION_STORE": str(database)}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert child.stderr == ""  # nothing failed at exit
    assert child.stdout == "the late end found None\n"  # its run had ended already
    (loop,) = SqliteStore(database).load("d").loops
    assert (loop.status, loop.error) == ("Aborted", "the interpreter exited during the run")


_PREFORK = """
import os, sys
from phi_session import LoopConfigSnapshot
from phi_session.adapters import AdapterCore

config = LoopConfigSnapshot(model="m-1", provider="fake")
core = AdapterCore("fake-fw")  # made before the fork, recording into the embedded store


def run(session: str | None) -> None:
    core.start_run("r", config, framework_session_id=session).loop.user("hi")
    core.end_run("r")


run("parent")  # the parent's thread now holds a connection to the store
run(None)  # and the core's own session (no framework session id) has a loop
workers = []
for n in (1, 2):
    worker = os.fork()
    if worker == 0:
        run(f"worker{n}")
        run(None)
        sys.exit(0)  # without close: the exit hooks save
    workers.append(worker)
for worker in workers:
    assert os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]) == 0
run("parent")
"""


@needs_fork
def test_forked_workers_record_into_an_embedded_store_of_their_own(tmp_path: Path) -> None:
    """A core made before a fork sent a worker's runs to its parent's recorder, whose writer
    thread and exit hook do not exist in the worker, through the parent's store connection:
    none of them was saved, and nothing said so. A run without a framework session id went
    on in the core's own session, whose loop ids every worker numbered alike."""
    store = _embedded_store_after(_PREFORK, tmp_path)
    named = {"parent", "worker1", "worker2"}
    own = set(store.list_ids()) - named
    assert named <= set(store.list_ids())
    assert len(own) == 3  # the parent's and one of each worker's own
    for session in map(store.load, own):
        assert [loop.loop_id for loop in session.loops] == [f"{session.session_id}.fake.m-1.1"]
    assert [loop.loop_id for loop in store.load("parent").loops] == ["parent.fake.m-1.1", "parent.fake.m-1.2"]
    for worker in ("worker1", "worker2"):
        assert [loop.status for loop in store.load(worker).loops] == ["Completed"]


def _embedded_store_after(program: str, tmp_path: Path) -> SqliteStore:
    """The embedded store `program` recorded into, once it ran cleanly in a process of its own."""
    database = tmp_path / "sessions.db"
    env = {**os.environ, "PHI_SESSION_STORE": str(database)}
    child = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60
    )
    assert (child.returncode, child.stderr) == (0, "")
    return SqliteStore(database)


_MULTIPROCESSING = """
import multiprocessing
from phi_session import LoopConfigSnapshot
from phi_session.adapters import AdapterCore

core = AdapterCore("fake-fw")  # made before the fork, recording into the embedded store


def run(session):
    core.start_run("r", LoopConfigSnapshot(model="m-1", provider="fake"), framework_session_id=session)
    core.end_run("r")


context = multiprocessing.get_context("fork")
children = [context.Process(target=run, args=(f"process{n}",)) for n in (1, 2)]
for child in children:
    child.start()
for child in children:
    child.join()
    assert child.exitcode == 0
pool = context.Pool(2)
pool.map(run, [f"job{n}" for n in range(4)])
pool.close()  # the workers finish and exit (`terminate` would kill them)
pool.join()
"""


@needs_fork
def test_runs_in_multiprocessing_children_are_saved_as_they_exit(tmp_path: Path) -> None:
    """A multiprocessing child (fork) leaves through ``os._exit``: the exit hook of its
    embedded store never ran, and none of its runs was saved."""
    store = _embedded_store_after(_MULTIPROCESSING, tmp_path)
    assert set(store.list_ids()) == {"process1", "process2", "job0", "job1", "job2", "job3"}
    assert {loop.status for session in store.list_ids() for loop in store.load(session).loops} == {
        "Completed"
    }


def test_usage_of_counts_none_as_zero() -> None:
    usage = usage_of(10, None, cache_read=None, reasoning=4)
    assert (usage.input, usage.output, usage.reasoning, usage.cache_read) == (10, 0, 4, 0)
    assert usage.total_tokens == 10


@pytest.mark.parametrize("total", [None, 0])
def test_usage_of_without_a_total_counts_the_cache_on_top_of_the_input(total: int | None) -> None:
    """An adapter's input excludes the cache (an OpenAI-compatible provider reporting no
    total_tokens: 10,000 prompt tokens, 2,000 cached): the total counts the cache too,
    so a cost bills the 8,000 uncached tokens, not 6,000 (the cache taken out twice)."""
    usage = usage_of(8_000, 100, cache_read=1_500, cache_write=500, total=total)
    assert usage.total_tokens == 10_100
    assert uncached_input(usage) == 8_000


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def test_jsonable_makes_any_host_value_json_data() -> None:
    cycle: dict[str, object] = {"n": 1}
    cycle["self"] = cycle
    items: list[object] = [1]
    items.append(items)
    shared = [2]
    value = {"cycle": cycle, "items": items, "twice": (shared, shared), (1, 2): Opaque(), "set": {3}}
    assert jsonable(value) == {
        "cycle": {"n": 1, "self": "{...}"},
        "items": [1, "[...]"],
        "twice": [[2], [2]],  # met twice, not inside itself: no cycle
        "(1, 2)": "<opaque>",
        "set": [3],
    }
    assert jsonable({1: b"\x00", "nan": float("nan")}) == {"1": "AA==", "nan": None}
    # A file name from undecodable bytes: its lone surrogate as an escape, key or value.
    assert jsonable({"f\udcff": ["x\udcff"]}) == {"f\\xed\\xb3\\xbf": ["x\\xed\\xb3\\xbf"]}


def nested(depth: int, leaf: object) -> Any:
    """`leaf` inside `depth` containers, dicts and lists in turn from the outside."""
    value = leaf
    for level in reversed(range(depth)):
        value = {"k": value} if level % 2 == 0 else [value]
    return value


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def innermost(value: object) -> object:
    while isinstance(value, (dict, list)):
        value = value["k"] if isinstance(value, dict) else value[0]
    return value


@pytest.mark.parametrize("depth", [MAX_VALUE_DEPTH, MAX_VALUE_DEPTH + 1, 400])
def test_values_nested_deeper_than_phi_core_reads_in_a_session_keep_their_depths_as_text(
    depth: int,
) -> None:
    # phi-core reads no session nested past 128 levels: tool arguments (in the reply and
    # at the tool's start), a tool result's details and loop metadata stay within it.
    recorder = SessionRecorder()
    core = make_core(recorder)
    value = nested(depth, "leaf")
    run = core.start_run("r", CONFIG, metadata={"deep": value["k"]})
    with run.loop.turn() as turn:
        with turn.assistant() as reply:
            reply.finish(tool_calls=[ToolCall(id="c1", name="t", arguments=value)])
        with turn.tool(id="c1", name="t", args=value) as tool:
            tool.result("done", details=value)
    core.end_run("r")
    (session,) = recorder.sessions()
    data = encode_session(session)
    assert encode_session(decode_session(data)) == data  # decoding checks phi-core's limit
    (loop,) = session.loops
    (call,) = loop.turns[0].output_message.content  # type: ignore[union-attr]
    (start,) = [entry.event for entry in loop.events if isinstance(entry.event, ToolExecutionStart)]
    (end,) = [entry.event for entry in loop.events if isinstance(entry.event, ToolExecutionEnd)]
    kept = [call.arguments, start.args, end.result.details, {"k": loop.metadata["deep"]}]  # type: ignore[union-attr]
    assert jsonable(value) == kept[0]
    if depth == MAX_VALUE_DEPTH:
        assert kept == [value] * 4 and core.tracer.argument_failures == 0
        return
    # Down to the limit as given, below it as JSON text (each counted, logged once).
    assert kept == [kept[0]] * 4 and core.tracer.argument_failures == 4
    assert depth_of(kept[0]) == MAX_VALUE_DEPTH
    cut = json.loads(innermost(kept[0]))  # type: ignore[arg-type]
    assert depth_of(cut) == depth - MAX_VALUE_DEPTH and innermost(cut) == "leaf"


def test_missing_extra_names_the_pip_install() -> None:
    with pytest.raises(MissingExtra, match=r"pip install 'phi-session\[nothing\]'"):
        require_extra("nothing", "phi_session_no_such_module")


def test_importing_adapters_imports_no_framework() -> None:
    code = (
        "import sys, phi_session, phi_session.adapters\n"
        "frameworks = ('agents', 'langchain_core', 'langgraph', 'pydantic_ai', 'google.adk')\n"
        "print([m for m in frameworks if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resume_seeds_counters_from_this_sessions_loop_ids_only() -> None:
    agent = AgentSession(session_id="s", clock=FakeClock())
    agent.resume(["s.a.b.3", "s.a.b.1", "s.x.7", "other.a.b.9", "s.bad.n"], "s.a.b.3")
    assert agent.next_loop_id("a.b") == "s.a.b.4"
    assert agent.next_loop_id("x") == "s.x.8"
    assert agent.next_loop_id("bad") == "s.bad.1"
    assert agent.last_loop_id == "s.a.b.3"


def run_sessions(core: AdapterCore, sessions: list[str], max_idle: int) -> None:
    """One run in each of `sessions`, in order; at most `max_idle` idle tracers stay held."""
    for number, session in enumerate(sessions):
        key = f"{session}-{number}"
        core.start_run(key, CONFIG, framework_session_id=session)
        assert core.idle_sessions <= max_idle
        one_turn(core, key)
        core.end_run(key)


@pytest.mark.parametrize("max_idle", [0, 2])
def test_a_session_let_go_of_continues_its_last_loop_with_new_ids(max_idle: int) -> None:
    recorder = SessionRecorder()
    core = make_core(recorder, max_idle_sessions=max_idle)
    run_sessions(core, ["s1", "s1", "s2", "s3", "s4", "s5", "s1"], max_idle)
    s1 = next(session for session in recorder.sessions() if session.session_id == "s1")
    assert [(loop.loop_id, loop.parent_loop_id) for loop in s1.loops] == [
        ("s1.fake.m-1.1", None),
        ("s1.fake.m-1.2", "s1.fake.m-1.1"),
        ("s1.fake.m-1.3", "s1.fake.m-1.2"),
    ]
    assert [loop.continuation_kind.kind for loop in s1.loops] == ["Initial", "Default", "Default"]  # type: ignore[union-attr]
    assert_round_trip(recorder)


def test_letting_sessions_go_changes_nothing_in_the_record() -> None:
    other = LoopConfigSnapshot(model="m-2", provider="fake")

    def record(max_idle: int) -> list[bytes]:
        recorder = SessionRecorder()
        core = make_core(recorder, max_idle_sessions=max_idle)
        for turn in range(3):
            for session in ("a", "b", "c"):
                core.start_run("r", CONFIG if turn % 2 else other, framework_session_id=session)
                one_turn(core, "r")
                if session == "b":  # two configs, branches, and a last loop named after its run
                    root = core.run("r")
                    assert root is not None
                    core.branch("x", "r", CONFIG, "x")
                    core.end_run("x")
                    core.end_run("r")
                    root.tracer.agent.set_last_loop(root.loop.loop_id)
                else:
                    core.handoff("r", other)
                    core.end_run("r")
        return [encode_session(session) for session in recorder.sessions()]

    assert record(0) == record(4096)


def test_a_session_with_an_open_run_is_never_let_go_of() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder, max_idle_sessions=0)
    first = core.start_run("open", CONFIG, framework_session_id="busy")
    core.handoff("open", CONFIG)
    core.branch("branch", "open", CONFIG, "b")
    core.end_run("branch")
    run_sessions(core, ["s1", "s2", "s3"], 0)
    second = core.start_run("again", CONFIG, framework_session_id="busy")
    assert second.tracer.agent is first.tracer.agent
    assert second.loop.loop_id == "busy.fake.m-1.4"
    core.end_run("open")
    run_sessions(core, ["s4"], 0)  # one run of "busy" is still open
    third = core.start_run("third", CONFIG, framework_session_id="busy")
    assert third.tracer.agent is first.tracer.agent
    for key in ("again", "third"):
        core.end_run(key)
    assert core.idle_sessions == 1  # its last run ended
    core.start_run("next", CONFIG, framework_session_id="s5")  # "busy" is idle now, let go of
    assert core.idle_sessions == 0


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (1.5, TypeError), ("8", TypeError), (True, TypeError), (None, TypeError)],
)
def test_max_idle_sessions_must_be_a_non_negative_int(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_idle_sessions"):
        make_core(SessionRecorder(), max_idle_sessions=value)


def test_a_session_let_go_of_goes_on_from_memory_not_from_a_lagging_store(tmp_path: Path) -> None:
    store = JsonDirStore(tmp_path)
    recorder = SessionRecorder()
    core = make_core(recorder, store=store, max_idle_sessions=0)
    run_sessions(core, ["t"], 0)
    for session in recorder.sessions():
        store.save(session)  # the store has loop 1 only: the next two are not saved yet
    run_sessions(core, ["t", "t", "u", "t"], 0)
    loops = next(session for session in recorder.sessions() if session.session_id == "t").loops
    assert [(loop.loop_id, loop.parent_loop_id) for loop in loops[-2:]] == [
        ("t.fake.m-1.3", "t.fake.m-1.2"),
        ("t.fake.m-1.4", "t.fake.m-1.3"),
    ]


def test_concurrent_runs_across_sessions_never_reuse_a_loop_id() -> None:
    recorder = SessionRecorder()
    core = make_core(recorder, max_idle_sessions=1)
    sessions = [f"c{n}" for n in range(4)]

    def work(worker: int) -> None:
        for number in range(50):
            key = (worker, number)
            core.start_run(key, CONFIG, framework_session_id=sessions[(worker + number) % len(sessions)])
            core.end_run(key)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for session in recorder.sessions():
        numbers = sorted(int(loop.loop_id.rsplit(".", 1)[1]) for loop in session.loops)
        assert numbers == list(range(1, len(session.loops) + 1))
    assert sum(len(session.loops) for session in recorder.sessions()) == 200


def test_an_adapters_arguments_are_checked_before_its_store_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A path given as the store was taken in: every run was lost at its first save.
    monkeypatch.chdir(tmp_path)  # where the embedded store would be opened
    with pytest.raises(TypeError, match="store must be SessionStore or None, not str"):
        AdapterCore("fake-fw", store="sessions.db")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="redact must be a bool or a Redactor, not str"):
        AdapterCore("fake-fw", redact="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"processors\[0\] must be callable, not int"):
        AdapterCore("fake-fw", processors=[5])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="rotate_after must be a number of seconds >= 0"):
        AdapterCore("fake-fw", rotate_after=-1)
    with pytest.raises(TypeError, match="framework must be str, not int"):
        AdapterCore(5)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # no store was opened


@pytest.mark.parametrize(
    ("counts", "error", "message"),
    [
        ((1.5, 2), TypeError, "usage.input must be int, not float"),
        ((-1, 2), InvalidArgument, "usage.input: expected a count"),
        ((1, 2, "3"), TypeError, "usage.cache_read must be int, not str"),
    ],
)
def test_a_frameworks_usage_that_is_no_count_is_refused(
    counts: tuple[object, ...], error: type[Exception], message: str
) -> None:
    input, output, *cache_read = counts
    with pytest.raises(error, match=message):
        usage_of(input, output, cache_read=cache_read[0] if cache_read else 0)  # type: ignore[arg-type]
