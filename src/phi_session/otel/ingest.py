"""GenAI spans -> phi-core events -> a recorder.

`SpanIngestor` buffers spans per trace until the trace's root span has ended (or the
trace waited `trace_timeout` seconds, or the buffer is full, in spans or bytes: then what
arrived is recorded, its unfinished loops as Aborted; nothing is dropped), then replays the trace's
loops in start order as events. Spans of a trace that come after it was recorded (a
retried payload, an exporter sending batches concurrently), and newer versions of its
spans (the same span ids with other content: a session amended after its export), are
replayed with its recorded spans, its loops sent again whole.

* Our own export with content (``phi.events``): the exact stored events come back.
* Our own export without content, and other producers (the GenAI conventions,
  pydantic-ai, OpenInference): events are rebuilt from the spans, best effort. What is
  lost is listed in `LOSSES`; ids that had to be made up are listed in the loop's
  ``metadata["otel"]["synthesized"]``.

Sessions: ``phi.session.id``, else ``gen_ai.conversation.id``, else OpenInference's
``session.id``, read from the loop's span, else from the first of the loop's own spans
(under it, not under another loop's span; by start time, then span id) that has one (the
conventions put the conversation id on model calls too, and a web server's root standing
in for a loop has none), else one session per trace; for a part served under a remote
parent (a frontend or another agent calling this service), one per served root span. A
sub-agent named as the loop calling it (a called service's spans may carry its caller's
conversation, propagated) has a session of its own, as one naming none: its served
root's, for a called service. A loop sent again (spans of its trace coming after it was
recorded) keeps the session it was recorded in, even if a span coming later names
another: so a called service's loop naming its caller's conversation, exported before
the caller's spans, stays in that conversation, linked under the caller's loop, and no
loop of the conversation continues it (see `LOSSES`). An id of these no store takes as a
session id (or holding a ``.``) becomes its UUIDv5, as a framework's session id does in
the adapters (`session_id_for`); the original is the loop's
``metadata["otel"]["conversation_id"]``.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple, get_args

import msgspec
from opentelemetry.sdk.trace import SpanProcessor

from .._checks import check_callable, check_each, check_instance, check_seconds, check_type
from .._failures import FailureTally
from .._strict import clip_depth, strict_adds_nothing
from ..adapters import session_id_for
from ..codec import check_event_fields, check_recordable, decode_event, decode_record, escape_surrogates
from ..errors import DecodeError, InvalidArgument, SessionNotFound, StoreError
from ..events import (
    DEFAULT,
    INITIAL,
    AgentEnd,
    AgentEvent,
    AgentStart,
    CompactionEnded,
    CompactionStarted,
    ContinuationKind,
    InputRejected,
    LoopConfigSnapshot,
    MessageEnd,
    ParallelLoopEnd,
    ParallelLoopStart,
    ProgressMessage,
    PrunApplied,
    RevertApplied,
    ToolExecutionEnd,
    ToolExecutionStart,
    TurnEnd,
    TurnStart,
    TurnTrigger,
)
from ..messages import (
    ZERO_USAGE,
    AgentMessage,
    AssistantMessage,
    Content,
    StopReason,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResult,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from ..stores.base import SessionStore, stored_loop_starts
from . import attributes as attr
from .spans import SpanData, read_otlp, spans_from_sdk

__all__ = ["LOSSES", "IngestResult", "IngestSpanProcessor", "SpanIngestor", "ingest_otlp"]

LOSSES: dict[str, tuple[str, ...]] = {
    "phi-session export with capture_content=True": (
        "nothing in the loops; session-scoped ParallelLoopStart/End are rebuilt from the loops "
        "(their timestamps are the first member's start and the last member's end)",
        "a loop that never ended comes back Aborted with ended_at and error set",
        "Turn.request_payload, the copy of a turn's request a recorder with "
        "capture_turn_requests makes (the request stays whole in its TurnRequest event)",
    ),
    "phi-session export without content": (
        "messages, tool arguments and results, turn requests, streaming deltas",
        "loop metadata, session formation (FirstLoop), total_tokens (recomputed)",
        "progress texts, rejection reasons and revert summaries",
        "times outside what OTLP holds (1970 to 2554), clamped to it",
    ),
    "other producers (GenAI conventions, pydantic-ai, OpenInference)": (
        "streaming deltas; content unless the producer captured it (then text, reasoning and "
        "tool calls of outputs, the first turn's user inputs, tool arguments and results)",
        "continuation kinds are inferred: a later loop of the same conversation is Default, "
        "continuing its latest loop started before it (after a restart, the store's)",
        "content on the per-message events (gen_ai.user.message, gen_ai.choice...: conventions 1.28 "
        "to 1.36), and gen_ai.prompt/gen_ai.completion of the older content events that are not "
        "OpenAI's message format as JSON (as those conventions recommend)",
        "tool call ids are made up from span ids when missing (listed in metadata)",
        "tool calls of a loop without any chat span are one turn, made up (listed in metadata)",
        "a trace without an agent span (bare model calls) is one loop, its root standing in",
        "a called service's loop (under a remote parent) whose spans name its caller's "
        "conversation (propagated), when the caller exports here too: exported with or after "
        "the caller's spans, it has its served root's own session (<trace id>-<span id>), as "
        "any sub-agent named as its caller; exported before them, it is recorded in that "
        "conversation, and stays there once they come, linked under the caller's loop "
        "(Initial, parent_loop_id the caller's loop, no parent_spawn_ref); no later loop of "
        "the conversation continues it, but the store cannot tell it from the conversation's "
        "own loops: read after a restart, the caller's next loop may continue it",
        "a session named by a span of the loop that comes after the loop was recorded (the "
        "agent span's batch exported first, the model call naming the conversation later): a "
        "name arriving after its loop was recorded does not move it, the loop stays in the "
        "session it was recorded in (its trace's, when nothing named one), under its id",
        "a chat span inside another (one call traced by two instrumentations) is one turn: the "
        "outer span's, with what only the inner had",
    ),
}

logger = logging.getLogger("phi_session.otel.ingest")

# Who ran a model call, as each producer spells it (the conventions' names first).
_PROVIDER_NAMES = (
    attr.PROVIDER_NAME,
    attr.LEGACY_SYSTEM,
    attr.OPENINFERENCE_PROVIDER,
    attr.OPENINFERENCE_SYSTEM,
)

_AGENT_OPS = frozenset({"invoke_agent", "create_agent"})
_CHAT_OPS = frozenset({"chat", "text_completion", "generate_content"})
_STOP_REASONS = {
    "stop": "stop",
    "end_turn": "stop",
    "length": "length",
    "max_tokens": "length",
    "tool_call": "toolUse",
    "tool_calls": "toolUse",
    "tool_use": "toolUse",
    "error": "error",
    "content_filter": "guardRail",
}
_SPAN_EVENT_TYPES: dict[str, type] = {
    attr.EVENT_COMPACTION_STARTED: CompactionStarted,
    attr.EVENT_COMPACTION_ENDED: CompactionEnded,
    attr.EVENT_PRUN: PrunApplied,
    attr.EVENT_REVERT: RevertApplied,
    attr.EVENT_INPUT_REJECTED: InputRejected,
}
_LAST_U32 = 2**32 - 1  # phi-core's turn indices are u32
_LAST_U64 = 2**64 - 1  # and its counts u64
_MEMORY = 100_000  # parallel groups remembered, and loop starts (all sessions' together)
# Loops remembered per session, the latest started: a loop arriving after later ones (its
# batch retried) continues the latest started before it, most often among these.
_LOOPS_PER_SESSION = 16
_RECORDED_MEMORY = 100_000  # span ids of the last traces recorded (a retry comes soon); ~10 MB
_KEPT_MEMORY = 10_000  # spans of the last traces recorded, for a caller or callee exporting later
_KEPT_BYTES = 64 * 2**20  # and the memory they hold (`span_bytes`)
DEFAULT_MAX_BUFFERED_BYTES = 256 * 2**20
# What `span_bytes` counts besides the objects it walks (measured with tracemalloc of spans
# read from OTLP): a span's struct, ids, times and list of events, and its place where it
# waits; an event's struct, time and place in that list.
_SPAN_OVERHEAD = 480
_EVENT_OVERHEAD = 80
# A number's object where an attribute, an array or a kvlist holds it (an int of int64: 28 to
# 36 B); True, False and None are shared.
_NUMBER_BYTES: dict[type, int] = {
    float: sys.getsizeof(0.0),
    int: sys.getsizeof(2**40),
    bool: 0,
    type(None): 0,
}


class IngestResult(msgspec.Struct, frozen=True):
    """What one OTLP payload gave: spans accepted and spans rejected (with why)."""

    accepted: int
    rejected: int
    message: str = ""


def _role(span: SpanData) -> str | None:
    """``agent``, ``chat``, ``tool`` or None, from the conventions or OpenInference."""
    attributes = span.attributes
    operation = _text(attributes.get(attr.OPERATION_NAME))  # any AnyValue may come: a kvlist is no key
    kind = attributes.get(attr.OPENINFERENCE_SPAN_KIND)
    if operation in _AGENT_OPS or kind == "AGENT" or span.name.startswith("invoke_agent"):
        return "agent"
    if operation in _CHAT_OPS or kind == "LLM" or span.name.startswith("chat "):
        return "chat"
    if operation == attr.OP_EXECUTE_TOOL or kind == "TOOL" or span.name.startswith("execute_tool"):
        return "tool"
    return None


def _int(value: Any) -> int:
    # A u64 of ours past OTLP's int64 comes as its decimal text (20 digits at most: no longer
    # text is ours, and int() refuses text of thousands). A count past u64 (text any producer
    # may send, an SDK span's int) is none phi-core holds: absent, as a negative one.
    if isinstance(value, str) and len(value) <= 20 and value.isascii() and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _LAST_U64 else 0


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return escape_surrogates(value)  # an SDK span's text may come from undecodable bytes


def _usage(attributes: dict[str, Any]) -> Usage | None:
    if attr.PHI_USAGE in attributes:  # ours: counts past OTLP's int64, clamped in the others
        return _stored_usage(attributes[attr.PHI_USAGE])
    if not any(
        name in attributes
        for name in (
            attr.USAGE_INPUT_TOKENS,
            attr.USAGE_OUTPUT_TOKENS,
            attr.LEGACY_PROMPT_TOKENS,
            attr.OPENINFERENCE_PROMPT_TOKENS,
        )
    ):
        return None
    # Both count cached tokens inside the input tokens, and detail them apart.
    cache_read = _int(_first(attributes, attr.USAGE_CACHE_READ_TOKENS, attr.OPENINFERENCE_CACHE_READ_TOKENS))
    cache_write = _int(
        _first(attributes, attr.USAGE_CACHE_WRITE_TOKENS, attr.OPENINFERENCE_CACHE_WRITE_TOKENS)
    )
    total_input = _int(
        _first(
            attributes, attr.USAGE_INPUT_TOKENS, attr.LEGACY_PROMPT_TOKENS, attr.OPENINFERENCE_PROMPT_TOKENS
        )
    )
    output = _int(
        _first(
            attributes,
            attr.USAGE_OUTPUT_TOKENS,
            attr.LEGACY_COMPLETION_TOKENS,
            attr.OPENINFERENCE_COMPLETION_TOKENS,
        )
    )
    inputs = max(0, total_input - cache_read - cache_write)
    return Usage(
        input=inputs,
        output=output,
        reasoning=_int(_first(attributes, attr.USAGE_REASONING_TOKENS, attr.OPENINFERENCE_REASONING_TOKENS)),
        cache_read=cache_read,
        cache_write=cache_write,
        total_tokens=inputs + output + cache_read + cache_write,
    )


def _first(attributes: dict[str, Any], *names: str) -> Any:
    """The value of the first of `names` that is set (producers spell one thing several ways)."""
    for name in names:
        value = attributes.get(name)
        if value is not None:
            return value
    return None


def _openinference_messages(attributes: dict[str, Any], prefix: str) -> list[Any]:
    """OpenInference's flattened messages (``llm.output_messages.0.message.content``...) in the
    GenAI conventions' shape (``role`` and ``parts``)."""
    messages: dict[int, dict[str, Any]] = {}
    calls: dict[tuple[int, int], dict[str, Any]] = {}
    start = prefix + "."
    for key, value in attributes.items():
        if not key.startswith(start):
            continue
        index_text, _, rest = key[len(start) :].partition(".message.")
        if not index_text.isdigit():
            continue
        message = messages.setdefault(int(index_text), {"role": "", "parts": []})
        if rest == "role":
            message["role"] = value
        elif rest == "content" or (rest.startswith("contents.") and rest.endswith(".message_content.text")):
            message["parts"].append({"type": "text", "content": value})
        elif rest.startswith("tool_calls."):
            number, _, field = rest[len("tool_calls.") :].partition(".tool_call.")
            if number.isdigit():
                call = calls.setdefault((int(index_text), int(number)), {"type": "tool_call"})
                name = {"id": "id", "function.name": "name", "function.arguments": "arguments"}.get(field)
                if name is not None:
                    call[name] = _json(value) if name == "arguments" else value
    for (index, _), call in sorted(calls.items()):
        messages[index]["parts"].append(call)
    return [messages[index] for index in sorted(messages)]


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return msgspec.json.decode(value)
        except (msgspec.DecodeError, UnicodeEncodeError):  # lone surrogates: text, no JSON
            return value
    return value


