"""pydantic-ai adapter: a capability that records every run of an agent into phi-core sessions.

    from phi_session.adapters.pydantic_ai import PhiCapability
    agent = Agent(model, capabilities=[PhiCapability()])      # or agent.run(..., capabilities=[...])

One run is one loop; the run's ``conversation_id`` is the session, so a later run with the
first's ``message_history`` continues its loop. The hooks map as follows:

* ``wrap_run`` → the loop (``AgentStart`` ... ``AgentEnd``). It encloses ``before_run``,
  ``after_run`` and ``on_run_error`` and is the one run hook that also sees a run cancelled
  or closed early, so every loop ends (a failed run: ``Aborted`` with the error).
* ``before_model_request`` → ``TurnStart`` (the first one also emits the user prompt);
  ``after_model_request`` → the assistant message: text, thinking and tool-call parts with
  their ids, the request's own usage (never the run's `RunUsage`, which includes the tokens
  of sub-agents run with ``usage=ctx.usage``), model and provider names, finish reason.
* ``wrap_tool_execute`` → ``ToolExecutionStart`` / ``ToolExecutionEnd`` and the tool result.
  It encloses ``before_tool_execute``, ``after_tool_execute`` and ``on_tool_execute_error``,
  and unlike them it also sees ``ModelRetry`` and ``ToolFailed`` (recorded as error
  results, with the text the model gets) and runs around the tool function, which is what
  lets a sub-agent run inside the tool find its parent.
* ``after_node_run`` of a ``CallToolsNode`` (the end of a tools step) → ``TurnEnd``.

Streaming capture is opt-in (``PhiCapability(stream=True)``): listening to the run's events
makes pydantic-ai stream every model request, even under ``agent.run()``. With it, text,
thinking and tool-call argument deltas become ``MessageUpdate`` events; without it the
assistant message is recorded whole, when the response is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import MissingExtra
from ..events import LoopConfigSnapshot
from ..instrument import LoopScope, MessageScope, ToolScope, TurnScope
from ..messages import Content, ImageContent, StopReason, TextContent, ThinkingContent, ToolCall, Usage

try:
    import pydantic_core
    from pydantic_ai import CallToolsNode, RunContext
    from pydantic_ai import messages as pai
    from pydantic_ai.capabilities import (
        AbstractCapability,
        AgentNode,
        NodeResult,
        ValidatedToolArgs,
        WrapRunHandler,
        WrapToolExecuteHandler,
    )
    from pydantic_ai.exceptions import (
        ApprovalRequired,
        CallDeferred,
        SkipToolExecution,
        ToolFailedError,
        ToolRetryError,
    )
    from pydantic_ai.usage import RequestUsage
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise MissingExtra(
        "phi_session.adapters.pydantic_ai needs pydantic-ai: pip install 'phi-session[pydantic-ai]'"
    ) from error

if TYPE_CHECKING:
    from pydantic_ai.models import ModelRequestContext
    from pydantic_ai.run import AgentRunResult
    from pydantic_ai.tools import ToolDefinition

__all__ = ["PhiCapability"]

_STOP_REASONS: dict[str, StopReason] = {
    "stop": "stop", "length": "length", "tool_call": "toolUse", "error": "error",
    "content_filter": "guardRail",
}
_STREAM_EVENTS = (pai.PartStartEvent, pai.PartDeltaEvent)


# -- pydantic-ai values -> phi-core values --------------------------------------------------------


def _usage(usage: RequestUsage) -> Usage:
    # pydantic-ai's input_tokens include the cache reads and writes; phi-core counts them apart.
    cached = usage.cache_read_tokens + usage.cache_write_tokens
    fresh = max(0, usage.input_tokens - cached)
    return Usage(input=fresh, output=usage.output_tokens, reasoning=usage.output_reasoning_tokens,
                 cache_read=usage.cache_read_tokens, cache_write=usage.cache_write_tokens,
                 total_tokens=fresh + cached + usage.output_tokens)


def _response_content(parts: Sequence[pai.ModelResponsePart]) -> tuple[list[Content], list[ToolCall]]:
    """The blocks and tool calls phi-core has a place for, in order. Provider-side (native)
    tool calls and their returns, compaction and speech parts have none (README: losses)."""
    blocks: list[Content] = []
    calls: list[ToolCall] = []
    for part in parts:
        if isinstance(part, pai.TextPart):
            blocks.append(TextContent(text=part.content))
        elif isinstance(part, pai.ThinkingPart):
            blocks.append(ThinkingContent(thinking=part.content, signature=part.signature))
        elif isinstance(part, pai.ToolCallPart):
            calls.append(ToolCall(id=part.tool_call_id, name=part.tool_name, arguments=part.args_as_dict()))
        elif isinstance(part, pai.FilePart) and part.content.is_image:
            blocks.append(ImageContent(data=part.content.base64, mime_type=part.content.media_type))
    return blocks, calls


def _stop_reason(reason: pai.FinishReason | None, calls: bool) -> StopReason:
    if reason is None or (calls and reason == "stop"):
        return "toolUse" if calls else "stop"
    return _STOP_REASONS.get(reason, "stop")


def _prompt(prompt: str | Sequence[pai.UserContent]) -> str | tuple[Content, ...]:
    """The user prompt as phi-core content: text and inline images as they are, anything
    else (URLs, documents, audio) as a text line naming it, so nothing is dropped unseen."""
    if isinstance(prompt, str):
        return prompt
    blocks: list[Content] = []
    for item in prompt:
        if isinstance(item, str):
            blocks.append(TextContent(text=item))
        elif isinstance(item, pai.TextContent):
            blocks.append(TextContent(text=item.content))
        elif isinstance(item, pai.BinaryContent) and item.is_image:
            blocks.append(ImageContent(data=item.base64, mime_type=item.media_type))
        elif isinstance(item, pai.CachePoint):
            continue  # a provider cache marker, not content
        else:
            url = getattr(item, "url", None)
            blocks.append(TextContent(text=f"[{type(item).__name__}{f': {url}' if url else ''}]"))
    return tuple(blocks)


def _tool_result_text(call: pai.ToolCallPart, result: Any) -> str:
    """The result as the model reads it (pydantic-ai's own rendering of a tool return)."""
    if isinstance(result, str):
        return result  # the rendering of a string, without building a part for it
    return pai.ToolReturnPart(tool_name=call.tool_name, content=result,
                              tool_call_id=call.tool_call_id).model_response_str()


# -- one run's recording --------------------------------------------------------------------------


class _Run:
    """The scopes of one run's loop: its open turn and, while it streams, the open reply."""

    __slots__ = ("loop", "prompt", "reply", "turn")

    def __init__(self, loop: LoopScope, prompt: str | Sequence[pai.UserContent] | None) -> None:
        self.loop = loop
        self.prompt = prompt
        self.turn: TurnScope | None = None
        self.reply: MessageScope | None = None

    def request(self) -> None:
        """A model request step starts: the previous turn ends (if its tools step did not end
        it), the prompt goes in before the first turn, and the next turn starts."""
        self.tools_done()
        loop = self.loop
        if self.prompt is not None:
            prompt, self.prompt = self.prompt, None
            loop.user(_prompt(prompt))
        self.turn = loop.turn().start()

    def replying(self, model: str, provider: str) -> MessageScope:
        """The turn's assistant message, started at its first streamed part or its response."""
        reply = self.reply
        if reply is None:
            turn = self.turn
            if turn is None or turn.message is not None:
                # A response outside a request step, or a further attempt at one (another
                # model after a `RetryModelRequest`): each reply gets a turn of its own.
                self.request()
                turn = self.turn
                assert turn is not None
            reply = self.reply = turn.assistant(model=model, provider=provider).start()
        return reply

    def response(self, response: pai.ModelResponse, model: str, provider: str) -> None:
        reply = self.replying(response.model_name or model, response.provider_name or provider)
        self.reply = None
        blocks, calls = _response_content(response.parts)
        reply.finish(blocks, tool_calls=calls, usage=_usage(response.usage),
                     stop_reason=_stop_reason(response.finish_reason, bool(calls)))

    def tools_done(self, history: Sequence[pai.ModelMessage] = ()) -> None:
        """The turn ends; with the run's `history`, after recording the returns pydantic-ai
        made itself for calls no tool ran for (output tools: "Final result processed.")."""
        turn, self.turn = self.turn, None
        if turn is None or not turn.running:
            return
        if history and isinstance(history[-1], pai.ModelRequest):
            _record_own_returns(turn, history[-1])
        turn.end()

    def end(self, error: BaseException | None) -> None:
        if error is None:
            self.tools_done()
        self.loop.end(error)


def _record_own_returns(turn: TurnScope, request: pai.ModelRequest) -> None:
    done = {result.tool_call_id for result in turn.tool_results}
    pending = [call for call in turn.tool_calls if call.id not in done]
    if not pending:
        return
    returns = {part.tool_call_id: part for part in request.parts if isinstance(part, pai.ToolReturnPart)}
    for call in pending:
        part = returns.get(call.id)
        if part is None:
            continue
        tool = turn.tool(call).start()
        text = part.model_response_str(wrap_if_error=False)
        if part.outcome in pai.ERROR_OUTCOMES:
            tool.error(text)
        else:
            tool.result(text)
        tool.end()


# -- the capability -------------------------------------------------------------------------------


class PhiCapability(AbstractCapability[Any]):
    """Records each run of the agent it is given to as a phi-core loop (module docs).

    * `sink`: where the events go (a sink or a list of them, as `phi_session.sinks`
      takes); None: the embedded store, each session saved as it completes.
    * `stream`: also record the streamed text, thinking and tool-call argument deltas
      (``MessageUpdate``). pydantic-ai then streams every model request of the run.

    Never raises into the run and never changes what a hook passes on: a recording
    fault is counted and logged once, and the run goes on. One instance may serve many
    agents and concurrent runs (state is kept per run id).
    """

    # A default id: an agent has one of these, and one given to a run replaces the agent's
    # (pydantic-ai's rule for a repeated capability id) instead of recording the run twice.
    id: str | None = "phi_session"

    def __init__(self, sink: Any = None, *, stream: bool = False) -> None:
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be a bool, not {type(stream).__name__}")
        self.stream = stream
        self._adapter = _core_adapter(sink)
        self._runs: dict[str, _Run] = {}

    def __repr__(self) -> str:
        return f"PhiCapability(stream={self.stream})"

    @classmethod
    def combine(cls, capabilities: Sequence[AbstractCapability[Any]]) -> AbstractCapability[Any]:
        return capabilities[-1]  # the same recording stated twice in one layer: record once

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # holds live sinks: not constructible from an agent spec

    # -- the run --------------------------------------------------------------------------

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        run = self._open(ctx)
        try:
            result = await handler()
        except BaseException as error:
            self._close(ctx, run, error)
            raise
        self._close(ctx, run, None)
        return result

    def _open(self, ctx: RunContext[Any]) -> _Run | None:
        try:
            model = ctx.model
            agent = ctx.agent
            config = LoopConfigSnapshot(
                model=model.model_name, provider=model.system,
                name=agent.name if agent is not None and agent.name else None)
            loop = self._adapter.start_loop(ctx.conversation_id, config)
            run = self._runs[ctx.run_id or ""] = _Run(loop, ctx.prompt)
        except Exception as error:
            self._adapter.fault("run start", error)
            return None
        return run

    def _close(self, ctx: RunContext[Any], run: _Run | None, error: BaseException | None) -> None:
        if run is None:
            return
        self._runs.pop(ctx.run_id or "", None)
        try:
            run.end(error)
        except Exception as fault:
            self._adapter.fault("run end", fault)

    def _run(self, ctx: RunContext[Any]) -> _Run | None:
        return self._runs.get(ctx.run_id or "")

    # -- model requests -------------------------------------------------------------------

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        run = self._run(ctx)
        if run is not None:
            try:
                run.request()
            except Exception as error:
                self._adapter.fault("model request", error)
        return request_context

    async def after_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, response: pai.ModelResponse
    ) -> pai.ModelResponse:
        run = self._run(ctx)
        if run is not None:
            try:
                run.response(response, ctx.model.model_name, ctx.model.system)
            except Exception as error:
                self._adapter.fault("model response", error)
        return response

    async def after_node_run(
        self, ctx: RunContext[Any], *, node: AgentNode[Any], result: NodeResult[Any]
    ) -> NodeResult[Any]:
        if isinstance(node, CallToolsNode):
            run = self._run(ctx)
            if run is not None:
                try:
                    run.tools_done(ctx.messages)
                except Exception as error:
                    self._adapter.fault("tools step end", error)
        return result

    # -- tools ----------------------------------------------------------------------------

    async def wrap_tool_execute(
        self, ctx: RunContext[Any], *, call: pai.ToolCallPart, tool_def: ToolDefinition,
        args: ValidatedToolArgs, handler: WrapToolExecuteHandler,
    ) -> Any:
        run = self._run(ctx)
        tool = None
        if run is not None and run.turn is not None:
            try:
                tool = run.turn.tool(id=call.tool_call_id, name=call.tool_name,
                                     args=call.args_as_dict()).start()
            except Exception as error:
                self._adapter.fault("tool start", error)
        if tool is None:
            return await handler(args)
        try:
            with self._adapter.tool_running(tool):
                result = await handler(args)
        except BaseException as error:
            self._tool_end(tool, call, error=error)
            raise
        self._tool_end(tool, call, result=result)
        return result

    def _tool_end(self, tool: ToolScope, call: pai.ToolCallPart, *, result: Any = None,
                  error: BaseException | None = None) -> None:
        try:
            if error is None:
                tool.result(_tool_result_text(call, result))
            elif isinstance(error, (ToolRetryError, ToolFailedError)):
                # Not a failure of the run: the model gets this text as the tool's result.
                tool.error(str(error))
            elif isinstance(error, SkipToolExecution):
                tool.result(_tool_result_text(call, error.result))
            elif isinstance(error, (CallDeferred, ApprovalRequired)):
                # Handed back to the caller (DeferredToolRequests): no result yet.
                tool.result(f"[deferred: {type(error).__name__}]")
            else:
                tool.end(error)
                return
            tool.end()
        except Exception as fault:
            self._adapter.fault("tool end", fault)

    # -- streaming (opt-in) ---------------------------------------------------------------

    @property
    def has_on_event(self) -> bool:
        return self.stream  # listening makes pydantic-ai stream every request: only when asked

    def listens_to(self, event: pai.AgentStreamEvent) -> bool:
        return self.stream and isinstance(event, _STREAM_EVENTS)

    async def on_event(self, ctx: RunContext[Any], *, event: pai.AgentStreamEvent) -> None:
        run = self._run(ctx)
        if run is None or not isinstance(event, _STREAM_EVENTS):
            return
        try:
            reply = run.replying(ctx.model.model_name, ctx.model.system)
            if isinstance(event, pai.PartStartEvent):
                _stream_part(reply, event.part)
            else:
                _stream_delta(reply, event.delta)
        except Exception as error:
            self._adapter.fault("stream event", error)


