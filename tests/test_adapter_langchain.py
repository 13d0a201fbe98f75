"""The LangChain / LangGraph adapter, end to end, offline: LangChain's fake chat model
(with ``bind_tools``) through ``create_agent`` and a hand-built ``StateGraph`` with an
in-memory checkpointer, sync and async, into a recorder and a store."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import re
import subprocess
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langchain_core", reason="needs the extra: pip install 'phi-session[langchain]'")
pytest.importorskip("langgraph", reason="needs the extra: pip install 'phi-session[langchain]'")
pytest.importorskip("langchain.agents", reason="create_agent needs: pip install 'phi-session[test]'")

from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import InjectedToolCallId, ToolException, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, Send, interrupt
from pydantic import Field

from phi_session import SessionRecorder, SqliteStore, codec
from phi_session._strict import MAX_VALUE_DEPTH
from phi_session.adapters import langchain as langchain_adapter
from phi_session.adapters.langchain import AsyncPhiCallbackHandler, PhiCallbackHandler
from phi_session.events import (
    MessageEnd,
    MessageStart,
    MessageUpdate,
    ToolExecutionEnd,
    ToolExecutionStart,
    TurnRequest,
)
from phi_session.identity import AgentSession
from phi_session.messages import (
    AssistantMessage,
    ExtensionMessage,
    ToolCall,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from phi_session.model import Session


class ScriptedChat(GenericFakeChatModel):
    """LangChain's generic fake chat model, plus what an agent needs: ``bind_tools``, and
    streaming that also streams the tool calls and the response's usage."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        message = next(self.messages)
        assert isinstance(message, AIMessage)
        if isinstance(message.content, list):  # content blocks (reasoning, text): one chunk each
            chunks = [AIMessageChunk(content=[block]) for block in message.content]
        else:
            chunks = [AIMessageChunk(content=token) for token in re.split(r"(\s)", message.content) if token]
        chunks += [
            AIMessageChunk(
                content="",
                tool_call_chunks=[
                    {"name": call["name"], "args": json.dumps(call["args"]), "id": call["id"], "index": index}
                ],
            )
            for index, call in enumerate(message.tool_calls)
        ]
        chunks.append(
            AIMessageChunk(
                content="",
                usage_metadata=message.usage_metadata,
                response_metadata=message.response_metadata,
                chunk_position="last",
            )
        )
        for chunk in chunks:
            generation = ChatGenerationChunk(message=chunk)
            if run_manager and (chunk.content or chunk.tool_call_chunks):
                run_manager.on_llm_new_token(str(chunk.content), chunk=generation)
            yield generation


def usage(inputs: int, output: int) -> dict[str, Any]:
    return {"input_tokens": inputs, "output_tokens": output, "total_tokens": inputs + output}


def reply(
    text: str = "",
    *calls: tuple[str, str, dict[str, Any]],
    tokens: tuple[int, int] = (10, 5),
    model: str = "fake-1",
) -> AIMessage:
    return AIMessage(
        content=text,
        tool_calls=[{"id": i, "name": n, "args": a} for i, n, a in calls],
        usage_metadata=usage(*tokens),  # type: ignore[arg-type]
        response_metadata={"model_name": model, "model_provider": "fake"},
    )


def chat(*replies: AIMessage) -> ScriptedChat:
    return ScriptedChat(messages=iter(replies))


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def flaky(x: str) -> str:
    """Fails with a tool error the agent sees."""
    raise ToolException(f"no {x}")


flaky.handle_tool_error = True


@tool
def explode(x: str) -> str:
    """Fails with an exception that ends the run."""
    raise RuntimeError(f"boom {x}")


def recorded(recorder: SessionRecorder) -> dict[str, Session]:
    """The recorder's sessions, each checked to re-encode byte-identical."""
    recorder.flush()
    sessions = {}
    for session in recorder.drain_completed():
        data = codec.encode_session(session)
        assert codec.encode_session(codec.decode_session(data)) == data
        sessions[session.session_id] = session
    return sessions


def messages_of(session: Session, index: int = 0) -> list[Any]:
    return list(session.loops[index].messages)


# -- create_agent ---------------------------------------------------------------------------------


def test_create_agent_tools_usage_and_model_per_response() -> None:
    recorder = SessionRecorder()
    model = chat(
        reply("", ("c1", "add", {"a": 1, "b": 2}), ("c2", "flaky", {"x": "y"}), tokens=(10, 5)),
        reply("It is 3", tokens=(20, 3)),
    )
    agent = create_agent(model, tools=[add, flaky], checkpointer=InMemorySaver())
    out = agent.invoke(
        {"messages": [("user", "add 1 2")]},
        {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "t1"}},
    )
    assert out["messages"][-1].content == "It is 3"

    session = recorded(recorder)["t1"]
    (loop,) = session.loops
    assert loop.status == "Completed" and loop.turn_count() == 2
    user, first, *results, last = loop.messages
    assert isinstance(user, UserMessage) and user.content[0].text == "add 1 2"  # type: ignore[union-attr]
    assert isinstance(first, AssistantMessage) and first.stop_reason == "toolUse"
    assert [b for b in first.content if isinstance(b, ToolCall)] == [
        ToolCall(id="c1", name="add", arguments={"a": 1, "b": 2}),
        ToolCall(id="c2", name="flaky", arguments={"x": "y"}),
    ]
    assert (first.model, first.provider) == ("fake-1", "fake")
    by_id = {r.tool_call_id: r for r in results}
    assert isinstance(by_id["c1"], ToolResultMessage) and by_id["c1"].content[0].text == "3"  # type: ignore[union-attr]
    assert by_id["c2"].is_error and not by_id["c1"].is_error
    assert isinstance(last, AssistantMessage) and last.stop_reason == "stop"
    # usage per response, summed by the recorder (never a run total)
    assert (loop.usage.input, loop.usage.output, loop.usage.total_tokens) == (30, 8, 38)


def test_a_second_run_in_the_thread_continues_the_first_and_the_store_loads_it(tmp_path: Any) -> None:
    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    agent = create_agent(chat(reply("one"), reply("two")), tools=[add], checkpointer=InMemorySaver())
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "thread-a"}}
    agent.invoke({"messages": [("user", "first")]}, config)
    agent.invoke({"messages": [("user", "second")]}, config)

    session = recorded(recorder)["thread-a"]
    first, second = session.loops
    assert second.parent_loop_id == first.loop_id and second.kind.kind == "Default"
    # only the new input is the second loop's input: the history is the first loop's
    assert [m.content[0].text for m in second.messages if isinstance(m, UserMessage)] == ["second"]  # type: ignore[union-attr]
    with SqliteStore(tmp_path / "s.db") as store:
        store.save(session)
        loaded = store.load("thread-a")
    assert codec.encode_session(loaded) == codec.encode_session(session)


def test_a_thread_id_that_is_no_session_id_becomes_a_uuid_keeping_the_original() -> None:
    recorder = SessionRecorder()
    agent = create_agent(chat(reply("hi")), tools=[])
    agent.invoke(
        {"messages": [("user", "x")]},
        {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "user/42.chat"}},
    )
    (session,) = recorded(recorder).values()
    assert session.session_id != "user/42.chat"
    assert session.loops[0].metadata["framework_session_id"] == "user/42.chat"


def test_a_plain_chain_or_model_call_takes_its_thread_id_from_the_config_metadata() -> None:
    """Only LangGraph copies ``configurable`` into the callbacks' metadata: a plain chain
    or a bare model call names its session with ``metadata={"thread_id": ...}``."""
    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | chat(reply("a"), reply("b"))
    chain.invoke({"q": "x"}, {"callbacks": [handler], "configurable": {"thread_id": "ignored"}})
    chain.invoke({"q": "y"}, {"callbacks": [handler], "metadata": {"thread_id": "plain"}})
    chat(reply("c")).invoke("z", {"callbacks": [handler], "metadata": {"thread_id": "plain"}})
    sessions = recorded(recorder)
    assert "ignored" not in sessions
    first, second = sessions["plain"].loops
    assert second.parent_loop_id == first.loop_id
    assert [m.content[0].text for m in second.messages] == ["z", "c"]  # type: ignore[union-attr]


def test_streaming_tokens_and_tool_call_chunks_become_message_updates() -> None:
    recorder = SessionRecorder()
    events: list[Any] = []
    model = chat(reply("let me add", ("c1", "add", {"a": 1, "b": 2})), reply("It is 3"))
    agent = create_agent(model, tools=[add])
    config: Any = {"callbacks": [PhiCallbackHandler([recorder, events.append])]}
    chunks = list(agent.stream({"messages": [("user", "add")]}, config, stream_mode="messages"))
    assert chunks
    deltas = [(e.delta.kind, e.delta.delta) for e in events if isinstance(e, MessageUpdate)]
    assert ("Text", "let") in deltas and ("ToolCallDelta", '{"a": 1, "b": 2}') in deltas
    assert "".join(t for k, t in deltas if k == "Text") == "let me addIt is 3"
    (session,) = recorded(recorder).values()
    assert session.loops[0].turn_count() == 2


def test_streamed_reasoning_and_text_blocks() -> None:
    events: list[Any] = []
    model = chat(
        AIMessage(content=[{"type": "reasoning", "reasoning": "think"}, {"type": "text", "text": "answer"}])
    )
    chunks = list(model.stream("hi", {"callbacks": [PhiCallbackHandler([events.append])]}))
    assert len(chunks) == 3
    deltas = [(e.delta.kind, e.delta.delta) for e in events if isinstance(e, MessageUpdate)]
    assert deltas == [("Thinking", "think"), ("Text", "answer")]
    (end,) = [e for e in events if type(e).__name__ == "TurnEnd"]
    assert [type(b).__name__ for b in end.message.content] == ["ThinkingContent", "TextContent"]


