"""The OpenAI Agents SDK adapter: phi-core sessions from ``Runner`` runs, in one line.

    from phi_session.adapters import openai_agents
    openai_agents.install()                      # sessions go to the embedded store

`install` adds a tracing processor (``agents.add_trace_processor``: the user's other
processors keep running; ``replace_default=True`` replaces them with this one). The
SDK's spans become events through the adapter core (`phi_session.adapters`):

* a ``task`` span (one ``Runner`` run) is a loop; its first ``agent`` span names the
  agent, a later one is a handoff (the loop ends with stop reason ``handoff`` and the
  next agent's loop continues it); with ``include_task_and_turn_spans`` off the agent
  span is the loop (ending with the run's last agent span) and each model span a turn,
  and a later agent span of the run (in its trace and asyncio task) is a handoff only
  after a ``handoff`` span (else it is the next run);
* ``turn`` -> TurnStart/TurnEnd; ``response``/``generation`` -> the assistant message
  (text, reasoning, tool calls with their ids, usage of that response only; model
  from the response);
* ``function`` -> the tool's events and result (a span error -> ``is_error``); a run
  started inside a tool is that tool's sub-agent (own session, linked both ways); a call
  the run ends awaiting approval (``needs_approval``: the SDK checks it in a function span
  ending with no output nor error, as a tool returning None does before the run goes on;
  a tool that needs none is never taken for one) gets the result ``[deferred: needs_approval]``;
* a run resumed from its ``RunState`` (``Runner.run(agent, state)`` after
  ``state.approve`` or ``state.reject``) continues the interrupted loop: the SDK goes on
  in its trace without telling processors, the session is read from it
  (`_Mapper._session`); the approved calls it runs before its first model call and the
  rejected ones (the output the model is sent) are tool results ahead of its first
  turn's reply, as in its request, matched to their calls by it (no turn holds them: no
  tool events; an agent run as an approved tool is a sub-agent linked one way,
  `AdapterCore.start_sub_agent`);
* ``handoff`` -> the transfer call's result as the SDK writes it (``{"assistant": name}``);
  the reply that calls it stops with ``handoff``, function tools it calls too (their spans
  come first) notwithstanding (`_Mapper._hands_off`);
* a triggered input ``guardrail`` -> InputRejected, loop Rejected (loop failed if a
  turn began before the run ended: a streamed run calls the model anyway); a triggered
  output guardrail -> the loop fails with an error naming it (`_Mapper._guardrail_triggered`);
* a cancelled run (``asyncio.wait_for`` timeout, ``Task.cancel``): the spans the
  cancellation ends failed with ``cancelled`` (the reply, a running tool, the loop).

The session is ``trace_metadata["phi.session_id"]``, else the trace's ``group_id``,
else the adapter's own session. A loop's prompt is the user messages of its first input
after the last model output: a conversation continued with ``result.to_input_list()``
plus the next message sends the earlier turns again, which the session holds already.
Function spans carry no tool call id: they are matched to the response's calls by name
and order as they start; pass ``hooks=PhiRunHooks()`` to ``Runner.run`` to make the
match exact (and give the prompt and the agent's model).
Processors see no streamed chunks: iterate ``stream(result)`` instead of
``result.stream_events()`` to record text, reasoning and argument deltas.
``install(capture_requests=True)`` with the hooks also records each turn's request
(``TurnRequest``), converted by `request_payload`, the conversion the replay model
(`ReplayModel`, in ``replay.py``) checks a replayed run's requests with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import msgspec

from ...events import LoopConfigSnapshot
from ...instrument import MessageScope, ToolScope, TurnScope
from ...messages import (
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
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
from .._core import (
    AdapterCore,
    AdapterRun,
    SinkArg,
    deferred_result,
    enter_tool,
    leave_tool,
    loop_config,
    require_extra,
    since_last_reply,
    usage_of,
)

require_extra("openai-agents", "agents")

from agents import FunctionTool, Handoff, RunHooks  # noqa: E402
from agents._tool_identity import get_function_tool_trace_name, get_tool_call_trace_name  # noqa: E402
from agents.run_internal import agent_tool_configuration  # noqa: E402
from agents.run_internal.turn_preparation import get_handoffs  # noqa: E402
from agents.tracing import (  # noqa: E402
    Span,
    Trace,
    TraceProvider,
    TracingProcessor,
    add_trace_processor,
    get_current_span,
    get_current_trace,
    get_trace_provider,
)
from agents.tracing.processors import default_processor  # noqa: E402

__all__ = [
    "PhiRunHooks",
    "PhiTracingProcessor",
    "ReplayModel",
    "ReplayProvider",
    "install",
    "installed",
    "processor",
    "request_payload",
    "stream",
    "uninstall",
]

logger = logging.getLogger("phi_session.adapters.openai_agents")

FRAMEWORK = "openai-agents"
PROVIDER = "openai"


def _get(obj: Any, name: str) -> Any:
    """A field of an SDK object or of its dict form (generation spans carry dicts)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _getter(obj: Any) -> Callable[[str, None], Any]:
    """`_get` bound to `obj`, for reading several of its fields: ``get(name, None)`` is
    then a dict's ``get`` or ``getattr``, with no Python call per field."""
    return obj.get if isinstance(obj, dict) else partial(getattr, obj)


_decode_json = msgspec.json.Decoder().decode


def _arguments(text: Any) -> Any:
    """A tool call's arguments (JSON text) as JSON data; text that is not JSON as itself."""
    if not isinstance(text, str):
        return text if text is not None else {}
    if not text:
        return {}
    try:
        return _decode_json(text)  # several times faster than json.loads
    except msgspec.DecodeError:
        pass
    try:  # what msgspec refuses and json.loads takes (NaN, huge numbers)
        return json.loads(text)
    except ValueError:
        return text


