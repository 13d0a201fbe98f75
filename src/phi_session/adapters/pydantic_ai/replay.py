"""Replay and fork for pydantic-ai: a `Model` answering from a recording.

    script = ReplayScript.from_session(session, loop_id)
    model = ReplayModel(script)                       # tools="recorded", on_divergence="stop"
    with model.recording():                           # a Rerun{replay} loop of the original
        agent.run_sync(prompt, model=model, capabilities=[model.capability])

`ReplayModel` turns each request into a `RequestShape` with the adapter's own request
converter (`request_payload`, what ``PhiCapability(capture_requests=True)`` records),
so an unchanged agent matches its recording, and answers with the recorded reply as a
``ModelResponse`` (text, thinking and tool-call parts with their ids, usage, finish
reason, model and provider names), streamed or not. Past a fork point (`until_turn`)
or after a divergence with ``on_divergence="fallback"`` it hands the request to
`fallback`, any other pydantic-ai model.

pydantic-ai runs tools outside the model: `ReplayModel.capability` (a capability to
add to the run) answers each tool call of a replayed turn with its recorded result
when ``tools="recorded"``, without running the tool: it wraps the agent's toolset
(``get_wrapper_toolset``), so every ``wrap_tool_execute`` (the recording's) sees the
answer as it saw the tool's; a recorded error result is raised as ``ModelRetry`` with
its text, as a tool asking the model to retry, unless the original run failed there
(the error ends a loop recorded ``Aborted``: the tool raised): then it is raised as
`RecordedToolError`, so the replay fails where the original did. Output tools are
pydantic-ai's own and run as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic_ai import ApprovalRequired, CallDeferred, ModelRetry, RunContext
from pydantic_ai import messages as pai
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.settings import ModelSettings
from pydantic_ai.toolsets import AbstractToolset, WrapperToolset
from pydantic_ai.toolsets.abstract import ToolsetTool
from pydantic_ai.usage import RequestUsage

from ...errors import RecordedToolError
from ...messages import AssistantMessage, StopReason, TextContent, ThinkingContent, ToolCall, Usage
from ...model import Session
from ...replay import Divergence, Lineage, OnDivergence, ReplayCursor, ReplayScript, ToolsMode
from ...replay.script import deferred_result, is_deferred
from .._core import recorded_reply, replay_recording, result_text
from . import _STOP_REASONS, request_payload

__all__ = ["RecordedToolError", "ReplayModel", "ReplayTools"]

# The inverse of the adapter's mapping.
_FINISH_REASONS: dict[StopReason, pai.FinishReason] = {stop: finish for finish, stop in _STOP_REASONS.items()}


def _request_usage(usage: Usage) -> RequestUsage:
    # The inverse of the adapter's `_usage`: pydantic-ai's input tokens include the cache's.
    return RequestUsage(
        input_tokens=usage.input + usage.cache_read + usage.cache_write,
        output_tokens=usage.output,
        cache_read_tokens=usage.cache_read,
        cache_write_tokens=usage.cache_write,
        output_reasoning_tokens=usage.reasoning,
    )


def _parts(reply: AssistantMessage) -> list[pai.ModelResponsePart]:
    parts: list[pai.ModelResponsePart] = []
    for block in reply.content:
        if type(block) is TextContent:
            parts.append(pai.TextPart(content=block.text))
        elif type(block) is ThinkingContent:
            parts.append(pai.ThinkingPart(content=block.thinking, signature=block.signature))
        elif type(block) is ToolCall:
            parts.append(pai.ToolCallPart(tool_name=block.name, args=block.arguments, tool_call_id=block.id))
    return parts


def _response(reply: AssistantMessage) -> pai.ModelResponse:
    """The recorded reply as pydantic-ai's response (images are not replayed)."""
    return pai.ModelResponse(
        parts=_parts(reply),
        usage=_request_usage(reply.usage),
        model_name=reply.model,
        provider_name=reply.provider,
        finish_reason=_FINISH_REASONS.get(reply.stop_reason),
    )


@dataclass
class _ReplayedStream(StreamedResponse):
    """A recorded reply, streamed part by part (each part in one event)."""

    _reply: AssistantMessage = field(kw_only=True)
    _timestamp: datetime = field(default_factory=lambda: datetime.now(timezone.utc), init=False)

    async def _get_event_iterator(self) -> AsyncIterator[pai.ModelResponseStreamEvent]:
        reply = self._reply
        self._usage = _request_usage(reply.usage)
        self.finish_reason = _FINISH_REASONS.get(reply.stop_reason)
        for index, block in enumerate(reply.content):
            if type(block) is TextContent:
                for event in self._parts_manager.handle_text_delta(vendor_part_id=index, content=block.text):
                    yield event
            elif type(block) is ThinkingContent:
                for event in self._parts_manager.handle_thinking_delta(
                    vendor_part_id=index, content=block.thinking, signature=block.signature
                ):
                    yield event
            elif type(block) is ToolCall:
                yield self._parts_manager.handle_tool_call_part(
                    vendor_part_id=index, tool_name=block.name, args=block.arguments, tool_call_id=block.id
                )

    @property
    def model_name(self) -> str:
        return self._reply.model

    @property
    def provider_name(self) -> str:
        return self._reply.provider

    @property
    def provider_url(self) -> None:
        return None

    @property
    def timestamp(self) -> datetime:
        return self._timestamp