def _parts(message: Any) -> list[Any]:
    parts = message.get("parts") if isinstance(message, dict) else None
    return [part for part in parts if isinstance(part, dict)] if isinstance(parts, list) else []


def _within_depth(arguments: Any, counters: dict[str, int]) -> Any:
    """Tool `arguments` decoded here (ours to change) with their containers nested deeper
    than phi-core reads inside a session as their JSON text (`clip_depth`), counted in
    ``clipped_arguments``: one such value would make the whole session unreadable."""
    if isinstance(arguments, (dict, list)) and clip_depth(arguments, msgspec.json.encode(arguments)):
        counters["clipped_arguments"] += 1
    return arguments


def _contents(message: Any, counters: dict[str, int]) -> tuple[Content, ...]:
    out: list[Content] = []
    for part in _parts(message):
        kind, content = part.get("type"), part.get("content")
        if kind == "text" and isinstance(content, str):
            out.append(TextContent(text=content))
        elif kind in ("reasoning", "thinking") and isinstance(content, str):
            out.append(ThinkingContent(thinking=content))
        elif kind == "tool_call":
            out.append(
                ToolCall(
                    id=str(part.get("id") or ""),
                    name=str(part.get("name") or ""),
                    arguments=_within_depth(part.get("arguments"), counters),
                )
            )
    return tuple(out)


def _messages(value: Any) -> list[Any]:
    decoded = _json(value)
    return decoded if isinstance(decoded, list) else []


def _openai_message(message: Any) -> Any:
    """A message in OpenAI's format (the older conventions' content events) in the conventions'
    shape: its text (a string, or text parts) and its tool calls as parts."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    parts: list[dict[str, Any]] = [
        {"type": "text", "content": part["text"]}
        for part in (content if isinstance(content, list) else [])
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    ]
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = _json(function.get("arguments"))
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": arguments,
                }
            )
    return {"role": message.get("role"), "parts": parts}


# Where each producer puts a model call's input or output messages: the conventions' attribute
# (on the span, or since 1.37 on its operation-details event), OpenInference's flattened
# attributes, and the older conventions' content event with its attribute.
_MESSAGE_SOURCES = {
    "input": (
        attr.INPUT_MESSAGES,
        attr.OPENINFERENCE_INPUT_MESSAGES,
        attr.EVENT_LEGACY_PROMPT,
        attr.LEGACY_PROMPT,
    ),
    "output": (
        attr.OUTPUT_MESSAGES,
        attr.OPENINFERENCE_OUTPUT_MESSAGES,
        attr.EVENT_LEGACY_COMPLETION,
        attr.LEGACY_COMPLETION,
    ),
}


def _span_messages(span: SpanData, direction: Literal["input", "output"]) -> list[Any] | None:
    """The ``input`` or ``output`` messages of a model call's `span` in the conventions' shape
    (``role`` and ``parts``), from the first source holding some; None when it has no source
    (the content was not captured)."""
    name, flattened, event_name, legacy = _MESSAGE_SOURCES[direction]
    found = None
    details = [e.attributes for e in span.events if e.name == attr.EVENT_OPERATION_DETAILS]
    for attributes in (span.attributes, *details):
        if name in attributes:
            found = _messages(attributes[name])
            if found:
                return found
    openinference = _openinference_messages(span.attributes, flattened)
    if openinference:
        return openinference
    for event in span.events:
        if event.name == event_name and legacy in event.attributes:
            return [_openai_message(message) for message in _messages(event.attributes[legacy])]
    return found


def _new_user_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The user messages at the end of a request's input (earlier ones are history)."""
    out: list[dict[str, Any]] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            break
        out.append(message)
    return out[::-1]


def _result_text(value: Any) -> str:
    decoded = _json(value)
    if isinstance(decoded, list) and all(isinstance(p, dict) for p in decoded):
        return "".join(str(p.get("content", "")) for p in decoded)
    return value if isinstance(value, str) else msgspec.json.encode(decoded).decode()


def span_bytes(span: SpanData) -> int:
    """About the memory `span` holds: what makes a span large (its texts, numbers, arrays,
    kvlists and events, each with what holds it) and a fixed overhead. Its resource is left
    out: the spans of a payload share one."""
    size = _SPAN_OVERHEAD + sys.getsizeof(span.name) + len(span.events) * _EVENT_OVERHEAD
    stack: list[Any] = [span.attributes]
    for event in span.events:
        size += sys.getsizeof(event.name)
        stack.append(event.attributes)
    while stack:
        value = stack.pop()
        if isinstance(value, (str, bytes)):
            size += sys.getsizeof(value)
        elif isinstance(value, dict):
            size += sys.getsizeof(value)
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, tuple):
            size += sys.getsizeof(value)
            if _NUMBER_BYTES.keys() >= set(map(type, value)):  # an array of numbers: summed, not walked
                size += sum(map(_NUMBER_BYTES.__getitem__, map(type, value)))
            else:
                stack.extend(value)
        else:
            size += _NUMBER_BYTES.get(type(value), 0)
    return size


class _Trace:
    __slots__ = ("bytes", "last_seen", "spans", "updates")

    def __init__(self, now: float) -> None:
        self.spans: dict[int, SpanData] = {}  # span id -> span, in arrival order
        self.bytes = 0  # `span_bytes` of its spans
        self.last_seen = now  # a long run's spans keep coming: it times out once they stop
        self.updates = False  # holds newer versions of spans recorded: joins them, even a root


class _Sent:
    """What the loops of a trace were given when recorded, for when they are sent again whole
    (the spans a later payload brings join them): the same places."""

    __slots__ = ("continued", "sessions")

    def __init__(self) -> None:
        self.continued: dict[str, str | None] = {}  # loop id -> the loop it continued
        # Loop span id -> its session. A span naming another session may come later: the loop
        # recorded stays where it is, under its id (a record elsewhere would leave this one behind).
        self.sessions: dict[int, _Naming] = {}

    def then(self, later: _Sent) -> _Sent:
        """These, with what `later` gave (the same loops sent again, or others)."""
        both = _Sent()
        both.continued = {**self.continued, **later.continued}
        both.sessions = {**self.sessions, **later.sessions}
        return both


class _Kept:
    """A trace's spans already recorded, kept a while (`trace_timeout`): another service's
    part of the trace may come later, calling them or called by them (a remote parent)."""

    __slots__ = ("at", "bytes", "sent", "spans")

    def __init__(self, at: float, spans: dict[int, SpanData], sent: _Sent) -> None:
        self.at = at
        self.spans = spans  # span id -> span
        self.sent = sent  # what its loops were given when recorded
        self.bytes = sum(map(span_bytes, spans.values()))


