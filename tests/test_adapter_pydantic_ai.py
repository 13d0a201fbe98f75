"""The pydantic-ai adapter, end to end with pydantic-ai's own test models (offline, no keys)."""

from __future__ import annotations

import asyncio
import logging
import runpy
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

pytest.importorskip(
    "pydantic_ai", reason="needs the pydantic-ai extra: pip install 'phi-session[pydantic-ai]'"
)

from pydantic_ai import (
    Agent,
    CallToolsNode,
    DeferredToolRequests,
    DeferredToolResults,
    ModelRetry,
    RunContext,
    ToolReturn,
)
from pydantic_ai.exceptions import CallDeferred, ToolFailed
from pydantic_ai.messages import (
    BinaryContent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import (
    AgentInfo,
    DeltaThinkingPart,
    DeltaToolCall,
    FunctionModel,
)
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage

from phi_session import Redactor, codec
from phi_session.adapters import pydantic_ai as adapter
from phi_session.adapters.pydantic_ai import PhiCapability, ReplayModel
from phi_session.events import (
    DEFAULT,
    INITIAL,
    AgentStart,
    ContinuationKind,
    MessageEnd,
    MessageUpdate,
    ToolExecutionEnd,
    ToolExecutionStart,
)
from phi_session.messages import (
    AssistantMessage,
    ImageContent,
    TextContent,
    ToolCall,
    ToolResultMessage,
    UserMessage,
)
from phi_session.model import LoopRecord, Session
from phi_session.recorder import SessionRecorder, SessionRecorderConfig
from phi_session.replay.request import summarize
from phi_session.stores.sqlite import SqliteStore


class Answer(BaseModel):
    n: int


def sessions_of(recorder: SessionRecorder) -> list[Session]:
    """Every session recorded, each checked to load back in phi-core's format byte for byte."""
    sessions = recorder.sessions()
    for session in sessions:
        data = codec.encode(session)
        assert codec.encode(codec.decode_session(data)) == data
    return sessions


def only_loop(recorder: SessionRecorder) -> LoopRecord:
    (session,) = sessions_of(recorder)
    (loop,) = session.loops
    return loop


def tools_agent(capability: PhiCapability, **model: Any) -> Agent[None, str]:
    agent = Agent(TestModel(**model), capabilities=[capability], name="calc")

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        return a + b

    @agent.tool_plain
    def upper(text: str) -> str:
        return text.upper()

    return agent


def text_after_tools(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """One request calling `lookup`, then a text answer."""
    if len(messages) == 1:
        return ModelResponse(
            parts=[TextPart("looking"), ToolCallPart("lookup", {"key": "k"}, tool_call_id="c1")],
            usage=RequestUsage(input_tokens=30, output_tokens=5, cache_read_tokens=10),
            finish_reason="tool_call",
        )
    return ModelResponse(
        parts=[TextPart("found it")],
        usage=RequestUsage(input_tokens=40, output_tokens=3),
        finish_reason="stop",
        model_name="fn-model",
        provider_name="fn-provider",
    )


# -- tools, usage, the message shapes ----------------------------------------------------------------


def test_a_run_with_tools_is_one_loop_with_a_turn_per_model_request() -> None:
    recorder = SessionRecorder()
    agent = tools_agent(PhiCapability(recorder))
    result = agent.run_sync("hello")

    loop = only_loop(recorder)
    assert loop.status == "Completed" and loop.continuation_kind == INITIAL
    assert loop.config is not None and (loop.config.model, loop.config.provider, loop.config.name) == (
        "test",
        "test",
        "calc",
    )
    assert [turn.triggered_by for turn in loop.turns] == ["User", "Continuation"]
    user, call, *results, answer = loop.messages
    assert isinstance(user, UserMessage) and user.content[0].text == "hello"  # type: ignore[union-attr]
    assert isinstance(call, AssistantMessage) and call.stop_reason == "toolUse"
    calls = [block for block in call.content if isinstance(block, ToolCall)]
    assert [(c.id, c.name) for c in calls] == [
        ("pyd_ai_tool_call_id__add", "add"),
        ("pyd_ai_tool_call_id__upper", "upper"),
    ]
    # The two tools run concurrently: their results are recorded in the order they finish.
    assert sorted((r.tool_call_id, r.content[0].text, r.is_error) for r in results) == [  # type: ignore[union-attr]
        ("pyd_ai_tool_call_id__add", "0", False),
        ("pyd_ai_tool_call_id__upper", "A", False),
    ]
    assert all(isinstance(r, ToolResultMessage) for r in results)
    assert isinstance(answer, AssistantMessage) and answer.stop_reason == "stop"
    assert answer.content[0].text == result.output  # type: ignore[union-attr]
    # Usage is each response's own, and the loop's the sum of them.
    responses = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    assert [m.usage.input for m in (call, answer)] == [r.usage.input_tokens for r in responses]
    assert loop.usage.output == sum(r.usage.output_tokens for r in responses)


def test_every_run_of_an_agent_announces_one_config_snapshot() -> None:
    # One object for all of them: its loop-id segment and redacted form are derived once.
    events: list[Any] = []
    agent = tools_agent(PhiCapability(events.append))
    agent.run_sync("one")
    agent.run_sync("two")
    first, second = (event.config_snapshot for event in events if isinstance(event, AgentStart))
    assert first is second and first.name == "calc"


def test_request_usage_model_provider_and_finish_reason_come_from_the_response() -> None:
    recorder = SessionRecorder()
    agent = Agent(FunctionModel(text_after_tools), capabilities=[PhiCapability(recorder)])

    @agent.tool_plain
    def lookup(key: str) -> str:
        return f"value of {key}"

    result = agent.run_sync("find k")
    loop = only_loop(recorder)
    first, second = (m for m in loop.messages if isinstance(m, AssistantMessage))
    responses = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    # pydantic-ai's input tokens include the cache reads; phi-core counts them apart.
    assert (first.usage.input, first.usage.cache_read, first.usage.output, first.usage.total_tokens) == (
        20,
        10,
        5,
        35,
    )
    assert first.stop_reason == "toolUse" and first.content[0].text == "looking"  # type: ignore[union-attr]
    assert first.provider == "function"  # the response names none: the model's system
    assert [m.model for m in (first, second)] == [r.model_name for r in responses]
    assert (second.provider, second.stop_reason) == ("fn-provider", "stop")


# -- continuation and hand-off --------------------------------------------------------------------------


def test_a_second_run_in_the_conversation_continues_the_first_runs_loop() -> None:
    recorder = SessionRecorder()
    agent = tools_agent(PhiCapability(recorder))
    first = agent.run_sync("one")
    second = agent.run_sync("two", message_history=first.all_messages())
    assert second.conversation_id == first.conversation_id

    (session,) = sessions_of(recorder)
    assert session.session_id == first.conversation_id
    one, two = session.loops
    assert (two.parent_loop_id, two.continuation_kind) == (one.loop_id, DEFAULT)
    assert two.turns[0].triggered_by == "Continuation"
    prompt = two.messages[0]
    assert isinstance(prompt, UserMessage) and prompt.content[0].text == "two"  # type: ignore[union-attr]


def test_a_hand_off_to_another_agent_in_the_conversation_continues_its_loop() -> None:
    # pydantic-ai's hand-off is programmatic: the next agent runs on the conversation so far.
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)
    triage = Agent(TestModel(custom_output_text="to billing"), capabilities=[capability], name="triage")
    billing = Agent(TestModel(custom_output_text="refunded"), capabilities=[capability], name="billing")
    first = triage.run_sync("refund please")
    billing.run_sync("go on", message_history=first.all_messages())

    (session,) = sessions_of(recorder)
    one, two = session.loops
    assert two.parent_loop_id == one.loop_id and two.continuation_kind == DEFAULT
    assert (one.config.name, two.config.name) == ("triage", "billing")  # type: ignore[union-attr]


def texts_sent(messages: list[ModelMessage]) -> list[str]:
    """The prompts and answers of a pydantic-ai history, in order."""
    return [
        part.content
        for message in messages
        for part in message.parts
        if isinstance(part, (UserPromptPart, TextPart)) and isinstance(part.content, str)
    ]


def texts_recorded(messages: Sequence[Any]) -> list[str]:
    return [
        block.text
        for message in messages
        if isinstance(message, (UserMessage, AssistantMessage))
        for block in message.content
        if isinstance(block, TextContent)
    ]


def test_a_run_going_on_from_an_earlier_runs_end_is_a_branch_of_that_runs_loop() -> None:
    recorder = SessionRecorder()
    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder)])
    one = agent.run_sync("one")
    two = agent.run_sync("two", message_history=one.all_messages())
    three = agent.run_sync("three", message_history=two.all_messages())
    four = agent.run_sync("four", message_history=one.all_messages())  # rewound to the first run
    five = agent.run_sync("five", message_history=four.all_messages())  # goes on from the last loop
    six = agent.run_sync("six", message_history=three.all_messages())

    (session,) = sessions_of(recorder)
    loops = {loop.messages[0].content[0].text: loop for loop in session.loops}  # type: ignore[union-attr]
    lineage = {
        prompt: (loops[parent].messages[0].content[0].text if parent else None, loop.continuation_kind)  # type: ignore[union-attr]
        for prompt, loop in loops.items()
        for parent in [next((k for k, v in loops.items() if v.loop_id == loop.parent_loop_id), None)]
    }
    assert lineage == {
        "one": (None, INITIAL),
        "two": ("one", DEFAULT),
        "three": ("two", DEFAULT),
        "four": ("one", ContinuationKind.branch(one.run_id)),
        "five": ("four", DEFAULT),
        "six": ("three", ContinuationKind.branch(three.run_id)),
    }
    assert loops["four"].turns[0].triggered_by == "Branch"
    for prompt, run in [("four", four), ("five", five), ("six", six)]:
        # What the model was sent, and answered: the loop's context in the session.
        assert texts_recorded(session.context_at(loops[prompt].loop_id)) == texts_sent(run.all_messages())