class ReasoningBesideText(GenericFakeChatModel):
    """A provider (DeepSeek, Ollama, Groq) that streams its reasoning in
    ``additional_kwargs["reasoning_content"]``, beside string content."""

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in (
            AIMessageChunk(content="ans", additional_kwargs={"reasoning_content": "think"}),
            AIMessageChunk(content="wer"),
        ):
            generation = ChatGenerationChunk(message=chunk)
            if run_manager:
                run_manager.on_llm_new_token(str(chunk.content), chunk=generation)
            yield generation


def test_reasoning_beside_string_content_is_recorded_before_the_text() -> None:
    answer = AIMessage(content="answer", additional_kwargs={"reasoning_content": "think"})
    events: list[Any] = []
    handler = PhiCallbackHandler([events.append])
    ReasoningBesideText(messages=iter([answer])).invoke("hi", {"callbacks": [handler]})  # not streamed
    list(ReasoningBesideText(messages=iter([answer])).stream("hi", {"callbacks": [handler]}))
    deltas = [(e.delta.kind, e.delta.delta) for e in events if isinstance(e, MessageUpdate)]
    assert deltas == [("Thinking", "think"), ("Text", "ans"), ("Text", "wer")]
    ends = [e.message for e in events if type(e).__name__ == "TurnEnd"]
    assert [
        [(type(b).__name__, getattr(b, "thinking", None) or b.text) for b in m.content] for m in ends
    ] == [[("ThinkingContent", "think"), ("TextContent", "answer")]] * 2


def test_an_agent_run_inside_a_tool_is_a_sub_agent_linked_both_ways() -> None:
    recorder = SessionRecorder()
    inner = create_agent(chat(reply("inner answer", tokens=(7, 2))), tools=[], name="researcher")

    @tool
    def research(q: str) -> str:
        """Ask the research agent."""
        return str(inner.invoke({"messages": [("user", q)]})["messages"][-1].content)

    outer = create_agent(chat(reply("", ("c9", "research", {"q": "why"})), reply("done")), tools=[research])
    outer.invoke(
        {"messages": [("user", "go")]},
        {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "outer"}},
    )
    sessions = recorded(recorder)
    parent = sessions.pop("outer")
    (child,) = sessions.values()
    child_loop = child.loops[0]
    assert child_loop.parent_loop_id == parent.loops[0].loop_id
    assert child_loop.turns[0].triggered_by == "SubAgent"
    assert [ref.child_loop_id for ref in parent.loops[0].child_loop_refs] == [child_loop.loop_id]
    assert child_loop.usage.total_tokens == 9 and parent.loops[0].usage.total_tokens == 30  # no double count


@pytest.mark.parametrize("called", ["by the model", "by another tool"])
def test_a_model_called_inside_a_tool_is_a_sub_agent_not_the_next_turn(
    called: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A tool another tool invokes is part of that tool's execution: a model it calls is
    # the outer tool's sub-agent, and no run unseen by the handler.
    recorder = SessionRecorder()
    summarizer = chat(reply("summary!", tokens=(7, 2), model="inner-model"))

    @tool
    def summarize(text: str) -> str:
        """Summarise text with an LLM."""
        return str(summarizer.invoke(f"summarise {text}").content)

    @tool("summarize")
    def research(text: str) -> str:
        """Research: summarises with the other tool."""
        return str(summarize.invoke({"text": text}))

    tools = [summarize if called == "by the model" else research]
    outer = create_agent(chat(reply("", ("c1", "summarize", {"text": "abc"})), reply("done")), tools=tools)
    with caplog.at_level("WARNING", logger="phi_session.adapters.langchain"):
        outer.invoke(
            {"messages": [("user", "go")]},
            {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "outer"}},
        )
    assert caplog.records == []
    sessions = recorded(recorder)
    (loop,) = sessions.pop("outer").loops
    (child,) = sessions.values()
    assert loop.status == "Completed" and loop.turn_count() == 2
    assert [type(m).__name__ for m in loop.messages] == [
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
    ]
    result = loop.messages[2]
    assert isinstance(result, ToolResultMessage) and not result.is_error
    assert result.content[0].text == "summary!"  # type: ignore[union-attr]
    (child_loop,) = child.loops
    assert child_loop.parent_loop_id == loop.loop_id and child_loop.turns[0].triggered_by == "SubAgent"
    assert [ref.child_loop_id for ref in loop.child_loop_refs] == [child_loop.loop_id]
    assert [m.content[0].text for m in child_loop.messages] == ["summarise abc", "summary!"]  # type: ignore[union-attr]
    assert child_loop.usage.total_tokens == 9 and loop.usage.total_tokens == 30


def test_a_chain_without_a_model_run_by_a_tool_is_part_of_its_execution_not_a_sub_agent() -> None:
    recorder = SessionRecorder()
    shout_chain = ChatPromptTemplate.from_template("format {x}") | RunnableLambda(
        lambda prompt: prompt.to_string().upper()
    )

    @tool
    def shout(x: str) -> str:
        """Shouts x."""
        return str(shout_chain.invoke({"x": x}))

    agent = create_agent(chat(reply("", ("c1", "shout", {"x": "hi"})), reply("done")), tools=[shout])
    agent.invoke(
        {"messages": [("user", "go")]},
        {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "t"}},
    )
    sessions = recorded(recorder)
    assert list(sessions) == ["t"]  # no sub-agent session
    (loop,) = sessions["t"].loops
    assert not loop.child_loop_refs
    (result,) = loop.turns[0].tool_results
    assert result.content[0].text == "HUMAN: FORMAT HI"  # type: ignore[union-attr]


def test_a_tool_invoked_by_a_tool_is_part_of_its_execution_not_a_call_of_the_model() -> None:
    recorder = SessionRecorder()

    @tool
    def double(x: int) -> int:
        """Doubles x."""
        return 2 * x

    @tool
    def quadruple(x: int) -> int:
        """Quadruples x."""
        return double.invoke({"x": double.invoke({"x": x})})

    agent = create_agent(chat(reply("", ("c1", "quadruple", {"x": 3})), reply("12")), tools=[quadruple])
    agent.invoke({"messages": [("user", "go")]}, {"callbacks": [PhiCallbackHandler([recorder])]})
    (session,) = recorded(recorder).values()
    (loop,) = session.loops
    results = [(m.tool_call_id, m.content[0].text) for m in loop.messages if isinstance(m, ToolResultMessage)]
    assert results == [("c1", "12")]
    assert loop.status == "Completed"


@pytest.mark.parametrize("depth", [MAX_VALUE_DEPTH, MAX_VALUE_DEPTH + 1])
def test_tool_arguments_nested_to_phi_cores_limit_are_kept_and_deeper_ones_cut_to_it(depth: int) -> None:
    # The deepest place a session holds tool arguments: a captured request's messages,
    # in the TurnRequest event among the loop's events.
    deep: Any = "leaf"
    for _ in range(depth - 1):
        deep = {"k": deep}

    @tool
    def inspect(v: Any) -> str:
        """Looks at v."""
        return "seen"

    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder], capture_requests=True)
    agent = create_agent(chat(reply("", ("c1", "inspect", {"v": deep})), reply("done")), tools=[inspect])
    agent.invoke({"messages": [("user", "go")]}, {"callbacks": [handler], "configurable": {"thread_id": "d"}})
    (loop,) = recorded(recorder)["d"].loops  # encoded and decoded: phi-core reads it
    (call,) = [block for block in loop.messages[1].content if isinstance(block, ToolCall)]  # type: ignore[union-attr]
    requests = [entry.event.payload for entry in loop.events if isinstance(entry.event, TurnRequest)]
    (resent,) = [block for block in requests[1].messages[1].content if isinstance(block, ToolCall)]  # type: ignore[union-attr]
    assert resent.arguments == call.arguments
    if depth == MAX_VALUE_DEPTH:
        assert call.arguments == {"v": deep} and handler.core.tracer.argument_failures == 0
    else:
        assert call.arguments != {"v": deep} and handler.core.tracer.argument_failures > 0


class Opaque:
    """Not JSON."""


def test_a_tool_run_for_a_call_records_the_calls_arguments_not_its_input() -> None:
    # The node hands the tool an input holding a cycle and an object: the execution's
    # arguments are those the model sent, its input never recorded.
    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    state: dict[str, Any] = {"n": 1, "obj": Opaque()}
    state["self"] = state
    model = chat(reply("", ("c1", "inspect", {"state": {"n": 1}})))

    @tool
    def inspect(state: Any) -> str:
        """Looks at the state."""
        return "seen"

    def step(_: Any, config: Any) -> Any:
        model.invoke("go", config)
        return inspect.run({"state": state}, callbacks=config["callbacks"], tool_call_id="c1")

    assert RunnableLambda(step).invoke("go", {"callbacks": [handler]}).content == "seen"
    (session,) = recorded(recorder).values()
    (loop,) = session.loops
    (start,) = [entry.event for entry in loop.events if isinstance(entry.event, ToolExecutionStart)]
    assert start.args == {"state": {"n": 1}}
    (result,) = loop.turns[0].tool_results
    assert result.content[0].text == "seen"  # type: ignore[union-attr]
    assert handler.core.fault_count == 0