def _stream_part(reply: MessageScope, part: pai.ModelResponsePart) -> None:
    if isinstance(part, pai.TextPart):
        if part.content:
            reply.text_delta(part.content)
    elif isinstance(part, pai.ThinkingPart):
        if part.content:
            reply.thinking_delta(part.content)
    elif isinstance(part, pai.ToolCallPart) and part.args:
        reply.tool_call_delta(part.args if isinstance(part.args, str) else part.args_as_json_str())


def _stream_delta(reply: MessageScope, delta: pai.ModelResponsePartDelta) -> None:
    if isinstance(delta, pai.TextPartDelta):
        reply.text_delta(delta.content_delta)
    elif isinstance(delta, pai.ThinkingPartDelta):
        if delta.content_delta:
            reply.thinking_delta(delta.content_delta)
    elif isinstance(delta, pai.ToolCallPartDelta) and delta.args_delta:
        args = delta.args_delta
        reply.tool_call_delta(args if isinstance(args, str) else pydantic_core.to_json(args).decode())


# -- TEMPORARY: stands in for the shared adapter core until it lands on main ----------------------

import contextlib  # noqa: E402
import logging  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from .._failures import FailureTally  # noqa: E402
from ..identity import AgentSession  # noqa: E402
from ..instrument import Tracer  # noqa: E402


class _ShimAdapter:
    def __init__(self, sink: Any) -> None:
        self.sinks = sink if isinstance(sink, list) else [sink]
        self.faults = FailureTally(logging.getLogger(__name__), "adapter", "recording goes on",
                                   traceback=True)

    def start_loop(self, session_id: str | None, config: LoopConfigSnapshot) -> LoopScope:
        tracer = Tracer(AgentSession(session_id=session_id), sinks=self.sinks, config=config)
        return tracer.loop().start()

    def fault(self, where: str, error: BaseException) -> None:
        self.faults.record(where, error)

    @contextlib.contextmanager
    def tool_running(self, tool: ToolScope) -> Iterator[None]:
        yield


def _core_adapter(sink: Any) -> _ShimAdapter:
    return _ShimAdapter(sink)
