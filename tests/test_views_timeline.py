"""views.timeline and `phi-session show --timeline`; `phi-session list --after` (keyset pages)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

import phi_session as ps
from phi_session._time import Timestamp
from phi_session.cli import EXIT_OK, main
from phi_session.model import LoopRecord, Session
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore
from phi_session.views import timeline

from .test_recorder import T0, end, record, spawn_end, start, ts, turn, usage
from .web_support import BASIC_ID, CHILD_ID, EXAMPLE_STREAM, PARALLEL_ID, PARENT_ID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_viewer import huge_session  # lives in benchmarks/, not in the package


def _store(tmp_path: Path) -> JsonDirStore:
    result = CliRunner().invoke(main, ["record", str(EXAMPLE_STREAM), "--dir", str(tmp_path / "store")])
    assert result.exit_code == EXIT_OK, result.output
    return JsonDirStore(tmp_path / "store")


def test_bars_nest_loops_turns_calls_and_sub_agents_inline(tmp_path: Path) -> None:
    store = _store(tmp_path)
    parent = store.load(PARENT_ID)
    bars = timeline(parent, store)
    kinds = [bar.kind for bar in bars]
    assert kinds[0] == "session" and bars[0].depth == 0
    # The sub-agent's session sits right under the tool call that spawned it, one level deeper.
    child_at = next(i for i, bar in enumerate(bars) if bar.kind == "session" and bar.session_id == CHILD_ID)
    spawner = bars[child_at - 1]
    assert spawner.kind == "tool" and spawner.label == "researcher"
    assert bars[child_at].depth == spawner.depth + 1
    assert {bar.session_id for bar in bars} == {PARENT_ID, CHILD_ID}
    # Without a store, the sub-agent is not drawn.
    assert {bar.session_id for bar in timeline(parent)} == {PARENT_ID}
    # Every turn's model call starts with the turn and ends before its tool calls start.
    for index, bar in enumerate(bars):
        if bar.kind == "model":
            turn = bars[index - 1]
            assert turn.kind == "turn" and bar.start == turn.start
            assert bar.end is not None and turn.end is not None and bar.end <= turn.end


def test_continuations_and_parallel_groups(tmp_path: Path) -> None:
    store = _store(tmp_path)
    basic = timeline(store.load(BASIC_ID))
    loops = [bar for bar in basic if bar.kind == "loop"]
    assert len(loops) == 2 and loops[1].depth == loops[0].depth + 1 and loops[1].detail == "Default"
    parallel = [bar for bar in timeline(store.load(PARALLEL_ID)) if bar.kind == "loop"]
    details = [bar.detail for bar in parallel]
    assert any("parallel winner" in detail for detail in details)
    assert any("parallel, not selected" in detail for detail in details)


def test_a_sub_agent_cycle_is_drawn_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    child = store.load(CHILD_ID)
    # The child's own waterfall reaches no further (it spawned nothing), and loading the
    # parent's through the child's store never repeats a session.
    bars = timeline(store.load(PARENT_ID), store)
    assert sum(bar.kind == "session" for bar in bars) == 2
    assert [bar.kind for bar in timeline(child, store)].count("session") == 1


def test_show_timeline_text_and_json(tmp_path: Path) -> None:
    store = _store(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        main, ["show", PARENT_ID, "--timeline", "--store", str(tmp_path / "store")], env={"COLUMNS": "140"}
    )
    assert result.exit_code == EXIT_OK, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("WHAT"))
    rows = lines[header + 1 :]
    assert len(rows) == len(timeline(store.load(PARENT_ID), store))
    assert all("\u2588" in row for row in rows)
    assert any("researcher" in row for row in rows) and any(CHILD_ID[:20] in row for row in rows)
    store_url = str(tmp_path / "store")
    as_json = runner.invoke(main, ["show", PARENT_ID, "--timeline", "--json", "--store", store_url])
    bars = json.loads(as_json.output)
    assert bars[0]["kind"] == "session" and Timestamp.parse(bars[0]["start"])
    assert {bar["kind"] for bar in bars} == {"session", "loop", "turn", "model", "tool"}


def test_list_pages_with_after(tmp_path: Path) -> None:
    _store(tmp_path)
    runner = CliRunner()
    store_url = str(tmp_path / "store")
    everything = json.loads(runner.invoke(main, ["list", "--json", "--store", store_url]).output)
    seen: list[str] = []
    args = ["list", "--json", "--limit", "2", "--store", store_url]
    while True:
        result = runner.invoke(main, args)
        assert result.exit_code == EXIT_OK, result.output
        seen += [row["session_id"] for row in json.loads(result.stdout)]
        if "--after" not in result.stderr:
            break
        cursor = result.stderr.split("--after ", 1)[1].strip()
        args = ["list", "--json", "--limit", "2", "--after", cursor, "--store", store_url]
    assert seen == [row["session_id"] for row in everything]
    bad = runner.invoke(main, ["list", "--after", "nonsense", "--store", store_url])
    assert bad.exit_code == 2 and "--after: not a page cursor" in bad.stderr


def test_show_timeline_of_a_huge_session_reads_it_a_page_of_loops_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = huge_session(450)  # three pages of 200 loops
    store_url = str(tmp_path / "s.db")
    with SqliteStore(store_url) as store:
        store.save(session)
    pages: list[tuple[int, int]] = []
    real_load_loops = SqliteStore.load_loops

    def no_whole_session(self: SqliteStore, session_id: str) -> Session:
        raise AssertionError("the whole session was loaded")

    def load_loops(self: SqliteStore, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        pages.append((start, stop))
        return real_load_loops(self, session_id, start, stop)

    monkeypatch.setattr(SqliteStore, "load", no_whole_session)
    monkeypatch.setattr(SqliteStore, "load_loops", load_loops)
    runner = CliRunner()
    result = runner.invoke(
        main, ["show", "huge-session", "--timeline", "--store", store_url], env={"COLUMNS": "120"}
    )
    assert result.exit_code == EXIT_OK, result.output
    assert pages == [(0, 200), (200, 400), (400, 450)]
    rows = [line for line in result.output.splitlines() if "\u2588" in line]
    assert len(rows) == len(timeline(session))
    assert sum(line.startswith("WHAT") for line in result.output.splitlines()) == 1  # one header
    as_json = json.loads(
        runner.invoke(main, ["show", "huge-session", "--timeline", "--json", "--store", store_url]).output
    )
    assert [(bar["kind"], bar["label"], bar["start"]) for bar in as_json] == [
        (bar.kind, bar.label, str(bar.start)) for bar in timeline(session)
    ]


def test_sub_agents_of_tool_calls_sharing_an_id_across_turns_are_each_drawn(tmp_path: Path) -> None:
    """Some providers number tool calls per turn ("call0" in every turn): the second
    sub-agent took the first one's place under turn 0, and the first was never drawn."""
    root = "p.c.1"

    def spawn(child_session: str, at: int) -> list[ps.AgentEvent]:
        child = f"{child_session}.sub.1"
        return [
            start(child, child_session, parent=root, at=at),
            end(child, at=at),
            spawn_end(root, child, "call0"),
        ]

    first, second = turn(root, 0, calls=1, at=0), turn(root, 1, calls=1, at=10)
    events = [start(root, "p"), *first[:-1], *spawn("ka", 1), first[-1]]
    events += [*second[:-1], *spawn("kb", 11), second[-1], end(root, at=20)]
    _, sessions = record(events)
    store = JsonDirStore(tmp_path)
    for session in sessions:
        store.save(session)
    bars = timeline(store.load("p"), store)
    drawn = [(bar.kind, bar.turn_index if bar.kind == "turn" else bar.session_id) for bar in bars]
    assert [item for item in drawn if item[0] in ("turn", "session")] == [
        ("session", "p"),
        ("turn", 0),
        ("session", "ka"),
        ("turn", 1),
        ("session", "kb"),
    ]