def test_a_history_from_runs_recorded_elsewhere_continues_the_conversations_last_loop() -> None:
    # Its run ids are unknown here (another process, say): the run goes on from the last loop.
    elsewhere = Agent(TestModel(), capabilities=[PhiCapability(SessionRecorder())]).run_sync("one")
    recorder = SessionRecorder()
    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder)])
    two = agent.run_sync("two", message_history=elsewhere.all_messages())
    agent.run_sync("three", message_history=elsewhere.all_messages())
    (session,) = sessions_of(recorder)
    first, second = session.loops
    assert (second.parent_loop_id, second.continuation_kind) == (first.loop_id, DEFAULT)
    assert two.conversation_id == session.session_id


def test_a_history_from_another_conversation_continues_the_runs_own_conversation() -> None:
    # Never a parent in another session: that link is a sub-agent's.
    recorder = SessionRecorder()
    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder)])
    one = agent.run_sync("one")
    other = agent.run_sync("other")
    agent.run_sync("two", message_history=one.all_messages(), conversation_id=other.conversation_id)
    agent.run_sync("three", message_history=one.all_messages(), conversation_id="third")
    sessions = {session.session_id: session for session in sessions_of(recorder)}
    assert len(sessions[one.conversation_id].loops) == 1
    first, second = sessions[other.conversation_id].loops
    assert (second.parent_loop_id, second.continuation_kind) == (first.loop_id, DEFAULT)
    (fresh,) = sessions["third"].loops
    assert (fresh.parent_loop_id, fresh.continuation_kind) == (None, INITIAL)


# -- agent as tool -------------------------------------------------------------------------------------


def test_an_agent_run_inside_a_tool_is_a_sub_agent_linked_both_ways() -> None:
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)
    helper = Agent(TestModel(custom_output_text="42"), capabilities=[capability], name="helper")
    boss = Agent(TestModel(call_tools=["ask"]), capabilities=[capability], name="boss")

    @boss.tool
    async def ask(ctx: RunContext[None], question: str) -> str:
        answer = await helper.run(question, usage=ctx.usage)
        return answer.output

    boss.run_sync("what is the answer?")
    by_name = {s.loops[0].config.name: s for s in sessions_of(recorder)}  # type: ignore[union-attr]
    parent, child = by_name["boss"].loops[0], by_name["helper"].loops[0]
    assert by_name["boss"].session_id != by_name["helper"].session_id
    assert child.parent_loop_id == parent.loop_id
    assert child.turns[0].triggered_by == "SubAgent"
    (result,) = [m for m in parent.messages if isinstance(m, ToolResultMessage)]
    assert result.content[0].text == "42"  # type: ignore[union-attr]
    assert [(ref.child_loop_id, ref.child_session_id) for ref in parent.child_loop_refs] == [
        (child.loop_id, by_name["helper"].session_id)
    ]
    (end,) = [e.event for e in parent.events if isinstance(e.event, ToolExecutionEnd)]
    assert end.child_loop_id == child.loop_id
    spawn = by_name["helper"].parent_spawn_ref
    assert spawn is not None and (spawn.parent_loop_id, spawn.tool_name) == (parent.loop_id, "ask")
    # The parent's usage is its own requests' only, never the sub-agent's tokens too.
    own = [m.usage for m in parent.messages if isinstance(m, AssistantMessage)]
    assert parent.usage.input == sum(u.input for u in own)


