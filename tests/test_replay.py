"""Replay and fork: the framework-independent core, on a hand-instrumented loop.

The worked example: a 4-turn agent with 2 tools recorded through `Tracer`, replayed
with `RecordedModel` and ``tools="recorded"`` (no model, no tools), changed (system
prompt, a tool, a tool's result) and forked at turn 2 with another model.
"""

from __future__ import annotations

import builtins
import copy
import itertools
import json
import logging
import pickle
import sys
import threading
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi_session.adapters import AdapterCore
from phi_session.codec import decode_messages, decode_session
from phi_session.cost import Pricer
from phi_session.diff import diff_loops
from phi_session.errors import (
    InvalidArgument,
    LoopNotFound,
    PhiSessionError,
    RecordedModelError,
    RecordedToolError,
    ReplayDiverged,
    TurnNotFound,
)
from phi_session.events import COMPACTION, DEFAULT, INITIAL, ContinuationKind, LoopConfigSnapshot
from phi_session.identity import AgentSession, FakeClock
from phi_session.instrument import LoopScope, Tracer
from phi_session.messages import (
    ZERO_USAGE,
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    ExtensionMessage,
    NodeTag,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolDefinition,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from phi_session.model import LoopRecord, Session, is_replayed
from phi_session.recorder import SessionRecorder
from phi_session.replay import (
    Divergence,
    Lineage,
    RecordedModel,
    ReplayCursor,
    ReplayScript,
    RequestShape,
    active_lineage,
    fork,
    fork_lineage,
    recording_as,
    replay_lineage,
)
from phi_session.replay.cursor import recorded_tool_error, result_text
from phi_session.replay.lineage import answered, calling
from phi_session.replay.request import compare_messages, summarize
from phi_session.replay.script import HANDOFF_KEY
from phi_session.stores import JsonDirStore

from .conftest import GOLDEN
from .test_model import chain_of

SNAP = LoopConfigSnapshot(model="house-model", provider="acme")
SYSTEM = "You answer questions about files."
TOOLS = (
    ToolDefinition(
        name="read_file",
        description="Read a file.",
        parameters={"type": "object", "properties": {"path": {"type": "string"}}},
    ),
    ToolDefinition(
        name="word_count",
        description="Count the words of a text.",
        parameters={"type": "object", "properties": {"text": {"type": "string"}}},
    ),
)
FILES = {"notes.txt": "buy milk and eggs", "todo.txt": "call mum"}
PROMPT = "How many words are in notes.txt and todo.txt?"


_WORLDS = itertools.count(1)


def uuids() -> Iterator[str]:
    """Ids of a world of its own: identities going on with one recorded session share
    its loop counter process-wide (`AgentSession.continuing`), and an adapter's held
    identities can outlive their test."""
    world = next(_WORLDS)
    for n in itertools.count(1):
        yield f"00000000-0000-4000-{world:04x}-{n:012d}"


ModelFn = Callable[[RequestShape], AssistantMessage]


def reply(
    text: str = "", calls: Sequence[ToolCall] = (), *, usage: int = 10, thinking: str = ""
) -> AssistantMessage:
    content: list[Any] = []
    if thinking:
        content.append(ThinkingContent(thinking=thinking))
    if text:
        content.append(TextContent(text=text))
    content.extend(calls)
    return AssistantMessage(
        content=tuple(content),
        stop_reason="toolUse" if calls else "stop",
        model=SNAP.model,
        provider=SNAP.provider,
        usage=Usage(input=100 * usage, output=usage, total_tokens=101 * usage),
        timestamp=1_750_000_000_000,
    )


def scripted_model() -> ModelFn:
    """The original "model": four turns, two tools, one turn with two parallel calls."""
    replies = iter(
        [
            reply(
                "Let me read notes.txt.",
                [ToolCall(id="c1", name="read_file", arguments={"path": "notes.txt"})],
            ),
            reply(
                "", [ToolCall(id="c2", name="word_count", arguments={"text": "buy milk and eggs"})], usage=11
            ),
            reply(
                "Now todo.txt.",
                [
                    ToolCall(id="c3", name="read_file", arguments={"path": "todo.txt"}),
                    ToolCall(id="c4", name="word_count", arguments={"text": "call mum"}),
                ],
                usage=12,
                thinking="two calls at once",
            ),
            reply("notes.txt has 4 words, todo.txt has 2.", usage=13),
        ]
    )
    return lambda request: next(replies)


def live_tool(call: ToolCall) -> str:
    if call.name == "read_file":
        return FILES[call.arguments["path"]]
    return str(len(call.arguments["text"].split()))


def payload(request: RequestShape) -> AnnotatedRequestPayload:
    return request.to_payload(SNAP.model)


def agent(
    loop: LoopScope,
    model: ModelFn,
    *,
    recorded: RecordedModel | None = None,
    run_tool: Callable[[ToolCall], str] = live_tool,
    system: str = SYSTEM,
    tools: tuple[ToolDefinition, ...] = TOOLS,
    capture: bool = True,
    max_turns: int = 8,
    last_first: bool = False,
) -> None:
    """A hand-written agent loop: the model until it stops calling tools. A turn's tool
    results are sent in call order; with `last_first` its tools end last call first (as
    parallel calls may)."""
    context: list[AgentMessage] = [loop.user(PROMPT)]
    for _ in range(max_turns):
        request = RequestShape(system_prompt=system, messages=tuple(context), tools=tools)
        with loop.turn(request=payload(request) if capture else None) as turn:
            with turn.assistant() as message:
                answer = model(request)
                message.finish(message=answer)
            context.append(answer)
            calls = turn.tool_calls
            for call in reversed(calls) if last_first else calls:
                with turn.tool(call) as tool:
                    stored = recorded.tool_result(call) if recorded is not None else None
                    if stored is None:
                        tool.result(run_tool(call))
                    elif stored.is_error:
                        tool.error(stored.content)
                    else:
                        tool.result(stored.content)
            order = [call.id for call in calls]
            context.extend(sorted(turn.tool_results, key=lambda result: order.index(result.tool_call_id)))
        if not turn.tool_calls:
            return


class World:
    """An agent identity on a fake clock; sessions recorded and saved in a store."""

    def __init__(self, tmp_path: Path) -> None:
        ids = uuids()
        self.agent = AgentSession(clock=FakeClock(), id_factory=lambda: next(ids))
        self.store = JsonDirStore(tmp_path / "sessions")

    def record(self, body: Callable[[Tracer], None], *, capture: bool = True) -> Session:
        """Run `body` with a tracer into a fresh recorder; save what it recorded; return the
        stored session."""
        recorder = SessionRecorder(capture_turn_requests=capture)
        tracer = Tracer(self.agent, sinks=[recorder], config=SNAP)
        body(tracer)
        recorder.flush()
        sessions = recorder.drain_completed()
        assert len(sessions) == 1
        self.store.save(sessions[0])
        return self.store.load(sessions[0].session_id)

    def original(self, *, capture: bool = True) -> tuple[Session, LoopRecord]:
        def body(tracer: Tracer) -> None:
            with tracer.loop() as loop:
                agent(loop, scripted_model(), capture=capture)

        session = self.record(body, capture=capture)
        return session, session.loops[-1]


def view(message: AgentMessage) -> Any:
    """A message without its timestamp, turn id and replay mark (what a replay must
    reproduce; it marks the replies it served)."""
    data = msgspec.to_builtins(message)
    data.pop("timestamp", None)
    data.pop("turnId", None)
    data.pop("phiSessionReplayed", None)
    return data


def views(record: LoopRecord) -> list[Any]:
    return [view(m) for m in record.messages]


def new_loop(before: Session, after: Session) -> LoopRecord:
    known = {record.loop_id for record in before.loops}
    (added,) = [record for record in after.loops if record.loop_id not in known]
    return added


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# -- the worked example --------------------------------------------------------------------------


def test_replay_with_recorded_tools_reproduces_the_loop_without_model_or_tools(world: World) -> None:
    session, original = world.original()
    assert original.turn_count() == 4 and original.tool_call_count() == 4

    script = ReplayScript.from_session(session)
    model = RecordedModel(script, tools="recorded")

    def no_tool(call: ToolCall) -> str:
        raise AssertionError("the replay ran a tool")

    def body(tracer: Tracer) -> None:
        with replay_lineage(script, tools="recorded").loop(tracer) as loop:
            agent(loop, lambda request: model.next(request), recorded=model, run_tool=no_tool)

    merged = world.record(body)
    replay = new_loop(session, merged)
    assert model.finished and model.divergence is None
    assert replay.kind == ContinuationKind.rerun("replay")
    assert replay.parent_loop_id == original.loop_id
    assert replay.metadata == {
        "replay": {"session_id": session.session_id, "loop_id": original.loop_id, "tools": "recorded"}
    }
    assert replay.loop_id.startswith(session.session_id + ".") and replay.loop_id != original.loop_id
    assert views(replay) == views(original)
    assert replay.usage == original.usage
    calls = [
        [(c.id, c.name, c.arguments) for c in t.output_message.content if type(c) is ToolCall]
        for t in replay.turns
    ]
    assert calls == [
        [(c.id, c.name, c.arguments) for c in t.output_message.content if type(c) is ToolCall]
        for t in original.turns
    ]
    # The replay stands in for the original when resuming: no message twice.
    assert [view(m) for m in merged.context_at(replay.loop_id)] == views(original)
    assert merged.context_chain_to(replay.loop_id) == [replay.loop_id]
    # The original session is untouched, apart from the new child link.
    assert merged.get_loop(original.loop_id).children_loop_ids == (replay.loop_id,)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "turn", "what"),
    [
        ({"system": "You are terse."}, 0, "system_prompt"),
        ({"tools": (TOOLS[0],)}, 0, "tools"),
        ({"tools": (TOOLS[0], msgspec.structs.replace(TOOLS[1], description="Count."))}, 0, "tools"),
    ],
)
def test_a_changed_agent_diverges_at_its_first_request(
    world: World, change: dict[str, Any], turn: int, what: str
) -> None:
    session, original = world.original()
    model = RecordedModel(session)

    def body(tracer: Tracer) -> None:
        with replay_lineage(model.script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model, **change)

    with pytest.raises(ReplayDiverged) as raised:
        world.record(body)
    found = raised.value.divergence
    assert (found.loop_id, found.turn_index, found.what) == (original.loop_id, turn, what)
    assert model.divergence == found and not model.finished
    assert f"turn {turn} of {original.loop_id}: {what}" in str(raised.value)


def test_a_changed_tool_result_diverges_at_the_next_turn(world: World) -> None:
    session, _ = world.original()
    model = RecordedModel(session, tools="live")

    def changed_tool(call: ToolCall) -> str:
        return "buy bread" if call.arguments.get("path") == "notes.txt" else live_tool(call)

    def body(tracer: Tracer) -> None:
        with replay_lineage(model.script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model, run_tool=changed_tool)

    with pytest.raises(ReplayDiverged) as raised:
        world.record(body)
    found = raised.value.divergence
    assert (found.turn_index, found.what) == (1, "messages")
    assert found.detail == "message 2 differs"
    assert found.expected is not None and "buy milk and eggs" in found.expected
    assert found.actual is not None and "buy bread" in found.actual