def test_a_run_going_on_after_the_handler_closed_under_it_is_no_fault() -> None:
    started, proceed = threading.Event(), threading.Event()

    @tool
    def wait(x: str) -> str:
        """Waits to be let go."""
        started.set()
        proceed.wait(10)
        return x

    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    agent = create_agent(chat(reply("", ("c1", "wait", {"x": "y"})), reply("done")), tools=[wait])
    run = threading.Thread(
        target=agent.invoke, args=({"messages": [("user", "go")]}, {"callbacks": [handler]})
    )
    run.start()
    assert started.wait(10)
    handler.close()
    proceed.set()  # the tool returns and the model is called again, after the close
    run.join()
    (session,) = recorded(recorder).values()
    (loop,) = session.loops
    assert (loop.status, loop.error) == ("Aborted", "the langchain adapter was closed during the run")
    assert handler.core.fault_count == 0
    assert handler.core._book._claims == {}  # the model call after the close claimed nothing


def test_an_exception_ends_the_loop_aborted_and_reaches_the_host_unchanged() -> None:
    recorder = SessionRecorder()
    agent = create_agent(chat(reply("", ("c1", "explode", {"x": "y"}))), tools=[explode])
    with pytest.raises(RuntimeError, match="boom y"):
        agent.invoke({"messages": [("user", "go")]}, {"callbacks": [PhiCallbackHandler([recorder])]})
    (session,) = recorded(recorder).values()
    loop = session.loops[0]
    assert loop.status == "Aborted" and "boom y" in (loop.error or "")
    (result,) = [m for m in loop.messages if isinstance(m, ToolResultMessage)]
    assert result.is_error


def test_two_concurrent_runs_in_threads_keep_their_own_loops() -> None:
    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    barrier = threading.Barrier(2)

    @tool
    def meet(who: str) -> str:
        """Waits for the other run, so both are mid-run at once."""
        barrier.wait(timeout=10)
        return f"met {who}"

    def run(name: str) -> None:
        agent = create_agent(
            chat(reply("", (f"c-{name}", "meet", {"who": name})), reply(f"bye {name}")), tools=[meet]
        )
        agent.invoke(
            {"messages": [("user", name)]},
            {"callbacks": [handler], "configurable": {"thread_id": f"run-{name}"}},
        )

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sessions = recorded(recorder)
    for name in ("a", "b"):
        loop = sessions[f"run-{name}"].loops[0]
        assert loop.status == "Completed" and loop.turn_count() == 2
        texts = [b.text for m in loop.messages for b in m.content if hasattr(b, "text")]  # type: ignore[union-attr]
        assert texts == [name, f"met {name}", f"bye {name}"]


def test_async_runs_with_the_async_handler_interleave_correctly() -> None:
    recorder = SessionRecorder()
    handler = AsyncPhiCallbackHandler([recorder])

    async def run(name: str) -> None:
        agent = create_agent(
            chat(reply("", (f"c-{name}", "add", {"a": 1, "b": 1})), reply(f"bye {name}")), tools=[add]
        )
        await agent.ainvoke(
            {"messages": [("user", name)]},
            {"callbacks": [handler], "configurable": {"thread_id": f"async-{name}"}},
        )

    async def both() -> None:
        await asyncio.gather(run("a"), run("b"))

    asyncio.run(both())
    sessions = recorded(recorder)
    for name in ("a", "b"):
        loop = sessions[f"async-{name}"].loops[0]
        assert loop.status == "Completed" and loop.turn_count() == 2
        assert loop.messages[-1].content[0].text == f"bye {name}"  # type: ignore[union-attr]


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
@pytest.mark.parametrize("attached", ["listed twice", "two sharing a recorder", "model and config"])
def test_a_handler_attached_twice_records_each_run_once(handler: type, attached: str) -> None:
    """LangChain calls a handler listed twice (or handlers recording into the same place)
    once per listing for the root run's own callbacks: the run is recorded once."""
    recorder, deltas = SessionRecorder(), TextDeltas()
    first = handler([recorder, deltas])
    second = handler([deltas, recorder]) if attached == "two sharing a recorder" else first
    callbacks = [first] if attached == "model and config" else [first, second]
    bare = chat(reply("one two"))
    if attached == "model and config":
        bare.callbacks = [first]
    agent = create_agent(
        chat(reply("", ("c1", "add", {"a": 1, "b": 2})), reply("It is 3")),
        tools=[add],
        checkpointer=InMemorySaver(),
    )
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | chat(reply("chained"))

    async def run_all() -> None:
        await collected(bare.astream("hi", {"callbacks": callbacks, "metadata": {"thread_id": "bare"}}))
        await agent.ainvoke(
            {"messages": [("user", "add")]}, {"callbacks": callbacks, "configurable": {"thread_id": "agent"}}
        )
        await chain.ainvoke({"q": "x"}, {"callbacks": callbacks, "metadata": {"thread_id": "chain"}})

    if handler is AsyncPhiCallbackHandler:
        asyncio.run(run_all())
    else:
        list(bare.stream("hi", {"callbacks": callbacks, "metadata": {"thread_id": "bare"}}))
        agent.invoke(
            {"messages": [("user", "add")]}, {"callbacks": callbacks, "configurable": {"thread_id": "agent"}}
        )
        chain.invoke({"q": "x"}, {"callbacks": callbacks, "metadata": {"thread_id": "chain"}})
    sessions = recorded(recorder)
    for thread, turns, last in (("bare", 1, "one two"), ("agent", 2, "It is 3"), ("chain", 1, "chained")):
        (loop,) = sessions[thread].loops
        assert loop.status == "Completed" and loop.turn_count() == turns
        assert loop.messages[-1].content[0].text == last  # type: ignore[union-attr]
    assert deltas.texts == ["one", " ", "two"]  # the bare call's, each once
    assert first.core.fault_count == second.core.fault_count == 0