def _calls_between(kept: _Kept, trace: _Trace) -> bool:
    """Whether a span of one is the remote parent of a span of the other."""
    return any(span.remote_parent_id in kept.spans for span in trace.spans.values()) or any(
        span.remote_parent_id in trace.spans for span in kept.spans.values()
    )


def _joins(kept: _Kept, trace: _Trace) -> bool:
    """Whether `trace`'s spans belong with those recorded of it: newer versions of recorded
    ones, a call between the two, or late spans under a recorded one. (Not the other way
    round: a root that comes after its spans were recorded without it would rebuild them as
    another loop, billed twice.)"""
    return (
        trace.updates
        or _calls_between(kept, trace)
        or any(span.parent_id in kept.spans for span in trace.spans.values())
    )


def _caller_waiting(by_id: dict[int, SpanData]) -> bool:
    """Whether a trace's spans (`by_id`) hold spans of a caller besides those under remote
    parents (the spans of a service it called): then the caller exports here too, and the
    trace waits for the caller's root (its tool span links the service's agent as its
    sub-agent)."""
    for span in by_id.values():
        seen = {span.span_id}
        while span.parent_id in by_id and span.parent_id not in seen:
            seen.add(span.parent_id)
            span = by_id[span.parent_id]
        if span.remote_parent_id is None:
            return True
    return False


