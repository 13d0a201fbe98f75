"""Google ADK adapter: phi-core sessions from ADK agents, with one plugin.

    from phi_session.adapters.google_adk import PhiPlugin

    runner = InMemoryRunner(agent=root_agent, plugins=[PhiPlugin()])

`PhiPlugin` is an ADK plugin (``google.adk.plugins.BasePlugin``); ADK calls it for
every agent of the runner, and for the agents an ``AgentTool`` runs (a nested runner
inherits the plugins). Every callback returns ``None``: the plugin only watches, it
never alters a request, a response, a tool's arguments or its result, and a fault in
it is counted and logged once (`PhiPlugin.fault_count`), never raised into ADK.

How ADK maps onto phi-core (``pip install 'phi-session[google-adk]'``, google-adk 2.13):

* an invocation (``Runner.run_async``) is a loop of the ADK session's phi session
  (the ADK session id, or its UUIDv5 when no store accepts it); a later invocation of
  the session continues its last loop. The invocation's user message is the loop's
  prompt, its function responses tool results: an invocation ADK resumes (a tool
  confirmed, a long-running tool's result sent back) records what was sent (an answer
  to ADK's own confirmation request, which no loop holds and the model is not sent, as
  metadata ``adk_tool_confirmations``), then the result of a tool ADK runs before
  calling the model (the confirmed one; the answer ADK gave it while it awaited
  confirmation stays the asking loop's result, a second result of its call);
* a model call (``before_model_callback``) opens a turn; streamed partial responses
  are ``MessageUpdate`` deltas (text, thoughts, function-call arguments); the final
  response is the assistant message, finished when ADK emits its event, so the
  function calls carry the ids ADK gives them; usage is the response's
  ``usage_metadata`` (a stream ending without a final response: the streamed thinking
  and text). An answer a before-model callback gives in the model's place
  (an agent's, or a plugin's listed after this one) is the message, from its event.
  The turn ends at the next model call, or when its agent or the invocation ends. An
  answer an agent callback gives (before the agent, its model never called; after it,
  added to the model's) is a turn of its own, that answer its message, with no usage;
  so is one a plugin listed after this one gives before the run (no agent runs), in
  the invocation's loop;
* tool callbacks are tool executions, whose result is what ADK sends the model (the
  function response of its event, a value that is no dict unwrapped from ADK's
  ``{"result": value}``): an agent's ``after_tool_callback`` (run after the plugins) may
  replace it; a tool error is a failed result, with the answer an
  ``on_tool_error_callback`` gives (ADK's, for a tool that does not exist) as its text,
  or the error, when it escapes;
* another agent taking over within the invocation (``transfer_to_agent``, the next
  agent of a ``SequentialAgent``) ends the loop and starts a loop continuing it; a
  transfer's assistant message has stop reason ``handoff``. The invocation's first
  loop has the config of the first LLM agent under the invocation's agent: another
  agent calling its model first (that one skipped, by its ``before_agent_callback``
  say) takes over from it the same way;
* each agent of a ``ParallelAgent`` runs in a loop of its own, a ``Branch`` (tagged
  with the ADK branch) of the loop before it, done when that agent is (its
  after_agent_callback's answer still its turn, a sibling's later failure not its
  own), ending with the invocation or as the branch forks anew (each run of the
  ``ParallelAgent``, in a ``LoopAgent`` say, forks anew). ADK picks no
  winner, so none is recorded: the next loop of the invocation continues the loop
  the branches left;
* an ``AgentTool`` runs its agent in a nested invocation: that is a sub-agent, in a
  session of its own, linked both ways with the tool call;
* an exception escaping the invocation ends its loops failed (``Aborted`` + error).

What is not recorded: a plugin listed before this one that answers a callback itself
(returns a value) hides that callback from this plugin (ADK stops at the first
answer), so list `PhiPlugin` first (a result such a plugin substitutes for a tool's
hides the tool's end); live (bidirectional) streaming is
not mapped. An invocation stopped midway ends failed (``Aborted``, `ABANDONED` as its
error), a reply it cut off recorded as what came with stop reason ``aborted``: one whose
events the host stopped reading (a ``break``, ``aclose``, leaving the sync
``Runner.run`` loop), which ADK ends as if it were done, as it ends (between two steps
too; not after an LLM agent's final answer, which completes it); one whose task was
cancelled (ADK calls no plugin then) once ADK lets go of its context: at the next
invocation's start, or at `PhiPlugin.close`.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import msgspec

from ..._float32 import Float32
from ...events import LoopConfigSnapshot
from ...identity import AgentSession, Clock
from ...instrument import MessageScope, ToolScope, TurnScope, tool_failure_text
from ...messages import (
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
    ImageContent,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    ResponseFormat,
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
from ...model import without_provider
from ...processors import Processor, Redactor
from ...replay.lineage import active_lineage
from .._core import (
    AdapterCore,
    AdapterRun,
    RunningTool,
    SinkArg,
    enter_tool,
    jsonable,
    leave_tool,
    loop_config,
    require_extra,
    usage_of,
)

require_extra("google-adk", "google.adk.plugins.base_plugin")

from google.adk.agents import BaseAgent, LlmAgent, LoopAgent, SequentialAgent  # noqa: E402
from google.adk.models.base_llm import BaseLlm  # noqa: E402
from google.adk.plugins.base_plugin import BasePlugin  # noqa: E402
from google.genai import types  # noqa: E402
from pydantic import BaseModel  # noqa: E402

if TYPE_CHECKING:
    from google.adk.agents.callback_context import CallbackContext
    from google.adk.agents.invocation_context import InvocationContext
    from google.adk.events.event import Event
    from google.adk.models.llm_request import LlmRequest
    from google.adk.models.llm_response import LlmResponse
    from google.adk.tools.base_tool import BaseTool
    from google.adk.tools.tool_context import ToolContext
    from google.adk.workflow import BaseNode

__all__ = ["ABANDONED", "PhiPlugin", "ReplayLlm"]

FRAMEWORK = "google-adk"
_TRANSFER_TOOL = "transfer_to_agent"  # ADK's agent-transfer tool: its call is a handoff
_CONFIRMATION_TOOL = "adk_request_confirmation"  # ADK's call asking the user to confirm a tool
_TOLD_KEPT = 4096  # invocations whose message `PhiPlugin._first_told` remembers
# Finish reasons that end a response normally (anything else is recorded as an error).
_NORMAL_FINISH = {None, "STOP", "FINISH_REASON_UNSPECIFIED"}


# -- conversions ------------------------------------------------------------------------------


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _json_text(value: Any) -> str:
    """`value` as JSON text; what is not JSON (a tool may return any object) as `jsonable` makes it."""
    return value if isinstance(value, str) else _encode(jsonable(value)).decode()


def _replayed_result(tool_context: ToolContext) -> ToolResultMessage | None:
    """The recorded result a replay answered the call with (`ReplayLlm.tools_plugin`),
    if a cursor of the enclosing ``recording_as`` block did (any agent's replay model)."""
    lineage = active_lineage()
    call_id = tool_context.function_call_id
    return lineage.take_answered(call_id) if lineage is not None and call_id is not None else None


def _partial_arg_text(arg: types.PartialArg) -> str | None:
    """A streamed argument piece as delta text: a string value's piece as it comes, another
    value as JSON; None for a piece without one (an empty container, which ADK drops too)."""
    if arg.string_value is not None:
        return arg.string_value
    for value in (arg.number_value, arg.bool_value):
        if value is not None:
            return _json_text(value)
    return "null" if arg.null_value is not None else None


def _blocks(parts: Sequence[types.Part] | None) -> tuple[Content, ...]:
    """phi-core content of ADK parts: text, thoughts, images and function calls as
    themselves; any other part as the JSON ADK gives it, so nothing is lost."""
    blocks: list[Content] = []
    for part in parts or ():
        call = part.function_call
        blob = part.inline_data
        if part.text is not None:
            if part.thought:
                signature = part.thought_signature
                blocks.append(
                    ThinkingContent(
                        thinking=part.text,
                        signature=base64.b64encode(signature).decode() if signature else None,
                    )
                )
            else:
                blocks.append(TextContent(text=part.text))
        elif call is not None:
            blocks.append(
                ToolCall(id=call.id or "", name=call.name or "", arguments=jsonable(call.args or {}))
            )
        elif blob is not None and blob.data is not None and (blob.mime_type or "").startswith("image/"):
            blocks.append(
                ImageContent(data=base64.b64encode(blob.data).decode(), mime_type=blob.mime_type or "")
            )
        else:
            blocks.append(TextContent(text=part.model_dump_json(exclude_none=True)))
    return tuple(blocks)


def _usage(metadata: types.GenerateContentResponseUsageMetadata | None) -> Usage | None:
    """One response's usage. Gemini's prompt count includes the cached tokens and its
    candidate count excludes the thoughts; phi-core's input excludes the cache and its
    output includes the reasoning. ADK's LiteLlm counts the reasoning in the candidates
    (OpenAI's completion tokens include it), as its total shows: prompt + candidates.
    ADK's Anthropic and LiteLlm models count the cache writes in the prompt too, and
    give them as an attribute of their own."""
    if metadata is None:
        return None
    cached = metadata.cached_content_token_count or 0
    written = getattr(metadata, "cache_creation_input_tokens", None) or 0
    prompt = (metadata.prompt_token_count or 0) + (metadata.tool_use_prompt_token_count or 0)
    thoughts = metadata.thoughts_token_count or 0
    candidates = metadata.candidates_token_count or 0
    inputs = max(0, prompt - cached - written)
    included = metadata.total_token_count == prompt + candidates
    output = candidates if included else candidates + thoughts
    return usage_of(inputs, output, cache_read=cached, cache_write=written, reasoning=thoughts)


def _request_messages(content: types.Content, timestamp: int) -> list[Message]:
    """One content of a request in phi-core's form: the model's as an assistant message;
    a user content's function responses as tool results, its other parts as a user message."""
    parts = content.parts or []
    if content.role == "model":
        blocks = _blocks(parts)
        calls = any(isinstance(block, ToolCall) for block in blocks)
        return [
            AssistantMessage(
                content=blocks,
                stop_reason="toolUse" if calls else "stop",
                model="",
                provider="",
                usage=Usage(input=0, output=0),
                timestamp=timestamp,
            )
        ]
    messages: list[Message] = []
    others = [part for part in parts if part.function_response is None]
    if others:
        messages.append(UserMessage(content=_blocks(others), timestamp=timestamp))
    for part in parts:
        answer = part.function_response
        if answer is not None:
            messages.append(
                ToolResultMessage(
                    tool_call_id=answer.id or "",
                    tool_name=answer.name or "",
                    content=(TextContent(text=_json_text(answer.response or {})),),
                    is_error=False,
                    timestamp=timestamp,
                )
            )
    return messages


def _system_prompt(instruction: types.ContentUnion | None) -> str:
    if instruction is None or isinstance(instruction, str):
        return instruction or ""
    if isinstance(instruction, types.Content):
        return "".join(part.text or "" for part in instruction.parts or ())
    if isinstance(instruction, types.Part):
        return instruction.text or ""
    if isinstance(instruction, (list, tuple)):
        return "\n\n".join(_system_prompt(item) for item in instruction)
    return str(instruction)  # an image or a file: no text of its own


def _tool_definitions(tools: Sequence[Any] | None) -> tuple[ToolDefinition, ...]:
    """The function declarations offered (a built-in tool, Google search say, declares none)."""
    definitions = []
    for tool in tools or ():
        for declaration in getattr(tool, "function_declarations", None) or ():
            schema = declaration.parameters_json_schema
            if schema is None and declaration.parameters is not None:
                schema = declaration.parameters.model_dump(mode="json", exclude_none=True)
            definitions.append(
                ToolDefinition(
                    name=declaration.name or "",
                    description=declaration.description or "",
                    parameters=jsonable(schema),
                )
            )
    return tuple(definitions)


def _response_format(config: types.GenerateContentConfig) -> ResponseFormat:
    schema, declared = config.response_json_schema, config.response_schema
    if schema is None and isinstance(declared, types.Schema):
        schema = declared.model_dump(mode="json", exclude_none=True)
    elif schema is None and isinstance(declared, type) and issubclass(declared, BaseModel):
        schema = declared.model_json_schema()  # an agent's output_schema
    if schema is not None:
        return JsonSchemaFormat(schema=jsonable(schema), name="response", strict=False)
    if config.response_mime_type == "application/json":
        return JsonObjectFormat()
    return TextFormat()


def _request(request: LlmRequest, timestamp: int) -> AnnotatedRequestPayload:
    """The request ADK sends to the model, in phi-core's form (`Turn.request_payload`)."""
    config = request.config
    messages = tuple(
        message for content in request.contents for message in _request_messages(content, timestamp)
    )
    return AnnotatedRequestPayload(
        system_prompt=_system_prompt(config.system_instruction),
        messages=messages,
        provenance=tuple(UnknownBlock() for _ in messages),
        tools=_tool_definitions(config.tools),
        model_id=request.model or "",
        thinking_level="off",
        max_tokens=config.max_output_tokens,
        temperature=None if config.temperature is None else Float32(config.temperature),
        response_format=_response_format(config),
    )


_name = attrgetter("name")


def _stop(response: LlmResponse, calls: Sequence[types.FunctionCall]) -> tuple[StopReason | None, str | None]:
    """The stop reason (None: phi-core's default) and error text of a final response."""
    reason = response.finish_reason
    name = reason.value if reason is not None else None
    # ADK repeats a finish reason other than STOP as the error code (a stream's last
    # response, a response without content): the token limit is no error.
    if name == "MAX_TOKENS" and response.error_code in (None, name):
        return "length", None
    if response.error_code or response.error_message:
        return "error", response.error_message or str(response.error_code)
    if name not in _NORMAL_FINISH:
        return "error", name
    if _TRANSFER_TOOL in map(_name, calls):
        return "handoff", None
    return None, None


def _model_id(model: BaseLlm | str) -> tuple[str, str]:
    """The provider and model of an agent's model. A LiteLLM id names its provider first
    (``openai/gpt-4o``): the model is recorded without it, as the provider's own name."""
    name = model.model if isinstance(model, BaseLlm) else model
    if isinstance(model, ReplayLlm):
        return model.provider, name  # the recorded ones
    kinds = {cls.__name__ for cls in type(model).__mro__} if isinstance(model, BaseLlm) else set()
    if "LiteLlm" in kinds or "/" in name:
        prefix, slash, rest = name.partition("/")
        return (prefix, rest) if slash else ("litellm", name)
    if "Gemini" in kinds or name.startswith(("gemini", "gemma")):
        return "google", name
    if "AnthropicLlm" in kinds or name.startswith("claude"):
        return "anthropic", name
    return type(model).__name__.lower() if isinstance(model, BaseLlm) else FRAMEWORK, name


def _model_agent(agent: BaseNode | None) -> LlmAgent | None:
    """The agent whose model runs first under `agent` (itself, or its first LLM descendant)."""
    pending = [agent] if isinstance(agent, BaseAgent) else []
    while pending:
        node = pending.pop(0)
        if isinstance(node, LlmAgent):
            return node
        pending[:0] = node.sub_agents
    return None


def _cancelling() -> tuple[asyncio.Task[Any] | None, int]:
    """The task running, and how many cancellations of it are pending (`Task.cancelling`)."""
    task = asyncio.current_task()
    if task is None or sys.version_info < (3, 11):  # google-adk itself needs 3.11
        return task, 0
    return task, task.cancelling()


def _cancelled(invocation: _Invocation | None) -> bool:
    """Whether the callback runs as its task is cancelled since `invocation` started: ADK
    then runs the after-agent and after-run callbacks as if the agents were done. Not
    the exception being handled: inside ADK's generators that finds a host's own further
    down, one it runs the invocation in an ``except CancelledError:`` or ``finally:`` for."""
    if invocation is None:
        return False
    task, cancelling = _cancelling()
    # A task of ADK's other than the one the invocation started in (a parallel branch's)
    # started within it, none of its cancellations pending then.
    return cancelling > (invocation.cancelling if task is invocation.task else 0)


def _closing() -> GeneratorExit | None:
    """The generator close being handled, if any (`sys.exc_info`: a generator's own, else
    the one of whoever drives it)."""
    error = sys.exc_info()[1]
    return error if isinstance(error, GeneratorExit) else None


def _closed_early(invocation: _Invocation) -> bool:
    """Whether the host closed the invocation's events before their end (a ``break``,
    ``aclose``): ADK then calls after_run_callback as it handles that close. Not a close
    the host was handling already as the invocation started (one it runs the invocation
    in a ``finally:`` for)."""
    closing = _closing()
    return closing is not None and closing is not invocation.closing


def _is_answer(event: Event) -> bool:
    """Whether an agent's event outside any model call is an answer (an agent callback's
    content), not a tool's response (a confirmed tool's, run before the model) or the user's."""
    content = event.content
    return (
        event.author != "user"
        and content is not None
        and bool(content.parts)
        and not event.get_function_responses()
    )


def _runs_branch(agent: BaseAgent, branch: str | None) -> bool:
    """Whether `agent` is the one a parallel branch runs (ADK names the branch after it)."""
    return branch is not None and branch.rpartition(".")[2] == agent.name


def _new_message(ic: InvocationContext) -> tuple[str, types.Content] | None:
    """The message the invocation was started with, if any, and its event's id: ADK
    appends it to the session, as the user's event of the invocation, just before the
    run starts. Not ``user_content``: an invocation ADK resumes (a confirmation, a
    long-running tool's result sent back) reuses its id and puts its first prompt back
    there, and one resumed without a new message has none to record (its last event may
    still be the message of its start, recorded then)."""
    events = ic.session.events
    last = events[-1] if events else None
    if last is None or last.author != "user" or last.invocation_id != ic.invocation_id:
        return None
    content = last.content
    return (last.id, content) if content is not None and content.parts else None


def _confirmations(content: types.Content, events: Sequence[Event]) -> tuple[types.Content, list[Any]]:
    """`content` without its answers to ADK's own confirmation requests, and those answers,
    each naming the tool call it approves or rejects. ADK makes the request call itself
    (``adk_request_confirmation``): no loop holds it, and the model is sent neither it
    nor its answer, only the confirmed tool's result."""
    parts = content.parts or []
    answers = {
        answer.id: answer
        for answer in (part.function_response for part in parts)
        if answer is not None and answer.name == _CONFIRMATION_TOOL
    }
    if not answers:
        return content, []
    asked = {call.id: call for event in events for call in event.get_function_calls() if call.id in answers}
    confirmations: list[Any] = []
    for call_id, answer in answers.items():
        call = asked.get(call_id)
        original = (call.args or {}).get("originalFunctionCall") if call is not None else None
        tool = original if isinstance(original, dict) else {}
        confirmations.append(
            {
                "tool_call_id": tool.get("id", ""),
                "tool_name": tool.get("name", ""),
                "confirmation": jsonable(answer.response or {}),
            }
        )
    rest = [
        part for part in parts if part.function_response is None or part.function_response.id not in answers
    ]
    return content.model_copy(update={"parts": rest}), confirmations


def _metadata(invocation_id: str, branch: str | None) -> dict[str, Any]:
    """The metadata of a loop of invocation `invocation_id`, in its parallel `branch`."""
    metadata: dict[str, Any] = {"adk_invocation_id": invocation_id}
    if branch is not None:
        metadata["adk_branch"] = branch
    return metadata


def _agent(cc: CallbackContext) -> BaseNode | None:
    """The agent running (looked up only when needed: ADK copies its context to give it)."""
    return cc.get_invocation_context().agent


def _config(agent: BaseNode | None) -> LoopConfigSnapshot:
    """The loop config of `agent`'s model: its own, else inherited as ADK resolves it
    (an agent without a model uses its nearest LLM ancestor's), without building it."""
    node: BaseAgent | None = _model_agent(agent)
    while node is not None:
        model = getattr(node, "model", None)
        if isinstance(model, BaseLlm) or (isinstance(model, str) and model):
            provider, name = _model_id(model)
            return loop_config(name, provider, node.name)
        node = node.parent_agent
    return loop_config("unknown", FRAMEWORK, agent.name if agent is not None else None)


# -- per-invocation state ---------------------------------------------------------------------


class _Reply:
    """The assistant message of one model call: streamed deltas, then the final
    responses. Their content is taken from the events ADK emits for them, which carry
    the function-call ids ADK assigns after the model callbacks; a stream mixing text
    and calls ends in several final responses, so the message is finished only when
    the turn moves on (a tool starts, the next model call, the agent or run ends).

    A before-model callback that answers in the model's place (an agent's, or a plugin
    listed after this one) skips the model and its after-model callbacks: its answer
    arrives only as the agent's event, which then is the final response."""

    __slots__ = ("_heard", "_last", "_parts", "_unseen", "scope")

    def __init__(self, scope: MessageScope) -> None:
        self.scope = scope
        self._heard = False  # whether the model sent anything (partial or final)
        self._parts: list[types.Part] = []
        self._last: LlmResponse | None = None  # the latest final response or its event
        self._unseen: LlmResponse | None = None  # a final response whose event is to come

    def partial(self, response: LlmResponse) -> None:
        self._heard = True
        content = response.content
        for part in content.parts or () if content is not None else ():
            if part.text:
                if part.thought:
                    self.scope.thinking_delta(part.text)
                else:
                    self.scope.text_delta(part.text)
            elif part.function_call is not None:
                call = part.function_call
                if call.args:
                    self.scope.tool_call_delta(_json_text(call.args))
                # Progressive SSE (Gemini 3 models): the arguments stream a value, or a
                # piece of a string value, at a time, with `args` left empty.
                for arg in call.partial_args or ():
                    piece = _partial_arg_text(arg)
                    if piece is not None:
                        self.scope.tool_call_delta(piece)

    def final(self, response: LlmResponse) -> None:
        self._heard = True
        self._take_unseen()
        self._unseen = response

    @property
    def waiting(self) -> bool:
        """Whether the agent's next event is the message: a final response waits for
        it, or the model sent nothing (a callback may answer in its place)."""
        return self._unseen is not None or not self._heard

    def event(self, event: Event) -> None:
        """The agent's event while `waiting`: the final response's, or the answer a
        before-model callback gave."""
        if self.waiting:
            self._unseen = None
            self._heard = True
            self._take(event)

    def _take(self, response: LlmResponse) -> None:
        if response.content is not None:
            self._parts.extend(response.content.parts or ())
        self._last = response

    def _take_unseen(self) -> None:
        # Its event never came (another plugin answered on_event_callback): ADK's ids are lost.
        if self._unseen is not None:
            unseen, self._unseen = self._unseen, None
            self._take(unseen)

    @property
    def cut_off(self) -> bool:
        """Whether the model's answer is incomplete: no final response yet, or one ADK
        has not emitted (the events are emitted as they come, so the rest was to come)."""
        return self._last is None or self._unseen is not None

    @property
    def _calls(self) -> bool:
        return any(part.function_call is not None for part in self._parts)

    @property
    def stopped(self) -> bool:
        """Whether the answer stopped short of what was to follow: it is cut off, or it
        called tools none of which has started."""
        return self.cut_off or (self.scope.running and self._calls)

    def finish(self, error: BaseException | str | None = None) -> None:
        """Finish the message with what arrived. A stream may end without a final
        response: then with the streamed thinking and text, unless the turn failed (its
        end then finishes the message as failed). A reply the `ABANDONED` invocation cut
        off is what came, with stop reason ``aborted``, as phi-core records a reply the
        user aborted."""
        if not self.scope.running:  # finished already: what arrives since changes nothing
            return
        cut = error == ABANDONED and self.cut_off
        self._take_unseen()
        last = self._last
        stop_reason: StopReason | None
        message: str | None
        if cut:
            stop_reason, message = "aborted", ABANDONED
        elif last is None:
            if self._heard and error is None:  # partial responses only
                self.scope.finish()
            return
        else:
            calls = [part.function_call for part in self._parts if part.function_call is not None]
            stop_reason, message = _stop(last, calls)
        if last is not None and last.model_version:  # the model that served it (a dated snapshot)
            self.scope.model = without_provider(self.scope.provider, last.model_version)
        # Usage is cumulative over a stream: the last response's is the call's.
        self.scope.finish(
            None if last is None else _blocks(self._parts),  # None: what streamed
            usage=None if last is None else _usage(last.usage_metadata),
            stop_reason=stop_reason,
            error_message=message,
        )


class _ToolOutsideTurn:
    """A tool ADK runs with no model turn open: the confirmed tool of a resumed invocation,
    run before its first model call. No turn holds it, so its result is recorded as a
    tool-result message ahead of the next turn, as the invocation's message is."""

    __slots__ = ("_content", "_is_error", "_run", "call_id", "name", "running")

    def __init__(self, run: AdapterRun, call_id: str, name: str) -> None:
        self._run, self.call_id, self.name = run, call_id, name
        self._content: tuple[Content, ...] = ()
        self._is_error = False
        self.running = True

    def result(self, content: str | Sequence[Content]) -> None:
        self._content = (TextContent(text=content),) if isinstance(content, str) else tuple(content)

    def error(self, content: str | Sequence[Content]) -> None:
        self.result(content)
        self._is_error = True

    def end(self, error: BaseException | str | None = None) -> None:
        self.running = False
        if error is not None:
            self.error(tool_failure_text(self.name, error))
        run = self._run
        run.loop.user(
            ToolResultMessage(
                tool_call_id=self.call_id,
                tool_name=self.name,
                content=self._content,
                is_error=self._is_error,
                timestamp=run.tracer.agent.millis(),
            )
        )


def _built_from(sent: dict[str, Any], result: Any) -> bool:
    """Whether ADK's function response `sent` is the one it builds from the tool's
    `result`: that dict (copied: its values themselves) or ``{"result": value}``."""
    built = result if isinstance(result, dict) else {"result": result}
    return sent.keys() == built.keys() and all(sent[key] is value for key, value in built.items())


def _end_tool(scope: ToolScope | _ToolOutsideTurn, result: Any, error: BaseException | None) -> None:
    """End a tool with the result or error its callbacks saw."""
    if error is None:
        scope.result(_json_text(result))
    scope.end(error)


@dataclass
class _Lane:
    """The loop of one ADK branch of an invocation (the root branch is ``None``) and
    what is open in it: the agent whose model calls it records, its turn, the turn's
    reply, and its running tools by call id."""

    key: tuple[str, str | None]
    run: AdapterRun
    agent: str | None = None
    turn: TurnScope | None = None
    reply: _Reply | None = None
    tools: dict[str, tuple[ToolScope | _ToolOutsideTurn, Token[RunningTool | None] | None]] = field(
        default_factory=dict
    )
    # Tools whose callbacks are done, by call id, until ADK's function response tells
    # what the model got: with the result the plugin saw, or the tool's error. An
    # agent's after_tool/on_tool_error callback runs after this plugin's and may answer
    # in the tool's place.
    answered: dict[str, tuple[ToolScope | _ToolOutsideTurn, Any, BaseException | None]] = field(
        default_factory=dict
    )
    done: bool = False  # the agent of its parallel branch is done: the loop ends completed

    def open_turn(
        self, agent: str | None, model: str | None, request: AnnotatedRequestPayload | None
    ) -> _Reply:
        """End the turn open, if any, and open the next, for `agent` (None: no agent has
        acted yet); returns its reply."""
        self.end_turn()
        self.agent = agent
        loop = self.run.loop
        self.turn = loop.turn(request=request).start()
        config = loop.config
        provider = config.provider if config is not None else None
        reply = self.reply = _Reply(
            self.turn.assistant(
                model=without_provider(provider, model) if model else (config.model if config else None),
                provider=provider,
            ).start()
        )
        return reply

    def settle(self) -> None:
        """The turn moves on: finish its reply."""
        if self.reply is not None:
            self.reply.finish()

    def end_turn(self, error: BaseException | str | None = None) -> None:
        self.end_answered()
        if self.reply is not None:
            self.reply.finish(error)
        turn = self.turn
        self.turn = self.reply = None
        if turn is not None and turn.running:
            turn.end(error)

    def stopped_midway(self, cancelled: bool) -> bool:
        """Whether, as its invocation ends, the lane's agent stopped midway: a tool still
        runs, its reply stopped short, or its turn is still open while the task is
        `cancelled` (an agent that is done has ended its turn)."""
        reply = self.reply
        return reply is not None and (cancelled or bool(self.tools) or reply.stopped)

    def start_tool(self, call_id: str, name: str, args: Any) -> None:
        self.settle()
        turn = self.turn
        if turn is None:
            if self.run.loop.running:
                self.tools[call_id] = (_ToolOutsideTurn(self.run, call_id, name), None)
            return
        if not turn.running:
            return
        scope = turn.tool(id=call_id, name=name, args=jsonable(args)).start()
        # The tool runs in a copy of this context (ADK makes sure of it), so an
        # invocation it starts (AgentTool) finds it: a sub-agent.
        self.tools[call_id] = (scope, enter_tool(scope))

    def await_response(
        self, call_id: str, scope: ToolScope | _ToolOutsideTurn, result: Any, error: BaseException | None
    ) -> None:
        """Tool `call_id`'s callbacks are done, with `result` or `error`: it ends when
        its function response comes."""
        self.answered[call_id] = (scope, result, error)

    def responded(self, responses: Sequence[types.FunctionResponse]) -> None:
        """ADK's function responses: what the model gets for the calls they answer. One
        ADK did not build from the result the plugin saw (an agent's callback replaced
        it, or answered an error; ADK answered a call of a tool that does not exist) is
        the result, unwrapped when ADK wrapped a value as ``{"result": value}``; an
        error answered stays an error (the tool failed), the answer its text."""
        for response in responses:
            entry = self.answered.pop(response.id or response.name or "", None)
            if entry is None:
                continue
            scope, result, error = entry
            sent = response.response or {}
            # Media ADK moved out of the result into parts: the plugin's result holds it.
            if not response.parts and (error is not None or not _built_from(sent, result)):
                answer = _json_text(sent["result"] if list(sent) == ["result"] else sent)
                if error is None:
                    scope.result(answer)
                else:
                    scope.error(answer)
                scope.end()
            else:
                _end_tool(scope, result, error)

    def end_answered(self) -> None:
        """End the answered tools no function response came for (a long-running tool
        returning None, the turn or invocation ending first): with what the plugin saw."""
        answered, self.answered = self.answered, {}
        for scope, result, error in answered.values():
            _end_tool(scope, result, error)

    def take_tool(self, call_id: str) -> ToolScope | _ToolOutsideTurn | None:
        """The running tool `call_id`, no longer marked as running in this context."""
        entry = self.tools.pop(call_id, None)
        if entry is None:
            return None
        scope, token = entry
        if token is not None:
            leave_tool(token)
        return scope if scope.running else None

    def close(self, error: BaseException | str | None) -> None:
        """The invocation ends: tools still running end failed, then the turn."""
        for call_id in list(self.tools):
            scope = self.take_tool(call_id)
            if scope is not None:
                scope.end(error if error is not None else "the invocation ended while the tool ran")
        self.end_turn(error)


ABANDONED = "the invocation stopped before it finished (its task cancelled or its events no longer read)"
"""The error of a loop whose invocation stopped midway, and of the reply it cut off."""


class _Invocation:
    """The lanes of one ADK invocation, by branch."""

    def __init__(self, invocation_id: str, watch: weakref.finalize[Any, Any], agent: Any) -> None:
        self.id = invocation_id
        self.agent = agent  # the agent it runs
        self.final: str | None = None
        """The author of its last event (not partial) if that was a final response."""
        self.escalated = False  # whether that event escalated (a LoopAgent's exit)
        self.rounds: dict[str, int] = {}
        """The rounds each LoopAgent of the invocation began in its latest run, by name."""
        self.lanes: dict[str | None, _Lane] = {}
        self.branched = False  # whether a parallel branch forked
        # Reports the invocation abandoned when ADK frees its context before it ended.
        self.watch = watch
        self.task, self.cancelling = _cancelling()  # what `_cancelled` compares with
        self.closing = _closing()  # what `_closed_early` compares with

    @property
    def answered(self) -> bool:
        """Whether the invocation gave its final answer: its last event was a final response,
        as ADK tells a host (``Event.is_final_response``: a reply calling no tool, or a
        tool's result given as the answer, ``skip_summarization``), by an agent after
        which nothing was to run (`last_to_run`)."""
        author = self.final
        return author is not None and self.last_to_run(author)

    def agent_started(self, agent: BaseAgent) -> None:
        """Count the rounds of the LoopAgents: a round begins as its first agent starts."""
        if isinstance(agent, LoopAgent):
            self.rounds[agent.name] = 0
        parent = agent.parent_agent
        if isinstance(parent, LoopAgent) and parent.sub_agents[0] is agent:
            self.rounds[parent.name] = self.rounds.get(parent.name, 0) + 1

    def last_to_run(self, author: str) -> bool:
        """Whether nothing was to run after agent `author` in the invocation: up to the
        invocation's agent, it is the last of each ``SequentialAgent`` holding it, and of
        each ``LoopAgent`` in its last round (``max_iterations``) unless its answer exits
        the loop (``escalate``). An LLM agent holding it transferred to it: its answer
        ends that agent's too. What another workflow agent (``ParallelAgent``, one of
        your own) runs next is not known: taken as more to run."""
        top = self.agent
        agent = top.root_agent.find_agent(author) if isinstance(top, BaseAgent) else None
        if agent is None:
            return True  # no agent of the tree (a plugin answering for the runner): nothing runs after
        # Up to the invocation's agent, or the tree's root for one it transferred to above it.
        while agent is not top and agent.parent_agent is not None:
            parent = agent.parent_agent
            last = parent.sub_agents[-1] is agent
            if isinstance(parent, SequentialAgent):
                if not last:
                    return False
            elif isinstance(parent, LoopAgent):
                limit = parent.max_iterations
                final_round = last and limit is not None and self.rounds.get(parent.name, 0) >= limit
                if not (self.escalated or final_round):
                    return False
            elif not isinstance(parent, LlmAgent):
                return False
            agent = parent
        return True

    def parent_of(self, branch: str) -> _Lane:
        """The lane a new branch forks from: its nearest enclosing branch, else the root."""
        name = branch
        while "." in name:
            name = name.rpartition(".")[0]
            lane = self.lanes.get(name)
            if lane is not None:
                return lane
        return self.lanes[None]


class PhiPlugin(BasePlugin):
    """Records an ADK runner's invocations as phi-core sessions (see the module docstring).

    * `sink`: a sink, a list of sinks, or None (default): the embedded store
      (`phi_session.stores.default_store`), sessions saved as they complete.
    * `store`: where earlier invocations of an ADK session are looked up for
      continuations across restarts (default: the embedded store when `sink` is None).
    * `agent`, `clock`, `processors`, `redact`: as for `phi_session.instrument.Tracer`.
    * `name`: the plugin's name in the runner (ADK requires unique names).
    * `capture_requests`: also record each turn's request (system instruction, the
      contents sent, the function declarations offered) as its ``TurnRequest``
      (`Turn.request_payload`): off by default, as it repeats the history every turn.
    * `max_idle_sessions`: how many ADK sessions without a running invocation keep their
      full state in memory (`phi_session.adapters.AdapterCore`).

    `close()` (ADK calls it when the runner closes) flushes the sinks, the embedded
    store saving what is finished. ADK does not say which runner closes, so invocations
    still running (this runner's, or another's given the plugin too) go on being
    recorded: the last of them to end closes the plugin.
    """

    def __init__(
        self,
        sink: SinkArg = None,
        *,
        name: str = "phi_session",
        capture_requests: bool = False,
        store: Any = None,
        agent: AgentSession | None = None,
        clock: Clock | None = None,
        processors: Iterable[Processor] = (),
        redact: bool | Redactor = True,
        max_idle_sessions: int = 4096,
    ) -> None:
        super().__init__(name=name)
        self.core = AdapterCore(
            FRAMEWORK,
            sink,
            store=store,
            agent=agent,
            clock=clock,
            processors=processors,
            redact=redact,
            capture_requests=capture_requests,
            max_idle_sessions=max_idle_sessions,
        )
        self._lock = threading.Lock()  # ADK's sync Runner.run drives invocations from threads
        self._invocations: dict[str, _Invocation] = {}
        # Every lane of the open invocations by its key, (invocation id, branch): most
        # callbacks want only their lane, in one lookup.
        self._lanes: dict[tuple[str, str | None], _Lane] = {}
        # Ids of invocations whose context ADK freed before they ended, appended by a
        # finalizer (in whatever thread frees it, so nothing is done there but this append).
        self._abandoned: deque[str] = deque()
        self._closing = False  # closed while invocations ran: the last to end closes the core
        # The user's event last recorded as an invocation's message, by invocation id
        # (the most recent `_TOLD_KEPT`, least recently started first).
        self._told: OrderedDict[str, str] = OrderedDict()

    @property
    def fault_count(self) -> int:
        """Faults of this plugin so far (each logged once; the runs went on)."""
        return self.core.fault_count

    # -- ADK callbacks: each returns None (never alters the host) --------------------------

    async def before_run_callback(self, *, invocation_context: InvocationContext) -> None:
        try:
            self._start(invocation_context)
        except Exception as caught:
            self.core.fault(caught)

    async def after_run_callback(self, *, invocation_context: InvocationContext) -> None:
        try:
            invocation_id = invocation_context.invocation_id
            self._finish(invocation_id, ABANDONED if self._stopped(invocation_id) else None)
        except Exception as caught:
            self.core.fault(caught)

    async def on_run_error_callback(self, *, invocation_context: InvocationContext, error: Exception) -> None:
        try:
            self._finish(invocation_context.invocation_id, error)
        except Exception as caught:
            self.core.fault(caught)

    async def before_agent_callback(self, *, agent: BaseAgent, callback_context: CallbackContext) -> None:
        try:
            invocation = self._invocations.get(callback_context.invocation_id)
            if invocation is not None:
                invocation.agent_started(agent)
            branch = callback_context.branch
            if _runs_branch(agent, branch):
                # A later run of the ParallelAgent (in a LoopAgent): the branch forks anew.
                lane = self._lanes.get((callback_context.invocation_id, branch))
                if lane is not None:
                    self._end_branch(lane)
        except Exception as caught:
            self.core.fault(caught)

    async def after_agent_callback(self, *, agent: BaseAgent, callback_context: CallbackContext) -> None:
        try:
            if _cancelled(self._invocations.get(callback_context.invocation_id)):
                return  # the agent is stopped, not done: its invocation's end tells which
            lane = self._lanes.get((callback_context.invocation_id, callback_context.branch))
            if lane is None:
                return
            if _runs_branch(agent, callback_context.branch):
                # The agent a parallel branch runs is done, and so is its loop: a
                # sibling's later failure is not its own. The loop stays open for the
                # answer the agent's own after_agent_callback (run after this) may give.
                lane.done = True
                lane.end_turn()
            elif lane.agent == agent.name:
                lane.end_turn()
        except Exception as caught:
            self.core.fault(caught)

    async def on_agent_error_callback(
        self, *, agent: BaseAgent, callback_context: CallbackContext, error: Exception
    ) -> None:
        try:
            lane = self._lanes.get((callback_context.invocation_id, callback_context.branch))
            if lane is not None and lane.agent == agent.name and callback_context.branch is not None:
                # A failing branch fails its own loop; the invocation's error ends the rest.
                # A fault closing what it holds must not keep the loop open.
                self.core.safely(lane.close, error)
                lane.run.loop.end(error)
        except Exception as caught:
            self.core.fault(caught)

    async def before_model_callback(
        self, *, callback_context: CallbackContext, llm_request: LlmRequest
    ) -> None:
        try:
            self._model_started(callback_context, llm_request)
        except Exception as caught:
            self.core.fault(caught)

    async def after_model_callback(
        self, *, callback_context: CallbackContext, llm_response: LlmResponse
    ) -> None:
        try:
            lane = self._lanes.get((callback_context.invocation_id, callback_context.branch))
            if lane is None or lane.reply is None:
                return
            if llm_response.partial:
                lane.reply.partial(llm_response)
            else:
                lane.reply.final(llm_response)
        except Exception as caught:
            self.core.fault(caught)

    async def on_event_callback(self, *, invocation_context: InvocationContext, event: Event) -> None:
        try:
            if event.partial:
                return
            invocation = self._invocations.get(invocation_context.invocation_id)
            if invocation is not None:
                invocation.final = event.author if event.is_final_response() else None
                invocation.escalated = bool(event.actions.escalate)
            lane = self._lanes.get((invocation_context.invocation_id, event.branch))
            if lane is not None and lane.answered:
                responses = event.get_function_responses()
                if responses:
                    lane.responded(responses)
                    return
            reply = lane.reply if lane is not None else None
            # Cheapest checks first: most events (tool responses) are not it.
            if lane is not None and reply is not None and event.author == lane.agent:
                if reply.waiting and not event.get_function_responses():
                    reply.event(event)
            elif _is_answer(event):
                # No turn open, or another agent's (an agent transferred to answering by
                # its callback while the transfer's turn is still open): a turn of its own.
                self._agent_answered(invocation_context, event)
        except Exception as caught:
            self.core.fault(caught)

    async def before_tool_callback(
        self, *, tool: BaseTool, tool_args: dict[str, Any], tool_context: ToolContext
    ) -> None:
        try:
            branch = tool_context.branch
            lane = self._lanes.get((tool_context.invocation_id, branch))
            if lane is None and branch is not None:
                # A tool of a resumed invocation's branch, run before its model is called
                # (the confirmed one): the branch forks as a model call would fork it.
                lane = self._lane_of(
                    tool_context.invocation_id, branch, tool_context.agent_name, lambda: _agent(tool_context)
                )
            if lane is not None:
                lane.start_tool(tool_context.function_call_id or tool.name, tool.name, tool_args)
        except Exception as caught:
            self.core.fault(caught)

    async def after_tool_callback(
        self, *, tool: BaseTool, tool_args: dict[str, Any], tool_context: ToolContext, result: Any
    ) -> None:
        try:
            taken = self._take_tool(tool_context, tool)
            if taken is not None:
                lane, call_id, scope = taken
                recorded = _replayed_result(tool_context)
                if recorded is None:
                    lane.await_response(call_id, scope, result, None)
                    return
                if recorded.is_error:  # a handled error replayed: ADK takes the answer for a success
                    scope.error(recorded.content)
                else:
                    scope.result(recorded.content)
                scope.end()
        except Exception as caught:
            self.core.fault(caught)

    async def on_tool_error_callback(
        self, *, tool: BaseTool, tool_args: dict[str, Any], tool_context: ToolContext, error: Exception
    ) -> None:
        try:
            taken = self._take_tool(tool_context, tool)
            if taken is not None:
                lane, call_id, scope = taken
                lane.await_response(call_id, scope, None, error)
        except Exception as caught:
            self.core.fault(caught)

    async def close(self) -> None:
        try:
            self._end_abandoned()
            # ADK does not say which runner closes: the invocations still running may be
            # another runner's, given this plugin too. They end as they finish, and the
            # last of them closes the core; what is finished is saved now.
            with self._lock:
                self._closing = bool(self._invocations)
            if self._closing:
                self.core.flush()
            else:
                self.core.close()
        except Exception as caught:
            self.core.fault(caught)

    # -- the mapping -----------------------------------------------------------------------

    def _start(self, ic: InvocationContext) -> None:
        if self._abandoned:
            self._end_abandoned()
        watch = weakref.finalize(ic, self._abandoned.append, ic.invocation_id)
        watch.atexit = False
        invocation = _Invocation(ic.invocation_id, watch, ic.agent)
        key = (ic.invocation_id, None)
        metadata = _metadata(ic.invocation_id, None)
        message = _new_message(ic)
        content = None
        if message is not None and self._first_told(ic.invocation_id, message[0]):
            content, confirmations = _confirmations(message[1], ic.session.events)
            if confirmations:
                metadata["adk_tool_confirmations"] = confirmations
        run = self.core.start_run(
            key, _config(ic.agent), framework_session_id=ic.session.id, metadata=metadata
        )
        lane = _Lane(key, run)
        invocation.lanes[None] = lane
        with self._lock:
            self._invocations[ic.invocation_id] = invocation
            self._lanes[key] = lane
        if content is not None:
            # Its function responses (a long-running tool's result) as tool results.
            for recorded in _request_messages(content, self.core.agent.millis()):
                run.loop.user(recorded)

    def _first_told(self, invocation_id: str, event_id: str) -> bool:
        """Whether the user's event `event_id` starting invocation `invocation_id` is not
        recorded yet: an invocation resumed without a new message (its first run's task
        cancelled, say) finds the message of its first run still the session's last."""
        with self._lock:
            told = self._told
            if told.get(invocation_id) == event_id:
                return False
            told[invocation_id] = event_id
            told.move_to_end(invocation_id)
            if len(told) > _TOLD_KEPT:
                told.popitem(last=False)
            return True

    def _model_started(self, cc: CallbackContext, request: LlmRequest) -> None:
        lane = self._lane_of(cc.invocation_id, cc.branch, cc.agent_name, lambda: _agent(cc))
        if lane is None:
            return
        payload = _request(request, self.core.agent.millis()) if self.core.capture_requests else None
        lane.open_turn(cc.agent_name, request.model, payload)

    def _agent_answered(self, ic: InvocationContext, event: Event) -> None:
        """An agent's answer outside any model call (its before- or after-agent callback's):
        a turn of its own, the answer its message (no usage: no model was called)."""
        name: str | None = event.author
        root = ic.agent  # the invocation's: the agent answering is found by its name
        found = root.root_agent.find_agent(event.author) if isinstance(root, BaseAgent) else None
        if found is None:
            # No agent of the tree (a plugin's before_run_callback answers as 'model'):
            # nobody takes over, the answer is a turn of the loop as it is.
            lane = self._lanes.get((ic.invocation_id, event.branch))
            if lane is None or not lane.run.loop.running:
                return
            name = lane.agent
        else:
            lane = self._lane_of(ic.invocation_id, event.branch, event.author, lambda: found)
            if lane is None:
                return
        lane.open_turn(name, None, None).event(event)
        lane.end_turn()

    def _lane_of(
        self, invocation_id: str, branch: str | None, agent_name: str, agent: Callable[[], BaseNode | None]
    ) -> _Lane | None:
        """The lane in which agent `agent_name` (`agent()`: the agent, looked up only when
        needed) opens a turn: its branch's (forked as it first acts), the loop handed over
        to it when another agent's."""
        invocation = self._invocations.get(invocation_id)
        if invocation is None:
            return None
        lane = invocation.lanes.get(branch)
        if lane is None:
            return self._fork(invocation, branch, agent()) if branch is not None else None
        config = None
        if lane.agent is None:
            # The lane's loop took the config of the first LLM agent under the
            # invocation's; when another agent acts first (that one was skipped, by its
            # before_agent_callback say), it takes over: a handoff.
            config = _config(agent())
            moved = config != lane.run.loop.config
        else:
            moved = lane.agent != agent_name
        if moved or not lane.run.loop.running:
            # Another agent takes over (a transfer, a SequentialAgent's next agent), or
            # the lane's loop was ended by branches forking from it: a continuation.
            lane.end_turn()
            run = self.core.handoff(
                lane.key, config or _config(agent()), metadata=_metadata(invocation_id, branch)
            )
            if run is None:
                return None
            lane.run = run
        return lane

    def _fork(self, invocation: _Invocation, branch: str, agent: BaseNode | None) -> _Lane | None:
        """A lane for a new parallel branch: a Branch of its parent lane's loop, which ends."""
        parent = invocation.parent_of(branch)
        if parent.run.loop.running:
            parent.end_turn()
            parent.run.loop.end()
        key = (invocation.id, branch)
        run = self.core.branch(
            key,
            parent.key,
            _config(agent),
            branch,
            metadata=_metadata(invocation.id, branch),
        )
        if run is None:
            return None
        lane = _Lane(key, run)
        invocation.lanes[branch] = lane
        invocation.branched = True
        self._lanes[key] = lane
        return lane

    def _end_branch(self, lane: _Lane) -> None:
        """End a parallel branch's lane and loop (a later run of the branch forks again)."""
        invocation_id, branch = lane.key
        invocation = self._invocations.get(invocation_id)
        if invocation is not None:
            invocation.lanes.pop(branch, None)
        self._lanes.pop(lane.key, None)
        self.core.safely(lane.close, None)
        self.core.end_run(lane.key)

    def _take_tool(
        self, tool_context: ToolContext, tool: BaseTool
    ) -> tuple[_Lane, str, ToolScope | _ToolOutsideTurn] | None:
        """The running tool of the callback, its lane and call id."""
        lane = self._lanes.get((tool_context.invocation_id, tool_context.branch))
        if lane is None:
            return None
        call_id = tool_context.function_call_id or tool.name
        scope = lane.take_tool(call_id)
        return (lane, call_id, scope) if scope is not None else None

    def _stopped(self, invocation_id: str) -> bool:
        """Whether the invocation ADK says is done stopped midway: ADK takes a host that
        stops reading its events (a break, ``aclose``, leaving the sync ``Runner.run``
        loop, which cancels its task) for a clean completion."""
        invocation = self._invocations.get(invocation_id)
        if invocation is None:
            return False
        cancelled = _cancelled(invocation)
        if any(lane.stopped_midway(cancelled) for lane in invocation.lanes.values()):
            return True
        # Closed between two steps (a tool's result read, an agent of a SequentialAgent
        # done): nothing is cut off, yet more was to come; not after an LLM agent's
        # final answer (a host's ``if event.is_final_response(): break``).
        return _closed_early(invocation) and not invocation.answered

    def _finish(self, invocation_id: str, error: BaseException | str | None) -> None:
        with self._lock:
            invocation = self._invocations.pop(invocation_id, None)
            if invocation is None:
                return
            for lane in invocation.lanes.values():
                self._lanes.pop(lane.key, None)
            close = self._closing and not self._invocations
            if close:
                self._closing = False
        # Each step under its own guard: a fault in one must not leave the invocation's
        # loops open (and its session unsaved, held busy).
        core = self.core
        core.safely(invocation.watch.detach)
        if invocation.branched:
            # No branch won: the session's next invocation continues the invocation's own line.
            # Set while the runs still hold their session: once they end, the core may let
            # the session's tracer go (`AdapterCore.max_idle_sessions`) and this would be lost.
            root = invocation.lanes[None].run
            core.safely(root.tracer.agent.set_last_loop, root.loop.loop_id)
        # Branches first, deepest first: a branch's loop ends before the loop it forked from.
        for _, lane in sorted(invocation.lanes.items(), key=lambda item: -len(item[0] or "")):
            ending = None if lane.done else error
            core.safely(lane.close, ending)
            core.safely(core.end_run, lane.key, ending)
        if close:
            core.close()

    def _end_abandoned(self) -> None:
        """End, failed, the invocations whose context ADK freed before they ended."""
        while True:
            try:  # another thread may take the last one first
                invocation_id = self._abandoned.popleft()
            except IndexError:
                return
            self._finish(invocation_id, ABANDONED)


# The replay model lives next to the adapter whose request converter it shares.
from .replay import ReplayLlm  # noqa: E402
