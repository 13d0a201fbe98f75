"""Replay and fork of pydantic-ai runs (`phi_session.adapters.pydantic_ai.ReplayModel`),
offline: recorded on pydantic-ai's own FunctionModel, replayed without any model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "pydantic_ai", reason="needs the pydantic-ai extra: pip install 'phi-session[pydantic-ai]'"
)

from msgspec.structs import replace
from pydantic_ai import (
    Agent,
    ApprovalRequired,
    DeferredToolRequests,
    DeferredToolResults,
    ModelRetry,
    RunContext,
)
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage

from phi_session import SessionRecorder, SessionRecorderConfig, SqliteStore
from phi_session.adapters.pydantic_ai import PhiCapability, ReplayModel
from phi_session.adapters.pydantic_ai.replay import RecordedToolError
from phi_session.diff import diff_loops
from phi_session.events import ContinuationKind
from phi_session.messages import AgentMessage, AssistantMessage, ToolCall, UserMessage
from phi_session.model import LoopRecord, Session, is_replayed
from phi_session.replay import RecordedModelError, ReplayDiverged, ReplayScript, recording_as, replay_lineage

SYSTEM = "You are a calculator."
CALLS = {0: [("lookup", {"key": "a"}, "c1")], 1: [("add", {"a": 1, "b": 2}, "c2")]}
CALLS[2] = [("lookup", {"key": "b"}, "c3"), ("add", {"a": 3, "b": 4}, "c4")]


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Four requests: a thought, text and a call; a call; two calls; the answer."""
    step = sum(isinstance(message, ModelResponse) for message in messages)
    usage = RequestUsage(input_tokens=100 + step, output_tokens=10 + step, cache_read_tokens=step)
    parts: list[Any] = [ThinkingPart("first, look it up"), TextPart("let me look")] if step == 0 else []
    parts += [ToolCallPart(name, args, tool_call_id=call_id) for name, args, call_id in CALLS.get(step, [])]
    if step == 3:
        parts.append(TextPart("done: 3 and 7"))
    return ModelResponse(parts=parts, usage=usage, finish_reason="tool_call" if step < 3 else "stop")


def no_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise AssertionError("a replay must not call the agent's model")


class Tools:
    """The agent's two tools, counting their calls; `results` changes what lookup returns.

    Coroutines, so that parallel calls finish in call order: pydantic-ai runs plain
    functions in worker threads, whose finishing order (the order the loop records the
    results in) varies with the machine's load."""

    def __init__(self, prefix: str = "value of") -> None:
        self.calls = 0
        self.prefix = prefix

    async def lookup(self, key: str) -> str:
        """Look a key up."""
        self.calls += 1
        return f"{self.prefix} {key}"

    async def add(self, a: int, b: int) -> int:
        """Add two numbers."""
        self.calls += 1
        return a + b


def make_agent(
    capability: PhiCapability,
    tools: Tools,
    *,
    model: Callable[[list[ModelMessage], AgentInfo], ModelResponse] = scripted,
    system: str = SYSTEM,
    extra: Sequence[Callable[..., Any]] = (),
) -> Agent[None, str]:
    return Agent(
        FunctionModel(model, model_name="calc-model"),
        system_prompt=system,
        capabilities=[capability],
        name="calc",
        tools=[tools.lookup, tools.add, *extra],
    )


@pytest.fixture
def recorder() -> SessionRecorder:
    return SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))


@pytest.fixture
def capability(recorder: SessionRecorder) -> PhiCapability:
    return PhiCapability(recorder, capture_requests=True)


@pytest.fixture
def original(recorder: SessionRecorder, capability: PhiCapability) -> tuple[Session, LoopRecord]:
    result = make_agent(capability, Tools()).run_sync("compute")
    assert result.output == "done: 3 and 7"
    (session,) = recorder.sessions()
    (loop,) = session.loops
    return session, loop


def session_of(recorder: SessionRecorder) -> Session:
    (session,) = recorder.sessions()
    return session


