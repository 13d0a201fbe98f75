"""`phi_session.diff`: two loops turn by turn, two sessions loop by loop."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

import phi_session.diff
from phi_session import AgentSession, LoopConfigSnapshot, SessionRecorder, ToolCall, Tracer
from phi_session.diff import (
    FieldChange,
    FirstDifference,
    LoopDiff,
    PlacedLoop,
    SessionDiff,
    diff_loops,
    diff_placed_loops,
    diff_sessions,
    find_loop,
    load_ref,
    loop_position,
    parse_ref,
)
from phi_session.errors import InvalidArgument, LoopNotFound, SessionNotFound
from phi_session.messages import TextContent, ToolResultMessage
from phi_session.model import Session
from phi_session.replay.script import deferred_result
from phi_session.stores.conformance import EXAMPLES_DIR, record_lines

from .diff_support import BASE, Run, Step, record_runs, record_turnless


def changed(step: int, **fields: object) -> list[Step]:
    steps = list(BASE)
    steps[step] = dataclasses.replace(steps[step], **fields)  # type: ignore[arg-type]
    return steps


def test_the_first_difference_is_not_named_like_a_replays_divergence() -> None:
    # phi_session.replay.Divergence is where a replay left its recording; a diff's first
    # difference between two recorded loops is another thing, with another name.
    assert not hasattr(phi_session.diff, "Divergence")
    assert "FirstDifference" in phi_session.diff.__all__


def test_identical_loops_have_no_differences() -> None:
    session, (a, b) = record_runs([Run(BASE), Run(BASE)])
    for diff in (diff_loops(session, a, session, b), diff_loops(session, a, session, a)):
        assert diff.identical and diff.first_divergence is None
        assert diff.diverged_turns == []
        assert [turn.status for turn in diff.turns] == ["equal", "equal", "equal"]
        assert all(turn.changes == () and turn.incidental == () for turn in diff.turns)
        assert diff.usage_delta.is_zero()


def test_timing_usage_model_and_call_ids_are_deltas_not_divergence() -> None:
    fresh = [dataclasses.replace(step, tokens=step.tokens + 5, model="m2") for step in BASE]
    session, (a, b) = record_runs([Run(BASE), Run(fresh, ids="other")])
    diff = diff_loops(session, a, session, b)
    assert diff.identical
    first = diff.turns[0]
    assert first.status == "equal" and not first.diverged
    assert (
        first.usage_delta.input == 5 and first.usage_delta.total_tokens == 5 and first.usage_delta.output == 0
    )
    assert diff.usage_delta.total_tokens == 15
    assert {change.field for change in first.incidental} == {"model", "tool_call_id"}
    model = next(change for change in first.incidental if change.field == "model")
    assert (model.a, model.b) == ("acme/m1", "acme/m2")
    assert first.seconds_a is not None and first.seconds_b is not None and first.seconds_delta is not None
    assert diff.seconds_delta is not None


def test_a_changed_tool_argument_is_named_by_its_path() -> None:
    steps = changed(1, calls=(("search", {"query": "museum Paris", "limit": 5, "open": True}),))
    session, (a, b) = record_runs([Run(BASE), Run(steps)])
    diff = diff_loops(session, a, session, b)
    assert diff.diverged_turns == [1]
    assert diff.turns[1].changes == (
        FieldChange(field="tool_call", path="tool_calls[0].arguments.limit", kind="changed", a=3, b=5),
        FieldChange(field="tool_call", path="tool_calls[0].arguments.open", kind="added", b=True),
    )
    assert isinstance(diff.first_divergence, FirstDifference)
    assert diff.first_divergence.turn == 1
    assert diff.first_divergence.path == "tool_calls[0].arguments.limit"
    assert diff.first_divergence.summary == "turn 1: tool_calls[0].arguments.limit changed (and 1 more)"


def test_changed_text_thinking_and_tool_result_come_with_a_line_diff() -> None:
    steps = changed(2, text="Saturday: Louvre.\nSunday: Rodin.\nBring sunglasses.")
    steps[0] = dataclasses.replace(steps[0], thinking="Weather, then museums.")
    steps[1] = dataclasses.replace(steps[1], results=("Louvre\nRodin",))
    session, (a, b) = record_runs([Run(BASE), Run(steps)])
    diff = diff_loops(session, a, session, b)
    assert diff.diverged_turns == [0, 1, 2]
    [thinking] = diff.turns[0].changes
    assert thinking.field == "thinking" and thinking.b == "Weather, then museums."
    [result] = diff.turns[1].changes
    assert result.path == "tool_results[0].content"
    assert result.text_diff == ("@@ -1,3 +1,2 @@", " Louvre", "-Orsay", " Rodin")
    [text] = diff.turns[2].changes
    assert (text.field, text.path) == ("text", "output.text")
    assert text.a == BASE[2].text
    assert "-Sunday: Orsay." in text.text_diff and "+Sunday: Rodin." in text.text_diff
    assert " Saturday: Louvre." in text.text_diff  # context


def test_another_prompt_diverges_at_the_first_turn() -> None:
    session, (a, b) = record_runs([Run(BASE), Run(BASE, prompt="Plan a weekend in Lyon.")])
    diff = diff_loops(session, a, session, b)
    assert diff.first_divergence is not None and diff.first_divergence.turn == 0
    assert diff.turns[0].changes[0].path == "input[0]"
    assert diff.turns[0].changes[0].b == "Plan a weekend in Lyon."


def test_captured_requests_compare_system_prompt_and_tools() -> None:
    captured = [dataclasses.replace(step, system="Be brief.") for step in BASE]
    other = list(captured)
    other[1] = dataclasses.replace(other[1], system="Be thorough.\nCite sources.", tools=("search", "book"))
    session, (a, b, c) = record_runs([Run(captured), Run(other), Run(BASE)])
    diff = diff_loops(session, a, session, b)
    assert diff.diverged_turns == [1]
    assert [(change.path, change.kind) for change in diff.turns[1].changes] == [
        ("request.system_prompt", "changed"),
        ("request.tools.weather", "removed"),
        ("request.tools.book", "added"),
    ]
    assert diff.turns[1].changes[0].text_diff == (
        "@@ -1 +1,2 @@",
        "-Be brief.",
        "+Be thorough.",
        "+Cite sources.",
    )
    assert diff.turns[1].changes[2].b == {"description": "the book tool", "parameters": {"type": "object"}}
    # A turn whose request was not captured has no request to compare.
    assert diff_loops(session, a, session, c).identical


def test_turns_on_one_side_only_are_added_or_removed_with_their_content() -> None:
    longer = [*BASE, Step("One more thing.", (("book", {"museum": "Louvre"}),), ("booked",))]
    session, (a, b) = record_runs([Run(BASE), Run(longer)])
    diff = diff_loops(session, a, session, b)
    assert [turn.status for turn in diff.turns] == ["equal", "equal", "equal", "added"]
    added = diff.turns[3]
    assert added.usage_a is None and added.usage_b is not None and added.seconds_delta is None
    paths = {change.path: change for change in added.changes}
    assert all(change.kind == "added" and change.a is msgspec.UNSET for change in added.changes)
    assert paths["output.text"].b == "One more thing."
    assert paths["tool_calls[0]"].b == {"id": "call-3-0", "name": "book", "arguments": {"museum": "Louvre"}}
    assert paths["tool_results[0]"].b["content"] == "booked"
    assert diff.first_divergence is not None
    assert diff.first_divergence.summary == "turn 3: only in B"
    reverse = diff_loops(session, b, session, a)
    assert reverse.turns[3].status == "removed"
    assert {change.kind for change in reverse.turns[3].changes} == {"removed"}
    assert reverse.first_divergence is not None and reverse.first_divergence.summary == "turn 3: only in A"


def test_a_fork_against_its_parent_names_the_first_differing_turn() -> None:
    fork = [*BASE[:2], Step("Saturday: Orsay.\nSunday: Louvre.", model="m2"), Step("Enjoy!")]
    session, (parent, forked) = record_runs([Run(BASE), Run(fork, fork_of=0)])
    record = find_loop(session, forked)
    assert record.kind.kind == "Branch" and record.parent_loop_id == parent
    diff = diff_loops(session, parent, session, forked)
    assert [turn.status for turn in diff.turns] == ["equal", "equal", "changed", "added"]
    assert diff.diverged_turns == [2, 3]
    assert diff.first_divergence is not None
    assert (diff.first_divergence.turn, diff.first_divergence.path) == (2, "output.text")
    assert diff.b.continuation == "Branch:fork" and diff.b.parent_loop_id == parent
    assert diff.a.continuation == "Initial" and diff.b.position == 1


@pytest.mark.parametrize(
    ("a", "b", "path", "kind", "values", "more"),
    [
        ("injection", "rate limited", "loop.rejection", "changed", ("prompt injection", "rate limited"), 0),
        ("injection", "compaction", "loop.status", "changed", ("Rejected", "Completed"), 1),
        ("aborted hello", "aborted bye", "loop.messages[0]", "changed", ("hello", "bye"), 0),
        ("compaction", "aborted bye", "loop.messages[0]", "added", (msgspec.UNSET, "bye"), 2),
    ],
)
def test_loops_without_turns_differ_in_their_messages_and_how_they_ended(
    a: str, b: str, path: str, kind: str, values: tuple[object, object], more: int
) -> None:
    # Only turns were compared: two inputs rejected for other reasons, a rejected input
    # and a compaction pass, two prompts that failed at once were all "identical".
    session, ids = record_turnless()
    diff = diff_loops(session, ids[a], session, ids[b])
    assert not diff.identical and diff.turns == ()
    change = diff.changes[0]
    assert (change.field, change.path, change.kind, change.a, change.b) == ("loop", path, kind, *values)
    assert len(diff.changes) == 1 + more
    assert diff.first_divergence == FirstDifference(
        loop_a=ids[a],
        loop_b=ids[b],
        turn=None,
        field="loop",
        path=path,
        summary=f"{path} {kind}" + (f" (and {more} more)" if more else ""),
    )
    assert msgspec.json.decode(msgspec.json.encode(diff), type=LoopDiff | SessionDiff) == diff
    assert diff_loops(session, ids[a], session, ids[a]).identical
    assert diff_sessions(session, session).identical


def test_how_a_loop_ended_counts_after_its_turns() -> None:
    session, (a, b) = record_runs([Run(BASE), Run(changed(0, text="Looking."))])
    loops = {record.loop_id: record for record in session.loops}
    loops[b].status, loops[b].error = "Aborted", "boom"
    diff = diff_loops(session, a, session, b)
    assert [(c.path, c.a, c.b) for c in diff.changes] == [
        ("loop.status", "Completed", "Aborted"),
        ("loop.error", None, "boom"),
    ]
    assert diff.first_divergence is not None and diff.first_divergence.path == "output.text"
    loops[b].turns = loops[a].turns
    first = diff_loops(session, a, session, b).first_divergence
    assert first is not None and first.summary == "loop.status changed (and 1 more)"


def test_json_round_trip() -> None:
    steps = changed(1, calls=(("search", {"query": "museum Lyon", "limit": 3}),))
    session, (a, b) = record_runs([Run(BASE), Run([*steps, Step("extra")])])
    diff = diff_loops(session, a, session, b)
    data = msgspec.json.encode(diff)
    assert msgspec.json.decode(data)["diff"] == "loops"
    assert msgspec.json.decode(data, type=LoopDiff | SessionDiff) == diff
    both = diff_sessions(session, session)
    assert msgspec.json.decode(msgspec.json.encode(both), type=LoopDiff | SessionDiff) == both
    # A side without a value has no key at all (a JSON null would be a value).
    added = msgspec.json.decode(data)["turns"][3]["changes"][0]
    assert "a" not in added and added["kind"] == "added"


def test_sessions_pair_their_loops_in_tree_order() -> None:
    fork = [*BASE[:2], Step("Saturday: Orsay.")]
    one, _ = record_runs([Run(BASE), Run(fork, fork_of=0)])
    other, _ = record_runs([Run(BASE)])
    assert diff_sessions(one, one).identical
    diff = diff_sessions(one, other)
    assert len(diff.loops) == 1 and diff.loops[0].identical
    assert [side.continuation for side in diff.only_in_a] == ["Branch:fork"] and diff.only_in_b == ()
    assert diff.first_divergence is not None
    assert diff.first_divergence.field == "loop" and diff.first_divergence.turn is None
    assert "only in A" in diff.first_divergence.summary
    assert diff.usage_delta.total_tokens < 0
    changed_one, _ = record_runs([Run(changed(0, text="Looking."))])
    first = diff_sessions(other, changed_one).first_divergence
    assert first is not None and first.turn == 0 and first.path == "output.text"


def test_json_arguments_compare_as_structure() -> None:
    before = {"a": 1, "list": [1, 2, 3], "nested": {"x": "same", "y": [True]}, "odd key": 0}
    after = {"a": 1.0, "list": [1, 5], "nested": {"x": "same", "y": [1]}, "odd key": 1, "new": None}
    session, (a, b) = record_runs(
        [Run(changed(0, calls=(("weather", before),))), Run(changed(0, calls=(("weather", after),)))]
    )
    changes = diff_loops(session, a, session, b).turns[0].changes
    root = "tool_calls[0].arguments"
    assert [(c.path, c.kind, c.a, c.b) for c in changes] == [
        (f"{root}.list[1]", "changed", 2, 5),
        (f"{root}.list[2]", "removed", 3, msgspec.UNSET),
        (f"{root}.nested.y[0]", "changed", True, 1),  # a boolean is not the number 1
        (f'{root}["odd key"]', "changed", 0, 1),
        (f"{root}.new", "added", msgspec.UNSET, None),
    ]  # 1 and 1.0 are the same JSON number


def test_loops_are_named_by_id_or_position() -> None:
    session, (a, b) = record_runs([Run(BASE), Run(BASE)])
    assert find_loop(session, a).loop_id == a
    assert find_loop(session, "#2").loop_id == b
    for unknown in ("#3", "#0", "nope", "2"):
        with pytest.raises(LoopNotFound, match="no loop"):
            find_loop(session, unknown)
    with pytest.raises(LoopNotFound):
        diff_loops(session, a, session, "missing")
    assert parse_ref("s1") == ("s1", None)
    assert parse_ref("s1:") == ("s1", None)
    assert parse_ref("s1:s1.acme.m1.1") == ("s1", "s1.acme.m1.1")
    assert parse_ref("s1:ollama.llama3:8b.1") == ("s1", "ollama.llama3:8b.1")  # split at the first colon
    assert parse_ref("a:b", "c:d") == ("a:b", "c:d")  # the loop named apart: the whole text is the id
    with pytest.raises(InvalidArgument, match="empty loop"):  # a PhiSessionError, not a bare ValueError
        parse_ref("s1", "")
    with pytest.raises(TypeError):
        parse_ref(3)  # type: ignore[arg-type]


def test_two_loops_read_apart_from_their_session_diff_as_in_it() -> None:
    # What the viewer compares: the two loops alone (`load_loops`), named on the outline's ids.
    session, (a, b) = record_runs([Run(BASE), Run(changed(1, text="Now a park."), fork_of=0)])
    ids = [loop.loop_id for loop in session.loops]
    assert [loop_position(session.session_id, ids, name) for name in (a, b, "#1", "#2")] == [0, 1, 0, 1]
    with pytest.raises(LoopNotFound, match=f"no loop '#3' in session '{session.session_id}'"):
        loop_position(session.session_id, ids, "#3")
    placed_a, placed_b = (
        PlacedLoop(session.session_id, index, loop) for index, loop in enumerate(session.loops)
    )
    assert diff_placed_loops(placed_a, placed_b) == diff_loops(session, a, session, b)
    with pytest.raises(TypeError, match=r"^b must be PlacedLoop, not tuple$"):
        diff_placed_loops(placed_a, tuple(placed_b))  # type: ignore[arg-type]


def test_a_reference_that_is_a_stored_session_id_names_that_session() -> None:
    """``team:alpha`` was always session ``team``, loop ``alpha``: two whole sessions whose
    ids hold a colon could not be compared."""
    stored = {"team": "the session team", "team:alpha": "the session team:alpha"}

    def load(session_id: str) -> str:
        if session_id not in stored:
            raise SessionNotFound(session_id)
        return stored[session_id]

    assert load_ref("team:alpha", None, load) == ("the session team:alpha", None)
    assert load_ref("team:beta", None, load) == ("the session team", "beta")  # no such session
    assert load_ref("team:alpha", "#1", load) == ("the session team:alpha", "#1")  # loop apart
    assert load_ref("team", None, load) == ("the session team", None)
    assert load_ref("team:../x", None, load) == ("the session team", "../x")  # no session id
    with pytest.raises(SessionNotFound):
        load_ref("nobody:alpha", None, load)
    with pytest.raises(InvalidArgument, match="empty loop"):
        load_ref("team:alpha", "", load)
    with pytest.raises(TypeError):
        load_ref(3, None, load)  # type: ignore[arg-type]


def test_something_else_than_a_session_or_loop_name_is_a_type_error() -> None:
    """They raised AttributeError ('NoneType' object has no attribute 'loops')."""
    session, (a,) = record_runs([Run(BASE)])
    for call, message in (
        (lambda: diff_sessions(session, None), "^b must be Session, not NoneType$"),  # type: ignore[arg-type]
        (lambda: diff_sessions(5, session), "^a must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: find_loop(5, "#1"), "^session must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: find_loop(session, 1), "^loop must be str, not int$"),  # type: ignore[arg-type]
        (lambda: diff_loops(session, a, None, a), "^session must be Session, not NoneType$"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=message):
            call()


def cut_basic(end: int, **replaced: str) -> tuple[Session, str]:
    """events-basic's first loop cut off after its first `end` lines (no AgentEnd: flushed,
    Aborted, its messages empty as phi-core leaves them), each text `replaced` by another."""
    text = (EXAMPLES_DIR / "events-basic.jsonl").read_text()
    for old, new in replaced.items():
        text = text.replace(old, new)
    [session] = record_lines(text.encode().split(b"\n")[:end])
    return session, session.loops[0].loop_id


@pytest.mark.spec  # phi-core's example stream
def test_loops_cut_off_in_their_first_turn_differ_in_what_was_said() -> None:
    # Both loops were aborted in turn 0, phi-core leaving their messages empty: a prompt
    # and a reply that differed were reported identical, no turn nor change.
    a, loop_a = cut_basic(9)
    b, loop_b = cut_basic(9, **{"What is in notes.txt?": "Delete notes.txt", "I'll read": "I deleted"})
    assert a.loops[0].status == "Aborted" and not a.loops[0].messages and not a.loops[0].turns
    diff = diff_loops(a, loop_a, b, loop_b)
    assert not diff.identical and diff.turns == ()
    assert [(c.path, c.kind, c.a, c.b) for c in diff.changes] == [
        ("loop.messages[0]", "changed", "What is in notes.txt?", "Delete notes.txt"),
        ("loop.messages[1]", "changed", "I'll read the file.", "I deleted the file."),
    ]
    assert diff_loops(a, loop_a, a, loop_a).identical


@pytest.mark.spec  # phi-core's example stream
def test_the_turn_a_loop_was_cut_off_in_is_compared_after_its_finished_turns() -> None:
    # Turn 0 alike, turn 1 cut off before its TurnEnd with other replies: identical, turns
    # ['equal'], though each side's usage counted the cut-off turn.
    a, loop_a = cut_basic(19)
    b, loop_b = cut_basic(19, **{"two items: buy milk": "nothing to do, I removed"})
    diff = diff_loops(a, loop_a, b, loop_b)
    assert [turn.status for turn in diff.turns] == ["equal", "changed"]
    cut = diff.turns[1]
    assert [(c.path, c.kind) for c in cut.changes] == [("output.text", "changed")]
    assert cut.seconds_a is None and cut.seconds_delta is None  # it never ended
    assert cut.usage_a is not None and cut.usage_a.output > 0
    assert diff.first_divergence is not None and diff.first_divergence.turn == 1
    assert diff_loops(a, loop_a, a, loop_a).identical
    # Against the whole run, whose turn 1 finished: the same reply, then how each ended.
    whole = record_lines((EXAMPLES_DIR / "events-basic.jsonl").read_bytes().splitlines())[0]
    full = diff_loops(a, loop_a, whole, whole.loops[0].loop_id)
    assert [turn.status for turn in full.turns] == ["equal", "equal"]
    assert full.first_divergence is not None and full.first_divergence.path == "loop.status"
    # Cut before its reply: the reply only on the side that has it.
    c, loop_c = cut_basic(16)
    early = diff_loops(c, loop_c, a, loop_a)
    assert [turn.status for turn in early.turns] == ["equal", "changed"]
    assert [(ch.path, ch.kind) for ch in early.turns[1].changes][:1] == [("output.text", "changed")]


def record_approval(answer: str, call_id: str = "c1") -> Session:
    """A run stopped for the approval of call `call_id`, then the run resuming it, which
    sends `answer` as its result (the approved tool's, or a denial) and is answered "ok"."""
    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(), sinks=[recorder], config=LoopConfigSnapshot(model="m1", provider="acme"))
    with tracer.loop() as stopped:
        stopped.user("delete /a")
        with stopped.turn() as turn:
            with turn.assistant() as reply:
                reply.finish(tool_calls=[ToolCall(id=call_id, name="delete", arguments={"path": "/a"})])
            with turn.tool(turn.tool_calls[0]) as tool:
                tool.result(deferred_result("ApprovalRequired"))
    with tracer.loop(continues=stopped.loop_id) as resumed:
        sent = ToolResultMessage(
            tool_call_id=call_id,
            tool_name="delete",
            content=(TextContent(text=answer),),
            is_error=False,
            timestamp=1,
        )
        resumed.user(sent)
        with resumed.turn() as turn, turn.assistant() as reply:
            reply.text_delta("ok")
            reply.finish()
    recorder.flush()
    [session] = recorder.drain_completed()
    return session


