"""The Google ADK adapter (phi_session.adapters.google_adk): ADK runs, offline, into sessions."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import runpy
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("google.adk", reason="needs the google-adk extra: pip install 'phi-session[google-adk]'")

from google.adk.agents import LlmAgent, LoopAgent, ParallelAgent, RunConfig, SequentialAgent
from google.adk.agents.run_config import StreamingMode
from google.adk.apps import App, ResumabilityConfig
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.plugins.base_plugin import BasePlugin
from google.adk.runners import InMemoryRunner
from google.adk.tools import exit_loop
from google.adk.tools.agent_tool import AgentTool
from google.adk.tools.function_tool import FunctionTool
from google.adk.tools.long_running_tool import LongRunningFunctionTool
from google.adk.tools.tool_context import ToolContext
from google.adk.utils.streaming_utils import StreamingResponseAggregator
from google.genai import types
from pydantic import Field

from phi_session import (
    AgentSession,
    FakeClock,
    MessageUpdate,
    SessionRecorder,
    SqliteStore,
    decode_session,
    encode_session,
)
from phi_session.adapters import google_adk
from phi_session.adapters.google_adk import PhiPlugin
from phi_session.model import LoopRecord, Session

# SequentialAgent and ParallelAgent are deprecated in favour of Workflow, yet still ADK's agents.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

Step = Sequence[str | tuple[str, dict[str, Any]]] | BaseException
"""One scripted model response: text and (name, args) function calls, or an error to raise."""


class ScriptedLlm(BaseLlm):
    """A model answering from a script (or from the request, with `reply`), streaming
    each text part as a partial response when asked to, with usage on the final one."""

    script: list[Any] = Field(default_factory=list)
    reply: Callable[[LlmRequest], Step] | None = None
    usage: types.GenerateContentResponseUsageMetadata | None = None  # None: Gemini's, as below
    model_version: str | None = None  # the model the responses name as theirs

    @classmethod
    def of(cls, *steps: Step, reply: Callable[[LlmRequest], Step] | None = None) -> ScriptedLlm:
        return cls(model="scripted-1", script=list(steps), reply=reply)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        step = self.reply(llm_request) if self.reply is not None else self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        parts = [
            types.Part(text=item)
            if isinstance(item, str)
            else types.Part(function_call=types.FunctionCall(name=item[0], args=item[1]))
            for item in step
        ]
        usage = self.usage or types.GenerateContentResponseUsageMetadata(
            prompt_token_count=12,
            cached_content_token_count=2,
            candidates_token_count=5,
            thoughts_token_count=3,
            total_token_count=20,
        )
        if not stream:
            yield LlmResponse(
                content=types.Content(role="model", parts=parts),
                usage_metadata=usage,
                model_version=self.model_version,
            )
            return
        # As Gemini streams: text in partial chunks, then the text as a whole and the
        # calls as final responses of their own, each with the (cumulative) usage.
        text = [part for part in parts if part.text]
        for part in text:
            await asyncio.sleep(0)
            yield LlmResponse(content=types.Content(role="model", parts=[part]), partial=True)
        finals = [group for group in (text, [part for part in parts if not part.text]) if group]
        for group in finals:
            yield LlmResponse(
                content=types.Content(role="model", parts=group), usage_metadata=usage, partial=False
            )


def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


def explode(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"tool failed: {reason}")


class Harness:
    """A plugin into a recorder, and how to run agents with it."""

    def __init__(self, max_idle_sessions: int = 4096, **options: Any) -> None:
        self.recorder = SessionRecorder(**options)
        self.plugin = PhiPlugin(
            [self.recorder],
            agent=AgentSession("adk-agent", clock=FakeClock()),
            max_idle_sessions=max_idle_sessions,
        )

    def runner(self, agent: Any) -> InMemoryRunner:
        return InMemoryRunner(agent=agent, app_name="app", plugins=[self.plugin])

    async def ask(
        self, runner: InMemoryRunner, text: str, *, session_id: str = "s1", stream: bool = False
    ) -> list[Any]:
        service = runner.session_service
        if await service.get_session(app_name="app", user_id="u", session_id=session_id) is None:
            await service.create_session(app_name="app", user_id="u", session_id=session_id)
        config = RunConfig(streaming_mode=StreamingMode.SSE if stream else StreamingMode.NONE)
        message = types.Content(role="user", parts=[types.Part(text=text)])
        return [
            event
            async for event in runner.run_async(
                user_id="u", session_id=session_id, new_message=message, run_config=config
            )
        ]

    def run(self, agent: Any, text: str = "hello", **kwargs: Any) -> list[Any]:
        return asyncio.run(self.ask(self.runner(agent), text, **kwargs))

    def sessions(self) -> list[Session]:
        self.recorder.flush()
        sessions = self.recorder.sessions()
        for session in sessions:  # every session loads back in phi-core's format
            data = encode_session(session)
            assert encode_session(decode_session(data)) == data
        return sessions

    def session(self, session_id: str = "s1") -> Session:
        (session,) = [s for s in self.sessions() if s.session_id == session_id]
        return session


def texts(record: LoopRecord) -> list[tuple[str, str]]:
    """(role, text) of a loop's messages, tool calls as ``call:name`` and results as ``result:text``."""
    roles = {"UserMessage": "user", "AssistantMessage": "assistant", "ToolResultMessage": "toolResult"}
    out: list[tuple[str, str]] = []
    for message in record.messages:
        role = roles[type(message).__name__]
        for block in message.content:
            kind = type(block).__name__
            if kind == "ToolCall":
                out.append((role, f"call:{block.name}"))
            elif kind == "TextContent":
                out.append((role, ("result:" if role == "toolResult" else "") + block.text))
    return out


