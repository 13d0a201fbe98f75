"""LangChain / LangGraph: a callback handler that records every run as phi-core sessions.

One line turns it on::

    from phi_session.adapters.langchain import PhiCallbackHandler
    agent.invoke(inputs, {"callbacks": [PhiCallbackHandler()], "configurable": {"thread_id": "t1"}})

How runs map (run ids key all state, so concurrent runs in threads and tasks interleave):

* the root run (no ``parent_run_id``) is a loop (started at its first model call,
  whose model is the loop's config); a later run with the same
  ``configurable.thread_id`` continues that session's last loop; one started from a
  ``checkpoint_id`` (LangGraph time travel) is a ``Branch`` tagged with it; a graph run
  or a model call under a tool run (or a tool it invokes) is a sub-agent (own session,
  linked both ways), recorded only if it calls a model (a plain chain is part of the
  tool's execution);
  under a tool run outside a model turn (not recorded), linked one way (to the loop
  the run resumes, before its first model call); a model call under a run the handler
  does not see (the handler given to the model alone) is a root run of its own, as a
  bare call is;
* ``on_chat_model_start`` opens a turn (after ending the previous one) with the new
  input messages (those after the last AI message that were not recorded already)
  and, with ``capture_requests=True``, the turn's ``TurnRequest``; a call starting
  while another call of the run is in flight or the tools of the open turn's calls run
  (parallel nodes) waits for that reply and those tools to end (or for its own end, if
  a call of the reply has yet to run its tool), then has its turn (the tokens it streams
  meanwhile kept for it): a turn never ends under its tools, and the result of one
  starting after its turn ended so is an input of the turn open as it returns;
  ``on_llm_new_token`` streams text, reasoning and tool-call argument deltas;
  ``on_llm_end`` finishes the assistant message (tool call ids, ``usage_metadata``
  of that response only, the response's model or ``ls_model_name``, ``ls_provider``);
* tool start / end / error are the execution and result of a call of the open turn's
  reply, by its ``tool_call_id``, else (a hand-written tool node invoking the tool with
  the call's arguments) the unanswered call with its name and arguments (a tool run for
  no such call, as a node calling one directly, is not recorded: its output is a later
  input); a ``ToolMessage`` with ``status="error"`` is an error
  result; a tool's exception is held until the
  ``ToolMessage`` for the call that the tool node returns, or the next model call sends,
  if any, is the result: the tool node's answer in its place; a tool returning a ``Command`` with
  ``goto`` hands over: the next model call starts the next agent's loop, continuing
  this one, its metadata naming the call that handed over (`HANDOFF_KEY`: the reply
  that made it keeps ``toolUse``);
* a ``GraphInterrupt`` ends the loop normally, its interrupt values kept in an
  extension message of kind ``langgraph.interrupt``; any other exception ends it
  failed (``Aborted`` plus the error).

The handler runs inline (``run_inline``) so events keep the run's order, and never
raises into the host: a fault is counted and logged once, and the run goes on. A run
it is attached to twice (listed twice in the callbacks, or beside another handler
recording into the same place) is recorded once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import Token
from typing import Any, cast
from uuid import UUID

import msgspec

from ..._float32 import Float32
from ...errors import PhiSessionError
from ...events import ContinuationKind, LoopConfigSnapshot, TurnTrigger
from ...instrument import LoopScope, MessageScope, ToolScope, TurnScope
from ...messages import (
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
    ExtensionMessage,
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
from ...replay.cursor import recorded_exception
from ...replay.lineage import calling
from ...replay.script import HANDOFF_KEY
from .._core import (
    AdapterCore,
    ConvertedOnce,
    RunningTool,
    SinkArg,
    enter_tool,
    jsonable,
    leave_tool,
    loop_config,
    require_extra,
    session_id_for,
    since_last_reply,
    usage_of,
)

require_extra("langchain", "langchain_core")

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.outputs import LLMResult  # noqa: E402

__all__ = ["AsyncPhiCallbackHandler", "PhiCallbackHandler", "ReplayChatModel"]

logger = logging.getLogger("phi_session.adapters.langchain")

_json_encode = msgspec.json.Encoder().encode
_fingerprint_encode = msgspec.json.Encoder(enc_hook=repr).encode


# -- LangChain messages -> phi-core content ------------------------------------------------------


def _reasoning_aside(message: BaseMessage) -> Any:
    """The reasoning some providers (DeepSeek, Ollama, Groq) put beside text content;
    ``content_blocks`` reads it, a plain string content does not have it."""
    return message.additional_kwargs.get("reasoning_content")


def _blocks(message: BaseMessage) -> tuple[Content, ...]:
    """The text, reasoning and image blocks of a message, in order (tool calls apart)."""
    content = message.content
    if isinstance(content, str) and not _reasoning_aside(message):
        return (TextContent(text=content),) if content else ()
    blocks: list[Content] = []
    for standard in message.content_blocks:  # LangChain's provider-neutral blocks
        block = cast("Mapping[str, Any]", standard)
        kind = block.get("type")
        if kind == "text":
            blocks.append(TextContent(text=str(block.get("text", ""))))
        elif kind == "reasoning":
            signature = (block.get("extras") or {}).get("signature")
            blocks.append(
                ThinkingContent(
                    thinking=str(block.get("reasoning", "")),
                    signature=signature if isinstance(signature, str) else None,
                )
            )
        elif kind == "image" and isinstance(block.get("base64"), str):
            blocks.append(ImageContent(data=block["base64"], mime_type=str(block.get("mime_type", ""))))
        elif kind not in ("tool_call", "tool_call_chunk", "invalid_tool_call"):
            # Not a phi-core block (a file, a URL image, a citation...): kept as its JSON.
            blocks.append(TextContent(text=_json_encode(jsonable(block)).decode()))
    return tuple(blocks)


def _is_ai(message: BaseMessage) -> bool:
    return isinstance(message, AIMessage)


def _tool_calls(message: AIMessage, copy: bool = False) -> list[ToolCall]:
    """The message's tool calls; `copy`: with arguments of their own (`MessageScope.finish`
    copies them itself)."""
    calls = [
        ToolCall(
            id=call.get("id") or "",
            name=call["name"],
            arguments=jsonable(call["args"]) if copy else call["args"],
        )
        for call in message.tool_calls
    ]
    invalid = message.invalid_tool_calls
    if invalid:  # a call whose arguments did not parse keeps them as the raw text the model sent
        calls.extend(
            ToolCall(id=call.get("id") or "", name=call.get("name") or "", arguments=call.get("args"))
            for call in invalid
        )
    return calls


def _usage(metadata: Mapping[str, Any] | None) -> Usage | None:
    """phi-core usage of one response: LangChain's ``input_tokens`` include the cache's."""
    if not metadata:
        return None
    input_details = metadata.get("input_token_details") or {}
    cache_read = input_details.get("cache_read") or 0
    cache_write = input_details.get("cache_creation") or 0
    inputs = max(0, (metadata.get("input_tokens") or 0) - cache_read - cache_write)
    return usage_of(
        inputs,
        metadata.get("output_tokens"),
        cache_read=cache_read,
        cache_write=cache_write,
        reasoning=(metadata.get("output_token_details") or {}).get("reasoning"),
    )


_LENGTH_REASONS = frozenset(("length", "max_tokens", "MAX_TOKENS"))


def _stop_reason(message: AIMessage, calls: Sequence[ToolCall]) -> StopReason:
    if calls:
        return "toolUse"
    metadata = message.response_metadata
    reason = metadata.get("finish_reason") or metadata.get("stop_reason")
    return "length" if reason in _LENGTH_REASONS else "stop"


def _text(message: BaseMessage) -> str:
    return "".join(block.text for block in _blocks(message) if type(block) is TextContent)


def _tool_result(message: ToolMessage, timestamp: int) -> ToolResultMessage:
    return ToolResultMessage(
        tool_call_id=message.tool_call_id,
        tool_name=message.name or "",
        content=_blocks(message) or (TextContent(text=""),),
        is_error=message.status == "error",
        timestamp=timestamp,
    )


def _request_message(message: BaseMessage, timestamp: int) -> Message | None:
    """A message of a captured request in phi-core's form (system prompts go apart)."""
    if isinstance(message, AIMessage):
        calls = _tool_calls(message, copy=True)
        return AssistantMessage(
            content=(*_blocks(message), *calls),
            stop_reason=_stop_reason(message, calls),
            model=str(message.response_metadata.get("model_name", "")),
            provider=str(message.response_metadata.get("model_provider", "")),
            usage=_usage(message.usage_metadata) or Usage(input=0, output=0),
            timestamp=timestamp,
        )
    if isinstance(message, ToolMessage):
        return _tool_result(message, timestamp)
    if isinstance(message, SystemMessage):
        return None
    return UserMessage(content=_blocks(message), timestamp=timestamp)