def test_a_sub_agent_with_a_capability_of_its_own_is_recorded_by_it() -> None:
    # The helper records into its own recorder, redacting text: so does its run as the
    # boss's sub-agent, the boss's recorder holding only the link to it.
    secret = "my key is sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789ABCD"
    boss_recorder, helper_recorder = SessionRecorder(), SessionRecorder()
    helper = Agent(
        TestModel(custom_output_text="42"),
        name="helper",
        capabilities=[PhiCapability(helper_recorder, redact=Redactor(redact_text=True))],
    )
    boss = Agent(TestModel(call_tools=["ask"]), name="boss", capabilities=[PhiCapability(boss_recorder)])

    @boss.tool
    async def ask(ctx: RunContext[None], question: str) -> str:
        return (await helper.run(secret)).output

    boss.run_sync("q")
    (boss_session,) = sessions_of(boss_recorder)
    (helper_session,) = sessions_of(helper_recorder)
    (parent,), (child,) = boss_session.loops, helper_session.loops
    assert child.parent_loop_id == parent.loop_id and child.turns[0].triggered_by == "SubAgent"
    assert [ref.child_loop_id for ref in parent.child_loop_refs] == [child.loop_id]
    assert "sk-ant-api03" not in codec.encode(helper_session).decode()


# -- failures -----------------------------------------------------------------------------------------


def test_tool_call_arguments_that_are_not_json_are_saved_as_json() -> None:
    # A model (here a function) may hand over arguments as Python data: keys no string.
    def scores(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(
                parts=[ToolCallPart("best", {"scores": {1: 0.5, 2: 0.25}}, tool_call_id="c1")]
            )
        return ModelResponse(parts=[TextPart("1 wins")])

    recorder = SessionRecorder()
    capability = PhiCapability(recorder)
    agent = Agent(FunctionModel(scores), capabilities=[capability])

    @agent.tool_plain
    def best(scores: dict[int, float]) -> int:
        return max(scores, key=scores.__getitem__)

    assert agent.run_sync("which?").output == "1 wins"
    loop = only_loop(recorder)  # encodes the session, as a save does
    (call,) = [block for block in loop.messages[1].content if isinstance(block, ToolCall)]  # type: ignore[union-attr]
    assert call.arguments == {"scores": {"1": 0.5, "2": 0.25}}
    (start,) = [entry.event for entry in loop.events if isinstance(entry.event, ToolExecutionStart)]
    assert start.args == {"scores": {"1": 0.5, "2": 0.25}}
    assert capability.fault_count == 0


def test_model_retry_from_a_tool_is_an_error_result_and_the_run_goes_on() -> None:
    recorder = SessionRecorder()
    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder)])
    attempts = []

    @agent.tool_plain(retries=2)
    def flaky(x: int) -> str:
        attempts.append(x)
        if len(attempts) == 1:
            raise ModelRetry("try a bigger x")
        return "ok"

    agent.run_sync("go")
    loop = only_loop(recorder)
    assert loop.status == "Completed"
    results = [m for m in loop.messages if isinstance(m, ToolResultMessage)]
    assert [(r.is_error, r.content[0].text) for r in results] == [  # type: ignore[union-attr]
        (True, "try a bigger x"),
        (False, "ok"),
    ]


def test_calls_pydantic_ai_answers_itself_get_the_retry_text_as_error_results() -> None:
    # Arguments failing validation, an unknown tool and an invalid output tool call run no
    # tool: their returns are pydantic-ai's own, in the request after the tools step.
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(
                parts=[
                    ToolCallPart("add", {"a": "x", "b": 1}, tool_call_id="bad"),
                    ToolCallPart("nosuch", {}, tool_call_id="unknown"),
                    ToolCallPart("final_result", {"n": "y"}, tool_call_id="out"),
                ]
            )
        return ModelResponse(parts=[ToolCallPart("final_result", {"n": 3}, tool_call_id="out2")])

    recorder = SessionRecorder()
    agent = Agent(FunctionModel(model), output_type=Answer, capabilities=[PhiCapability(recorder)])

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        return a + b

    result = agent.run_sync("go")
    sent = {
        part.tool_call_id: part.model_response_str(wrap_if_error=False)
        for message in result.all_messages()
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    }
    loop = only_loop(recorder)
    first, second = loop.turns
    assert [(r.tool_call_id, r.is_error) for r in first.tool_results] == [
        ("bad", True),
        ("unknown", True),
        ("out", True),
    ]
    for r in first.tool_results:
        assert r.content[0].text == sent[r.tool_call_id]  # type: ignore[union-attr]
    assert "nosuch" in sent["unknown"] and "int_parsing" in sent["bad"]
    assert [(r.tool_call_id, r.is_error) for r in second.tool_results] == [("out2", False)]


def test_a_tool_return_is_recorded_as_the_model_reads_it_and_never_its_metadata() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("look", {}, tool_call_id="c1")])
        return ModelResponse(parts=[TextPart("ok")])

    recorder = SessionRecorder()
    agent = Agent(FunctionModel(model), capabilities=[PhiCapability(recorder)])

    @agent.tool_plain
    def look() -> ToolReturn:
        return ToolReturn(return_value={"v": 1}, content="see also this", metadata={"secret": "s3"})

    agent.run_sync("go")
    _, _, result, extra, _ = only_loop(recorder).messages
    assert isinstance(result, ToolResultMessage) and result.content[0].text == '{"v":1}'  # type: ignore[union-attr]
    # pydantic-ai sends `content` as a user prompt of the next request.
    assert isinstance(extra, UserMessage) and extra.content[0].text == "see also this"  # type: ignore[union-attr]
    assert "s3" not in codec.encode(sessions_of(recorder)[0]).decode()


def test_an_image_a_tool_returns_is_in_its_result_beside_the_text_that_names_it() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("snap", {}, tool_call_id="c1")])
        return ModelResponse(parts=[TextPart("a cat")])

    recorder = SessionRecorder()
    agent = Agent(FunctionModel(model), capabilities=[PhiCapability(recorder)])
    image = BinaryContent(data=b"\x89PNG-bytes", media_type="image/png")

    @agent.tool_plain
    def snap() -> BinaryContent:
        return image

    agent.run_sync("what is this?")
    (result,) = [m for m in only_loop(recorder).messages if isinstance(m, ToolResultMessage)]
    text, picture = result.content
    assert text == TextContent(text=f"See file {image.identifier}.")  # what the model reads
    assert picture == ImageContent(data=image.base64, mime_type="image/png")


def test_a_tool_raising_fails_the_run_and_its_loop_records_why() -> None:
    recorder = SessionRecorder()
    agent = Agent(TestModel(), capabilities=[PhiCapability(recorder)])

    @agent.tool_plain
    def broken(x: int) -> str:
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        agent.run_sync("go")
    loop = only_loop(recorder)
    assert loop.status == "Aborted" and "disk on fire" in (loop.error or "")
    (result,) = [m for m in loop.messages if isinstance(m, ToolResultMessage)]
    assert result.is_error and "disk on fire" in result.content[0].text  # type: ignore[union-attr]