class SpanIngestor:
    """Turns finished spans into events for `target` (a recorder, or any event callable).

    * `trace_timeout`: seconds a trace whose root has not ended waits for its next span
      before it is recorded anyway (unfinished loops as Aborted); checked on every `add` and
      by `expire`. A span that comes later under one of its recorded spans records it again
      with the late spans, its loops sent again whole, as for a caller below; spans of our
      export cut off from their loop's span (a sub-agent's, still to come) are not recorded
      with the root, but wait for it likewise.
      A span under a remote parent (a service called with the trace context) is its
      trace's root here, recorded at once, unless spans of the caller already wait in the
      trace: then it waits with them for the caller's root, which links it as a sub-agent
      of the tool span that called it. Either side exporting later (within `trace_timeout`)
      is linked too: what was recorded of the trace is kept that long (at most
      ``_KEPT_MEMORY`` spans) and recorded again with it, its loops sent again whole, so
      that a recorder (or a store merging them) holds what one payload would have given.
    * `max_buffered_spans`, `max_buffered_bytes`: when more spans, or spans holding more
      bytes (`span_bytes`: a model call's messages may be megabytes), wait, the oldest
      traces are recorded early.

    A span taken twice (an exporter retrying a payload that was taken) counts once: its
    second copy is dropped, while it waits and for the last traces recorded. Sent again
    with other content, it is a newer version (a session amended after its export: a
    parallel group's end names its branches' group), counted in ``updated_spans``: it
    takes the place of the one waiting, or, for a span still kept (see above), its trace
    is recorded again with it, its loops sent again whole.

    A span event named as ours (compaction, prun, revert, rejection) that cannot be rebuilt
    as its event is logged and counted in ``unreadable_span_events``, not recorded. Tool
    arguments nested deeper than phi-core reads inside a session keep their deepest
    containers as JSON text, as in recording, counted in ``clipped_arguments``. A count
    past u64, which phi-core cannot hold, is read as absent (in a span event: unreadable).
    A loop's events reach `target` once it is rebuilt, each checked as a recorder checks
    it: a trace failing to record leaves no loop of it half recorded.

    A rebuilt loop continues (``Default``) its session's latest loop started before it,
    whatever order they arrive in: of those this ingestor remembers (recorded or read, the
    latest ``_LOOPS_PER_SESSION`` started of each session, ``_MEMORY`` all together), else,
    given `store` (where `target` saves: after a restart, memory knows no loop of the
    conversation), of those the store holds (one index read), read when memory knows none
    started before it: once per session the producer named (a session made up here, of a
    trace, is never read), again only for a loop started before every one memory kept of
    it. A store failing that read is logged; the loop is then ``Initial``.

    Thread-safe. `flush` records every waiting trace (call it at shutdown).
    """

    def __init__(
        self,
        target: Any,
        *,
        trace_timeout: float = 60.0,
        max_buffered_spans: int = 100_000,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        on_event = getattr(target, "on_event", None)
        self._emit: Callable[[AgentEvent], Any] = on_event if callable(on_event) else target
        if not callable(self._emit):
            raise TypeError(f"not an event target: {target!r}")
        trace_timeout = check_seconds("trace_timeout", trace_timeout, positive=True)
        for name, limit in (
            ("max_buffered_spans", max_buffered_spans),
            ("max_buffered_bytes", max_buffered_bytes),
        ):
            check_type(name, limit, int)
            if limit < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {limit}")
        check_type("store", store, SessionStore, optional=True)
        check_callable("clock", clock)
        self.store = store
        self.trace_timeout = trace_timeout
        self.max_buffered_spans = max_buffered_spans
        self.max_buffered_bytes = max_buffered_bytes
        self._clock = clock
        self._lock = threading.RLock()
        self._traces: OrderedDict[int, _Trace] = OrderedDict()
        self._buffered = 0
        self._buffered_bytes = 0
        self._recorded: OrderedDict[int, set[int]] = OrderedDict()  # trace -> span ids recorded
        self._recorded_spans = 0
        self._kept: OrderedDict[int, _Kept] = OrderedDict()  # trace -> its spans recorded lately
        self._kept_spans = 0
        self._kept_bytes = 0
        # Session -> its loops known (recorded, or stored), least recently used first.
        self._session_loops: OrderedDict[str, _SessionLoops] = OrderedDict()
        self._loops_known = 0  # their loops, all together
        self._groups: dict[tuple[str, ...], set[str]] = {}  # parallel group -> members replayed
        # Parallel group -> the end (ns) of its last ParallelLoopEnd emitted.
        self._ended_groups: OrderedDict[tuple[str, ...], int] = OrderedDict()
        # The parallel branches of the traces being recorded (`_ordered`): (loop id, start of
        # its loop span) -> its evaluation and its loop span's place in arrival order.
        self._branches: dict[tuple[str, int], tuple[_Evaluation, int]] = {}
        self._evaluations: list[_Evaluation] = []
        self._loop_events: deque[AgentEvent] = deque()  # taken by `emit`, not yet delivered
        self.counters = dict.fromkeys(
            (
                "spans",
                "duplicate_spans",
                "updated_spans",
                "traces",
                "incomplete_traces",
                "loops",
                "events",
                "unreadable_span_events",
                "clipped_arguments",
            ),
            0,
        )

    @property
    def buffered_spans(self) -> int:
        """Spans waiting for their trace's root."""
        return self._buffered

    @property
    def buffered_bytes(self) -> int:
        """The bytes (`span_bytes`) of the spans waiting for their trace's root."""
        return self._buffered_bytes

    def waiting(self, trace_ids: Iterable[int]) -> bool:
        """Whether any of `trace_ids` still waits for its root (is not recorded yet)."""
        with self._lock:
            return any(trace_id in self._traces for trace_id in trace_ids)

    def waiting_spans(self, trace_ids: Iterable[int]) -> tuple[int, int]:
        """How many spans of `trace_ids` wait for their roots, and their bytes (`span_bytes`)."""
        with self._lock:
            traces = [trace for trace in map(self._traces.get, trace_ids) if trace is not None]
            return sum(len(trace.spans) for trace in traces), sum(trace.bytes for trace in traces)

    def recorded_at_once(self, spans: list[SpanData]) -> set[int]:
        """The traces of `spans` that taking them (`add`) records at once: none of their
        spans waits, and those of them waiting wait no more."""
        with self._lock:
            payload: dict[int, dict[int, SpanData]] = {}
            for span in spans:
                payload.setdefault(span.trace_id, {})[span.span_id] = span

            def with_payload(trace_id: int) -> dict[int, SpanData]:
                trace = self._traces.get(trace_id)
                return payload[trace_id] if trace is None else {**trace.spans, **payload[trace_id]}

            def updates(span: SpanData) -> bool:
                trace = self._traces.get(span.trace_id)
                return (trace is None or span.span_id not in trace.spans) and self._newer_than_kept(span)

            return set(self._complete([(span, updates(span)) for span in spans], with_payload))

    def _complete(
        self, taken: list[tuple[SpanData, bool]], trace_spans: Callable[[int], dict[int, SpanData]]
    ) -> list[int]:
        """The traces that the spans `taken` (each with whether it is a newer version of one
        recorded) complete, in the order they did: the traces to record now. `trace_spans`
        gives a trace's spans, with those taken."""
        ready: dict[int, None] = {}
        served: dict[int, None] = {}  # traces where a span under a remote parent ended
        for span, updates in taken:
            if (
                updates  # recorded again at once with the rest of what was recorded
                or (span.parent_id is None and span.remote_parent_id is None)
                or self._under_recorded(span)  # its root was recorded already: it joins that
            ):
                ready[span.trace_id] = None
            elif span.parent_id is None:  # decided once all are in: the caller's spans may be there
                served[span.trace_id] = None
        for trace_id in served:
            if trace_id not in ready and not _caller_waiting(trace_spans(trace_id)):
                ready[trace_id] = None
        return list(ready)

    def add(self, spans: Iterable[SpanData]) -> None:
        """Take finished spans; record every trace that is now complete."""
        spans = check_each("spans", spans, SpanData, "SpanData")  # before any is taken
        with self._lock:
            now = self._clock()
            taken: list[tuple[SpanData, bool]] = []
            for span in spans:
                trace = self._traces.get(span.trace_id)
                waiting = trace.spans.get(span.span_id) if trace is not None else None
                updates = False  # a newer version of a span recorded
                if waiting is not None or span.span_id in self._recorded.get(span.trace_id, ()):
                    # Taken before: an exporter's retry, or a newer version (a session
                    # amended after its export sends the same span ids with more to say).
                    updates = waiting is None
                    if waiting == span or (updates and not self._newer_than_kept(span)):
                        self.counters["duplicate_spans"] += 1
                        continue
                    self.counters["updated_spans"] += 1
                else:
                    self.counters["spans"] += 1
                if trace is None:
                    trace = self._traces[span.trace_id] = _Trace(now)
                else:  # ordered by the last span seen: the oldest times out first
                    trace.last_seen = now
                    self._traces.move_to_end(span.trace_id)
                if waiting is None:
                    self._buffered += 1
                else:
                    self._wait_bytes(trace, -span_bytes(waiting))
                self._wait_bytes(trace, span_bytes(span))
                trace.spans[span.span_id] = span  # a newer version takes the waiting one's place
                trace.updates = trace.updates or updates
                taken.append((span, updates))
            self._record_each(
                self._complete(taken, lambda trace_id: self._traces[trace_id].spans), complete=True
            )
            self._expire(now)

    def _wait_bytes(self, trace: _Trace, size: int) -> None:
        """`size` more bytes wait in `trace` (fewer, negative)."""
        trace.bytes += size
        self._buffered_bytes += size

    def _under_recorded(self, span: SpanData) -> bool:
        kept = self._kept.get(span.trace_id)
        return kept is not None and span.parent_id in kept.spans

    def _newer_than_kept(self, span: SpanData) -> bool:
        """Whether `span`, recorded before, differs from the version kept: a newer one. One no
        longer kept cannot be told from a retry, and is taken for one."""
        kept = self._kept.get(span.trace_id)
        recorded = kept.spans.get(span.span_id) if kept is not None else None
        return recorded is not None and recorded != span

    def expire(self) -> int:
        """Record the traces that waited too long; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def flush(self) -> None:
        """Record every waiting trace now (unfinished loops as Aborted)."""
        with self._lock:
            self._record_each(list(self._traces), complete=False)

    def _expire(self, now: float) -> int:
        while self._kept and now - next(iter(self._kept.values())).at >= self.trace_timeout:
            self._forget_kept(next(iter(self._kept)))
        due, buffered, size = [], self._buffered, self._buffered_bytes
        for trace_id, trace in self._traces.items():
            if (
                now - trace.last_seen < self.trace_timeout
                and buffered <= self.max_buffered_spans
                and size <= self.max_buffered_bytes
            ):
                break  # ordered by the last span seen: the rest were seen later
            due.append(trace_id)
            buffered -= len(trace.spans)
            size -= trace.bytes
        self._record_each(due, complete=False)
        return len(due)

    def _record_each(self, trace_ids: list[int], *, complete: bool) -> None:
        """Record every one of `trace_ids`, then raise the first failure: a trace that failed is
        taken again when retried, but the others' spans would then be duplicates, left waiting."""
        failure: Exception | None = None
        for trace_id in self._ordered(trace_ids):
            try:
                self._record(trace_id, complete=complete)
            except Exception as error:
                self._discard()
                failure = failure or error
        try:  # the ends still held: of branches whose traces failed to record, and their siblings'
            for evaluation in self._evaluations:
                self._end_held(evaluation)
        except Exception as error:
            self._discard()
            failure = failure or error
        if failure is not None:
            raise failure

    def _ordered(self, trace_ids: list[int]) -> list[int]:
        """`trace_ids` in the order to record them, noting the parallel branches among them
        (`_branches`). As they came: loops are replayed as they ended, their session's order;
        but the traces of one parallel evaluation's branches together, at the first one's
        place, in start order, each branch's end held until the last has been replayed
        (`end_loop`): the first to start forms its session and starts the group, and they
        end in their session's order."""
        self._branches = {}
        self._evaluations = []
        # group -> (start, loop id, place in arrival order, index in trace_ids) of its branches' loop spans
        found: dict[tuple[str, ...], list[tuple[int, str, int, int]]] = {}
        arrival = 0
        for index, trace_id in enumerate(trace_ids):
            for span in self._traces[trace_id].spans.values():
                group = _group(span.attributes)
                loop_id = span.attributes.get(attr.PHI_LOOP_ID)
                if group is not None and loop_id in group:
                    found.setdefault(group, []).append((span.start, loop_id, arrival, index))
                arrival += 1
        if not found:
            return trace_ids
        place = list(range(len(trace_ids)))
        for branches in found.values():
            branches.sort()
            evaluations: list[list[tuple[int, str, int, int]]] = []
            for branch in branches:
                # A branch's id again: the group's next evaluation (one reusing its ids).
                if not evaluations or any(branch[1] == other[1] for other in evaluations[-1]):
                    evaluations.append([])
                evaluations[-1].append(branch)
            for members in evaluations:
                evaluation = _Evaluation(members[0][0], len(members))
                self._evaluations.append(evaluation)
                first = min(index for *_, index in members)
                for start, loop_id, position, index in members:
                    place[index] = min(place[index], first)
                    self._branches[loop_id, start] = (evaluation, position)
        starts = [min(span.start for span in self._traces[trace_id].spans.values()) for trace_id in trace_ids]
        return [trace_ids[i] for i in sorted(range(len(trace_ids)), key=lambda i: (place[i], starts[i]))]

    def _record(self, trace_id: int, *, complete: bool) -> None:
        trace = self._traces.pop(trace_id)
        self._buffered -= len(trace.spans)
        self._buffered_bytes -= trace.bytes
        self.counters["traces"] += 1
        if not complete:
            self.counters["incomplete_traces"] += 1
        kept = self._kept.get(trace_id)  # taken only once recorded, as the spans below
        joined = kept if kept is not None and _joins(kept, trace) else None
        # A newer version of a recorded span takes its place.
        spans = trace.spans if joined is None else {**joined.spans, **trace.spans}
        resent = _Sent() if joined is None else joined.sent
        sent, waiting = self._replay(
            trace_id, sorted(spans.values(), key=lambda s: (s.start, s.end)), complete, resent
        )
        self._forget_kept(trace_id)
        if kept is not None:  # joined or not, both parts may yet meet a later one
            spans = {**kept.spans, **trace.spans}
            sent = kept.sent.then(sent)
        if waiting:  # not recorded: they wait, as spans coming after the trace was recorded do
            again = self._traces[trace_id] = _Trace(trace.last_seen)
            again.spans = {span_id: spans[span_id] for span_id in waiting}
            self._buffered += len(waiting)
            self._wait_bytes(again, sum(map(span_bytes, again.spans.values())))
            spans = {span_id: span for span_id, span in spans.items() if span_id not in waiting}
        self._keep(trace_id, spans, sent)
        # Only once recorded: a payload whose recording failed is taken again when retried.
        recorded = self._recorded.pop(trace_id, set())
        taken = trace.spans.keys() - waiting
        self._recorded_spans += len(taken - recorded)
        recorded.update(taken)  # late spans of a recorded trace are recorded apart, then join
        self._recorded[trace_id] = recorded
        while self._recorded_spans > _RECORDED_MEMORY:
            self._recorded_spans -= len(self._recorded.popitem(last=False)[1])

    def _keep(self, trace_id: int, spans: dict[int, SpanData], sent: _Sent) -> None:
        kept = self._kept[trace_id] = _Kept(self._clock(), spans, sent)
        self._kept_spans += len(spans)
        self._kept_bytes += kept.bytes
        while self._kept_spans > _KEPT_MEMORY or self._kept_bytes > _KEPT_BYTES:
            self._forget_kept(next(iter(self._kept)))

    def _forget_kept(self, trace_id: int) -> None:
        kept = self._kept.pop(trace_id, None)
        if kept is not None:
            self._kept_spans -= len(kept.spans)
            self._kept_bytes -= kept.bytes

    def _replay(
        self, trace_id: int, spans: list[SpanData], complete: bool, resent: _Sent
    ) -> tuple[_Sent, set[int]]:
        """Replay `spans`; returns what its loops were given (our own export, replayed
        exactly, continued None: its events say), and the ids of the spans left waiting (ours
        cut off from their loop's span, in a trace whose root came: that span is still to
        come). `resent` is what the loops recorded before were given; they are sent again."""
        if any(attr.PHI_EVENTS in span.attributes for span in spans):
            try:
                exact = _ExactReplay(self, spans, complete)
            except DecodeError as error:  # not our export after all, or damaged: best effort
                logger.warning(
                    "trace %032x: unreadable %s (%s); rebuilt from its spans",
                    trace_id,
                    attr.PHI_EVENTS,
                    error,
                )
            else:
                exact.run(resent.continued)
                sent = _Sent()
                sent.continued = dict.fromkeys(exact.loop_ids)
                return sent, exact.waiting
        rebuild = _Rebuild(self, trace_id, spans, complete, resent)
        rebuild.run()
        return rebuild.sent, set()

    # -- helpers for the replays ------------------------------------------------------------

    def emit(self, event: AgentEvent) -> None:
        """Take an event of the loop being replayed: refused now if the recorder would refuse
        it, handed to the target with the rest of its loop (`_deliver`), so that a loop failing
        midway leaves none of its events there (a loop saved Aborted without its turns)."""
        check_event_fields(event)
        self._loop_events.append(event)

    def _deliver(self) -> None:
        """Hand the events taken to the target; one it fails on is left to `_discard`."""
        events = self._loop_events
        while events:
            self._emit(events[0])
            events.popleft()
            self.counters["events"] += 1

    def _discard(self) -> None:
        """Drop the events of a loop that failed to record (taken again when retried): a
        parallel group it started is started again then."""
        for event in self._loop_events:
            if type(event) is ParallelLoopStart:
                self._groups.pop(event.loop_ids, None)
        self._loop_events.clear()

    def latest_loop(self, session_id: str, loop_id: str, start: int, *, stored: bool = True) -> str | None:
        """The loop `loop_id` of `session_id`, starting at `start` (ns), continues: its session's
        latest loop started before it, other than itself; from memory, else, for a session
        that may be `stored` (named by the producer: after a restart memory knows none of its
        loops, or only later ones), from `store`. That is read once per session (an index
        read under the lock, on the path of every trace), and again only for a loop started
        before every one memory kept of it."""
        known = self._session_loops.get(session_id)
        latest = known.latest_before(loop_id, start) if known is not None else None
        if latest is not None or self.store is None or not stored:
            return latest
        if known is not None and known.read and (known.first_let_go is None or start < known.first_let_go):
            return None  # what the store had of it is here: none started before this one
        loops = _stored_loop_starts(self.store, session_id)
        if loops is None:
            return None
        self._learn(session_id, loops).read = True  # for the loops to come
        before = [(at, stored_id) for stored_id, at in loops if stored_id != loop_id and at <= start]
        return max(before)[1] if before else None

    def loop_recorded(self, session_id: str, loop_id: str, start: int) -> None:
        """Remember `loop_id`, started at `start` (ns), among its session's loops once its
        AgentEnd is taken: a loop whose recording failed is none to continue (retried, it
        would continue its successor)."""
        self.counters["loops"] += 1
        self._learn(session_id, [(loop_id, start)])

    def loop_called(self, session_id: str, loop_id: str) -> None:
        """`loop_id` was called by another loop of its session `session_id`: no loop of the
        session continues it. A loop recorded before the loop calling it came (a called
        service's part exported before its caller's spans) keeps the session it was recorded
        in, which may be its caller's (the conversation both name)."""
        known = self._session_loops.get(session_id)
        if known is not None:
            self._loops_known -= known.forget(loop_id)

    def _learn(self, session_id: str, loops: list[tuple[str, int]]) -> _SessionLoops:
        """Remember `loops` (id, start) of `session_id`, within `_MEMORY` all together."""
        known = self._session_loops.pop(session_id, None) or _SessionLoops()
        self._session_loops[session_id] = known  # the most recently used, forgotten last
        self._loops_known -= len(known.starts)
        for loop_id, start in loops:
            known.add(loop_id, start)
        self._loops_known += len(known.starts)
        while self._loops_known > _MEMORY:
            self._loops_known -= len(self._session_loops.popitem(last=False)[1].starts)
        return known

    def start_loop(self, session_id: str, loop_id: str, span: SpanData) -> None:
        """Before the AgentStart of `loop_id` (`span`: its loop span): ParallelLoopStart before
        a group's first member, at the first start of its branches recorded with it. Called
        for loops sent again too: one whose first version had no group (exported before the
        group ended) brings it then; a group ended (`end_loop`) is not started again, unless
        by a member starting after that end: a second evaluation, reusing its branches' ids."""
        group = _group(span.attributes)
        if group is None or loop_id not in group:
            return
        ended = self._ended_groups.get(group)
        if (ended is None or span.start >= ended) and group not in self._groups:
            self._groups[group] = set()
            branch = self._branches.get((loop_id, span.start))
            start = span.start if branch is None else branch[0].start
            self.emit(ParallelLoopStart(session_id=session_id, loop_ids=group, timestamp=_timestamp(start)))

    def end_loop(
        self, session_id: str, loop_id: str, span: SpanData, ending: list[AgentEvent], recorded: bool
    ) -> None:
        """Emit `ending` (the AgentEnd of `loop_id`, and any event after it), remember the loop
        as its session's latest if `recorded` (not sent again), and end its parallel group
        after its last member. A branch waits for the other branches recorded with it (see
        `_ordered`)."""
        branch = self._branches.get((loop_id, span.start))
        if branch is None:
            self._end_loop(session_id, loop_id, span, ending, recorded)
            return
        for event in ending:  # held: refused now, with the rest of its loop
            check_event_fields(event)
        self._deliver()
        evaluation, position = branch
        evaluation.held.append((position, session_id, loop_id, span, ending, recorded))
        if len(evaluation.held) == evaluation.size:
            self._end_held(evaluation)

    def _end_held(self, evaluation: _Evaluation) -> None:
        held = sorted(evaluation.held, key=lambda item: item[0])
        evaluation.held.clear()
        for _, session_id, loop_id, span, ending, recorded in held:
            self._end_loop(session_id, loop_id, span, ending, recorded)

    def _end_loop(
        self, session_id: str, loop_id: str, span: SpanData, ending: list[AgentEvent], recorded: bool
    ) -> None:
        for event in ending:
            self.emit(event)
        self._deliver()
        if recorded:
            self.loop_recorded(session_id, loop_id, span.start)
        group = _group(span.attributes)
        members = self._groups.get(group) if group is not None else None
        if members is None or group is None:
            return
        members.add(loop_id)
        if len(members) < len(set(group)):
            return
        del self._groups[group]
        self._ended_groups.pop(group, None)  # the latest evaluation's end, forgotten last
        self._ended_groups[group] = span.end
        if len(self._ended_groups) > _MEMORY:
            self._ended_groups.popitem(last=False)
        attributes = span.attributes
        self.emit(
            ParallelLoopEnd(
                session_id=session_id,
                selected_loop_id=str(attributes.get(attr.PHI_PARALLEL_SELECTED_LOOP, "")),
                selected_config_index=_int(attributes.get(attr.PHI_PARALLEL_CONFIG_INDEX)),
                evaluation_usage=_stored_usage(attributes.get(attr.PHI_PARALLEL_EVALUATION_USAGE)),
                timestamp=_timestamp(span.end),
            )
        )
        self._deliver()


def _stored_loop_starts(store: SessionStore, session_id: str) -> list[tuple[str, int]] | None:
    """The id and start of each loop of `session_id` in `store` (`stored_loop_starts`, as an
    adapter goes on after them); none when it is not there; None when the store fails
    (logged)."""
    try:
        return stored_loop_starts(store, session_id, 0)
    except SessionNotFound:
        return []
    except StoreError as error:
        logger.warning(
            "session %r could not be read from the store (%s): its next loop is recorded "
            "Initial, not continuing the loops stored",
            session_id,
            error,
        )
        return None


class _SessionLoops:
    """The loops of one session an ingestor knows, for the loops to come to continue: the
    latest `_LOOPS_PER_SESSION` started."""

    __slots__ = ("first_let_go", "read", "starts")

    def __init__(self) -> None:
        self.starts: list[tuple[int, str]] = []  # (start in ns, loop id), in start order
        self.read = False  # the store's were read, and added
        self.first_let_go: int | None = None  # the earliest start of those let go

    def latest_before(self, loop_id: str, start: int) -> str | None:
        """The latest started at or before `start` other than `loop_id`, if remembered."""
        return next((known for at, known in reversed(self.starts) if at <= start and known != loop_id), None)

    def forget(self, loop_id: str) -> int:
        """Let `loop_id` go; how many were let go."""
        kept = [known for known in self.starts if known[1] != loop_id]
        forgotten, self.starts = len(self.starts) - len(kept), kept
        return forgotten

    def add(self, loop_id: str, start: int) -> None:
        if (start, loop_id) not in self.starts:  # one sent again, or read from the store too
            bisect.insort(self.starts, (start, loop_id))
            if len(self.starts) > _LOOPS_PER_SESSION:
                at, _ = self.starts.pop(0)
                self.first_let_go = at if self.first_let_go is None else min(self.first_let_go, at)


class _Evaluation:
    """The branches of one evaluation of a parallel group among the traces being recorded."""

    __slots__ = ("held", "size", "start")

    def __init__(self, start: int, size: int) -> None:
        self.start = start  # its first branch's start (ns)
        self.size = size  # its branches
        # The ends of its branches replayed: (place, session id, loop id, loop span, events, recorded)
        self.held: list[tuple[int, str, str, SpanData, list[AgentEvent], bool]] = []


def _group(attributes: dict[str, Any]) -> tuple[str, ...] | None:
    """The loop ids of the parallel group we exported, None when missing or not ours."""
    group = attributes.get(attr.PHI_PARALLEL_LOOP_IDS)
    if isinstance(group, tuple) and all(isinstance(member, str) for member in group):
        return group
    return None


def _turn_replies(value: Any, usage: Usage) -> list[AssistantMessage] | None:
    """The replies of a turn of several calls our export listed (`attr.PHI_TURN_REPLIES`),
    without content; None unless it is ours (two replies or more, each as phi-core holds
    it) and they add up to the turn's `usage`."""
    if not isinstance(value, str):
        return None
    try:
        listed = msgspec.json.decode(value, type=list[tuple[str, str, str, int, str]])
    except msgspec.DecodeError:
        return None
    replies = [
        AssistantMessage(
            content=(),
            stop_reason=msgspec.convert(stop, StopReason),
            model=model,
            provider=provider,
            usage=_stored_usage(counts),
            timestamp=timestamp,
        )
        for provider, model, stop, timestamp, counts in listed
        if 0 <= timestamp <= _LAST_U64 and stop in get_args(StopReason)
    ]
    if len(replies) != len(listed) or len(replies) < 2:
        return None
    return replies if sum((reply.usage for reply in replies), ZERO_USAGE) == usage else None


def _stored_usage(value: Any) -> Usage:
    """A usage we exported as phi-core JSON; zero when it is missing or not ours (a count
    past u64, which phi-core cannot hold, is not)."""
    if isinstance(value, str):
        try:
            usage = decode_record(value, Usage)
            check_recordable("usage", usage)
            return usage
        except (DecodeError, InvalidArgument):
            pass
    return ZERO_USAGE


def _fields(kind: type) -> tuple[str, ...]:
    fields: tuple[str, ...] = getattr(kind, "__struct_fields__", ())
    return fields


def _timestamp(ns: int) -> Any:
    from .._time import Timestamp

    return Timestamp.from_ns(ns)


def _abort(loop_id: str, end: int, why: str, usage: Usage = ZERO_USAGE) -> AgentEnd:
    return AgentEnd(loop_id=loop_id, messages=(), usage=usage, timestamp=_timestamp(end), error=why)


_UNFINISHED = "the loop's trace ended (or timed out) before the loop did"


class _StoredRecord:
    """One loop record of our export: its invoke_agent span (else its earliest), its stored
    events and the last end of its spans."""

    __slots__ = ("end", "events", "loop_id", "span", "span_ids")

    def __init__(self, loop_id: str, span: SpanData) -> None:
        self.loop_id = loop_id
        self.span = span
        self.end = span.end
        self.events: list[tuple[int, AgentEvent]] = []
        self.span_ids: list[int] = []


def _record_span(span: SpanData, loop_id: str, by_id: dict[int, SpanData]) -> int | None:
    """The id of the invoke_agent span of `span`'s loop record (itself or an ancestor of its
    loop id; our export nests a loop's spans at most two deep), None if it is not here."""
    for _ in range(3):
        if span.attributes.get(attr.OPERATION_NAME) == attr.OP_INVOKE_AGENT:
            return span.span_id
        parent = by_id.get(span.parent_id) if span.parent_id is not None else None
        if parent is None or parent.attributes.get(attr.PHI_LOOP_ID) != loop_id:
            return None
        span = parent
    return None


class _ExactReplay:
    """Our own export with content: the stored events, loop record by loop record in start
    order (a loop id used again, by a compaction pass or a second parallel evaluation, has a
    record, and an invoke_agent span, for each use)."""

    def __init__(self, ingestor: SpanIngestor, spans: list[SpanData], complete: bool) -> None:
        """Decode every stored event first: raises `DecodeError` before anything is recorded.

        `complete`: the trace's root came; then spans cut off from a loop whose span is not
        here wait for it (`waiting`) rather than being replayed without their AgentStart."""
        self.ingestor = ingestor
        self.waiting: set[int] = set()
        by_id = {span.span_id: span for span in spans}
        # (loop id, its record's invoke_agent span id, None for spans cut off from it) -> record
        self.records: dict[tuple[str, int | None], _StoredRecord] = {}
        for span in spans:
            loop_id = span.attributes.get(attr.PHI_LOOP_ID)
            stored = span.attributes.get(attr.PHI_EVENTS)
            if stored is None:
                continue
            items = _json(stored)
            if not isinstance(loop_id, str) or not isinstance(items, list):
                raise DecodeError(
                    f"{attr.PHI_EVENTS} of span {span.span_id:016x}: expected a JSON array "
                    f"and a {attr.PHI_LOOP_ID}"
                )
            key = (loop_id, _record_span(span, loop_id, by_id))
            record = self.records.get(key)
            if record is None:
                record = self.records[key] = _StoredRecord(loop_id, span)
            elif key[1] == span.span_id:
                record.span = span
            record.end = max(record.end, span.end)
            record.span_ids.append(span.span_id)
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)):
                    raise DecodeError(
                        f"{attr.PHI_EVENTS} of span {span.span_id:016x}: expected [sequence, event] pairs"
                    )
                # Encoded here from what was parsed: the second, strict parse finds
                # something only in the rare events that `strict_adds_nothing` points out.
                data = msgspec.json.encode(item[1])
                record.events.append((item[0], decode_event(data, strict=not strict_adds_nothing(data))))
        self._join_cut_off(complete)

    def _join_cut_off(self, complete: bool) -> None:
        """Spans cut off from their record's invoke_agent span (a parent missing) join their
        loop id's first record, if it is here: records of an id are in start order. Else,
        in a `complete` trace, they wait for it."""
        first: dict[str, _StoredRecord] = {}
        for (loop_id, span_id), record in self.records.items():
            if span_id is not None:
                first.setdefault(loop_id, record)
        for key in [key for key in self.records if key[1] is None and (complete or key[0] in first)]:
            cut_off = self.records.pop(key)
            joins = first.get(key[0])
            if joins is None:
                self.waiting.update(cut_off.span_ids)
                continue
            joins.events += cut_off.events
            joins.end = max(joins.end, cut_off.end)

    @property
    def loop_ids(self) -> list[str]:
        return [record.loop_id for record in self.records.values()]

    def run(self, resent: dict[str, str | None]) -> None:
        for record in sorted(self.records.values(), key=lambda record: record.span.start):
            loop_id, loop = record.loop_id, record.span
            session_id = str(loop.attributes.get(attr.PHI_SESSION_ID, ""))
            again = loop_id in resent  # sent again whole: no session's latest loop
            self.ingestor.start_loop(session_id, loop_id, loop)
            events = [event for _, event in sorted(record.events, key=lambda item: item[0])]
            end = next((i for i, event in enumerate(events) if type(event) is AgentEnd), len(events))
            for event in events[:end]:
                self.ingestor.emit(event)
            ending = events[end:]
            if not ending:
                # What keeps the loop's billing (its replayed turns' usage too); an export
                # without it (before phi.loop.usage) has the billed usage only.
                stored = loop.attributes.get(attr.PHI_LOOP_USAGE)
                usage = _stored_usage(stored) if stored is not None else _usage(loop.attributes) or ZERO_USAGE
                ending = [_abort(loop_id, record.end, _UNFINISHED, usage)]
            self.ingestor.end_loop(session_id, loop_id, loop, ending, not again)