def _fingerprint(message: BaseMessage) -> bytes:
    """A message's fields (all of them: one encoding is cheaper than picking those
    `_request_message` reads), as comparable bytes."""
    return _fingerprint_encode(message.__dict__)


def converted_once() -> ConvertedOnce[BaseMessage]:
    """`_request_message`, each message converted once (until it changes)."""
    return ConvertedOnce(_request_message, _fingerprint)


def _tool_definitions(tools: Any) -> tuple[ToolDefinition, ...]:
    """Bound tools, as ``bind_tools`` puts them in the call's params (OpenAI's function
    format, or Anthropic's)."""
    definitions = []
    for tool in tools if isinstance(tools, (list, tuple)) else ():
        spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
            # OpenAI's format names the schema "parameters", Anthropic's "input_schema".
            schema = spec.get("parameters", spec.get("input_schema"))
            definitions.append(
                ToolDefinition(
                    name=spec["name"],
                    description=str(spec.get("description", "")),
                    parameters=jsonable(schema),
                )
            )
    return tuple(definitions)


def _request(
    messages: Sequence[BaseMessage],
    params: Mapping[str, Any],
    model: str,
    timestamp: int,
    convert: Callable[[BaseMessage, int], Message | None] = _request_message,
) -> AnnotatedRequestPayload:
    """The request of a model call as `TurnRequest` records it; `convert` turns one
    message into phi-core's form (`_request_message`, or a replay's memo of it)."""
    system = "\n\n".join(_text(message) for message in messages if isinstance(message, SystemMessage))
    converted = tuple(
        request for request in (convert(message, timestamp) for message in messages) if request is not None
    )
    max_tokens = params.get("max_tokens")
    temperature = params.get("temperature")
    return AnnotatedRequestPayload(
        system_prompt=system,
        messages=converted,
        provenance=tuple(UnknownBlock() for _ in converted),
        tools=_tool_definitions(params.get("tools")),
        model_id=model,
        thinking_level="off",
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else None,
        temperature=Float32(temperature) if isinstance(temperature, (int, float)) else None,
        response_format=TextFormat(),
    )


# -- the mapping ---------------------------------------------------------------------------------


def _tool_output(output: Any) -> tuple[str | tuple[Content, ...], bool]:
    """A tool's output as result content, and whether it is an error result."""
    if isinstance(output, BaseMessage):
        return (
            _blocks(output) or (TextContent(text=""),),
            isinstance(output, ToolMessage) and output.status == "error",
        )
    return (output if isinstance(output, str) else _json_encode(jsonable(output)).decode()), False


def _command_message(command: Any, tool_call_id: str) -> Any:
    """What a tool that returned a LangGraph ``Command`` answered: the ``ToolMessage`` for
    its call in the command's update, else the command's goto and update as data."""
    update = getattr(command, "update", None)
    messages = update.get("messages") if isinstance(update, Mapping) else None
    for message in messages if isinstance(messages, (list, tuple)) else ():
        if isinstance(message, ToolMessage) and message.tool_call_id == tool_call_id:
            return message
    return {"goto": getattr(command, "goto", None), "update": update}


def _node_messages(output: Any) -> Iterator[Any]:
    """The messages a graph node returned: its state update's, a list of them, or those of
    the ``Command`` updates it returned (a ``ToolNode``'s forms)."""
    if type(output).__name__ == "Command":
        output = getattr(output, "update", None)
    if isinstance(output, Mapping):
        output = output.get("messages")
    for item in output if isinstance(output, (list, tuple)) else ():
        if type(item).__name__ == "Command" or isinstance(item, Mapping):
            yield from _node_messages(item)
        else:
            yield item


def _is_interrupt(error: BaseException) -> bool:
    # By name: langchain-core alone (no LangGraph) has no GraphInterrupt to import.
    return any(cls.__name__ == "GraphInterrupt" for cls in type(error).__mro__)


def _interrupt_values(error: BaseException) -> list[dict[str, Any]]:
    found = error.args[0] if error.args else ()
    interrupts = found if isinstance(found, (list, tuple)) else (found,)
    return [
        jsonable({"value": getattr(item, "value", item), "id": getattr(item, "id", None)})
        for item in interrupts
    ]


def _stream(reply: MessageScope, token: Any, chunk: Any) -> None:
    """A streamed token's text, reasoning and tool-call argument deltas."""
    message = getattr(chunk, "message", None)
    if message is None or (
        isinstance(token, str)
        and token
        and isinstance(message.content, str)
        and not _reasoning_aside(message)
    ):
        if isinstance(token, str) and token:
            reply.text_delta(token)
    else:
        for standard in message.content_blocks:
            block = cast("Mapping[str, Any]", standard)
            kind = block.get("type")
            if kind == "text" and block.get("text"):
                reply.text_delta(str(block["text"]))
            elif kind == "reasoning" and block.get("reasoning"):
                reply.thinking_delta(str(block["reasoning"]))
    for call in getattr(message, "tool_call_chunks", None) or ():
        if call.get("args"):
            reply.tool_call_delta(str(call["args"]))