def bare(messages: Sequence[AgentMessage]) -> list[AgentMessage]:
    """Messages without what differs between two runs of the same conversation (time, turn
    ids, the mark of a reply a replay served)."""
    return [replace(message, timestamp=0, turn_id=None, phi_session_replayed=False) for message in messages]  # type: ignore[type-var]


def calls_of(loop: LoopRecord) -> list[list[ToolCall]]:
    return [
        [block for block in turn.output_message.content if isinstance(block, ToolCall)]  # type: ignore[union-attr]
        for turn in loop.turns
    ]


# -- recording -------------------------------------------------------------------------------------


def test_the_recording_captures_each_turns_request(original: tuple[Session, LoopRecord]) -> None:
    _, loop = original
    assert loop.turn_count() == 4
    payloads = [turn.request_payload for turn in loop.turns]
    assert all(payload is not None for payload in payloads)
    assert [payload.system_prompt for payload in payloads] == [SYSTEM] * 4  # type: ignore[union-attr]
    assert [[tool.name for tool in payload.tools] for payload in payloads] == [["lookup", "add"]] * 4  # type: ignore[union-attr]
    assert payloads[0].tools[0].description == "Look a key up."  # type: ignore[union-attr]
    assert [len(payload.messages) for payload in payloads] == [1, 3, 5, 8]  # type: ignore[union-attr]
    # the request holds the context as sent: the earlier replies and the tool results
    assert bare(payloads[3].messages) == bare(loop.messages[:8])  # type: ignore[union-attr]
    assert [type(m).__name__ for m in payloads[1].messages] == [  # type: ignore[union-attr]
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
    ]
    assert [(c.id, c.name) for turn in calls_of(loop) for c in turn] == [
        ("c1", "lookup"),
        ("c2", "add"),
        ("c3", "lookup"),
        ("c4", "add"),
    ]
    assert loop.usage.input == 4 * 100  # pydantic-ai's input tokens include the cache reads
    assert loop.usage.cache_read == 0 + 1 + 2 + 3


def test_without_capture_requests_no_request_is_recorded(recorder: SessionRecorder) -> None:
    make_agent(PhiCapability(recorder), Tools()).run_sync("compute")
    assert all(turn.request_payload is None for turn in session_of(recorder).loops[0].turns)


def test_requests_captured_into_the_embedded_store_are_saved(tmp_path: Path) -> None:
    # The default sink is the embedded store: its recorder keeps the captured requests too.
    with SqliteStore(tmp_path / "sessions.db") as store:
        capability = PhiCapability(store=store, capture_requests=True)
        make_agent(capability, Tools()).run_sync("compute")
        capability.close()
        (session_id,) = store.list_ids()
        (loop,) = store.load(session_id).loops
    payloads = [turn.request_payload for turn in loop.turns]
    assert all(payload is not None for payload in payloads)
    assert [payload.system_prompt for payload in payloads] == [SYSTEM] * 4  # type: ignore[union-attr]


# -- replay ----------------------------------------------------------------------------------------


def test_a_replay_with_recorded_tools_equals_the_original(
    recorder: SessionRecorder, capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    script = ReplayScript.from_session(session, loop.loop_id)
    model = ReplayModel(script)
    tools = Tools()
    agent = make_agent(capability, tools, model=no_model)
    with model.recording():
        result = agent.run_sync("compute", model=model, capabilities=[model.capability])
    assert result.output == "done: 3 and 7"
    assert tools.calls == 0 and model.cursor.finished and model.cursor.divergence is None

    first, replayed = session_of(recorder).loops
    assert first.loop_id == loop.loop_id
    assert replayed.kind == ContinuationKind.rerun("replay")
    assert replayed.parent_loop_id == loop.loop_id
    assert replayed.metadata["replay"] == {"session_id": session.session_id, "loop_id": loop.loop_id}
    assert replayed.status == "Completed" and replayed.turn_count() == 4
    assert bare(replayed.messages) == bare(loop.messages)
    assert calls_of(replayed) == calls_of(loop)
    assert [turn.usage for turn in replayed.turns] == [turn.usage for turn in loop.turns]
    assert replayed.usage == loop.usage
    # Its replies were served from the recording: they bill nothing.
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)
    assert diff_loops(session_of(recorder), loop.loop_id, session_of(recorder), replayed.loop_id).identical
    thinking = replayed.turns[0].output_message.content[0]  # type: ignore[union-attr]
    assert thinking.thinking == "first, look it up"  # type: ignore[union-attr]
    # the replayed run was asked what the original was
    for mine, theirs in zip(replayed.turns, loop.turns, strict=True):
        assert bare(mine.request_payload.messages) == bare(theirs.request_payload.messages)  # type: ignore[union-attr]