def test_tool_calls_sharing_an_id_across_turns_each_end_at_their_own_result() -> None:
    """The second turn's "call0" ended at the first turn's result, before it was called:
    a bar of no length."""
    root, epoch_ms = "p.c.1", T0 // 10**6
    events: list[ps.AgentEvent] = [start(root, "p")]
    for index, at in enumerate((0, 1000)):
        call = ps.ToolCall(id="call0", name="read", arguments={})
        answer = ps.AssistantMessage(
            content=(call,),
            stop_reason="toolUse",
            model="claude",
            provider="anthropic",
            usage=usage(1),
            timestamp=epoch_ms + at + 10,
        )
        result = ps.ToolResultMessage(
            tool_call_id="call0", tool_name="read", content=(), is_error=False, timestamp=epoch_ms + at + 100
        )
        events += [
            ps.TurnStart(loop_id=root, turn_index=index, triggered_by="User", timestamp=ts(at)),
            ps.MessageEnd(loop_id=root, message=answer),
            ps.MessageEnd(loop_id=root, message=result),
            ps.TurnEnd(
                loop_id=root, message=answer, usage=usage(1), timestamp=ts(at + 200), tool_results=(result,)
            ),
        ]
    _, [session] = record([*events, end(root, at=2000)])
    tools = [bar for bar in timeline(session) if bar.kind == "tool"]
    assert [(bar.start, bar.end) for bar in tools] == [(ts(10), ts(100)), (ts(1010), ts(1100))]