def _usage(usage: Any) -> Usage | None:
    """A response's usage (Responses ``input_tokens`` or Chat ``prompt_tokens`` names)."""
    if usage is None:
        return None
    get = _getter(usage)
    input_details = get("input_tokens_details", None) or get("prompt_tokens_details", None)
    output_details = get("output_tokens_details", None) or get("completion_tokens_details", None)
    cache_read = cache_write = 0
    if input_details is not None:
        cache_read = _get(input_details, "cached_tokens") or 0
        cache_write = _get(input_details, "cache_write_tokens") or 0
    # OpenAI's input tokens include the cache reads and writes; phi-core counts them apart
    # (a cost priced from the record would otherwise bill the cached tokens twice).
    inputs = (get("input_tokens", None) or get("prompt_tokens", None) or 0) - cache_read - cache_write
    return usage_of(
        max(0, inputs),
        get("output_tokens", None) or get("completion_tokens", None),
        cache_read=cache_read,
        cache_write=cache_write,
        reasoning=_get(output_details, "reasoning_tokens") if output_details is not None else 0,
        total=get("total_tokens", None),
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = [_get(part, "text") or _get(part, "refusal") for part in content or ()]
    return "".join(part for part in parts if isinstance(part, str))


def _output_blocks(items: Any) -> tuple[list[Content], list[ToolCall]]:
    """Content blocks and tool calls of a model output (Responses items or Chat messages)."""
    blocks: list[Content] = []
    calls: list[ToolCall] = []
    for item in items or ():
        get = _getter(item)
        kind = get("type", None)
        if kind == "reasoning":
            parts = list(get("summary", None) or ()) + list(get("content", None) or ())
            text = "".join(_get(part, "text") or "" for part in parts)
            if text:
                blocks.append(ThinkingContent(thinking=text))
        elif kind == "function_call":
            calls.append(
                ToolCall(
                    id=get("call_id", None) or get("id", None) or "",
                    name=get("name", None),
                    arguments=_arguments(get("arguments", None)),
                )
            )
        elif kind == "message" or get("role", None) == "assistant":
            text = _text_of(get("content", None))
            if text:
                blocks.append(TextContent(text=text))
            for call in get("tool_calls", None) or ():  # Chat Completions
                function = _get(call, "function")
                calls.append(
                    ToolCall(
                        id=_get(call, "id") or "",
                        name=_get(function, "name"),
                        arguments=_arguments(_get(function, "arguments")),
                    )
                )
        elif get("object", None) == "response":
            # A streamed Chat Completions call: the SDK traces the whole Responses
            # ``Response`` it converted the stream into, its items in ``output``.
            more_blocks, more_calls = _output_blocks(get("output", None))
            blocks += more_blocks
            calls += more_calls
    return blocks, calls


def _traced_names(items: Any) -> dict[str, str]:
    """The names the SDK gives the function spans of a model output's calls of namespaced
    tools (``namespace.name``, the call's name being ``name``), by call id."""
    names: dict[str, str] = {}
    for item in items or ():
        get = _getter(item)
        if get("type", None) == "function_call" and get("namespace", None):
            traced = get_tool_call_trace_name(item)
            if traced is not None:
                names[str(get("call_id", None) or get("id", None) or "")] = traced
    return names


_ASSISTANT_ITEMS = frozenset(("function_call", "reasoning"))


def _is_output(item: Any) -> bool:
    """Whether an input item is one the model produced (text, reasoning, a tool call)."""
    return _get(item, "type") in _ASSISTANT_ITEMS or _get(item, "role") == "assistant"


def _user_texts(items: Any) -> list[str]:
    """The user messages a model input adds (a string, Responses items or Chat messages):
    those after its last output item. A conversation continued the SDK's way
    (``result.to_input_list()`` plus the next message) sends the earlier turns again."""
    if isinstance(items, str):
        return [items]
    new = since_last_reply(list(items or ()), _is_output)
    return [_text_of(_get(item, "content")) for item in new if _get(item, "role") == "user"]


def _tool_outputs(items: Any) -> dict[str, str]:
    """The tool outputs a model input sends after its last output item, by call id
    (Responses ``function_call_output`` items or Chat ``tool`` messages)."""
    if isinstance(items, str):
        return {}
    outputs: dict[str, str] = {}
    for item in since_last_reply(list(items or ()), _is_output):
        get = _getter(item)
        if get("type", None) == "function_call_output":
            call_id, output = get("call_id", None), get("output", None)
        elif get("role", None) == "tool":
            call_id, output = get("tool_call_id", None), get("content", None)
        else:
            continue
        outputs[str(call_id)] = output if isinstance(output, str) else _text_of(output)
    return outputs


def _tool_result_message(
    call_id: str, name: str, text: str, run: AdapterRun, *, is_error: bool, timestamp: int | None = None
) -> ToolResultMessage:
    return ToolResultMessage(
        tool_call_id=call_id,
        tool_name=name,
        content=(TextContent(text=text),),
        is_error=is_error,
        timestamp=run.tracer.agent.millis() if timestamp is None else timestamp,
    )


def _ran_result(call_id: str, tool: _Tool, run: AdapterRun) -> ToolResultMessage:
    """The held result of `tool`, run before its loop's first turn, as call `call_id`'s."""
    return _tool_result_message(
        call_id, tool.name, tool.text, run, is_error=tool.failed, timestamp=tool.ended_at
    )


_CANCELLED = {"message": "cancelled"}


def _error_of(span: Span[Any]) -> Any:
    """The span's error. The SDK ends the spans of a cancelled run (``asyncio.wait_for``
    timeout, ``Task.cancel``) with none while the cancellation unwinds them: those failed."""
    error = span.error
    if error is None and isinstance(sys.exc_info()[1], asyncio.CancelledError):
        return _CANCELLED
    return error


def _running_task() -> asyncio.Task[Any] | None:
    """The asyncio task running now, if any (spans may start outside an event loop)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


# The SDK's record of the agents the running run configured, with their tools (internal to
# the SDK version the extra pins; read defensively): ``resolutions`` -> ``agent.tools``.
_RUN_AGENTS: Any = getattr(agent_tool_configuration, "_current_run", None)


def _may_await_approval(name: str) -> bool:
    """Whether a call of the running run's tool `name` (its span's: the name the SDK traces
    it under, ``namespace.name`` for a tool in a ``tool_namespace``) may wait for approval:
    a function tool of its agents whose ``needs_approval`` is False never does; any other
    (approval set, a callable deciding it, a tool not found or the SDK's record not
    readable) may. Read in the tool's own span, which runs in the run's context."""
    run = _RUN_AGENTS.get() if isinstance(_RUN_AGENTS, ContextVar) else None
    resolutions = getattr(run, "resolutions", None)
    if not isinstance(resolutions, dict):
        return True
    found = False
    for resolution in list(resolutions.values()):
        for tool in getattr(getattr(resolution, "agent", None), "tools", None) or ():
            if name in (getattr(tool, "name", None), get_function_tool_trace_name(tool)):
                if not isinstance(tool, FunctionTool) or tool.needs_approval is not False:
                    return True
                found = True
    return not found


def _output_text(output: Any, *, known: bool) -> str:
    """A tool's output as recorded: the SDK's string form, which it sends the model (for
    None too: 'None'). An output not `known` (its span's, without sensitive data) has no text."""
    return str(output) if known else ""


def _result_text(output: str, error: Any) -> str:
    """A tool's result as recorded: its output, or for a failed one the text the model is
    sent if known (the hooks'), else the span's error (`_error_text`)."""
    return (output or _error_text(error)) if error is not None else output


def _error_text(error: Any) -> str:
    """A span error as text: the SDK's message ("Error in agent run", "Error running tool")
    and the cause it keeps in the error's data."""
    message = str(error.get("message") or "error")
    data = error.get("data")
    cause = (data.get("error") or data.get("message")) if isinstance(data, dict) else None
    return f"{message}: {cause}" if isinstance(cause, str) and cause and cause != message else message


_MODEL_SPANS = frozenset(("response", "generation"))
# The result of a call the run left awaiting approval (``needs_approval``: one of the
# result's ``interruptions``), which a run resumed from its state runs or rejects.
_AWAITING_APPROVAL = deferred_result("needs_approval")
# The output the SDK gives each handoff call of a response after the first, which it acts on.
_IGNORED_HANDOFF = "Multiple handoffs detected, ignoring this one."
_LOOP_SPANS = frozenset(("task", "agent"))


def _request_messages(items: Any, timestamp: int, system: list[str]) -> list[Message]:
    """The messages of a model input (Responses items): consecutive output items (text,
    reasoning, function calls) make one assistant message; system and developer messages go
    to `system`; items phi-core has no message for (hosted tool calls) are left out."""
    if isinstance(items, str):
        return [UserMessage(content=(TextContent(text=items),), timestamp=timestamp)]
    messages: list[Message] = []
    names: dict[str, str] = {}  # call id -> tool name
    pending: list[Any] = []  # the assistant items being gathered

    def flush() -> None:
        if pending:
            blocks, calls = _output_blocks(pending)
            names.update((call.id, call.name) for call in calls)
            messages.append(
                AssistantMessage(
                    content=(*blocks, *calls),
                    stop_reason="toolUse" if calls else "stop",
                    model="",
                    provider=PROVIDER,
                    usage=Usage(input=0, output=0),
                    timestamp=timestamp,
                )
            )
            pending.clear()

    for item in items or ():
        kind, role = _get(item, "type"), _get(item, "role")
        if kind in _ASSISTANT_ITEMS or role == "assistant":
            pending.append(item)
            continue
        flush()
        if role in ("system", "developer"):
            system.append(_text_of(_get(item, "content")))
        elif role == "user":
            text = _text_of(_get(item, "content"))
            messages.append(UserMessage(content=(TextContent(text=text),), timestamp=timestamp))
        elif kind == "function_call_output":
            call_id = str(_get(item, "call_id") or "")
            output = _get(item, "output")
            messages.append(
                ToolResultMessage(
                    tool_call_id=call_id,
                    tool_name=names.get(call_id, ""),
                    content=(TextContent(text=output if isinstance(output, str) else _text_of(output)),),
                    is_error=False,
                    timestamp=timestamp,
                )
            )
    flush()
    return messages


def _tool_definitions(tools: Any, handoffs: Any) -> tuple[ToolDefinition, ...]:
    """The tools offered to the model: function tools with their schemas, hosted tools by
    name, and handoffs as the tools the model calls to transfer."""
    definitions = []
    for tool in tools or ():
        if isinstance(tool, FunctionTool):
            definitions.append(
                ToolDefinition(
                    name=tool.name, description=tool.description, parameters=tool.params_json_schema
                )
            )
        else:
            name = getattr(tool, "name", None)
            definitions.append(
                ToolDefinition(
                    name=name if isinstance(name, str) else type(tool).__name__, description="", parameters={}
                )
            )
    for handoff in handoffs or ():
        if isinstance(handoff, Handoff):
            definitions.append(
                ToolDefinition(
                    name=handoff.tool_name,
                    description=handoff.tool_description,
                    parameters=handoff.input_json_schema,
                )
            )
    return tuple(definitions)


def request_payload(
    system_instructions: str | None, input: Any, tools: Any, handoffs: Any, model: str, timestamp: int
) -> AnnotatedRequestPayload:
    """A model request (what ``Model.get_response`` receives) in phi-core's form.

    The one conversion of a request: the adapter records it (``install(capture_requests=True)``
    with `PhiRunHooks`) and the replay model compares what it is asked with it, so an
    unchanged agent matches.
    """
    system = [system_instructions] if system_instructions else []
    messages = _request_messages(input, timestamp, system)
    return AnnotatedRequestPayload(
        system_prompt="\n\n".join(system),
        messages=tuple(messages),
        provenance=tuple(UnknownBlock() for _ in messages),
        tools=_tool_definitions(tools, handoffs),
        model_id=model,
        thinking_level="off",
        response_format=TextFormat(),
    )


def _session_of(trace: Trace) -> str | None:
    """The framework session of a trace's runs: its ``phi.session_id``, else its group."""
    metadata = getattr(trace, "metadata", None) or {}
    session = metadata.get("phi.session_id")  # "" too is an id (made a UUIDv5, as any unusable)
    if session is None:
        session = getattr(trace, "group_id", None)
    return str(session) if session is not None else None


def _guardrail_names(guardrails: Any) -> frozenset[str]:
    return frozenset(guardrail.get_name() for guardrail in guardrails or ())


def _handoff_tools(handoffs: Any) -> frozenset[str]:
    """The tool names the model calls to hand off to `handoffs`: a ``Handoff``'s own, else
    (an agent, or an agent span's agent name) the SDK's default name for the agent."""
    names: set[str] = set()
    for item in handoffs or ():
        if isinstance(item, Handoff):
            names.add(item.tool_name)
            continue
        name = item if isinstance(item, str) else getattr(item, "name", None)
        if isinstance(name, str):  # the SDK's public rule reads only the agent's name
            names.add(Handoff.default_tool_name(cast(Any, SimpleNamespace(name=name))))
    return frozenset(names)


def _config(agent_name: str, model: str) -> LoopConfigSnapshot:
    return loop_config(model, PROVIDER, agent_name, agent_name.replace(".", "-").replace("/", "-") or "agent")


@dataclass(slots=True)
class _Tool:
    """A function span: its tool scope starts once its call id is known (or needed)."""

    loop: _Loop
    name: str
    turn: TurnScope | None  # None: run before the loop's first turn (`_Mapper._tool_result`)
    call_id: str | None = None
    args: Any = None
    scope: ToolScope | None = None
    token: Any = None
    # What the model is sent as its result, as `PhiRunHooks` saw it (`on_tool_end`): the
    # span keeps it only with sensitive data, and a failure's only as "redacted".
    output: str | None = None
    # Its result, when held (`_Mapper._tool_ended`): the text if it ran, whether it may
    # await approval instead (not decided yet, `_Mapper._settle`), whether it failed, the
    # output as the SDK sends the model (to find its call in the next input,
    # `_Mapper._resumed_results`; None: not known) and when it ended.
    text: str = ""
    undecided: bool = False
    failed: bool = False
    sent: str | None = None
    ended_at: int | None = None

    def started(self) -> ToolScope | None:
        if self.scope is None and self.turn is not None and self.turn.running:
            if self.call_id is None:
                self.call_id = self.loop.new_call_id()
            self.scope = self.turn.tool(id=self.call_id, name=self.name, args=self.args or {}).start()
        return self.scope


@dataclass(slots=True)
class _Loop:
    """The state of one recorded run, keyed by its task span (or trace, or function span)."""

    key: str
    trace_id: str
    session_id: str | None
    run: AdapterRun | None = None
    turn: TurnScope | None = None
    message: MessageScope | None = None
    model: str = ""
    prompted: bool = False
    reply: tuple[list[Content], list[ToolCall], Usage | None, str | None] | None = None
    request: AnnotatedRequestPayload | None = None  # the next turn's, from the hooks
    calls: list[ToolCall] = field(default_factory=list)  # the reply's calls no function span took yet
    traced_names: dict[str, str] = field(default_factory=dict)  # the reply's, `_traced_names`
    # Before the first turn: the calls of the loop it continues that a resumed run takes
    # over, awaiting approval (`_Mapper._awaited`), and the tools it ran meanwhile, their
    # results held (`_Mapper._resumed_results`).
    awaited: list[ToolCall] = field(default_factory=list)
    ran: list[_Tool] = field(default_factory=list)
    call_number: int = 0
    # The guardrail names of the running agent (from the hooks), telling an output
    # guardrail's span from an input guardrail's (the spans look alike).
    input_guardrails: frozenset[str] = frozenset()
    output_guardrails: frozenset[str] = frozenset()
    handoff_tools: frozenset[str] = frozenset()  # the running agent's (from the hooks)
    agent_span: str | None = None  # the running agent's span
    agent_data: Any = None  # its span data: the agents it hands off to, set each turn
    task: asyncio.Task[Any] | None = None  # the asyncio task it started in, if `_streams` maps it
    hooked: bool = False  # run with `PhiRunHooks`: they give each tool's exact call
    handing_off: bool = False  # a handoff span started since the running agent's
    place: tuple[str, asyncio.Task[Any] | None] | None = None  # its trace and task (no task spans)
    agent_keyed: bool = False  # no task span: it is its first agent's span, and ends with its last
    # The loop whose tool started this run before that loop's first turn (an approved
    # agent-as-tool of a resumed run): no tool scope runs to make it a sub-agent.
    spawner: _Loop | None = None
    rejection: str | None = None  # a tripped input guardrail's, recorded as the run ends
    # The turn's tools whose results are held (`_Mapper._tool_ended`), in the order they
    # ended: from the first that may await approval and whose span ended with neither an
    # output nor an error, awaiting approval if the run ends next, else it returned nothing
    # (`_Mapper._settle`).
    held: list[_Tool] = field(default_factory=list)

    def match_call(self, name: str) -> ToolCall | None:
        """The response's next unmatched call named `name` (a function span's: for a
        namespaced tool, ``namespace.name``), if any."""
        for index, call in enumerate(self.calls):
            if name in (call.name, self.traced_names.get(call.id)):
                del self.calls[index]
                return call
        return None

    def new_call_id(self) -> str:
        """A made-up id for a tool call the response did not show."""
        self.call_number += 1
        return f"{self.key}-call-{self.call_number}"

    def take_call(self, call_id: str, arguments: Any) -> Any:
        """The arguments of the response's call `call_id`, parsed already when the call is
        among the unmatched ones (then matched), else parsed from `arguments`."""
        for index, call in enumerate(self.calls):
            if call.id == call_id:
                del self.calls[index]
                return call.arguments
        return _arguments(arguments)


class _Mapper:
    """Spans -> core calls, for one installation; its callers catch every fault into `AdapterCore.fault`."""

    def __init__(self, core: AdapterCore) -> None:
        self.core = core
        # Guards `_loops` (iterated when a trace ends). The per-span maps are only read,
        # set and popped one key at a time, each step atomic: they need no lock.
        self._lock = threading.Lock()
        self._sessions: dict[str, str | None] = {}  # trace id -> framework session id
        self._loops: dict[str, _Loop] = {}  # loop key -> loop
        self._of_span: dict[str, _Loop] = {}  # span id -> its loop
        self._tools: dict[str, _Tool] = {}  # function span id -> tool
        # A streamed run's asyncio task (``result.run_loop_task``, where its spans start) ->
        # its loop, for `stream`: per run, as runs sharing a trace are not told apart by its
        # id, and ``result.trace`` is None inside an enclosing ``trace()``.
        self._streams: dict[asyncio.Task[Any], _Loop] = {}
        # Without task spans: the loop of each run under a trace, by the trace and the
        # asyncio task running it (runs sharing an enclosing trace run in tasks of their own).
        self._in_trace: dict[tuple[str, asyncio.Task[Any] | None], _Loop] = {}

    # -- traces ---------------------------------------------------------------------------

    def trace_started(self, trace: Trace) -> None:
        self._sessions[trace.trace_id] = _session_of(trace)

    def trace_ended(self, trace: Trace) -> None:
        self._sessions.pop(trace.trace_id, None)
        with self._lock:
            left = [loop for loop in self._loops.values() if loop.trace_id == trace.trace_id]
        for loop in left:
            self._end_loop(loop, None)

    def _session(self, trace_id: str) -> str | None:
        """The framework session of the runs of trace `trace_id`. A run resumed from its
        ``RunState`` (after a tool approval) goes on in the interrupted run's trace, which
        the SDK reattaches without telling processors (``reattach_trace``): no
        `trace_started`, and no `trace_ended` either; it is the current trace."""
        try:
            return self._sessions[trace_id]
        except KeyError:
            pass
        trace = get_current_trace()
        return _session_of(trace) if trace is not None and trace.trace_id == trace_id else None

    # -- spans ----------------------------------------------------------------------------

    def span_started(self, span: Span[Any]) -> None:
        # The SDK's span fields are properties (a call each): each is read once here.
        data = span.span_data
        kind = data.type
        if kind in _LOOP_SPANS:
            if kind == "task":
                self._new_loop(span.span_id, span)
            else:
                self._agent_started(span, data.name)
            return
        # Any other span belongs to its parent's loop.
        parent = span.parent_id
        loop = self._of_span.get(parent) if parent is not None else None
        if loop is None:
            return
        span_id = span.span_id
        self._of_span[span_id] = loop
        if kind == "function":  # the most frequent first
            self._tool_started(loop, span_id, data.name)
        elif kind in _MODEL_SPANS:
            self._model_started(loop)
        elif kind == "turn":
            self._end_turn(loop)
        elif kind == "handoff":
            if loop.held:  # the run goes on past them
                self._settle(loop, went_on=True)
            loop.handing_off = True
            self._finish_message(loop, stop_reason="handoff")

    def span_ended(self, span: Span[Any]) -> None:
        data = span.span_data
        kind = data.type
        span_id = span.span_id
        loop = self._of_span.pop(span_id, None)
        if kind == "function":  # the most frequent first
            self._tool_ended(span_id, data, _error_of(span))
        elif kind in _MODEL_SPANS:
            if loop is not None:
                self._model_ended(loop, span)
        elif kind == "turn":
            if loop is not None and not loop.held:  # else it ends once they are decided
                self._end_turn(loop)
        elif kind == "task":
            if loop is not None:
                self._end_loop(loop, _error_of(span))
        elif kind == "handoff":
            if loop is not None and data.to_agent is not None:
                self._handed_off(loop, data.to_agent)
        elif kind == "guardrail" and data.triggered and loop is not None:
            self._guardrail_triggered(loop, data.name, under_agent=span.parent_id == loop.agent_span)
        elif kind == "agent" and loop is not None:
            error = _error_of(span)
            # The run raises now, or (no task span) its last agent is done: no trace end
            # may follow (a resumed run's trace, `_session`).
            if error is not None or loop.rejection is not None or (loop.agent_keyed and not loop.handing_off):
                self._end_loop(loop, error)

    def _new_loop(self, key: str, span: Span[Any]) -> _Loop:
        loop = _Loop(key, span.trace_id, self._session(span.trace_id))
        parent_id = span.parent_id
        tool = self._tools.get(parent_id) if parent_id is not None else None
        if tool is not None and tool.turn is None:
            loop.spawner = tool.loop
        with self._lock:
            self._loops[key] = loop
        self._of_span[span.span_id] = loop
        task = _running_task()
        # A run nested in a tool may share its caller's task: the caller keeps it.
        if task is not None and self._streams.setdefault(task, loop) is loop:
            loop.task = task
        return loop

    def _agent_started(self, span: Span[Any], name: str) -> None:
        parent_id, span_id = span.parent_id, span.span_id
        parent = self._of_span.get(parent_id) if parent_id is not None else None
        owner = parent if parent is not None and parent.key == parent_id else None
        if owner is None:
            # No task spans: the agent span is the loop, found by what it runs under (a
            # tool for an agent run as a tool, else its trace and asyncio task). A later
            # agent there is a handoff if one was made; else it is another run.
            place: tuple[str, asyncio.Task[Any] | None] | None = None
            if parent_id is not None and parent_id in self._tools:
                key = parent_id
                owner = self._loops.get(key)
            else:
                key, place = span_id, (span.trace_id, _running_task())
                owner = self._in_trace.get(place)
            if owner is not None and not owner.handing_off:
                self._end_loop(owner, None)
                owner = None
            if owner is None:
                owner = self._new_loop(key, span)
                owner.agent_keyed = True
                if place is not None:
                    owner.place = place
                    self._in_trace[place] = owner
        self._of_span[span_id] = owner
        owner.agent_span, owner.agent_data = span_id, span.span_data
        owner.handoff_tools = frozenset()  # the hooks give the new agent's
        config = _config(name, owner.model)
        spawner = owner.spawner.run if owner.spawner is not None else None
        if owner.run is None and spawner is not None:
            owner.run = self.core.start_sub_agent(
                owner.key, config, spawner.loop.loop_id, metadata={"agent": name}
            )
            owner.run.loop.first_trigger = "SubAgent"
        elif owner.run is None:
            owner.run = self.core.start_run(
                owner.key, config, framework_session_id=owner.session_id, metadata={"agent": name}
            )
            owner.awaited = self._awaited(owner.run, owner.trace_id)
        else:
            self._finish_message(owner, stop_reason="handoff")
            self._end_turn(owner)
            owner.run = self.core.handoff(owner.key, config, metadata={"agent": name})
            owner.turn = None
            owner.prompted = True
            owner.handing_off = False

    def _awaited(self, run: AdapterRun, trace_id: str) -> list[ToolCall]:
        """The calls left awaiting approval by the loop `run` continues (`_end_loop`), if
        `run` may be its resume: a run resumed from its ``RunState`` runs the approved ones
        before its first model call and sends the model their results and the output of
        those it rejects (`_resumed_results`). It goes on in the interrupted run's
        trace (the SDK takes the trace id from the state); a run in another trace is a new
        one, and the note is dropped: its calls are no longer awaited by anyone."""
        note = self.core.take_note(run.loop.session_id)
        if note is None:
            return []
        loop_id, interrupted_trace, calls = note
        if loop_id != run.loop.parent_loop_id or interrupted_trace != trace_id:
            return []
        return list(calls)

    def _open_turn(self, loop: _Loop) -> TurnScope | None:
        run = loop.run
        if run is None or not run.loop.running:
            return None
        if loop.turn is None or not loop.turn.running:
            request, loop.request = loop.request, None
            loop.turn = run.loop.turn(request=request).start()
        return loop.turn

    def _model_started(self, loop: _Loop) -> None:
        if loop.held:  # the run goes on past them
            self._settle(loop, went_on=True)
        self._finish_message(loop)
        turn = loop.turn
        if turn is not None and turn.message is not None:  # no turn spans: one model call, one turn
            self._end_turn(loop)
        turn = self._open_turn(loop)
        if turn is not None:
            loop.message = turn.assistant(model=loop.model or None, provider=PROVIDER).start()

    def _model_ended(self, loop: _Loop, span: Span[Any]) -> None:
        data = span.span_data
        message, turn = loop.message, loop.turn
        if message is None or not message.running or turn is None:
            return
        if data.type == "response":  # Responses API
            response = data.response
            if response is not None:
                items, usage, model = response.output, response.usage, response.model
            else:  # the call failed (HTTP error, cancellation) or its data is not traced
                items, usage, model = None, data.usage, None
        else:  # Chat Completions (generation span)
            items, usage, model = data.output, data.usage, data.model
        if not loop.prompted and turn.index == 0:
            loop.prompted = True
            for new in self._first_inputs(loop, data.input):
                turn.user(new)
        blocks, calls = _output_blocks(items)
        loop.calls, loop.traced_names = list(calls), _traced_names(items)
        if model:
            message.model = str(model)
        failed = _error_of(span)
        error = _error_text(failed) if failed is not None else None
        # Finished at the next step: a handoff that follows makes its stop reason ``handoff``.
        loop.reply = (blocks, calls, _usage(usage), error)

    def _finish_message(self, loop: _Loop, *, stop_reason: StopReason | None = None) -> None:
        """Finish the turn's reply with what its model span reported."""
        message, reply = loop.message, loop.reply
        loop.reply = None
        if message is None or not message.running:
            return
        if reply is None:
            message.end()
            return
        blocks, calls, usage, error = reply
        if error is not None:
            stop_reason = "error"
        message.finish(
            blocks if blocks or not message.text else None,
            tool_calls=calls,
            usage=usage,
            stop_reason=stop_reason,
            error_message=error,
        )

    def _tool_started(self, loop: _Loop, span_id: str, name: str) -> None:
        turn = loop.turn
        if turn is not None:
            # The SDK runs a response's function tools before its handoff, whose span comes
            # too late to give the reply the stop reason it gives a reply that only hands off.
            self._finish_message(loop, stop_reason="handoff" if self._hands_off(loop) else None)
        elif loop.run is None:
            return
        tool = _Tool(loop, name, turn)
        # Matched as the spans start, in the order of the response's calls: parallel
        # calls end in any order. One before the first turn is matched with its result.
        call = loop.match_call(name) if turn is not None else None
        if call is not None:
            tool.call_id, tool.args = call.id, call.arguments
        tool.token = enter_tool(tool.started)
        self._tools[span_id] = tool
        if call is not None and not loop.hooked:  # no exact call to wait for: it starts now
            tool.started()

    @staticmethod
    def _hands_off(loop: _Loop) -> bool:
        """Whether the unfinished reply calls one of the running agent's handoffs: by the
        hooks' exact tool names, else by the default names of the agent span's handoffs."""
        reply = loop.reply
        if reply is None or not reply[1]:
            return False
        names = loop.handoff_tools
        if not loop.hooked:
            names = _handoff_tools(getattr(loop.agent_data, "handoffs", None))
        return any(call.name in names for call in reply[1])

    def exact_call(self, span_id: str, call_id: str, arguments: Any) -> None:
        """The hooks' exact call id and arguments for a function span (before it starts)."""
        tool = self._tools.get(span_id)
        if tool is None or tool.scope is not None:
            return
        if tool.call_id is not None and tool.call_id != call_id:
            self._give_back(tool, ToolCall(id=tool.call_id, name=tool.name, arguments=tool.args), call_id)
        tool.call_id, tool.args = call_id, tool.loop.take_call(call_id, arguments)
        tool.started()

    def _give_back(self, tool: _Tool, matched: ToolCall, call_id: str) -> None:
        """The call `tool` was matched to by name, the hooks saying it is `call_id`: to the
        tool of its loop matched to `call_id` in its place, if its scope waits for its
        exact call, else back among the unmatched. Only some calls of one tool may have a
        span (a resumed run runs those approved, not those rejected)."""
        for other in list(self._tools.values()):
            if other.loop is tool.loop and other.call_id == call_id and other.scope is None:
                other.call_id, other.args = matched.id, matched.arguments
                return
        tool.loop.calls.insert(0, matched)

    def tool_output(self, span_id: str, result: Any) -> None:
        """The hooks' result of a function span's tool (before the span ends)."""
        tool = self._tools.get(span_id)
        if tool is not None:
            tool.output = _output_text(result, known=True)

    def _tool_ended(self, span_id: str, data: Any, error: Any) -> None:
        tool = self._tools.pop(span_id, None)
        if tool is None:
            return
        nested = self._loops.get(span_id)  # an agent run as this tool without task spans
        if nested is not None:
            self._end_loop(nested, error)
        if tool.args is None:
            tool.args = _arguments(data.input)
        tool.started()
        leave_tool(tool.token)
        output = tool.output if tool.output is not None else data.output
        loop, run = tool.loop, tool.loop.run
        if run is None:
            return
        # A span ending with no output nor error holds the tool's None when it holds its
        # input too (sensitive data); else nothing shows the output.
        known = output is not None or (error is None and data.input is not None)
        text = _result_text(_output_text(output, known=known), error)
        undecided = (
            tool.turn is not None and output is None and error is None and _may_await_approval(tool.name)
        )
        if tool.turn is None or undecided or loop.held:
            # Held, with the time it ended: run before the loop's first turn (an approved
            # call of a resumed run: the SDK runs no span for a call still undecided), until
            # that turn's input shows its call; else until the undecided are decided, the
            # results keeping the order their tools ended in.
            tool.text, tool.undecided = text, undecided
            tool.failed = error is not None
            tool.sent = text if error is None and known else None
            tool.ended_at = run.tracer.agent.millis()
            (loop.ran if tool.turn is None else loop.held).append(tool)
            return
        self._tool_result(tool, text, failed=error is not None)

    @staticmethod
    def _tool_result(tool: _Tool, text: str, *, failed: bool, timestamp: int | None = None) -> None:
        scope = tool.started()
        if scope is None or not scope.running:
            return
        if failed:
            scope.error(text)
        else:
            scope.result(text)
        scope.end(timestamp=timestamp)

    def _settle(self, loop: _Loop, *, went_on: bool) -> list[ToolCall]:
        """Give the held tools their results, in the order they ended and with the times
        they did, the undecided ones decided; returns the calls left awaiting approval.
        The SDK checks a call that needs approval in a function span that it ends with no
        output nor error while the call awaits approval, the run then ending with it among
        its interruptions; the span of a tool that returned None ends alike (and every span
        without sensitive data, the hooks giving no result), but the run goes on
        (`went_on`: a model call, a turn, a handoff): then it returned nothing, else it
        awaits approval. (A tool that needs no approval, `_may_await_approval`, is decided
        as its span ends: it returned nothing, also as the run's last step.)"""
        held, loop.held = loop.held, []
        awaiting: list[ToolCall] = []
        for tool in held:
            awaits = tool.undecided and not went_on
            text = _AWAITING_APPROVAL if awaits else tool.text
            self._tool_result(tool, text, failed=tool.failed, timestamp=tool.ended_at)
            if awaits and tool.call_id is not None:
                awaiting.append(ToolCall(id=tool.call_id, name=tool.name, arguments=tool.args or {}))
        return awaiting

    def _handed_off(self, loop: _Loop, agent_name: str) -> None:
        """The handoff calls' results, as the SDK writes them into the history: the
        transfer message (``{"assistant": name}``) for the first, which it acts on, an
        ignoring one for any other. The SDK runs a response's function tools before its
        handoff, so the calls their spans did not match are the handoff calls."""
        turn = loop.turn
        calls, loop.calls = loop.calls, []
        if turn is None or not turn.running:
            return
        for index, call in enumerate(calls):
            scope = turn.tool(id=call.id, name=call.name, args=call.arguments).start()
            scope.result(json.dumps({"assistant": agent_name}) if index == 0 else _IGNORED_HANDOFF)
            scope.end()

    def _guardrail_triggered(self, loop: _Loop, name: str, *, under_agent: bool) -> None:
        """A guardrail's tripwire: the SDK raises its exception out of the run next.

        * An input guardrail rejects the input: ``InputRejected``, recorded as the run
          ends (`_end_loop`), as the SDK may still call the model: a streamed run calls it
          while a parallel guardrail runs, and bills it though the guardrail tripped first.
          With no turn begun by then the loop ends ``Rejected``, as phi-core's input filter
          makes it; else it ends failed with the rejection as its error (phi-core's
          ``Rejected`` means that no turn ran), what the model answered kept.
        * An output guardrail withheld the final output, which is recorded as the model
          gave it: phi-core has no output filter, so the loop ends failed (``Aborted``)
          with an error naming the guardrail.

        The spans of both kinds look alike: the agent's guardrails (`PhiRunHooks`) tell
        them apart by name; without them (or for a ``RunConfig`` guardrail), one under the
        agent's span after a turn began is an output guardrail.
        """
        run = loop.run
        if run is None or not run.loop.running:
            return
        turns = run.loop.turns
        if name in loop.output_guardrails or (
            name not in loop.input_guardrails and under_agent and turns > 0
        ):
            self._end_turn(loop)
            self.core.end_run(loop.key, f"output guardrail {name} triggered: the final output was withheld")
            return
        if loop.rejection is None:
            loop.rejection = f"input guardrail {name} triggered"

    def _end_turn(self, loop: _Loop) -> None:
        if loop.held:  # the run goes on past them
            self._settle(loop, went_on=True)
        self._finish_message(loop)
        turn = loop.turn
        if turn is not None and turn.running:
            turn.end()
        loop.turn = None

    def _end_loop(self, loop: _Loop, error: Any) -> None:
        with self._lock:
            self._loops.pop(loop.key, None)
        if loop.task is not None and self._streams.get(loop.task) is loop:
            self._streams.pop(loop.task, None)
        if loop.place is not None and self._in_trace.get(loop.place) is loop:
            self._in_trace.pop(loop.place, None)
        run = loop.run
        if run is None:
            return
        # The run ends with them: awaiting approval (unless it failed), for the run resuming it;
        # so do the calls it took over (`_awaited`) that it ended before its first model
        # call without running, the results of those it ran recorded.
        awaiting = self._settle(loop, went_on=error is not None) if loop.held else []
        if not loop.prompted or loop.ran:
            results, left = self._resumed_results(loop, None, model_called=False)
            if run.loop.running:
                for result in results:
                    run.loop.user(result)
            awaiting += left
        if awaiting:
            self.core.leave_note(run.loop.session_id, (run.loop.loop_id, loop.trace_id, awaiting))
        reason = loop.rejection
        if reason is not None:
            if run.loop.running:
                self._finish_message(loop)
                run.loop.reject(reason)  # before the first turn, the loop ends Rejected here
            self.core.end_run(loop.key, reason)
            return
        if error is None:
            self._end_turn(loop)
            self.core.end_run(loop.key)
            return
        if loop.reply is not None:  # the reply keeps its own error; the loop's ends the turn
            self._finish_message(loop)
        self.core.end_run(loop.key, _error_text(error))

    # -- hooks and streams -----------------------------------------------------------------

    def agent_started(self, agent: Any) -> None:
        """The hooks' agent: its model name and the names of its guardrails."""
        loop = self._current_loop()
        if loop is None:
            return
        loop.hooked = True
        model = getattr(agent, "model", None)
        if isinstance(model, str) and not loop.model:
            loop.model = model
        loop.input_guardrails = _guardrail_names(getattr(agent, "input_guardrails", None))
        loop.output_guardrails = _guardrail_names(getattr(agent, "output_guardrails", None))
        loop.handoff_tools = _handoff_tools(getattr(agent, "handoffs", None))

    def _current_loop(self) -> _Loop | None:
        span = get_current_span()
        return self._of_span.get(span.span_id) if span is not None else None

    def prompt(self, items: Any) -> None:
        """The hooks' model input: before the loop's first turn, its new messages are the prompt."""
        loop = self._current_loop()
        if loop is None:
            return
        if loop.held:  # the model is called: the run went on past them
            self._settle(loop, went_on=True)
        if loop.prompted or loop.run is None or loop.turn is not None:
            return
        if not loop.run.loop.running:  # a loop ended already takes no prompt
            return
        loop.prompted = True
        for message in self._first_inputs(loop, items):
            loop.run.loop.user(message)

    @classmethod
    def _first_inputs(cls, loop: _Loop, items: Any) -> list[str | ToolResultMessage]:
        """The new messages of the loop's first model input (`_user_texts`; None: not
        traced), after the results it sends for the calls a resumed run took over
        (`_resumed_results`)."""
        messages: list[str | ToolResultMessage] = []
        messages += cls._resumed_results(loop, items, model_called=True)[0]
        messages += _user_texts(items)
        return messages

    @staticmethod
    def _resumed_results(
        loop: _Loop, items: Any, *, model_called: bool
    ) -> tuple[list[ToolResultMessage], list[ToolCall]]:
        """The results a resumed run sends the model for the calls it took over awaiting
        approval (`_Loop.awaited`), in their order, and those it leaves awaiting.

        The tools it ran before its first model call (`_Loop.ran`) are the approved calls;
        a call it rejected runs no span, its result the output the model gets ("" when its
        input, `items`, is not traced). A tool is its call by the hooks' exact id, else by
        its output in the input (two calls of one tool, one approved and one rejected),
        else by name and order. A call the input does not answer is not this run's: the
        run, though in the interrupted one's trace (one enclosing ``trace()``), is not its
        resume. Before any model call (`model_called` False: the run stopped again) a
        call no tool ran still awaits approval. A tool matching no call (the note gone)
        keeps the id it has, else one made up."""
        awaited, loop.awaited = loop.awaited, []
        ran, loop.ran = loop.ran, []
        run = loop.run
        if run is None or not (awaited or ran):  # not a resumed run
            return [], []
        known = model_called and items is not None
        outputs = _tool_outputs(items) if known else {}
        answered = [call for call in awaited if not known or call.id in outputs]
        took: dict[str, _Tool] = {}  # call id -> the tool that ran it
        loose: list[_Tool] = []  # the tools matched to no call yet
        for tool in ran:  # exact ids first
            if tool.call_id is None:
                loose.append(tool)
            elif any(call.id == tool.call_id for call in answered) and tool.call_id not in took:
                took[tool.call_id] = tool
        for by_output in (True, False):
            for tool in list(loose):
                call = next(
                    (
                        call
                        for call in answered
                        if call.id not in took
                        and call.name == tool.name
                        and (not by_output or (tool.sent is not None and outputs.get(call.id) == tool.sent))
                    ),
                    None,
                )
                if call is not None:
                    took[call.id] = tool
                    loose = [other for other in loose if other is not tool]
        results: list[ToolResultMessage] = []
        left: list[ToolCall] = []
        for call in answered:
            ran_it = took.get(call.id)
            if ran_it is not None:
                results.append(_ran_result(call.id, ran_it, run))
            elif model_called:
                text = outputs.get(call.id, "")
                results.append(_tool_result_message(call.id, call.name, text, run, is_error=False))
            else:
                left.append(call)
        matched = [id(tool) for tool in took.values()]
        for tool in ran:
            if id(tool) not in matched:
                results.append(_ran_result(tool.call_id or loop.new_call_id(), tool, run))
        return results, left

    def request(self, payload: AnnotatedRequestPayload) -> None:
        """The hooks' model request: the next turn's ``TurnRequest``."""
        loop = self._current_loop()
        if loop is not None:
            loop.request = payload

    def response(self, response: Any) -> None:
        """The hooks' model response: the content of a span that carried none (it may still
        carry the usage: ``trace_include_sensitive_data=False``), and its usage if it had none."""
        loop = self._current_loop()
        reply = loop.reply if loop is not None else None
        if loop is None or reply is None or reply[0] or reply[1]:
            return
        blocks, calls = _output_blocks(response.output)
        usage = reply[2] if reply[2] is not None else _usage(response.usage)
        loop.calls, loop.traced_names = list(calls), _traced_names(response.output)
        loop.reply = (blocks, calls, usage, reply[3])

    def stream_delta(self, task: asyncio.Task[Any], kind: str, delta: str) -> None:
        loop = self._streams.get(task)
        message = loop.message if loop is not None else None
        if message is None or not message.running:
            return
        if kind == "text":
            message.text_delta(delta)
        elif kind == "reasoning":
            message.thinking_delta(delta)
        else:
            message.tool_call_delta(delta)


class PhiTracingProcessor(TracingProcessor):
    """The processor `install` registers; it forwards to the installed adapter, if any.

    It stays registered once added (the SDK has no public way to remove one):
    `uninstall` detaches it, after which every call returns at once.
    """

    def __init__(self) -> None:
        self.mapper: _Mapper | None = None

    # Called for every span of every run: each goes straight to its mapper method.

    def on_trace_start(self, trace: Trace) -> None:
        mapper = self.mapper
        if mapper is not None:
            try:
                mapper.trace_started(trace)
            except Exception as caught:
                mapper.core.fault(caught)

    def on_trace_end(self, trace: Trace) -> None:
        mapper = self.mapper
        if mapper is not None:
            try:
                mapper.trace_ended(trace)
            except Exception as caught:
                mapper.core.fault(caught)

    def on_span_start(self, span: Span[Any]) -> None:
        mapper = self.mapper
        if mapper is not None:
            try:
                mapper.span_started(span)
            except Exception as caught:
                mapper.core.fault(caught)

    def on_span_end(self, span: Span[Any]) -> None:
        mapper = self.mapper
        if mapper is not None:
            try:
                mapper.span_ended(span)
            except Exception as caught:
                mapper.core.fault(caught)

    def shutdown(self) -> None:
        """Nothing to do: `uninstall` saves what the adapter holds."""

    def force_flush(self) -> None:
        mapper = self.mapper
        if mapper is not None:
            mapper.core.safely(mapper.core.tracer.flush)


_processor = PhiTracingProcessor()
_install_lock = threading.Lock()
_registered_with: TraceProvider | None = None  # the trace provider the processor was added to
_replaced: list[TracingProcessor] | None = None  # the processors `install` replaced, to put back
_installed_with: tuple[object, ...] = ()  # the arguments of the `install` in force


class PhiRunHooks(RunHooks[Any]):
    """Run hooks that make the recording exact: pass ``hooks=PhiRunHooks()`` to ``Runner.run``.

    Inside a function span, `on_tool_start` sees the tool call's id and arguments and
    `on_tool_end` the result the model is sent (a failed tool's too), whatever the span
    keeps; `on_agent_start` gives the agent's model name, `on_llm_start` the prompt and
    `on_llm_end` the content and usage of a model whose spans carry none. Return values are the SDK's own
    (None); a fault is counted by the adapter, never raised.
    """

    async def on_agent_start(self, context: Any, agent: Any) -> None:
        mapper = _processor.mapper
        if mapper is None:
            return
        try:
            trace = get_current_trace()
            if trace is None or type(trace).__name__ == "NoOpTrace":
                _warn_tracing_disabled()
            mapper.agent_started(agent)
        except Exception as caught:
            mapper.core.fault(caught)

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, input_items: Any) -> None:
        mapper = _processor.mapper
        if mapper is None:
            return
        try:
            mapper.prompt(input_items)
        except Exception as caught:
            mapper.core.fault(caught)
        if mapper.core.capture_requests:
            try:
                # What the runner offers the model: the same calls it makes for the request.
                tools = await agent.get_all_tools(context)
                handoffs = await get_handoffs(agent, context)
                model = agent.model if isinstance(agent.model, str) else ""
                payload = request_payload(
                    system_prompt, input_items, tools, handoffs, model, mapper.core.agent.millis()
                )
                mapper.request(payload)
            except Exception as caught:
                mapper.core.fault(caught)

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        mapper = _processor.mapper
        if mapper is not None:
            try:
                mapper.response(response)
            except Exception as caught:
                mapper.core.fault(caught)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        mapper = _processor.mapper
        if mapper is None:
            return
        try:
            span = get_current_span()
            call_id = getattr(context, "tool_call_id", None)
            if span is not None and call_id is not None:
                mapper.exact_call(span.span_id, call_id, getattr(context, "tool_arguments", None))
        except Exception as caught:
            mapper.core.fault(caught)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        mapper = _processor.mapper
        if mapper is None:
            return
        try:
            span = get_current_span()
            if span is not None:
                mapper.tool_output(span.span_id, result)
        except Exception as caught:
            mapper.core.fault(caught)