def test_a_streamed_replay_equals_the_original(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    session, loop = original

    async def not_streamed(*args: Any) -> ModelResponse:
        raise AssertionError("every request streams here")

    monkeypatch.setattr(ReplayModel, "request", not_streamed)
    model = ReplayModel(session, loop.loop_id)
    streaming = PhiCapability(recorder, stream=True)  # pydantic-ai then streams every request
    with recording_as(replay_lineage(model.script)):
        make_agent(streaming, Tools(), model=no_model).run_sync(
            "compute", model=model, capabilities=[model.capability]
        )
    replayed = session_of(recorder).loops[-1]
    assert bare(replayed.messages) == bare(loop.messages)
    assert replayed.usage == loop.usage


def test_live_tools_run_and_an_unchanged_agent_does_not_diverge(
    capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id, tools="live")
    tools = Tools()
    make_agent(capability, tools, model=no_model).run_sync(
        "compute", model=model, capabilities=[model.capability]
    )
    assert tools.calls == 4 and model.cursor.finished


# -- divergence ------------------------------------------------------------------------------------


def replay_diverges(agent: Agent[None, str], model: ReplayModel) -> str:
    with pytest.raises(ReplayDiverged) as raised:
        agent.run_sync("compute", model=model, capabilities=[model.capability])
    divergence = raised.value.divergence
    return f"{divergence.turn_index} {divergence.what}"


def test_another_system_prompt_diverges_at_the_first_turn(
    capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id)
    agent = make_agent(capability, Tools(), model=no_model, system="You are a poet.")
    assert replay_diverges(agent, model) == "0 system_prompt"
    assert "You are a poet." in str(model.cursor.divergence and model.cursor.divergence.describe())


def test_another_tool_diverges_at_the_first_turn(
    capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original

    def mul(a: int, b: int) -> int:
        """Multiply two numbers."""
        return a * b

    model = ReplayModel(session, loop.loop_id)
    agent = make_agent(capability, Tools(), model=no_model, extra=[mul])
    assert replay_diverges(agent, model) == "0 tools"
    assert model.cursor.divergence is not None and "mul" in model.cursor.divergence.detail


def test_another_tool_result_diverges_at_the_turn_that_reads_it(
    capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id, tools="live")
    agent = make_agent(capability, Tools(prefix="no value for"), model=no_model)
    assert replay_diverges(agent, model) == "1 messages"
    divergence = model.cursor.divergence
    assert divergence is not None and divergence.loop_id == loop.loop_id
    assert "value of a" in str(divergence.expected) and "no value for a" in str(divergence.actual)


def test_on_divergence_fallback_hands_the_run_to_the_fallback_model(
    recorder: SessionRecorder, capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original

    def fallback(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("from the fallback")])

    fallback_model = FunctionModel(fallback, model_name="poet-model")
    model = ReplayModel(session, loop.loop_id, on_divergence="fallback", fallback=fallback_model)
    agent = make_agent(capability, Tools(), model=no_model, system="You are a poet.")
    with model.recording():
        result = agent.run_sync("compute", model=model, capabilities=[model.capability])
    assert result.output == "from the fallback"
    assert model.cursor.divergence is not None and model.cursor.divergence.what == "system_prompt"
    # The replay names its fallback; the turn it took over at is where it differs.
    recorded = session_of(recorder)
    replayed = recorded.loops[-1]
    assert replayed.kind == ContinuationKind.rerun("replay")
    assert replayed.metadata["replay"] == {
        "session_id": session.session_id,
        "loop_id": loop.loop_id,
        "fallback": "poet-model",
    }
    first = diff_loops(recorded, loop.loop_id, recorded, replayed.loop_id).first_divergence
    assert first is not None and first.turn == model.cursor.divergence.turn_index == 0


def test_a_fallback_is_required_to_hand_over(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    with pytest.raises(ValueError, match="fallback"):
        ReplayModel(session, loop.loop_id, until_turn=2)


# -- fork ------------------------------------------------------------------------------------------


def test_a_fork_at_turn_2_replays_two_turns_then_runs_the_other_model(
    recorder: SessionRecorder, capability: PhiCapability, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    seen: list[list[ModelMessage]] = []

    def other(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(list(messages))
        return ModelResponse(
            parts=[TextPart("forked: 3")], usage=RequestUsage(input_tokens=7, output_tokens=2)
        )

    script = ReplayScript.from_session(session, loop.loop_id)
    model = ReplayModel(script, until_turn=2, fallback=FunctionModel(other, model_name="other-model"))
    tools = Tools()
    with model.recording():  # the change defaults to the fallback's model name
        result = make_agent(capability, tools, model=no_model).run_sync(
            "compute", model=model, capabilities=[model.capability]
        )
    assert result.output == "forked: 3" and tools.calls == 0 and len(seen) == 1

    recorded = session_of(recorder)
    _, fork = recorded.loops
    assert fork.kind == ContinuationKind.branch("fork") and fork.parent_loop_id == loop.loop_id
    assert fork.metadata["fork"] == {
        "session_id": session.session_id,
        "loop_id": loop.loop_id,
        "turn_index": 2,
        "change": {"model": "other-model"},
    }
    assert fork.turn_count() == 3
    for turn_index in (0, 1):
        mine, theirs = fork.turns[turn_index], loop.turns[turn_index]
        assert bare([mine.output_message]) == bare([theirs.output_message])  # type: ignore[list-item]
        assert bare(mine.tool_results) == bare(theirs.tool_results)
        assert mine.usage == theirs.usage
    answer = fork.turns[2].output_message
    assert isinstance(answer, AssistantMessage) and answer.model == "other-model"
    # the fork's context: the original's first two turns, then the other model's answer
    diff = diff_loops(recorded, loop.loop_id, recorded, fork.loop_id)
    assert diff.diverged_turns == [2, 3] and diff.first_divergence is not None  # the fork's answer; no turn 3
    assert diff.first_divergence.turn == 2
    context = recorded.context_at(fork.loop_id)
    assert bare(context) == bare([*loop.messages[:5], answer])
    assert isinstance(context[0], UserMessage)


def test_a_fork_past_the_recording_is_refused(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    from phi_session.errors import TurnNotFound

    with pytest.raises(TurnNotFound):
        ReplayModel(session, loop.loop_id, until_turn=4, fallback=FunctionModel(no_model))


def test_the_replay_model_streams_through_run_stream(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    model: Model = ReplayModel(session, loop.loop_id)

    async def first_text() -> str:
        agent = Agent(FunctionModel(no_model), system_prompt=SYSTEM, tools=[Tools().lookup, Tools().add])
        async with agent.run_stream("compute", model=model) as result:
            return await result.get_output()

    # run_stream ends at the first response with text: the recorded first turn
    assert asyncio.run(first_text()) == "let me look"


def test_a_recorded_retry_replays_as_the_same_error_result(recorder: SessionRecorder) -> None:
    calls: list[int] = []

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        calls.append(a)
        if len(calls) == 1:
            raise ModelRetry("try bigger numbers")
        return a + b

    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder, capture_requests=True)], tools=[add])
    agent.run_sync("add")
    script = ReplayScript.from_session(session_of(recorder))
    model = ReplayModel(script)
    with recording_as(replay_lineage(script)):
        agent.run_sync("add", model=model, capabilities=[model.capability])
    original, replayed = session_of(recorder).loops
    assert len(calls) == 2 and model.cursor.finished  # the replay ran no tool
    (error,) = replayed.turns[0].tool_results
    assert error.is_error and error.content[0].text == "try bigger numbers"  # type: ignore[union-attr]
    assert bare(replayed.messages) == bare(original.messages)


def test_a_tool_that_failed_the_run_fails_the_replay_there(recorder: SessionRecorder) -> None:
    calls: list[int] = []

    def boom(x: int) -> int:
        """Explodes."""
        calls.append(x)
        raise RuntimeError("kaboom")

    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder, capture_requests=True)], tools=[boom])
    with pytest.raises(RuntimeError, match="kaboom"):
        agent.run_sync("go")
    (loop,) = session_of(recorder).loops
    assert loop.status == "Aborted" and loop.turn_count() == 1
    model = ReplayModel(session_of(recorder), loop.loop_id)
    # not a retry the model is asked about (an `exhausted` divergence): the recorded error
    with model.recording(), pytest.raises(RecordedToolError, match="boom failed: RuntimeError: kaboom"):
        agent.run_sync("go", model=model, capabilities=[model.capability])
    assert calls == [0] and model.cursor.finished and model.divergence is None
    replayed = session_of(recorder).loops[-1]
    assert replayed.status == "Aborted" and replayed.turn_count() == 1


def test_a_model_failure_that_ended_the_run_fails_the_replay_there(
    recorder: SessionRecorder, capability: PhiCapability
) -> None:
    def failing(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(message, ModelResponse) for message in messages):
            raise RuntimeError("rate limited")  # after the first turn: the provider fails
        return scripted(messages, info)

    tools = Tools()
    with pytest.raises(RuntimeError, match="rate limited"):
        make_agent(capability, tools, model=failing).run_sync("compute")
    (loop,) = session_of(recorder).loops
    assert loop.status == "Aborted" and loop.turns[1].output_message.stop_reason == "error"  # type: ignore[union-attr]
    model = ReplayModel(session_of(recorder), loop.loop_id)
    agent = make_agent(capability, tools, model=no_model)
    # not an empty reply pydantic-ai asks the model again about (an `exhausted` divergence)
    with model.recording(), pytest.raises(RecordedModelError, match="rate limited"):
        agent.run_sync("compute", model=model, capabilities=[model.capability])
    assert tools.calls == 1 and model.cursor.finished and model.divergence is None
    replayed = session_of(recorder).loops[-1]
    assert replayed.status == "Aborted" and replayed.turn_count() == 2


def test_a_conversation_of_two_runs_replays_as_a_chain(recorder: SessionRecorder) -> None:
    agent = Agent(
        TestModel(), capabilities=[PhiCapability(recorder, capture_requests=True)], tools=[Tools().add]
    )

    def conversation(**options: Any) -> None:
        first = agent.run_sync("add", **options)
        agent.run_sync("again", message_history=first.all_messages(), **options)

    conversation()
    first, second = session_of(recorder).loops
    script = ReplayScript.from_session(session_of(recorder), chain=True)
    assert script.loop_ids == (first.loop_id, second.loop_id)
    model = ReplayModel(script)
    with recording_as(replay_lineage(script)):
        conversation(model=model, capabilities=[model.capability])
    assert model.cursor.finished
    _, _, replayed_first, replayed_second = session_of(recorder).loops
    assert (
        replayed_first.kind == ContinuationKind.rerun("replay")
        and replayed_first.parent_loop_id == first.loop_id
    )
    assert (
        replayed_second.parent_loop_id == replayed_first.loop_id
    )  # the conversation goes on from the replay
    assert bare(replayed_second.messages) == bare(second.messages)


def deletion_agent(
    capability: PhiCapability,
    answer: Callable[[list[ModelMessage], AgentInfo], ModelResponse],
    ran: list[str],
) -> Agent[None, Any]:
    """An agent answered by `answer` whose tool delete awaits approval (the paths it
    deleted in `ran`)."""
    agent = Agent(
        FunctionModel(answer, model_name="m"),
        capabilities=[capability],
        output_type=[str, DeferredToolRequests],
        name="ops",
    )

    @agent.tool_plain(requires_approval=True)
    def delete(path: str) -> str:
        ran.append(path)
        return f"deleted {path}"

    return agent


def approval_conversation(capability: PhiCapability, answer: Any, ran: list[str], **options: Any) -> Any:
    """A run whose calls await approval (c1, c2), then the run resuming it: c1 approved (it
    runs), c2 denied; the resumed run's output. `answer`: the model's function (None: the
    scripted one)."""

    def two_deletions(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            calls = [
                ToolCallPart("delete", {"path": p}, tool_call_id=i) for i, p in (("c1", "/a"), ("c2", "/b"))
            ]
            return ModelResponse(parts=calls, usage=RequestUsage(input_tokens=10, output_tokens=2))
        return ModelResponse(parts=[TextPart("done")], usage=RequestUsage(input_tokens=20, output_tokens=3))

    agent = deletion_agent(capability, two_deletions if answer is None else answer, ran)
    first = agent.run_sync("clean up", **options)
    assert isinstance(first.output, DeferredToolRequests)
    approvals = DeferredToolResults(approvals={"c1": True, "c2": False})
    return agent.run_sync(
        message_history=first.all_messages(), deferred_tool_results=approvals, **options
    ).output


@pytest.mark.parametrize("capture", [True, False])
def test_a_conversation_resumed_after_an_approval_replays_the_approved_tools_result(capture: bool) -> None:
    # The approved call's result is the resumed run's (its first turn's input), not the
    # '[deferred: ApprovalRequired]' the interrupted run's loop holds for it: replayed with
    # that placeholder, the resumed run's request diverged ('deleted /a' recorded).
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=capture))
    capability = PhiCapability(recorder, capture_requests=capture)
    ran: list[str] = []
    assert approval_conversation(capability, None, ran) == "done"
    assert ran == ["/a"]
    _, resumed = session_of(recorder).loops
    script = ReplayScript.from_session(session_of(recorder), chain=True)
    model = ReplayModel(script)
    ran.clear()
    with recording_as(replay_lineage(script)):
        output = approval_conversation(
            capability, no_model, ran, model=model, capabilities=[model.capability]
        )
    assert output == "done" and ran == []  # answered from the recording
    assert model.cursor.finished and model.divergence is None
    replayed_resumed = session_of(recorder).loops[-1]
    assert bare(replayed_resumed.messages) == bare(resumed.messages)