def test_an_exception_in_the_model_ends_the_loop_aborted_and_reaches_the_host_unchanged() -> None:
    recorder = SessionRecorder()
    failure = RuntimeError("provider down")

    def down(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise failure

    agent = Agent(FunctionModel(down), capabilities=[PhiCapability(recorder)])
    with pytest.raises(RuntimeError) as raised:
        agent.run_sync("hi")
    assert raised.value is failure
    loop = only_loop(recorder)
    assert loop.status == "Aborted" and loop.error is not None and "provider down" in loop.error
    (turn,) = loop.turns
    assert turn.output_message is not None and turn.output_message.stop_reason == "error"


def test_an_adapter_fault_is_counted_and_logged_once_and_the_host_never_sees_it(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)
    agent = tools_agent(capability)

    def broken(usage: RequestUsage) -> Any:
        raise RuntimeError("adapter bug")

    monkeypatch.setattr(adapter, "_usage", broken)
    with caplog.at_level(logging.ERROR):
        first = agent.run_sync("hello")
        second = agent.run_sync("again")
    assert first.output == second.output == '{"add":0,"upper":"A"}'
    assert sum("RuntimeError" in r.getMessage() for r in caplog.records) == 1
    assert capability.fault_count == 4  # both responses of both runs
    # The loops still end, with what could be recorded.
    assert all(loop.status == "Completed" for s in sessions_of(recorder) for loop in s.loops)


@pytest.mark.parametrize("stream", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("part", ["_open_run", "_Streams"])
def test_a_fault_finding_the_run_or_wrapping_its_model_never_reaches_the_host(
    monkeypatch: pytest.MonkeyPatch, part: str, stream: bool
) -> None:
    # What every hook does first (a RunContext without `run_id`, in another pydantic-ai,
    # fails there too): a fault, not the host's error.
    def broken(*args: Any) -> Any:
        raise RuntimeError("adapter bug")

    monkeypatch.setattr(adapter, part, broken)
    capability = PhiCapability(SessionRecorder(), stream=stream)
    assert tools_agent(capability).run_sync("hello").output == '{"add":0,"upper":"A"}'
    assert capability.fault_count > 0


@pytest.mark.parametrize("name", ["enter_tool", "leave_tool"])
def test_a_fault_marking_the_running_tool_never_reaches_the_host(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)

    def broken(*args: Any) -> Any:
        raise RuntimeError("adapter bug")

    monkeypatch.setattr(adapter, name, broken)
    assert tools_agent(capability).run_sync("hello").output == '{"add":0,"upper":"A"}'
    assert capability.fault_count == 2  # once per tool
    loop = only_loop(recorder)
    # The tools' results are still recorded.
    assert loop.status == "Completed" and len(loop.turns[0].tool_results) == 2


def test_hooks_pass_what_they_get_through_unchanged() -> None:
    recorder = SessionRecorder()
    seen: list[Any] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("hi")])

    agent = Agent(FunctionModel(model), capabilities=[PhiCapability(recorder)])

    @agent.output_validator
    def keep(output: str) -> str:
        seen.append(output)
        return output

    result = agent.run_sync("x")
    assert result.output == "hi" and seen == ["hi"]
    assert result.all_messages()[-1].parts[0].content == "hi"  # type: ignore[union-attr]


# -- streaming ------------------------------------------------------------------------------------------


