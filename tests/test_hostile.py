"""Hostile and out-of-order input found in review: clear errors, nothing lost, no crash."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import phi_session as ps
from phi_session._float32 import Float32
from phi_session._strict import MAX_VALUE_DEPTH
from phi_session.codec import escape_surrogates, without_lone_surrogates
from phi_session.stores.base import merge_sessions, validate_session_id
from phi_session.stores.conformance import at, make_loop, make_session

T0 = ps.Timestamp.parse("2025-01-01T00:00:00Z")
START = '{"type":"ToolExecutionStart","loop_id":"a","tool_call_id":"t","tool_name":"n","args":'


@pytest.mark.parametrize("strict", [True, False])
def test_very_deep_nesting_is_a_decode_error(strict: bool) -> None:
    line = START + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ps.DecodeError, match="nesting"):
        ps.decode_event(line, strict=strict)
    with pytest.raises(ps.DecodeError):
        ps.SessionRecorder().on_json(line)


@pytest.mark.parametrize(
    "line",
    [
        '{"type":[],"message":{}}',
        '{"type":"AgentStart","agent_id":"a","session_id":"s","loop_id":"s.c.1","timestamp":"2025-01-01T00:00:00Z",'
        '"config_snapshot":{"model":"m","provider":"p","temperature":' + "9" * 400 + "}}",
        '{"type":"TurnStart","loop_id":"l","turn_index":0,"triggered_by":"User",'
        '"timestamp":"+99999999999999999999-01-01T00:00:00Z"}',
    ],
)
def test_odd_values_are_decode_errors(line: str) -> None:
    with pytest.raises(ps.DecodeError):
        ps.decode_event(line)


def test_input_cannot_forge_the_internal_extension_placeholder() -> None:
    event = ps.decode_event(
        '{"type":"AgentEnd","loop_id":"a","messages":[{"role":"zzz","kind":"k","data":"HIDDEN"},'
        '{"role":"extension","kind":"0","data":"REAL"}],"usage":{"input":1,"output":1},'
        '"timestamp":"2025-01-01T00:00:00Z"}'
    )
    assert isinstance(event, ps.AgentEnd)
    assert [(m.role, m.data) for m in event.messages] == [("zzz", "HIDDEN"), ("extension", "REAL")]  # type: ignore[union-attr]


def test_agent_end_for_a_pending_branch_of_a_drained_session_is_recorded() -> None:
    recorder = ps.SessionRecorder()
    recorder.on_event(ps.ParallelLoopStart(session_id="S", loop_ids=("S.a.1",), timestamp=T0))
    recorder.on_event(ps.TurnStart(loop_id="S.a.1", turn_index=0, triggered_by="User", timestamp=T0))
    recorder.on_event(
        ps.AgentEnd(loop_id="S.a.1", messages=(), usage=ps.Usage(input=1, output=1), timestamp=T0)
    )
    recorder.flush()
    [session] = recorder.drain_completed()
    [loop] = session.loops
    # Never started (a vetoed branch sends only its AgentEnd): Aborted, nothing lost.
    assert loop.status == "Aborted" and [type(e.event).__name__ for e in loop.events] == [
        "TurnStart",
        "AgentEnd",
    ]


def test_a_pending_branch_keeps_what_arrived_before_its_start() -> None:
    recorder = ps.SessionRecorder()
    recorder.on_event(ps.ParallelLoopStart(session_id="S", loop_ids=("S.a.1",), timestamp=T0))
    recorder.on_event(ps.InputRejected(loop_id="S.a.1", reason="early"))
    recorder.on_event(ps.AgentStart(agent_id="x", session_id="S", loop_id="S.a.1", timestamp=T0))
    loop = recorder.current_loop("S.a.1")
    assert loop is not None and loop.agent_id == "x" and loop.status == "Running"
    assert [(e.sequence, type(e.event).__name__) for e in loop.events] == [
        (0, "InputRejected"),
        (1, "AgentStart"),
    ]


def test_parallel_start_for_a_session_that_never_starts_is_an_orphan_at_flush() -> None:
    recorder = ps.SessionRecorder()
    recorder.on_event(ps.ParallelLoopStart(session_id="S", loop_ids=(), timestamp=T0))
    recorder.flush()
    assert [type(o.event).__name__ for o in recorder.orphans()] == ["ParallelLoopStart"]


def test_shortest_float32_spelling_with_two_digits() -> None:
    assert Float32(1.1210387714598537e-44).to_json() == b"1.1e-44"


def test_timestamps_compare_only_with_timestamps() -> None:
    with pytest.raises(TypeError):
        _ = ps.Timestamp.parse("2025-01-01T00:00:00Z") < 5  # type: ignore[operator]


def test_a_loop_id_used_again_later_is_a_second_record_when_merged() -> None:
    first = make_session("s", loops=[make_loop("s", 1, started_at=at(1), events=3)])
    again = make_session("s", loops=[make_loop("s", 1, started_at=at(9), events=3)])
    merged = merge_sessions(first, again)
    assert [str(r.started_at) for r in merged.loops] == [
        str(first.loops[0].started_at),
        str(again.loops[0].started_at),
    ]


def test_lone_surrogate_session_id_is_invalid() -> None:
    with pytest.raises(ps.InvalidSessionId):
        validate_session_id("\ud800")


def test_unstorable_session_ids_do_not_block_recovery(tmp_path: Path) -> None:
    events = [
        ps.AgentStart(agent_id="a", session_id="../evil", loop_id="../evil.c.1", timestamp=T0),
        ps.AgentEnd(loop_id="../evil.c.1", messages=(), usage=ps.Usage(input=0, output=0), timestamp=T0),
        ps.AgentStart(agent_id="a", session_id="good", loop_id="good.c.1", timestamp=T0),
        ps.AgentEnd(loop_id="good.c.1", messages=(), usage=ps.Usage(input=0, output=0), timestamp=T0),
    ]
    store = ps.JsonDirStore(tmp_path / "store")
    with ps.Journal(tmp_path / "j", durability="os") as journal:
        ps.JournaledRecorder(journal).record_all(events)
    report = ps.recover(tmp_path / "j", store)
    assert store.list_ids() == ["good"] and not report.failed_sessions
    assert len((tmp_path / "j" / "orphans.jsonl").read_text().splitlines()) == 2
    assert ps.recover(tmp_path / "j", store).failed_sessions == []


# -- text read from undecodable bytes (lone surrogates) ------------------------------------------


def record_with_lone_surrogates(sinks: list[object]) -> None:
    """A tool listing a directory whose file names are not UTF-8, as ``os.listdir`` gives them."""
    tracer = ps.Tracer(ps.AgentSession("agent-\udcff"), sinks=sinks)  # type: ignore[arg-type]
    with tracer.loop(ps.LoopConfigSnapshot(model="model-\udcfe", provider="p")) as loop:
        loop.user("list the files in caf\udce9/")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                reply.text_delta("looking \udcff")
                call = ps.ToolCall(id="c1", name="ls", arguments={"path\udcff": ["caf\udce9/"]})
                reply.finish("looking \udcff", tool_calls=[call])
            with turn.tool(call) as tool:
                tool.result("r\udce9sum\udce9.txt")


@pytest.mark.parametrize("kind", ["sqlite", "json_dir"])
def test_a_session_holding_lone_surrogates_is_saved_with_them_escaped(tmp_path: Path, kind: str) -> None:
    """Such text made the whole session unsaveable: kept in memory, lost at exit."""
    store: ps.SessionStore = (
        ps.SqliteStore(tmp_path / "s.db") if kind == "sqlite" else ps.JsonDirStore(tmp_path / "d")
    )
    persisting = ps.AutoPersistingRecorder(
        store, config=ps.SessionRecorderConfig(include_streaming_events=True)
    )
    record_with_lone_surrogates([persisting.on_event])
    persisting.close()
    assert persisting.failed_sessions() == []
    [session_id] = store.list_ids()
    session = store.load(session_id)
    text = ps.encode(session).decode()
    assert "r\\\\xed\\\\xb3\\\\xa9sum" in text and "agent-\\\\xed\\\\xb3\\\\xbf" in text
    assert ps.encode(ps.decode_session(ps.encode(session))) == ps.encode(session)


def test_events_holding_lone_surrogates_are_written_by_every_json_writer(tmp_path: Path) -> None:
    events: list[ps.AgentEvent] = []
    record_with_lone_surrogates([events.append])
    for event in events:
        line = ps.encode_event(event)
        assert ps.encode_event(ps.decode_event(line)) == line
    recorder = ps.SessionRecorder()
    for event in events:
        recorder.on_event(event)
    recorder.flush()
    [session] = recorder.drain_completed()
    assert b"\\\\xed\\\\xb3\\\\xbf" in ps.encode(session, pretty=True)
    assert "\udcff" in session.loops[0].agent_id  # the recorder's own copy is left as it was


def _deeply(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def _innermost(value: Any) -> tuple[int, Any]:
    """How many lists `value` nests, and what the innermost holds."""
    levels = 0
    while isinstance(value, list):
        value, levels = value[0], levels + 1
    return levels, value


@pytest.mark.parametrize("kind", ["sqlite", "json_dir"])
def test_a_value_nested_too_deep_to_write_is_clipped_not_lost(tmp_path: Path, kind: str) -> None:
    """Hand-built, such a value made encoding raise RecursionError: the session could
    not be written nor saved."""
    note = ps.ExtensionMessage(kind="note", data={"a": _deeply(1500)})
    cycle: list[Any] = [1]
    cycle.append(cycle)
    tool = ps.ToolExecutionStart(
        loop_id="s.cfg.1", tool_call_id="c1", tool_name="n", args={"a": 1, "b": cycle}
    )
    loop = msgspec.structs.replace(
        make_loop("s", 1), metadata={"d": _deeply(5000)}, messages=(note,), events=(ps.LoopEvent(0, tool),)
    )
    session = make_session("s", loops=[loop])
    stand_in = "[NOT RECORDED: writing it raised RecursionError]"
    for pretty in (True, False):
        read = ps.decode_session(ps.encode_session(session, pretty=pretty))
        clipped = (MAX_VALUE_DEPTH - 1, stand_in)  # under the dict: the value's level MAX_VALUE_DEPTH
        assert _innermost(read.loops[0].metadata["d"]) == clipped
        assert _innermost(read.loops[0].messages[0].data["a"]) == clipped
        assert read.loops[0].events[0].event.args == {"a": 1, "b": [1, stand_in]}
    assert ps.decode_event(ps.encode_event(tool)).args == {"a": 1, "b": [1, stand_in]}  # a journal's line
    store: ps.SessionStore = (
        ps.SqliteStore(tmp_path / "s.db") if kind == "sqlite" else ps.JsonDirStore(tmp_path / "d")
    )
    store.save(session)
    loaded = store.load("s")
    assert ps.encode_session(loaded) == ps.encode_session(session)
    assert _innermost(session.loops[0].metadata["d"]) == (5000, 1)  # the caller's value is left as it was


@pytest.mark.parametrize("kind", ["sqlite", "json_dir"])
def test_a_value_nested_just_too_deep_for_the_stores_own_stack_is_clipped_not_lost(
    tmp_path: Path, kind: str
) -> None:
    """How deep an encoder reaches depends on the stack it starts from: a value the
    check before saving could write, but the store's encoders, a few frames deeper, could
    not, made the save raise RecursionError (a band of depths near the interpreter's limit)."""
    store: ps.SessionStore = (
        ps.SqliteStore(tmp_path / "s.db") if kind == "sqlite" else ps.JsonDirStore(tmp_path / "d")
    )
    for depth in range(900, 1000, 3):
        loop = msgspec.structs.replace(make_loop(f"s{depth}", 1), metadata={"d": _deeply(depth)})
        store.save(make_session(f"s{depth}", loops=[loop]))
        stand_in = (MAX_VALUE_DEPTH - 1, "[NOT RECORDED: writing it raised RecursionError]")
        assert _innermost(store.load(f"s{depth}").loops[0].metadata["d"]) in ((depth, 1), stand_in)


def _shared_twice(levels: int) -> Any:
    """A list holding the one below it twice, `levels` deep: 2**levels lists written."""
    value: Any = 1
    for _ in range(levels):
        value = [value, value]
    return value


def _all_pointing_at_each_other(count: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": i, "nb": []} for i in range(count)]
    for node in nodes:
        node["nb"].extend(other for other in nodes if other is not node)
    return nodes[0]


@contextmanager
def _failing_after(seconds: int) -> Iterator[None]:
    def fail(*_: object) -> None:  # without a traceback, whose values may take as long to show
        pytest.fail(f"still running after {seconds} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)  # a hang fails the test instead of the suite
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("shape", ["shared", "graph"])
def test_a_value_too_deep_to_write_holding_containers_in_many_places_is_clipped_at_once(shape: str) -> None:
    """Copying it for the clip copied each shared container again along every path to it
    (2**117 copies for the one shared twice a level): encoding hung where it had raised
    RecursionError at once."""
    value = _shared_twice(1500) if shape == "shared" else _all_pointing_at_each_other(12)
    session = make_session("s", loops=[msgspec.structs.replace(make_loop("s", 1), metadata={"v": value})])
    with _failing_after(20):
        read = ps.decode_session(ps.encode_session(session, pretty=False))
    written = msgspec.json.encode(read.loops[0].metadata["v"])
    assert written.count(b"[") + written.count(b"{") < 300_000  # the repeats copied are bounded
    assert b"[NOT RECORDED: writing it raised RecursionError]" in written


@pytest.mark.parametrize(
    ("continuation", "formation"),
    [
        (ps.ContinuationKind.rerun("retry \udcff"), None),
        (ps.ContinuationKind.branch("b\udcff"), None),
        (ps.INITIAL, ps.SessionFormation.inactivity_timeout(60, "old\udcff", T0)),
    ],
)
def test_lone_surrogates_in_a_continuation_tag_or_a_previous_session_id_are_escaped(
    tmp_path: Path, continuation: ps.ContinuationKind, formation: ps.SessionFormation | None
) -> None:
    """The text of serde's tagged enums was left as it was: the session could not be saved."""
    start = ps.AgentStart(
        agent_id="a",
        session_id="s",
        loop_id="s.c.1",
        continuation_kind=continuation,
        timestamp=T0,
        **({} if formation is None else {"formation": formation}),
    )
    recorder = ps.SessionRecorder()
    recorder.record_all(
        [start, ps.AgentEnd(loop_id="s.c.1", messages=(), usage=ps.Usage(input=0, output=0), timestamp=T0)]
    )
    recorder.flush()
    [session] = recorder.drain_completed()
    store = ps.JsonDirStore(tmp_path)
    store.save(session)
    assert b"\\\\xed\\\\xb3\\\\xbf" in ps.encode(store.load("s"))
    assert b"\\\\xed\\\\xb3\\\\xbf" in ps.encode_event(start)
    escaped = without_lone_surrogates(session)
    assert escaped.loops[0].continuation_kind.kind == continuation.kind
    assert escaped.formation.kind == session.formation.kind
    assert without_lone_surrogates(ps.INITIAL) is ps.INITIAL


@given(st.text())
def test_escaping_keeps_valid_text_as_it_is_and_makes_any_text_utf8(text: str) -> None:
    escaped = escape_surrogates(text)
    escaped.encode("utf-8")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        assert escaped != text
    else:
        assert escaped is text
    data = {"k": [text, (text,)], text: 1}
    assert without_lone_surrogates(data) == {"k": [escaped, (escaped,)], escaped: 1}