def test_runs_resumed_with_other_results_of_the_stopped_calls_differ_in_their_inputs() -> None:
    # The resumed run's first turn sends c1's result as its input: it was dropped as if
    # it were that turn's own tool result, and approved and denied runs compared identical.
    diff = diff_sessions(record_approval("deleted /a"), record_approval("The tool call was denied."))
    assert [loop.identical for loop in diff.loops] == [True, False]
    assert diff.loops[1].turns[0].changes == (
        FieldChange(
            field="input",
            path="input[0]",
            kind="changed",
            a="[toolResult delete] deleted /a",
            b="[toolResult delete] The tool call was denied.",
            text_diff=(
                "@@ -1 +1 @@",
                "-[toolResult delete] deleted /a",
                "+[toolResult delete] The tool call was denied.",
            ),
        ),
    )
    assert diff.first_divergence is not None and diff.first_divergence.summary == "turn 0: input[0] changed"


def test_runs_resumed_alike_whose_calls_had_other_ids_are_identical() -> None:
    # The id of the call a resuming run sends a result for was compared as its input's
    # text: 'turn 0: input[0] changed' for call_AAA against call_BBB. A fresh run assigns ids anew.
    diff = diff_sessions(record_approval("deleted /a", "call_AAA"), record_approval("deleted /a", "call_BBB"))
    assert [loop.identical for loop in diff.loops] == [True, True] and diff.first_divergence is None
    assert diff.loops[1].turns[0].incidental == (
        FieldChange(
            field="tool_call_id", path="input[0].tool_call_id", kind="changed", a="call_AAA", b="call_BBB"
        ),
    )