def test_fork_at_turn_2_hands_the_run_to_another_model(world: World) -> None:
    session, original = world.original()
    seen: list[RequestShape] = []

    def other_model(request: RequestShape) -> AssistantMessage:
        seen.append(request)
        return reply("I think about 6 words in all.", usage=3)

    script = ReplayScript.from_session(session, original.loop_id)
    model = RecordedModel(script, until_turn=2, fallback=other_model)
    lineage = fork_lineage(script, 2, tag="other-model", change={"model": "other"})

    def body(tracer: Tracer) -> None:
        with lineage.loop(tracer) as loop:
            agent(loop, model.next, recorded=model)

    merged = world.record(body)
    fork = new_loop(session, merged)
    assert fork.kind == ContinuationKind.branch("other-model")
    assert fork.parent_loop_id == original.loop_id
    assert fork.metadata == {
        "fork": {
            "session_id": session.session_id,
            "loop_id": original.loop_id,
            "turn_index": 2,
            "change": {"model": "other"},
        }
    }
    assert fork.turn_count() == 3
    for mine, theirs in zip(fork.turns[:2], original.turns[:2], strict=True):
        assert view(mine.output_message) == view(theirs.output_message)
        assert [view(m) for m in mine.tool_results] == [view(m) for m in theirs.tool_results]
        assert mine.usage == theirs.usage
    assert fork.turns[2].output_message.content == (TextContent(text="I think about 6 words in all."),)
    assert model.finished and model.divergence is None and model.cursor.handed_over
    # The live model saw the recorded context of turn 2.
    assert [view(m) for m in seen[0].messages] == [view(m) for m in script.turns[2].request.messages]
    # Resuming the fork: the original's first two turns (as replayed), then the new answer.
    context = [view(m) for m in merged.context_at(fork.loop_id)]
    assert context == [*views(original)[:5], view(fork.turns[2].output_message)]


def failed_run_and_its_replay(
    world: World, *, model: ModelFn | None = None, run_tool: Callable[[ToolCall], str] = live_tool
) -> tuple[LoopRecord, LoopRecord, Exception]:
    """An original run that `model` (default `scripted_model`) or `run_tool` fails (it
    ends ``Aborted``), replayed with recorded tools by the same hand-written loop;
    returns both loops and what the replay raised."""

    def original(tracer: Tracer) -> None:
        with pytest.raises(RuntimeError), tracer.loop() as loop:
            agent(loop, model or scripted_model(), run_tool=run_tool)

    session = world.record(original)
    replayed = RecordedModel(session, tools="recorded")

    def replay(tracer: Tracer) -> None:
        with pytest.raises(PhiSessionError) as raised, replay_lineage(replayed.script).loop(tracer) as loop:
            agent(loop, replayed.next, recorded=replayed)
        failures.append(raised.value)

    failures: list[Exception] = []
    merged = world.record(replay)
    return session.loops[-1], new_loop(session, merged), failures[0]


def test_a_hand_loop_replay_fails_where_the_model_call_failed(world: World) -> None:
    replies = scripted_model()

    def failing_model(request: RequestShape) -> AssistantMessage:
        if len(request.messages) > 1:  # the second turn's call
            raise RuntimeError("rate limited")
        return replies(request)

    original, replay, raised = failed_run_and_its_replay(world, model=failing_model)
    assert original.status == "Aborted"
    assert isinstance(raised, RecordedModelError) and str(raised) == "RuntimeError: rate limited"
    assert replay.status == "Aborted" and replay.turn_count() == original.turn_count() == 2
    # Recorded as the original's failure, not as the replay's RecordedModelError.
    failures = [loop.turns[1].output_message for loop in (original, replay)]
    assert {(m.stop_reason, m.error_message) for m in failures} == {("error", "RuntimeError: rate limited")}  # type: ignore[union-attr]


def test_a_failure_the_run_went_on_from_is_raised_only_with_every_failure(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    first = script.turns[0]
    failed = msgspec.structs.replace(
        first.reply, content=(), stop_reason="error", error_message="RuntimeError: rate limited"
    )
    script = msgspec.structs.replace(
        script, turns=(msgspec.structs.replace(first, reply=failed), *script.turns[1:])
    )
    assert ReplayCursor(script).recorded_reply(first.request) is failed  # an answer the agent took
    with pytest.raises(RecordedModelError, match=r"^RuntimeError: rate limited$"):
        ReplayCursor(script).recorded_reply(first.request, every_failure=True)


def test_a_hand_loop_replay_fails_where_a_tool_failed(world: World) -> None:
    def failing_tool(call: ToolCall) -> str:
        if call.name == "word_count":
            raise RuntimeError("kaboom")
        return live_tool(call)

    original, replay, raised = failed_run_and_its_replay(world, run_tool=failing_tool)
    assert original.status == "Aborted"
    assert isinstance(raised, RecordedToolError) and "kaboom" in str(raised)
    assert replay.status == "Aborted" and replay.tool_call_count() == original.tool_call_count() == 2


class OwnError(Exception):
    pass


# Named like the builtin but no subclass of it (as redis.exceptions.TimeoutError).
SameName = type("TimeoutError", (Exception,), {"__module__": "redis.exceptions"})


@pytest.mark.parametrize(
    ("raised", "again"),
    [
        (TimeoutError("slow upstream"), TimeoutError),
        (KeyError("k"), KeyError),
        (RuntimeError("kaboom"), None),  # a RecordedToolError is one already
        (OwnError("mine"), None),  # not a builtin: not made again
        (SameName("redis timed out"), None),  # nor a class only named like one
        # Not made again: raised in a coroutine or generator, a StopIteration turns into
        # RuntimeError('coroutine raised StopIteration'); the others are not made from a
        # text (their fields None: a UnicodeDecodeError's, a SyntaxError's).
        (StopIteration("exhausted"), None),
        (StopAsyncIteration("exhausted"), None),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), None),
        (SyntaxError("bad syntax"), None),
        (TabError("tabs"), None),
        *(
            [(builtins.ExceptionGroup("both", [ValueError("a")]), None)]
            if sys.version_info >= (3, 11)
            else []
        ),
    ],
)
def test_a_recorded_tool_error_is_raised_again_as_its_builtin_type(
    raised: Exception, again: type[Exception] | None
) -> None:
    h = Tracer(sinks=[recorder := SessionRecorder()], config=SNAP)
    with h.loop() as loop, loop.turn() as turn:
        turn.assistant().start().finish((), tool_calls=[ToolCall(id="c1", name="fetch", arguments={})])
        turn.tool(id="c1", name="fetch", args={}).start().end(raised)
    (result,) = recorder.sessions()[0].loops[0].turns[0].tool_results
    error = recorded_tool_error(result)
    assert isinstance(error, RecordedToolError) and str(error) == result_text(result)
    builtin = getattr(builtins, type(raised).__name__, None) is type(raised)
    # A class not the builtin one is recorded by its qualified name: its bare name is the builtin's.
    name = type(raised).__name__ if builtin else f"{type(raised).__module__}.{type(raised).__qualname__}"
    assert str(error).startswith(f"fetch failed: {name}: ")
    if again is None:
        assert type(error) is RecordedToolError and not isinstance(error, TimeoutError)
    else:
        assert isinstance(error, again)
        assert type(recorded_tool_error(result)) is type(error)  # one class a type


def _builtin_exceptions() -> list[type[Exception]]:
    return [
        kind for kind in vars(builtins).values() if isinstance(kind, type) and issubclass(kind, Exception)
    ]


@pytest.mark.parametrize("builtin", _builtin_exceptions(), ids=lambda kind: kind.__name__)
def test_a_builtin_tool_error_made_again_behaves_as_one(builtin: type[Exception]) -> None:
    # Each builtin class is made again whole (its str() and traceback the recorded text),
    # or not at all.
    text = f"fetch failed: {builtin.__name__}: slow upstream"
    result = ToolResultMessage(
        tool_call_id="c1", tool_name="fetch", content=(TextContent(text=text),), is_error=True, timestamp=1
    )
    error = recorded_tool_error(result)
    assert isinstance(error, RecordedToolError) and str(error) == text
    assert isinstance(error, builtin) or type(error) is RecordedToolError
    assert "".join(traceback.format_exception_only(error)).rstrip().endswith(text)
    error.__notes__ = ["a note"]  # as langgraph adds one (add_note, Python 3.11)
    for again in (pickle.loads(pickle.dumps(error)), copy.deepcopy(error)):  # a process pool's, say
        assert type(again) is type(error) and str(again) == text and again.__notes__ == ["a note"]


# -- scripts -------------------------------------------------------------------------------------


def test_script_turns_know_request_reply_and_tool_results(world: World) -> None:
    session, original = world.original()
    script = ReplayScript.from_session(session)
    assert script.loop_ids == (original.loop_id,) and len(script) == 4
    third = script.turns[2]
    assert (third.loop_id, third.turn_index, third.inherited) == (original.loop_id, 2, 0)
    assert third.request.system_prompt == SYSTEM and third.request.tools == TOOLS
    assert [c.id for c in third.tool_calls] == ["c3", "c4"]
    assert [r.tool_call_id for r in third.tool_results] == ["c3", "c4"]
    assert third.reply.turn_id is None and third.reply.usage.output == 12
    assert third.result_of("c4") is not None and third.result_of("nope") is None
    assert len(third.request.messages) == 5  # prompt, reply, result, reply, result


def test_without_captured_requests_the_context_is_rebuilt_from_the_loops(world: World) -> None:
    first, _ = world.original(capture=False)

    # Continue the conversation: a second loop, recorded into the same session.
    def body(tracer: Tracer) -> None:
        with tracer.for_session(first).loop(continues=first.loops[0].loop_id) as loop:
            agent(loop, scripted_model(), capture=False)

    session = world.record(body, capture=False)
    second = new_loop(first, session)
    script = ReplayScript.from_session(session)  # the loop that started last
    assert script.loop_ids == (second.loop_id,)
    earlier = session.context_at(first.loops[0].loop_id)
    turn = script.turns[1]
    assert turn.request.system_prompt is None and turn.request.tools is None
    assert turn.inherited == len(earlier) == 9
    assert [view(m) for m in turn.request.messages] == [view(m) for m in earlier] + [
        view(m) for m in second.messages[:3]
    ]
    # The request with the earlier conversation matches, and so does one without it.
    for messages in (turn.request.messages, turn.request.messages[turn.inherited :]):
        cursor = ReplayCursor(script)
        cursor.respond(script.turns[0].request)
        assert cursor.respond(RequestShape(system_prompt="anything", messages=messages)) == turn.reply
    # Thinking, system prompt and tools are compared only when both sides know them.
    chain = ReplayScript.from_session(session, chain=True)
    assert chain.loop_ids == (first.loops[0].loop_id, second.loop_id) and len(chain) == 8
    assert [(t.loop_id, t.turn_index) for t in chain.turns][3:5] == [
        (first.loops[0].loop_id, 3),
        (second.loop_id, 0),
    ]
    # Read from the end without building it, a request (rebuilt or captured) is the same.
    captured = ReplayScript.from_session(world.original()[0]).turns
    assert all(turn.captured is not None for turn in captured)
    for each in (*chain.turns, *captured):
        assert list(each.request_last_first()) == list(reversed(each.request.messages))


def test_a_long_chain_is_scripted_with_a_few_passes_over_its_loops() -> None:
    # Each loop's context was a walk of the chain with a scan of the loops per step:
    # 1,000 chained loops took 7 s.
    session = chain_of(200)
    for chain in (True, False):
        session.loops.passes = 0  # type: ignore[attr-defined]
        script = ReplayScript.from_session(session, "s.c.199", chain=chain)
        assert len(script.loop_ids) == (200 if chain else 1)
        assert session.loops.passes <= 3  # type: ignore[attr-defined]