class _Loop:
    __slots__ = (
        "agent",
        "chats",
        "conversation_id",
        "given",
        "loop_id",
        "parent_loop",
        "session_id",
        "stand_in",
        "synthesized",
        "tools",
    )

    def __init__(self, agent: SpanData, loop_id: str, naming: _Naming) -> None:
        self.agent = agent
        self.stand_in = _role(agent) != "agent"  # no agent span: the trace's root stands in
        self.loop_id = loop_id
        self.session_id, self.conversation_id, self.given = naming
        self.chats: list[SpanData] = []
        self.tools: list[SpanData] = []
        self.parent_loop: str | None = None
        self.synthesized: list[str] = []


class _Naming(NamedTuple):
    """A loop's session."""

    session_id: str
    # The producer's session or conversation id, when no store takes it as a session id.
    conversation_id: str | None
    # Whether the producer named it: not one made up here (a trace's, a served part's, a
    # sub-agent's), which no loop recorded before this ingestor started can be in.
    given: bool


_SESSION_NAMES = (attr.PHI_SESSION_ID, attr.CONVERSATION_ID, attr.OPENINFERENCE_SESSION_ID)  # first set wins


def _names_session(span: SpanData) -> bool:
    return any(_text(span.attributes.get(name)) is not None for name in _SESSION_NAMES)