def test_the_resumed_run_of_an_approval_replays_alone(
    recorder: SessionRecorder, capability: PhiCapability
) -> None:
    # The default script (the last run) holds no call c1: the resumed run's turn is
    # answered from its own input.
    ran: list[str] = []
    approval_conversation(capability, None, ran)
    model = ReplayModel(session_of(recorder))
    ran.clear()

    def first_run_live(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            calls = [
                ToolCallPart("delete", {"path": p}, tool_call_id=i) for i, p in (("c1", "/a"), ("c2", "/b"))
            ]
            return ModelResponse(parts=calls, usage=RequestUsage(input_tokens=10, output_tokens=2))
        return no_model(messages, info)

    agent = Agent(
        FunctionModel(first_run_live, model_name="m"), output_type=[str, DeferredToolRequests], name="ops"
    )

    @agent.tool_plain(requires_approval=True)
    def delete(path: str) -> str:
        ran.append(path)
        return f"deleted {path}"

    first = agent.run_sync("clean up")
    approvals = DeferredToolResults(approvals={"c1": True, "c2": False})
    with model.recording():
        result = agent.run_sync(
            message_history=first.all_messages(),
            deferred_tool_results=approvals,
            model=model,
            capabilities=[model.capability],
        )
    assert result.output == "done" and ran == []
    assert model.cursor.finished and model.divergence is None


def reused_id_conversation(capability: PhiCapability, ran: list[str], **options: Any) -> Any:
    """Two deletions of /a, each awaiting approval and then approved by a resuming run,
    whose calls the model gave one id (call_0, as some models number their calls per
    response); the last run's output."""

    def delete_then_done(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(part.part_kind == "user-prompt" for part in messages[-1].parts):
            return ModelResponse(parts=[ToolCallPart("delete", {"path": "/a"}, tool_call_id="call_0")])
        return ModelResponse(parts=[TextPart("done")])

    agent = deletion_agent(capability, delete_then_done, ran)
    history: list[ModelMessage] = []
    for prompt in ("one", "two"):
        stopped = agent.run_sync(prompt, message_history=history, **options)
        assert isinstance(stopped.output, DeferredToolRequests)
        approved = DeferredToolResults(approvals={"call_0": True})
        resumed = agent.run_sync(
            message_history=stopped.all_messages(), deferred_tool_results=approved, **options
        )
        history = resumed.all_messages()
    return resumed.output


@pytest.mark.parametrize("capture", [True, False])
def test_a_call_id_used_again_keeps_the_earlier_calls_result_in_a_chain_replay(capture: bool) -> None:
    # The rebuilt request of the last run (no captured request) left out every result of
    # call_0, the first deletion's too: 'message 2 differs'.
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=capture))
    capability = PhiCapability(recorder, capture_requests=capture)
    ran: list[str] = []
    assert reused_id_conversation(capability, ran) == "done" and ran == ["/a", "/a"]
    last = session_of(recorder).loops[-1]
    script = ReplayScript.from_session(session_of(recorder), chain=True)
    model = ReplayModel(script)
    ran.clear()
    with recording_as(replay_lineage(script)):
        output = reused_id_conversation(capability, ran, model=model, capabilities=[model.capability])
    assert output == "done" and ran == []
    assert model.cursor.finished and model.divergence is None
    assert bare(session_of(recorder).loops[-1].messages) == bare(last.messages)


