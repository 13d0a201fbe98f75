"""Sessions built event by event for the OpenTelemetry tests."""

from __future__ import annotations

from typing import Any

from phi_session import AgentEnd, AgentStart, SessionRecorder, Timestamp
from phi_session.events import MessageEnd, ToolExecutionEnd, ToolExecutionStart, TurnEnd, TurnStart
from phi_session.messages import (
    ZERO_USAGE,
    AssistantMessage,
    TextContent,
    ToolCall,
    ToolResult,
    ToolResultMessage,
)
from phi_session.model import Session


def _at(seconds: int) -> Timestamp:
    return Timestamp.from_ns(seconds * 10**9)


def tool_loop_session(
    calls: list[tuple[str, str, Any, str]], *, agent_id: str = "a", error: str | None = None
) -> Session:
    """One loop ``L`` of session ``s``, turn i (from 2 + 10 i s) making call i:
    (call id, tool name, arguments, result text), its result at 4 + 10 i s."""
    recorder = SessionRecorder()
    recorder.on_event(AgentStart(agent_id=agent_id, session_id="s", loop_id="L", timestamp=_at(1)))
    for index, (call_id, tool, args, text) in enumerate(calls):
        reply = AssistantMessage(
            content=(ToolCall(id=call_id, name=tool, arguments=args),),
            stop_reason="toolUse",
            model="m",
            provider="p",
            usage=ZERO_USAGE,
            timestamp=(2 + 10 * index) * 1000,
        )
        result = (TextContent(text=text),)
        for event in (
            TurnStart(loop_id="L", turn_index=index, timestamp=_at(2 + 10 * index), triggered_by="User"),
            MessageEnd(loop_id="L", message=reply),
            ToolExecutionStart(loop_id="L", tool_call_id=call_id, tool_name=tool, args=args),
            ToolExecutionEnd(
                loop_id="L",
                tool_call_id=call_id,
                tool_name=tool,
                result=ToolResult(content=result),
                is_error=False,
            ),
            TurnEnd(
                loop_id="L",
                message=reply,
                usage=ZERO_USAGE,
                timestamp=_at(5 + 10 * index),
                tool_results=(
                    ToolResultMessage(
                        tool_call_id=call_id,
                        tool_name=tool,
                        content=result,
                        is_error=False,
                        timestamp=(4 + 10 * index) * 1000,
                    ),
                ),
            ),
        ):
            recorder.on_event(event)
    failed: dict[str, Any] = {} if error is None else {"error": error}
    recorder.on_event(AgentEnd(loop_id="L", messages=(), usage=ZERO_USAGE, timestamp=_at(30), **failed))
    recorder.flush()
    [session] = recorder.drain_completed()
    return session