_warned_disabled = False


def _warn_tracing_disabled() -> None:
    global _warned_disabled
    if not _warned_disabled:
        _warned_disabled = True
        logger.warning(
            "OpenAI Agents SDK tracing is disabled (OPENAI_AGENTS_DISABLE_TRACING, "
            "set_tracing_disabled or RunConfig(tracing_disabled=True)): phi-session records nothing "
            "from these runs"
        )


def _listed(provider: TraceProvider) -> list[TracingProcessor] | None:
    """The provider's processors, if they can be read: the SDK has no public getter, the
    default provider's list is read."""
    processors = getattr(getattr(provider, "_multi_processor", None), "_processors", None)
    return list(processors) if isinstance(processors, tuple | list) else None


def _processors_of(provider: TraceProvider) -> list[TracingProcessor]:
    """The provider's processors; another provider's are taken to be the SDK's default processor."""
    listed = _listed(provider)
    return listed if listed is not None else [default_processor()]


def _registered(provider: TraceProvider) -> bool:
    """Whether `_processor` is among the provider's processors: the host may have set
    them anew (``set_trace_processors``) since it was added."""
    listed = _listed(provider)
    return _processor in listed if listed is not None else _registered_with is provider


def _tracing_disabled() -> bool:
    probe = get_trace_provider().create_trace("phi-session probe")
    return type(probe).__name__ == "NoOpTrace"