@pytest.mark.parametrize("config", ["none", "the same", "another sharing the recorder"])
def test_a_handler_set_on_the_model_records_its_calls_inside_a_graph_once(
    config: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph's run is unknown to a handler given to the model alone: each model call
    is then a loop of its own in the thread's session, and a warning names the fix once."""
    monkeypatch.setattr(langchain_adapter, "_warned_unseen", False)  # not yet in this process
    recorder = SessionRecorder()
    on_model = PhiCallbackHandler([recorder])
    in_config = {
        "none": [],
        "the same": [on_model],
        "another sharing the recorder": [PhiCallbackHandler([recorder])],
    }
    model = chat(reply("", ("c1", "add", {"a": 1, "b": 2}), tokens=(4, 2)), reply("It is 3", tokens=(6, 1)))
    model.callbacks = [on_model]
    agent = create_agent(model, tools=[add], checkpointer=InMemorySaver())
    run_config: Any = {"callbacks": in_config[config], "configurable": {"thread_id": "m1"}}
    with caplog.at_level("WARNING", logger="phi_session.adapters.langchain"):
        agent.invoke({"messages": [("user", "add")]}, run_config)
    assert on_model.core.fault_count == 0
    loops = recorded(recorder)["m1"].loops
    texts = [(type(m).__name__, getattr(m.content[0], "text", None)) for loop in loops for m in loop.messages]  # type: ignore[union-attr]
    assert sum(loop.usage.input for loop in loops) == 10 and all(loop.status == "Completed" for loop in loops)
    warned = [r for r in caplog.records if "config" in r.getMessage()]
    if config == "none":
        # tools and the graph are not seen: the tool's result is the next call's input
        assert [loop.turn_count() for loop in loops] == [1, 1]
        assert loops[1].parent_loop_id == loops[0].loop_id
        assert texts == [
            ("UserMessage", "add"),
            ("AssistantMessage", None),  # its tool call
            ("ToolResultMessage", "3"),
            ("AssistantMessage", "It is 3"),
        ]
        (warning,) = warned
        assert "callbacks" in warning.getMessage()
    else:
        (loop,) = loops
        assert loop.turn_count() == 2 and texts[-1] == ("AssistantMessage", "It is 3")
        assert warned == []


def test_handlers_made_per_request_on_the_model_warn_once_in_the_process(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(langchain_adapter, "_warned_unseen", False)
    recorder = SessionRecorder()
    with caplog.at_level("WARNING", logger="phi_session.adapters.langchain"):
        for request in range(3):
            model = chat(reply("hi"))
            model.callbacks = [PhiCallbackHandler([recorder])]
            create_agent(model, tools=[]).invoke(
                {"messages": [("user", "x")]}, {"configurable": {"thread_id": f"w{request}"}}
            )
    assert len(recorded(recorder)) == 3
    assert len([r for r in caplog.records if "not attached" in r.getMessage()]) == 1


class TextDeltas:
    """A sink keeping the text deltas of the streamed replies."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: Any) -> None:
        if isinstance(event, MessageUpdate) and event.delta.kind == "Text":
            self.texts.append(event.delta.delta)


async def collected(chunks: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in chunks]


class Hanging(GenericFakeChatModel):
    """A model that never answers (streamed: after one token), keeping weak references
    to the messages it was sent in `sent`."""

    sent: list[Any] = Field(default_factory=list)

    async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        self.sent.extend(weakref.ref(message) for message in messages)
        await asyncio.Event().wait()

    async def _astream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        self.sent.extend(weakref.ref(message) for message in messages)
        chunk = ChatGenerationChunk(message=AIMessageChunk(content="partial"))
        if run_manager:
            await run_manager.on_llm_new_token("partial", chunk=chunk)
        yield chunk
        await asyncio.Event().wait()


@pytest.mark.parametrize("how", ["task cancelled", "stream abandoned"])
@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
def test_a_run_dropped_during_a_model_call_leaves_nothing_held(handler: type, how: str) -> None:
    # LangChain ends no model call it drops (no on_llm_end, no on_llm_error): the run's
    # end lets go of it, and of the messages the run was sent.
    model = Hanging(messages=iter([]))
    recorder = SessionRecorder()
    config: Any = {"callbacks": [handler([recorder])], "configurable": {"thread_id": "dropped"}}
    inputs = {"messages": [("user", "go")]}

    async def drop() -> None:
        agent = create_agent(model, tools=[])
        if how == "task cancelled":
            task = asyncio.create_task(agent.ainvoke(inputs, config))
            while not model.sent:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:  # the host stops reading after the first token
            stream = agent.astream(inputs, config, stream_mode="messages")
            await anext(stream)
            await stream.aclose()

    asyncio.run(drop())
    gc.collect()
    assert model.sent and [ref() for ref in model.sent] == [None] * len(model.sent)
    (loop,) = recorded(recorder)["dropped"].loops
    assert loop.status == "Aborted"


def test_capture_requests_records_the_turn_request() -> None:
    events: list[Any] = []
    agent = create_agent(
        chat(reply("", ("c1", "add", {"a": 1, "b": 2})), reply("3")), tools=[add], system_prompt="You add."
    )
    agent.invoke(
        {"messages": [("user", "add")]},
        {"callbacks": [PhiCallbackHandler([events.append], capture_requests=True)]},
    )
    requests = [e for e in events if isinstance(e, TurnRequest)]
    assert len(requests) == 2
    first = requests[0].payload
    assert first.system_prompt == "You add." and [t.name for t in first.tools] == ["add"]
    assert len(requests[1].payload.messages) == 3  # user, assistant with the call, tool result


class EditingChat(ScriptedChat):
    """A chat model whose host edits the history between model calls: the first call
    rewrites the prompt, the second the arguments of the first tool call, in place."""

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        calls = sum(isinstance(message, AIMessage) for message in messages)
        if calls == 0:
            messages[0].content = "add, please"
        elif calls == 1:
            first = next(message for message in messages if isinstance(message, AIMessage))
            first.tool_calls[0]["args"]["a"] = 5
        return super()._generate(messages, *args, **kwargs)


def test_captured_requests_hold_each_message_as_it_is_at_that_call() -> None:
    """The adapter converts the history it resends once (a memo), yet each request holds
    every message as it is when that model call starts, with that call's timestamp."""
    events: list[Any] = []
    ticks = itertools.count(1_000_000_000, 1_000_000_000)  # a second a reading
    handler = PhiCallbackHandler(
        [events.append], capture_requests=True, agent=AgentSession(clock=lambda: next(ticks))
    )
    model = EditingChat(
        messages=iter(
            [
                reply("", ("c1", "add", {"a": 1, "b": 2})),
                reply("", ("c2", "add", {"a": 3, "b": 4})),
                reply("9"),
            ]
        )
    )
    create_agent(model, tools=[add]).invoke({"messages": [("user", "add")]}, {"callbacks": [handler]})
    requests = [e.payload for e in events if isinstance(e, TurnRequest)]
    assert [len(request.messages) for request in requests] == [1, 3, 5]
    prompts = [request.messages[0] for request in requests]
    assert [p.content[0].text for p in prompts] == ["add", "add, please", "add, please"]  # type: ignore[union-attr]
    first_calls = [request.messages[1].content[0] for request in requests[1:]]  # type: ignore[union-attr]
    assert [call.arguments for call in first_calls] == [{"a": 1, "b": 2}, {"a": 5, "b": 2}]  # type: ignore[union-attr]
    stamps = [{message.timestamp for message in request.messages} for request in requests]
    assert all(len(stamp) == 1 for stamp in stamps)  # each message stamped with its request
    assert sorted(set().union(*stamps)) == [stamp for (stamp,) in stamps] and len(set().union(*stamps)) == 3
    # The recorded prompt is the one the first call saw.
    prompt = next(
        e.message for e in events if isinstance(e, MessageEnd) and isinstance(e.message, UserMessage)
    )
    assert prompt.content[0].text == "add"


def test_an_adapter_fault_never_reaches_the_host(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from phi_session.adapters import langchain as adapter

    def broken(*args: Any) -> Any:
        raise ValueError("adapter bug")

    monkeypatch.setattr(adapter, "_tool_calls", broken)
    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    agent = create_agent(chat(reply("", ("c1", "add", {"a": 1, "b": 2})), reply("3")), tools=[add])
    out = agent.invoke({"messages": [("user", "add")]}, {"callbacks": [handler]})
    assert out["messages"][-1].content == "3"  # the run went on, its result unchanged
    assert handler.core.fault_count == 2  # both model replies
    faults = [r for r in caplog.records if "adapter bug" in r.getMessage() or "ValueError" in r.getMessage()]
    assert len(faults) == 1  # reported once, then counted
    recorded(recorder)  # what was recorded still loads


# -- a hand-built StateGraph with a checkpointer ------------------------------------------------------


class State(TypedDict):
    messages: Annotated[list[BaseMessage], add_messages]


def approval_graph(model: ScriptedChat) -> Any:
    def call(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def ask(state: State) -> dict[str, Any]:
        answer = interrupt({"question": "approve?"})
        return {"messages": [HumanMessage(content=f"approved: {answer}")]}

    graph = StateGraph(State)
    graph.add_node("call", call)
    graph.add_node("ask", ask)
    graph.add_edge(START, "call")
    graph.add_edge("call", "ask")
    graph.add_edge("ask", END)
    return graph.compile(checkpointer=InMemorySaver())


def test_state_graph_interrupt_resume_and_time_travel() -> None:
    recorder = SessionRecorder()
    app = approval_graph(chat(reply("draft"), reply("redraft")))
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "g1"}}
    out = app.invoke({"messages": [("user", "write")]}, config)
    assert "__interrupt__" in out
    app.invoke(Command(resume="yes"), config)
    fork = list(app.get_state_history({"configurable": {"thread_id": "g1"}}))[-2].config
    app.invoke(None, {**fork, "callbacks": config["callbacks"]})

    session = recorded(recorder)["g1"]
    interrupted, resumed, branch = session.loops
    assert interrupted.status == "Completed"
    (mark,) = [m for m in interrupted.messages if isinstance(m, ExtensionMessage)]
    assert mark.kind == "langgraph.interrupt" and mark.data[0]["value"] == {"question": "approve?"}
    assert resumed.parent_loop_id == interrupted.loop_id and resumed.kind.kind == "Default"
    assert any(
        isinstance(m, ExtensionMessage) and m.kind == "langgraph.resume" and m.data == "yes"
        for m in resumed.messages
    )
    assert branch.kind.kind == "Branch" and branch.kind.tag == fork["configurable"]["checkpoint_id"]


def test_a_tool_that_interrupts_has_not_failed_and_the_resumed_run_has_its_result() -> None:
    @tool
    def book(city: str) -> str:
        """Book a trip, once a human confirms."""
        return f"booked {city}: {interrupt({'confirm': city})}"

    recorder = SessionRecorder()
    agent = create_agent(
        chat(reply("", ("c1", "book", {"city": "Oslo"})), reply("done")),
        tools=[book],
        checkpointer=InMemorySaver(),
    )
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "trip"}}
    (raised,) = agent.invoke({"messages": [("user", "book Oslo")]}, config)["__interrupt__"]
    agent.invoke(Command(resume="yes"), config)

    interrupted, resumed = recorded(recorder)["trip"].loops
    assert interrupted.status == "Completed"
    (paused,) = [m for m in interrupted.messages if isinstance(m, ToolResultMessage)]
    assert not paused.is_error and paused.content[0].text == "[interrupted]"  # type: ignore[union-attr]
    (mark,) = [m for m in interrupted.messages if isinstance(m, ExtensionMessage)]
    assert mark.data == [{"value": {"confirm": "Oslo"}, "id": raised.id}]  # once, not per level
    (result,) = [m for m in resumed.messages if isinstance(m, ToolResultMessage)]
    assert result.tool_call_id == "c1" and result.content[0].text == "booked Oslo: yes"  # type: ignore[union-attr]


@pytest.mark.parametrize("inner", ["agent", "model"])
def test_a_sub_agent_a_resumed_tool_runs_before_any_model_call_is_recorded_linked_to_the_caller(
    inner: str,
) -> None:
    # The resumed run's tool runs outside any model turn (it is no tool execution of the
    # resumed loop); what it runs is a sub-agent of the loop whose model called it.
    researcher = create_agent(chat(reply("inner answer", tokens=(70, 7))), tools=[], name="researcher")
    summarizer = chat(reply("inner answer", tokens=(70, 7)))

    @tool
    def research(q: str) -> str:
        """Research, once approved."""
        interrupt({"approve": q})
        if inner == "agent":
            return str(researcher.invoke({"messages": [("user", q)]})["messages"][-1].content)
        return str(summarizer.invoke(q).content)

    recorder = SessionRecorder()
    agent = create_agent(
        chat(reply("", ("c1", "research", {"q": "why"}), tokens=(10, 1)), reply("done", tokens=(20, 2))),
        tools=[research],
        checkpointer=InMemorySaver(),
    )
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "hitl"}}
    agent.invoke({"messages": [("user", "go")]}, config)
    agent.invoke(Command(resume="yes"), config)

    sessions = recorded(recorder)
    interrupted, resumed = sessions.pop("hitl").loops
    (child,) = sessions.values()
    (child_loop,) = child.loops
    assert child_loop.parent_loop_id == interrupted.loop_id and child_loop.loop_id.endswith(".sub.1")
    assert child.parent_spawn_ref is not None
    assert child.parent_spawn_ref.parent_loop_id == interrupted.loop_id
    assert child_loop.turns[0].triggered_by == "SubAgent"
    assert [m.content[0].text for m in child_loop.messages] == ["why", "inner answer"]  # type: ignore[union-attr]
    (result,) = [m for m in resumed.messages if isinstance(m, ToolResultMessage)]
    assert result.content[0].text == "inner answer"  # type: ignore[union-attr]
    usage = [loop.usage.total_tokens for loop in (interrupted, resumed, child_loop)]
    assert usage == [11, 22, 77]