def _parent(span: SpanData) -> int | None:
    return span.parent_id if span.remote_parent_id is None else span.remote_parent_id


class _Rebuild:
    """Events rebuilt from span attributes (our export without content, or another producer)."""

    def __init__(
        self,
        ingestor: SpanIngestor,
        trace_id: int,
        spans: list[SpanData],
        complete: bool,
        resent: _Sent,
    ) -> None:
        self.ingestor = ingestor
        self.resent = resent  # what the loops recorded before, sent again, were given then
        self.sent = _Sent()  # what every loop is given
        self.complete = complete
        self.trace_hex = f"{trace_id:032x}"
        self.spans = spans
        self.by_id = {span.span_id: span for span in spans}
        self.loops: dict[int, _Loop] = {}  # agent span id -> loop
        self.child_loops: dict[int, str] = {}  # tool span id -> the loop it spawned
        self.named_by: dict[int, SpanData] = {}  # loop span id -> the span naming its session

    def run(self) -> None:
        agents = [span for span in self.spans if _role(span) == "agent"]
        if not agents:
            if not any(_role(span) in ("chat", "tool") for span in self.spans):
                return  # no GenAI span in this trace: nothing to record
            root = next((s for s in self.spans if s.parent_id not in self.by_id), self.spans[0])
            agents = [root]
        self.named_by = self._spans_naming_sessions(agents)
        for agent in agents:
            self._open_loop(agent)
        for span in self.spans:
            role = _role(span)
            stand_in = span.span_id in self.loops and self.loops[span.span_id].stand_in
            outer = self._outer_chat(span) if role == "chat" else None
            if outer is not None:
                # The same model call traced twice (a framework's instrumentation around an
                # SDK's): one turn, billed once; the outer span learns what only the inner knew.
                for key, value in span.attributes.items():
                    outer.attributes.setdefault(key, value)
                continue
            if role in ("chat", "tool") and (span.span_id not in self.loops or stand_in):
                owner = self._owner(span)
                if owner is not None:
                    (owner.chats if role == "chat" else owner.tools).append(span)
        for loop in self.loops.values():
            self._replay(loop)

    def _ancestors(self, span: SpanData) -> Iterable[SpanData]:
        """Up to the trace's root, through remote parents present here (a called service's
        root under the caller's span)."""
        seen: set[int] = set()
        parent = _parent(span)
        while parent is not None and parent in self.by_id and parent not in seen:
            seen.add(parent)
            span = self.by_id[parent]
            yield span
            parent = _parent(span)

    def _outer_chat(self, span: SpanData) -> SpanData | None:
        """The outermost chat span `span` is nested in, within its loop."""
        outer = None
        for ancestor in self._ancestors(span):
            if _role(ancestor) == "chat":
                outer = ancestor
            if ancestor.span_id in self.loops:
                break
        return outer

    def _owner(self, span: SpanData) -> _Loop | None:
        for ancestor in self._ancestors(span):
            if ancestor.span_id in self.loops:
                return self.loops[ancestor.span_id]
        return next(iter(self.loops.values()), None)  # a stray span joins the trace's first loop

    def _spans_naming_sessions(self, loop_spans: list[SpanData]) -> dict[int, SpanData]:
        """Each loop's span id -> the span its session is named by: the loop's span if it names
        one, else the first of the loop's own spans (under it, not under another loop's) that
        does, by start time, then span id. The conventions ask for ``gen_ai.conversation.id``
        on model calls too, and OpenInference sets ``session.id`` on the spans made within
        ``using_session``: a loop span lacking it (a web server's root standing in) would make
        one conversation a session per trace."""
        ids = {span.span_id for span in loop_spans}
        named = {span.span_id: span for span in loop_spans if _names_session(span)}
        candidates = (span for span in self.spans if span.span_id not in ids and _names_session(span))
        for span in sorted(candidates, key=lambda span: (span.start, span.span_id)):
            owner = next((a.span_id for a in self._ancestors(span) if a.span_id in ids), None)
            if owner is not None:
                named.setdefault(owner, span)
        return named

    def _open_loop(self, agent: SpanData) -> None:
        attributes = agent.attributes
        parent: _Loop | None = None
        tool: SpanData | None = None
        served = agent if agent.remote_parent_id is not None else None  # the root of a called service
        for ancestor in self._ancestors(agent):
            if ancestor.span_id in self.loops:
                parent = self.loops[ancestor.span_id]
                break
            if tool is None and _role(ancestor) == "tool":
                tool = ancestor
            if served is None and ancestor.remote_parent_id is not None:
                served = ancestor
        naming = self.resent.sessions.get(agent.span_id) or self._session(agent, parent, served)
        self.sent.sessions[agent.span_id] = naming
        loop_id = _text(attributes.get(attr.PHI_LOOP_ID))
        loop = _Loop(agent, loop_id or f"{naming.session_id}.otel.{agent.span_id:016x}", naming)
        if loop_id is None:
            loop.synthesized.append("loop_id")
        if parent is not None:
            loop.parent_loop = parent.loop_id
            if tool is not None:
                self.child_loops[tool.span_id] = loop.loop_id
            if parent.session_id == loop.session_id:
                # Recorded before its caller came, it kept its session, its caller's (else
                # `_session` gives one of its own): its caller's next loop must not continue it.
                self.ingestor.loop_called(loop.session_id, loop.loop_id)
        self.loops[agent.span_id] = loop

    def _session(self, agent: SpanData, parent: _Loop | None, served: SpanData | None) -> _Naming:
        """The session of the loop of `agent` (under `parent`, within the part `served`
        under a remote parent, if any)."""
        named = self.named_by.get(agent.span_id, agent).attributes
        given = next(filter(None, (_text(named.get(name)) for name in _SESSION_NAMES)), None)
        # One no store takes (ours too: a producer may set phi.session.id), as the adapters a
        # framework's: its UUIDv5, the original kept in the loop's metadata.
        session_id = session_id_for(given) if given is not None else None
        renamed = given if session_id != given else None
        if served is not None and (
            session_id is None or (parent is not None and session_id == parent.session_id)
        ):
            # Served to a caller in another process: a session of its own, named alike whether
            # the caller's spans are here or come later (then its loops are sent again, linked),
            # but for one naming its caller's conversation: recorded before its caller came, it
            # stays in that conversation (`_Sent.sessions`).
            made_up = session_id_for(f"{self.trace_hex}-{served.span_id:016x}")
        elif parent is not None and (session_id is None or session_id == parent.session_id):
            # A sub-agent has its own session.
            made_up = session_id_for(f"{parent.session_id}-{agent.span_id:016x}")
        elif session_id is None:
            made_up = self.trace_hex
        else:
            return _Naming(session_id, renamed, given=True)
        return _Naming(made_up, renamed, given=False)

    def _replay(self, loop: _Loop) -> None:
        agent, emit = loop.agent, self.ingestor.emit
        attributes = agent.attributes
        again = loop.loop_id in self.resent.continued  # it continues what it did, and is no session's latest
        previous = (
            self.resent.continued[loop.loop_id]
            if again
            else self.ingestor.latest_loop(loop.session_id, loop.loop_id, agent.start, stored=loop.given)
        )
        self.sent.continued[loop.loop_id] = previous
        kind, parent = self._continuation(loop, previous)
        config = self._config(loop)
        named = agent.name.removeprefix(attr.OP_INVOKE_AGENT).strip() if _role(agent) == "agent" else ""
        given = _first(attributes, attr.AGENT_ID, attr.AGENT_NAME, attr.OPENINFERENCE_AGENT_NAME)
        agent_id = _text(given) or named
        if not agent_id:
            # Made up: a store merges such a record with its loop's of any agent (a chat span
            # standing in for the loop span of our export, which comes later with the agent).
            loop.synthesized.append("agent_id")
            agent_id = _text(agent.resource.get("service.name")) or "otel"
        metadata = None
        if attr.PHI_LOOP_ID not in attributes or loop.synthesized:
            metadata = {
                "otel": {
                    "trace_id": self.trace_hex,
                    "span_id": f"{agent.span_id:016x}",
                    "synthesized": loop.synthesized,
                }
            }
            if loop.conversation_id is not None:
                metadata["otel"]["conversation_id"] = loop.conversation_id
            missing = _parent([agent, *self._ancestors(agent)][-1])
            if missing is not None:  # a parent that never came (a remote caller's): kept
                metadata["otel"]["parent_span_id"] = f"{missing:016x}"
        self.ingestor.start_loop(loop.session_id, loop.loop_id, agent)
        emit(
            AgentStart(
                agent_id=agent_id,
                session_id=loop.session_id,
                loop_id=loop.loop_id,
                parent_loop_id=parent,
                continuation_kind=kind,
                timestamp=_timestamp(agent.start),
                metadata=metadata,
                config_snapshot=config,
            )
        )
        turns = self._turns(loop)
        # The loop span's events happened between turns: each goes before the first turn after it.
        between = self._span_events(loop, agent)
        messages: list[AgentMessage] = []
        for position, (chat, tools) in enumerate(turns):
            self._emit_until(between, chat.start)
            messages.extend(self._turn(loop, position, chat, tools, config))
        self._emit_until(between, None)
        captured = any(_span_messages(chat, "output") is not None for chat, _ in turns)
        # A span standing in for the loop is one of its turns: its usage is that turn's.
        usage = None if loop.stand_in else _usage(attributes)
        if usage is None:
            usage = ZERO_USAGE
            for chat, _ in turns:
                usage = usage + (_usage(chat.attributes) or ZERO_USAGE)
        status = attributes.get(attr.PHI_LOOP_STATUS)
        rejection = (
            next(
                (
                    str(e.attributes.get("phi.reason", ""))
                    for e in agent.events
                    if e.name == attr.EVENT_INPUT_REJECTED
                ),
                "",
            )
            if status == "Rejected"
            else None
        )
        error: str | msgspec.UnsetType = msgspec.UNSET
        if agent.error or status == "Aborted":
            error = agent.status_message or str(attributes.get(attr.ERROR_TYPE) or "error")
        elif loop.stand_in and not self.complete:
            error = _UNFINISHED
        ending = AgentEnd(
            loop_id=loop.loop_id,
            messages=tuple(messages) if captured else (),
            usage=usage,
            timestamp=_timestamp(agent.end),
            rejection=rejection,
            error=error,
        )
        self.ingestor.end_loop(loop.session_id, loop.loop_id, agent, [ending], not again)

    def _continuation(self, loop: _Loop, previous: str | None) -> tuple[ContinuationKind, str | None]:
        attributes = loop.agent.attributes
        kind = attributes.get(attr.PHI_CONTINUATION_KIND)
        if isinstance(kind, str):
            tag = attributes.get(attr.PHI_CONTINUATION_TAG)
            parent = attributes.get(attr.PHI_PARENT_LOOP_ID)
            try:
                return ContinuationKind(kind, tag if isinstance(tag, str) else None), (
                    parent if isinstance(parent, str) else None
                )
            except ValueError:
                pass  # not a kind we wrote: infer it as for any producer
        if loop.parent_loop is not None:
            return INITIAL, loop.parent_loop
        if previous is not None:
            return DEFAULT, previous
        return INITIAL, None

    @staticmethod
    def _config(loop: _Loop) -> LoopConfigSnapshot | None:
        attributes = loop.agent.attributes
        stored = attributes.get(attr.PHI_CONFIG)
        if isinstance(stored, str):
            try:
                return decode_record(stored, LoopConfigSnapshot)
            except DecodeError:
                pass  # not ours after all: read the conventions' attributes
        for span in (loop.agent, *loop.chats):
            model = _text(
                _first(
                    span.attributes, attr.REQUEST_MODEL, attr.RESPONSE_MODEL, attr.OPENINFERENCE_MODEL_NAME
                )
            )
            if model is not None:
                provider = _text(_first(span.attributes, *_PROVIDER_NAMES)) or "unknown"
                return LoopConfigSnapshot(model=model, provider=provider)
        return None

    def _turns(self, loop: _Loop) -> list[tuple[SpanData, list[SpanData]]]:
        """Each chat span with the tool spans of its turn (under it, or after it before the next).
        Tool spans without any chat span (model calls not instrumented) are one turn, the loop's
        span standing in for its model call."""
        if not loop.chats and loop.tools:
            loop.synthesized.append("turn")
            return [(loop.agent, list(loop.tools))]
        turns: list[tuple[SpanData, list[SpanData]]] = [(chat, []) for chat in loop.chats]
        chat_ids = {chat.span_id: i for i, (chat, _) in enumerate(turns)}
        for tool in loop.tools:
            index = next((chat_ids[a.span_id] for a in self._ancestors(tool) if a.span_id in chat_ids), None)
            if index is None:
                index = max((i for i, (chat, _) in enumerate(turns) if chat.start <= tool.start), default=0)
            if turns:
                turns[index][1].append(tool)
        return turns

    def _turn(
        self,
        loop: _Loop,
        position: int,
        chat: SpanData,
        tools: list[SpanData],
        config: LoopConfigSnapshot | None,
    ) -> list[AgentMessage]:
        """Emit one turn, the loop's chat span at `position`; returns its messages (new user
        inputs, and the reply and tool results of a turn that ended)."""
        emit, attributes = self.ingestor.emit, chat.attributes
        messages: list[AgentMessage] = []
        # Our export states the index: an attempt a retry replaced is a chat span of its own, and
        # comes back replaced by the retry's TurnStart of its index, as the recorder had it.
        index = attributes.get(attr.PHI_TURN_INDEX)
        if type(index) is not int or not 0 <= index <= _LAST_U32:
            index = position
        trigger: TurnTrigger = "User" if position == 0 else "Continuation"
        stated = attributes.get(attr.PHI_TURN_TRIGGER)
        if stated in get_args(TurnTrigger):
            trigger = msgspec.convert(stated, TurnTrigger)
        emit(
            TurnStart(
                loop_id=loop.loop_id, turn_index=index, timestamp=_timestamp(chat.start), triggered_by=trigger
            )
        )
        if position == 0:
            for given in _new_user_messages(_span_messages(chat, "input") or []):
                user = UserMessage(
                    content=_contents(given, self.ingestor.counters), timestamp=chat.start // 1_000_000
                )
                messages.append(user)
                emit(MessageEnd(loop_id=loop.loop_id, message=user))
        # The chat span's events happened within the turn, among its tool calls (a loop's own
        # span standing in for its model call gave its events to the loop).
        within = self._span_events(loop, chat) if chat is not loop.agent else []
        results: list[ToolResultMessage] = []
        end = chat.end
        for tool in sorted(tools, key=lambda s: s.start):
            self._emit_until(within, tool.start)
            result = self._tool(loop, tool)
            if result is not None:
                results.append(result)
            if attr.PHI_TURN_INDEX not in attributes:  # a model call's span; ours spans its turn
                end = max(end, tool.end)
        self._emit_until(within, None)
        if attributes.get(attr.PHI_TURN_UNFINISHED) is True:  # our export of a turn cut off: no TurnEnd
            return messages
        usage = _usage(attributes) or ZERO_USAGE
        outputs = _span_messages(chat, "output") or []
        reasons = _first(attributes, attr.RESPONSE_FINISH_REASONS, attr.OPENINFERENCE_FINISH_REASON)
        if isinstance(reasons, str):
            reasons = (reasons,)
        reason = (
            reasons[0]
            if isinstance(reasons, tuple) and reasons
            else (outputs[-1].get("finish_reason") if outputs and isinstance(outputs[-1], dict) else None)
        )
        model = _text(
            _first(attributes, attr.RESPONSE_MODEL, attr.REQUEST_MODEL, attr.OPENINFERENCE_MODEL_NAME)
        )
        provider = _text(_first(attributes, *_PROVIDER_NAMES))
        reply = AssistantMessage(
            content=tuple(c for m in outputs for c in _contents(m, self.ingestor.counters)),
            stop_reason=_STOP_REASONS.get(str(reason), "toolUse" if tools else "stop"),  # type: ignore[arg-type]
            model=model or (config.model if config is not None else ""),
            provider=provider or (config.provider if config is not None else ""),
            usage=usage,
            timestamp=chat.end // 1_000_000,
        )
        replies = _turn_replies(attributes.get(attr.PHI_TURN_REPLIES), usage)
        if replies:  # each a call of its own, as the recorder had them (`LoopRecord.turn_calls`)
            *earlier, last = replies
            named = {"model": last.model, "provider": last.provider, "stop_reason": last.stop_reason}
            reply = msgspec.structs.replace(reply, usage=last.usage, **named)
            for message in (*earlier, reply):
                emit(MessageEnd(loop_id=loop.loop_id, message=message))
        emit(
            TurnEnd(
                loop_id=loop.loop_id,
                message=reply,
                usage=usage,
                timestamp=_timestamp(end),
                tool_results=tuple(results),
            )
        )
        return [*messages, reply, *results]

    def _tool(self, loop: _Loop, tool: SpanData) -> ToolResultMessage | None:
        """Emit one tool call; returns its result, None for a call our export says never ended."""
        emit, attributes = self.ingestor.emit, tool.attributes
        name = (
            _text(attributes.get(attr.TOOL_NAME))
            or _text(attributes.get(attr.OPENINFERENCE_TOOL_NAME))
            or tool.name.removeprefix("execute_tool ").strip()
            or "tool"
        )
        call_id = _text(_first(attributes, attr.TOOL_CALL_ID, attr.OPENINFERENCE_TOOL_CALL_ID))
        if call_id is None:
            call_id = f"otel-{tool.span_id:016x}"
            loop.synthesized.append(f"tool_call_id:{call_id}")
        emit(
            ToolExecutionStart(
                loop_id=loop.loop_id,
                tool_call_id=call_id,
                tool_name=name,
                args=_within_depth(
                    _json(_first(attributes, attr.TOOL_CALL_ARGUMENTS, attr.OPENINFERENCE_TOOL_PARAMETERS)),
                    self.ingestor.counters,
                ),
            )
        )
        for event in tool.events:
            if event.name == attr.EVENT_PROGRESS:
                emit(
                    ProgressMessage(
                        loop_id=loop.loop_id,
                        tool_call_id=call_id,
                        tool_name=name,
                        text=str(event.attributes.get("phi.text", "")),
                    )
                )
        if attr.PHI_LOOP_ID in attributes and attr.PHI_TOOL_IS_ERROR not in attributes:
            return None  # our export states how every call that ended ended
        result = _first(attributes, attr.TOOL_CALL_RESULT, attr.OPENINFERENCE_OUTPUT_VALUE)
        content = (TextContent(text=_result_text(result)),) if result is not None else ()
        is_error = bool(attributes.get(attr.PHI_TOOL_IS_ERROR, tool.error))
        child = self.child_loops.get(tool.span_id) or _text(attributes.get(attr.PHI_CHILD_LOOP_ID))
        emit(
            ToolExecutionEnd(
                loop_id=loop.loop_id,
                tool_call_id=call_id,
                tool_name=name,
                result=ToolResult(content=content, child_loop_id=child),
                is_error=is_error,
                child_loop_id=child,
            )
        )
        return ToolResultMessage(
            tool_call_id=call_id,
            tool_name=name,
            content=content,
            is_error=is_error,
            timestamp=tool.end // 1_000_000,
        )

    def _span_events(self, loop: _Loop, span: SpanData) -> list[tuple[int, AgentEvent]]:
        """The phi events `span`'s span events stand for, with their times, latest first (as
        `_emit_until` takes them). One that cannot be rebuilt is counted and logged, not
        recorded: a producer's event of one of our names that is not ours, or a damaged one."""
        out: list[tuple[int, AgentEvent]] = []
        for event in sorted(span.events, key=lambda e: e.time):
            kind = _SPAN_EVENT_TYPES.get(event.name)
            if kind is None:
                continue
            fields = {
                key.removeprefix("phi."): value
                for key, value in event.attributes.items()
                if key.startswith("phi.") and key.removeprefix("phi.") in _fields(kind)
            }
            if kind is InputRejected:
                fields.setdefault("reason", "")
            if kind is RevertApplied:
                fields.setdefault("applied", True)
                fields.setdefault("category", "failure")
                fields.setdefault("abandoned_node_ids", ())
            if kind is PrunApplied:
                fields.setdefault("pruned_timestamps", ())
            # Unreadable: a field of another type, a count past u64, lone surrogates (UnicodeEncodeError).
            try:
                rebuilt: AgentEvent = msgspec.convert(
                    {
                        **fields,
                        "loop_id": loop.loop_id,
                        "type": kind.__name__,
                        "timestamp": _timestamp(event.time),
                    },
                    kind,
                    strict=False,  # a count past OTLP's int64 comes as its decimal text
                )
                check_event_fields(rebuilt)  # a count past u64 (any producer's text): none phi-core holds
            except (msgspec.ValidationError, UnicodeEncodeError, InvalidArgument) as error:
                self.ingestor.counters["unreadable_span_events"] += 1
                logger.warning(
                    "trace %s: span event %r of span %016x is not one we can read (%s); not recorded",
                    self.trace_hex,
                    event.name,
                    span.span_id,
                    error,
                )
                continue
            out.append((event.time, rebuilt))
        out.reverse()  # not sorted in reverse: events of one time keep their order
        return out

    def _emit_until(self, pending: list[tuple[int, AgentEvent]], time: int | None) -> None:
        """Emit the events of `pending` (latest first) up to `time` (all of them for None)."""
        while pending and (time is None or pending[-1][0] <= time):
            self.ingestor.emit(pending.pop()[1])