async def streamed(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[Any]:
    if len(messages) == 1:
        yield {0: DeltaThinkingPart(content="let me ")}
        yield {0: DeltaThinkingPart(content="see")}
        yield "Calling "
        yield "lookup"
        yield {1: DeltaToolCall(name="lookup", json_args='{"key":', tool_call_id="c1")}
        yield {1: DeltaToolCall(json_args='"k"}')}
    else:
        yield "found "
        yield "it"


def streaming_agent(capability: PhiCapability) -> Agent[None, str]:
    agent = Agent(FunctionModel(text_after_tools, stream_function=streamed), capabilities=[capability])

    @agent.tool_plain
    def lookup(key: str) -> str:
        return f"value of {key}"

    return agent


def test_stream_true_records_text_thinking_and_tool_argument_deltas() -> None:
    recorder = SessionRecorder(include_streaming_events=True)
    result = streaming_agent(PhiCapability(recorder, stream=True)).run_sync("find k")
    assert result.output == "found it"
    loop = only_loop(recorder)
    deltas = [
        (e.event.delta.kind, e.event.delta.delta)
        for e in loop.events  # type: ignore[union-attr]
        if isinstance(e.event, MessageUpdate)
    ]
    assert deltas == [
        ("Thinking", "let me "),
        ("Thinking", "see"),
        ("Text", "Calling "),
        ("Text", "lookup"),
        ("ToolCallDelta", '{"key":'),
        ("ToolCallDelta", '"k"}'),
        ("Text", "found "),
        ("Text", "it"),
    ]
    first = next(m for m in loop.messages if isinstance(m, AssistantMessage))
    assert first.content[-1] == ToolCall(id="c1", name="lookup", arguments={"key": "k"})


def test_streaming_is_opt_in_and_the_whole_message_is_recorded_without_it() -> None:
    recorder = SessionRecorder(include_streaming_events=True)
    streaming_agent(PhiCapability(recorder)).run_sync("find k")  # agent.run: `function`, not streamed
    loop = only_loop(recorder)
    assert not any(isinstance(e.event, MessageUpdate) for e in loop.events)
    assert loop.messages[-1].content[0].text == "found it"  # type: ignore[union-attr]


def test_run_stream_records_the_run_too() -> None:
    recorder = SessionRecorder()
    agent = streaming_agent(PhiCapability(recorder, stream=True))

    async def main() -> str:
        async with agent.run_stream("find k") as run:  # its output is the first text streamed
            return await run.get_output()

    assert asyncio.run(main()) == "Calling lookup"
    loop = only_loop(recorder)
    assert loop.status == "Completed"
    answer = [m for m in loop.messages if isinstance(m, AssistantMessage)][-1]
    assert answer.content[-2].text == "Calling lookup"  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
def test_run_stream_records_the_output_tools_return_as_agent_run_does(stream: bool) -> None:
    # run_stream answers the output tool call outside the hooks (no tools step runs).
    recorder = SessionRecorder()
    agent = Agent(TestModel(), output_type=Answer, capabilities=[PhiCapability(recorder, stream=stream)])

    async def main() -> Answer:
        async with agent.run_stream("x") as run:
            return await run.get_output()

    assert asyncio.run(main()) == Answer(n=0)
    loop = only_loop(recorder)
    assert loop.status == "Completed" and len(loop.turns) == 1
    call, result = loop.messages[1:]
    assert isinstance(call, AssistantMessage) and call.content[0].name == "final_result"  # type: ignore[union-attr]
    assert isinstance(result, ToolResultMessage) and result.tool_call_id == call.content[0].id  # type: ignore[union-attr]
    assert result.content[0].text == "Final result processed." and not result.is_error  # type: ignore[union-attr]


async def two_calls(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[Any]:
    yield "Calling "
    yield "add"
    yield {1: DeltaToolCall(name="add", json_args='{"a":1,"b":2}', tool_call_id="c1")}
    yield {2: DeltaToolCall(name="add", json_args='{"a":3,"b":4}', tool_call_id="c2")}


@pytest.mark.parametrize("stream", [False, True])
def test_run_stream_ends_the_reply_before_the_tools_it_called_run(stream: bool) -> None:
    # run_stream runs the tools before `after_model_request` sees the response.
    recorder, events = SessionRecorder(), list[Any]()
    agent = Agent(
        FunctionModel(text_after_tools, stream_function=two_calls),
        capabilities=[PhiCapability([recorder, events.append], stream=stream)],
    )

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        return a + b

    async def main() -> str:
        async with agent.run_stream("go") as run:
            return await run.get_output()

    assert asyncio.run(main()) == "Calling add"
    (reply_end,) = [
        i
        for i, e in enumerate(events)
        if isinstance(e, MessageEnd) and isinstance(e.message, AssistantMessage)
    ]
    assert reply_end < min(i for i, e in enumerate(events) if isinstance(e, ToolExecutionStart))
    loop = only_loop(recorder)
    (reply,) = [m for m in loop.messages if isinstance(m, AssistantMessage)]
    assert reply.content[0] == TextContent(text="Calling add")
    assert [c.id for c in reply.content[1:]] == ["c1", "c2"]  # type: ignore[union-attr]
    assert reply.usage.output > 0 and loop.turns[0].usage == reply.usage  # counted once
    # The two calls run concurrently (in worker threads): their results come in either order.
    assert sorted(m.tool_call_id for m in loop.messages if isinstance(m, ToolResultMessage)) == ["c1", "c2"]


def returns_in_history(messages: list[ModelMessage]) -> dict[str, str]:
    """What pydantic-ai's history answers each tool call with, as the model reads it."""
    return {
        part.tool_call_id: part.model_response_str(wrap_if_error=False)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    }


def recorded_results(loop: LoopRecord) -> dict[str, str]:
    return {m.tool_call_id: m.content[0].text for m in loop.messages if isinstance(m, ToolResultMessage)}  # type: ignore[union-attr]


# A last response calling a function tool, the output tool twice and a tool needing approval.
ENDING_CALLS = [
    ToolCallPart("add", {"a": 1, "b": 2}, tool_call_id="a1"),
    ToolCallPart("final_result", {"n": 3}, tool_call_id="o1"),
    ToolCallPart("final_result", {"n": 4}, tool_call_id="o2"),
    ToolCallPart("delete", {"path": "/a"}, tool_call_id="d1"),
]


def ending_calls(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=ENDING_CALLS)


async def ending_calls_streamed(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[Any]:
    for index, call in enumerate(ENDING_CALLS):
        yield {
            index: DeltaToolCall(
                name=call.tool_name, json_args=call.args_as_json_str(), tool_call_id=call.tool_call_id
            )
        }


def run_to_the_end(agent: Agent[None, Any], runner: str, prompt: str = "go") -> list[ModelMessage]:
    """The history pydantic-ai hands the caller, of `agent.run` or of a `run_stream` read whole."""
    if runner == "run":
        return agent.run_sync(prompt).all_messages()

    async def main() -> list[ModelMessage]:
        async with agent.run_stream(prompt) as run:
            await run.get_output()
        return run.all_messages()

    return asyncio.run(main())


@pytest.mark.parametrize("runner", ["run", "run_stream"])
@pytest.mark.parametrize("strategy", ["early", "graceful", "exhaustive"])
def test_every_call_of_the_last_response_gets_the_result_pydantic_ai_gave_it(
    strategy: str, runner: str
) -> None:
    # run_stream answers the calls it did not run in the history it hands the caller only.
    recorder = SessionRecorder()
    agent = Agent(
        FunctionModel(ending_calls, stream_function=ending_calls_streamed),
        output_type=Answer,
        end_strategy=strategy,  # type: ignore[arg-type]
        capabilities=[PhiCapability(recorder)],
    )

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        return a + b

    @agent.tool_plain(requires_approval=True)
    def delete(path: str) -> str:
        return path

    history = run_to_the_end(agent, runner)
    assert set(returns_in_history(history)) == {"a1", "o1", "o2", "d1"}
    assert recorded_results(only_loop(recorder)) == returns_in_history(history)


@pytest.mark.parametrize("runner", ["run", "run_stream"])
def test_a_call_handed_back_to_the_caller_gets_a_result_saying_so_under_run_stream_too(runner: str) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart("delete", {"path": "/a"}, tool_call_id="c1")])

    async def streamed(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[Any]:
        yield {0: DeltaToolCall(name="delete", json_args='{"path": "/a"}', tool_call_id="c1")}

    recorder = SessionRecorder()
    agent = Agent(
        FunctionModel(model, stream_function=streamed),
        output_type=[str, DeferredToolRequests],
        capabilities=[PhiCapability(recorder)],
    )

    @agent.tool_plain(requires_approval=True)
    def delete(path: str) -> str:
        return path

    history = run_to_the_end(agent, runner)
    assert returns_in_history(history) == {}  # it waits for the caller's result
    assert recorded_results(only_loop(recorder)) == {"c1": "[deferred: ApprovalRequired]"}


# -- concurrency ---------------------------------------------------------------------------------------


def test_concurrent_runs_on_one_capability_are_kept_apart() -> None:
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)

    def slow_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = messages[0].parts[-1].content  # type: ignore[union-attr]
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("wait", {"tag": prompt}, tool_call_id=f"call-{prompt}")])
        return ModelResponse(parts=[TextPart(f"done {prompt}")])

    agent = Agent(FunctionModel(slow_model), capabilities=[capability])

    @agent.tool_plain
    async def wait(tag: str) -> str:
        await asyncio.sleep(0.01)  # both runs are inside a tool at once
        return tag

    async def main() -> list[str]:
        results = await asyncio.gather(agent.run("a"), agent.run("b"))
        return [r.output for r in results]

    assert asyncio.run(main()) == ["done a", "done b"]
    sessions = sessions_of(recorder)
    assert len(sessions) == 2
    for session in sessions:
        (loop,) = session.loops
        tag = loop.messages[0].content[0].text  # type: ignore[union-attr]
        ids = [m.tool_call_id for m in loop.messages if isinstance(m, ToolResultMessage)]
        assert ids == [f"call-{tag}"]
        assert loop.messages[-1].content[0].text == f"done {tag}"  # type: ignore[union-attr]