_warned_unseen = False
"""Whether a model call under a run a handler does not see was warned of: once a process
(a handler made per request would warn at each)."""

_RunId = int
"""A LangChain run id (a `UUID`) as the mapper keys it: its ``int``, whose hash is C's
(``UUID.__hash__`` is a Python call, and every callback looks several run ids up).
Taken inside the callbacks' fault catch."""


def _sole_argument(arguments: Any, value: Any) -> bool:
    """Whether a call's `arguments` are one argument whose value is `value`, or reads as it
    (LangChain passes a tool invoked with a plain value that value's ``str``)."""
    if not isinstance(arguments, Mapping) or len(arguments) != 1:
        return False
    (argument,) = arguments.values()
    return bool(argument == value or (isinstance(value, str) and str(argument) == value))


class _Call:
    """A model call that started while another call of its run was in flight (parallel
    nodes of one step): it gets its turn once that call's reply ends."""

    __slots__ = ("history", "model", "outcome", "params", "provider", "tokens")

    def __init__(
        self, model: str, provider: str, history: Sequence[BaseMessage], params: Mapping[str, Any]
    ) -> None:
        self.model = model
        self.provider = provider
        self.history = history
        self.params = params
        self.outcome: LLMResult | BaseException | None = None
        """Its response or error, once it ended before its turn opened."""
        self.tokens: list[tuple[Any, Any]] = []
        """The tokens it streamed meanwhile (token, chunk): streamed when its turn opens."""


class _Held:
    """A tool's end held back (`_Run.held`)."""

    __slots__ = ("answered", "error", "guess", "timestamp", "tool")

    def __init__(
        self,
        tool: ToolScope,
        error: BaseException | None,
        timestamp: int,
        answered: bool,
        guess: bool = False,
    ) -> None:
        self.tool = tool
        self.error = error
        """The exception it ends with (None once the answer to its call is its result)."""
        self.timestamp = timestamp
        """When it returned or raised (epoch milliseconds)."""
        self.answered = answered
        """Whether its result is known: a failure waits for the answer the model is sent."""
        self.guess = guess
        """Whether a run given no call id was taken for the call (`_Run.call_for`): a run
        naming the call takes its place."""

    def end(self) -> None:
        self.tool.end(self.error, timestamp=self.timestamp)