def _add_then_book() -> Any:
    """An agent whose model calls add (c1) and book (c2) at once; booking interrupts for a
    human's answer, then the model says it is done."""

    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @tool
    def book(city: str) -> str:
        """Book a trip, once a human confirms."""
        return f"booked {city}: {interrupt({'confirm': city})}"

    calls = (("c1", "add", {"a": 1, "b": 2}), ("c2", "book", {"city": "Oslo"}))
    return create_agent(
        chat(reply("", *calls), reply("done")), tools=[add, book], checkpointer=InMemorySaver()
    )


@pytest.mark.parametrize("handlers", ["one", "one per run", "one per run, closed between"])
@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
def test_a_resumed_run_records_only_the_interrupted_calls_result(
    handler: type, handlers: str, tmp_path: Any
) -> None:
    # The call answered before the interrupt is sent to the model again by the resumed
    # run: it was recorded in the interrupted loop, and is no input of the resumed one,
    # whichever handler records the resumed run (a new one: the README's per-call
    # handler; after the first closed: as after a restart, knowing only the store).
    recorder = SessionRecorder()
    agent = _add_then_book()
    store = SqliteStore(tmp_path / "s.db")
    first = handler([recorder]) if handlers != "one per run, closed between" else handler(store=store)
    second = first if handlers == "one" else handler([recorder]) if handlers == "one per run" else None

    async def both_runs() -> None:
        config: Any = {"callbacks": [first], "configurable": {"thread_id": "both"}}
        await agent.ainvoke({"messages": [("user", "add, then book")]}, config)
        if second is None:
            first.close()
        config["callbacks"] = [second if second is not None else handler(store=store)]
        await agent.ainvoke(Command(resume="yes"), config)
        config["callbacks"][0].close()

    asyncio.run(both_runs())
    interrupted, resumed = (store.load("both") if second is None else recorded(recorder)["both"]).loops
    store.close()
    results = [m for m in interrupted.turns[0].tool_results if isinstance(m, ToolResultMessage)]
    answered = sorted((m.tool_call_id, m.content[0].text) for m in results)  # type: ignore[union-attr]
    assert answered == [("c1", "3"), ("c2", "[interrupted]")]  # (concurrent tools: any order)
    again = [m for m in resumed.messages if isinstance(m, ToolResultMessage)]
    assert [(m.tool_call_id, m.content[0].text) for m in again] == [("c2", "booked Oslo: yes")]  # type: ignore[union-attr]


def test_other_frameworks_runs_leave_a_threads_interrupt_note_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every pydantic-ai run notes its loop in the book of its destination (9c4fa3b), which
    # held one LRU of 4096 notes for all: 4,100 pydantic-ai runs into the recorder while a
    # LangGraph thread waited for its human pushed the thread's interrupt note out, and the
    # resumed run recorded c1, answered before the interrupt, again as a new input. The
    # bound is made small here; the runs' notes and the interrupts' are kept apart.
    pydantic_ai = pytest.importorskip(
        "pydantic_ai", reason="needs the extra: pip install 'phi-session[pydantic-ai]'"
    )
    from pydantic_ai.models.test import TestModel

    from phi_session.adapters import _sessions
    from phi_session.adapters.pydantic_ai import PhiCapability

    monkeypatch.setattr(_sessions, "_NOTES_KEPT", 8)

    recorder = SessionRecorder()
    graph = _add_then_book()
    other = pydantic_ai.Agent(TestModel(), capabilities=[PhiCapability(recorder)])

    async def main() -> None:
        config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "both"}}
        await graph.ainvoke({"messages": [("user", "add, then book")]}, config)
        for n in range(3 * _sessions._NOTES_KEPT):  # other traffic while the human decides
            await other.run(f"q{n}")
        config["callbacks"] = [PhiCallbackHandler([recorder])]
        await graph.ainvoke(Command(resume="yes"), config)

    asyncio.run(main())
    interrupted, resumed = recorded(recorder)["both"].loops
    assert resumed.parent_loop_id == interrupted.loop_id and resumed.kind.kind == "Default"
    again = [m for m in resumed.messages if isinstance(m, ToolResultMessage)]
    assert [(m.tool_call_id, m.content[0].text) for m in again] == [("c2", "booked Oslo: yes")]  # type: ignore[union-attr]


@pytest.mark.parametrize("handlers", ["one", "one per run, closed between"])
def test_a_tool_error_cut_short_by_an_interrupt_is_an_input_of_the_resumed_run(
    handlers: str, tmp_path: Any
) -> None:
    # c1 fails and c2 interrupts in one tool node step: the node ends with the interrupt,
    # not its output, so the interrupted loop has c1's exception; the model is sent the
    # tool node's answer to it by the resumed run, which records that answer as an input.
    failed = threading.Event()

    @tool
    def ask(x: str) -> str:
        """Asks a human."""
        failed.wait(10)  # c1's failure first: its end is held when the interrupt comes
        return f"human said {interrupt({'q': x})}"

    class Failed(BaseCallbackHandler):
        def on_tool_error(self, error: BaseException, **kwargs: Any) -> None:
            failed.set()

    store = SqliteStore(tmp_path / "s.db")
    first = PhiCallbackHandler(store=store)
    app = tool_node_graph(
        chat(reply("", ("c1", "refuse", {"x": "b"}), ("c2", "ask", {"x": "q"})), reply("done")), [refuse, ask]
    )
    config: Any = {"callbacks": [first, Failed()], "configurable": {"thread_id": "t"}}
    app.invoke({"messages": [("user", "go")]}, config)
    if handlers != "one":
        first.close()
        config["callbacks"] = [PhiCallbackHandler(store=store)]
    out = app.invoke(Command(resume="yes"), config)
    config["callbacks"][0].close()
    sent = [(m.tool_call_id, m.content) for m in out["messages"] if isinstance(m, ToolMessage)]
    assert sent == [
        ("c1", "Error: ValueError('bad b')\n Please fix your mistakes."),
        ("c2", "human said yes"),
    ]
    interrupted, resumed = store.load("t").loops
    store.close()
    results = [(m.tool_call_id, m.content[0].text) for m in interrupted.turns[0].tool_results]  # type: ignore[union-attr]
    assert sorted(results) == [("c1", "refuse failed: ValueError: bad b"), ("c2", "[interrupted]")]
    again = [
        (m.tool_call_id, m.content[0].text) for m in resumed.messages if isinstance(m, ToolResultMessage)
    ]  # type: ignore[union-attr]
    assert again == sent


def test_an_interrupt_in_a_subgraph_is_recorded_once() -> None:
    inner = approval_graph(chat(reply("draft")))  # model, then interrupt(), in a subgraph
    graph = StateGraph(State)
    graph.add_node("inner", inner)
    graph.add_edge(START, "inner")
    graph.add_edge("inner", END)
    recorder = SessionRecorder()
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "nest"}}
    out = graph.compile(checkpointer=InMemorySaver()).invoke({"messages": [("user", "write")]}, config)
    (raised,) = out["__interrupt__"]
    (loop,) = recorded(recorder)["nest"].loops
    (mark,) = [m for m in loop.messages if isinstance(m, ExtensionMessage)]
    assert mark.data == [{"value": {"question": "approve?"}, "id": raised.id}]


class RoutedState(State):
    route: str


def test_a_message_resent_to_a_later_model_call_is_recorded_once() -> None:
    """A router's reply is not added to the messages: the answering call resends the
    user's message, which the loop recorded already (by id, given by the graph)."""
    router, answer = chat(reply("billing")), chat(reply("Here it is"))
    graph = StateGraph(RoutedState)
    graph.add_node("route", lambda state: {"route": router.invoke(state["messages"]).content})
    graph.add_node("answer", lambda state: {"messages": [answer.invoke(state["messages"])]})
    graph.add_edge(START, "route")
    graph.add_edge("route", "answer")
    graph.add_edge("answer", END)
    recorder = SessionRecorder()
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "route"}}
    graph.compile().invoke({"messages": [("user", "where is my invoice?")]}, config)
    (loop,) = recorded(recorder)["route"].loops
    assert [type(m).__name__ for m in loop.messages] == [
        "UserMessage",
        "AssistantMessage",
        "AssistantMessage",
    ]


def test_a_message_without_an_id_resent_is_recorded_once_and_an_equal_new_one_again() -> None:
    model = chat(reply("a"), reply("b"), reply("c"))
    prompt = HumanMessage(content="hi")

    def twice(_: Any) -> Any:
        model.invoke([prompt])
        model.invoke([prompt])  # the same message again
        return model.invoke([HumanMessage(content="hi")])  # another one, equal to it

    recorder = SessionRecorder()
    RunnableLambda(twice).invoke(None, {"callbacks": [PhiCallbackHandler([recorder])]})
    (session,) = recorded(recorder).values()
    texts = [(type(m).__name__, m.content[0].text) for m in session.loops[0].messages]  # type: ignore[union-attr]
    assert texts == [
        ("UserMessage", "hi"),
        ("AssistantMessage", "a"),
        ("AssistantMessage", "b"),
        ("UserMessage", "hi"),
        ("AssistantMessage", "c"),
    ]