def test_concurrent_runs_given_the_same_run_id_are_kept_apart() -> None:
    recorder = SessionRecorder()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = messages[0].parts[-1].content  # type: ignore[union-attr]
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("wait", {"tag": prompt}, tool_call_id=f"call-{prompt}")])
        return ModelResponse(parts=[TextPart(f"done {prompt}")])

    agent = Agent(FunctionModel(model), capabilities=[PhiCapability(recorder)])

    @agent.tool_plain
    async def wait(tag: str) -> str:
        await asyncio.sleep(0.01)  # both runs are inside a tool at once
        return tag

    async def main() -> None:
        await asyncio.gather(agent.run("a", run_id="request-1"), agent.run("b", run_id="request-1"))

    asyncio.run(main())
    loops = [loop for session in sessions_of(recorder) for loop in session.loops]
    assert len(loops) == 2
    for loop in loops:
        tag = loop.messages[0].content[0].text  # type: ignore[union-attr]
        ids = [m.tool_call_id for m in loop.messages if isinstance(m, ToolResultMessage)]
        assert ids == [f"call-{tag}"]
        assert loop.messages[-1].content[0].text == f"done {tag}"  # type: ignore[union-attr]


# -- the capability itself --------------------------------------------------------------------------------


def test_a_run_level_capability_replaces_the_agents_instead_of_recording_twice() -> None:
    agent_level, run_level = SessionRecorder(), SessionRecorder()
    agent = tools_agent(PhiCapability(agent_level))
    agent.run_sync("x", capabilities=[PhiCapability(run_level)])
    assert agent_level.sessions() == [] and len(sessions_of(run_level)) == 1


def test_two_capabilities_in_one_list_record_with_the_last_and_a_warning_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PhiCapability, "_reported_duplicates", False)  # once per process
    first, last = SessionRecorder(), SessionRecorder()
    agent = Agent(TestModel(), capabilities=[PhiCapability(first), PhiCapability(last)])
    with caplog.at_level(logging.WARNING, logger="phi_session"):
        agent.run_sync("x")
        agent.run_sync("y")
    assert first.sessions() == [] and len(sessions_of(last)) == 2
    [warning] = [r.getMessage() for r in caplog.records if "PhiCapability" in r.getMessage()]
    assert "only the last records" in warning and "list of sinks" in warning


def test_stream_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="stream"):
        PhiCapability(stream="yes")  # type: ignore[arg-type]


def test_an_output_tool_call_gets_the_return_pydantic_ai_made_for_it() -> None:
    recorder = SessionRecorder()
    agent = Agent(TestModel(), output_type=Answer, capabilities=[PhiCapability(recorder)])
    assert agent.run_sync("x").output == Answer(n=0)
    loop = only_loop(recorder)
    call, result = loop.messages[1:]
    assert isinstance(call, AssistantMessage) and call.content[0].name == "final_result"  # type: ignore[union-attr]
    assert isinstance(result, ToolResultMessage) and result.tool_call_id == call.content[0].id  # type: ignore[union-attr]
    assert result.content[0].text == "Final result processed." and not result.is_error  # type: ignore[union-attr]


def test_tool_failed_is_an_error_result_and_a_deferred_call_a_result_saying_so() -> None:
    recorder = SessionRecorder()
    agent = Agent(
        TestModel(), capabilities=[PhiCapability(recorder)], output_type=[str, DeferredToolRequests]
    )

    @agent.tool_plain
    def gone(x: int) -> str:
        raise ToolFailed("no such record")

    @agent.tool_plain
    def pay(x: int) -> str:
        raise CallDeferred()

    result = agent.run_sync("go")
    assert isinstance(result.output, DeferredToolRequests)
    results = {m.tool_name: m for m in only_loop(recorder).messages if isinstance(m, ToolResultMessage)}
    assert results["gone"].is_error and results["gone"].content[0].text == "no such record"  # type: ignore[union-attr]
    assert not results["pay"].is_error and "CallDeferred" in results["pay"].content[0].text  # type: ignore[union-attr]


def test_deferred_calls_get_a_result_saying_so_and_the_resumed_run_their_results() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(
                parts=[
                    ToolCallPart("delete", {"path": "/a"}, tool_call_id="c1"),
                    ToolCallPart("delete", {"path": "/b"}, tool_call_id="c2"),
                ]
            )
        return ModelResponse(parts=[TextPart("done")])

    recorder = SessionRecorder()
    agent = Agent(
        FunctionModel(model), capabilities=[PhiCapability(recorder)], output_type=[str, DeferredToolRequests]
    )

    @agent.tool_plain(requires_approval=True)  # never reaches a tool hook in the first run
    def delete(path: str) -> str:
        return f"deleted {path}"

    first = agent.run_sync("clean up")
    assert isinstance(first.output, DeferredToolRequests)
    # The resumed run runs the approved tool before any model request.
    approvals = DeferredToolResults(approvals={"c1": True, "c2": False})
    agent.run_sync(message_history=first.all_messages(), deferred_tool_results=approvals)
    handed_back, resumed = sessions_of(recorder)[0].loops
    texts = [
        (m.tool_call_id, m.content[0].text) for m in handed_back.messages if isinstance(m, ToolResultMessage)
    ]  # type: ignore[union-attr]
    assert texts == [("c1", "[deferred: ApprovalRequired]"), ("c2", "[deferred: ApprovalRequired]")]
    # Its returns go in before its first turn's reply, as in the request the model gets.
    c1, c2, answer = resumed.messages
    assert isinstance(c1, ToolResultMessage) and c1.content[0].text == "deleted /a"  # type: ignore[union-attr]
    assert isinstance(c2, ToolResultMessage) and c2.content[0].text == "The tool call was denied."  # type: ignore[union-attr]
    assert isinstance(answer, AssistantMessage) and answer.content[0].text == "done"  # type: ignore[union-attr]


def test_a_run_going_on_after_the_capability_closed_under_it_is_no_fault() -> None:
    started, proceed = threading.Event(), threading.Event()
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)
    agent = Agent(TestModel(), capabilities=[capability])

    @agent.tool_plain
    def wait(x: int) -> int:
        started.set()
        proceed.wait(10)
        return x

    run = threading.Thread(target=agent.run_sync, args=("go",))
    run.start()
    assert started.wait(10)
    capability.close()
    proceed.set()  # the tool returns and the model is asked again, after the close
    run.join()
    loop = only_loop(recorder)
    assert (loop.status, loop.error) == ("Aborted", "the pydantic-ai adapter was closed during the run")
    assert capability.fault_count == 0


def test_a_run_left_early_ends_its_loop_aborted() -> None:
    recorder = SessionRecorder()
    agent = tools_agent(PhiCapability(recorder))

    async def main() -> None:
        async with agent.iter("x") as run:
            async for node in run:
                if isinstance(node, CallToolsNode):
                    break

    asyncio.run(main())
    loop = only_loop(recorder)
    assert loop.status == "Aborted" and loop.error is not None