class _Run:
    """One root run (one loop): its open turn and reply, and what it recorded already.

    The loop starts at the run's first model call, whose model and provider are the
    loop's config (a graph names no model when it starts), or at the run's end if it
    made none; a sub-agent that made none (a plain chain a tool runs) has no loop.
    """

    __slots__ = (
        "calls",
        "children",
        "convert",
        "copies",
        "guesses",
        "handoff",
        "held",
        "inputs",
        "interrupts",
        "key",
        "late",
        "lock",
        "loop",
        "metadata",
        "parent_tool",
        "pending",
        "recorded",
        "reply",
        "resumes",
        "running",
        "spawner",
        "started",
        "tokens",
        "turn",
        "waiting",
    )

    def __init__(
        self,
        key: _RunId,
        metadata: Mapping[str, Any] | None,
        parent_tool: ToolScope | None,
        spawner: _Run | None,
        capture_requests: bool,
    ) -> None:
        self.key = key
        self.metadata = metadata
        self.parent_tool = parent_tool
        self.spawner = spawner
        """The run inside whose unrecorded tool (run outside a model turn) this sub-agent runs."""
        self.resumes: str | None = None
        """The loop of the interrupted run this one resumes (whose model called the tools
        the resumed run runs before its own first model call)."""
        self.lock = threading.Lock()  # tools of a step call back from several threads
        self.loop: LoopScope | None = None
        self.turn: TurnScope | None = None
        self.reply: MessageScope | None = None
        self.pending: list[AgentMessage] = []  # input that came before the loop started
        self.recorded: set[str] = set()
        """Tool call ids whose results the loop recorded (not new inputs of the next turn)."""
        self.inputs: dict[str | int, BaseMessage] = {}
        """The other input messages the loop recorded, by message id, else by identity
        (held, so that their identity stays theirs): a model call may resend them."""
        self.calls: dict[str, ToolCall] = {}
        """The open turn's tool calls by id (as its message recorded them)."""
        self.started: set[str] = set()
        """The calls of the open turn whose tool started (the others are unanswered)."""
        self.guesses: set[str] = set()
        """The calls whose running tool was given no call id (`call_for` matched it)."""
        self.running = 0
        """The open turn's tools running: it does not end before they do."""
        self.late: dict[str, ToolCall] = {}
        """The calls of ended turns whose tool had not started (parallel nodes' model calls
        came and went first): a tool starting for one is no tool execution of that turn,
        its result an input of the turn open as it returns. Kept until its tool starts or
        a model call is sent its answer, so only calls still unanswered."""
        self.interrupts: dict[object, Any] = {}
        """The values of the interrupts that stopped the run, by interrupt id."""
        self.convert: Callable[[BaseMessage, int], Message | None] = (
            converted_once() if capture_requests else _request_message
        )
        """A message in phi-core's form; memoized when every request converts the history."""
        self.handoff: dict[str, str] | None = None
        """The tool call that handed the run over (a ``Command`` with ``goto``), as the next
        agent's loop names it (`HANDOFF_KEY`): the next model call is that agent's, in a
        loop continuing this one."""
        self.children: set[_RunId] = set()
        """The run ids under this one still open: the run's end forgets them, as a run
        cancelled during a model call gets no end of that call (nor of its tools)."""
        self.copies = 1
        """How often the handler is attached to the run (listed twice in its callbacks):
        LangChain calls it that often for each of the run's own callbacks (its children's
        managers hold it once)."""
        self.tokens = 0
        """The token callbacks of the run's own model call so far, copies included."""
        self.waiting: dict[_RunId, _Call] = {}
        """The model calls waiting for a turn, in the order they started."""
        self.held: list[_Held] = []
        """The tool ends held back, in the order they happened: a tool that raised, until
        its tool node's output or the next model call shows what the framework answers
        the model in its place (`settle_failed`), and each end after it."""

    @property
    def sub_agent(self) -> bool:
        return self.parent_tool is not None or self.spawner is not None

    def interrupted(self, error: BaseException) -> None:
        """Keep the values of a ``GraphInterrupt``, each once: every level it passes (the
        tool, the node, each enclosing graph) reports the same interrupt."""
        with self.lock:
            for value in _interrupt_values(error):
                # One without an id (an older LangGraph) cannot be told from a repeat: kept.
                key = value.get("id")
                self.interrupts.setdefault(object() if key is None else key, value)

    def resume(self, loop_id: str, answered: frozenset[str]) -> None:
        """This run resumes the interrupted loop `loop_id`, which recorded the results of
        the `answered` calls."""
        self.resumes = loop_id
        self.recorded.update(answered)

    def end_tool(self, tool: ToolScope, timestamp: int, error: BaseException | None = None) -> None:
        """End a tool that returned (or `error`: raised) at `timestamp`, now, or after the
        failures held before it (the ends keep their order). Under the run's lock."""
        self.guesses.discard(tool.tool_call_id)
        if self.held:
            self.held.append(_Held(tool, error, timestamp, answered=True))
        else:
            tool.end(error, timestamp=timestamp)

    def hold(self, tool: ToolScope, error: BaseException | None, timestamp: int) -> None:
        """Hold the end of a tool that raised (`error`) at `timestamp`, or one a run given no
        call id was taken for, until what the model is answered for its call is known
        (`settle_failed`) or a run naming the call takes its place (`take_guess`). Under
        the run's lock."""
        call_id = tool.tool_call_id
        guess = call_id in self.guesses
        self.guesses.discard(call_id)
        self.held.append(_Held(tool, error, timestamp, answered=False, guess=guess))

    def take_guess(self, call_id: str) -> ToolScope | None:
        """The still open tool of call `call_id` that a run given no call id was taken for:
        a run naming the call (a tool node after a node's own look-up) replaces it, its
        outcome the call's. Under the run's lock."""
        for held in self.held:
            if held.guess and not held.answered and held.tool.tool_call_id == call_id:
                self.held.remove(held)
                self._end_held()
                return held.tool
        return None

    def retried(self, call_id: str) -> None:
        """The call `call_id` runs again (a retry): its held failure is that attempt's
        result, ended before the new attempt starts. Under the run's lock."""
        for held in self.held:
            if not held.answered and held.tool.tool_call_id == call_id:
                held.answered = True
                self._end_held()
                if held in self.held:  # behind another failure: ended now all the same
                    self.held.remove(held)
                    held.end()
                return

    def settle_failed(self, sent: Iterable[BaseMessage], *, rest: bool = True) -> None:
        """Answer the failed tools held open whose ``ToolMessage`` the model is sent (`sent`:
        a tool node's error handling answered it) with its content and status; with `rest`,
        the others too, with their exception (a retry ran them again, the run ended, or
        the error went up the graph); then end what no failure holds back any more. Under
        the run's lock."""
        if not self.held:
            return
        answers = {message.tool_call_id: message for message in sent if isinstance(message, ToolMessage)}
        for held in self.held:
            if held.answered:
                continue
            message = answers.get(held.tool.tool_call_id)
            if message is not None:
                content, is_error = _tool_output(message)
                if is_error:
                    held.tool.error(content)
                else:
                    held.tool.result(content)
                held.error = None
                held.answered = True
            elif rest:
                held.answered = True
                if held.error is not None:
                    # Recorded as its exception: a ToolMessage the model is sent for it later (the
                    # resumed run's, after an interrupt cut the tool node short) is a new input.
                    self.recorded.discard(held.tool.tool_call_id)
        self._end_held()

    def _end_held(self) -> None:
        """End the held tools up to the first failure still waiting for its answer."""
        held = self.held
        count = next((index for index, each in enumerate(held) if not each.answered), len(held))
        ended, self.held = held[:count], held[count:]
        for each in ended:
            each.end()

    def end_turn(self) -> None:
        turn, self.turn, self.reply = self.turn, None, None
        # Added to, not replaced: a second parallel model call must not forget the first's.
        self.late.update(
            (call_id, call)
            for call_id, call in self.calls.items()
            if call_id not in self.started and call_id not in self.recorded
        )
        self.calls = {}
        self.started = set()
        self.guesses = set()
        self.running = 0  # cut short with the turn (the run ended under them)
        if turn is not None and turn.running:
            turn.end()

    def busy(self) -> bool:
        """Whether the open turn goes on: its reply streams, or its tools run. Under the run's
        lock."""
        return self.running > 0 or (self.reply is not None and self.reply.running)

    def unanswered(self, sent: Iterable[BaseMessage] = ()) -> bool:
        """Whether a call of the open turn's reply has neither run its tool nor an answer
        among the messages `sent` (a node answering it without the tool). Under the run's
        lock."""
        answered = {message.tool_call_id for message in sent if isinstance(message, ToolMessage)}
        return any(
            call_id not in self.started and call_id not in self.recorded and call_id not in answered
            for call_id in self.calls
        )

    def call_for(self, name: str, inputs: Any) -> str | None:
        """The unanswered call of the open turn's reply that a tool run given no call id
        answers (a hand-written tool node invoking the tool with the call's arguments):
        the first with its name and those arguments, or, for a plain value (which
        LangChain passes as its ``str``), that value as its one argument. Under the run's
        lock."""
        args = jsonable(inputs) if isinstance(inputs, Mapping) else None
        for call_id, call in self.calls.items():
            if (
                call_id not in self.started
                and call_id not in self.recorded
                and call.name == name
                and (call.arguments == args if args is not None else _sole_argument(call.arguments, inputs))
            ):
                return call_id
        return None

    def new_inputs(self, messages: Sequence[BaseMessage], timestamp: int) -> list[AgentMessage]:
        """The messages after the last AI message that the loop has not recorded yet."""
        inputs: list[AgentMessage] = []
        recorded, seen = self.recorded, self.inputs
        for message in since_last_reply(messages, _is_ai):
            if isinstance(message, ToolMessage):
                self.late.pop(message.tool_call_id, None)  # answered: no tool starts for it now
                if message.tool_call_id in recorded:
                    continue
                recorded.add(message.tool_call_id)
            else:
                key = message.id or id(message)
                if key in seen:
                    continue
                seen[key] = message
            converted = self.convert(message, timestamp)
            if converted is not None:
                inputs.append(converted)
        return inputs


_INTERRUPTED = "[interrupted]"
"""The result of a tool that called ``interrupt()`` in the interrupted run's loop."""
_NO_MODEL = LoopConfigSnapshot(model="none", provider="langchain")
"""The config of a run that called no model (a resumed run that only ran a node, say)."""