async def stream(result: Any) -> AsyncIterator[Any]:
    """``result.stream_events()``, unchanged, recording text, reasoning and tool-call
    argument deltas as MessageUpdate (processors never see streamed chunks)."""
    task = getattr(result, "run_loop_task", None)  # the run's: see `_Mapper._streams`
    async for event in result.stream_events():
        mapper = _processor.mapper
        raw = getattr(event, "type", None) == "raw_response_event"
        if mapper is not None and task is not None and raw:
            try:
                data = event.data
                kind = getattr(data, "type", "")
                # A refusal is the reply's text, as in the final message (`_text_of`).
                if kind in ("response.output_text.delta", "response.refusal.delta"):
                    mapper.stream_delta(task, "text", data.delta)
                elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                    mapper.stream_delta(task, "reasoning", data.delta)
                elif kind == "response.function_call_arguments.delta":
                    mapper.stream_delta(task, "arguments", data.delta)
            except Exception as caught:
                mapper.core.fault(caught)
        yield event


def install(
    sink: SinkArg = None, *, replace_default: bool = False, capture_requests: bool = False, **options: Any
) -> AdapterCore:
    """Record every Agents SDK run from now on; returns the adapter's `AdapterCore`.

    `sink`: where events go (None: the embedded store). `replace_default`: replace
    the SDK's other trace processors (its OpenAI exporter) instead of adding to
    them. `capture_requests`: with `PhiRunHooks`, also record each turn's
    ``TurnRequest`` (system prompt, input, tools and handoffs offered), which replay
    compares against to detect divergence; off by default (it repeats the whole history
    every turn). `options` go to `AdapterCore` (``store``, ``agent``, ``processors``,
    ``redact``, ``rotate_after``). Idempotent: a second call returns the adapter
    already installed (with a warning if it asks for other sinks or options, which it
    does not get: `uninstall` first).
    """
    global _registered_with, _replaced, _installed_with
    arguments = (sink, replace_default, capture_requests, options)
    with _install_lock:
        mapper = _processor.mapper
        if mapper is not None:
            if arguments != _installed_with:
                logger.warning(
                    "openai-agents: phi-session is already installed; this install()'s sink and "
                    "options are not used (call uninstall() first to change them)"
                )
            return mapper.core
        _installed_with = arguments
        core = AdapterCore(FRAMEWORK, sink, capture_requests=capture_requests, **options)
        provider = get_trace_provider()
        if replace_default:
            _replaced = _processors_of(provider)
            provider.set_processors([_processor])
            _registered_with = provider
        elif not _registered(provider):
            add_trace_processor(_processor)
            _registered_with = provider
        _processor.mapper = _Mapper(core)
        if _tracing_disabled():
            _warn_tracing_disabled()
        return core


