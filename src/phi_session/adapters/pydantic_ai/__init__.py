"""pydantic-ai adapter: a capability that records every run of an agent into phi-core sessions.

    from phi_session.adapters.pydantic_ai import PhiCapability
    agent = Agent(model, capabilities=[PhiCapability()])      # or agent.run(..., capabilities=[...])

One run is one loop; the run's ``conversation_id`` is the session, so a later run with the
first's ``message_history`` continues its loop, and one with the history of a run before the
session's last loop is a ``Branch`` of that run's loop. The hooks map as follows:

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
* ``after_node_run`` of a ``CallToolsNode`` (the end of a tools step) → ``TurnEnd``; of the
  node ending a ``run_stream`` (no tools step) → the returns pydantic-ai gives the calls of
  its last response it did not run, recorded as the run ends (``after_output_process``
  tells which output calls it processed).
* ``get_wrapper_model`` hands the run each response stream: ``run_stream`` runs a response's
  tools before ``after_model_request`` sees it, so the first tool finishes the reply from
  the stream (with its usage, recorded once) and its tools follow it, as under ``agent.run``.
  A response whose stream stopped before the model finished (a ``run_stream`` left early)
  is a reply cut off: what came, with stop reason ``aborted``; the run's end ends the loop.
  A run ending while a response streams, before its hook saw it (cancelled, its events
  left, the stream failed), finishes the reply from the stream too: what came and its
  usage, failed with the run's error.

With ``PhiCapability(capture_requests=True)``, ``after_model_request`` also records the request
sent (``TurnRequest``: system prompt and instructions, messages, function and output tools),
converted by `request_payload`, the conversion the replay model (`ReplayModel`, in
``replay.py``) checks a replayed run's requests with.

Streaming capture is opt-in (``PhiCapability(stream=True)``): listening to the run's events
makes pydantic-ai stream every model request, even under ``agent.run()``. With it, text,
thinking and tool-call argument deltas become ``MessageUpdate`` events; without it the
assistant message is recorded whole, when the response is complete.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence, Set
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

from ...events import ContinuationKind
from ...identity import AgentSession, Clock
from ...instrument import MessageScope, ToolScope, TurnScope
from ...messages import (
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
    ImageContent,
    Message,
    StopReason,
    TextContent,
    TextFormat,
    ThinkingContent,
    ToolCall,
    ToolDefinition,
    ToolResultMessage,
    UnknownBlock,
    Usage,
    UserMessage,
)
from ...processors import Processor, Redactor
from .._core import (
    AdapterCore,
    AdapterRun,
    SinkArg,
    deferred_result,
    enter_tool,
    jsonable,
    leave_tool,
    logger,
    loop_config,
    require_extra,
    usage_of,
)

require_extra("pydantic-ai", "pydantic_ai")

import pydantic_core  # noqa: E402  (after the extra's check)
from pydantic_ai import CallToolsNode, DeferredToolRequests, ModelRequestNode, RunContext  # noqa: E402
from pydantic_ai import messages as pai  # noqa: E402
from pydantic_ai.capabilities import (  # noqa: E402
    AbstractCapability,
    AgentNode,
    NodeResult,
    ValidatedToolArgs,
    WrapRunHandler,
    WrapToolExecuteHandler,
)
from pydantic_ai.exceptions import (  # noqa: E402
    ApprovalRequired,
    CallDeferred,
    SkipToolExecution,
    ToolFailedError,
    ToolRetryError,
)
from pydantic_ai.models import Model, StreamedResponse  # noqa: E402
from pydantic_ai.models.wrapper import WrapperModel  # noqa: E402
from pydantic_ai.output import OutputContext  # noqa: E402
from pydantic_ai.result import FinalResult  # noqa: E402
from pydantic_ai.usage import RequestUsage  # noqa: E402
from pydantic_graph import End  # noqa: E402

# The texts pydantic-ai answers the calls it does not run with, as its history holds them.
try:
    from pydantic_ai._tool_status import (
        FINAL_RESULT_PROCESSED,
        OUTPUT_NOT_FINAL_RESULT,
        OUTPUT_SKIPPED_FINAL_ALREADY_PROCESSED,
        TOOL_SKIPPED_FINAL_ALREADY_PROCESSED,
    )
except ImportError:  # pydantic-ai 2.68: private names of the module answering the calls
    from pydantic_ai._tool_execution import (  # type: ignore[attr-defined, no-redef]
        _FINAL_RESULT_PROCESSED as FINAL_RESULT_PROCESSED,
    )
    from pydantic_ai._tool_execution import (  # type: ignore[attr-defined, no-redef]
        _OUTPUT_NOT_FINAL_RESULT as OUTPUT_NOT_FINAL_RESULT,
    )
    from pydantic_ai._tool_execution import (  # type: ignore[attr-defined, no-redef]
        _OUTPUT_SKIPPED_FINAL_ALREADY_PROCESSED as OUTPUT_SKIPPED_FINAL_ALREADY_PROCESSED,
    )
    from pydantic_ai._tool_execution import (  # type: ignore[attr-defined, no-redef]
        _TOOL_SKIPPED_FINAL_ALREADY_PROCESSED as TOOL_SKIPPED_FINAL_ALREADY_PROCESSED,
    )

if TYPE_CHECKING:
    from contextvars import Token

    from pydantic_ai.models import ModelRequestContext, ModelRequestParameters
    from pydantic_ai.run import AgentRunResult
    from pydantic_ai.settings import ModelSettings
    from pydantic_ai.tools import ToolDefinition as PaiToolDefinition

    from ...stores.base import SessionStore
    from .._core import RunningTool

__all__ = ["PhiCapability", "ReplayModel", "ReplayTools", "request_payload"]

_STOP_REASONS: dict[pai.FinishReason, StopReason] = {
    "stop": "stop",
    "length": "length",
    "tool_call": "toolUse",
    "error": "error",
    "content_filter": "guardRail",
}
# A response whose stream stopped before the model finished (a `run_stream` left early, a
# cancelled stream): the reply is cut off, as phi-core's loop records a cancelled one.
_CUT_OFF_STATES = frozenset(("incomplete", "interrupted"))
_CUT_OFF = "the response stream stopped before the model finished"  # its error message
_STREAM_EVENTS = (pai.PartStartEvent, pai.PartDeltaEvent)


# -- pydantic-ai values -> phi-core values --------------------------------------------------------


def _usage(usage: RequestUsage) -> Usage:
    # pydantic-ai's input_tokens include the cache reads and writes; phi-core counts them apart.
    cached = usage.cache_read_tokens + usage.cache_write_tokens
    return usage_of(
        max(0, usage.input_tokens - cached),
        usage.output_tokens,
        cache_read=usage.cache_read_tokens,
        cache_write=usage.cache_write_tokens,
        reasoning=usage.output_reasoning_tokens,
        total=usage.total_tokens,
    )


def _response_content(parts: Sequence[pai.ModelResponsePart]) -> tuple[list[Content], list[ToolCall]]:
    """The blocks and tool calls phi-core has a place for, in order. Provider-side (native)
    tool calls and their returns, compaction and speech parts have none (README: losses)."""
    blocks: list[Content] = []
    calls: list[ToolCall] = []
    for part in parts:  # the most frequent part first
        if isinstance(part, pai.ToolCallPart):
            calls.append(
                ToolCall(id=part.tool_call_id, name=part.tool_name, arguments=jsonable(part.args_as_dict()))
            )
        elif isinstance(part, pai.TextPart):
            blocks.append(TextContent(text=part.content))
        elif isinstance(part, pai.ThinkingPart):
            blocks.append(ThinkingContent(thinking=part.content, signature=part.signature))
        elif isinstance(part, pai.FilePart) and part.content.is_image:
            blocks.append(ImageContent(data=part.content.base64, mime_type=part.content.media_type))
    return blocks, calls


def _stop_reason(response: pai.ModelResponse, calls: bool) -> StopReason:
    if response.state in _CUT_OFF_STATES:
        return "aborted"
    reason = response.finish_reason
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


def _tool_result_content(call: pai.ToolCallPart, result: Any) -> str | tuple[Content, ...]:
    """The result as the model reads it (pydantic-ai's own rendering of a tool return). Of a
    `ToolReturn`, its return value: its content reaches the model as a user prompt (recorded
    as one) and its metadata never does. Files a tool returns (an image) reach the model in
    a user message after the result's text, which names them: the result keeps both."""
    if isinstance(result, pai.ToolReturn):
        result = result.return_value
    if isinstance(result, str):
        return result  # the rendering of a string, without building a part for it
    part = pai.ToolReturnPart(tool_name=call.tool_name, content=result, tool_call_id=call.tool_call_id)
    text, files = part.model_response_str_and_user_content()
    attached = [item for item in files if not isinstance(item, str)]  # the text around them: tags
    return (TextContent(text=text), *_prompt(attached)) if attached else text


def _tool_result_message(part: pai.ToolReturnPart, timestamp: int) -> ToolResultMessage:
    return ToolResultMessage(
        tool_call_id=part.tool_call_id,
        tool_name=part.tool_name,
        content=(TextContent(text=part.model_response_str(wrap_if_error=False)),),
        is_error=part.outcome in pai.ERROR_OUTCOMES,
        timestamp=timestamp,
    )


def _deferred_returns(requests: DeferredToolRequests) -> list[pai.ToolReturnPart]:
    """A result saying so for each call handed back to the caller, as a tool raising
    `CallDeferred` or `ApprovalRequired` gets (tools needing approval and external tools
    never run, so no tool hook sees them)."""
    return [
        pai.ToolReturnPart(call.tool_name, deferred_result(kind.__name__), call.tool_call_id)
        for kind, calls in ((CallDeferred, requests.calls), (ApprovalRequired, requests.approvals))
        for call in calls
    ]


def _unrun_returns(
    calls: Iterable[pai.ToolCallPart],
    final: FinalResult[Any],
    strategy: str | None,
    tools: Mapping[str, PaiToolDefinition],
    processed: Set[str],
) -> list[pai.ToolReturnPart]:
    """The returns pydantic-ai gives the calls of the response that ended a `run_stream` with
    `final` which no tool hook sees: it handles them as a tools step whose final result is
    set already, under the agent's end `strategy`, and puts the returns in the history it
    hands the caller only. Left out: the calls it ran (their tool hooks record them) and an
    output call it ran under `'exhaustive'` whose processing did not finish (`processed`: the
    output calls that did), whose retry text no hook sees (README: losses)."""
    deferred = isinstance(final.output, DeferredToolRequests)  # those calls wait: `_deferred_returns`
    returns = []
    for call in calls:
        tool = tools.get(call.tool_name)
        kind = tool.kind if tool is not None else "unknown"
        if kind == "output":
            if call.tool_call_id == final.tool_call_id:
                text = FINAL_RESULT_PROCESSED
            elif strategy in ("early", "graceful"):  # the one output run is the final result
                text = OUTPUT_SKIPPED_FINAL_ALREADY_PROCESSED
            elif strategy == "exhaustive" and call.tool_call_id in processed:
                text = OUTPUT_NOT_FINAL_RESULT
            else:
                continue
        elif kind in ("external", "unapproved"):
            if deferred:
                continue
            text = TOOL_SKIPPED_FINAL_ALREADY_PROCESSED
        elif strategy == "early":  # function tools (and unknown ones) are not run
            text = TOOL_SKIPPED_FINAL_ALREADY_PROCESSED
        else:
            continue
        returns.append(pai.ToolReturnPart(call.tool_name, text, call.tool_call_id))
    return returns


def _request_parts(message: pai.ModelRequest, timestamp: int, system: list[str], into: list[Message]) -> None:
    """The messages of a request step's parts; system prompt parts go to `system`. Parts
    phi-core has no message for (instruction and tool-availability bookkeeping) are left out."""
    for part in message.parts:
        if isinstance(part, pai.SystemPromptPart):
            system.append(part.content)
        elif isinstance(part, pai.UserPromptPart):
            prompt = _prompt(part.content)
            content = (TextContent(text=prompt),) if isinstance(prompt, str) else prompt
            into.append(UserMessage(content=content, timestamp=timestamp))
        elif isinstance(part, pai.ToolReturnPart):
            into.append(_tool_result_message(part, timestamp))
        elif isinstance(part, (pai.RetryPromptPart, pai.RetryFeedbackPart)):
            into.append(UserMessage(content=(TextContent(text=part.model_response()),), timestamp=timestamp))


def _reply_message(
    response: pai.ModelResponse, model: str, provider: str, timestamp: int
) -> AssistantMessage:
    blocks, calls = _response_content(response.parts)
    return AssistantMessage(
        content=(*blocks, *calls),
        stop_reason=_stop_reason(response, bool(calls)),
        model=response.model_name or model,
        provider=response.provider_name or provider,
        usage=_usage(response.usage),
        timestamp=timestamp,
    )


def _tool_definition(tool: PaiToolDefinition) -> ToolDefinition:
    return ToolDefinition(
        name=tool.name, description=tool.description or "", parameters=tool.parameters_json_schema
    )


def request_payload(
    messages: Sequence[pai.ModelMessage],
    parameters: ModelRequestParameters,
    model: str,
    provider: str,
    timestamp: int,
) -> AnnotatedRequestPayload:
    """The request a pydantic-ai model is sent, in phi-core's form: the system prompt (system
    prompt parts, then the instructions), the messages, the function and output tools.

    The one conversion of a request: `PhiCapability(capture_requests=True)` records it and
    the replay model compares what it is asked with it, so an unchanged agent matches.
    """
    system: list[str] = []
    converted: list[Message] = []
    for message in messages:
        if isinstance(message, pai.ModelRequest):
            _request_parts(message, timestamp, system, converted)
        else:
            converted.append(_reply_message(message, model, provider, timestamp))
    instructions = pai.InstructionPart.join(parameters.instruction_parts or ())
    if instructions:
        system.append(instructions)
    tools = [*parameters.function_tools, *parameters.output_tools]
    return AnnotatedRequestPayload(
        system_prompt="\n\n".join(system),
        messages=tuple(converted),
        provenance=tuple(UnknownBlock() for _ in converted),
        tools=tuple(_tool_definition(tool) for tool in tools),
        model_id=model,
        thinking_level="off",
        response_format=TextFormat(),
    )


# -- one run's recording --------------------------------------------------------------------------


class _Run:
    """The scopes of one run's loop: its open turn and, while it streams, the open reply."""

    __slots__ = (
        "answered",
        "core",
        "final_returns",
        "key",
        "loop",
        "processed_outputs",
        "prompt",
        "prompts",
        "reply",
        "run_id",
        "streamed",
        "streamed_by",
        "turn",
    )

    def __init__(
        self,
        recording: AdapterRun,
        core: AdapterCore,
        run_id: str | None,
        prompt: str | Sequence[pai.UserContent] | None,
    ) -> None:
        self.loop, self.key = recording.loop, recording.key
        self.core, self.run_id = core, run_id  # what `PhiCapability._run` finds it by
        self.prompt = prompt
        # `ToolReturn.content` of the tools step: pydantic-ai sends it as user prompts after
        # the tool returns, in the next request.
        self.prompts: list[str | Sequence[pai.UserContent]] = []
        self.turn: TurnScope | None = None
        self.reply: MessageScope | None = None
        self.final_returns: pai.ModelRequest | None = None
        # The output tool calls of the turn's response whose output pydantic-ai processed.
        self.processed_outputs: set[str] = set()
        # The turn's streamed response (`_Streams`), and whether its reply was finished from
        # it when its tools started (`tool`), before `after_model_request` saw it.
        self.streamed: StreamedResponse | None = None
        self.streamed_by: Model | None = None  # the model serving it
        self.answered = False

    def request(self) -> TurnScope:
        """A model request step starts: the previous turn ends (if its tools step did not end
        it), the prompt goes in before the first turn (the tools' prompts before the next),
        and the next turn starts."""
        self.tools_done()
        self.streamed, self.streamed_by, self.answered = None, None, False
        self.processed_outputs.clear()
        loop = self.loop
        if self.prompt is not None:
            prompt, self.prompt = self.prompt, None
            loop.user(_prompt(prompt))
        if self.prompts:
            prompts, self.prompts = self.prompts, []
            for prompt in prompts:
                loop.user(_prompt(prompt))
        turn = self.turn = loop.turn().start()
        return turn

    def replying(
        self, model: str, provider: str, payload: AnnotatedRequestPayload | None = None
    ) -> MessageScope:
        """The turn's assistant message, started at its first streamed part or its response;
        `payload` (the request sent) is emitted before it starts, or at once if it streamed."""
        reply = self.reply
        if reply is None:
            turn = self.turn
            if turn is None or turn.message is not None:
                # A response outside a request step, or a further attempt at one (another
                # model after a `RetryModelRequest`): each reply gets a turn of its own.
                turn = self.request()
            if payload is not None:
                turn.request(payload)
            reply = self.reply = turn.assistant(model=model, provider=provider).start()
        elif payload is not None and self.turn is not None:
            self.turn.request(payload)
        return reply

    def response(
        self,
        response: pai.ModelResponse,
        model: str,
        provider: str,
        payload: AnnotatedRequestPayload | None = None,
    ) -> None:
        if self.answered:  # finished when its tools started: recorded once
            self.answered = False
            if payload is not None and self.turn is not None and self.turn.running:
                self.turn.request(payload)
            return
        reply = self.replying(response.model_name or model, response.provider_name or provider, payload)
        self.reply = None
        blocks, calls = _response_content(response.parts)
        stop_reason = _stop_reason(response, bool(calls))
        reply.finish(
            blocks,
            tool_calls=calls,
            usage=_usage(response.usage),
            stop_reason=stop_reason,
            error_message=_CUT_OFF if stop_reason == "aborted" else None,
        )

    def cut_off(self, error: BaseException) -> None:
        """The run ended with `error` while the turn's response streamed, before its hook saw
        it (the run cancelled, `run_stream_events` left, the stream failed): the reply keeps
        what came and its usage, failed with `error`."""
        turn, streamed, model = self.turn, self.streamed, self.streamed_by
        if turn is None or not turn.running or turn.message is not None or streamed is None or model is None:
            return
        response = streamed.get()
        if response.state not in _CUT_OFF_STATES:  # it came whole, just before the run's end
            self.response(response, model.model_name, model.system)
            return
        reply = self.replying(response.model_name or model.model_name, response.provider_name or model.system)
        self.reply = None
        blocks, calls = _response_content(response.parts)
        reply.end(error, content=blocks, tool_calls=calls, usage=_usage(response.usage))

    def tool(self, call: pai.ToolCallPart, model: str, provider: str) -> ToolScope | None:
        """The started scope of a tool the turn's reply called (None outside a turn)."""
        turn = self.turn
        if turn is None:
            return None
        streamed = self.streamed
        if turn.message is None and streamed is not None:
            # `run_stream` runs the tools once the response has streamed, before its
            # `after_model_request`: the reply that called them ends first, as in `agent.run`.
            self.response(streamed.get(), model, provider)
            self.answered = True
        return turn.tool(
            id=call.tool_call_id, name=call.tool_name, args=jsonable(call.args_as_dict())
        ).start()

    def resumed(self, returns: pai.ModelRequest, timestamp: int) -> None:
        """A resumed run's tools step (the caller's deferred tool results: approved tools run,
        external results, denials) comes before its first model request, outside any turn:
        its returns wait for the first turn, ahead of the prompt, as in the request."""
        loop = self.loop
        for part in returns.parts:
            if isinstance(part, pai.ToolReturnPart):
                loop.user(_tool_result_message(part, timestamp))

    def tools_done(self, returns: pai.ModelMessage | None = None) -> None:
        """The turn ends; with the request holding the step's `returns`, after recording those
        pydantic-ai made itself for calls no tool ran for (output tools: "Final result
        processed.", arguments failing validation, unknown tools: the retry text)."""
        turn, self.turn = self.turn, None
        if turn is None or not turn.running:
            return
        if isinstance(returns, pai.ModelRequest):
            _record_own_returns(turn, returns)
        turn.end()


def _last(messages: Sequence[pai.ModelMessage]) -> pai.ModelMessage | None:
    return messages[-1] if messages else None


def _last_of_a_run(history: Sequence[pai.ModelMessage]) -> int:
    """The position of the last message of `history` that a run made (pydantic-ai stamps
    it with the run's id; messages the caller added carry none), -1 for none."""
    return next((index for index in range(len(history) - 1, -1, -1) if history[index].run_id), -1)


def _ends_run(history: Sequence[pai.ModelMessage], last: int, length: int) -> bool:
    """Whether `history` up to `last`, the last message a run made, is all that run's
    messages, `length` of them as the run ended. Messages past those of the run's own (its id)
    are still its own: `run_stream` appends the output tool's return once the stream is read,
    after the run ended."""
    run_id = history[last].run_id
    return last + 1 >= length and all(message.run_id == run_id for message in history[length : last + 1])


_UNRECORDED_HISTORY = "pydantic_ai_unrecorded_history"
"""The metadata key of a loop whose run was sent a history no loop's context is (`_open`):
how many messages, and the loop of the run whose messages it was cut from."""


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


# The runs open in this context, innermost last: `wrap_run` adds its run around its handler,
# and pydantic-ai carries the context into every hook of the run (and the tasks it starts),
# so two runs given the same run id, each in its own task or thread, are kept apart.
_OPEN_RUNS: ContextVar[tuple[_Run, ...]] = ContextVar("phi_session_pydantic_ai_runs", default=())


class _Streams(WrapperModel):
    """The model serving a request, unchanged but for handing each stream it opens to the run
    it serves: `run_stream` runs a response's tools before `after_model_request` sees it, and
    the stream is where the response is then (`_Run.tool`)."""

    def __init__(self, wrapped: Model, core: AdapterCore) -> None:
        super().__init__(wrapped)
        self.core = core

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[pai.ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        async with super().request_stream(
            messages, model_settings, model_request_parameters, run_context
        ) as streamed:
            run = None if run_context is None else self.core.safely(_open_run, self.core, run_context)
            if run is not None:
                run.streamed, run.streamed_by = streamed, self
            yield streamed


def _open_run(core: AdapterCore, ctx: RunContext[Any]) -> _Run | None:
    """The run of `ctx` that `core` records: the innermost open in this context; None once
    its loop ended under it (the capability closed, or the interpreter is exiting)."""
    run_id = ctx.run_id
    for run in reversed(_OPEN_RUNS.get()):
        if run.core is core and run.run_id == run_id:
            return run if run.loop.running else None
    return None


# -- the capability -------------------------------------------------------------------------------


class PhiCapability(AbstractCapability[Any]):
    """Records each run of the agent it is given to as a phi-core loop (module docs).

    * `sink`: where the events go: a sink or a list of sinks (`phi_session.sinks`);
      None: the embedded store (`phi_session.stores.default_store`), each session
      saved as it completes.
    * `stream`: also record the streamed text, thinking and tool-call argument deltas
      (``MessageUpdate``). pydantic-ai then streams every model request of the run.
    * `store`: where earlier runs of a conversation are looked up to continue them
      after a restart (default: the embedded store when `sink` is None, else none).
    * `capture_requests`: also record each turn's ``TurnRequest`` (`request_payload`: the
      system prompt, messages and tools sent to the model), which replay compares against
      to detect divergence. Off by default: it repeats the whole history every turn.
    * `max_idle_sessions`: how many conversations without a running run keep their full
      state in memory (`phi_session.adapters.AdapterCore`).
    * `agent`, `clock`, `processors`, `redact`: as for `phi_session.instrument.Tracer`
      (`agent`: the identity of runs without a conversation id; the redactor is on by
      default).

    Never raises into the run and never changes what a hook passes on: a recording
    fault is counted (`fault_count`) and logged once, and the run goes on. One
    instance may serve many agents and concurrent runs (state is kept per run).
    `close()` ends runs still open and saves what the embedded store has not yet.
    """

    # A default id: an agent has one of these, and one given to a run replaces the agent's
    # (pydantic-ai's rule for a repeated capability id) instead of recording the run twice.
    id: str | None = "phi_session"
    _reported_duplicates: ClassVar[bool] = False
    _reported_history: ClassVar[bool] = False

    def __init__(
        self,
        sink: SinkArg = None,
        *,
        stream: bool = False,
        store: SessionStore | None = None,
        capture_requests: bool = False,
        max_idle_sessions: int = 4096,
        agent: AgentSession | None = None,
        clock: Clock | None = None,
        processors: Iterable[Processor] = (),
        redact: bool | Redactor = True,
    ) -> None:
        for name, flag in (("stream", stream), ("capture_requests", capture_requests)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        self.stream = stream
        self.capture_requests = capture_requests
        self._core = AdapterCore(
            "pydantic-ai",
            sink,
            store=store,
            capture_requests=capture_requests,
            max_idle_sessions=max_idle_sessions,
            agent=agent,
            clock=clock,
            processors=processors,
            redact=redact,
        )

    def __repr__(self) -> str:
        return f"PhiCapability(stream={self.stream}, capture_requests={self.capture_requests})"

    @property
    def fault_count(self) -> int:
        """Recording faults so far (each kind logged once; the runs went on)."""
        return self._core.fault_count

    def close(self) -> None:
        """End runs still open (as failed) and flush the sinks; the embedded store saves
        what it holds. Never raises."""
        self._core.close()

    @classmethod
    def combine(cls, capabilities: Sequence[AbstractCapability[Any]]) -> AbstractCapability[Any]:
        # The same recording stated twice in one layer: record once, and say so once, since
        # the others' sinks get nothing.
        kept = capabilities[-1]
        dropped = [other for other in capabilities if other is not kept]
        if dropped and not cls._reported_duplicates:  # a setting: once per process
            cls._reported_duplicates = True
            logger.warning(
                "pydantic-ai: a run was given %d PhiCapability in one list: only the last records "
                "(to send its events to several places, give one PhiCapability a list of sinks)",
                len(dropped) + 1,
            )
        return kept

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # holds live sinks: not constructible from an agent spec

    # -- the run --------------------------------------------------------------------------

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        run = self._core.safely(self._open, ctx)
        if run is None:
            return await handler()
        token = _OPEN_RUNS.set((*_OPEN_RUNS.get(), run))
        try:
            result = await handler()
        except BaseException as error:
            self._close(run, error)
            raise
        finally:
            self._core.safely(_OPEN_RUNS.reset, token)
        self._close(run, None)
        self._core.safely(self._noted_length, run, result)
        return result

    def _open(self, ctx: RunContext[Any]) -> _Run:
        model, agent = ctx.model, ctx.agent
        config = loop_config(
            model.model_name, model.system, agent.name if agent is not None and agent.name else None
        )
        # The run goes on from the run that ended its history: if that run's loop is an
        # earlier one than the conversation's last (the history rewound), as a branch of it.
        # pydantic-ai stamps each message with the run that made it; runs recorded
        # elsewhere (another process) are unknown here: the run goes on from the last loop.
        # A history that is that run's messages (all of them: the length noted as it ended)
        # and then messages the caller added is its loop's context and then the new loop's
        # first inputs. Cut from them (trimmed, a run's own only, the answer left out), or
        # with replies the caller added, it is no loop's context: the loop continues none
        # and says so (no loop can hold a history's replies but as its turns').
        history = ctx.messages
        last = _last_of_a_run(history)
        ended_history = history[last].run_id if last >= 0 else None
        added = history[last + 1 :]
        rewound_to: str | None = None
        branch: ContinuationKind | None = None
        cut = any(isinstance(message, pai.ModelResponse) for message in added)
        if ended_history is not None and (note := self._core.read_note(ended_history)) is not None:
            rewound_to, length = note
            branch = ContinuationKind.branch(ended_history)
            cut = cut or (length is not None and not _ends_run(history, last, length))
        unrecorded = {"messages": len(history), "last_loop_id": rewound_to} if cut else None
        # Keyed in the core by an object of its own: run ids are the caller's to give, and
        # two runs may be given the same.
        recording = self._core.start_run(
            object(),
            config,
            framework_session_id=ctx.conversation_id,
            metadata=None if unrecorded is None else {_UNRECORDED_HISTORY: unrecorded},
            kind=branch if rewound_to is not None else None,
            rewound_to=rewound_to,
            detached=unrecorded is not None,
        )
        if unrecorded is not None:
            self._report_unrecorded_history()
        else:
            timestamp = self._core.agent.millis()
            inputs: list[Message] = []
            for message in added:
                if isinstance(message, pai.ModelRequest):  # (a reply among them: `cut`)
                    _request_parts(message, timestamp, [], inputs)  # a system prompt part is none
            for converted in inputs:
                recording.loop.user(converted)
        if ctx.run_id is not None:
            # The length is known as the run ends (`_noted_length`).
            self._core.keep_note(ctx.run_id, (recording.loop.loop_id, None))
        return _Run(recording, self._core, ctx.run_id, ctx.prompt)

    def _noted_length(self, run: _Run, result: AgentRunResult[Any]) -> None:
        """Note how many messages `run` ended with: a later run given a history of as many
        (up to its last message) was given them all (`_open`)."""
        if run.run_id is not None:
            self._core.keep_note(run.run_id, (run.loop.loop_id, len(result.all_messages())))

    @classmethod
    def _report_unrecorded_history(cls) -> None:
        if cls._reported_history:  # a setting: once per process
            return
        cls._reported_history = True
        logger.warning(
            "pydantic-ai: a run's message_history is no recorded run's messages (cut from them, "
            "or with replies the caller added): its loop continues none, and its metadata %r counts "
            "the messages recorded nowhere but in each turn's request (capture_requests=True)",
            _UNRECORDED_HISTORY,
        )

    def _close(self, run: _Run, error: BaseException | None) -> None:
        if error is None:
            self._core.safely(run.tools_done, run.final_returns)
        else:
            self._core.safely(run.cut_off, error)
        self._core.safely(self._core.end_run, run.key, error)

    def _run(self, ctx: RunContext[Any]) -> _Run | None:
        return self._core.safely(_open_run, self._core, ctx)  # (a context without run_id, say)

    # -- model requests -------------------------------------------------------------------

    def get_wrapper_model(self, model: Model) -> Model | None:
        return self._core.safely(self._wrapper_model, model)  # None, the model as it is: a fault

    def _wrapper_model(self, model: Model) -> Model | None:
        core = self._core
        if any(run.core is core for run in _OPEN_RUNS.get()):  # only the models of runs it records
            return _Streams(model, core)
        return None

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        run = self._run(ctx)
        if run is not None:
            try:
                run.request()
            except Exception as caught:
                self._core.fault(caught)
        return request_context

    async def after_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, response: pai.ModelResponse
    ) -> pai.ModelResponse:
        run = self._run(ctx)
        if run is not None:
            try:
                model, provider = ctx.model.model_name, ctx.model.system
                payload = None
                if self.capture_requests:
                    payload = request_payload(
                        request_context.messages,
                        request_context.model_request_parameters,
                        model,
                        provider,
                        self._core.agent.millis(),
                    )
                run.response(response, model, provider, payload)
            except Exception as caught:
                self._core.fault(caught)
        return response

    async def after_node_run(
        self, ctx: RunContext[Any], *, node: AgentNode[Any], result: NodeResult[Any]
    ) -> NodeResult[Any]:
        if isinstance(node, CallToolsNode):
            run = self._run(ctx)
            if run is not None:
                try:
                    self._tools_step_done(run, ctx, result)
                except Exception as caught:
                    self._core.fault(caught)
        elif isinstance(result, End) and isinstance(result.data, FinalResult):
            # `run_stream` ended on its last response without a tools step: pydantic-ai answers
            # the calls it did not run in the history it hands the caller, which no hook sees,
            # and the response is recorded later (its hook runs once the stream is consumed).
            # The answers are the ones `agent.run` records from the history, recorded when the
            # run ends, as are those of calls handed back to the caller.
            run = self._run(ctx)
            if run is not None:
                try:
                    run.final_returns = self._stream_end_returns(run, ctx, result.data)
                except Exception as caught:
                    self._core.fault(caught)
        return result

    def _stream_end_returns(
        self, run: _Run, ctx: RunContext[Any], final: FinalResult[Any]
    ) -> pai.ModelRequest:
        output = final.output
        handed_back = _deferred_returns(output) if isinstance(output, DeferredToolRequests) else []
        calls = run.streamed.get().tool_calls if run.streamed is not None else []
        strategy = ctx.agent.end_strategy if ctx.agent is not None else None
        unrun = _unrun_returns(calls, final, strategy, ctx.tools, run.processed_outputs)
        return pai.ModelRequest(parts=[*handed_back, *unrun])

    def _tools_step_done(self, run: _Run, ctx: RunContext[Any], result: NodeResult[Any]) -> None:
        if isinstance(result, ModelRequestNode):
            # Before the next request, the step's returns are in its node, not yet in
            # `ctx.messages`.
            if run.turn is None:
                run.resumed(result.request, self._core.agent.millis())
            run.tools_done(result.request)
            return
        # After the last step, they are the history's end.
        returns: pai.ModelMessage | None = _last(ctx.messages)
        if isinstance(result, End) and isinstance(result.data, FinalResult):
            output = result.data.output
            if isinstance(output, DeferredToolRequests):  # calls handed back to the caller
                parts = returns.parts if isinstance(returns, pai.ModelRequest) else ()
                returns = pai.ModelRequest(parts=[*_deferred_returns(output), *parts])
        run.tools_done(returns)

    async def after_output_process(
        self, ctx: RunContext[Any], *, output_context: OutputContext, output: Any
    ) -> Any:
        # An output call `run_stream` processes once its final result is set: pydantic-ai's
        # return for it says so (`_unrun_returns`).
        call = output_context.tool_call
        if call is not None and not ctx.partial_output:
            run = self._run(ctx)
            if run is not None:
                run.processed_outputs.add(call.tool_call_id)
        return output

    # -- tools ----------------------------------------------------------------------------

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: pai.ToolCallPart,
        tool_def: PaiToolDefinition,
        args: ValidatedToolArgs,
        handler: WrapToolExecuteHandler,
    ) -> Any:
        run = self._run(ctx)
        tool = None
        if run is not None:
            try:
                tool = run.tool(call, ctx.model.model_name, ctx.model.system)
            except Exception as caught:
                self._core.fault(caught)
        if tool is None:
            return await handler(args)
        # A run started inside the tool (an agent delegated to) is its sub-agent.
        token = None
        try:
            token = enter_tool(tool)
        except Exception as caught:
            self._core.fault(caught)
        try:
            result = await handler(args)
        except BaseException as error:
            self._tool_done(token, tool, call, error=error)
            raise
        self._tool_done(token, tool, call, result=result)
        if run is not None and isinstance(result, pai.ToolReturn) and result.content is not None:
            run.prompts.append(result.content)
        return result

    def _tool_done(
        self,
        token: Token[RunningTool | None] | None,
        tool: ToolScope,
        call: pai.ToolCallPart,
        *,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        if token is not None:
            try:
                leave_tool(token)
            except Exception as caught:
                self._core.fault(caught)
        try:
            _tool_end(tool, call, result=result, error=error)
        except Exception as caught:
            self._core.fault(caught)

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
        except Exception as caught:
            self._core.fault(caught)


def _tool_end(
    tool: ToolScope, call: pai.ToolCallPart, *, result: Any = None, error: BaseException | None = None
) -> None:
    if error is None:
        tool.result(_tool_result_content(call, result))
    elif isinstance(error, (ToolRetryError, ToolFailedError)):
        # Not a failure of the run: the model gets this text as the tool's result.
        tool.error(str(error))
    elif isinstance(error, SkipToolExecution):
        tool.result(_tool_result_content(call, error.result))
    elif isinstance(error, (CallDeferred, ApprovalRequired)):
        # Handed back to the caller (DeferredToolRequests): no result yet.
        tool.result(deferred_result(type(error).__name__))
    else:
        tool.end(error)
        return
    tool.end()


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


# The replay model lives next to the adapter whose request converter it shares.
from .replay import ReplayModel, ReplayTools  # noqa: E402