class _Mapper:
    """LangChain callbacks -> adapter core and instrumentation scopes; shared by the sync
    and async handlers."""

    def __init__(self, core: AdapterCore) -> None:
        self.core = core
        self._runs: dict[_RunId, _Run] = {}  # every run id under a recorded root run -> its _Run
        self._roots: dict[_RunId, _Run] = {}
        self._replies: dict[_RunId, tuple[_Run, MessageScope]] = {}
        self._tools: dict[_RunId, tuple[_Run, ToolScope, Token[RunningTool | None]]] = {}
        self._unrecorded_tools: dict[_RunId, _Run] = {}
        """Tools run outside a model turn (not recorded) -> their run: what runs inside them
        is still a sub-agent."""
        self._within: dict[_RunId, tuple[_RunId, _Run]] = {}
        """Tools a tool invokes (part of its execution) -> the outermost tool's run id and its
        run: what runs inside them runs inside that tool."""
        self._late: dict[_RunId, ToolCall] = {}
        """Unrecorded tools answering a call of a turn that ended before they started
        (`_Run.late`) -> that call: their results are inputs."""

    def _root(
        self,
        run_id: _RunId,
        metadata: Mapping[str, Any] | None,
        parent_tool: ToolScope | None,
        spawner: _Run | None = None,
    ) -> _Run | None:
        """A new root run (a loop), knowing what the thread's interrupted run recorded;
        None if it is recorded already: this handler was called for it before (it is
        attached twice), or another recording into the same place claimed it."""
        known = self._roots.get(run_id)
        if known is not None:
            known.copies += 1
            return None
        if not self.core.claim(run_id):
            return None
        run = _Run(run_id, metadata, parent_tool, spawner, self.core.capture_requests)
        self._roots[run_id] = run
        thread = _thread(metadata)
        if thread is not None:
            # Left by the thread's interrupted run (`_end`), for whichever handler resumes it.
            interrupted = self.core.take_note(thread)
            if interrupted is not None:
                run.resume(*interrupted)
        return run

    def _stored_interrupt(self, thread: str) -> tuple[str, frozenset[str]] | None:
        """The interrupted loop a run of `thread` resumes and the calls of its last turn
        that it recorded results of, read from the store: for a run resuming one that left
        no note (recorded by a handler closed since, or by another process)."""
        store = self.core.store
        if store is None:
            return None
        session_id = session_id_for(thread)
        try:
            count = len(store.load_outline(session_id).loops)
            loops = store.load_loops(session_id, count - 1, count) if count else []
        except PhiSessionError:  # none stored, or unreadable (the run's start warns of it)
            return None
        if not loops or not loops[0].turns:
            return None
        loop = loops[0]
        if not any(
            isinstance(m, ExtensionMessage) and m.kind == "langgraph.interrupt" for m in loop.messages
        ):
            return None
        stopped = (TextContent(text=_INTERRUPTED),)
        # As the note (`_end`): neither an interrupted call nor a failure recorded as its
        # exception (the tool node's answer to it comes with the resumed run).
        answered = frozenset(
            result.tool_call_id
            for result in loop.turns[-1].tool_results
            if isinstance(result, ToolResultMessage)
            and result.content != stopped
            and recorded_exception(result) is None
        )
        return loop.loop_id, answered

    # -- loops ---------------------------------------------------------------------------------

    def _loop(self, run: _Run, config: LoopConfigSnapshot) -> LoopScope:
        """The run's loop, started now if it has not started yet."""
        loop = run.loop
        if loop is not None:
            return loop
        metadata = run.metadata or {}
        thread = _thread(metadata)
        checkpoint = metadata.get("checkpoint_id")
        spawner = run.spawner
        if spawner is not None:
            # Before its first model call, the spawning run has no loop: the loop its tools
            # belong to is then the interrupted one it resumes, if any.
            spawning = spawner.loop.loop_id if spawner.loop is not None else spawner.resumes
            started = self.core.start_sub_agent(run.key, config, spawning)
        else:
            # The parent tool is marked as running here too: a sub-agent found by its parent
            # run id is found when an async handler ran the tool's start in another context.
            token = enter_tool(run.parent_tool) if run.parent_tool is not None else None
            try:
                started = self.core.start_run(
                    run.key,
                    config,
                    framework_session_id=thread,
                    kind=None if checkpoint is None else ContinuationKind.branch(str(checkpoint)),
                )
            finally:
                if token is not None:
                    leave_tool(token)
        loop = run.loop = started.loop
        for message in run.pending:
            loop.user(message)
        run.pending.clear()
        return loop

    def _input(self, run: _Run, message: AgentMessage) -> None:
        if run.loop is None:
            run.pending.append(message)
        else:
            run.loop.user(message)

    # -- chains (graphs, nodes, agents) -----------------------------------------------------

    def _parent(self, parent_run_id: _RunId | None) -> _RunId | None:
        """The run a run under `parent_run_id` runs in: the outermost tool, for one under a
        tool another tool invoked."""
        within = self._within.get(parent_run_id) if parent_run_id is not None else None
        return parent_run_id if within is None else within[0]

    def chain_start(
        self, inputs: Any, run_id: _RunId, parent_run_id: _RunId | None, metadata: Mapping[str, Any] | None
    ) -> None:
        parent_tool = spawner = None
        parent_run_id = self._parent(parent_run_id)
        if parent_run_id is not None:
            tool = self._tools.get(parent_run_id)
            if tool is not None:
                parent_tool = tool[1]  # a graph run inside a tool: a sub-agent
            else:
                spawner = self._unrecorded_tools.get(parent_run_id)
                if spawner is None:
                    run = self._runs.get(parent_run_id)
                    if run is not None:
                        self._runs[run_id] = run
                        run.children.add(run_id)
                    return
        run = self._root(run_id, metadata, parent_tool, spawner)
        if run is None:
            return
        self._runs[run_id] = run
        resume = getattr(inputs, "resume", None)
        if resume is not None and type(inputs).__name__ == "Command":
            # LangGraph's Command(resume=...): the answer to the interrupt is the run's input.
            run.pending.append(ExtensionMessage(kind="langgraph.resume", data=jsonable(resume)))
            thread = _thread(metadata)
            if run.resumes is None and thread is not None:
                interrupted = self._stored_interrupt(thread)
                if interrupted is not None:
                    run.resume(*interrupted)

    def chain_end(self, outputs: Any, run_id: _RunId) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        run.children.discard(run_id)
        if self._roots.pop(run_id, None) is not None:
            self._end(run, None)
        elif run.held:
            # A tool node's output: its answers to the failed calls, as the model will be
            # sent them (the run may stop before: an interrupt, the graph's end).
            with run.lock:
                run.settle_failed(_node_messages(outputs), rest=False)

    def chain_error(self, error: BaseException, run_id: _RunId) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        run.children.discard(run_id)
        interrupted = _is_interrupt(error)
        if interrupted:
            run.interrupted(error)
        if self._roots.pop(run_id, None) is not None:
            self._end(run, None if interrupted else error)

    def _end(self, run: _Run, error: BaseException | None) -> None:
        self.core.unclaim(run.key)
        # Copied at once (in C): a thread of the run may still register a tool.
        for child in list(run.children):
            self.core.unclaim(child)  # a model call's (its turn claimed)
            self._runs.pop(child, None)
            self._replies.pop(child, None)
            self._tools.pop(child, None)
            self._unrecorded_tools.pop(child, None)
            self._within.pop(child, None)
            self._late.pop(child, None)
        with run.lock:
            run.settle_failed(())
            if run.loop is None and run.sub_agent:
                return  # a sub-agent that called no model: its tool's result is all it did
            loop = self._loop(run, _NO_MODEL)
            # Calls that ended waiting for a turn are recorded; those still in flight,
            # cut short with the run, are not (nor is their turn begun).
            run.waiting = {key: call for key, call in run.waiting.items() if call.outcome is not None}
            if run.waiting and loop.running:
                run.end_turn()
                self._next_turns(run)
            thread = _thread(run.metadata)
            if thread is not None and run.interrupts:
                # The calls of its last reply it recorded results of: the resumed run's model
                # call sends them again, and they are no new inputs (the interrupted call's
                # result, which comes with the resume, is).
                answered = frozenset(run.recorded.intersection(run.calls))
                self.core.leave_note(thread, (loop.loop_id, answered))
            if error is None and loop.running:
                run.end_turn()
                if run.interrupts:
                    loop.user(
                        ExtensionMessage(kind="langgraph.interrupt", data=list(run.interrupts.values()))
                    )
        self.core.end_run(run.key, error)

    # -- chat models -------------------------------------------------------------------------

    def chat_model_start(
        self,
        messages: Sequence[Sequence[BaseMessage]],
        run_id: _RunId,
        parent_run_id: _RunId | None,
        metadata: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
    ) -> None:
        run: _Run | None
        parent_run_id = self._parent(parent_run_id)
        tool = self._tools.get(parent_run_id) if parent_run_id is not None else None
        spawner = self._unrecorded_tools.get(parent_run_id) if parent_run_id is not None else None
        if tool is not None or spawner is not None:
            # A model called by a tool (one that summarises, say) is not the next turn of
            # the tool's loop: like a graph run under a tool, it is a sub-agent.
            run = self._root(run_id, metadata, None if tool is None else tool[1], spawner)
            if run is None:
                return
        else:
            run = self._runs.get(parent_run_id) if parent_run_id is not None else None
            if run is None:
                # A bare model call is a loop of its own; so is one under a run this handler
                # does not see (given to the model alone, not in the run's callbacks).
                run = self._root(run_id, metadata, None)
                if run is None:
                    return
                global _warned_unseen
                if parent_run_id is not None and not _warned_unseen:
                    _warned_unseen = True
                    logger.warning(
                        "a model call under a run this handler is not attached to (given to the "
                        "model's callbacks alone) is recorded as a loop of its own, its tools not "
                        "at all: put the handler in the run's config callbacks "
                        '(invoke(inputs, {"callbacks": [handler]})) to record the whole run'
                    )
        metadata = metadata or {}
        params = params or {}
        # A model without a name (a fake, a custom class) goes by its LangChain type.
        model = str(
            metadata.get("ls_model_name")
            or params.get("model")
            or params.get("model_name")
            or params.get("_type")
            or "unknown"
        )
        provider = str(metadata.get("ls_provider") or "langchain")
        call = _Call(model, provider, messages[0] if messages else (), params)
        with run.lock:
            loop = run.loop
            if loop is not None and not loop.running:
                return  # ended under the run: the handler closed, or the interpreter is exiting
            if run.key != run_id and not self.core.claim(run_id):
                return  # another handler recording into the same place records the run's turn
            if run.busy() or run.unanswered(since_last_reply(call.history, _is_ai)):
                # A parallel call (another node of the step): one turn at a time, so it
                # waits for the running reply and the tools of its calls to end, or for its
                # own end if a call's tool has yet to start (its tokens meanwhile kept for
                # its turn).
                run.waiting[run_id] = call
            else:
                self._replies[run_id] = (run, self._open_turn(run, call))
            loop = run.loop
        if loop is not None:
            # LangGraph makes each model call in a context of its own: name its loop there,
            # for a replay cursor answering the call (`phi_session.replay.recording_as`).
            calling(loop.loop_id)
        self._runs[run_id] = run
        run.children.add(run_id)

    def _open_turn(self, run: _Run, call: _Call) -> MessageScope:
        """End the run's turn and open the next one for `call`: its new inputs, its request
        if captured, its reply started. Under the run's lock, its loop running."""
        run.settle_failed(since_last_reply(call.history, _is_ai))
        run.end_turn()
        model, provider = call.model, call.provider
        loop = run.loop
        if loop is None:
            loop = self._loop(run, loop_config(model, provider))
        elif run.handoff is not None:
            # Named in the new loop: the reply that made the call keeps toolUse.
            handoff = {HANDOFF_KEY: run.handoff}
            run.handoff = None
            successor = self.core.handoff(run.key, loop_config(model, provider), metadata=handoff)
            if successor is not None:
                loop = run.loop = successor.loop
        now = self.core.agent.millis()
        for message in run.new_inputs(call.history, now):
            loop.user(message)
        capture = self.core.capture_requests
        request = _request(call.history, call.params, model, now, run.convert) if capture else None
        # A sub-agent loop no tool scope spawned starts as a tool-spawned one does.
        trigger: TurnTrigger | None = "SubAgent" if run.spawner is not None and loop.turns == 0 else None
        turn = loop.turn(trigger, request=request).start()
        reply = turn.assistant(model=model, provider=provider).start()
        run.turn, run.reply = turn, reply
        return reply

    def _next_turns(self, run: _Run) -> None:
        """The turns of the calls waiting for one, once the run's reply and its tools have
        ended: each call that ended meanwhile recorded at once, then the first still in
        flight opened (its reply ends when it does), unless a call of the reply has yet to
        run its tool (it ends the turn when it ends). Under the run's lock."""
        waiting = run.waiting
        while waiting and not run.busy():
            if run.loop is None or not run.loop.running:
                waiting.clear()  # ended under the run (the handler closed)
                return
            key = next((key for key, call in waiting.items() if call.outcome is not None), None)
            if key is None:
                if run.unanswered():
                    return
                key = next(iter(waiting))
            call = waiting.pop(key)
            reply = self._open_turn(run, call)
            for token, chunk in call.tokens:  # what it streamed while waiting
                _stream(reply, token, chunk)
            if call.outcome is None:
                self._replies[key] = (run, reply)
            else:
                self._finish(run, reply, call.outcome)

    def new_token(self, token: Any, chunk: Any, run_id: _RunId) -> None:
        found = self._replies.get(run_id)
        run = found[0] if found is not None else self._runs.get(run_id)
        if run is None:
            return
        with run.lock:
            waiting = run.waiting.get(run_id)
            if waiting is not None:
                waiting.tokens.append((token, chunk))
                return
            if found is None:
                found = self._replies.get(run_id)  # its turn opened meanwhile
                if found is None:
                    return
            reply = found[1]
            # A reply ended under the run (the handler closed) drops its late tokens.
            if not reply.running:
                return
            if run.copies > 1 and run.key == run_id:
                run.tokens += 1
                if run.tokens % run.copies:
                    return  # a copy: the last one is recorded
            _stream(reply, token, chunk)

    def llm_end(self, response: LLMResult, run_id: _RunId) -> None:
        self._call_ended(run_id, response)

    def llm_error(self, error: BaseException, run_id: _RunId) -> None:
        self._call_ended(run_id, error)

    def _call_ended(self, run_id: _RunId, outcome: LLMResult | BaseException) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        self.core.unclaim(run_id)
        run.children.discard(run_id)
        with run.lock:
            # Under the lock: a waiting call may have been given its turn meanwhile.
            found = self._replies.pop(run_id, None)
            if found is not None:
                self._finish(run, found[1], outcome)
                self._next_turns(run)
            elif run_id in run.waiting:
                run.waiting[run_id].outcome = outcome  # recorded when its turn comes
                self._next_turns(run)
        self._ended_alone(run_id, run, outcome if isinstance(outcome, BaseException) else None)

    @staticmethod
    def _finish(run: _Run, reply: MessageScope, outcome: LLMResult | BaseException) -> None:
        """A model call's response (or error) as its reply. Under the run's lock."""
        if not reply.running:
            return  # ended under the run (the handler closed)
        if isinstance(outcome, BaseException):
            reply.end(outcome)
            return
        generations = outcome.generations[0] if outcome.generations else []
        message = getattr(generations[0], "message", None) if generations else None
        if not isinstance(message, AIMessage):  # a completion model: text only
            reply.finish(generations[0].text if generations else "")
            return
        calls = _tool_calls(message)
        model = message.response_metadata.get("model_name")
        if isinstance(model, str) and model:
            reply.model = model
        provider = message.response_metadata.get("model_provider")
        if isinstance(provider, str) and provider:
            reply.provider = provider
        recorded = reply.finish(
            _blocks(message),
            tool_calls=calls,
            usage=_usage(message.usage_metadata),
            stop_reason=_stop_reason(message, calls),
        )
        if calls:  # the recorded calls (own copies of the arguments) end its content
            tail = recorded.content[-len(calls) :]
            run.calls = {call.id: call for call in tail if type(call) is ToolCall}

    def _ended_alone(self, run_id: _RunId, run: _Run, error: BaseException | None = None) -> None:
        """A bare model call (its own root run) ends its loop with it."""
        if self._roots.pop(run_id, None) is not None:
            self._end(run, error)

    # -- tools -------------------------------------------------------------------------------

    def tool_start(
        self, name: str, inputs: Any, run_id: _RunId, parent_run_id: _RunId | None, tool_call_id: str | None
    ) -> None:
        parent_run_id = self._parent(parent_run_id)
        if parent_run_id is None:
            return
        outer = self._tools.get(parent_run_id)
        owner = outer[0] if outer is not None else self._unrecorded_tools.get(parent_run_id)
        if owner is not None:
            # A tool a tool invokes is part of that tool's execution, not a call the model
            # made: the outer tool's result stands for it, and what it runs runs in that tool.
            self._within[run_id] = (parent_run_id, owner)
            owner.children.add(run_id)
            return
        run = self._runs.get(parent_run_id)
        if run is None:
            return
        with run.lock:
            turn = run.turn
            call_id = tool_call_id if tool_call_id is not None else run.call_for(name, inputs)
            call = run.calls.get(call_id) if call_id is not None else None
            if turn is None or not turn.running or call is None:
                # Not a call of the open turn's reply (a node calling a tool directly, or
                # no turn open): not a tool execution, its output is what a later model call
                # is sent; a run inside it is still a sub-agent.
                logger.info("tool %s ran for no call of a model turn: not recorded", name)
                self._unrecorded_tools[run_id] = run
                run.children.add(run_id)
                late = run.late.pop(call_id, None) if call_id is not None else None
                if late is not None:
                    self._late[run_id] = late
                return
            guessed = run.take_guess(call.id) if tool_call_id is not None else None
            if guessed is not None:
                tool = guessed  # open still: this run's outcome ends it
            else:
                run.retried(call.id)
                run.started.add(call.id)
                tool = turn.tool(id=call.id, name=name, args=call.arguments).start()
                if tool_call_id is None:
                    run.guesses.add(call.id)
            run.running += 1
        self._runs[run_id] = run
        self._tools[run_id] = (run, tool, enter_tool(tool))
        run.children.add(run_id)

    def tool_end(self, output: Any, run_id: _RunId) -> None:
        found = self._tools.pop(run_id, None)
        self._runs.pop(run_id, None)
        if found is None:
            self._late_result(run_id, output)
            self._unrecorded_tool_end(run_id)
            return
        run, tool, token = found
        run.children.discard(run_id)
        leave_tool(token)
        handoff = False
        if type(output).__name__ == "Command":  # LangGraph: a state update, maybe a handoff
            handoff = bool(getattr(output, "goto", None))
            output = _command_message(output, tool.tool_call_id)
        content, is_error = _tool_output(output)
        if is_error:
            tool.error(content)
        else:
            tool.result(content)
        now = self.core.agent.millis()
        with run.lock:
            run.recorded.add(tool.tool_call_id)
            if handoff and run.handoff is None:
                run.handoff = {"tool_call_id": tool.tool_call_id, "tool_name": tool.tool_name}
            if tool.tool_call_id in run.guesses and run.turn is not None and run.turn.running:
                run.hold(tool, None, now)  # the model's answer, or a run naming the call, tells
            else:
                run.end_tool(tool, now)
            self._tool_ended(run)

    def tool_error(self, error: BaseException, run_id: _RunId) -> None:
        found = self._tools.pop(run_id, None)
        self._runs.pop(run_id, None)
        if found is None:
            self._unrecorded_tool_end(run_id)
            return
        run, tool, token = found
        run.children.discard(run_id)
        leave_tool(token)
        now = self.core.agent.millis()
        if _is_interrupt(error):
            # The tool asked for input: it did not fail, its result comes with the resumed
            # run. A started tool scope always records a result: this one says so.
            run.interrupted(error)
            tool.result(_INTERRUPTED)
            with run.lock:
                run.end_tool(tool, now)
                self._tool_ended(run)
            return
        with run.lock:
            # Its result is what the model is sent for the call (a tool node handling the
            # error answers it), known at its node's end or the next model call: held until then.
            run.recorded.add(tool.tool_call_id)
            if run.turn is not None and run.turn.running:
                run.hold(tool, error, now)
            else:
                run.end_tool(tool, now, error)
            self._tool_ended(run)

    def _tool_ended(self, run: _Run) -> None:
        """One of the open turn's tools ended: the last one lets the model calls waiting
        meanwhile have their turns. Under the run's lock."""
        if run.running:  # none when the run ended under it
            run.running -= 1
            self._next_turns(run)

    def _late_result(self, run_id: _RunId, output: Any) -> None:
        """The result of a tool answering a call of a turn that ended before it started, as
        an input of the turn open now (or the next): the model is sent it, if ever, only
        later. (One that raised is left to the tool node's answer, sent with the next call.)"""
        call = self._late.pop(run_id, None)
        run = self._unrecorded_tools.get(run_id)
        if call is None or run is None:
            return
        if type(output).__name__ == "Command":
            output = _command_message(output, call.id)
        content, is_error = _tool_output(output)
        result = ToolResultMessage(
            tool_call_id=call.id,
            tool_name=call.name,
            content=(TextContent(text=content),) if isinstance(content, str) else content,
            is_error=is_error,
            timestamp=self.core.agent.millis(),
        )
        with run.lock:
            loop = run.loop
            if loop is not None and loop.running and call.id not in run.recorded:
                run.recorded.add(call.id)  # not a new input again when a model call sends it
                loop.user(result)

    def _unrecorded_tool_end(self, run_id: _RunId) -> None:
        self._late.pop(run_id, None)  # one that raised: its answer comes with the next call
        run = self._unrecorded_tools.pop(run_id, None)
        if run is None:
            within = self._within.pop(run_id, None)
            run = None if within is None else within[1]
        if run is not None:
            run.children.discard(run_id)