def conditional_approval_conversation(capability: PhiCapability, ran: list[str], **options: Any) -> Any:
    """A deletion run by the tool itself (/a), then one whose tool asks for approval
    (raising ApprovalRequired itself: /b), then the run resuming it, approved; the outputs
    of the stopped run and of the resuming one."""

    def delete_then_done(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = next((p for p in messages[-1].parts if isinstance(p, UserPromptPart)), None)
        if prompt is None:
            return ModelResponse(parts=[TextPart("done")])
        call = ToolCallPart("delete", {"path": prompt.content}, tool_call_id=f"call_{len(messages)}")
        return ModelResponse(parts=[call])

    agent = Agent(
        FunctionModel(delete_then_done, model_name="m"),
        capabilities=[capability],
        output_type=[str, DeferredToolRequests],
        name="ops",
    )

    @agent.tool
    def delete(ctx: RunContext[None], path: str) -> str:
        if ran and not ctx.tool_call_approved:
            raise ApprovalRequired()
        ran.append(path)
        return f"deleted {path}"

    first = agent.run_sync("/a", **options)
    stopped = agent.run_sync("/b", message_history=first.all_messages(), **options)
    if not isinstance(stopped.output, DeferredToolRequests):
        return stopped.output, None
    approved = DeferredToolResults(approvals={call.tool_call_id: True for call in stopped.output.approvals})
    resumed = agent.run_sync(
        message_history=stopped.all_messages(), deferred_tool_results=approved, **options
    )
    return stopped.output, resumed.output


@pytest.mark.parametrize("capture", [True, False])
def test_a_tool_that_asked_for_approval_asks_again_and_the_resuming_run_replays_its_result(
    capture: bool,
) -> None:
    # The stopped run's call was answered with the resuming run's result ('deleted /b'):
    # the stopped run went on to 'done' where it had stopped, with no divergence.
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=capture))
    capability = PhiCapability(recorder, capture_requests=capture)
    ran: list[str] = []
    stopped, resumed = conditional_approval_conversation(capability, ran)
    assert isinstance(stopped, DeferredToolRequests) and resumed == "done" and ran == ["/a", "/b"]
    last = session_of(recorder).loops[-1]
    script = ReplayScript.from_session(session_of(recorder), chain=True)
    model = ReplayModel(script)
    with recording_as(replay_lineage(script)):
        replayed_stopped, replayed_resumed = conditional_approval_conversation(
            capability, ran, model=model, capabilities=[model.capability]
        )
    assert isinstance(replayed_stopped, DeferredToolRequests) and replayed_resumed == "done"
    assert ran == ["/a", "/b"]  # answered from the recording
    assert model.cursor.finished and model.divergence is None
    assert bare(session_of(recorder).loops[-1].messages) == bare(last.messages)
