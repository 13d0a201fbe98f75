"""The demo scenario records what the issue lists, deterministically and offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import phi_session as ps
from phi_session.cli.render import loop_tree
from phi_session.demo import run_demo
from phi_session.recorder import SessionRecorder
from phi_session.sinks import JsonlSink
from phi_session.stores.json_dir import JsonDirStore
from phi_session.views import loop_forest


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ps.Session], bytes]:
    stream = io.BytesIO()
    directory = tmp_path_factory.mktemp("demo")
    sessions = run_demo(directory=str(directory), sinks=[JsonlSink(stream)])
    return sessions, stream.getvalue()


def by_kind(session: ps.Session) -> dict[str, list[ps.LoopRecord]]:
    kinds: dict[str, list[ps.LoopRecord]] = {}
    for record in session.loops:
        kinds.setdefault(record.kind.kind, []).append(record)
    return kinds


def test_three_sessions_main_sub_agent_and_after_the_idle_hours(demo: tuple[list[ps.Session], bytes]) -> None:
    (main, child, later), _ = demo
    assert main.formation.kind == "FirstLoop" and main.parent_spawn_ref is None
    assert child.parent_spawn_ref is not None
    assert later.formation == ps.SessionFormation.inactivity_timeout(
        threshold_secs=1800, previous_session_id=main.session_id, timestamp=later.formation.timestamp
    )
    assert later.formation.timestamp - main.last_active_at > 7200
    assert main.agent_id == later.agent_id != child.agent_id


def test_the_main_session_has_every_kind_of_loop(demo: tuple[list[ps.Session], bytes]) -> None:
    main = demo[0][0]
    kinds = by_kind(main)
    assert {k: len(v) for k, v in kinds.items()} == {
        "Initial": 3,
        "Default": 3,
        "Rerun": 1,
        "Branch": 1,
        "Compaction": 1,
    }
    statuses = sorted(r.status for r in main.loops)
    assert statuses == ["Completed"] * 8 + ["Rejected"]
    origin = kinds["Initial"][0]
    assert origin.turns[0].output_message.content[0] == ps.ThinkingContent(  # type: ignore[union-attr]
        thinking="The user wants a diagnosis. Notes first, then the tests."
    )
    assert [m.tool_name for m in origin.turns[0].tool_results] == ["read_file", "run_tests"]  # type: ignore[union-attr]
    assert [type(e.event).__name__ for e in origin.events].count("ProgressMessage") == 1
    rejected = next(r for r in main.loops if r.status == "Rejected")
    assert rejected.rejection == "prompt injection: request to reveal the system prompt"
    [compaction] = kinds["Compaction"]
    assert [type(e.event).__name__ for e in compaction.events] == [
        "AgentStart",
        "CompactionStarted",
        "CompactionEnded",
        "AgentEnd",
    ]
    assert kinds["Branch"][0].parent_loop_id == origin.loop_id
    # The rerun retries the fix: it continues the fix's parent, so it replaces the fix on its chain.
    assert kinds["Rerun"][0].parent_loop_id == kinds["Default"][0].parent_loop_id == origin.loop_id


def test_a_prun_and_a_revert_are_recorded(demo: tuple[list[ps.Session], bytes]) -> None:
    """README says the demo exercises `prun`/`revert`; it called neither."""
    main, _, later = demo[0]
    origin, fix = by_kind(main)["Initial"][0], by_kind(main)["Default"][0]
    [prun] = [e.event for e in fix.events if isinstance(e.event, ps.PrunApplied)]
    # The fix drops the origin's tool output (notes.txt, the test log), as their timestamps say.
    results = [m for m in origin.messages if isinstance(m, ps.ToolResultMessage)]
    assert prun.pruned_timestamps == tuple(m.timestamp for m in results) and prun.messages_removed == 2
    [revert] = [e.event for e in later.loops[0].events if isinstance(e.event, ps.RevertApplied)]
    assert (revert.category, revert.applied) == ("failure", True)
    # Between the failed CI status check and the local test run.
    names = [type(e.event).__name__ for e in later.loops[0].events]
    assert (
        names.index("ToolExecutionEnd")
        < names.index("RevertApplied")
        < names.index("TurnEnd", 1 + names.index("TurnEnd"))
    )


def test_the_parallel_evaluation_has_a_winner(demo: tuple[list[ps.Session], bytes]) -> None:
    main = demo[0][0]
    grouped = [r for r in main.loops if r.parallel_group is not None]
    assert len(grouped) == 2
    winner = next(r for r in grouped if r.parallel_group.is_selected)  # type: ignore[union-attr]
    assert winner.config is not None and winner.config.provider == "openai"
    assert winner.parallel_group.evaluation_usage.total_tokens > 0  # type: ignore[union-attr]
    assert {r.parent_loop_id for r in grouped} == {next(iter(by_kind(main)["Rerun"])).loop_id}


def test_the_sub_agent_is_linked_both_ways(demo: tuple[list[ps.Session], bytes]) -> None:
    main, child, _ = demo[0]
    [ref] = [ref for r in main.loops for ref in r.child_loop_refs]
    [child_loop] = child.loops
    assert (ref.child_session_id, ref.child_loop_id, ref.tool_name) == (
        child.session_id,
        child_loop.loop_id,
        "research",
    )
    spawn = child.parent_spawn_ref
    assert spawn is not None and (spawn.parent_session_id, spawn.tool_call_id, spawn.tool_name) == (
        main.session_id,
        ref.tool_call_id,
        "research",
    )
    assert child_loop.loop_id.endswith(".sub.1") and child_loop.turns[0].triggered_by == "SubAgent"


def test_the_bearer_token_in_tool_arguments_is_redacted(demo: tuple[list[ps.Session], bytes]) -> None:
    sessions, stream = demo
    assert b"demo-secret-token" not in stream
    assert all(b"demo-secret-token" not in ps.encode(s) for s in sessions)
    assert b'"authorization":"[REDACTED]"' in stream  # the named field, in the final arguments
    assert b'\\"authorization\\":\\"[REDACTED]\\"' in stream  # and in the streamed arguments


def test_the_files_the_stream_and_a_second_run_agree(
    demo: tuple[list[ps.Session], bytes], tmp_path: Path
) -> None:
    sessions, stream = demo
    expected = [ps.encode(s) for s in sessions]
    replay = SessionRecorder()
    for line in stream.splitlines():
        replay.on_json(line)
    replay.flush()
    assert sorted(ps.encode(s) for s in replay.drain_completed()) == sorted(expected)
    store = JsonDirStore(tmp_path)
    again = run_demo(store)
    assert [ps.encode(s) for s in again] == expected  # deterministic, ids included
    assert [ps.encode(store.load(s.session_id)) for s in sessions] == expected


def test_the_loop_tree_shows_status_kind_turns_and_tokens_in_80_columns(
    demo: tuple[list[ps.Session], bytes],
) -> None:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    for session in demo[0]:
        console.print(loop_tree(session, loop_forest(session), details=False))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for needle in (
        "Completed",
        "Rejected",
        "Rerun",
        "Branch",
        "Compaction",
        "winner",
        "InactivityTimeout",
        "2 turns",
        "tokens",
        "sub-agent session",
        "spawned via research",
    ):
        assert needle in text, needle
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    # One line per loop (nothing wraps), plus the session lines and the loops' extra lines.
    assert sum(line.lstrip("│├└─ ").startswith("#") for line in lines) == sum(len(s.loops) for s in demo[0])


def test_context_at_a_rerun_holds_the_rerun_answer_only(demo: tuple[list[ps.Session], bytes]) -> None:
    main = demo[0][0]
    kinds = by_kind(main)
    texts = [
        block.text
        for message in main.context_at(kinds["Rerun"][0].loop_id)
        for block in getattr(message, "content", ())
        if isinstance(block, ps.TextContent)
    ]
    assert not any(text.startswith("Fixed: parse() now returns") for text in texts)  # the fix's answer
    assert texts[-1] == "Fixed: parse() returns [] early when there are no tokens."
    assert texts.count("Please fix it.") == 1


def test_context_at_the_compaction_pass_is_the_uncompacted_chain(
    demo: tuple[list[ps.Session], bytes],
) -> None:
    # Compaction events carry token estimates only, no summaries: the recorded session
    # has no compaction block, so (as phi-core's context builder does) the chain's raw
    # messages come back.
    main = demo[0][0]
    [compaction] = by_kind(main)["Compaction"]
    assert not isinstance(compaction.compaction_block, ps.CompactionBlock)
    chain = [main.get_loop(loop_id) for loop_id in main.loop_chain_to(compaction.loop_id)]
    assert main.context_at(compaction.loop_id) == [m for r in chain if r is not None for m in r.messages]


def test_the_default_store_is_used_when_none_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHI_SESSION_STORE", f"{tmp_path / 'store'}/")
    console = Console(file=io.StringIO(), color_system=None)
    sessions = run_demo(console=console)
    stored = sorted(p.stem for p in (tmp_path / "store").glob("*.json"))
    assert stored == sorted(s.session_id for s in sessions)
    assert "demo: saved 3 sessions" in console.file.getvalue()  # type: ignore[attr-defined]