async def first_words_then_nothing(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    yield "The answer "
    await asyncio.Event().wait()  # the rest never comes: only the caller leaving ends the stream
    yield "is 42."


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_stream_left_before_its_response_is_read_cuts_the_reply_off(stream: bool) -> None:
    # The reply was recorded as a whole one (`stop`) with the words streamed so far.
    recorder = SessionRecorder()
    model = FunctionModel(text_after_tools, stream_function=first_words_then_nothing)
    agent = Agent(model, capabilities=[PhiCapability(recorder, stream=stream)])

    async def main() -> None:
        async with agent.run_stream("what is the answer?"):
            pass  # left without reading the output

    asyncio.run(main())
    loop = only_loop(recorder)
    assert loop.status == "Aborted" and loop.error is not None
    (turn,) = loop.turns
    reply = turn.output_message
    assert isinstance(reply, AssistantMessage) and reply.content == (TextContent(text="The answer "),)
    assert reply.stop_reason == "aborted" and reply.error_message
    assert loop.messages[-1] == reply


async def two_words_then_nothing(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    yield "partial "
    yield "text "
    await asyncio.Event().wait()  # the rest never comes: only the run's end ends the stream
    yield "never"


async def cancelled_while_reading(agent: Agent[None, str]) -> tuple[str, Any]:
    """What the caller of a `run_stream` read before the task running it was cancelled, and
    the usage pydantic-ai counted."""
    read: list[str] = []
    runs: list[Any] = []

    async def read_text() -> None:
        async with agent.run_stream("go") as run:
            runs.append(run)
            async for delta in run.stream_text(delta=True, debounce_by=None):
                read.append(delta)
                if len(read) == 2:
                    asyncio.current_task().cancel()  # type: ignore[union-attr]

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(read_text())
    return "".join(read), runs[0].usage


async def left_at_the_first_delta(agent: Agent[None, str]) -> tuple[str, Any]:
    """What the caller of `run_stream_events` saw before leaving at its first text delta,
    and the usage pydantic-ai counted."""
    read = ""
    async with agent.run_stream_events("go") as events:
        async for event in events:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                read += event.part.content
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                read += event.delta.content_delta
                break
    return read, events.usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("cut_off", [cancelled_while_reading, left_at_the_first_delta])
def test_a_reply_cut_off_by_the_runs_end_keeps_what_came_and_its_usage(cut_off: Any, stream: bool) -> None:
    # No hook sees such a response: it is the model's stream, as the run ended.
    recorder = SessionRecorder()
    agent = Agent(
        FunctionModel(stream_function=two_words_then_nothing),
        capabilities=[PhiCapability(recorder, stream=stream)],
    )
    read, usage = asyncio.run(cut_off(agent))
    assert read == "partial text "
    loop = only_loop(recorder)
    assert loop.status == "Aborted" and loop.error is not None
    (turn,) = loop.turns
    reply = turn.output_message
    assert isinstance(reply, AssistantMessage) and reply.content == (TextContent(text=read),)
    assert reply.stop_reason == "aborted" and reply.error_message
    assert (reply.usage.input, reply.usage.output) == (usage.input_tokens, usage.output_tokens) != (0, 0)
    assert reply.provider == agent.model.system  # type: ignore[union-attr]
    assert loop.messages[-1] == reply


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_whose_stream_failed_keeps_what_came_and_its_usage(stream: bool) -> None:
    async def two_words_then_a_failure(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "partial "
        yield "text "
        raise ConnectionResetError("reset by peer")

    recorder = SessionRecorder()
    agent = Agent(
        FunctionModel(stream_function=two_words_then_a_failure),
        capabilities=[PhiCapability(recorder, stream=stream)],
    )
    runs: list[Any] = []

    async def main() -> None:
        async with agent.run_stream("go") as run:
            runs.append(run)
            async for _ in run.stream_text(delta=True, debounce_by=None):
                pass

    with pytest.raises(ConnectionResetError):
        asyncio.run(main())
    (turn,) = only_loop(recorder).turns
    reply = turn.output_message
    assert isinstance(reply, AssistantMessage) and reply.content == (TextContent(text="partial text "),)
    assert (reply.stop_reason, reply.error_message) == ("error", "ConnectionResetError: reset by peer")
    usage = runs[0].usage
    assert (reply.usage.input, reply.usage.output) == (usage.input_tokens, usage.output_tokens) != (0, 0)


# -- the embedded store, restarts, the extra --------------------------------------------------------------


def test_by_default_sessions_go_to_the_embedded_store_and_continue_after_a_restart(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PHI_SESSION_STORE", str(tmp_path / "sessions.db"))
    first_process = PhiCapability()
    first = tools_agent(first_process).run_sync("one")
    first_process.close()

    restarted = PhiCapability()  # a new process: the conversation's last loop is in the store
    tools_agent(restarted).run_sync("two", message_history=first.all_messages())
    restarted.close()

    with SqliteStore(tmp_path / "sessions.db") as store:
        session = store.load(first.conversation_id)
    data = codec.encode(session)
    assert codec.encode(codec.decode_session(data)) == data
    one, two = session.loops
    assert (two.parent_loop_id, two.continuation_kind) == (one.loop_id, DEFAULT)
    assert one.loop_id.endswith(".1") and two.loop_id.endswith(".2")  # loop ids never repeat


def test_without_the_extra_the_import_names_the_pip_install() -> None:
    code = (
        "import sys; sys.modules['pydantic_ai'] = None\n"
        "import phi_session, phi_session.adapters\n"
        "try:\n    import phi_session.adapters.pydantic_ai\n"
        "except ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MissingExtra") and "pip install 'phi-session[pydantic-ai]'" in out


def test_the_example_runs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "adapter_pydantic_ai.py"
    monkeypatch.setattr(sys, "argv", [example.name, str(tmp_path / "out")])
    runpy.run_path(str(example), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"wrote {tmp_path / 'out'}/"
    assert len(lines) == 4 and all(" Completed " in line for line in lines[:3])
    assert sum(" <- " in line for line in lines) == 2  # the follow-up and the sub-agent


def test_max_idle_sessions_reaches_the_core_and_is_checked() -> None:
    capability = PhiCapability([SessionRecorder()], max_idle_sessions=3)
    assert capability._core.max_idle_sessions == 3
    with pytest.raises(ValueError, match="max_idle_sessions"):
        PhiCapability([SessionRecorder()], max_idle_sessions=-1)


@pytest.mark.parametrize("redact", [True, False])
def test_redaction_and_processors_are_the_tracers(redact: bool) -> None:
    secret = "sk-" + "x" * 32

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("lookup", {"key": secret}, tool_call_id="c1")])
        return ModelResponse(parts=[TextPart("done")])

    seen: list[str] = []

    def note(event: Any) -> Any:
        seen.append(type(event).__name__)
        return event

    recorder = SessionRecorder()
    agent = Agent(
        FunctionModel(model), capabilities=[PhiCapability(recorder, redact=redact, processors=[note])]
    )

    @agent.tool_plain
    def lookup(key: str) -> str:
        return "found"

    agent.run_sync("go")
    loop = only_loop(recorder)
    (call,) = [
        b
        for m in loop.messages
        if isinstance(m, AssistantMessage)
        for b in m.content
        if isinstance(b, ToolCall)
    ]
    assert (secret in str(call.arguments)) is not redact
    assert seen[0] == "AgentStart" and seen[-1] == "AgentEnd"


# -- histories that are not an earlier run's messages -------------------------------------------------


def lookup_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A lookup of each prompt (the last request's first), then an answer."""
    prompts = [p.content for p in messages[-1].parts if isinstance(p, UserPromptPart)]
    if prompts:
        call = ToolCallPart("lookup", {"key": str(prompts[0])}, tool_call_id=f"c{len(messages)}")
        return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=10, output_tokens=2))
    return ModelResponse(
        parts=[TextPart(f"answer {len(messages)}")], usage=RequestUsage(input_tokens=20, output_tokens=3)
    )


def lookup_agent(capability: PhiCapability, model: Any = lookup_model) -> Agent[None, str]:
    async def lookup(key: str) -> str:
        """Look a key up."""
        return f"v({key})"

    return Agent(
        FunctionModel(model, model_name="m"),
        system_prompt="SYS",
        capabilities=[capability],
        name="a",
        tools=[lookup],
    )


def sent_and_context(session: Session, loop: LoopRecord) -> tuple[Any, Any]:
    """The first request the loop's model was sent (captured) and the loop's context up
    to it, as the model sees them."""
    payload = loop.turns[0].request_payload
    assert payload is not None
    context = session.context_at(loop.loop_id)
    return [summarize(m) for m in payload.messages], [summarize(m) for m in context[: len(payload.messages)]]


def test_messages_the_caller_adds_after_a_runs_messages_are_the_next_loops_first_inputs() -> None:
    # They were recorded nowhere: the context of the loop lacked the one message the model
    # was sent beside the run's (12 against 13), and a replay diverged there.
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))
    agent = lookup_agent(PhiCapability(recorder, capture_requests=True))
    one = agent.run_sync("one")
    two = agent.run_sync("two", message_history=one.all_messages())
    note = ModelRequest(parts=[UserPromptPart("note from caller")])
    three = agent.run_sync("three", message_history=[*two.all_messages(), note])
    (session,) = sessions_of(recorder)
    _, second, third = session.loops
    assert (third.parent_loop_id, third.continuation_kind) == (second.loop_id, DEFAULT)
    assert texts_recorded(third.turns[0].input_messages) == ["note from caller", "three"]
    sent, context = sent_and_context(session, third)
    assert sent == context and len(sent) == 10
    assert texts_recorded(session.context_at(third.loop_id)) == texts_sent(three.all_messages())
    # The caller's message is the loop's: a run going on from it is its context exactly.
    four = agent.run_sync("four", message_history=three.all_messages())
    (session,) = sessions_of(recorder)
    fourth = session.loops[-1]
    assert (fourth.parent_loop_id, fourth.continuation_kind) == (third.loop_id, DEFAULT)
    assert texts_recorded(session.context_at(fourth.loop_id)) == texts_sent(four.all_messages())


