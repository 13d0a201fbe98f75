"""Replay and fork for the OpenAI Agents SDK: a `Model` (and `ModelProvider`) answering
from a recording.

    script = ReplayScript.from_session(session, loop_id)
    model = ReplayModel(script)                       # tools="recorded", on_divergence="stop"
    with model.recording():                           # a Rerun{replay} loop of the original
        await Runner.run(model.agent(agent), prompt, hooks=PhiRunHooks())

`ReplayModel` turns each request into a `RequestShape` with the adapter's own request
converter (`request_payload`, what ``install(capture_requests=True)`` records), so an
unchanged agent matches its recording, and answers ``get_response`` and
``stream_response`` with the recorded reply as the SDK's response: reasoning, text and
function-call items with their call ids, usage, the model name, inside a ``response``
span (as the SDK's own Responses model), so the adapter records the replayed run like
any other. Past a fork point (`until_turn`) or after a divergence with
``on_divergence="fallback"`` it hands the request to `fallback`, any other SDK model.

The SDK runs tools outside the model; its cleanest hook is the tool itself:
`ReplayModel.agent` clones an agent with its function tools' ``on_invoke_tool``
answering each call of a replayed turn from the recording (``tools="recorded"``; the
tool does not run; a recorded error result is returned as its text, its function span
marked failed, as the SDK does for a failing tool, unless the error ended the recorded
run: then it is raised as `RecordedToolError`, so the replay fails where the original
did). Agents reached by a handoff keep their own tools: clone them too, and give the
run the replay model with ``RunConfig(model=model)`` (or
``model_provider=ReplayProvider(model)``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any

from agents import Agent, FunctionTool, Handoff, ModelResponse, ModelSettings, Tool
from agents.agent_output import AgentOutputSchemaBase
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from agents.models.interface import Model, ModelProvider, ModelTracing
from agents.tool_context import ToolContext
from agents.tracing import SpanError, get_current_span, response_span
from agents.usage import Usage as SdkUsage
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseTextDeltaEvent,
    ResponseUsage,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam
from openai.types.responses.response_reasoning_item import Summary
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from ...errors import RecordedModelError, RecordedToolError
from ...messages import AssistantMessage, TextContent, ThinkingContent, ToolCall
from ...model import Session
from ...replay import Divergence, Lineage, OnDivergence, ReplayCursor, ReplayScript, ToolsMode
from .._core import recorded_reply, replay_recording, result_text
from . import request_payload

__all__ = ["RecordedToolError", "ReplayModel", "ReplayProvider"]


def _arguments_text(arguments: Any) -> str:
    """Recorded arguments (JSON data, as parsed from the model's text, keys in its order)
    as the model wrote them: compact, non-ASCII kept (json.dumps' default would escape it
    and add spaces, and a fork's model would see other text than the original's did)."""
    return json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)


def _output(reply: AssistantMessage, number: int) -> list[TResponseOutputItem]:
    """The recorded reply as Responses output items: reasoning, one message with the
    text blocks, then the function calls (the order the adapter records them in).
    `number` makes the item ids unique within the run."""
    items: list[TResponseOutputItem] = []
    texts: list[ResponseOutputText | ResponseOutputRefusal] = []
    for index, block in enumerate(reply.content):
        if type(block) is ThinkingContent:
            items.append(
                ResponseReasoningItem(
                    id=f"rs_replay_{number}_{index}",
                    type="reasoning",
                    summary=[Summary(text=block.thinking, type="summary_text")],
                )
            )
        elif type(block) is TextContent:
            texts.append(ResponseOutputText(text=block.text, type="output_text", annotations=[]))
    if not reply.content:
        # An empty reply: the adapter records an empty message's text as no block, and
        # the SDK keeps the message in the conversation (`to_input_list`).
        texts.append(ResponseOutputText(text="", type="output_text", annotations=[]))
    if texts:
        items.append(
            ResponseOutputMessage(
                id=f"msg_replay_{number}", type="message", role="assistant", status="completed", content=texts
            )
        )
    for block in reply.content:
        if type(block) is ToolCall:
            arguments = block.arguments
            items.append(
                ResponseFunctionToolCall(
                    id=block.id,
                    call_id=block.id,
                    type="function_call",
                    name=block.name,
                    arguments=arguments if isinstance(arguments, str) else _arguments_text(arguments),
                    status="completed",
                )
            )
    return items


def _response(reply: AssistantMessage, number: int) -> Response:
    usage = reply.usage
    # The inverse of the adapter's `_usage` (OpenAI's input tokens include the cached ones).
    return Response(
        id=f"resp_replay_{number}",
        created_at=0,
        model=reply.model,
        object="response",
        output=_output(reply, number),
        tool_choice="auto",
        tools=[],
        top_p=None,
        parallel_tool_calls=True,
        status="completed",
        usage=ResponseUsage(
            input_tokens=usage.input + usage.cache_read + usage.cache_write,
            output_tokens=usage.output,
            total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=usage.cache_read, cache_write_tokens=usage.cache_write
            ),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=usage.reasoning),
        ),
    )


def _model_response(response: Response) -> ModelResponse:
    usage = response.usage
    assert usage is not None  # `_response` always sets it
    return ModelResponse(
        output=list(response.output),
        usage=SdkUsage(
            requests=1,
            input_tokens=usage.input_tokens,
            input_tokens_details=usage.input_tokens_details,
            output_tokens=usage.output_tokens,
            output_tokens_details=usage.output_tokens_details,
            total_tokens=usage.total_tokens,
        ),
        response_id=response.id,
    )


def _events(response: Response) -> list[TResponseStreamEvent]:
    """The stream of a recorded reply: text deltas, each item done, then completed."""
    events: list[TResponseStreamEvent] = []
    for index, item in enumerate(response.output):
        if isinstance(item, ResponseOutputMessage):
            for part, content in enumerate(item.content):
                if isinstance(content, ResponseOutputText):
                    events.append(
                        ResponseTextDeltaEvent(
                            type="response.output_text.delta",
                            item_id=item.id,
                            output_index=index,
                            content_index=part,
                            delta=content.text,
                            logprobs=[],
                            sequence_number=len(events),
                        )
                    )
        events.append(
            ResponseOutputItemDoneEvent(
                type="response.output_item.done", item=item, output_index=index, sequence_number=len(events)
            )
        )
    events.append(
        ResponseCompletedEvent(type="response.completed", response=response, sequence_number=len(events))
    )
    return events


class ReplayModel(Model):
    """An Agents SDK model that answers from a recording (module docstring).

    * `recording`: a `ReplayScript`, or a `Session` (`loop_id` and `chain` then pick the
      loops, as `ReplayScript.from_session`).
    * `on_divergence`, `tools`, `until_turn`: as `ReplayCursor` (``"stop"`` raises
      `ReplayDiverged` from the model call, or the tool call, that diverged).
    * `fallback`: the model that answers past `until_turn` (a fork) and after a
      divergence with ``on_divergence="fallback"``; both require it.

    One instance replays one run: `cursor` holds its progress and the first divergence.
    """

    def __init__(
        self,
        recording: ReplayScript | Session,
        loop_id: str | None = None,
        *,
        chain: bool = False,
        on_divergence: OnDivergence = "stop",
        tools: ToolsMode = "recorded",
        until_turn: int | None = None,
        fallback: Model | None = None,
    ) -> None:
        self.cursor = ReplayCursor.of(
            recording,
            loop_id,
            chain=chain,
            on_divergence=on_divergence,
            tools=tools,
            until_turn=until_turn,
            fallback=fallback is not None,
        )
        self.script = self.cursor.script
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"ReplayModel({self.script.loop_id!r}, fallback={self.fallback!r})"

    @property
    def divergence(self) -> Divergence | None:
        """The first divergence, if any (``on_divergence="fallback"`` keeps it here)."""
        return self.cursor.divergence

    def recording(self, *, tag: str = "fork", change: Any = None) -> AbstractContextManager[Lineage]:
        """Run the agent inside: the adapter records the run into the original session, as
        a ``Rerun{replay}`` of the replayed loop, or for a fork (``until_turn``) a
        ``Branch{tag}`` whose metadata names the fork point and `change` (default: the
        fallback model's name, else its class's name)."""
        fallback = None
        if self.fallback is not None:
            # The SDK's models keep the name they call the API with in `model`.
            name = getattr(self.fallback, "model", None)
            fallback = name if isinstance(name, str) and name else type(self.fallback).__name__
        return replay_recording(self.cursor, tag=tag, change=change, fallback=fallback)

    # -- tools ------------------------------------------------------------------------------

    def agent(self, agent: Agent[Any]) -> Agent[Any]:
        """A clone of `agent` run by this model, its function tools answered from the
        recording (other tools, and tools once the run is handed over, run as they are)."""
        return agent.clone(model=self, tools=[self._answered(tool) for tool in agent.tools])

    def _answered(self, tool: Tool) -> Tool:
        if not isinstance(tool, FunctionTool):
            return tool
        invoke = tool.on_invoke_tool
        cursor = self.cursor

        async def answer(context: ToolContext[Any], arguments: str) -> Any:
            result = cursor.recorded_result(context.tool_call_id, tool.name, arguments)
            if result is None:
                return await invoke(context, arguments)
            span = get_current_span()
            if result.is_error and span is not None:
                # What the SDK does when a tool fails: the text goes to the model, the error to its span.
                span.set_error(
                    SpanError(message="Error running tool (non-fatal)", data={"tool_name": tool.name})
                )
            return result_text(result)

        return dataclasses.replace(tool, on_invoke_tool=answer)

    # -- the model --------------------------------------------------------------------------

    def _recorded(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: list[Tool],
        handoffs: list[Handoff],
        tracing: ModelTracing,
    ) -> AssistantMessage | None:
        payload = request_payload(system_instructions, input, tools, handoffs, "", 0)
        try:
            return recorded_reply(self.cursor, payload)
        except RecordedModelError as error:
            # As the SDK's models fail: in a response span marked failed, where the
            # adapter reads the turn's error (the recorded text, as it was recorded).
            with response_span(disabled=tracing.is_disabled()) as span:
                span.set_error(SpanError(message=str(error), data=None))
            raise

    def _handed_over(self) -> Model:
        # The cursor hands over only past until_turn or in fallback mode: both need a fallback.
        assert self.fallback is not None
        return self.fallback

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        reply = self._recorded(system_instructions, input, tools, handoffs, tracing)
        if reply is None:
            return await self._handed_over().get_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
        with response_span(disabled=tracing.is_disabled()) as span:
            response = _response(reply, self.cursor.turns_served)
            if tracing.include_data():
                span.span_data.response = response
            return _model_response(response)

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        reply = self._recorded(system_instructions, input, tools, handoffs, tracing)
        if reply is None:
            async for event in self._handed_over().stream_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            ):
                yield event
            return
        with response_span(disabled=tracing.is_disabled()) as span:
            response = _response(reply, self.cursor.turns_served)
            if tracing.include_data():
                span.span_data.response = response
            for event in _events(response):
                yield event


class ReplayProvider(ModelProvider):
    """Gives `model` for every model name: ``RunConfig(model_provider=ReplayProvider(model))``
    replays every agent of a run whose model is given by name."""

    def __init__(self, model: ReplayModel) -> None:
        self.model = model

    def get_model(self, model_name: str | None) -> Model:
        return self.model