def _thread(metadata: Mapping[str, Any] | None) -> str | None:
    thread = (metadata or {}).get("thread_id")
    return None if thread is None else str(thread)


def _tool_name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> str:
    name = kwargs.get("name") or (serialized or {}).get("name")
    return name if isinstance(name, str) and name else "tool"


class _Callbacks:
    """What both handlers share: each callback hands its event to the mapper, and a fault
    in the mapping is counted and reported once instead of reaching the run."""

    def __init__(self, sink: SinkArg = None, *, capture_requests: bool = False, **options: Any) -> None:
        self.core = AdapterCore("langchain", sink, capture_requests=capture_requests, **options)
        self._mapper = _Mapper(self.core)

    def close(self) -> None:
        """End the runs still open (as failed) and flush the sinks; with the default sink,
        save every session to the embedded store (also done at interpreter exit)."""
        self.core.close()

    def _call(self, method: Callable[..., None], run_id: UUID, *args: Any) -> None:
        """``method(*args, run id)``, its fault caught."""
        try:
            method(*args, run_id.int)
        except Exception as caught:
            self.core.fault(caught)

    def _chain_start(
        self, inputs: Any, run_id: UUID, parent_run_id: UUID | None, metadata: dict[str, Any] | None
    ) -> None:
        try:
            parent = None if parent_run_id is None else parent_run_id.int
            self._mapper.chain_start(inputs, run_id.int, parent, metadata)
        except Exception as caught:
            self.core.fault(caught)

    def _chat_model_start(
        self,
        messages: list[list[BaseMessage]],
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        try:
            self._mapper.chat_model_start(
                messages,
                run_id.int,
                None if parent_run_id is None else parent_run_id.int,
                metadata,
                kwargs.get("invocation_params"),
            )
        except Exception as caught:
            self.core.fault(caught)

    def _tool_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        kwargs: dict[str, Any],
    ) -> None:
        try:
            self._mapper.tool_start(
                _tool_name(serialized, kwargs),
                inputs,
                run_id.int,
                None if parent_run_id is None else parent_run_id.int,
                kwargs.get("tool_call_id"),
            )
        except Exception as caught:
            self.core.fault(caught)


