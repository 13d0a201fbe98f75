"""Sessions built event by event for the OpenTelemetry tests."""

from __future__ import annotations

from typing import Any

from phi_session import AgentEnd, AgentStart, SessionRecorder, Timestamp
from phi_session.events import (
    INITIAL,
    AgentEvent,
    ContinuationKind,
    MessageEnd,
    ToolExecutionEnd,
    ToolExecutionStart,
    TurnEnd,
    TurnStart,
)
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
    recorder.record_all(tool_loop_events("L", calls, agent_id=agent_id, error=error))
    recorder.flush()
    [session] = recorder.drain_completed()
    return session


def tool_loop_events(
    loop_id: str,
    calls: list[tuple[str, str, Any, str]],
    *,
    at: int = 0,
    session_id: str = "s",
    agent_id: str = "a",
    parent: str | None = None,
    kind: ContinuationKind = INITIAL,
    error: str | None = None,
) -> list[AgentEvent]:
    """The events of `tool_loop_session`'s loop, as `loop_id` of `session_id`, `at` s later."""
    events: list[AgentEvent] = [
        AgentStart(
            agent_id=agent_id,
            session_id=session_id,
            loop_id=loop_id,
            parent_loop_id=parent,
            continuation_kind=kind,
            timestamp=_at(at + 1),
        )
    ]
    for index, (call_id, tool, args, text) in enumerate(calls):
        reply = AssistantMessage(
            content=(ToolCall(id=call_id, name=tool, arguments=args),),
            stop_reason="toolUse",
            model="m",
            provider="p",
            usage=ZERO_USAGE,
            timestamp=(at + 2 + 10 * index) * 1000,
        )
        result = (TextContent(text=text),)
        events += [
            TurnStart(
                loop_id=loop_id, turn_index=index, timestamp=_at(at + 2 + 10 * index), triggered_by="User"
            ),
            MessageEnd(loop_id=loop_id, message=reply),
            ToolExecutionStart(loop_id=loop_id, tool_call_id=call_id, tool_name=tool, args=args),
            ToolExecutionEnd(
                loop_id=loop_id,
                tool_call_id=call_id,
                tool_name=tool,
                result=ToolResult(content=result),
                is_error=False,
            ),
            TurnEnd(
                loop_id=loop_id,
                message=reply,
                usage=ZERO_USAGE,
                timestamp=_at(at + 5 + 10 * index),
                tool_results=(
                    ToolResultMessage(
                        tool_call_id=call_id,
                        tool_name=tool,
                        content=result,
                        is_error=False,
                        timestamp=(at + 4 + 10 * index) * 1000,
                    ),
                ),
            ),
        ]
    failed: dict[str, Any] = {} if error is None else {"error": error}
    events.append(AgentEnd(loop_id=loop_id, messages=(), usage=ZERO_USAGE, timestamp=_at(at + 30), **failed))
    return events


def services_calling_a_sub_agent(conversation: str | None = None) -> tuple[list[Any], list[Any], int]:
    """A caller service's loop (of `conversation`, if given) whose tool ``ask`` calls a
    sub-agent served by another service (the trace context propagated, so the sub-agent's root
    has a remote parent): (the caller's finished SDK spans, the sub-agent service's, the tool
    span's id)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NonRecordingSpan, SpanContext, set_span_in_context

    from phi_session.otel import attributes as attr

    caller, helper = InMemorySpanExporter(), InMemorySpanExporter()
    providers = []
    for exporter in (caller, helper):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider.get_tracer("test"))
    calling, serving = providers
    chat = {attr.OPERATION_NAME: attr.OP_CHAT, attr.REQUEST_MODEL: "m"}
    agent: dict[str, Any] = {attr.OPERATION_NAME: "invoke_agent"}
    if conversation is not None:
        agent[attr.CONVERSATION_ID] = conversation
    with calling.start_as_current_span("invoke_agent caller", attributes=agent):
        with calling.start_as_current_span("chat m", attributes=chat):
            pass
        tool_attributes = {
            attr.OPERATION_NAME: "execute_tool",
            attr.TOOL_NAME: "ask",
            attr.TOOL_CALL_ID: "c1",
        }
        with calling.start_as_current_span("execute_tool ask", attributes=tool_attributes) as tool:
            sent = tool.get_span_context()
            remote = SpanContext(sent.trace_id, sent.span_id, is_remote=True, trace_flags=sent.trace_flags)
            with serving.start_as_current_span(
                "invoke_agent helper",
                context=set_span_in_context(NonRecordingSpan(remote)),
                attributes={attr.OPERATION_NAME: "invoke_agent"},
            ):
                with serving.start_as_current_span("chat m", attributes=chat):
                    pass
    return list(caller.get_finished_spans()), list(helper.get_finished_spans()), sent.span_id