def test_state_graph_async_with_the_sync_handler() -> None:
    recorder = SessionRecorder()
    app = approval_graph(chat(reply("draft")))
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "g2"}}
    out = asyncio.run(app.ainvoke({"messages": [("user", "write")]}, config))
    assert "__interrupt__" in out
    loop = recorded(recorder)["g2"].loops[0]
    assert loop.status == "Completed" and loop.turn_count() == 1


def test_a_bare_model_call_is_a_loop_of_its_own_with_its_usage_split() -> None:
    recorder = SessionRecorder()
    answer = AIMessage(
        content="hello",
        usage_metadata={  # LangChain's input_tokens include the cache's
            "input_tokens": 100,
            "output_tokens": 10,
            "total_tokens": 110,
            "input_token_details": {"cache_read": 60, "cache_creation": 20},
            "output_token_details": {"reasoning": 4},
        },
    )
    chat(answer).invoke("hi", {"callbacks": [PhiCallbackHandler([recorder])]})
    (session,) = recorded(recorder).values()
    loop = session.loops[0]
    assert loop.turn_count() == 1
    assert loop.usage == Usage(
        input=20, output=10, reasoning=4, cache_read=60, cache_write=20, total_tokens=110
    )


def test_importing_the_adapter_without_langchain_names_the_pip_install() -> None:
    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "try:\n    import phi_session.adapters.langchain\nexcept ImportError as error:\n"
        "    print(type(error).__name__, error)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MissingExtra ") and "pip install 'phi-session[langchain]'" in out


def test_the_example_records_into_a_store_and_a_restart_continues_the_session(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "adapter_langchain.py"
    monkeypatch.setattr(sys, "argv", ["adapter_langchain.py", str(tmp_path / "sessions.db")])
    for _ in range(2):  # a second process run: loop ids go on from the stored ones
        runpy.run_path(str(example), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0].rsplit(".", 1)[1] for line in printed[2:]] == ["1", "2", "3", "4"]
    assert all(" Completed " in line and "2 turns 900 tokens" in line for line in printed)
    assert printed[-1].split()[2] == "Default"


@tool
def transfer_to_bob(tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:
    """Hand the conversation to Bob."""
    return Command(
        goto="bob",
        graph=Command.PARENT,
        update={"messages": [ToolMessage(content="Bob takes over", tool_call_id=tool_call_id)]},
    )


def team(alice_model: Any, bob_model: Any) -> Any:
    """Alice, who hands the conversation over to Bob (`transfer_to_bob`), then Bob."""
    alice = create_agent(alice_model, tools=[transfer_to_bob], name="alice")
    bob = create_agent(bob_model, tools=[], name="bob")
    graph = StateGraph(State)
    graph.add_node("alice", alice, destinations=("bob",))
    graph.add_node("bob", bob)
    graph.add_edge(START, "alice")
    graph.add_edge("bob", END)
    return graph.compile()


def team_models() -> tuple[ScriptedChat, ScriptedChat]:
    """Alice's model, which calls `transfer_to_bob`, and Bob's, which answers."""
    return chat(reply("", ("h1", "transfer_to_bob", {}), model="alice-model")), chat(
        reply("Bob here", model="bob-model")
    )


def test_a_handoff_between_agents_ends_the_loop_and_the_next_agent_continues_it() -> None:
    recorder = SessionRecorder()
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "team"}}
    out = team(*team_models()).invoke({"messages": [("user", "help")]}, config)
    assert out["messages"][-1].content == "Bob here"

    first, second = recorded(recorder)["team"].loops
    assert first.status == second.status == "Completed"
    assert second.parent_loop_id == first.loop_id and second.kind.kind == "Default"
    # Alice's reply keeps toolUse (the call hands over only once it returns): Bob's loop
    # names the call that did.
    assert first.turns[-1].output_message.stop_reason == "toolUse"  # type: ignore[union-attr]
    assert second.metadata["phi.handoff"] == {"tool_call_id": "h1", "tool_name": "transfer_to_bob"}
    (result,) = [m for m in first.messages if isinstance(m, ToolResultMessage)]
    assert result.content[0].text == "Bob takes over"  # type: ignore[union-attr]
    assert [m.model for m in second.messages if isinstance(m, AssistantMessage)] == ["bob-model"]
    assert "Bob takes over" not in str(second.messages)  # recorded once, in the first loop


class TokenByToken(GenericFakeChatModel):
    """Streams its reply a word at a time, yielding to the event loop between words."""

    async def _astream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Any:
        for word in str(next(self.messages)).split(" "):
            await asyncio.sleep(0)
            generation = ChatGenerationChunk(message=AIMessageChunk(content=word + " "))
            if run_manager:
                await run_manager.on_llm_new_token(word + " ", chunk=generation)
            yield generation


class Outputs(TypedDict):
    out: Annotated[list[str], lambda left, right: left + right]


def test_model_calls_streaming_in_parallel_each_keep_their_whole_reply() -> None:
    # Two nodes of one step stream at once: the second call waits for the first's turn to
    # end, then has its own, its reply whole (its tokens, streamed meanwhile, streamed then).
    recorder = SessionRecorder()
    events: list[Any] = []
    handler = AsyncPhiCallbackHandler([recorder, events.append])
    first = TokenByToken(messages=iter(["a1 a2 a3 a4"]))
    second = TokenByToken(messages=iter(["b1 b2 b3 b4"]))

    async def node_a(state: Outputs) -> dict[str, Any]:
        return {"out": ["".join([str(chunk.content) async for chunk in first.astream("go")])]}

    async def node_b(state: Outputs) -> dict[str, Any]:
        return {"out": ["".join([str(chunk.content) async for chunk in second.astream("go")])]}

    graph = StateGraph(Outputs)
    graph.add_node("a", node_a)
    graph.add_node("b", node_b)
    for node in ("a", "b"):
        graph.add_edge(START, node)
        graph.add_edge(node, END)
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "par"}}
    out = asyncio.run(graph.compile().ainvoke({"out": []}, config))
    assert sorted(out["out"]) == ["a1 a2 a3 a4 ", "b1 b2 b3 b4 "]  # the host's result, unchanged
    assert handler.core.fault_count == 0
    (session,) = recorded(recorder).values()
    (loop,) = session.loops
    assert loop.turn_count() == 2
    replies = [m for m in messages_of(session) if isinstance(m, AssistantMessage)]
    assert sorted(m.content[0].text for m in replies) == ["a1 a2 a3 a4 ", "b1 b2 b3 b4 "]  # type: ignore[union-attr]
    assert [m.stop_reason for m in replies] == ["stop", "stop"]
    streamed: list[str] = []
    for event in events:
        if isinstance(event, MessageStart) and isinstance(event.message, AssistantMessage):
            streamed.append("")
        elif isinstance(event, MessageUpdate):
            streamed[-1] += event.delta.delta
    assert streamed == [m.content[0].text for m in replies]  # type: ignore[union-attr]


class FanOut(TypedDict):
    topics: list[str]
    answers: Annotated[list[str], lambda left, right: left + right]


def fan_out(work: Any) -> Any:
    """A graph running the node `work` once for each topic, in parallel (LangGraph's Send)."""
    graph = StateGraph(FanOut)
    graph.add_node("work", work)
    graph.add_conditional_edges(START, lambda s: [Send("work", {"topic": t}) for t in s["topics"]], ["work"])
    graph.add_edge("work", END)
    return graph.compile()


def test_parallel_model_calls_of_a_send_fan_out_each_keep_their_reply_and_usage() -> None:
    # Three nodes (LangGraph's Send) each call a model that does not stream; every call
    # starts before any ends (the barrier): each is a turn with its reply and usage.
    barrier = threading.Barrier(3, timeout=30)

    class Overlapping(ScriptedChat):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            barrier.wait()
            return super()._generate(*args, **kwargs)

    models = {
        topic: Overlapping(messages=iter([reply(f"ans-{topic}", tokens=(10 * n, n))]))
        for n, topic in enumerate("abc", 1)
    }

    def work(state: Any) -> dict[str, Any]:
        answer = models[state["topic"]].invoke([HumanMessage(f"about {state['topic']}")])
        return {"answers": [answer.content]}

    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "fan"}}
    out = fan_out(work).invoke({"topics": list("abc"), "answers": []}, config)
    assert sorted(out["answers"]) == ["ans-a", "ans-b", "ans-c"]
    assert handler.core.fault_count == 0
    (loop,) = recorded(recorder)["fan"].loops
    assert loop.status == "Completed" and loop.turn_count() == 3
    replies = sorted(
        (
            turn.output_message.content[0].text,
            turn.usage.input,
            turn.usage.output,
            turn.output_message.stop_reason,
        )  # type: ignore[union-attr]
        for turn in loop.turns
    )
    assert replies == [("ans-a", 10, 1, "stop"), ("ans-b", 20, 2, "stop"), ("ans-c", 30, 3, "stop")]
    assert (loop.usage.input, loop.usage.output) == (60, 6)
    # each turn's input is its own call's prompt, before its reply
    texts = [m.content[0].text for m in loop.messages]  # type: ignore[union-attr]
    assert sorted(zip(texts[::2], texts[1::2], strict=True)) == [
        ("about a", "ans-a"),
        ("about b", "ans-b"),
        ("about c", "ans-c"),
    ]


def approve(state: State) -> dict[str, Any]:
    """A node asking for approval: the run stops there until resumed."""
    interrupt("continue?")
    return {}