def test_tools_and_usage_in_one_loop() -> None:
    h = Harness()
    model = ScriptedLlm.of([("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})], ["3 and 7"])
    h.run(LlmAgent(name="calc", model=model, tools=[add]), "add please")
    session = h.session()
    (record,) = session.loops
    assert record.status == "Completed"
    assert record.loop_id == "s1.scriptedllm.scripted-1.1"
    assert record.config is not None and record.config.model == "scripted-1"
    assert record.metadata["framework"] == "google-adk"
    assert texts(record) == [
        ("user", "add please"),
        ("assistant", "call:add"),
        ("assistant", "call:add"),
        ("toolResult", "result:3"),
        ("toolResult", "result:7"),
        ("assistant", "3 and 7"),
    ]
    first, second = record.turns
    calls = [block for block in first.output_message.content if type(block).__name__ == "ToolCall"]
    # The ids ADK gave the calls, on the calls and on their results.
    assert [call.id for call in calls] == [result.tool_call_id for result in first.tool_results]
    assert all(call.id.startswith("adk-") for call in calls)
    assert [call.arguments for call in calls] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert first.output_message.stop_reason == "toolUse" and second.output_message.stop_reason == "stop"
    # Gemini counts the cache in the prompt and the thoughts apart from the candidates.
    usage = second.output_message.usage
    assert (usage.input, usage.output, usage.reasoning, usage.cache_read) == (10, 8, 3, 2)
    assert usage.total_tokens == 20
    assert record.usage.input == 20


@pytest.mark.parametrize("served", [None, "gpt-4o-2024-08-06"])
def test_a_litellm_model_id_is_recorded_without_its_provider_prefix(served: str | None) -> None:
    # 'openai/gpt-4o' was recorded as provider 'openai', model 'openai/gpt-4o': unpriced, and
    # totalled by model under 'openai/openai/gpt-4o'.
    from phi_session.cost import Pricer
    from phi_session.stores.base import usage_rows

    h = Harness()
    model = ScriptedLlm(model="openai/gpt-4o", script=[["hi"]], model_version=served)
    h.run(LlmAgent(name="chat", model=model))
    session = h.session()
    (record,) = session.loops
    assert record.config is not None and (record.config.provider, record.config.model) == ("openai", "gpt-4o")
    reply = record.turns[0].output_message
    assert (reply.provider, reply.model) == ("openai", served or "gpt-4o")
    assert {row.key for row in usage_rows(session, "model")} == {f"openai/{served or 'gpt-4o'}"}
    pricer = Pricer({"openai/gpt-4o": {"input": 2.5, "output": 10}}, use_table=False)
    assert pricer.session(session).known


def _recorded_usage(usage: types.GenerateContentResponseUsageMetadata) -> tuple[int, int, int, int, int]:
    """(input, output, reasoning, cache read, cache write) recorded for one reply with `usage`."""
    h = Harness()
    h.run(LlmAgent(name="a", model=ScriptedLlm(model="openai/o3", script=[["hi"]], usage=usage)))
    recorded = h.session().loops[0].turns[0].output_message.usage
    return recorded.input, recorded.output, recorded.reasoning, recorded.cache_read, recorded.cache_write


def test_reasoning_counted_in_the_candidates_is_not_added_again() -> None:
    # LiteLlm (OpenAI's completion_tokens include the reasoning): total = prompt + candidates.
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=100, candidates_token_count=500, thoughts_token_count=400, total_token_count=600
    )
    assert _recorded_usage(usage) == (100, 500, 400, 0, 0)
    # Gemini (and ADK's Anthropic model): the thoughts apart, in the total.
    apart = usage.model_copy(update={"candidates_token_count": 100})
    assert _recorded_usage(apart) == (100, 500, 400, 0, 0)
    # No total: Gemini's rule.
    assert _recorded_usage(apart.model_copy(update={"total_token_count": None})) == (100, 500, 400, 0, 0)


def anthropic_usage() -> types.GenerateContentResponseUsageMetadata:
    """Usage as ADK's AnthropicLlm (and LiteLlm) give it for input 50, cache read 1000,
    cache write 2000, output 30: the writes in the prompt, and as an attribute of their own."""
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=3050,
        candidates_token_count=30,
        total_token_count=3080,
        cached_content_token_count=1000,
    )
    object.__setattr__(usage, "cache_creation_input_tokens", 2000)
    return usage


def test_cache_writes_anthropic_counts_in_the_prompt_are_not_input() -> None:
    assert _recorded_usage(anthropic_usage()) == (50, 30, 0, 1000, 2000)


def test_a_second_invocation_continues_the_first() -> None:
    h = Harness()
    runner = h.runner(LlmAgent(name="chat", model=ScriptedLlm.of(["one"], ["two"])))

    async def both() -> None:
        await h.ask(runner, "first")
        await h.ask(runner, "second")

    asyncio.run(both())
    first, second = h.session().loops
    assert second.parent_loop_id == first.loop_id
    assert second.continuation_kind is not None and second.continuation_kind.kind == "Default"
    assert texts(second) == [("user", "second"), ("assistant", "two")]


def _answer(call: types.FunctionCall, response: dict[str, Any]) -> types.Content:
    """The user's message answering `call` (a confirmation, a long-running tool's result)."""
    answer = types.FunctionResponse(id=call.id, name=call.name, response=response)
    return types.Content(role="user", parts=[types.Part(function_response=answer)])


async def _resume(runner: InMemoryRunner, message: types.Content) -> None:
    async for _ in runner.run_async(user_id="u", session_id="s1", new_message=message):
        pass


def test_a_confirmed_tool_resumes_with_the_approval_and_the_tools_run() -> None:
    # ADK resumes the invocation (its id, its first prompt as user_content) and runs the
    # approved tool before calling the model again.
    def transfer(amount: int) -> str:
        """Transfers money."""
        return f"sent {amount}"

    h = Harness()
    model = ScriptedLlm.of([("transfer", {"amount": 5})], ["all done"])
    agent = LlmAgent(name="bank", model=model, tools=[FunctionTool(transfer, require_confirmation=True)])
    runner = h.runner(agent)

    async def approve() -> None:
        events = await h.ask(runner, "send 5")
        (ask,) = [c for e in events for c in e.get_function_calls() if c.name == "adk_request_confirmation"]
        await _resume(runner, _answer(ask, {"confirmed": True}))

    asyncio.run(approve())
    asked, resumed = h.session().loops
    assert texts(asked)[0] == ("user", "send 5")
    assert h.plugin.fault_count == 0
    # The approval answers ADK's own call (adk_request_confirmation), which no loop holds
    # and the model is never sent: it is the loop's metadata, naming the call approved.
    assert texts(resumed) == [("toolResult", "result:sent 5"), ("assistant", "all done")]
    (call,) = [b for b in asked.turns[0].output_message.content if type(b).__name__ == "ToolCall"]
    assert resumed.messages[0].tool_call_id == call.id and resumed.messages[0].tool_name == "transfer"
    assert resumed.metadata["adk_tool_confirmations"] == [
        {"tool_call_id": call.id, "tool_name": "transfer", "confirmation": {"confirmed": True}}
    ]


def test_a_tool_confirmed_in_a_parallel_branch_runs_in_that_branchs_resumed_loop() -> None:
    # Resumed, ADK runs the tool in its branch before that branch's model is called.
    def transfer(amount: int) -> str:
        """Transfers money."""
        return f"sent {amount}"

    h = Harness()
    payer = LlmAgent(
        name="pay",
        model=ScriptedLlm.of([("transfer", {"amount": 5})], ["paid"]),
        tools=[FunctionTool(transfer, require_confirmation=True)],
    )
    runner = h.runner(
        ParallelAgent(name="fan", sub_agents=[payer, LlmAgent(name="other", model=ScriptedLlm.of(["O"]))])
    )

    async def approve() -> None:
        events = await h.ask(runner, "send 5")
        (ask,) = [c for e in events for c in e.get_function_calls() if c.name == "adk_request_confirmation"]
        await _resume(runner, _answer(ask, {"confirmed": True}))

    asyncio.run(approve())
    *_, resumed = sorted(h.session().loops, key=lambda r: r.started_at.ns)
    assert resumed.continuation_kind.tag == "fan.pay" and h.plugin.fault_count == 0
    assert texts(resumed) == [("toolResult", "result:sent 5"), ("assistant", "paid")]


def test_a_long_running_tools_result_sent_later_is_the_resumed_loops_input() -> None:
    def ask_manager(amount: int) -> dict[str, str]:
        """Asks a manager to approve a refund."""
        return {"status": "pending"}

    h = Harness()
    asked: list[LlmRequest] = []

    def reply(request: LlmRequest) -> Step:
        asked.append(request)
        return [("ask_manager", {"amount": 5})] if len(asked) == 1 else ["refunded"]

    model = ScriptedLlm.of(reply=reply)
    runner = h.runner(LlmAgent(name="support", model=model, tools=[LongRunningFunctionTool(ask_manager)]))

    async def later() -> None:
        events = await h.ask(runner, "refund 5")
        (call,) = [c for e in events for c in e.get_function_calls()]
        await _resume(runner, _answer(call, {"status": "approved by Bob"}))

    asyncio.run(later())
    *_, resumed = h.session().loops
    assert h.plugin.fault_count == 0
    assert texts(resumed) == [
        ("toolResult", 'result:{"status":"approved by Bob"}'),
        ("assistant", "refunded"),
    ]


def test_streamed_partial_responses_are_message_updates() -> None:
    h = Harness(include_streaming_events=True)
    h.run(LlmAgent(name="streamer", model=ScriptedLlm.of(["Hel", "lo"])), stream=True)
    (record,) = h.session().loops
    deltas = [e.event.delta.delta for e in record.events if isinstance(e.event, MessageUpdate)]
    assert deltas == ["Hel", "lo"]
    assert texts(record) == [("user", "hello"), ("assistant", "Hel"), ("assistant", "lo")]


def test_a_stream_of_text_then_calls_is_one_message_with_the_calls_usage() -> None:
    h = Harness()
    model = ScriptedLlm.of(["Let me ", "add.", ("add", {"a": 2, "b": 2})], ["4"])
    h.run(LlmAgent(name="calc", model=model, tools=[add]), stream=True)
    (record,) = h.session().loops
    first = record.turns[0].output_message
    assert [type(block).__name__ for block in first.content] == ["TextContent", "TextContent", "ToolCall"]
    assert first.stop_reason == "toolUse" and first.usage.total_tokens == 20  # not counted twice
    assert first.content[2].id == record.turns[0].tool_results[0].tool_call_id


class PartialArgsLlm(BaseLlm):
    """Gemini 3 as ADK streams it (progressive SSE, through ADK's own aggregator): a call
    whose arguments arrive as `partial_args`, a string value in two pieces; then a text."""

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        if len(llm_request.contents) > 1:
            yield LlmResponse(content=types.Content(role="model", parts=[types.Part(text="done")]))
            return
        pieces = [
            types.PartialArg(json_path="$.label", string_value="hel", will_continue=True),
            types.PartialArg(json_path="$.label", string_value="lo"),
            types.PartialArg(json_path="$.n", number_value=2),
            types.PartialArg(json_path="$.loud", bool_value=True),
            types.PartialArg(json_path="$.note", null_value="NULL_VALUE"),
        ]
        aggregator = StreamingResponseAggregator()
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            call = types.FunctionCall(
                name="tag" if index == 0 else None, id="c1", partial_args=[piece], will_continue=not last
            )
            chunk = types.GenerateContentResponse(
                candidates=[
                    types.Candidate(
                        content=types.Content(role="model", parts=[types.Part(function_call=call)]),
                        finish_reason=types.FinishReason.STOP if last else None,
                    )
                ]
            )
            async for response in aggregator.process_response(chunk):
                yield response
        closed = aggregator.close()
        if closed is not None:
            yield closed


def tag(label: str, n: float, loud: bool, note: str | None) -> str:
    """Tags a label."""
    return label


def test_arguments_streamed_as_partial_args_are_tool_call_deltas() -> None:
    h = Harness(include_streaming_events=True)
    h.run(LlmAgent(name="g3", model=PartialArgsLlm(model="gemini-3"), tools=[tag]), stream=True)
    (record,) = h.session().loops
    deltas = [
        e.event.delta.delta
        for e in record.events
        if isinstance(e.event, MessageUpdate) and e.event.delta.kind == "ToolCallDelta"
    ]
    assert deltas == ["hel", "lo", "2.0", "true", "null"]  # strings as they come, other values as JSON
    (call,) = record.turns[0].output_message.content
    assert call.arguments == {"label": "hello", "n": 2.0, "loud": True, "note": None}  # type: ignore[union-attr]


class TruncatedLlm(BaseLlm):
    """Gemini replying in two chunks cut by its token limit (MAX_TOKENS), streamed through
    ADK's own aggregator or as one response."""

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=10, candidates_token_count=4, total_token_count=14
        )

        def chunk(text: str, last: bool) -> types.GenerateContentResponse:
            content = types.Content(role="model", parts=[types.Part(text=text)])
            reason = types.FinishReason.MAX_TOKENS if last else None
            return types.GenerateContentResponse(
                candidates=[types.Candidate(content=content, finish_reason=reason)],
                usage_metadata=usage if last else None,
            )

        if not stream:
            yield LlmResponse.create(chunk("The answer is trunc", True))
            return
        aggregator = StreamingResponseAggregator()
        for index, text in enumerate(["The answer ", "is trunc"]):
            async for response in aggregator.process_response(chunk(text, index == 1)):
                yield response
        closed = aggregator.close()
        if closed is not None:
            yield closed


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_by_the_token_limit_stops_for_length(stream: bool) -> None:
    # Streamed, ADK repeats the finish reason as the response's error code.
    h = Harness()
    h.run(LlmAgent(name="a", model=TruncatedLlm(model="gemini-2.5-flash")), stream=stream)
    (record,) = h.session().loops
    message = record.turns[0].output_message
    assert (message.stop_reason, message.error_message) == ("length", None)
    assert texts(record)[-1] == ("assistant", "The answer is trunc") and record.status == "Completed"