# -- inputs ------------------------------------------------------------------------------------------------


def ingest_otlp(payload: bytes, content_type: str, ingestor: SpanIngestor) -> IngestResult:
    """Feed one OTLP/HTTP trace payload (``application/x-protobuf`` or ``application/json``).

    Raises `OtlpDecodeError` for a payload that cannot be read (nothing of it is taken).
    """
    check_instance("payload", payload, (bytes, bytearray, memoryview), "bytes")
    check_type("content_type", content_type, str)
    check_type("ingestor", ingestor, SpanIngestor)
    read = read_otlp(payload, content_type.split(";", 1)[0].strip().lower())
    ingestor.add(read.spans)
    return IngestResult(accepted=len(read.spans), rejected=read.skipped, message=read.message)


class IngestSpanProcessor(SpanProcessor):
    """An OpenTelemetry SDK `SpanProcessor` that records GenAI spans as sessions, in process.

    ``provider.add_span_processor(IngestSpanProcessor(recorder))``; `shutdown` (called by
    the provider's) records what is still waiting. A failure to record never reaches the
    code ending the span, nor the provider's other processors (the SDK calls them one
    after the other, unguarded): the first is logged, all are counted (`failures`).
    """

    def __init__(self, target: Any, **options: Any) -> None:
        self.ingestor = SpanIngestor(target, **options)
        self.failures = FailureTally(
            logger, "span processor", "the traces it fails on are not recorded", traceback=True
        )

    def on_end(self, span: Any) -> None:
        try:
            data = spans_from_sdk(span)
            if data is not None:
                self.ingestor.add((data,))
        except Exception as error:
            self.failures.record(self, error)

    def shutdown(self) -> None:
        try:
            self.ingestor.flush()
        except Exception as error:
            self.failures.record(self, error)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        del timeout_millis
        try:
            self.ingestor.expire()
        except Exception as error:
            self.failures.record(self, error)
            return False
        return True