def processor() -> PhiTracingProcessor:
    """The tracing processor `install` registers: for a processor list you set yourself
    (``set_trace_processors([..., openai_agents.processor()])``); it records while the
    adapter is installed."""
    return _processor


def installed() -> AdapterCore | None:
    """The installed adapter, if any."""
    mapper = _processor.mapper
    return mapper.core if mapper is not None else None


def uninstall() -> None:
    """Stop recording: runs still open end as failed, everything held is saved, and the
    processors `install` replaced (``replace_default=True``) are put back."""
    global _registered_with, _replaced, _installed_with
    with _install_lock:
        mapper = _processor.mapper
        if mapper is None:
            return
        _processor.mapper = None
        _installed_with = ()
        if _replaced is not None and _registered_with is not None:
            if _registered(_registered_with):  # else the host set a list of its own since: kept
                # Those the host added since `install` stay, after the ones put back.
                listed = _listed(_registered_with) or ()
                added = [p for p in listed if p is not _processor and p not in _replaced]
                _registered_with.set_processors([*_replaced, *added])
            if _processor not in _replaced:  # else it stays added, as before `install`
                _registered_with = None
            _replaced = None
    mapper.core.close()


# The replay model lives next to the adapter whose request converter it shares.
from .replay import ReplayModel, ReplayProvider  # noqa: E402