def long_loop(world: World, turns: int) -> Session:
    """A loop of `turns` turns, each but the last calling a tool, without captured requests."""

    def model(request: RequestShape) -> AssistantMessage:
        done = sum(isinstance(m, ToolResultMessage) for m in request.messages[-1:])
        n = len(request.messages)
        if n // 2 + 1 < turns:
            return reply(
                f"step {n}", [ToolCall(id=f"c{n}", name="read_file", arguments={"path": "notes.txt"})]
            )
        return reply(f"done {done}")

    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            agent(loop, model, capture=False, max_turns=turns)

    session = world.record(body, capture=False)
    record = session.loops[-1]
    assert len(record.turns) == turns and record.parent_loop_id is None
    return msgspec.structs.replace(session, loops=[record])


class CountedEvents(tuple):  # type: ignore[type-arg]
    """A loop's events, counting the passes over them."""

    passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        return super().__iter__()


def test_a_long_loop_is_scripted_in_one_pass_over_its_events_holding_its_messages_once(world: World) -> None:
    # Each turn without a captured request scanned the loop's whole event log for one,
    # and copied the whole history into its request: 2,000 turns took 2.35 s, and a
    # script held n² messages (`phi-session fork --turn 0` on 3,000 turns: 200 MB).
    held = []
    for turns in (200, 400):
        session = long_loop(world, turns)
        (record,) = session.loops
        events = CountedEvents(record.events)
        session = msgspec.structs.replace(session, loops=[msgspec.structs.replace(record, events=events)])
        tracemalloc.start()
        try:
            script = ReplayScript.from_session(session)
            held.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        assert events.passes == 1
        assert len(script.turns[-1].request.messages) == len(record.messages) - 1
    assert held[1] < 2.5 * held[0]  # linear: twice the turns, twice the memory (was 3.7 times)


def test_a_long_replay_compares_each_request_only_where_it_goes_on_from_the_last(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every model call compared the whole context with the recorded one again: a
    # 1,000-turn replay took 5 s.
    compared = []

    def counting(expected: Sequence[AgentMessage], actual: Sequence[AgentMessage], *args: Any) -> Any:
        compared.append(len(expected) + len(actual))
        return compare_messages(expected, actual, *args)

    monkeypatch.setattr("phi_session.replay.cursor.compare_messages", counting)
    session = long_loop(world, 300)
    model = RecordedModel(session)

    def again(tracer: Tracer) -> None:
        with replay_lineage(model.script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model, capture=False, max_turns=300)

    world.record(again, capture=False)
    assert model.finished
    assert sum(compared) < 10 * 300  # each new message once a side (the whole context each time: 180,000)


def test_a_long_chain_reuses_each_loops_context_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each loop's context was built anew from the chain (context_at per loop): 2,000
    # chained loops took 4.2 s.
    read = []
    context_messages = LoopRecord.context_messages

    def counting(record: LoopRecord, **options: Any) -> list[AgentMessage]:
        read.append(record.loop_id)
        return context_messages(record, **options)

    monkeypatch.setattr(LoopRecord, "context_messages", counting)
    session = chain_of(300)
    script = ReplayScript.from_session(session, "s.c.299", chain=True)
    assert len(script.loop_ids) == 300
    assert len(read) <= 3 * 300  # each loop's messages read a few times, not once per later loop


def test_without_captured_requests_a_replay_warns_once_that_only_messages_are_compared(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, original = world.original(capture=False)
    script = ReplayScript.from_session(session)

    def replay(system: str | None, tools: tuple[ToolDefinition, ...] | None) -> ReplayCursor:
        cursor = ReplayCursor(script)
        for turn in script.turns:
            cursor.respond(RequestShape(system_prompt=system, messages=turn.request.messages, tools=tools))
        return cursor

    with caplog.at_level(logging.WARNING, logger="phi_session.replay"):
        # Another system prompt and no tools: nothing to compare them with, no divergence.
        assert replay("You are a poet.", ()).finished
        (warning,) = caplog.records
        assert original.loop_id in warning.getMessage() and "capture_requests=True" in warning.getMessage()
        caplog.clear()
        assert replay(None, None).finished and caplog.records == []  # messages alone: all compared


def test_without_captured_requests_tool_results_are_rebuilt_in_call_order(world: World) -> None:
    # The parallel calls of turn 2 end last first; the agent sends their results in call
    # order (as LangChain and ADK do), and so does the rebuilt request.
    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            agent(loop, scripted_model(), capture=False, last_first=True)

    session = world.record(body, capture=False)
    (original,) = session.loops
    assert [m.tool_call_id for m in original.turns[2].tool_results] == ["c4", "c3"]  # type: ignore[union-attr]
    script = ReplayScript.from_session(session)
    results = [m for m in script.turns[3].request.messages if isinstance(m, ToolResultMessage)]
    assert [m.tool_call_id for m in results] == ["c1", "c2", "c3", "c4"]
    model = RecordedModel(script)

    def replayed(tracer: Tracer) -> None:
        with replay_lineage(script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model, capture=False, last_first=True)

    world.record(replayed, capture=False)
    assert model.finished and model.divergence is None


def test_the_default_loop_is_the_last_run_that_is_not_a_replay(world: World) -> None:
    recorder = SessionRecorder()
    tracer = Tracer(world.agent, sinks=[recorder], config=SNAP)
    with tracer.loop() as loop:
        agent(loop, scripted_model())
    (session,) = recorder.sessions()  # live: it gets the loops recorded later
    (original,) = session.loops
    replay = RecordedModel(session)
    with replay_lineage(replay.script).loop(tracer) as loop:
        agent(loop, replay.next, recorded=replay)
    assert [record.kind.kind for record in session.loops] == ["Initial", "Rerun"]
    assert ReplayScript.from_session(session).loop_ids == (original.loop_id,)
    branch = RecordedModel(session, until_turn=2, fallback=lambda request: reply("Done."))
    with fork_lineage(branch.script, 2).loop(tracer) as loop:
        agent(loop, branch.next, recorded=branch)
    forked = session.loops[-1]
    assert forked.kind == ContinuationKind.branch("fork") and forked.parent_loop_id == original.loop_id
    assert ReplayScript.from_session(session).loop_ids == (forked.loop_id,)  # a fork is a run
    only_replays = msgspec.structs.replace(session, loops=session.loops[1:2])
    with pytest.raises(LoopNotFound, match="replays do not count"):
        ReplayScript.from_session(only_replays)


@pytest.mark.parametrize(
    ("stop_reason", "metadata", "handed_over"),
    [
        ("handoff", None, True),
        # A LangGraph handoff tool: the reply keeps toolUse, the next loop names the call.
        ("toolUse", {HANDOFF_KEY: {"tool_call_id": "h1", "tool_name": "transfer_to_bob"}}, True),
        ("toolUse", None, False),  # a later run of the conversation: replayed alone
        # The app's own metadata: a later run all the same.
        ("toolUse", {"handoff": "escalated to tier-2 support"}, False),
        ("toolUse", {"handoff": {"tool_call_id": "h1", "tool_name": "transfer_to_bob"}}, False),
        # Naming no call of the reply before it: no handoff of this run.
        ("toolUse", {HANDOFF_KEY: "h1"}, False),
        ("toolUse", {HANDOFF_KEY: {"tool_call_id": "h2", "tool_name": "transfer_to_bob"}}, False),
        ("toolUse", {HANDOFF_KEY: {"tool_call_id": "h1", "tool_name": "transfer_to_carol"}}, False),
    ],
)
def test_the_default_run_has_the_loops_that_handed_over_to_it(
    world: World, stop_reason: str, metadata: dict[str, Any] | None, handed_over: bool
) -> None:
    def body(tracer: Tracer) -> None:
        with tracer.loop() as alice:
            alice.user(PROMPT)
            handoff = msgspec.structs.replace(
                reply("", [ToolCall(id="h1", name="transfer_to_bob", arguments={})]), stop_reason=stop_reason
            )
            with alice.turn() as turn:
                with turn.assistant() as message:
                    message.finish(message=handoff)
                with turn.tool(turn.tool_calls[0]) as tool:
                    tool.result("Bob takes over")
        with tracer.loop(continues=alice.loop_id, metadata=metadata) as bob, bob.turn() as turn:
            with turn.assistant() as message:
                message.finish(message=reply("Bob here."))

    alice, bob = world.record(body).loops
    expected = (alice.loop_id, bob.loop_id) if handed_over else (bob.loop_id,)
    assert ReplayScript.from_session(world.store.load(alice.session_id)).loop_ids == expected


def steered_agent(loop: LoopScope, model: ModelFn, recorded: RecordedModel | None = None) -> None:
    """An agent told something more while its first turn's tools run (`TurnScope.user`
    after the reply), which it sends after the result that had come in by then."""
    context: list[AgentMessage] = [loop.user(PROMPT)]
    for _ in range(4):
        with loop.turn() as turn:
            with turn.assistant() as message:
                context.append(message.finish(message=model(RequestShape(messages=tuple(context)))))
            for position, call in enumerate(turn.tool_calls):
                if turn.index == 0 and position == 1:
                    context.append(turn.user("Skip todo.txt if it is long."))
                with turn.tool(call) as tool:
                    stored = recorded.tool_result(call) if recorded is not None else None
                    tool.result(stored.content if stored is not None else live_tool(call))
                context.append(turn.tool_results[-1])
        if not turn.tool_calls:
            return


def steered_model(request: RequestShape) -> AssistantMessage:
    if len(request.messages) == 1:
        return reply(
            "Reading both.",
            [
                ToolCall(id="c1", name="read_file", arguments={"path": "notes.txt"}),
                ToolCall(id="c2", name="read_file", arguments={"path": "todo.txt"}),
            ],
        )
    return reply("notes.txt: buy milk and eggs; todo.txt: call mum.")


@pytest.mark.parametrize("capture", [True, False])
def test_a_steering_message_after_the_reply_replays_and_forks_where_it_was_sent(
    world: World, capture: bool
) -> None:
    # It was recorded before the turn's reply, and counted as an input of the turn that
    # had already called its model: a replay of the unchanged agent diverged, a fork of
    # the next turn sent the model the messages out of order.
    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            steered_agent(loop, steered_model)

    session = world.record(body, capture=capture)
    (original,) = session.loops
    sent = [
        "user 'How many words are in notes.txt and todo.txt?'",
        "assistant 'Reading both.' "
        'read_file({"path":"notes.txt"}) [c1] read_file({"path":"todo.txt"}) [c2]',
        "toolResult [c1] 'buy milk and eggs'",
        "user 'Skip todo.txt if it is long.'",
        "toolResult [c2] 'call mum'",
    ]
    assert [summarize(m) for m in original.messages[:-1]] == sent
    script = ReplayScript.from_session(session)
    assert [summarize(m) for m in script.turns[1].request.messages] == sent
    model = RecordedModel(script)

    def again(tracer: Tracer) -> None:
        with replay_lineage(script).loop(tracer) as loop:
            steered_agent(loop, model.next, model)

    merged = world.record(again, capture=capture)
    assert model.finished and views(new_loop(session, merged)) == views(original)
    seen: list[RequestShape] = []

    def forked(tracer: Tracer) -> None:
        fork(session, original.loop_id, 1, model=counting_model(seen), tracer=tracer, max_turns=1)

    branch = new_loop(merged, world.record(forked, capture=capture))
    assert [summarize(m) for m in seen[0].messages] == sent
    assert views(branch)[:5] == views(original)[:5]  # the repeated turn, steering in its place


def test_the_default_loop_skips_loops_without_turns(world: World) -> None:
    # A compaction pass (and a rejected input) after the run was the default: nothing to
    # replay, the first model call was "exhausted".
    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            agent(loop, scripted_model())
        with tracer.loop(continues=loop.loop_id) as rejected:
            rejected.user("and now?")
            rejected.reject("blocked")
        with (
            tracer.loop(continues=loop.loop_id, kind=COMPACTION) as compaction,
            compaction.compaction(900, 9),
        ):
            pass

    session = world.record(body)
    run, *passes = session.loops
    assert [(record.status, len(record.turns)) for record in passes] == [("Rejected", 0), ("Completed", 0)]
    assert ReplayScript.from_session(session).loop_ids == (run.loop_id,)
    model = RecordedModel(session)
    with replay_lineage(model.script).loop(Tracer(world.agent, sinks=[], config=SNAP)) as loop:
        agent(loop, model.next, recorded=model)
    assert model.finished
    with pytest.raises(LoopNotFound, match="nor loops without turns"):
        ReplayScript.from_session(msgspec.structs.replace(session, loops=passes))


def test_unknown_loops_and_turns_are_errors(world: World) -> None:
    session, _ = world.original()
    with pytest.raises(LoopNotFound, match="no loop 'nope'"):
        ReplayScript.from_session(session, "nope")
    script = ReplayScript.from_session(session)
    with pytest.raises(TurnNotFound, match="has no turn 4"):
        script.turn(4)
    with pytest.raises(TurnNotFound):
        ReplayCursor(script, until_turn=-1)
    with pytest.raises(TypeError):
        ReplayScript.from_session("not a session")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="fallback"):
        RecordedModel(script, until_turn=1)
    with pytest.raises(InvalidArgument, match=r"^tools must be 'recorded' or 'live', not 'maybe'$"):
        ReplayCursor(script, tools="maybe")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"^on_divergence must be 'stop' or 'fallback', not 'never'$"):
        ReplayCursor(script, on_divergence="never")  # type: ignore[arg-type]
    assert issubclass(ReplayDiverged, PhiSessionError) and issubclass(TurnNotFound, KeyError)
    # Each raised AttributeError ('int' object has no attribute 'id' / 'session_id' / 'for_session').
    original = script.loop_ids[0]
    for call, message in (
        (lambda: RecordedModel(script).tool_result(5), "^call must be ToolCall, not int$"),  # type: ignore[arg-type]
        (lambda: replay_lineage(5), "^script must be ReplayScript, not int$"),  # type: ignore[arg-type]
        (lambda: fork_lineage(5, 1), "^script must be ReplayScript, not int$"),  # type: ignore[arg-type]
        (lambda: replay_lineage(script).loop(5), "^tracer must be Tracer, not int$"),  # type: ignore[arg-type]
        (
            lambda: fork(session, original, 1, model=lambda request: None, tracer=5),  # type: ignore[arg-type,return-value]
            "^tracer must be Tracer, not int$",
        ),
    ):
        with pytest.raises(TypeError, match=message):
            call()