def tool_node_graph(model: Any, tools: list[Any], then: str = "model") -> Any:
    """A hand-built agent whose ``ToolNode`` answers a tool's error to the model; after the
    tools, `then` runs: the model again, END, or "approve" (an interrupt, then the model)."""
    bound = model.bind_tools(tools)
    graph = StateGraph(State)
    graph.add_node("model", lambda state: {"messages": [bound.invoke(state["messages"])]})
    graph.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", then)
    if then == "approve":
        graph.add_node("approve", approve)
        graph.add_edge("approve", "model")
    return graph.compile(checkpointer=InMemorySaver())


@tool
def refuse(x: str) -> str:
    """Fails: the tool node answers the error."""
    raise ValueError(f"bad {x}")


def test_a_tool_error_answered_by_the_last_node_of_the_run_is_recorded_as_sent() -> None:
    recorder = SessionRecorder()
    app = tool_node_graph(chat(reply("", ("c1", "refuse", {"x": "b"}))), [refuse], then=END)
    config: Any = {"callbacks": [PhiCallbackHandler([recorder])], "configurable": {"thread_id": "end"}}
    out = app.invoke({"messages": [("user", "go")]}, config)
    (loop,) = recorded(recorder)["end"].loops
    (result,) = loop.turns[0].tool_results
    assert result.is_error
    assert (
        result.content[0].text
        == out["messages"][-1].content
        == "Error: ValueError('bad b')\n Please fix your mistakes."
    )  # type: ignore[union-attr]


def test_a_tool_error_held_for_its_answer_keeps_its_time_and_place_among_the_results() -> None:
    # c1 fails at once, c2 returns after the handler saw that failure: c1's result keeps
    # the time it failed, and ends before c2's, as it happened.
    failed = threading.Event()

    class SeesFailure(BaseCallbackHandler):
        def on_tool_error(self, error: BaseException, **kwargs: Any) -> None:
            failed.set()

    @tool
    def late(x: str) -> str:
        """Returns once the other tool failed."""
        assert failed.wait(30)
        return f"late {x}"

    events: list[Any] = []
    recorder = SessionRecorder()
    ticks = itertools.count(1_000_000_000, 1_000_000_000)  # a second a reading
    handler = PhiCallbackHandler([recorder, events.append], agent=AgentSession(clock=lambda: next(ticks)))
    model = chat(reply("", ("c1", "refuse", {"x": "b"}), ("c2", "late", {"x": "s"})), reply("done"))
    config: Any = {"callbacks": [handler, SeesFailure()], "configurable": {"thread_id": "order"}}
    tool_node_graph(model, [refuse, late]).invoke({"messages": [("user", "go")]}, config)
    ends = [e.tool_call_id for e in events if isinstance(e, ToolExecutionEnd)]
    assert ends == ["c1", "c2"]
    (loop,) = recorded(recorder)["order"].loops
    first, second = loop.turns[0].tool_results
    assert (first.tool_call_id, second.tool_call_id) == ("c1", "c2")
    assert first.content[0].text.startswith("Error: ValueError('bad b')")  # type: ignore[union-attr]
    assert first.timestamp < second.timestamp


# -- which turn a tool belongs to ---------------------------------------------------------------


@tool
def retrieve(q: str) -> str:
    """Retrieve documents."""
    return f"docs about {q}"


def run_graph(handler: Any, nodes: dict[str, Any], edges: list[tuple[str, str | None]], thread: str) -> Any:
    """Run a `State` graph of `nodes` (sync functions) and `edges` (or a conditional edge:
    the end None routes by `tools_condition`) with `handler`: ``invoke`` for the sync
    handler, ``ainvoke`` for the async one."""
    graph = StateGraph(State)
    for name, node in nodes.items():
        graph.add_node(name, node)
    for start, end in edges:
        if end is None:
            graph.add_conditional_edges(start, tools_condition)
        else:
            graph.add_edge(start, end)
    app = graph.compile()
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": thread}}
    if isinstance(handler, AsyncPhiCallbackHandler):
        return asyncio.run(app.ainvoke({"messages": [("user", "hi")]}, config))
    return app.invoke({"messages": [("user", "hi")]}, config)


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
def test_a_tool_a_node_calls_after_a_reply_without_that_call_is_an_input_of_the_next_turn(
    handler: type,
) -> None:
    # plan -> fetch (retrieve.invoke, no model call asked for it) -> answer: the plan's
    # reply made no call, so the tool's output is what the next model call is sent.
    recorder = SessionRecorder()
    events: list[Any] = []
    model = chat(reply("plan: search cats"), reply("answer using docs"))

    def fetch(state: State) -> dict[str, Any]:
        return {"messages": [HumanMessage(retrieve.invoke({"q": "cats"}))]}

    nodes = {
        "plan": lambda s: {"messages": [model.invoke(s["messages"])]},
        "fetch": fetch,
        "answer": lambda s: {"messages": [model.invoke(s["messages"])]},
    }
    recording = handler([recorder, events.append])
    edges = [(START, "plan"), ("plan", "fetch"), ("fetch", "answer"), ("answer", END)]
    out = run_graph(recording, nodes, edges, "direct")
    assert out["messages"][-1].content == "answer using docs"
    assert recording.core.fault_count == 0
    assert not [e for e in events if isinstance(e, (ToolExecutionStart, ToolExecutionEnd))]
    (loop,) = recorded(recorder)["direct"].loops
    assert [turn.tool_results for turn in loop.turns] == [(), ()]
    assert [(type(m).__name__, m.content[0].text) for m in loop.messages] == [  # type: ignore[union-attr]
        ("UserMessage", "hi"),
        ("AssistantMessage", "plan: search cats"),
        ("UserMessage", "docs about cats"),
        ("AssistantMessage", "answer using docs"),
    ]


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
def test_a_hand_written_tool_node_invoking_tools_by_their_args_answers_the_calls_once(handler: type) -> None:
    # LangGraph's quickstart: tools_by_name[name].invoke(call["args"]), then a ToolMessage
    # naming the call. The tool run carries no call id: it is the unanswered call of the
    # reply with its name and arguments (the calls taken in reverse: matched by arguments).
    recorder = SessionRecorder()
    calls = reply("", ("call_1", "add", {"a": 1, "b": 2}), ("call_2", "add", {"a": 3, "b": 4}))
    model = chat(calls, reply("3 and 7"))
    bound = model.bind_tools([add])

    def tool_node(state: State) -> dict[str, Any]:
        answers = []
        for call in reversed(state["messages"][-1].tool_calls):
            observation = {"add": add}[call["name"]].invoke(call["args"])
            answers.append(ToolMessage(content=str(observation), tool_call_id=call["id"]))
        return {"messages": answers}

    nodes = {"model": lambda s: {"messages": [bound.invoke(s["messages"])]}, "tools": tool_node}
    edges: list[tuple[str, str | None]] = [(START, "model"), ("model", None), ("tools", "model")]
    recording = handler([recorder])
    out = run_graph(recording, nodes, edges, "manual")
    assert out["messages"][-1].content == "3 and 7"
    assert recording.core.fault_count == 0
    (loop,) = recorded(recorder)["manual"].loops
    first, second = loop.turns
    assert [(r.tool_call_id, r.tool_name, r.content[0].text) for r in first.tool_results] == [  # type: ignore[union-attr]
        ("call_2", "add", "7"),
        ("call_1", "add", "3"),
    ]
    assert second.input_messages == ()  # the tool node's answers are those results, not new inputs
    assert [type(m).__name__ for m in loop.messages] == [
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "ToolResultMessage",
        "AssistantMessage",
    ]


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
@pytest.mark.parametrize("lookup", ["cats", "dogs", {"q": "dogs"}])
def test_a_node_invoking_a_tool_before_the_tool_node_leaves_the_call_one_result(
    handler: type, lookup: Any
) -> None:
    # A node looks something up itself (retrieve.invoke(...), no call id) before the tool
    # node runs the model's call c1 (q 'dogs'): c1 has one result, the tool node's. A
    # plain value matches a call only as its one argument ('cats' matches none: the
    # lookup is not recorded); a lookup taken for c1 is replaced by the tool node's run,
    # not recorded as a first attempt.
    model = chat(reply("", ("c1", "retrieve", {"q": "dogs"})), reply("final"))
    bound = model.bind_tools([retrieve])

    def fetch(state: State) -> dict[str, Any]:
        retrieve.invoke(lookup)
        return {}

    nodes = {
        "model": lambda s: {"messages": [bound.invoke(s["messages"])]},
        "fetch": fetch,
        "tools": ToolNode([retrieve]),
    }
    graph = StateGraph(State)
    for name, node in nodes.items():
        graph.add_node(name, node)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, {"tools": "fetch", END: END})
    graph.add_edge("fetch", "tools")
    graph.add_edge("tools", "model")
    recorder = SessionRecorder()
    recording = handler([recorder])
    config: Any = {"callbacks": [recording], "configurable": {"thread_id": "direct"}}
    start = {"messages": [HumanMessage("go")]}
    app = graph.compile()
    out = (
        app.invoke(start, config)
        if handler is PhiCallbackHandler
        else asyncio.run(app.ainvoke(start, config))
    )
    assert out["messages"][-1].content == "final"
    assert recording.core.fault_count == 0
    (loop,) = recorded(recorder)["direct"].loops
    assert turn_results(loop) == [(["c1"], [("c1", False, "docs about dogs")]), ([], [])]
    assert [type(m).__name__ for m in loop.messages] == [
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
    ]


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
def test_a_hand_written_tool_node_invoking_a_tool_with_a_plain_value_answers_its_call(handler: type) -> None:
    # retrieve.invoke(call["args"]["q"]): a plain value is the call's one argument.
    model = chat(reply("", ("c1", "retrieve", {"q": "dogs"})), reply("final"))
    bound = model.bind_tools([retrieve])

    def tool_node(state: State) -> dict[str, Any]:
        (call,) = state["messages"][-1].tool_calls
        return {"messages": [ToolMessage(retrieve.invoke(call["args"]["q"]), tool_call_id=call["id"])]}

    nodes = {"model": lambda s: {"messages": [bound.invoke(s["messages"])]}, "tools": tool_node}
    edges: list[tuple[str, str | None]] = [(START, "model"), ("model", None), ("tools", "model")]
    recorder = SessionRecorder()
    recording = handler([recorder])
    assert run_graph(recording, nodes, edges, "plain")["messages"][-1].content == "final"
    assert recording.core.fault_count == 0
    (loop,) = recorded(recorder)["plain"].loops
    assert turn_results(loop) == [(["c1"], [("c1", False, "docs about dogs")]), ([], [])]
    assert loop.turns[1].input_messages == ()