class PhiCallbackHandler(_Callbacks, BaseCallbackHandler):
    """Records LangChain / LangGraph runs as phi-core sessions; put it in ``config["callbacks"]``.

    * `sink`: a sink or a list of sinks (see `phi_session.sinks`); by default the
      embedded store (`phi_session.stores.default_store`), each session saved as it
      completes.
    * `capture_requests`: also record each turn's ``TurnRequest`` (the messages sent
      to the model, system prompt, bound tools): off by default, as it repeats the
      whole history every turn.
    * `options`: the `AdapterCore`'s (``store``, ``agent``, ``clock``, ``rotate_after``,
      ``processors``, ``redact``).

    Adapter faults are counted in ``core.fault_count`` and logged once; `close` saves
    what is left.

    The session is a LangGraph run's ``configurable.thread_id``, or a plain chain's or
    model call's ``metadata={"thread_id": ...}`` (else this handler's own session).
    Use `AsyncPhiCallbackHandler` with ``ainvoke``/``astream`` if you prefer an async
    handler; this one also works there (it runs inline, never blocking).
    """

    run_inline = True
    raise_error = False

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._chain_start(inputs, run_id, parent_run_id, metadata)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._mapper.chain_end(outputs, run_id.int)
        except Exception as caught:
            self.core.fault(caught)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.chain_error, run_id, error)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._chat_model_start(messages, run_id, parent_run_id, metadata, kwargs)

    def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.new_token, run_id, token, chunk)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.llm_end, run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.llm_error, run_id, error)

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._tool_start(serialized, input_str if inputs is None else inputs, run_id, parent_run_id, kwargs)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.tool_end, run_id, output)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.tool_error, run_id, error)


class AsyncPhiCallbackHandler(_Callbacks, AsyncCallbackHandler):
    """The async twin of `PhiCallbackHandler` (same arguments, same recording)."""

    run_inline = True
    raise_error = False

    async def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._chain_start(inputs, run_id, parent_run_id, metadata)

    async def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._mapper.chain_end(outputs, run_id.int)
        except Exception as caught:
            self.core.fault(caught)

    async def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.chain_error, run_id, error)

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._chat_model_start(messages, run_id, parent_run_id, metadata, kwargs)

    async def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.new_token, run_id, token, chunk)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.llm_end, run_id, response)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.llm_error, run_id, error)

    async def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._tool_start(serialized, input_str if inputs is None else inputs, run_id, parent_run_id, kwargs)

    async def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.tool_end, run_id, output)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._call(self._mapper.tool_error, run_id, error)


# The replay model lives next to the adapter whose request converter it shares.
from .replay import ReplayChatModel  # noqa: E402