def test_a_turn_index_must_be_an_int_and_a_loop_id_a_str(world: World) -> None:
    # A bool was taken as turn 1 (or 0) and a float failed deep inside; a loop id given
    # as a number raised LoopNotFound.
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    for call, message in (
        (lambda: script.turn(True), "^position must be int, not bool$"),
        (lambda: script.turn(1.0), "^position must be int, not float$"),
        (lambda: fork_lineage(script, True), "^turn must be int, not bool$"),
        (
            lambda: RecordedModel(script, until_turn=True, fallback=reply),
            "^until_turn must be int or None, not bool$",
        ),
        (lambda: ReplayCursor(script, until_turn=1.5), "^until_turn must be int or None, not float$"),
        (lambda: ReplayScript.from_session(session, 3), "^loop_id must be str or None, not int$"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=message):
            call()  # type: ignore[no-untyped-call]
    assert script.turn(np_int(1)).turn_index == 1  # an integer of another type is one


def np_int(value: int) -> Any:
    """An integer that is no int (as a NumPy integer): `operator.index` reads it."""

    class Integer:
        def __index__(self) -> int:
            return value

    return Integer()


@pytest.mark.parametrize(
    ("argument", "error", "message"),
    [
        ({"turn_index": True}, TypeError, "^turn_index must be int, not bool$"),
        ({"model": None}, TypeError, "^model must be callable, not NoneType$"),
        (
            {"tools": ["read_file"]},
            TypeError,
            "^tools must be a mapping of names to functions or None, not list$",
        ),
        ({"tools": {"read_file": "cat"}}, TypeError, r"^tools\['read_file'\] must be callable, not str$"),
        ({"prompt": [3]}, TypeError, r"^prompt\[0\] must be str or a message, not int$"),
        (
            {"tool_results": {"c2": 5}},
            TypeError,
            r"^tool_results\['c2'\] must be str or content blocks, not int$",
        ),
        ({"change": "gpt"}, TypeError, "^change must be a mapping or None, not str$"),
        ({"max_turns": 0}, InvalidArgument, "^max_turns must be at least 1, got 0$"),
        ({"max_turns": -5}, InvalidArgument, "^max_turns must be at least 1, got -5$"),
        ({"max_turns": 2.0}, TypeError, "^max_turns must be int, not float$"),
    ],
)
def test_fork_checks_its_arguments_before_recording_anything(
    world: World, argument: dict[str, Any], error: type[Exception], message: str
) -> None:
    # Each recorded a Branch{fork} loop first: Aborted after an AttributeError or a
    # TypeError from deep inside, or Completed without a live turn (max_turns < 1).
    session, original = world.original()
    recorder = SessionRecorder()
    arguments: dict[str, Any] = {
        "turn_index": 2,
        "model": lambda request: reply("Done."),
        "tracer": Tracer(world.agent, sinks=[recorder], config=SNAP),
        **argument,
    }
    turn_index = arguments.pop("turn_index")
    with pytest.raises(error, match=message):
        fork(session, original.loop_id, turn_index, **arguments)
    recorder.flush()
    assert recorder.drain_completed() == [] and recorder.sessions() == []


# -- the cursor ----------------------------------------------------------------------------------


def served(script: ReplayScript, cursor: ReplayCursor, upto: int) -> None:
    for turn in script.turns[:upto]:
        assert cursor.respond(turn.request) == turn.reply


def test_tool_calls_are_answered_only_as_recorded(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    cursor = ReplayCursor(script, on_divergence="fallback")
    served(script, cursor, 3)
    result = cursor.tool_result("c4", "word_count", '{"text": "call mum"}')  # JSON string arguments
    assert result is not None and result.content == (TextContent(text="2"),) and result.turn_id is None
    assert cursor.tool_result("c1", "read_file", {"path": "notes.txt"}) is not None  # an earlier turn's
    assert cursor.divergence is None

    for call, what in [
        (("c9", "read_file", {}), "tool_call"),  # no such call
        (("c3", "word_count", {"path": "todo.txt"}), "tool_call"),  # another tool
        (("c3", "read_file", {"path": "other.txt"}), "tool_arguments"),
    ]:
        stop = ReplayCursor(script)
        served(script, stop, 3)
        with pytest.raises(ReplayDiverged) as raised:
            stop.tool_result(*call)
        assert raised.value.divergence.what == what and raised.value.divergence.turn_index == 2
        with pytest.raises(ReplayDiverged):  # and again on any later call
            stop.respond(script.turns[3].request)

    # A call of a turn not replayed yet is not the recording's either.
    early = ReplayCursor(script)
    served(script, early, 1)
    with pytest.raises(ReplayDiverged, match="no tool call 'c2'"):
        early.tool_result("c2", "word_count", {"text": "buy milk and eggs"})


def reusing_call_ids(world: World) -> Session:
    """A recorded loop whose model numbers its calls per reply ("call_0"), as some providers
    do: turns 0 and 1 both call ``c1`` (reading notes.txt, then todo.txt); turn 2 answers."""
    replies = iter(
        [
            reply("", [ToolCall(id="c1", name="read_file", arguments={"path": "notes.txt"})]),
            reply("", [ToolCall(id="c1", name="read_file", arguments={"path": "todo.txt"})]),
            reply("Done."),
        ]
    )

    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            agent(loop, lambda request: next(replies))

    return world.record(body)


def test_a_tool_call_id_reused_across_turns_is_answered_from_the_latest_turn_replayed(world: World) -> None:
    script = ReplayScript.from_session(reusing_call_ids(world))
    cursor = ReplayCursor(script)
    served(script, cursor, 1)
    first = cursor.tool_result("c1", "read_file", {"path": "notes.txt"})
    assert first is not None and first.content == (TextContent(text=FILES["notes.txt"]),)
    assert cursor.turn_of("c1") == script.turns[0]
    served_next = cursor.respond(script.turns[1].request)
    assert served_next == script.turns[1].reply
    second = cursor.tool_result("c1", "read_file", {"path": "todo.txt"})
    assert second is not None and second.content == (TextContent(text=FILES["todo.txt"]),)
    assert cursor.turn_of("c1") == script.turns[1] and cursor.divergence is None


def test_fallback_mode_keeps_the_first_divergence_and_hands_over(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    cursor = ReplayCursor(script, on_divergence="fallback")
    served(script, cursor, 1)
    changed = msgspec.structs.replace(script.turns[1].request, system_prompt="other")
    assert cursor.respond(changed) is None
    assert cursor.handed_over and not cursor.finished and cursor.turns_served == 1
    assert cursor.divergence is not None and cursor.divergence.what == "system_prompt"
    assert cursor.respond(script.turns[2].request) is None  # from then on
    assert cursor.tool_result("c1", "read_file", {"path": "notes.txt"}) is None  # tools run live


def test_a_model_call_past_the_recording_is_exhausted(world: World) -> None:
    session, original = world.original()
    script = ReplayScript.from_session(session)
    cursor = ReplayCursor(script, tools="live")
    served(script, cursor, 4)
    assert cursor.finished and cursor.tool_result("c1", "read_file", {}) is None  # live tools
    with pytest.raises(ReplayDiverged) as raised:
        cursor.respond(script.turns[3].request)
    assert raised.value.divergence == Divergence(
        loop_id=original.loop_id,
        turn_index=4,
        what="exhausted",
        detail="a model call after the 4 recorded turn(s)",
    )


def test_requests_compare_as_the_model_sees_them(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    request = script.turns[3].request

    # Timestamps, usage, stop reasons, model names, turn ids, thinking one side lacks,
    # split text blocks, extension messages and reordered tools make no difference.
    def relaxed(message: AgentMessage) -> AgentMessage:
        if isinstance(message, AssistantMessage):
            content = []
            for block in message.content:
                if type(block) is ThinkingContent:
                    continue
                if type(block) is TextContent and len(block.text) > 3:
                    content += [TextContent(text=block.text[:3]), TextContent(text=block.text[3:])]
                else:
                    content.append(block)
            return msgspec.structs.replace(
                message,
                content=tuple(content),
                usage=Usage(input=0, output=0),
                model="x",
                stop_reason="stop",
                timestamp=1,
            )
        return msgspec.structs.replace(message, timestamp=2)

    from phi_session.messages import extension_message

    same = RequestShape(
        system_prompt=SYSTEM,
        messages=(*map(relaxed, request.messages), extension_message("extension", "note", {})),
        tools=tuple(reversed(TOOLS)),
    )
    cursor = ReplayCursor(script)
    served(script, cursor, 3)
    assert cursor.respond(same) == script.turns[3].reply

    other_thinking = tuple(
        msgspec.structs.replace(m, content=(ThinkingContent(thinking="else"), *m.content[1:]))
        if isinstance(m, AssistantMessage) and any(type(b) is ThinkingContent for b in m.content)
        else m
        for m in request.messages
    )
    cursor = ReplayCursor(script)
    served(script, cursor, 3)
    with pytest.raises(
        ReplayDiverged, match=r"message 5 differs.*thinking 'two calls at once'.*thinking 'else'"
    ):
        cursor.respond(RequestShape(messages=other_thinking))
    cursor = ReplayCursor(script)
    served(script, cursor, 3)
    with pytest.raises(ReplayDiverged, match="1 recorded message"):
        cursor.respond(RequestShape(messages=request.messages[:-1]))
    with pytest.raises(TypeError):
        RequestShape.of("hello")  # type: ignore[arg-type]


def test_replay_cursor_of_a_session_or_a_script(world: World) -> None:
    session, original = world.original()
    cursor = ReplayCursor.of(session, original.loop_id, tools="live")
    assert cursor.script == ReplayScript.from_session(session, original.loop_id) and cursor.tools == "live"
    script = cursor.script
    assert ReplayCursor.of(script).script is script
    # Handing over needs the replay model's fallback model.
    for options in ({"until_turn": 1}, {"on_divergence": "fallback"}):
        with pytest.raises(InvalidArgument, match="need a fallback model"):
            ReplayCursor.of(session, **options)  # type: ignore[arg-type]
        assert not ReplayCursor.of(session, fallback=True, **options).finished  # type: ignore[arg-type]
    assert RecordedModel(session).cursor.script == script


def test_a_divergence_is_described_on_one_line(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    prompt = "You answer\n  questions\tabout files.\n" + "x" * 200
    with pytest.raises(ReplayDiverged) as raised:
        ReplayCursor(script).respond(msgspec.structs.replace(script.turns[0].request, system_prompt=prompt))
    found = raised.value.divergence
    assert found.what == "system_prompt" and found.actual is not None
    assert found.actual.startswith("You answer questions about files. xxx") and len(found.actual) == 160
    assert "\n" not in found.describe() and "\n" not in str(raised.value)


def test_a_divergence_shows_only_the_sides_it_has() -> None:
    base = {"turn_index": 1, "loop_id": "s.a.1", "what": "tool_call", "detail": "no recorded call"}
    assert Divergence(**base, actual="add(1)").describe() == (
        "turn 1 of s.a.1: tool_call: no recorded call (replayed: add(1))"
    )
    assert Divergence(**base).describe() == "turn 1 of s.a.1: tool_call: no recorded call"


def test_a_changed_tool_names_what_changed_in_it(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    read, count = TOOLS
    described = msgspec.structs.replace(read, description="Read a whole file.")
    typed = msgspec.structs.replace(count, parameters={"type": "object"})
    cases = [
        ((described, count), "tool(s) changed: read_file (description)", "read_file 'Read a file.'"),
        ((read, typed), "tool(s) changed: word_count (parameters)", 'word_count {"properties":'),
        (
            (described, typed),
            "tool(s) changed: read_file (description), word_count (parameters)",
            "read_file",
        ),
        ((read,), "tool(s) removed: word_count", "read_file, word_count"),
    ]
    for tools, detail, recorded in cases:
        with pytest.raises(ReplayDiverged) as raised:
            ReplayCursor(script).respond(msgspec.structs.replace(script.turns[0].request, tools=tools))
        found = raised.value.divergence
        assert (found.what, found.detail) == ("tools", detail)
        assert found.expected is not None and found.expected.startswith(recorded)
    assert found.actual == "read_file"
    assert raised.value.divergence.describe().endswith(
        "(recorded: read_file, word_count; replayed: read_file)"
    )


def test_an_empty_tool_call_id_is_unknown_not_a_divergence(world: World) -> None:
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    request = script.turns[3].request

    def unnumbered(message: AgentMessage) -> AgentMessage:
        if isinstance(message, AssistantMessage):
            content = tuple(
                msgspec.structs.replace(b, id="") if type(b) is ToolCall else b for b in message.content
            )
            return msgspec.structs.replace(message, content=content)
        if isinstance(message, ToolResultMessage):
            return msgspec.structs.replace(message, tool_call_id="")
        return message

    cursor = ReplayCursor(script)
    served(script, cursor, 3)
    same = msgspec.structs.replace(request, messages=tuple(map(unnumbered, request.messages)))
    assert cursor.respond(same) == script.turns[3].reply
    # A known id still has to match.
    renamed = tuple(
        msgspec.structs.replace(m, tool_call_id="other") if isinstance(m, ToolResultMessage) else m
        for m in request.messages
    )
    cursor = ReplayCursor(script)
    served(script, cursor, 3)
    with pytest.raises(ReplayDiverged, match="message 2 differs"):
        cursor.respond(msgspec.structs.replace(request, messages=renamed))


# -- lineage -------------------------------------------------------------------------------------


def test_adapter_runs_inside_recording_as_join_the_original_session(world: World) -> None:
    session, original = world.original()
    recorder = SessionRecorder()
    core = AdapterCore("test", [recorder], agent=AgentSession(clock=FakeClock("2025-06-02T09:00:00Z")))
    script = ReplayScript.from_session(session)
    with recording_as(replay_lineage(script)):
        first = core.start_run("r1", SNAP, metadata={"x": 1})
        core.end_run("r1")
        second = core.start_run("r2", SNAP)
        core.end_run("r2")
    outside = core.start_run("r3", SNAP)
    core.end_run("r3")
    recorder.flush()
    loops = {record.loop_id: record for s in recorder.drain_completed() for record in s.loops}
    one, two = loops[first.loop.loop_id], loops[second.loop.loop_id]
    assert one.session_id == two.session_id == session.session_id
    assert one.agent_id == session.agent_id
    assert one.loop_id not in {record.loop_id for record in session.loops}
    assert (one.parent_loop_id, one.kind) == (original.loop_id, ContinuationKind.rerun("replay"))
    assert (two.parent_loop_id, two.kind) == (one.loop_id, DEFAULT)
    assert one.metadata == {"framework": "test", "x": 1, **replay_lineage(script).metadata}
    assert two.metadata == {"framework": "test", **replay_lineage(script).metadata}
    assert loops[outside.loop.loop_id].session_id != session.session_id
    assert loops[outside.loop.loop_id].kind == INITIAL


@pytest.mark.parametrize("given", [True, False])
def test_every_cursor_replaying_the_blocks_session_serves_its_runs_and_no_other(
    world: World, given: bool
) -> None:
    # One replay model per agent of a handoff, each its own cursor, in one agent's block.
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    elsewhere = ReplayScript.from_session(msgspec.structs.replace(session, session_id="another"))
    first, sibling, stranger = ReplayCursor(script), ReplayCursor(script), ReplayCursor(elsewhere)
    recorder = SessionRecorder()
    core = AdapterCore("test", [recorder], agent=AgentSession(clock=FakeClock("2025-06-02T09:00:00Z")))
    with recording_as(replay_lineage(script), first if given else None):
        block = active_lineage()
        assert block is not None and block.cursor is (first if given else None)
        run = core.start_run("r", SNAP)
        for cursor in (first, sibling, stranger):
            assert cursor.respond(script.turns[0].request) == script.turns[0].reply
            with run.loop.turn() as turn, turn.assistant() as message:
                message.finish("rebuilt by the framework", usage=script.turns[0].reply.usage)
        assert block.cursor is first  # the given one, else the first to answer: not a later sibling
        # What the framework reports of a tool call a replay answered is taken back from
        # whichever of the block's cursors answered it.
        answer = script.turns[0].tool_results[0]
        sibling.answered("c1", answer)
        stranger.answered("c2", answer)
        assert block.take_answered("c1") == answer and block.take_answered("c1") is None
        assert block.take_answered("c2") is None
        core.end_run("r")
    recorder.flush()
    (record,) = [loop for s in recorder.drain_completed() for loop in s.loops]
    assert [is_replayed(turn.output_message) for turn in record.turns] == [True, True, False]
    assert record.billed_usage() == script.turns[0].reply.usage


@pytest.mark.parametrize("names_replayed", [True, False])
def test_a_block_given_no_cursor_takes_the_first_to_answer_replaying_what_it_replays(
    world: World, tmp_path: Path, names_replayed: bool
) -> None:
    # A lineage built by hand to record into another session than the one replayed: the
    # first cursor to answer replaying the session its metadata names is the block's, as
    # recording_as says; only a later one must replay the lineage's session. Made by the
    # public constructor, it names none (no metadata): the first to answer is the block's
    # whichever session it replays, else its replies were billed unmarked.
    session, _ = world.original()
    target, _ = World(tmp_path).original()
    script = ReplayScript.from_session(session)
    replayed = replay_lineage(script)
    where = {"session": target, "parent_loop_id": target.loops[0].loop_id}
    if names_replayed:
        lineage = msgspec.structs.replace(replayed, **where)
    else:
        lineage = Lineage(**where, kind=replayed.kind)
        assert lineage.metadata == {}
    first, sibling = ReplayCursor(script), ReplayCursor(script)
    recorder = SessionRecorder()
    core = AdapterCore("test", [recorder], agent=AgentSession(clock=FakeClock("2025-06-02T09:00:00Z")))
    with recording_as(lineage):
        block = active_lineage()
        assert block is not None
        run = core.start_run("r", SNAP)
        for cursor in (first, sibling):
            assert cursor.respond(script.turns[0].request) == script.turns[0].reply
            with run.loop.turn() as turn, turn.assistant() as message:
                message.finish("rebuilt by the framework", usage=script.turns[0].reply.usage)
        assert block.cursor is first
        core.end_run("r")
    recorder.flush()
    (record,) = [loop for s in recorder.drain_completed() for loop in s.loops]
    assert record.session_id == target.session_id
    assert [is_replayed(turn.output_message) for turn in record.turns] == [True, False]
    assert record.billed_usage() == script.turns[0].reply.usage


@pytest.mark.parametrize("sub_agent_first", [False, True])
@pytest.mark.parametrize("fork_point", [None, 0])
def test_a_block_given_no_cursor_never_takes_a_replayed_sub_agents_whichever_answers_first(
    world: World, tmp_path: Path, sub_agent_first: bool, fork_point: int | None
) -> None:
    # The lineage's replayed session and a sub-agent's, each its own cursor: the sub-agent's
    # call, inside the run, answered first made its cursor the block's, its replies counted.
    parent, _ = world.original()
    sub_agent, _ = World(tmp_path).original()
    script = ReplayScript.from_session(parent)
    lineage = replay_lineage(script) if fork_point is None else fork_lineage(script, fork_point)
    ours, theirs = ReplayCursor(script), ReplayCursor(ReplayScript.from_session(sub_agent))
    with recording_as(lineage):
        block = active_lineage()
        assert block is not None
        for cursor, loop_id in [(theirs, "sub"), (ours, "run")][:: 1 if sub_agent_first else -1]:
            calling(loop_id)
            answered(cursor)
        assert (block.cursor, block.served_in("run"), block.served_in("sub")) == (ours, 1, 0)


def test_a_handoff_inside_recording_as_is_marked_as_part_of_the_replay(world: World) -> None:
    session, _ = world.original()
    recorder = SessionRecorder()
    core = AdapterCore("test", [recorder], agent=AgentSession(clock=FakeClock("2025-06-02T09:00:00Z")))
    lineage = replay_lineage(ReplayScript.from_session(session))
    with recording_as(lineage):
        core.start_run("r", SNAP)
        successor = core.handoff("r", SNAP, metadata={"agent": "b"})
        branch = core.branch("x", "r", SNAP, "x")
        for key in ("x", "r"):
            core.end_run(key)
    assert successor is not None and branch is not None
    recorder.flush()
    loops = {record.loop_id: record for s in recorder.drain_completed() for record in s.loops}
    # So a later default replay still picks the original run, not this replay's handoff.
    assert loops[successor.loop.loop_id].metadata == {"framework": "test", "agent": "b", **lineage.metadata}
    assert loops[branch.loop.loop_id].metadata == {"framework": "test", **lineage.metadata}


def test_a_reply_served_in_a_thread_that_does_not_see_its_recording_block_is_warned_of_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    session, original = world.original()
    script = ReplayScript.from_session(session)
    cursor = ReplayCursor(script)
    with caplog.at_level(logging.WARNING, logger="phi_session.replay"):
        with recording_as(replay_lineage(script), cursor):
            thread = threading.Thread(target=served, args=(script, cursor, 2))  # empty context variables
            thread.start()
            thread.join()
        (warning,) = caplog.records  # once for the block, not at each reply
        assert original.loop_id in warning.getMessage() and "copy_context().run" in warning.getMessage()
        caplog.clear()
        # Without a block given the cursor (a hand loop's replay, RecordedModel): nothing to warn of.
        assert cursor.respond(script.turns[2].request) == script.turns[2].reply
        with recording_as(replay_lineage(script)):
            thread = threading.Thread(target=cursor.respond, args=(script.turns[3].request,))
            thread.start()
            thread.join()
    assert cursor.finished and caplog.records == []


def test_tracer_for_session_continues_loop_ids_without_a_new_formation(world: World) -> None:
    session, original = world.original()
    events: list[Any] = []
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[events.append], config=SNAP).for_session(session)
    assert tracer.agent.session_id == session.session_id and tracer.agent.agent_id == session.agent_id
    assert tracer.agent.last_loop_id == original.loop_id
    with tracer.loop(continues=original.loop_id) as loop:
        pass
    assert loop.loop_id == original.loop_id.rsplit(".", 1)[0] + ".2"
    assert events[0].formation is msgspec.UNSET
    with pytest.raises(ValueError):
        AgentSession().resume_session(session)


def test_a_second_replay_of_one_session_through_one_tracer_is_a_loop_of_its_own(world: World) -> None:
    session, original = world.original()
    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[recorder], config=SNAP)
    ids = []
    for _ in range(2):  # the same session object both times: it holds neither replay
        model = RecordedModel(session)
        with replay_lineage(model.script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model)
        ids.append(loop.loop_id)
    recorder.flush()
    (merged,) = recorder.drain_completed()
    assert len(set(ids)) == 2
    assert [(r.loop_id, r.parent_loop_id) for r in merged.loops] == [(i, original.loop_id) for i in ids]
    assert recorder.orphans() == []


def test_a_replay_through_the_tracer_recording_the_session_shares_its_loop_ids(world: World) -> None:
    recorder = SessionRecorder()
    tracer = Tracer(world.agent, sinks=[recorder], config=SNAP)
    with tracer.loop() as first:
        agent(first, scripted_model())
    recorder.flush()
    (session,) = recorder.sessions()
    model = RecordedModel(session)
    with replay_lineage(model.script).loop(tracer) as replayed:
        agent(replayed, model.next, recorded=model)
    with tracer.loop(continues=first.loop_id) as after:  # the live run goes on
        pass
    assert len({first.loop_id, replayed.loop_id, after.loop_id}) == 3
    assert recorder.orphans() == []


def test_two_tracers_joining_one_session_never_share_a_loop_id(world: World) -> None:
    """Each tracer's identity counted from the recording alone: two tracers joining one
    session before either recorded both took loop N, and the second AgentStart of that
    id was kept as an orphan (its loop lost)."""
    session, original = world.original()
    recorder = SessionRecorder()
    tracers = [
        Tracer(AgentSession(clock=FakeClock()), sinks=[recorder], config=SNAP).for_session(session)
        for _ in range(2)
    ]
    loops = [tracer.loop(continues=original.loop_id) for tracer in tracers]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.user("again")
        loop.end()
    recorder.flush()
    (recorded,) = recorder.drain_completed()
    assert recorder.orphans() == []
    assert len({loop.loop_id for loop in loops}) == 2
    assert [record.loop_id for record in recorded.loops] == [loop.loop_id for loop in loops]


def test_a_tracer_of_the_session_yet_without_loops_goes_on_from_the_recording(world: World) -> None:
    session, original = world.original()
    events: list[Any] = []
    own = AgentSession(session.agent_id, session_id=session.session_id, clock=FakeClock())
    with Tracer(own, sinks=[events.append], config=SNAP).for_session(session).loop() as loop:
        pass
    assert loop.loop_id == original.loop_id.rsplit(".", 1)[0] + ".2"
    assert events[0].formation is msgspec.UNSET and own.last_loop_id == loop.loop_id


def test_context_at_a_rerun_of_a_rerun(world: World) -> None:
    session, original = world.original()
    lineage = replay_lineage(ReplayScript.from_session(session))

    def rerun(tracer: Tracer) -> None:
        with lineage.loop(tracer) as loop:
            loop.user("again")
            with loop.turn() as turn, turn.assistant() as message:
                message.finish("ok")

    once = world.record(rerun)
    first = new_loop(session, once)
    lineage = replay_lineage(ReplayScript.from_session(once, first.loop_id))
    twice = world.record(rerun)
    second = new_loop(once, twice)
    assert twice.context_chain_to(second.loop_id) == [second.loop_id]
    assert twice.loop_chain_to(second.loop_id) == [original.loop_id, first.loop_id, second.loop_id]
    assert [view(m) for m in twice.context_at(second.loop_id)] == views(second)
    # A plain continuation of the replay resumes after it.
    plain = msgspec.structs.replace(second, metadata=None)
    assert not plain.reruns_parent and second.reruns_parent


# -- any recorded run replays without diverging -----------------------------------------------------


turn_specs = st.lists(
    st.tuples(
        st.text(max_size=12),  # the reply's text
        st.lists(st.sampled_from(["read_file", "word_count"]), max_size=3),  # its tool calls
        st.booleans(),  # thinking
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=30, deadline=None)
@given(specs=turn_specs, capture=st.booleans())
def test_replaying_any_recorded_run_unchanged_never_diverges(
    tmp_path_factory: Any, specs: list[Any], capture: bool
) -> None:
    world = World(tmp_path_factory.mktemp("replay"))
    # The last turn stops calling tools, so the agent ends where the recording does.
    specs = [*specs[:-1], (specs[-1][0], [], specs[-1][2])]
    numbers = itertools.count()

    def model(request: RequestShape) -> AssistantMessage:
        text, tools, thinking = specs[sum(isinstance(m, AssistantMessage) for m in request.messages)]
        calls = []
        for name in tools:
            n = next(numbers)
            arguments = {"path": "notes.txt"} if name == "read_file" else {"text": f"w {n}"}
            calls.append(ToolCall(id=f"call-{n}", name=name, arguments=arguments))
        return reply(text, calls, thinking="hm" if thinking else "")

    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            agent(loop, model, capture=capture)

    session = world.record(body, capture=capture)
    recorded = RecordedModel(session)

    def again(tracer: Tracer) -> None:
        with replay_lineage(recorded.script).loop(tracer) as loop:
            agent(loop, recorded.next, recorded=recorded, capture=capture)

    merged = world.record(again, capture=capture)
    assert recorded.finished and recorded.divergence is None
    assert views(new_loop(session, merged)) == views(session.loops[0])


# -- fork ----------------------------------------------------------------------------------------


def counting_model(seen: list[RequestShape]) -> ModelFn:
    """Another model: reads todo.txt once, then answers."""

    def model(request: RequestShape) -> AssistantMessage:
        seen.append(request)
        if len(seen) == 1:
            return reply("", [ToolCall(id="x1", name="read_file", arguments={"path": "todo.txt"})], usage=2)
        return reply("Done.", usage=1)

    return model


def test_fork_repeats_the_turns_before_the_fork_point_then_runs_the_other_model(world: World) -> None:
    session, original = world.original()
    seen: list[RequestShape] = []
    script = ReplayScript.from_session(session)

    def body(tracer: Tracer) -> None:
        fork(
            session,
            original.loop_id,
            2,
            model=counting_model(seen),
            tracer=tracer,
            tools={"read_file": lambda arguments: FILES[arguments["path"]]},
            tag="what-if",
            change={"model": "counting"},
        )

    merged = world.record(body)
    branch = new_loop(session, merged)
    assert (branch.kind, branch.parent_loop_id) == (ContinuationKind.branch("what-if"), original.loop_id)
    assert branch.metadata == {
        "fork": {
            "session_id": session.session_id,
            "loop_id": original.loop_id,
            "turn_index": 2,
            "change": {"model": "counting"},
        }
    }
    assert views(branch)[:5] == views(original)[:5]  # prompt, two turns with their results
    assert [t.usage for t in branch.turns[:2]] == [t.usage for t in original.turns[:2]]
    assert branch.turn_count() == 4
    assert branch.turns[2].tool_results[0].content == (TextContent(text="call mum"),)
    # The other model saw the recorded context of turn 2 (system prompt and tools too).
    assert seen[0].system_prompt == SYSTEM and seen[0].tools == TOOLS
    assert [view(m) for m in seen[0].messages] == [view(m) for m in script.turns[2].request.messages]
    assert [view(m) for m in merged.context_at(branch.loop_id)] == views(branch)


def test_fork_keeps_the_captured_context_where_it_does_not_end_with_the_turns_inputs(world: World) -> None:
    # An adapter once recorded a continued conversation's earlier prompt again as the new
    # loop's input; its captured request ends with the new prompt only. The fork cut
    # as many messages as the turn had inputs off its end, losing the earlier answer.
    def body(tracer: Tracer) -> None:
        with tracer.loop() as first:
            first.user("2 + 2?")
            with first.turn() as turn, turn.assistant() as answer:
                answer.finish(message=reply("4"))
        history = first.messages
        with tracer.loop(continues=first.loop_id) as second:
            for prompt in ("2 + 2?", "3 + 3?"):
                second.user(prompt)
            sent = RequestShape(
                system_prompt=SYSTEM,
                messages=(*history, UserMessage(content=(TextContent(text="3 + 3?"),), timestamp=0)),
            )
            with second.turn(request=payload(sent)) as turn, turn.assistant() as answer:
                answer.finish(message=reply("6"))

    session = world.record(body)
    seen: list[RequestShape] = []
    fork(
        session, session.loops[1].loop_id, 0, model=counting_model(seen), tracer=Tracer(sinks=[], config=SNAP)
    )
    assert [summarize(m) for m in seen[0].messages] == [
        "user '2 + 2?'",
        "assistant '4'",  # was lost
        "user '2 + 2?'",  # the turn's inputs, as recorded
        "user '3 + 3?'",
    ]


@pytest.mark.spec  # phi-core's own recording: its captured request holds no extension message
@pytest.mark.parametrize("prompt", [None, "What about Paris?"])
def test_fork_sends_a_captured_request_without_the_turns_extension_inputs(prompt: str | None) -> None:
    # Turn 0's inputs are the user's prompt then an extension message, which phi-core
    # never sends to a model: the fork matched none of them at the captured request's
    # end, so it sent the prompt twice (or the old prompt before the new one), and the
    # extension message.
    case = GOLDEN / "recorder" / "049-1sess-2loops" / "sessions"
    session = decode_session(next(case.iterdir()).read_bytes())
    loop = session.loops[0]
    point = ReplayScript.from_session(session, loop.loop_id).turn(0)
    assert [type(m).__name__ for m in point.inputs] == ["UserMessage", "ExtensionMessage"]
    seen: list[RequestShape] = []
    tracer = Tracer(sinks=[SessionRecorder()], config=SNAP)
    fork(session, loop.loop_id, 0, model=counting_model(seen), tracer=tracer, prompt=prompt)
    expected = (
        point.request.messages
        if prompt is None
        else (UserMessage(content=(TextContent(text=prompt),), timestamp=0),)
    )
    assert [summarize(m) for m in seen[0].messages] == [summarize(m) for m in expected]
    assert not any(isinstance(m, ExtensionMessage) for m in seen[0].messages)


def test_fork_with_another_prompt_and_a_replaced_tool_result(world: World) -> None:
    session, original = world.original()
    seen: list[RequestShape] = []

    def body(tracer: Tracer) -> None:
        fork(session, original.loop_id, 0, model=counting_model(seen), tracer=tracer, prompt="Only todo.txt?")

    branch = new_loop(session, world.record(body))
    assert branch.metadata["fork"]["change"] == {"prompt": "Only todo.txt?"}
    assert [view(m) for m in seen[0].messages] == [
        view(UserMessage(content=(TextContent(text="Only todo.txt?"),), timestamp=0))
    ]
    assert views(branch)[0] == view(seen[0].messages[0])
    # No tool given: the model's tool call gets an error result, and the loop goes on.
    assert branch.turns[0].tool_results[0].is_error

    seen.clear()
    again = world.store.load(session.session_id)

    def replaced(tracer: Tracer) -> None:
        fork(again, original.loop_id, 2, model=counting_model(seen), tracer=tracer, tool_results={"c2": "40"})

    branch = new_loop(again, world.record(replaced))
    assert branch.metadata["fork"]["change"] == {"tool_results": ["c2"]}
    assert branch.turns[1].tool_results[0].content == (TextContent(text="40"),)
    assert seen[0].messages[4].content == (TextContent(text="40"),)  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match="c1: not a tool call of turn 1"):
        fork(
            again,
            original.loop_id,
            2,
            model=counting_model([]),
            tracer=Tracer(config=SNAP),
            tool_results={"c1": "x"},
        )
    with pytest.raises(ValueError, match="c1: turn 0 has no turn before it"):  # not "of turn -1"
        fork(
            again,
            original.loop_id,
            0,
            model=counting_model([]),
            tracer=Tracer(config=SNAP),
            tool_results={"c1": "x"},
        )
    with pytest.raises(TurnNotFound):
        fork(again, original.loop_id, 9, model=counting_model([]), tracer=Tracer(config=SNAP))


def test_fork_replaces_the_results_of_the_turn_before_only_even_under_a_reused_call_id(world: World) -> None:
    session = reusing_call_ids(world)
    (original,) = session.loops
    seen: list[RequestShape] = []

    def body(tracer: Tracer) -> None:
        fork(
            session, original.loop_id, 2, model=counting_model(seen), tracer=tracer, tool_results={"c1": "x"}
        )

    branch = new_loop(session, world.record(body))
    contents = [turn.tool_results[0].content for turn in branch.turns[:2]]
    assert contents == [(TextContent(text=FILES["notes.txt"]),), (TextContent(text="x"),)]
    sent = [m.content for m in seen[0].messages if isinstance(m, ToolResultMessage)]
    assert sent == contents  # what the other model was sent


# -- the command line ------------------------------------------------------------------------------


def test_cli_fork_prints_or_writes_the_context_of_a_turn(world: World, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from phi_session.cli import main

    session, original = world.original()
    store = str(tmp_path / "sessions")

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["fork", *args, "--store", store])

    shown = run(session.session_id, original.loop_id, "--turn", "1")
    assert shown.exit_code == 0, shown.output
    assert (
        "You answer questions about files." in shown.stdout and "tools: read_file, word_count" in shown.stdout
    )
    assert PROMPT in shown.stdout and "buy milk and eggs" in shown.stdout
    assert "3 messages: the context of turn 1" in shown.stderr

    out = tmp_path / "fork.json"
    written = run(session.session_id, original.loop_id, "--turn", "2", "--json", "--out", str(out))
    assert written.exit_code == 0
    data = json.loads(out.read_bytes())
    assert data == json.loads(written.stdout)
    assert (data["session_id"], data["loop_id"], data["turn_index"]) == (
        session.session_id,
        original.loop_id,
        2,
    )
    assert data["system_prompt"] == SYSTEM and [t["name"] for t in data["tools"]] == [
        "read_file",
        "word_count",
    ]
    messages = decode_messages(out.read_bytes())
    assert [view(m) for m in messages] == [
        view(m) for m in ReplayScript.from_session(session).turns[2].request.messages
    ]

    for args, code, text in [
        ((session.session_id, original.loop_id, "--turn", "4"), 1, "has no turn 4"),
        ((session.session_id, "nope", "--turn", "0"), 1, "no loop 'nope'"),
        (("00000000-0000-4000-8000-00000000ffff", original.loop_id, "--turn", "0"), 1, "ffff"),
        ((session.session_id, original.loop_id, "--turn", "-1"), 2, "--turn"),
        ((session.session_id, original.loop_id, "--turn", "x"), 2, "--turn"),
        ((session.session_id, original.loop_id), 2, "--turn"),
    ]:
        result = run(*args)
        assert result.exit_code == code, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and text in result.stderr


def test_tool_arguments_compare_as_json_values() -> None:
    # `True == 1 == 1.0` in Python; in JSON a boolean is never a number (as `diff_loops` says).
    from phi_session.diff import same_json
    from phi_session.replay.cursor import ReplayCursor as Cursor
    from phi_session.replay.request import compare_messages

    recorded = ToolCall(id="c1", name="run_tests", arguments={"verbose": True, "n": 1, "opts": {"a": [1, 2]}})
    for asked, same in [
        ({"opts": {"a": [1.0, 2]}, "n": 1.0, "verbose": True}, True),  # numbers by value, any key order
        ({"verbose": 1, "n": 1, "opts": {"a": [1, 2]}}, False),
        ({"verbose": True, "n": True, "opts": {"a": [1, 2]}}, False),
        ({"verbose": True, "n": 1, "opts": {"a": [1, 2, 3]}}, False),
        ({"verbose": True, "n": 1}, False),
    ]:
        assert same_json(recorded.arguments, asked) is same
        problem = Cursor._call_problem(recorded, "run_tests", asked, no_result=False)
        assert (problem is None) is same, asked
        if not same:
            assert problem is not None and problem[0] == "tool_arguments"
        replied = reply("", [msgspec.structs.replace(recorded, arguments=asked)])
        assert (compare_messages([reply("", [recorded])], [replied]) is None) is same, asked


# -- billing: a replay's served turns called no model ----------------------------------------------

PRICER = Pricer({"acme/house-model": {"input": 1, "output": 10}}, use_table=False)


def usage_sum(usages: Sequence[Usage]) -> Usage:
    total = ZERO_USAGE
    for usage in usages:
        total = total + usage
    return total


def test_a_replay_and_a_fork_bill_the_original_once_and_the_forks_live_turns(world: World) -> None:
    session, original = world.original()
    script = ReplayScript.from_session(session)
    model = RecordedModel(script, tools="recorded")

    def replay_body(tracer: Tracer) -> None:
        with replay_lineage(script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model)

    def fork_body(tracer: Tracer) -> None:
        fork(
            session,
            original.loop_id,
            2,
            model=counting_model([]),
            tracer=tracer,
            tools={"read_file": lambda arguments: FILES[arguments["path"]]},
        )

    world.record(replay_body)
    merged = world.record(fork_body)
    (replay,) = [loop for loop in merged.loops if loop.kind == ContinuationKind.rerun("replay")]
    (branch,) = [loop for loop in merged.loops if loop.kind == ContinuationKind.branch("fork")]

    # The replay reports the recorded usage (a diff compares like with like), bills none.
    assert replay.usage == original.usage and replay.reported_usage() == original.usage
    assert all(is_replayed(turn.output_message) for turn in replay.turns)
    assert replay.billed_usage() == ZERO_USAGE and replay.model_calls() == []
    loop_diff = diff_loops(merged, original.loop_id, merged, replay.loop_id)
    assert loop_diff.identical and loop_diff.usage_delta.is_zero()
    assert loop_diff.b.usage == original.usage
    # The fork bills the turns its model answered, not the two it repeated.
    assert [is_replayed(turn.output_message) for turn in branch.turns] == [True, True, False, False]
    live = usage_sum([turn.usage for turn in branch.turns[2:]])
    assert live != ZERO_USAGE and branch.billed_usage() == live
    assert [call.usage for call in branch.model_calls()] == [turn.usage for turn in branch.turns[2:]]
    assert not any(is_replayed(turn.output_message) for turn in original.turns)

    billed = original.usage + live
    assert merged.billed_usage() == billed
    assert merged.reported_usage() == original.usage + original.usage + branch.usage
    (summary,) = world.store.query()
    assert summary.usage == billed
    (total,) = world.store.usage_totals("model", pricer=PRICER)
    assert total.usage == billed and total.loops == 3
    expected = (billed.input * 1 + billed.output * 10) / 1_000_000
    assert not isinstance(total.cost, msgspec.UnsetType)
    assert total.cost.usd == pytest.approx(expected)
    assert PRICER.session(merged).usd == pytest.approx(expected)


def test_a_replay_that_falls_back_to_a_live_model_bills_the_live_turns(world: World) -> None:
    session, original = world.original()
    script = ReplayScript.from_session(session)
    model = RecordedModel(script, on_divergence="fallback", tools="live", fallback=counting_model([]))

    def miscount(call: ToolCall) -> str:
        return "5" if call.name == "word_count" else live_tool(call)

    def body(tracer: Tracer) -> None:
        with replay_lineage(script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model, run_tool=miscount)

    merged = world.record(body)
    replay = new_loop(session, merged)
    assert model.divergence is not None and model.divergence.turn_index == 2
    assert [is_replayed(turn.output_message) for turn in replay.turns] == [True, True, False, False]
    live = usage_sum([turn.usage for turn in replay.turns[2:]])
    assert replay.billed_usage() == live and replay.usage == usage_sum([t.usage for t in replay.turns])
    (summary,) = world.store.query()
    assert summary.usage == original.usage + live


def test_cli_show_bills_a_replay_nothing_and_marks_its_turns(world: World, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from phi_session.cli import main

    session, original = world.original()
    model = RecordedModel(ReplayScript.from_session(session))

    def body(tracer: Tracer) -> None:
        with replay_lineage(model.script).loop(tracer) as loop:
            agent(loop, model.next, recorded=model)

    replay = new_loop(session, world.record(body))
    shown = CliRunner().invoke(
        main,
        ["show", session.session_id, "--store", str(tmp_path / "sessions")],
        terminal_width=200,
    )
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.count("replayed, not billed") == replay.turn_count() == 4
    assert f"{original.usage.total_tokens:,} tokens" in shown.stdout  # the session's total: the original's
    assert "· 0 tokens" in shown.stdout  # the replay's loop
    assert f"replayed from the recording, not billed: {original.usage.total_tokens:,} tokens" in shown.stdout


def test_a_loop_given_the_cursor_tags_each_reply_it_served_whenever_the_turn_starts(world: World) -> None:
    # What adapters rely on: a framework may open the turn only once its model call returned,
    # or finish a reply after its next model call; a reply of the fallback is never tagged.
    session, _ = world.original()
    script = ReplayScript.from_session(session)
    cursor = ReplayCursor(script, until_turn=3)
    recorder = SessionRecorder()
    tracer = Tracer(world.agent, sinks=[recorder], config=SNAP).for_session(session)
    with tracer.loop(replay=cursor) as loop:
        served(script, cursor, 1)  # before its turn starts
        with loop.turn() as turn, turn.assistant() as message:
            message.finish("rebuilt by the framework", usage=script.turns[0].reply.usage)
        with loop.turn() as turn:
            reply = turn.assistant().start()
            for recorded in script.turns[1:3]:  # the next call served before this reply is finished
                assert cursor.respond(recorded.request) == recorded.reply
            reply.finish("second")
        with loop.turn() as turn, turn.assistant() as message:
            message.finish("third")
        with loop.turn() as turn, turn.assistant() as message:
            assert cursor.respond(script.turns[3].request) is None  # the fork point: live
            message.finish("live", usage=Usage(input=7, output=1))
    recorder.flush()
    (record,) = recorder.drain_completed()[0].loops
    assert [is_replayed(turn.output_message) for turn in record.turns] == [True, True, True, False]
    # The live reply only; it reported no total: its tokens count (`counted_total`).
    assert record.billed_usage() == Usage(input=7, output=1, total_tokens=8)


# -- what prun and revert took out of the context ------------------------------------------------


def forked_request(world: World, session: Session, loop_id: str, turn: int) -> RequestShape:
    """What `fork` sends its model at `turn` of loop `loop_id` (recorded nowhere)."""
    seen: list[RequestShape] = []
    tracer = Tracer(world.agent, sinks=[], config=SNAP)
    fork(session, loop_id, turn, model=counting_model(seen), tracer=tracer, max_turns=1)
    return seen[0]


def grep_and_prune(memo: str | None) -> Callable[[Tracer], None]:
    """A loop whose turn 0 greps, then prunes the grep's output (by its timestamp, `memo`
    or none), its turn 1 answering."""

    def body(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            loop.user("Where is main defined?")
            with loop.turn() as turn:
                with turn.assistant() as answer:
                    answer.finish(message=reply("", [ToolCall(id="g1", name="grep", arguments={})]))
                with turn.tool(turn.tool_calls[0]) as tool:
                    tool.result("HUGE grep output")
                loop.prun(5200, 1, pruned_timestamps=[turn.tool_results[0].timestamp], memo=memo)
            with loop.turn() as turn, turn.assistant() as answer:
                answer.finish(message=reply("In src/main.py."))

    return body


@pytest.mark.parametrize("memo", [None, "grep found main in src/main.py"])
def test_a_pruned_tool_result_is_out_of_the_context_of_the_turns_after_it(
    world: World, memo: str | None, tmp_path: Path
) -> None:
    # The grep's output pruned in turn 0 was still in turn 1's rebuilt context: in the
    # script's request, in what fork() sent the other model and in 'phi-session fork --turn 1'.
    session = world.record(grep_and_prune(memo), capture=False)
    (loop,) = session.loops
    script = ReplayScript.from_session(session)
    grep_call = "assistant grep({}) [g1]"
    kept = [f"user '[Pruned context summary: {memo}]'"] if memo else []
    expected = ["user 'Where is main defined?'", grep_call, *kept]
    assert [summarize(m) for m in script.turn(1).request.messages] == expected
    assert summarize(script.turn(0).tool_results[0]) == "toolResult [g1] 'HUGE grep output'"  # kept
    if memo:  # the memo stands where the result was, stamped as it was
        memo_message = script.turn(1).request.messages[-1]
        assert memo_message.timestamp == loop.turns[0].tool_results[0].timestamp  # type: ignore[union-attr]
    assert [summarize(m) for m in forked_request(world, session, loop.loop_id, 1).messages] == expected

    from click.testing import CliRunner

    from phi_session.cli import main

    shown = CliRunner().invoke(
        main,
        [
            "fork",
            session.session_id,
            loop.loop_id,
            "--turn",
            "1",
            "--json",
            "--store",
            str(tmp_path / "sessions"),
        ],
    )
    assert shown.exit_code == 0, shown.output
    sent = decode_messages(json.dumps(json.loads(shown.stdout)["messages"]).encode())
    assert [summarize(m) for m in sent] == expected


def test_a_reverted_span_is_out_of_the_context_of_the_turns_after_it(world: World) -> None:
    # Turn 1 reverted to node 10 (the prompt), abandoning the failed bubble sort: turn 2's
    # rebuilt context still held the abandoned replies and their tool results.
    def body(tracer: Tracer, *, applied: bool = True) -> None:
        with tracer.loop() as loop:
            loop.user(UserMessage(content=(TextContent(text="Write a fast sort"),), timestamp=1, node_id=10))
            for node, call in ((11, "test"), (13, "revert_to_state")):
                with loop.turn() as turn:
                    with turn.assistant() as answer:
                        calls = [ToolCall(id=f"c{node}", name=call, arguments={})]
                        answer.finish(
                            message=msgspec.structs.replace(reply("", calls), node_id=node, parent_id=10)
                        )
                    with turn.tool(turn.tool_calls[0]) as tool:
                        tool.result("timed out" if node == 11 else "reverted")
            loop.revert(
                "failure",
                target=10,
                abandoned_node_ids=[11, 13],
                summary="bubble sort timed out",
                applied=applied,
            )
            with loop.turn() as turn, turn.assistant() as answer:
                answer.finish(message=reply("Quicksort."))

    session = world.record(body, capture=False)
    (loop,) = session.loops
    script = ReplayScript.from_session(session)
    assert len(script.turn(1).request.messages) == 3  # before the revert: as recorded
    (prompt,) = script.turn(2).request.messages
    assert summarize(prompt) == "user 'Write a fast sort'"
    assert prompt.tags == (  # type: ignore[union-attr]
        NodeTag(kind="lesson", text="bubble sort timed out", created_at_turn=1, abandoned_node_ids=(11, 13)),
    )
    assert forked_request(world, session, loop.loop_id, 2).messages == (prompt,)
    # A revert refused (applied false) left the context as it was.
    refused = world.record(lambda tracer: body(tracer, applied=False), capture=False)
    assert len(ReplayScript.from_session(refused).turn(2).request.messages) == 5


def tree_loop(world: World, target: int, abandoned: Sequence[int]) -> Session:
    """A loop whose messages are nodes as phi-core's ``stamp_node_identity`` stamps them, a
    tool result too (the next reply's parent): prompt 1; turn 0 reply 2 reads, result 3
    'SPEC'; turn 1 reply 4 runs, result 5 'timed out', then reverts to `target`; turn 2
    answers."""
    recorder = SessionRecorder(capture_turn_requests=False)
    results = {"c1": (3, 2), "c2": (5, 4)}  # call id: (node, parent)

    def stamped(event: Any) -> None:  # the tracer stamps no tool result
        message = getattr(event, "message", None)
        if isinstance(message, ToolResultMessage) and type(event).__name__ in ("MessageStart", "MessageEnd"):
            node, parent = results[message.tool_call_id]
            event = msgspec.structs.replace(
                event, message=msgspec.structs.replace(message, node_id=node, parent_id=parent)
            )
        recorder.on_event(event)

    tracer = Tracer(world.agent, sinks=[stamped], config=SNAP)
    with tracer.loop() as loop:
        loop.user(UserMessage(content=(TextContent(text="write a sort"),), timestamp=1, node_id=1))
        for node, parent, call, output in ((2, 1, "c1", "SPEC"), (4, 3, "c2", "timed out")):
            with loop.turn() as turn:
                with turn.assistant() as answer:
                    calls = [ToolCall(id=call, name="run", arguments={})]
                    answer.finish(
                        message=msgspec.structs.replace(reply("", calls), node_id=node, parent_id=parent)
                    )
                with turn.tool(turn.tool_calls[0]) as tool:
                    tool.result(output)
                if node == 4:
                    loop.revert("failure", target=target, abandoned_node_ids=abandoned, summary="too slow")
        with loop.turn() as turn, turn.assistant() as answer:
            answer.finish(message=msgspec.structs.replace(reply("Quicksort."), node_id=6, parent_id=target))
    recorder.flush()
    (session,) = recorder.drain_completed()
    return session


@pytest.mark.parametrize(
    ("target", "abandoned", "kept"),
    [
        (
            4,
            [5],
            [
                "user 'write a sort'",
                "assistant run({}) [c1]",
                "toolResult [c1] 'SPEC'",
                "assistant run({}) [c2]",
            ],
        ),
        (3, [4, 5], ["user 'write a sort'", "assistant run({}) [c1]", "toolResult [c1] 'SPEC'"]),
        (2, [3, 4, 5], ["user 'write a sort'", "assistant run({}) [c1]"]),
    ],
)
def test_a_revert_walks_the_tree_through_tool_results(
    world: World, target: int, abandoned: list[int], kept: list[str]
) -> None:
    # A reply's parent is the last tool result, and the rebuilt results (a TurnEnd's) had
    # no node id: reverting to reply 4 kept [4, 'timed out'] only, to reply 2 kept the
    # abandoned 'SPEC', and a tool result as target got no tag.
    session = tree_loop(world, target, abandoned)
    messages = ReplayScript.from_session(session).turn(2).request.messages
    assert [summarize(m) for m in messages] == kept
    tags = {getattr(m, "node_id", None): getattr(m, "tags", ()) for m in messages}
    lesson = NodeTag(kind="lesson", text="too slow", created_at_turn=1, abandoned_node_ids=tuple(abandoned))
    assert tags == {node: (lesson,) if node == target else () for node in range(1, target + 1)}
    assert forked_request(world, session, session.loops[0].loop_id, 2).messages == messages


def tree_view(message: AgentMessage) -> tuple[str, int | None, Any]:
    """A message as the model sees it, with its node and tags (a revert's mark)."""
    return summarize(message), getattr(message, "node_id", None), getattr(message, "tags", ())


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("edited", ["pruned", "reverted"])
def test_a_fork_records_the_edits_of_the_context_it_repeats(world: World, edited: str, capture: bool) -> None:
    # A fork from an edited context (turn 0's grep output pruned with a memo) sent the model
    # the memo, but its loop recorded no PrunApplied: a replay of the fork rebuilt the
    # context with the grep's output, which the model had never been sent.
    if edited == "pruned":
        session, point = world.record(grep_and_prune("M"), capture=False), 1
    else:
        session, point = tree_loop(world, 4, [5]), 2
    seen: list[RequestShape] = []
    recorder = SessionRecorder(capture_turn_requests=capture)
    tracer = Tracer(world.agent, sinks=[recorder], config=SNAP)
    scope = fork(
        session, session.loops[0].loop_id, point, model=counting_model(seen), tracer=tracer, max_turns=1
    )
    recorder.flush()
    (recorded,) = recorder.drain_completed()
    sent = [tree_view(m) for m in seen[0].messages]
    assert sent == [tree_view(m) for m in ReplayScript.from_session(session).turn(point).request.messages]
    rebuilt = ReplayScript.from_session(recorded, scope.loop_id).turn(point).request.messages
    assert [tree_view(m) for m in rebuilt] == sent
