"""Replay and fork of LangChain / LangGraph runs, offline: a ``create_agent`` ReAct agent
over LangChain's fake chat model is recorded (4 turns, 2 tools), then replayed with
`phi_session.adapters.langchain.ReplayChatModel` (no model, tools answered from the
recording), changed (divergence), and forked at turn 2 onto another fake model."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

pytest.importorskip("langchain_core", reason="needs the extra: pip install 'phi-session[langchain]'")
pytest.importorskip("langgraph", reason="needs the extra: pip install 'phi-session[langchain]'")
pytest.importorskip("langchain.agents", reason="create_agent needs: pip install 'phi-session[test]'")

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from phi_session import AgentSession, FakeClock, SessionRecorder
from phi_session.adapters.langchain import PhiCallbackHandler
from phi_session.messages import AgentMessage, AssistantMessage, ToolCall, ToolResultMessage
from phi_session.model import LoopRecord, Session

from .test_adapter_langchain import ScriptedChat, recorded, reply

SYSTEM = "You are a calculator: use the tools."
THREAD = "calc-thread"


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def mul(a: int, b: int) -> int:
    """Multiply two numbers."""
    return a * b


def script() -> list[AIMessage]:
    """Four model responses: add, mul, both at once, then the answer."""
    return [
        reply("Adding first.", ("c1", "add", {"a": 2, "b": 3}), tokens=(40, 12)),
        reply("", ("c2", "mul", {"a": 5, "b": 4}), tokens=(60, 9)),
        reply("", ("c3", "add", {"a": 20, "b": 1}), ("c4", "mul", {"a": 21, "b": 2}), tokens=(80, 20)),
        reply("The answer is 42.", tokens=(120, 6)),
    ]


def handler(recorder: SessionRecorder) -> PhiCallbackHandler:
    return PhiCallbackHandler(
        [recorder], capture_requests=True, agent=AgentSession("calc-agent", clock=FakeClock())
    )


def run_agent(model: Any, tools: list[Any], recorder: SessionRecorder, system: str = SYSTEM) -> Any:
    agent = create_agent(model, tools=tools, system_prompt=system)
    config: Any = {"callbacks": [handler(recorder)], "configurable": {"thread_id": THREAD}}
    return agent.invoke({"messages": [("user", "What is (2 + 3) * 4 + 1, doubled?")]}, config)


@pytest.fixture
def original() -> Session:
    recorder = SessionRecorder(capture_turn_requests=True)
    out = run_agent(ScriptedChat(messages=iter(script())), [add, mul], recorder)
    assert out["messages"][-1].content == "The answer is 42."
    return recorded(recorder)[THREAD]


def plain(messages: tuple[AgentMessage, ...] | list[AgentMessage]) -> list[Any]:
    """Messages without what differs between two recordings of one run (time, turn ids)."""
    out = []
    for message in messages:
        if hasattr(message, "timestamp"):
            message = msgspec.structs.replace(message, timestamp=0)
        if hasattr(message, "turn_id"):
            message = msgspec.structs.replace(message, turn_id=None)
        out.append(message)
    return out


def calls(record: LoopRecord) -> list[ToolCall]:
    return [
        b
        for m in record.messages
        if isinstance(m, AssistantMessage)
        for b in m.content
        if isinstance(b, ToolCall)
    ]


def test_the_recorded_run_has_four_turns_two_tools_and_each_request(original: Session) -> None:
    (loop,) = original.loops
    assert loop.status == "Completed" and loop.turn_count() == 4
    assert [c.name for c in calls(loop)] == ["add", "mul", "add", "mul"]
    results = sorted(
        (m for m in loop.messages if isinstance(m, ToolResultMessage)), key=lambda m: m.tool_call_id
    )
    assert [r.content[0].text for r in results] == ["5", "20", "21", "42"]  # type: ignore[union-attr]
    assert loop.usage.input == 300 and loop.usage.output == 47
    for turn in loop.turns:
        request = turn.request_payload
        assert request is not None and request.system_prompt == SYSTEM
        assert sorted(t.name for t in request.tools) == ["add", "mul"]
    assert [len(t.request_payload.messages) for t in loop.turns] == [1, 3, 5, 8]  # type: ignore[union-attr]