def test_an_unchanged_agent_given_a_history_the_caller_added_to_replays_without_requests() -> None:
    recorder = SessionRecorder()
    capability = PhiCapability(recorder)
    agent = lookup_agent(capability)
    one = agent.run_sync("one")
    history = [*one.all_messages(), ModelRequest(parts=[UserPromptPart("note from caller")])]
    output = agent.run_sync("two", message_history=history).output
    (session,) = sessions_of(recorder)
    model = ReplayModel(session, session.loops[-1].loop_id)

    def no_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise AssertionError("a replay must not call the agent's model")

    with model.recording():
        replayed = lookup_agent(capability, no_model).run_sync(
            "two", message_history=history, model=model, capabilities=[model.capability]
        )
    assert replayed.output == output and model.cursor.finished and model.divergence is None


@pytest.mark.parametrize("cut", ["new_messages", "last 4", "without its answer"])
def test_a_history_cut_from_a_runs_messages_claims_no_loops_context(
    cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    # It went on from the run's loop as if sent all of it: context 12 where the model was
    # sent 8 (8, 11). No loop's context is such a history: the loop continues none, and says
    # what it was sent besides.
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))
    agent = lookup_agent(PhiCapability(recorder, capture_requests=True))
    one = agent.run_sync("one")
    two = agent.run_sync("two", message_history=one.all_messages())
    history = {
        "new_messages": two.new_messages(),
        "last 4": two.all_messages()[-4:],
        "without its answer": two.all_messages()[:-1],
    }[cut]
    adapter.PhiCapability._reported_history = False
    with caplog.at_level(logging.WARNING, logger="phi_session.adapters"):
        agent.run_sync("three", message_history=history)
        agent.run_sync("four", message_history=history)  # said once
    (session,) = sessions_of(recorder)
    _, second, third, _ = session.loops
    assert (third.parent_loop_id, third.continuation_kind) == (None, INITIAL)
    assert third.metadata["pydantic_ai_unrecorded_history"] == {
        "messages": len(history),
        "last_loop_id": second.loop_id,
    }
    context = session.context_at(third.loop_id)
    assert texts_recorded(context) == ["three", *texts_recorded(third.messages)[1:]]
    payload = third.turns[0].request_payload
    assert payload is not None and len(payload.messages) == len(history) + 1  # the request says what was sent
    warnings = [r.getMessage() for r in caplog.records if "history" in r.getMessage()]
    assert len(warnings) == 1 and "no recorded run's messages" in warnings[0]


def test_a_run_going_on_from_a_run_stream_answering_its_output_tool_continues_its_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # run_stream appends the output tool's return (the run's own) once the stream is read,
    # after the run ended: a history of it went on from no loop, warned of as cut
    # (pydantic_ai_unrecorded_history {'messages': 6}; the run ended with 5).
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))
    agent = Agent(
        TestModel(), output_type=Answer, capabilities=[PhiCapability(recorder, capture_requests=True)]
    )

    async def streamed(history: list[ModelMessage]) -> list[ModelMessage]:
        async with agent.run_stream("two", message_history=history) as run:
            await run.get_output()
        return run.all_messages()

    history = asyncio.run(streamed(agent.run_sync("one").all_messages()))
    adapter.PhiCapability._reported_history = False
    with caplog.at_level(logging.WARNING, logger="phi_session.adapters"):
        agent.run_sync("three", message_history=history)
    (session,) = sessions_of(recorder)
    _, second, third = session.loops
    assert (third.parent_loop_id, third.continuation_kind) == (second.loop_id, DEFAULT)
    assert "pydantic_ai_unrecorded_history" not in (third.metadata or {})
    assert not [r for r in caplog.records if "history" in r.getMessage()]
    sent, context = sent_and_context(session, third)
    assert sent == context and len(sent) == len(history) + 1