class ReplayModel(Model):
    """A pydantic-ai model that answers from a recording (module docstring).

    * `recording`: a `ReplayScript`, or a `Session` (`loop_id` and `chain` then pick the
      loops, as `ReplayScript.from_session`).
    * `on_divergence`, `tools`, `until_turn`: as `ReplayCursor` (``"stop"`` raises
      `ReplayDiverged` from the request that diverged).
    * `fallback`: the model that answers past `until_turn` (a fork) and after a
      divergence with ``on_divergence="fallback"``; both require it.

    Its name and system are the replayed loop's (the recorded config), so the replayed
    loop records like the original. One instance replays one run: `cursor` holds its
    progress and `divergence` the first divergence.
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
        super().__init__()
        self.cursor = ReplayCursor.of(
            recording,
            loop_id,
            chain=chain,
            on_divergence=on_divergence,
            tools=tools,
            until_turn=until_turn,
            fallback=fallback is not None,
        )
        self.script = script = self.cursor.script
        self.fallback = fallback
        self.capability = ReplayTools(self.cursor)
        """Answers the tool calls of replayed turns (add it to the run's capabilities)."""
        record = script.session.get_loop(script.loop_ids[0])
        config = record.config if record is not None else None
        self._name = config.model if config is not None and config.model else "replay"
        self._system = config.provider if config is not None and config.provider else "replay"

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
        fallback model's name)."""
        fallback = None if self.fallback is None else self.fallback.model_name
        return replay_recording(self.cursor, tag=tag, change=change, fallback=fallback)

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def system(self) -> str:
        return self._system

    def _recorded(
        self, messages: Sequence[pai.ModelMessage], parameters: ModelRequestParameters
    ) -> AssistantMessage | None:
        return recorded_reply(self.cursor, request_payload(messages, parameters, self._name, self._system, 0))

    def _handed_over(self) -> Model:
        # The cursor hands over only past until_turn or in fallback mode: both need a fallback.
        assert self.fallback is not None
        return self.fallback

    async def request(
        self,
        messages: list[pai.ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> pai.ModelResponse:
        reply = self._recorded(messages, model_request_parameters)
        if reply is None:
            return await self._handed_over().request(messages, model_settings, model_request_parameters)
        return _response(reply)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[pai.ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        reply = self._recorded(messages, model_request_parameters)
        if reply is None:
            async with self._handed_over().request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as stream:
                yield stream
            return
        yield _ReplayedStream(model_request_parameters=model_request_parameters, _reply=reply)


@dataclass
class _RecordedToolset(WrapperToolset[Any]):
    """The agent's toolset, each call of a replayed turn answered by the cursor."""

    cursor: ReplayCursor = field(kw_only=True)

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]
    ) -> Any:
        # A call not approved is asked in the run that made it: a tool that asked for its
        # approval (or deferred it) there, stopping the run, does so again, and the run
        # resuming it, which asks approved, gets the result that run sent.
        result = self.cursor.recorded_result(
            ctx.tool_call_id or "", name, tool_args, awaiting_answer=not ctx.tool_call_approved
        )
        if result is None:
            return await super().call_tool(name, tool_args, ctx, tool)
        if is_deferred(result):
            if result_text(result) == deferred_result(CallDeferred.__name__):
                raise CallDeferred()
            raise ApprovalRequired()
        if result.is_error:
            # As the tool did: pydantic-ai makes it the retry the model read.
            raise ModelRetry(result_text(result))
        return result_text(result)


class ReplayTools(AbstractCapability[Any]):
    """Answers a replayed run's tool calls from the recording, the tools not run
    (``tools="recorded"``; with ``"live"``, or once handed over, the tools run).

    It wraps the agent's toolset (``get_wrapper_toolset``), below every capability's
    ``wrap_tool_execute``: the recording sees the answer as it saw the tool's."""

    def __init__(self, cursor: ReplayCursor) -> None:
        self.cursor = cursor

    def __repr__(self) -> str:
        return f"ReplayTools(tools={self.cursor.tools!r})"

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # holds a live cursor: not constructible from an agent spec

    def get_wrapper_toolset(self, toolset: AbstractToolset[Any]) -> AbstractToolset[Any] | None:
        return _RecordedToolset(toolset, cursor=self.cursor)