def _transfer_to(h: Harness, helper: LlmAgent) -> list[LoopRecord]:
    """The loops of agent root transferring to `helper` at once."""
    root = LlmAgent(
        name="root",
        model=ScriptedLlm.of([("transfer_to_agent", {"agent_name": helper.name})]),
        sub_agents=[helper],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ADK's advice on context caching
        h.run(root)
    return h.session().loops


def test_transfer_is_a_handoff_to_a_continuing_loop() -> None:
    h = Harness()
    helper = LlmAgent(name="helper", model=ScriptedLlm.of(["helped"]), description="helps")
    first, second = _transfer_to(h, helper)
    assert first.turns[-1].output_message.stop_reason == "handoff"
    assert first.turns[-1].tool_results[0].tool_name == "transfer_to_agent"
    assert second.parent_loop_id == first.loop_id and second.continuation_kind.kind == "Default"
    assert second.turns[0].triggered_by == "Continuation"
    assert texts(second) == [("assistant", "helped")]
    assert first.status == second.status == "Completed"
    assert second.metadata["adk_invocation_id"] == first.metadata["adk_invocation_id"]


@pytest.mark.parametrize("in_branch", [False, True])
def test_sequential_agents_continue_each_other(in_branch: bool) -> None:
    h = Harness()
    steps = SequentialAgent(
        name="steps",
        sub_agents=[
            LlmAgent(name="draft", model=ScriptedLlm.of(["draft"])),
            LlmAgent(name="polish", model=ScriptedLlm.of(["polished"])),
        ],
    )
    if in_branch:  # of a ParallelAgent: the loop taking over is the branch's too
        h.run(ParallelAgent(name="fan", sub_agents=[steps, LlmAgent(name="r", model=ScriptedLlm.of(["R"]))]))
    else:
        h.run(steps)
    (first,) = [r for r in h.session().loops if ("assistant", "draft") in texts(r)]
    (second,) = [r for r in h.session().loops if r.parent_loop_id == first.loop_id]
    assert texts(first) == [*([] if in_branch else [("user", "hello")]), ("assistant", "draft")]
    assert second.parent_loop_id == first.loop_id and texts(second) == [("assistant", "polished")]
    assert second.continuation_kind.kind == "Default"
    assert second.metadata["adk_invocation_id"] == first.metadata["adk_invocation_id"]
    assert second.metadata.get("adk_branch") == first.metadata.get("adk_branch")
    assert first.metadata.get("adk_branch") == ("fan.steps" if in_branch else None)


def test_parallel_agents_are_branches_without_a_winner() -> None:
    h = Harness()
    fan = ParallelAgent(
        name="fan",
        sub_agents=[
            LlmAgent(name="left", model=ScriptedLlm.of(["L"])),
            LlmAgent(name="right", model=ScriptedLlm.of(["R"])),
        ],
    )
    h.run(
        SequentialAgent(
            name="flow", sub_agents=[fan, LlmAgent(name="merge", model=ScriptedLlm.of(["merged"]))]
        )
    )
    session = h.session()
    root, *branches, merge = sorted(session.loops, key=lambda r: r.started_at.ns)
    assert texts(root) == [("user", "hello")] and not root.turns
    assert {r.continuation_kind.tag: texts(r) for r in branches} == {
        "fan.left": [("assistant", "L")],
        "fan.right": [("assistant", "R")],
    }
    assert all(r.parent_loop_id == root.loop_id and r.turns[0].triggered_by == "Branch" for r in branches)
    assert all(r.parallel_group is None for r in session.loops)  # no winner is invented
    assert merge.parent_loop_id == root.loop_id and merge.continuation_kind.kind == "Default"


@pytest.mark.parametrize("max_idle_sessions", [4096, 0])
def test_after_parallel_branches_the_next_invocation_continues_the_invocations_own_loop(
    max_idle_sessions: int,
) -> None:
    # With max_idle_sessions=0, another session's invocation in between lets s1's state go:
    # what continues is the invocation's own loop all the same.
    h = Harness(max_idle_sessions=max_idle_sessions)
    runner = h.runner(
        ParallelAgent(
            name="fan",
            sub_agents=[
                LlmAgent(name="left", model=ScriptedLlm.of(["L1"], ["L2"], ["L3"])),
                LlmAgent(name="right", model=ScriptedLlm.of(["R1"], ["R2"], ["R3"])),
            ],
        )
    )

    async def twice() -> None:
        await h.ask(runner, "first")
        await h.ask(runner, "elsewhere", session_id="s2")
        await h.ask(runner, "second")

    asyncio.run(twice())
    roots = [r for r in h.session().loops if not r.continuation_kind or r.continuation_kind.kind != "Branch"]
    first, second = sorted(roots, key=lambda r: r.started_at.ns)
    assert texts(second) == [("user", "second")] and second.parent_loop_id == first.loop_id


def test_agent_tool_runs_a_sub_agent_linked_both_ways() -> None:
    h = Harness()
    expert = LlmAgent(name="expert", model=ScriptedLlm.of(["42"]), description="knows")
    boss = LlmAgent(
        name="boss",
        model=ScriptedLlm.of([("expert", {"request": "answer?"})], ["it is 42"]),
        tools=[AgentTool(agent=expert)],
    )
    h.run(boss)
    sessions = h.sessions()
    parent = h.session("s1")
    (child_session,) = [s for s in sessions if s.session_id != "s1"]
    (outer,) = parent.loops
    (inner,) = child_session.loops
    (result,) = outer.turns[0].tool_results
    assert inner.parent_loop_id == outer.loop_id
    assert inner.turns[0].triggered_by == "SubAgent"
    (ref,) = outer.child_loop_refs
    assert (ref.child_loop_id, ref.child_session_id, ref.tool_call_id) == (
        inner.loop_id,
        child_session.session_id,
        result.tool_call_id,
    )
    spawn = child_session.parent_spawn_ref
    assert spawn is not None
    assert (spawn.parent_loop_id, spawn.tool_call_id) == (outer.loop_id, result.tool_call_id)
    assert texts(inner) == [("user", "answer?"), ("assistant", "42")]
    assert texts(outer)[-2:] == [("toolResult", "result:42"), ("assistant", "it is 42")]
    assert result.tool_name == "expert"


def test_a_sub_agent_another_plugin_records_is_all_in_that_plugins_sinks() -> None:
    # A tool of the outer plugin's agent runs another runner, recorded by a plugin of its
    # own, whose agent transfers: both of its loops go to its own recorder.
    outer, inner = Harness(), Harness()

    async def ask_team(question: str) -> str:
        """Asks the team (a runner of its own)."""
        spec = LlmAgent(name="spec", model=ScriptedLlm.of(["team answer"]), description="specialist")
        route = ScriptedLlm.of([("transfer_to_agent", {"agent_name": "spec"})])
        events = await inner.ask(
            inner.runner(LlmAgent(name="router", model=route, sub_agents=[spec])), question
        )
        return str(events[-1].content.parts[0].text)

    outer.run(
        LlmAgent(
            name="boss",
            model=ScriptedLlm.of([("ask_team", {"question": "help"})], ["done"]),
            tools=[ask_team],
        )
    )
    (parent_session,) = outer.sessions()
    (team,) = inner.sessions()
    (parent,) = parent_session.loops
    routed, answered = team.loops
    assert (routed.config.name, answered.config.name) == ("router", "spec")  # type: ignore[union-attr]
    assert routed.parent_loop_id == parent.loop_id and answered.parent_loop_id == routed.loop_id
    assert routed.turns[0].triggered_by == "SubAgent"
    assert [ref.child_loop_id for ref in parent.child_loop_refs] == [routed.loop_id]
    assert texts(answered)[-1] == ("assistant", "team answer")


def test_a_tool_error_is_a_failed_result_and_fails_the_run_it_escapes() -> None:
    h = Harness()
    model = ScriptedLlm.of([("explode", {"reason": "boom"})], ["unreached"])
    with pytest.raises(ValueError, match="tool failed: boom"):
        h.run(LlmAgent(name="risky", model=model, tools=[explode]))
    (record,) = h.session().loops
    (result,) = record.turns[0].tool_results
    assert result.is_error and "tool failed: boom" in result.content[0].text
    assert record.status == "Aborted" and "tool failed: boom" in record.error


def test_a_tool_error_an_agent_recovers_from_lets_the_run_go_on() -> None:
    h = Harness()

    def recover(tool: Any, args: Any, tool_context: Any, error: Exception) -> dict[str, str]:
        return {"error": str(error)}

    model = ScriptedLlm.of([("explode", {"reason": "boom"})], ["sorry"])
    h.run(LlmAgent(name="risky", model=model, tools=[explode], on_tool_error_callback=recover))
    (record,) = h.session().loops
    assert record.status == "Completed" and record.turns[0].tool_results[0].is_error
    assert texts(record)[-1] == ("assistant", "sorry")


def _sent_to_model(seen: list[list[Any]], first: Step) -> Callable[[LlmRequest], Step]:
    """A model calling as `first` says, then answering "ok"; `seen` gets the function
    responses of each request (what ADK sent the model)."""

    def reply(request: LlmRequest) -> Step:
        parts = [part for content in request.contents for part in content.parts or ()]
        seen.append([part.function_response.response for part in parts if part.function_response])
        return first if len(seen) == 1 else ["ok"]

    return reply


def test_a_result_an_agents_after_tool_callback_substitutes_is_recorded_as_sent() -> None:
    h = Harness()
    seen: list[list[Any]] = []

    def alter(tool: Any, args: Any, tool_context: Any, tool_response: Any) -> dict[str, str]:
        return {"result": "altered"}

    model = ScriptedLlm.of(reply=_sent_to_model(seen, [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]))
    h.run(LlmAgent(name="calc", model=model, tools=[add], after_tool_callback=alter))
    assert seen[-1] == [{"result": "altered"}, {"result": "altered"}]
    (record,) = h.session().loops
    assert [(r.is_error, r.content[0].text) for r in record.turns[0].tool_results] == [(False, "altered")] * 2
    assert record.status == "Completed" and texts(record)[-1] == ("assistant", "ok")


def test_an_error_an_agents_callback_answers_is_recorded_with_the_answer() -> None:
    h = Harness()
    seen: list[list[Any]] = []

    def recover(tool: Any, args: Any, tool_context: Any, error: Exception) -> dict[str, str]:
        return {"status": "recovered"}

    model = ScriptedLlm.of(reply=_sent_to_model(seen, [("explode", {"reason": "boom"})]))
    h.run(LlmAgent(name="risky", model=model, tools=[explode], on_tool_error_callback=recover))
    assert seen[-1] == [{"status": "recovered"}]
    (record,) = h.session().loops
    (result,) = record.turns[0].tool_results
    # The tool failed; the model got the callback's answer.
    assert result.is_error and result.content[0].text == '{"status":"recovered"}'


def test_a_call_of_a_tool_that_does_not_exist_is_recorded_with_adks_answer() -> None:
    h = Harness()
    seen: list[list[Any]] = []
    model = ScriptedLlm.of(reply=_sent_to_model(seen, [("nosuch", {"x": 1})]))
    h.run(LlmAgent(name="calc", model=model, tools=[add]))
    (answer,) = seen[-1]
    (record,) = h.session().loops
    (result,) = record.turns[0].tool_results
    assert answer["error"].startswith("Invoking `nosuch()` failed")
    assert result.is_error and json.loads(result.content[0].text) == answer


def test_an_exception_ends_the_loop_aborted() -> None:
    h = Harness()
    with pytest.raises(RuntimeError, match="model down"):
        h.run(LlmAgent(name="fragile", model=ScriptedLlm.of(RuntimeError("model down"))))
    (record,) = h.session().loops
    assert record.status == "Aborted" and "model down" in record.error
    (turn,) = record.turns
    assert turn.output_message.stop_reason == "error"


def test_concurrent_invocations_keep_to_their_own_loops() -> None:
    h = Harness()

    def echo(request: LlmRequest) -> Step:
        return [f"echo {request.contents[-1].parts[0].text}"]

    runner = h.runner(LlmAgent(name="echo", model=ScriptedLlm.of(reply=echo)))

    async def many() -> None:
        await asyncio.gather(*(h.ask(runner, f"m{i}", session_id=f"c{i}", stream=True) for i in range(4)))

    asyncio.run(many())
    for i in range(4):
        (record,) = h.session(f"c{i}").loops
        assert texts(record) == [("user", f"m{i}"), ("assistant", f"echo m{i}")]


def _adk_view(events: list[Any]) -> list[Any]:
    """What ADK yielded, without its fresh ids and timestamps."""
    return [
        (
            e.author,
            e.partial,
            e.content.model_dump(
                exclude_none=True,
                exclude={"parts": {"__all__": {"function_call": {"id"}, "function_response": {"id"}}}},
            )
            if e.content
            else None,
        )
        for e in events
    ]


def test_an_adapter_fault_never_reaches_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def agent() -> LlmAgent:
        return LlmAgent(name="calc", model=ScriptedLlm.of([("add", {"a": 1, "b": 2})], ["3"]), tools=[add])

    bare = asyncio.run(Harness().ask(InMemoryRunner(agent=agent(), app_name="app"), "hi"))
    h = Harness()
    watched = h.run(agent(), "hi")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("adapter bug")

    monkeypatch.setattr(google_adk, "_usage", broken)
    faulty = Harness()
    faulted = faulty.run(agent(), "hi")
    assert _adk_view(watched) == _adk_view(bare) == _adk_view(faulted)
    assert h.plugin.fault_count == 0 and faulty.plugin.fault_count > 0


def test_default_sink_saves_into_the_embedded_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI_SESSION_STORE", str(tmp_path / "sessions.db"))
    plugin = PhiPlugin(agent=AgentSession(clock=FakeClock()))
    runner = InMemoryRunner(
        agent=LlmAgent(name="chat", model=ScriptedLlm.of(["hi there"])), app_name="app", plugins=[plugin]
    )

    async def go() -> None:
        await Harness().ask(runner, "hi", session_id="stored")
        await runner.close()  # closes the plugin: the store has everything

    asyncio.run(go())
    store = plugin.core.store
    assert store is not None
    session = store.load("stored")
    assert texts(session.loops[0]) == [("user", "hi"), ("assistant", "hi there")]
    data = encode_session(session)
    assert encode_session(decode_session(data)) == data


def test_missing_extra_names_the_pip_install() -> None:
    code = (
        "import sys; sys.modules['google.adk'] = None\n"
        "try:\n    import phi_session.adapters.google_adk\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingExtra") and "pip install 'phi-session[google-adk]'" in out.stdout


def test_example_runs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "adapter_google_adk.py"
    monkeypatch.setattr(sys, "argv", [str(example), str(tmp_path / "sessions.db")])
    runpy.run_path(str(example), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "assistant: Il fait ensoleillé, 21 °C à Paris."
    assert any(line.startswith("chat-1.google.gemini-2-5-flash.1 Completed 3 turns") for line in lines)
    assert any(".sub.1 Completed 1 turns" in line for line in lines)


def test_max_idle_sessions_reaches_the_core_and_is_checked() -> None:
    assert PhiPlugin([SessionRecorder()], max_idle_sessions=3).core.max_idle_sessions == 3
    with pytest.raises(ValueError, match="max_idle_sessions"):
        PhiPlugin([SessionRecorder()], max_idle_sessions=-1)


class HangingLlm(ScriptedLlm):
    """A model that answers its script, then never again: its invocation ends only when
    ADK's caller gives up."""

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        if not self.script:
            await asyncio.Event().wait()
        async for response in super().generate_content_async(llm_request, stream):
            yield response


@pytest.mark.filterwarnings("ignore:.*ResumabilityConfig:UserWarning")
def test_an_invocation_resumed_after_its_task_was_cancelled_does_not_record_its_prompt_again() -> None:
    called = asyncio.Event()

    class Signalling(HangingLlm):
        async def generate_content_async(
            self, llm_request: LlmRequest, stream: bool = False
        ) -> AsyncGenerator[LlmResponse, None]:
            called.set()
            async for response in super().generate_content_async(llm_request, stream):
                yield response

    h = Harness()
    model = Signalling(model="scripted-1")
    app = App(
        name="app",
        root_agent=LlmAgent(name="a", model=model),
        plugins=[h.plugin],
        resumability_config=ResumabilityConfig(is_resumable=True),
    )
    runner = InMemoryRunner(app=app)

    async def cancel_then_resume() -> None:
        first = asyncio.create_task(h.ask(runner, "question?"))
        await called.wait()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        session = await runner.session_service.get_session(app_name="app", user_id="u", session_id="s1")
        assert session is not None and [e.author for e in session.events] == ["user"]
        model.script.append(["answer"])
        async for _ in runner.run_async(
            user_id="u", session_id="s1", invocation_id=session.events[0].invocation_id
        ):
            pass

    asyncio.run(cancel_then_resume())
    first, resumed = sorted(h.session().loops, key=lambda r: r.started_at.ns)
    assert first.status == "Aborted" and resumed.parent_loop_id == first.loop_id
    assert texts(resumed) == [("assistant", "answer")] and h.plugin.fault_count == 0


@pytest.mark.parametrize("how", ["task cancelled", "events abandoned"])
def test_an_invocation_adk_drops_without_a_callback_ends_failed(how: str) -> None:
    h = Harness()
    hanging = h.runner(LlmAgent(name="slow", model=HangingLlm(model="hang")))

    async def until_the_model_is_called() -> None:
        for _ in range(1000):
            if h.plugin.core.open_runs:
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the invocation never started")

    async def scenario() -> None:
        await hanging.session_service.create_session(app_name="app", user_id="u", session_id="s1")
        if how == "task cancelled":
            task = asyncio.create_task(h.ask(hanging, "wait"))
            await until_the_model_is_called()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del task
        else:
            message = types.Content(role="user", parts=[types.Part(text="wait")])
            events = hanging.run_async(user_id="u", session_id="s1", new_message=message)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(events.__anext__(), 0.2)
            await events.aclose()
            del events
        # ADK lets go of the invocation's context once asyncio has closed its abandoned
        # generators (a few loop turns) and the collector has run.
        for _ in range(500):
            gc.collect()
            if h.plugin._abandoned:
                break
            await asyncio.sleep(0.002)
        assert h.plugin.core.open_runs == 1  # no callback came: still open until the next start
        # The next invocation, in another session, ends the dropped one first.
        await h.ask(h.runner(LlmAgent(name="quick", model=ScriptedLlm.of(["done"]))), "next", session_id="s2")

    asyncio.run(scenario())
    assert h.plugin.core.open_runs == 0
    (dropped,) = h.session("s1").loops
    assert (dropped.status, dropped.error) == ("Aborted", google_adk.ABANDONED)
    assert texts(dropped) == [("user", "wait")]
    (quick,) = h.session("s2").loops
    assert quick.status == "Completed"


def test_an_invocation_that_ended_is_not_reported_dropped_when_freed() -> None:
    h = Harness()
    h.run(LlmAgent(name="quick", model=ScriptedLlm.of(["one"])))
    gc.collect()
    assert not h.plugin._abandoned
    asyncio.run(h.plugin.close())
    (loop,) = h.session().loops
    assert loop.status == "Completed"


@pytest.mark.parametrize("failing", [None, "right"])
def test_a_fault_while_an_invocation_ends_still_ends_every_loop(
    monkeypatch: pytest.MonkeyPatch, failing: str | None
) -> None:
    # With a failing branch, its agent's error callback closes its lane first.
    def broken(self: Any, error: Any) -> None:
        raise RuntimeError("adapter bug")

    monkeypatch.setattr(google_adk._Lane, "close", broken)
    h = Harness()
    right = ScriptedLlm.of(RuntimeError("model down") if failing else ["R"])
    fan = ParallelAgent(
        name="fan",
        sub_agents=[
            LlmAgent(name="left", model=ScriptedLlm.of(["L"])),
            LlmAgent(name="right", model=right),
        ],
    )
    if failing:
        with pytest.raises(RuntimeError, match="model down"):
            h.run(fan)
    else:
        h.run(fan)
    assert h.plugin.core.open_runs == 0 and h.plugin.fault_count > 0
    loops = h.session().loops
    assert len(loops) == 3
    statuses = {
        r.continuation_kind.tag if r.continuation_kind.kind == "Branch" else None: r.status for r in loops
    }
    assert statuses["fan.right"] == ("Aborted" if failing else "Completed")
    assert statuses[None] == "Completed"  # ended as the branches forked from it


def test_an_answer_a_plugin_gives_before_the_model_is_the_turns_message() -> None:
    class Cache(BasePlugin):  # listed after PhiPlugin: ADK skips the model and after_model
        async def before_model_callback(self, *, callback_context: Any, llm_request: Any) -> LlmResponse:
            return LlmResponse(content=types.Content(role="model", parts=[types.Part(text="cached")]))

    h = Harness()
    agent = LlmAgent(name="cached", model=ScriptedLlm.of())
    asyncio.run(
        h.ask(InMemoryRunner(agent=agent, app_name="app", plugins=[h.plugin, Cache(name="cache")]), "hi")
    )
    (record,) = h.session().loops
    (turn,) = record.turns
    assert turn.output_message.stop_reason == "stop" and record.status == "Completed"
    assert texts(record) == [("user", "hi"), ("assistant", "cached")]


def test_an_answer_a_plugin_gives_before_the_run_is_a_turn_of_the_invocations_loop() -> None:
    class Early(BasePlugin):  # listed after PhiPlugin: ADK runs no agent, the author is 'model'
        async def before_run_callback(self, *, invocation_context: Any) -> types.Content:
            return types.Content(role="model", parts=[types.Part(text="maintenance: try later")])

    h = Harness()
    agent = LlmAgent(name="a", model=ScriptedLlm.of())
    asyncio.run(
        h.ask(InMemoryRunner(agent=agent, app_name="app", plugins=[h.plugin, Early(name="early")]), "hi")
    )
    (record,) = h.session().loops
    assert record.config is not None and (record.config.name, record.config.model) == ("a", "scripted-1")
    assert texts(record) == [("user", "hi"), ("assistant", "maintenance: try later")]
    assert record.turns[0].output_message.usage.total_tokens == 0 and h.plugin.fault_count == 0


def _says(text: str) -> Callable[[Any], types.Content]:
    """An agent callback answering `text`."""
    return lambda callback_context: types.Content(role="model", parts=[types.Part(text=text)])


def test_an_answer_an_agent_callback_gives_is_a_turn_of_its_own() -> None:
    # Before the agent (its model never called), after it (appended to the model's answer).
    h = Harness()
    h.run(LlmAgent(name="a", model=ScriptedLlm.of(), before_agent_callback=_says("cached: 42")))
    (record,) = h.session().loops
    (turn,) = record.turns
    assert texts(record) == [("user", "hello"), ("assistant", "cached: 42")]
    assert turn.output_message.usage.total_tokens == 0 and turn.output_message.stop_reason == "stop"
    h = Harness()
    h.run(LlmAgent(name="b", model=ScriptedLlm.of(["hi"]), after_agent_callback=_says("(disclaimer)")))
    (record,) = h.session().loops
    assert texts(record) == [("user", "hello"), ("assistant", "hi"), ("assistant", "(disclaimer)")]
    assert [turn.output_message.usage.total_tokens for turn in record.turns] == [20, 0]
    assert h.plugin.fault_count == 0


def test_an_agent_callback_answering_for_the_next_agent_is_its_loops_turn() -> None:
    h = Harness()
    first = LlmAgent(name="first", model=ScriptedLlm.of(["one"]))
    second = LlmAgent(name="second", model=ScriptedLlm.of(), before_agent_callback=_says("skipped"))
    h.run(SequentialAgent(name="seq", sub_agents=[first, second]))
    one, two = h.session().loops
    assert texts(one) == [("user", "hello"), ("assistant", "one")]
    assert two.config is not None and two.config.name == "second"
    assert texts(two) == [("assistant", "skipped")]


def test_an_agent_transferred_to_answering_by_its_callback_is_the_handed_over_loops_turn() -> None:
    # root's turn (its transfer call) is still open as helper's callback answers.
    h = Harness()
    helper = LlmAgent(
        name="helper",
        model=ScriptedLlm.of(),
        description="helps",
        before_agent_callback=_says("helper cached"),
    )
    first, second = _transfer_to(h, helper)
    assert first.turns[-1].output_message.stop_reason == "handoff"
    assert second.parent_loop_id == first.loop_id and second.config.name == "helper"
    assert texts(second) == [("assistant", "helper cached")]
    assert h.plugin.fault_count == 0


def test_a_call_an_agents_before_model_callback_asks_for_is_recorded_with_its_result() -> None:
    calls = iter([types.FunctionCall(name="add", args={"a": 2, "b": 3})])

    def shortcut(callback_context: Any, llm_request: LlmRequest) -> LlmResponse | None:
        call = next(calls, None)  # the first model call only
        return (
            None
            if call is None
            else LlmResponse(content=types.Content(role="model", parts=[types.Part(function_call=call)]))
        )

    h = Harness()
    h.run(LlmAgent(name="calc", model=ScriptedLlm.of(["5"]), tools=[add], before_model_callback=shortcut))
    (record,) = h.session().loops
    first, _ = record.turns
    (call,) = first.output_message.content
    assert first.output_message.stop_reason == "toolUse" and first.output_message.usage.total_tokens == 0
    assert call.id.startswith("adk-") and call.id == first.tool_results[0].tool_call_id
    assert texts(record) == [
        ("user", "hello"),
        ("assistant", "call:add"),
        ("toolResult", "result:5"),
        ("assistant", "5"),
    ]


@pytest.mark.parametrize("between", [True, False])
def test_each_run_of_a_parallel_agent_forks_branches_of_its_own(between: bool) -> None:
    # In a LoopAgent, with or without a model call between the ParallelAgent's runs.
    h = Harness()
    fan = ParallelAgent(
        name="fan",
        sub_agents=[
            LlmAgent(name="l", model=ScriptedLlm.of(["L1"], ["L2"])),
            LlmAgent(name="r", model=ScriptedLlm.of(["R1"], ["R2"])),
        ],
    )
    pre = [LlmAgent(name="pre", model=ScriptedLlm.of(["P1"], ["P2"]))] if between else []
    h.run(LoopAgent(name="again", max_iterations=2, sub_agents=[*pre, fan]))
    loops = sorted(h.session().loops, key=lambda r: r.started_at.ns)
    branches = [r for r in loops if r.continuation_kind and r.continuation_kind.kind == "Branch"]
    assert [(r.continuation_kind.tag, texts(r)) for r in branches] == [
        ("fan.l", [("assistant", "L1")]),
        ("fan.r", [("assistant", "R1")]),
        ("fan.l", [("assistant", "L2")]),
        ("fan.r", [("assistant", "R2")]),
    ]
    roots = [r for r in loops if r not in branches]
    if between:  # each run's branches fork from the loop just before them
        first, second = roots
        assert [texts(first)[-1], texts(second)] == [("assistant", "P1"), [("assistant", "P2")]]
        assert [r.parent_loop_id for r in branches] == [first.loop_id] * 2 + [second.loop_id] * 2
    else:
        (root,) = roots
        assert {r.parent_loop_id for r in branches} == {root.loop_id}
    assert all(r.status == "Completed" for r in loops)


def test_an_answer_an_after_agent_callback_gives_in_a_branch_is_in_that_branchs_loop() -> None:
    # ADK calls the plugin's after_agent_callback before the agent's, whose answer follows.
    h = Harness()
    fan = ParallelAgent(
        name="fan",
        sub_agents=[
            LlmAgent(
                name="l", model=ScriptedLlm.of(["L1"], ["L2"]), after_agent_callback=_says("(disclaimer)")
            ),
            LlmAgent(name="r", model=ScriptedLlm.of(["R1"], ["R2"])),
        ],
    )
    h.run(LoopAgent(name="again", max_iterations=2, sub_agents=[fan]))
    loops = sorted(h.session().loops, key=lambda r: r.started_at.ns)
    branches = [(r.continuation_kind.tag, texts(r)) for r in loops if r.continuation_kind.kind == "Branch"]
    assert branches == [
        ("fan.l", [("assistant", "L1"), ("assistant", "(disclaimer)")]),
        ("fan.r", [("assistant", "R1")]),
        ("fan.l", [("assistant", "L2"), ("assistant", "(disclaimer)")]),
        ("fan.r", [("assistant", "R2")]),
    ]
    assert all(r.status == "Completed" for r in loops) and h.plugin.fault_count == 0


class SlowlyFailingLlm(BaseLlm):
    """A model that fails after its sibling branches had time to finish."""

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        for _ in range(20):
            await asyncio.sleep(0.005)
        raise RuntimeError("left down")
        yield LlmResponse()  # never reached


def test_a_branch_that_finished_keeps_its_status_when_a_sibling_fails() -> None:
    h = Harness()
    fan = ParallelAgent(
        name="fan",
        sub_agents=[
            LlmAgent(name="l", model=SlowlyFailingLlm(model="slow")),
            LlmAgent(name="r", model=ScriptedLlm.of(["R"])),
        ],
    )
    with pytest.raises(RuntimeError, match="left down"):
        h.run(fan)
    branch = {r.continuation_kind.tag: r for r in h.session().loops if r.turns}
    assert branch["fan.r"].status == "Completed" and not isinstance(branch["fan.r"].error, str)
    assert branch["fan.l"].status == "Aborted" and "left down" in branch["fan.l"].error


def test_an_agent_calling_its_model_first_takes_over_from_one_that_never_did() -> None:
    def skip(callback_context: Any) -> types.Content:
        return types.Content(role="model", parts=[types.Part(text="skipped")])

    h = Harness()
    flow = SequentialAgent(
        name="flow",
        sub_agents=[
            LlmAgent(name="a", model=ScriptedLlm(model="model-a"), before_agent_callback=skip),
            LlmAgent(name="b", model=ScriptedLlm(model="model-b", script=[["B"]])),
        ],
    )
    h.run(flow)
    first, second = h.session().loops
    # a's loop (a's before_agent_callback answered: no model call), then b's continuing it.
    assert (first.config.name, first.config.model, len(first.turns)) == ("a", "model-a", 1)
    assert texts(first) == [("user", "hello"), ("assistant", "skipped")]
    assert (second.config.name, second.config.model) == ("b", "model-b")
    assert second.parent_loop_id == first.loop_id and second.continuation_kind.kind == "Default"
    assert texts(second) == [("assistant", "B")] and second.turns[0].output_message.model == "model-b"


class PartialsLlm(BaseLlm):
    """A model whose stream ends without a final response (or fails after its partials)."""

    fail: bool = False

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        for text in ("a", "b", "c"):
            yield LlmResponse(
                content=types.Content(role="model", parts=[types.Part(text=text)]), partial=True
            )
        if self.fail:
            raise RuntimeError("stream broke")


@pytest.mark.parametrize("fail", [False, True])
def test_a_stream_of_partial_responses_only_is_the_streamed_message(fail: bool) -> None:
    h = Harness()
    agent = LlmAgent(name="partial", model=PartialsLlm(model="p", fail=fail))
    if fail:
        with pytest.raises(RuntimeError, match="stream broke"):
            h.run(agent, stream=True)
    else:
        h.run(agent, stream=True)
    (record,) = h.session().loops
    message = record.turns[0].output_message
    assert texts(record) == [("user", "hello"), ("assistant", "abc")]
    if fail:  # a stream that failed stays a failed message
        assert message.stop_reason == "error" and "stream broke" in message.error_message
    else:
        assert (message.stop_reason, message.error_message, record.status) == ("stop", None, "Completed")


class Opaque:
    """Not JSON."""


def cyclic(x: int) -> dict[str, Any]:
    """Returns a dict holding itself and an object."""
    found: dict[str, Any] = {"x": x, "obj": Opaque()}
    found["self"] = found
    return found


def test_a_tool_result_holding_a_cycle_is_recorded_as_json() -> None:
    harness = Harness()
    agent = LlmAgent(name="a", model=ScriptedLlm.of([("cyclic", {"x": 1})], ["done"]), tools=[cyclic])
    harness.run(agent)
    (session,) = harness.sessions()
    (loop,) = session.loops
    (result,) = loop.turns[0].tool_results
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith('{"x":1,"obj":"<') and text.endswith('"self":"{...}"}')
    assert not result.is_error and loop.status == "Completed"
    assert harness.plugin.fault_count == 0


def test_a_plugin_given_to_runner_after_runner_records_every_invocation(tmp_path: Path) -> None:
    # Runner.close closes its plugins: the next runner's invocations must still be recorded.
    store = SqliteStore(tmp_path / "sessions.db")
    plugin = PhiPlugin(store=store)

    async def request(text: str) -> None:
        agent = LlmAgent(name="a", model=ScriptedLlm.of([f"re {text}"]))
        runner = InMemoryRunner(agent=agent, app_name="app", plugins=[plugin])
        await runner.session_service.create_session(app_name="app", user_id="u", session_id="s1")
        message = types.Content(role="user", parts=[types.Part(text=text)])
        async for _ in runner.run_async(user_id="u", session_id="s1", new_message=message):
            pass
        await runner.close()

    async def requests() -> None:
        for text in ("one", "two"):
            await request(text)

    asyncio.run(requests())
    first, second = store.load("s1").loops
    assert second.parent_loop_id == first.loop_id and second.status == "Completed"
    assert plugin.fault_count == 0 and plugin.core.tracer.sink_errors == {}


class GatedLlm(BaseLlm):
    """Answers once `gate` (an `asyncio.Event`) is set."""

    gate: Any = None

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        await self.gate.wait()
        yield LlmResponse(content=types.Content(role="model", parts=[types.Part(text="late")]))


def test_a_runner_closing_leaves_the_invocation_of_another_runner_sharing_its_plugin(tmp_path: Path) -> None:
    """ADK closes a runner's plugins without saying which runner closes: a plugin given to
    runners made per request ended, aborted, the invocation another request was running."""
    store = SqliteStore(tmp_path / "sessions.db")
    plugin = PhiPlugin(store=store)

    def runner(name: str, model: BaseLlm) -> InMemoryRunner:
        return InMemoryRunner(agent=LlmAgent(name=name, model=model), app_name="app", plugins=[plugin])

    async def scenario() -> None:
        gate = asyncio.Event()
        slow, fast = (
            runner("slow", GatedLlm(model="gated", gate=gate)),
            runner("fast", ScriptedLlm.of(["quick"])),
        )
        waiting = asyncio.create_task(Harness().ask(slow, "wait", session_id="slow"))
        while not plugin.core.open_runs:
            await asyncio.sleep(0.001)
        await Harness().ask(fast, "hi", session_id="fast")
        await fast.close()
        assert [loop.status for loop in store.load("fast").loops] == ["Completed"]  # saved at close
        gate.set()
        await waiting  # the last invocation to end closes the plugin that was closed under it: all saved
        (loop,) = store.load("slow").loops
        assert (loop.status, texts(loop)) == ("Completed", [("user", "wait"), ("assistant", "late")])
        await slow.close()

    asyncio.run(scenario())
    assert plugin.core.open_runs == 0 and plugin.fault_count == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("how", ["break", "aclose", "read to the end"])
def test_an_invocation_whose_events_the_host_stops_reading_ends_aborted(how: str, stream: bool) -> None:
    # ADK takes the early close of its events for a clean completion and calls
    # after_run_callback: the run cut short must not be recorded as finished.
    h = Harness()
    model = ScriptedLlm.of(["Let me ", "add.", ("add", {"a": 2, "b": 2})], ["4"])
    runner = h.runner(LlmAgent(name="calc", model=model, tools=[add]))

    async def scenario() -> None:
        await runner.session_service.create_session(app_name="app", user_id="u", session_id="s1")
        message = types.Content(role="user", parts=[types.Part(text="add")])
        config = RunConfig(streaming_mode=StreamingMode.SSE if stream else StreamingMode.NONE)
        events = runner.run_async(user_id="u", session_id="s1", new_message=message, run_config=config)
        if how == "aclose":
            await anext(events)
            await events.aclose()
            return
        async for _ in events:
            if how == "break":
                break  # asyncio closes the generator left open as the loop shuts down

    asyncio.run(scenario())
    assert h.plugin.core.open_runs == 0 and h.plugin.fault_count == 0
    (record,) = h.session().loops
    first = record.turns[0].output_message
    if how == "read to the end":
        assert (record.status, first.stop_reason) == ("Completed", "toolUse")
        assert texts(record)[-2:] == [("toolResult", "result:4"), ("assistant", "4")]
    elif stream:  # the first event was a partial response: the reply is cut off before its calls
        assert (record.status, record.error) == ("Aborted", google_adk.ABANDONED)
        assert texts(record) == [("user", "add"), ("assistant", "Let me "), ("assistant", "add.")]
        assert first.stop_reason == "aborted" and first.error_message == google_adk.ABANDONED
    else:  # the first event was the reply calling a tool, which never ran
        assert (record.status, record.error) == ("Aborted", google_adk.ABANDONED)
        assert texts(record) == [
            ("user", "add"),
            ("assistant", "Let me "),
            ("assistant", "add."),
            ("assistant", "call:add"),
        ]
        assert first.stop_reason == "toolUse" and not record.turns[0].tool_results


def read_until(h: Harness, root: Any, stop: Callable[[Any], bool]) -> LoopRecord:
    """Run `root` on a message, the host breaking out of its events (closing them) at the
    first that `stop` accepts; the session's last loop."""
    runner = h.runner(root)

    async def scenario() -> None:
        await runner.session_service.create_session(app_name="app", user_id="u", session_id="s1")
        message = types.Content(role="user", parts=[types.Part(text="go")])
        events = runner.run_async(user_id="u", session_id="s1", new_message=message)
        async with contextlib.aclosing(events):
            async for event in events:
                if stop(event):
                    break

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ADK's advice on context caching
        asyncio.run(scenario())
    assert h.plugin.core.open_runs == 0 and h.plugin.fault_count == 0
    return h.session().loops[-1]


def answered_directly(q: str, tool_context: ToolContext) -> dict[str, str]:
    """Looks up, its result the answer the user gets (no summary by the model)."""
    tool_context.actions.skip_summarization = True
    return {"answer": "42"}


@pytest.mark.parametrize(
    "after",
    [
        "tool result",
        "first agent",
        "final answer",
        "transferred answer",
        "skipped summary",
        "agent tool's answer",
        "last agent",
    ],
)
def test_an_invocation_the_host_stops_reading_between_steps_ends_aborted(after: str) -> None:
    # Nothing is cut off (the tool's result came, the first agent is done), yet more was
    # to come; not after an LLM agent's final answer (`if event.is_final_response(): break`),
    # a tool's result it skips summarizing included, or the last agent's of a
    # SequentialAgent (nothing was to run after it).
    h = Harness()
    helper = LlmAgent(name="helper", model=ScriptedLlm.of(["helped"]), description="helps")
    if after in ("first agent", "last agent"):
        first, second = (LlmAgent(name=name, model=ScriptedLlm.of([f"{name} says"])) for name in "ab")
        root: Any = SequentialAgent(name="seq", sub_agents=[first, second])
    elif after == "transferred answer":
        transfer = ScriptedLlm.of([("transfer_to_agent", {"agent_name": "helper"})])
        root = LlmAgent(name="root", model=transfer, sub_agents=[helper])
    elif after == "skipped summary":
        lookup = ScriptedLlm.of([("answered_directly", {"q": "x"})], ["never"])
        root = LlmAgent(name="a", model=lookup, tools=[answered_directly])
    elif after == "agent tool's answer":
        ask = ScriptedLlm.of([("helper", {"request": "x"})], ["never"])
        root = LlmAgent(name="a", model=ask, tools=[AgentTool(agent=helper, skip_summarization=True)])
    else:
        root = LlmAgent(name="calc", model=ScriptedLlm.of([("add", {"a": 1, "b": 2})], ["3"]), tools=[add])
    record = read_until(
        h,
        root,
        lambda event: (
            (event.get_function_responses() and after == "tool result")
            or (
                event.is_final_response()
                and after != "tool result"
                and (after != "last agent" or event.author == "b")
            )
        ),
    )
    last = {
        "tool result": "result:3",
        "first agent": "a says",
        "final answer": "3",
        "transferred answer": "helped",
        "skipped summary": 'result:{"answer":"42"}',
        "agent tool's answer": "result:helped",
        "last agent": "b says",
    }
    assert texts(record)[-1][1] == last[after]
    if after in ("tool result", "first agent"):
        assert (record.status, record.error) == ("Aborted", google_adk.ABANDONED)
    else:
        assert record.status == "Completed"


@pytest.mark.parametrize(
    ("case", "nth", "status"),
    [
        ("pipeline transferred to", 1, "Aborted"),
        ("pipeline transferred to", 2, "Completed"),
        ("loop", 1, "Aborted"),
        ("loop", 2, "Completed"),
        ("loop exited", 1, "Completed"),
    ],
)
def test_a_break_at_a_final_answer_completes_only_if_nothing_more_was_to_run(
    case: str, nth: int, status: str
) -> None:
    # `if event.is_final_response(): break` at the nth final answer: the agent that gave it
    # decides, not the invocation's root. The first agent of a SequentialAgent an LLM agent
    # transferred to, or a round of a LoopAgent before its last (max_iterations) that did
    # not exit it (escalate), had more to run.
    h = Harness()
    if case == "pipeline transferred to":
        first, second = (LlmAgent(name=name, model=ScriptedLlm.of([f"{name} says"])) for name in "ab")
        pipeline = SequentialAgent(name="seq", description="pipeline", sub_agents=[first, second])
        transfer = ScriptedLlm.of([("transfer_to_agent", {"agent_name": "seq"})])
        root: Any = LlmAgent(name="root", model=transfer, sub_agents=[pipeline])
    elif case == "loop":
        looped = LlmAgent(name="a", model=ScriptedLlm.of(["round 1"], ["round 2"]))
        root = LoopAgent(name="again", max_iterations=2, sub_agents=[looped])
    else:
        root = LoopAgent(
            name="again",
            sub_agents=[LlmAgent(name="a", model=ScriptedLlm.of([("exit_loop", {})]), tools=[exit_loop])],
        )
    finals = itertools.count(1)
    record = read_until(h, root, lambda event: event.is_final_response() and next(finals) == nth)
    assert record.status == status
    if status == "Aborted":
        assert record.error == google_adk.ABANDONED


def test_a_run_the_host_makes_as_its_own_generator_closes_ends_completed() -> None:
    # A host's stream closed (a client gone, say) runs the agents as it stops: the close
    # ADK's callbacks see then is the host's, not one of the invocation's events.
    h = Harness()
    runner = h.runner(
        LlmAgent(name="calc", model=ScriptedLlm.of([("add", {"a": 1, "b": 2})], ["3"]), tools=[add])
    )

    async def stream() -> AsyncGenerator[int, None]:
        try:
            yield 1
            yield 2
        finally:
            await h.ask(runner, "go")

    async def scenario() -> None:
        generator = stream()
        await anext(generator)
        await generator.aclose()

    asyncio.run(scenario())
    (record,) = h.session().loops
    assert record.status == "Completed" and texts(record)[-1] == ("assistant", "3")


@pytest.mark.parametrize("where", ["in a tool", "in the next model call"])
def test_a_sync_run_the_host_breaks_out_of_ends_aborted(where: str) -> None:
    started = threading.Event()

    async def wait(seconds: int) -> int:
        """Waits."""
        started.set()
        if where == "in a tool":
            await asyncio.Event().wait()
        return seconds

    h = Harness()
    model = HangingLlm.of([("wait", {"seconds": 1})])  # then never answers again
    runner = h.runner(LlmAgent(name="waiter", model=model, tools=[wait]))
    asyncio.run(runner.session_service.create_session(app_name="app", user_id="u", session_id="s1"))
    message = types.Content(role="user", parts=[types.Part(text="wait")])
    for event in runner.run(user_id="u", session_id="s1", new_message=message):
        if where == "in a tool":
            assert started.wait(5)
            break
        if event.get_function_responses():
            break
    assert h.plugin.core.open_runs == 0 and h.plugin.fault_count == 0
    (record,) = h.session().loops
    assert (record.status, record.error) == ("Aborted", google_adk.ABANDONED)
    (result,) = record.turns[0].tool_results
    assert result.is_error == (where == "in a tool")
