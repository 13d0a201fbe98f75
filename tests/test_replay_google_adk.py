"""Replay and fork of Google ADK runs, offline: an ``LlmAgent`` over a scripted
``BaseLlm`` is recorded (4 turns, 2 tools), then replayed with
`phi_session.adapters.google_adk.ReplayLlm` (no model, tools answered from the
recording), changed (divergence), and forked at turn 2 onto another scripted model."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

pytest.importorskip("google.adk", reason="needs the google-adk extra: pip install 'phi-session[google-adk]'")

from google.adk.agents import LlmAgent
from google.adk.models.base_llm import BaseLlm

from phi_session import AgentSession, FakeClock
from phi_session.adapters.google_adk import PhiPlugin
from phi_session.messages import AgentMessage, AssistantMessage, ToolCall, ToolResultMessage
from phi_session.model import LoopRecord, Session

from .test_adapter_google_adk import Harness, ScriptedLlm

# ADK warns about its own deprecations; nothing of this test's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INSTRUCTION = "You are a calculator: use the tools."
SESSION = "calc-session"
QUESTION = "What is (2 + 3) * 4 + 1, doubled?"


def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


def mul(a: int, b: int) -> int:
    """Multiplies two numbers."""
    return a * b


def script() -> ScriptedLlm:
    """Four model responses: add, mul, both at once, then the answer."""
    return ScriptedLlm.of(
        ["Adding first.", ("add", {"a": 2, "b": 3})],
        [("mul", {"a": 5, "b": 4})],
        [("add", {"a": 20, "b": 1}), ("mul", {"a": 21, "b": 2})],
        ["The answer is 42."],
    )


def agent(model: BaseLlm, tools: list[Any] | None = None, instruction: str = INSTRUCTION) -> LlmAgent:
    return LlmAgent(name="calc", model=model, instruction=instruction, tools=tools or [add, mul])


def harness() -> Harness:
    h = Harness(capture_turn_requests=True)
    h.plugin = PhiPlugin(
        [h.recorder], capture_requests=True, agent=AgentSession("adk-agent", clock=FakeClock())
    )
    return h


@pytest.fixture
def original() -> Session:
    h = harness()
    events = h.run(agent(script()), QUESTION, session_id=SESSION)
    assert events[-1].content.parts[0].text == "The answer is 42."
    return h.session(SESSION)


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
    results = {m.tool_call_id: m.content[0].text for m in loop.messages if isinstance(m, ToolResultMessage)}  # type: ignore[union-attr]
    assert [results[c.id] for c in calls(loop)] == ["5", "20", "21", "42"]
    assert loop.usage.input == 40 and loop.usage.output == 32
    for turn in loop.turns:
        request = turn.request_payload
        assert request is not None and request.system_prompt.startswith(INSTRUCTION)
        assert sorted(t.name for t in request.tools) == ["add", "mul"]
        assert request.tools[0].parameters["required"] == ["a", "b"]
    last = loop.turns[3].request_payload
    assert last is not None
    roles = [type(m).__name__ for m in last.messages]
    assert roles == [
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "ToolResultMessage",
    ]
    # ADK strips the ids it made up from what it sends the model: the request has none.
    assert [m.tool_call_id for m in last.messages if isinstance(m, ToolResultMessage)] == ["", "", "", ""]
    assert last.messages[2].content[0].text == '{"result":5}'  # type: ignore[union-attr]