class Hooked(ScriptedChat):
    """Runs `hooks[n]` (if any) as its n-th call (from 0) starts generating."""

    hooks: dict[int, Any] = Field(default_factory=dict)
    calls: int = 0

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        hook = self.hooks.get(self.calls)
        self.calls += 1
        if hook is not None:
            hook()
        return super()._generate(*args, **kwargs)


def turn_results(loop: Any) -> list[tuple[list[str], list[tuple[str, bool, str]]]]:
    """Each turn's tool calls and results (call id, error, text)."""
    return [
        (
            [block.id for block in turn.output_message.content if isinstance(block, ToolCall)],
            [(r.tool_call_id, r.is_error, r.content[0].text) for r in turn.tool_results],
        )
        for turn in loop.turns
    ]


def wait(event: threading.Event) -> None:
    assert event.wait(30)


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
@pytest.mark.parametrize("first", ["tool", "model", "model call"])
def test_a_tool_running_while_a_parallel_node_calls_a_model_keeps_its_result_in_its_turn(
    handler: type, first: str
) -> None:
    # One step runs the tool of the model's call and a node asking another model for a
    # title: the title's call starts while the tool runs (or just before it starts). The
    # tool's result is its call's, in the turn whose reply made it; the title call's turn
    # follows. A tool starting once that call came and went ("model call") is an input of
    # the title's turn, the turn open as it returns (no model call is sent its result).
    tool_running, title_started, title_done = threading.Event(), threading.Event(), threading.Event()

    @tool
    def search(q: str) -> str:
        """Search."""
        tool_running.set()
        if first == "tool":
            wait(title_started)
        return f"results for {q}"

    agent = chat(reply("", ("c1", "search", {"q": "cats"})))
    bound = agent.bind_tools([search])
    titler = Hooked(messages=iter([reply("Cats", model="titler")]))
    titler.hooks[0] = lambda: (title_started.set(), first == "model" and wait(tool_running))

    def tools(state: State) -> dict[str, Any]:
        if first != "tool":  # the tool starts once the title's call started, or ended
            wait(title_done if first == "model call" else title_started)
        return ToolNode([search]).invoke(state)  # type: ignore[no-any-return]

    def title(state: State) -> dict[str, Any]:
        if first == "tool":
            wait(tool_running)
        titler.invoke([HumanMessage("title for: cats")])
        title_done.set()
        return {}

    nodes = {"model": lambda s: {"messages": [bound.invoke(s["messages"])]}, "tools": tools, "title": title}
    edges: list[tuple[str, str | None]] = [
        (START, "model"),
        ("model", "tools"),
        ("model", "title"),
        ("tools", END),
        ("title", END),
    ]
    recorder = SessionRecorder()
    recording = handler([recorder])
    out = run_graph(recording, nodes, edges, "title")
    assert out["messages"][-1].content == "results for cats"
    assert recording.core.fault_count == 0
    (loop,) = recorded(recorder)["title"].loops
    assert loop.turns[1].output_message.content[0].text == "Cats"  # type: ignore[union-attr]
    if first != "model call":
        assert turn_results(loop) == [(["c1"], [("c1", False, "results for cats")]), ([], [])]
        return
    assert turn_results(loop) == [(["c1"], []), ([], [])]
    late = loop.messages[-1]  # after the title's reply
    assert isinstance(late, ToolResultMessage) and late in loop.turns[1].input_messages
    assert (late.tool_call_id, late.tool_name, late.is_error) == ("c1", "search", False)
    assert late.content[0].text == "results for cats"  # type: ignore[union-attr]


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
@pytest.mark.parametrize("then", ["end", "model call"])
def test_a_tool_starting_after_two_parallel_model_calls_keeps_its_result(handler: type, then: str) -> None:
    # Two parallel nodes ask other models (a title, then a summary) and both calls come and
    # go before the tool of the model's call starts: its result is still an input of the
    # turn open as it returns, once, whether the run ends then or the agent's next call
    # sends it.
    title_done, summary_done = threading.Event(), threading.Event()

    @tool
    def search(q: str) -> str:
        """Search."""
        return f"results for {q}"

    agent = chat(reply("", ("c1", "search", {"q": "cats"})), reply("done"))
    bound = agent.bind_tools([search])
    titler, summarizer = chat(reply("Cats", model="titler")), chat(reply("Summary", model="summ"))

    def tools(state: State) -> dict[str, Any]:
        wait(summary_done)
        return ToolNode([search]).invoke(state)  # type: ignore[no-any-return]

    def title(state: State) -> dict[str, Any]:
        titler.invoke([HumanMessage("title for: cats")])
        title_done.set()
        return {}

    def summary(state: State) -> dict[str, Any]:
        wait(title_done)
        summarizer.invoke([HumanMessage("summary for: cats")])
        summary_done.set()
        return {}

    def model(state: State) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    nodes = {"model": model, "tools": tools, "title": title, "summary": summary, "final": model}
    edges: list[tuple[str, str | None]] = [
        (START, "model"),
        ("model", "tools"),
        ("model", "title"),
        ("model", "summary"),
        ("tools", "final" if then == "model call" else END),
        ("title", END),
        ("summary", END),
        ("final", END),
    ]
    recorder = SessionRecorder()
    recording = handler([recorder])
    out = run_graph(recording, nodes, edges, "two")
    final = ["done"] if then == "model call" else []
    assert [m.content for m in out["messages"][2:]] == ["results for cats", *final]
    assert recording.core.fault_count == 0
    (loop,) = recorded(recorder)["two"].loops
    assert turn_results(loop) == [(["c1"], []), ([], []), ([], []), *([([], [])] if final else [])]
    results = [m for m in loop.messages if isinstance(m, ToolResultMessage)]
    assert [(r.tool_call_id, r.is_error, r.content[0].text) for r in results] == [  # type: ignore[union-attr]
        ("c1", False, "results for cats")
    ]
    assert results[0] in loop.turns[2].input_messages  # after the summary's reply
    if final:
        assert loop.turns[3].output_message.content[0].text == "done"  # type: ignore[union-attr]


@pytest.mark.parametrize("handler", [PhiCallbackHandler, AsyncPhiCallbackHandler])
def test_a_send_fan_out_of_agents_keeps_each_tool_result_once_after_its_call(handler: type) -> None:
    # Map-reduce: two create_agent workers of one run. b's tool runs when a's first model
    # call starts, a's while b's second call runs. Every result is recorded once, after its
    # call: in the turn whose reply made the call, or as an input of a later turn, never
    # cut short.
    b_tool_runs, a_tool_runs, b_second_call = threading.Event(), threading.Event(), threading.Event()

    @tool
    def slow_lookup(q: str) -> str:
        """Slow look-up."""
        a_tool_runs.set()
        wait(b_second_call)
        return f"found {q}"

    @tool
    def fast_lookup(q: str) -> str:
        """Fast look-up."""
        b_tool_runs.set()
        wait(a_tool_runs)
        return f"found {q}"

    fast = Hooked(messages=iter([reply("", ("cb", "fast_lookup", {"q": "B"})), reply("B done")]))
    fast.hooks[1] = b_second_call.set
    agents = {
        "a": create_agent(chat(reply("", ("ca", "slow_lookup", {"q": "A"})), reply("A done")), [slow_lookup]),
        "b": create_agent(fast, [fast_lookup]),
    }

    def work(state: Any) -> dict[str, Any]:
        if state["topic"] == "a":
            wait(b_tool_runs)
        out = agents[state["topic"]].invoke({"messages": [HumanMessage(f"topic {state['topic']}")]})
        return {"answers": [out["messages"][-1].content]}

    recorder = SessionRecorder()
    recording = handler([recorder])
    config: Any = {"callbacks": [recording], "configurable": {"thread_id": "map"}}
    app, inputs = fan_out(work), {"topics": ["a", "b"], "answers": []}
    if handler is AsyncPhiCallbackHandler:
        out = asyncio.run(app.ainvoke(inputs, config))
    else:
        out = app.invoke(inputs, config)
    assert sorted(out["answers"]) == ["A done", "B done"]
    assert recording.core.fault_count == 0
    (loop,) = recorded(recorder)["map"].loops
    for calls, results in turn_results(loop):
        assert {call for call, _, _ in results} <= set(calls)
    called: set[str] = set()
    answered = []
    for message in loop.messages:
        if isinstance(message, AssistantMessage):
            called |= {block.id for block in message.content if isinstance(block, ToolCall)}
        elif isinstance(message, ToolResultMessage):
            assert message.tool_call_id in called
            answered.append((message.tool_call_id, message.is_error, message.content[0].text))  # type: ignore[union-attr]
    assert sorted(answered) == [("ca", False, "found A"), ("cb", False, "found B")]