def test_arguments_of_another_type_are_type_errors_and_an_empty_page_an_invalid_argument(
    tmp_path: Path,
) -> None:
    """They raised AttributeError ('int' object has no attribute 'loops' / 'load'), and a
    page of 0 loops range()'s bare ValueError."""
    from phi_session import views

    store = _store(tmp_path)
    session = store.load(PARENT_ID)
    for call, message in (
        (lambda: views.loop_forest(5), "^session must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: timeline(5), "^session must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: timeline(session, 5), "^store must be SessionStore or None, not int$"),  # type: ignore[arg-type]
        (lambda: views.spawn_graph(5, session), "^store must be SessionStore, not int$"),  # type: ignore[arg-type]
        (lambda: views.spawn_graph(store, 5), "^root must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: list(views.event_stream([5])), "^session must be Session, not int$"),  # type: ignore[list-item]
    ):
        with pytest.raises(TypeError, match=message):
            call()
    outline = store.load_outline(PARENT_ID)
    with pytest.raises(ps.InvalidArgument, match=r"^loops_per_page must be at least 1, got 0$"):
        next(views.outline_timeline(store, outline, 0))
    assert next(views.outline_timeline(store, outline, 1))


def test_a_loop_that_never_ended_spans_to_its_last_recorded_event(tmp_path: Path) -> None:
    """An aborted loop (no AgentEnd: its stream cut off) drew a time axis of 0 ms: its
    last known time, its start. It spans to its last recorded event, as does the axis;
    one still running when saved keeps no end but the axis reaches its last event too."""
    from phi_session.views import outline_span

    root = "p.c.1"
    cut_off = ps.TurnStart(loop_id=root, turn_index=1, triggered_by="Continuation", timestamp=ts(3000))
    _, [session] = record([start(root, "p"), *turn(root, 0, at=1000), cut_off])
    assert session.loops[0].status == "Aborted" and session.loops[0].ended_at is None
    bars = timeline(session)
    assert [(bar.kind, bar.start, bar.end) for bar in bars[:2]] == [
        ("session", ts(0), ts(3000)),
        ("loop", ts(0), ts(3000)),
    ]
    running = msgspec.structs.replace(
        session, loops=[msgspec.structs.replace(session.loops[0], status="Running")]
    )
    assert [bar.end for bar in timeline(running)[:2]] == [ts(3000), None]
    with SqliteStore(tmp_path / "s.db") as store:
        for saved in (session, running):
            store.save(saved)
            assert outline_span(store.load_outline("p"), store) == (ts(0), ts(3000))
        store.save(session)
    result = CliRunner().invoke(
        main, ["show", "p", "--timeline", "--store", str(tmp_path / "s.db")], env={"COLUMNS": "120"}
    )
    assert result.exit_code == EXIT_OK, result.output
    [loop_row] = [line for line in result.output.splitlines() if "loop #1" in line]
    assert "Aborted" in loop_row and " 3.0s " in loop_row


def _aborted(session: Session) -> Session:
    """`session` with every loop cut off (no AgentEnd: no end, aborted)."""
    loops = [msgspec.structs.replace(loop, ended_at=None, status="Aborted") for loop in session.loops]
    return msgspec.structs.replace(session, loops=loops)


def test_show_timeline_of_loops_that_never_ended_reads_only_its_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The axis of loops that never ended (their last event's time) read every such loop
    at once, twice: 3,000 aborted loops took 20 s and 250 MB more. Their outlines hold it."""
    session = _aborted(huge_session(450))
    store_url = str(tmp_path / "s.db")
    with SqliteStore(store_url) as store:
        store.save(session)
    pages: list[tuple[int, int]] = []
    real_load_loops = SqliteStore.load_loops

    def load_loops(self: SqliteStore, session_id: str, start: int, stop: int) -> list[LoopRecord]:
        pages.append((start, stop))
        return real_load_loops(self, session_id, start, stop)

    monkeypatch.setattr(SqliteStore, "load_loops", load_loops)
    runner = CliRunner()
    args = ["show", "huge-session", "--timeline", "--store", store_url]
    result = runner.invoke(main, args, env={"COLUMNS": "120"})
    assert result.exit_code == EXIT_OK, result.output
    assert pages == [(0, 200), (200, 400), (400, 450)]
    [bar, *_] = json.loads(runner.invoke(main, [*args, "--json"]).output)
    assert bar["end"] == str(timeline(session)[0].end)  # as drawn from the whole session


def test_the_span_of_loops_outlined_before_their_last_event_time_was_is_read_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An outline stored before it held a loop's last event time: such loops are read.
    from phi_session.views import _SEEN_BATCH, outline_span

    session = _aborted(huge_session(100))
    with SqliteStore(tmp_path / "s.db") as store:
        store.save(session)
        outline = store.load_outline("huge-session")
        older = msgspec.structs.replace(
            outline,
            loops=tuple(msgspec.structs.replace(loop, unended_seen_text=None) for loop in outline.loops),
        )
        read: list[tuple[int, int]] = []
        real_load_loops = store.load_loops

        def load_loops(session_id: str, start: int, stop: int) -> list[LoopRecord]:
            read.append((start, stop))
            return real_load_loops(session_id, start, stop)

        monkeypatch.setattr(store, "load_loops", load_loops)
        assert outline_span(outline, store) == outline_span(older, store)
        assert outline_span(outline, store)[1] == timeline(session)[0].end
    assert read == [(start, min(start + _SEEN_BATCH, 100)) for start in range(0, 100, _SEEN_BATCH)]


def test_a_sub_agents_bar_end_is_taken_from_the_ends_known_already(tmp_path: Path) -> None:
    # The viewer drew a sub-agent session's bar reading its loops that never ended on
    # every page of its parent's timeline; the ends are kept for the parent's pages.
    from phi_session.cost import Pricer
    from phi_session.views import loops_timeline
    from phi_session.web.pages import CachedSession, Page

    root, child = "p.c.1", "k.sub.1"
    first = turn(root, 0, calls=1, at=0)
    cut_off = ps.TurnStart(loop_id=child, turn_index=0, triggered_by="Continuation", timestamp=ts(7000))
    events = [start(root, "p"), *first[:-1], start(child, "k", parent=root, at=1), cut_off]
    _, sessions = record([*events, spawn_end(root, child), first[-1], end(root, at=20)])
    store = JsonDirStore(tmp_path)
    for session in sessions:
        store.save(session)
    parent = store.load("p")
    placed = [(0, 0, parent.loops[0])]

    def child_end(ends: dict[str, Timestamp] | None) -> Timestamp | None:
        bars = loops_timeline("p", placed, store, sub_agent_ends=ends)
        return next(bar.end for bar in bars if bar.kind == "session" and bar.session_id == "k")

    ends: dict[str, Timestamp] = {}
    assert child_end(ends) == ts(7000) and ends == {"k": ts(7000)}
    assert child_end({"k": ts(9000)}) == ts(9000)
    cached = CachedSession(store.load_outline("p"), store)
    cached.timeline(Page(0, 20), Pricer(use_table=False))
    assert cached.sub_agent_ends == {"k": ts(7000)}
