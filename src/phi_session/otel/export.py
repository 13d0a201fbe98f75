"""Sessions -> OpenTelemetry GenAI spans, for any OTel `SpanExporter`.

Mapping: one trace per loop (sessions may last days); ``invoke_agent {agent}`` (INTERNAL)
per loop, ``chat {model}`` (CLIENT) per turn, ``execute_tool {tool}`` (INTERNAL) per tool
call, under the turn that ran it. Usage attributes count what was billed: a loop cut off
before AgentEnd (phi-core gives it zero usage and drops the turn it was cut off in) has
that turn as a chat span marked ``phi.turn.unfinished``, with its replies' usage, and its
loop span counts it (`LoopRecord.billed_usage`); a turn a replay served from its
recording (`phi_session.model.is_replayed`) is a chat span marked ``phi.turn.replayed``,
without usage, as no model was called. With content, a loop cut off before AgentEnd also
carries ``phi.loop.usage``: what the AgentEnd ingest makes up for it reports, which keeps
its billing (its replayed turns counted, as an AgentEnd's usage counts them). A sub-agent's
first loop joins its spawner's trace under the tool span that spawned it; continuations and
parallel siblings are span links.
Span and trace ids are hashes of loop ids, turn indices and tool call ids (with how often
the loop used them before: a turn restarted under its index, a call id used again), so
exporting a session twice yields the same spans (backends deduplicate them). A loop id used
again (a compaction pass, a second parallel evaluation reusing its branches' ids) has a record per use:
each record after the first has span ids (and, unless under its spawner's tool span, a trace)
of its own, hashed with its ordinal; links name an id's first record, as `Session.get_loop`
finds it.

Limit: a sub-agent spawned by a sub-agent joins the trace named after its direct
spawner's loop, which is not its spawner's own trace (that needs the grandparent session);
a sub-agent spawned by a tool call whose id its loop used before is placed under that id's
first call (the spawn reference names no turn); a second parallel evaluation's branches
link the first evaluation's records as their siblings (links name an id's first record).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .._checks import check_seconds, check_type, check_unsigned, deadline_of, seconds_left
from .._float32 import Float32
from ..codec import encode_event, encode_record, escape_surrogates, json_text, without_lone_surrogates
from ..errors import ExportError, StoreError
from ..events import (
    AgentEnd,
    AgentEvent,
    CompactionEnded,
    CompactionStarted,
    InputRejected,
    LoopConfigSnapshot,
    MessageEnd,
    ProgressMessage,
    PrunApplied,
    RevertApplied,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    TurnEnd,
    TurnStart,
)
from ..messages import (
    AgentMessage,
    AssistantMessage,
    ImageContent,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from ..model import LoopRecord, ModelCall, RecordMark, Session, Turn, is_replayed, prompt_tokens
from ..persist import CLOSE_GRACE, DEFAULT_MAX_PENDING_BYTES, AutoPersistingRecorder, held_bytes
from ..recorder import SessionRecorderConfig, SpawnGap, checking_entry
from ..stores.base import merge_sessions
from . import attributes as attr

__all__ = ["OtelExportSink", "export_session", "session_spans"]

_SCOPE = InstrumentationScope(attr.INSTRUMENTATION_SCOPE, schema_url=attr.SCHEMA_URL)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_default_resource: Resource | None = None
# Sessions whose exported records an `OtelExportSink` remembers, to number a loop id's later
# records after them (a few dozen bytes per loop).
_EXPORTED_MEMORY = 10_000
# Sub-agent sessions an `OtelExportSink` holds whole until the tool call that spawned them is
# named (`_AwaitingToolCall`): normally until their spawner's tool call ends. Bounded in
# bytes (`held_bytes`) too, by the sink's `max_pending_bytes`.
_AWAITING_MEMORY = 1_000

# Span events for these loop events; fields that may hold content are sent only with capture.
_SPAN_EVENTS: dict[type, str] = {
    CompactionStarted: attr.EVENT_COMPACTION_STARTED,
    CompactionEnded: attr.EVENT_COMPACTION_ENDED,
    PrunApplied: attr.EVENT_PRUN,
    RevertApplied: attr.EVENT_REVERT,
    InputRejected: attr.EVENT_INPUT_REJECTED,
    ProgressMessage: attr.EVENT_PROGRESS,
}
_CONTENT_FIELDS = frozenset({"text", "summary", "reason", "memo"})
# OTLP's times are unsigned 64-bit ns (1970 to 2554); phi-core's reach years -262143 to 262143,
# and a message's ms (u64) further: the encoder refuses a whole batch for one time outside.
_LAST_OTLP_NS = 2**64 - 1
# OTLP's int values are signed 64-bit; an encoder drops (logs) an attribute past them.
_LAST_INT64 = 2**63 - 1
_NOT_ATTRIBUTES = frozenset({"loop_id", "timestamp", "tool_call_id", "tool_name"})


def _hash_id(size: int, *parts: str) -> int:
    # Lone surrogates (ids from undecodable bytes) escaped, which UTF-8 refuses: the ids are
    # those of the session as stores save it, and as `OtelExportSink` exports it.
    text = escape_surrogates("\x1f".join(parts))
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "big")
    return value or 1  # zero is the invalid id


def _record_key(loop_id: str, ordinal: int) -> tuple[str, ...]:
    """What names the `ordinal`-th record of `loop_id` in its spans' ids: a loop id used
    again (a compaction pass, a second parallel evaluation) has a record for each use, and
    the first keeps the ids it always had."""
    return (loop_id, f"record {ordinal}") if ordinal else (loop_id,)


def loop_span_id(loop_id: str, ordinal: int = 0) -> int:
    """`ordinal`: how many earlier records of the session had this loop id."""
    return _hash_id(8, "loop", *_record_key(loop_id, ordinal))


def turn_span_id(loop_id: str, turn_index: int, repeat: int = 0, ordinal: int = 0) -> int:
    """`repeat`: how many earlier turns of the loop started with this index (a turn restarted
    under its index: a TurnStart replaces an unfinished turn)."""
    if repeat:
        return _hash_id(8, "turn", *_record_key(loop_id, ordinal), str(turn_index), str(repeat))
    return _hash_id(8, "turn", *_record_key(loop_id, ordinal), str(turn_index))


def tool_span_id(loop_id: str, tool_call_id: str, repeat: int = 0, ordinal: int = 0) -> int:
    """`repeat`: how many earlier calls of the loop had this id (some providers number calls per reply)."""
    if repeat:
        return _hash_id(8, "tool", *_record_key(loop_id, ordinal), tool_call_id, str(repeat))
    return _hash_id(8, "tool", *_record_key(loop_id, ordinal), tool_call_id)


def _context(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)


class _Placements:
    """Where the span of each loop of a session goes, its loops indexed once: every loop
    asks for its own, its parent's and each of its parallel siblings'."""

    def __init__(self, session: Session) -> None:
        self._spawn = session.parent_spawn_ref
        self._loops = session.loop_index()
        self._known: dict[str, tuple[int, int | None]] = {}

    def __call__(self, loop_id: str) -> tuple[int, int | None]:
        """(trace id, parent span id) of the span of `loop_id`'s first record (the one links
        name): its own trace, or its spawner's."""
        known = self._known.get(loop_id)
        if known is None:
            known = self._known[loop_id] = self._place(loop_id)
        return known

    def of_record(self, record: LoopRecord, ordinal: int) -> tuple[int, int | None]:
        """(trace id, parent span id) of the span of `record`, the `ordinal`-th record of its
        id. A record of an id used again has a trace of its own, in which it is recorded when
        ingested, in its session's order; but in a sub-agent's session, the records of an id
        whose first is under its spawner's tool span are there too (they ran within that
        call), where ingest finds them with their first."""
        placed = self(record.loop_id)
        if ordinal and placed[1] is None:
            return _hash_id(16, "trace", *_record_key(record.loop_id, ordinal)), None
        return placed

    def spawned(self, record: LoopRecord | None) -> bool:
        """Whether `record`'s parent is the loop that spawned its session (its span is a child
        of that loop's span, not linked to it)."""
        spawn = self._spawn
        return spawn is not None and record is not None and record.parent_loop_id == spawn.parent_loop_id

    def _place(self, loop_id: str) -> tuple[int, int | None]:
        spawn = self._spawn
        if spawn is not None and self.spawned(self._loops.get(loop_id)):
            parent = (
                tool_span_id(spawn.parent_loop_id, spawn.tool_call_id)
                if spawn.tool_call_id
                else loop_span_id(spawn.parent_loop_id)
            )
            return _hash_id(16, "trace", spawn.parent_loop_id), parent
        return _hash_id(16, "trace", loop_id), None


def _usage_attributes(
    usage: Usage, calls: Iterable[Usage | ModelCall], *, exact: bool = False
) -> dict[str, Any]:
    """The conventions' usage attributes of `usage`, the sum of model `calls`. Their
    input_tokens count cached tokens inside; phi-core's providers count them inside ``input``
    or apart, which only each call's counts tell (`prompt_tokens`), never their sum. The
    exact counts go apart too when clamped, or `exact` (a turn whose replies the ingest
    reads back one by one, and its loop: their sum must be theirs)."""
    counts = {
        attr.USAGE_INPUT_TOKENS: sum(map(prompt_tokens, calls)),
        attr.USAGE_OUTPUT_TOKENS: usage.output,
        attr.USAGE_CACHE_READ_TOKENS: usage.cache_read,
        attr.USAGE_CACHE_WRITE_TOKENS: usage.cache_write,
        attr.USAGE_REASONING_TOKENS: usage.reasoning,
    }
    attributes: dict[str, Any] = {name: min(count, _LAST_INT64) for name, count in counts.items()}
    if exact or attributes != counts:  # the exact counts apart, which the ingest reads first
        attributes[attr.PHI_USAGE] = encode_record(usage).decode()
    return attributes


def _request_attributes(config: LoopConfigSnapshot) -> dict[str, Any]:
    """What the loop asks of its model, on its span and its chat spans: those of the
    settings the conventions name that `config` sets."""
    attributes: dict[str, Any] = {attr.PROVIDER_NAME: config.provider, attr.REQUEST_MODEL: config.model}
    if isinstance(config.max_tokens, int):
        attributes[attr.REQUEST_MAX_TOKENS] = config.max_tokens
    temperature = config.temperature
    if isinstance(temperature, Float32) and math.isfinite(temperature):
        # As written (0.2), not as its 32-bit value's 64-bit expansion (0.20000000298...).
        attributes[attr.REQUEST_TEMPERATURE] = float(temperature.to_json())
    return attributes


def _otlp_int(value: int) -> int | str:
    """`value` as an attribute of ours: itself, or past OTLP's int64 its decimal text (which
    the ingest reads as the number)."""
    return value if value <= _LAST_INT64 else str(value)


def _part(content: Any) -> dict[str, Any]:
    if isinstance(content, TextContent):
        return {"type": "text", "content": content.text}
    if isinstance(content, ThinkingContent):
        return {"type": "reasoning", "content": content.thinking}
    if isinstance(content, ToolCall):
        return {"type": "tool_call", "id": content.id, "name": content.name, "arguments": content.arguments}
    if isinstance(content, ImageContent):
        return {"type": "blob", "modality": "image", "mime_type": content.mime_type, "content": content.data}
    return {"type": "text", "content": ""}


def genai_message(message: AgentMessage) -> dict[str, Any]:
    """A phi-core message in the GenAI conventions' message shape (``role`` and ``parts``)."""
    if isinstance(message, ToolResultMessage):
        text = "".join(c.text for c in message.content if isinstance(c, TextContent))
        return {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": message.tool_call_id, "response": text}],
        }
    if isinstance(message, AssistantMessage):
        return {
            "role": "assistant",
            "parts": [_part(c) for c in message.content],
            "finish_reason": message.stop_reason,
        }
    if isinstance(message, UserMessage):
        return {"role": "user", "parts": [_part(c) for c in message.content]}
    return {"role": "user", "parts": [{"type": "extension", "content": msgspec.to_builtins(message)}]}


def _events_attribute(events: list[tuple[int, AgentEvent]]) -> str:
    return json_text([[seq, msgspec.Raw(encode_event(event))] for seq, event in events])


def _replies_attribute(events: list[tuple[int, AgentEvent]]) -> str:
    """`attr.PHI_TURN_REPLIES` of a turn whose span covers `events`: its assistant replies
    without their content, each priced apart once ingested (`LoopRecord.turn_calls`)."""
    replies = [
        event.message
        for _, event in events
        if type(event) is MessageEnd and type(event.message) is AssistantMessage
    ]
    listed = [
        [r.provider, r.model, r.stop_reason, r.timestamp, encode_record(r.usage).decode()] for r in replies
    ]
    return json_text(listed)


def _otlp_time(ns: int) -> int:
    """`ns` within what OTLP holds (the exact time stays in the event, exported with content)."""
    return min(max(ns, 0), _LAST_OTLP_NS)


def _span_event(event: AgentEvent, time_ns: int, capture_content: bool) -> Event:
    fields: dict[str, Any] = {}
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if name in _NOT_ATTRIBUTES or value is None or (name in _CONTENT_FIELDS and not capture_content):
            continue
        if isinstance(value, str):  # lone surrogates (text from undecodable bytes) escaped
            fields[f"phi.{name}"] = escape_surrogates(value)
        elif isinstance(value, (bool, float)):
            fields[f"phi.{name}"] = value
        elif isinstance(value, int):
            fields[f"phi.{name}"] = _otlp_int(value)
        elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
            # An array holds one type: all decimal text if one is past int64.
            fields[f"phi.{name}"] = tuple(map(str, value)) if any(v > _LAST_INT64 for v in value) else value
    return Event(_SPAN_EVENTS[type(event)], fields, _otlp_time(time_ns))


# Attributes written by encoders that escape lone surrogates themselves.
_ENCODED = frozenset(
    {
        attr.PHI_EVENTS,
        attr.PHI_CONFIG,
        attr.PHI_PARALLEL_EVALUATION_USAGE,
        attr.TOOL_CALL_ARGUMENTS,
        attr.TOOL_CALL_RESULT,
        attr.INPUT_MESSAGES,
        attr.OUTPUT_MESSAGES,
        attr.SYSTEM_INSTRUCTIONS,
    }
)


def _escape_texts(attributes: dict[str, Any]) -> None:
    """Escape lone surrogates (text from undecodable bytes) in ids and names, which no OTLP
    encoder takes; in place, as cheaply as possible when there are none."""
    for key, value in attributes.items():
        if key not in _ENCODED and (type(value) is tuple or (type(value) is str and not value.isascii())):
            attributes[key] = without_lone_surrogates(value)


class _Span:
    """A span being assembled: times, attributes, span events and the phi events it covers."""

    __slots__ = ("attributes", "end", "events", "phi_events", "start")

    def __init__(self, start: int, attributes: dict[str, Any]) -> None:
        self.start = self.end = start
        self.attributes = attributes
        self.events: list[Event] = []
        self.phi_events: list[tuple[int, AgentEvent]] = []


def _event_time(event: Any, last: int) -> int:
    """The event's own time in ns when it has one (timestamp, or its message's ms), else `last`.
    A message's ms may be of another clock, ahead of the events' (a tool span then lasts as
    its result's time says, past its loop's end maybe) or past what OTLP holds (clamped when
    the span is made)."""
    stamp = getattr(event, "timestamp", None)
    if stamp is not None and not isinstance(stamp, int):
        return int(stamp.ns)
    message = getattr(event, "message", None)
    millis = getattr(message, "timestamp", None)
    if isinstance(millis, int) and millis > 0:
        return max(last, millis * 1_000_000)
    return last


class _LoopExport:
    """The spans of one loop."""

    def __init__(
        self,
        session: Session,
        record: LoopRecord,
        ordinal: int,
        capture_content: bool,
        resource: Resource,
        placements: _Placements,
    ) -> None:
        self.record = record
        self.ordinal = ordinal  # how many earlier records of the session had its loop id
        self.capture = capture_content
        self.resource = resource
        self.placements = placements
        self.trace_id, self.parent_span = placements.of_record(record, ordinal)
        self.common = {
            attr.CONVERSATION_ID: session.session_id,
            attr.PHI_SESSION_ID: session.session_id,
            attr.PHI_LOOP_ID: record.loop_id,
            # On every span, not only the loop's: a chat span standing in for a loop span that
            # came apart (another batch, after the trace timeout) knows whose loop it is.
            attr.AGENT_ID: record.agent_id,
        }
        self._turns: dict[int, list[Turn]] | None = None  # made by `_indexed` when first needed
        self._ended: dict[int, int] = {}  # turn index -> its turns ended so far (`_ended_turn`)
        # (turn index, place among that index's turns, call id) -> ms
        self._result_times: dict[tuple[int, int, str], int] = {}
        self._first_result_times: dict[str, int] = {}  # call id -> ms, its first result's

    def _indexed(self) -> dict[int, list[Turn]]:
        """The loop's turns of each index, in order, made once with its tool results' times:
        looked up for every tool call, which scanning the turns made quadratic."""
        if self._turns is None:
            self._turns = {}
            for turn in self.record.turns:
                index = turn.turn_id.turn_index
                place = len(self._turns.setdefault(index, []))
                self._turns[index].append(turn)
                for message in turn.tool_results:
                    if isinstance(message, ToolResultMessage):
                        key = (index, place, message.tool_call_id)
                        self._result_times.setdefault(key, message.timestamp)
                        self._first_result_times.setdefault(message.tool_call_id, message.timestamp)
        return self._turns

    def _ended_turn(self, index: int) -> Turn | None:
        """The recorded turn the current chat span of `index` is, once its TurnEnd came: each
        TurnEnd of an index records its next turn (an attempt a TurnStart replaced records none)."""
        turns = self._indexed().get(index, [])
        place = self._ended.get(index, 0)
        self._ended[index] = place + 1
        return turns[place] if place < len(turns) else None

    def spans(self) -> list[ReadableSpan]:
        record = self.record
        start = int(record.started_at.ns)
        loop = _Span(start, self._loop_attributes())
        turns: dict[tuple[int, int], _Span] = {}  # (turn index, repeat) -> span
        turn_repeats: dict[int, int] = {}  # turn index -> its TurnStarts so far
        # (turn index, repeat) -> the turn its TurnEnd recorded
        ended_turns: dict[tuple[int, int], Turn | None] = {}
        # (call id, repeat) -> span, (turn index, repeat) of its turn (None: outside any turn)
        tools: dict[tuple[str, int], tuple[_Span, tuple[int, int] | None]] = {}
        repeats: dict[str, int] = {}  # call id -> the repeat its events now go to
        ended: set[str] = set()  # call ids whose latest call has ended
        turn: tuple[tuple[int, int], _Span] | None = None
        now = start
        for stored in sorted(record.events, key=lambda item: item.sequence):
            event = stored.event
            now = _event_time(event, now)
            owner = loop if turn is None else turn[1]
            if type(event) is TurnStart:
                span = _Span(now, self._turn_attributes(event))
                turn_repeat = turn_repeats.get(event.turn_index, 0)
                turn_repeats[event.turn_index] = turn_repeat + 1
                turns[event.turn_index, turn_repeat] = span
                turn, owner = ((event.turn_index, turn_repeat), span), span
            elif type(event) in (ToolExecutionStart, ToolExecutionUpdate, ToolExecutionEnd, ProgressMessage):
                call_id = event.tool_call_id  # type: ignore[union-attr]
                repeat = repeats.get(call_id)
                if repeat is None or (type(event) is ToolExecutionStart and call_id in ended):
                    # A start after that id's end is another call under the same id.
                    repeat = repeats[call_id] = 0 if repeat is None else repeat + 1
                    ended.discard(call_id)
                    tools[call_id, repeat] = (
                        _Span(now, self._tool_attributes(event)),
                        turn[0] if turn is not None else None,
                    )
                owner, in_turn = tools[call_id, repeat]
                if type(event) is ToolExecutionEnd:
                    ended.add(call_id)
                    now = self._end_tool(owner, event, now, in_turn)
            owner.phi_events.append((stored.sequence, event))
            owner.end = max(owner.end, now)
            if type(event) in _SPAN_EVENTS:
                owner.events.append(_span_event(event, now, self.capture))
            if type(event) is TurnEnd and turn is not None:
                ended_turns[turn[0]] = self._ended_turn(turn[0][0])
                turn = None
            if type(event) is ToolExecutionStart and self.capture:
                owner.attributes[attr.TOOL_CALL_ARGUMENTS] = json_text(event.args)
        # A loop that ended ends at its AgentEnd: its messages' times (ms, of other clocks
        # maybe) that pushed its span along may lie past it.
        loop.end = int(record.ended_at.ns) if record.ended_at is not None else max(now, loop.end)
        for key, span in turns.items():
            if key in ended_turns:
                self._finish_turn(span, ended_turns[key])
            else:
                self._finish_unfinished_turn(span, cut_off=turn is not None and turn[0] == key)
        loop_id, ordinal = record.loop_id, self.ordinal
        loop_span_id_ = loop_span_id(loop_id, ordinal)
        out = [
            self._readable(
                span,
                tool_span_id(loop_id, call_id, repeat, ordinal),
                loop_span_id_ if in_turn is None else turn_span_id(loop_id, *in_turn, ordinal),
                SpanKind.INTERNAL,
            )
            for (call_id, repeat), (span, in_turn) in tools.items()
        ]
        out.extend(
            self._readable(span, turn_span_id(loop_id, *key, ordinal), loop_span_id_, SpanKind.CLIENT)
            for key, span in turns.items()
        )
        out.append(
            self._readable(
                loop,
                loop_span_id_,
                self.parent_span,
                SpanKind.INTERNAL,
                links=self._links(),
                status=self._loop_status(),
            )
        )
        return out

    # -- attributes ------------------------------------------------------------------------

    def _loop_attributes(self) -> dict[str, Any]:
        record, config = self.record, self.record.config
        attributes: dict[str, Any] = {
            attr.OPERATION_NAME: attr.OP_INVOKE_AGENT,
            attr.AGENT_NAME: record.agent_id,
            **self.common,
            attr.PHI_LOOP_STATUS: record.status,
            attr.PHI_CONTINUATION_KIND: record.kind.kind,
            # What the loop's calls billed: phi-core's usage, but for a loop cut off before
            # AgentEnd, whose usage phi-core leaves at zero, its finished and cut-off turns'.
            **_usage_attributes(
                record.billed_as_reported(),
                record.model_calls(),
                exact=not self.capture and any(len(record.turn_calls(turn)) > 1 for turn in record.turns),
            ),
        }
        if self.capture and record.ended_at is None:
            # What an AgentEnd closing it reports: every reply's usage, a replay's served ones
            # too (its cut-off turn's included), which `billed_usage` takes out again.
            attributes[attr.PHI_LOOP_USAGE] = encode_record(record.reported_usage()).decode()
        if record.kind.tag is not None:
            attributes[attr.PHI_CONTINUATION_TAG] = record.kind.tag
        if record.parent_loop_id is not None:
            attributes[attr.PHI_PARENT_LOOP_ID] = record.parent_loop_id
        if config is not None:
            attributes.update(_request_attributes(config))
            attributes[attr.PHI_CONFIG] = encode_record(config).decode()
        group = record.parallel_group
        if group is not None:
            attributes[attr.PHI_PARALLEL_LOOP_IDS] = group.all_loop_ids
            attributes[attr.PHI_PARALLEL_SELECTED] = group.is_selected
            attributes[attr.PHI_PARALLEL_SELECTED_LOOP] = group.selected_loop_id
            attributes[attr.PHI_PARALLEL_CONFIG_INDEX] = _otlp_int(group.selected_config_index)
            attributes[attr.PHI_PARALLEL_EVALUATION_USAGE] = encode_record(group.evaluation_usage).decode()
        if isinstance(record.error, str):
            attributes[attr.ERROR_TYPE] = "phi.loop_failed"
        elif record.status == "Aborted":
            attributes[attr.ERROR_TYPE] = "phi.loop_aborted"
        return attributes

    def _turn_attributes(self, event: TurnStart) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            attr.OPERATION_NAME: attr.OP_CHAT,
            **self.common,
            attr.PHI_TURN_INDEX: event.turn_index,
            attr.PHI_TURN_TRIGGER: event.triggered_by,
        }
        config = self.record.config
        if config is not None:
            attributes.update(_request_attributes(config))
        return attributes

    def _tool_attributes(self, event: Any) -> dict[str, Any]:
        return {
            attr.OPERATION_NAME: attr.OP_EXECUTE_TOOL,
            **self.common,
            attr.TOOL_NAME: event.tool_name,
            attr.TOOL_CALL_ID: event.tool_call_id,
        }

    def _end_tool(
        self, span: _Span, event: ToolExecutionEnd, now: int, in_turn: tuple[int, int] | None
    ) -> int:
        span.attributes[attr.PHI_TOOL_IS_ERROR] = event.is_error
        if event.is_error:
            span.attributes[attr.ERROR_TYPE] = "phi.tool_error"
        child = event.result.child_loop_id
        if isinstance(child, str):
            span.attributes[attr.PHI_CHILD_LOOP_ID] = child
            for ref in self.record.child_loop_refs:
                if ref.child_loop_id == child:
                    span.attributes[attr.PHI_CHILD_SESSION_ID] = ref.child_session_id
        if self.capture:
            span.attributes[attr.TOOL_CALL_RESULT] = json_text(
                [_part(content) for content in event.result.content]
            )
        # The result message carries the end time; its own turn's (the turn of its index
        # the current chat span is to record), should the id recur.
        if in_turn is not None and in_turn[0] in self._indexed():
            place = self._ended.get(in_turn[0], 0)
            millis = self._result_times.get((in_turn[0], place, event.tool_call_id))
        else:
            millis = self._first_result_times.get(event.tool_call_id)
        return now if millis is None else max(now, millis * 1_000_000)

    def _finish_turn(self, span: _Span, turn: Turn | None) -> None:
        if turn is None:  # a TurnEnd without its turn recorded
            return
        span.end = int(turn.ended_at.ns)  # at its TurnEnd, as a loop's span (see `spans`)
        output = turn.output_message
        if is_replayed(output):  # its recorded usage was billed where it was recorded
            span.attributes[attr.PHI_TURN_REPLAYED] = True
        else:
            calls = self.record.turn_calls(turn)
            listed = len(calls) > 1 and not self.capture  # with capture, phi.events hold the replies
            span.attributes.update(_usage_attributes(turn.usage, calls, exact=listed))
            if listed:
                span.attributes[attr.PHI_TURN_REPLIES] = _replies_attribute(span.phi_events)
        if isinstance(output, AssistantMessage):
            span.attributes[attr.RESPONSE_MODEL] = output.model
            span.attributes[attr.RESPONSE_FINISH_REASONS] = (output.stop_reason,)
            span.attributes.setdefault(attr.PROVIDER_NAME, output.provider)
            span.attributes.setdefault(attr.REQUEST_MODEL, output.model)
        if self.capture:
            span.attributes[attr.INPUT_MESSAGES] = json_text([genai_message(m) for m in turn.input_messages])
            span.attributes[attr.OUTPUT_MESSAGES] = json_text([genai_message(output)])
            if turn.request_payload is not None:
                span.attributes[attr.SYSTEM_INSTRUCTIONS] = json_text(
                    [{"type": "text", "content": turn.request_payload.system_prompt}]
                )

    def _finish_unfinished_turn(self, span: _Span, *, cut_off: bool) -> None:
        """A turn without TurnEnd, marked unfinished: the one the loop was cut off in
        (`cut_off`), or an attempt a later TurnStart replaced. phi-core drops it from the
        record, yet its model calls were made: it gets the last reply's model and finish
        reason, and the turn a loop without AgentEnd was cut off in the usage of its
        replies since the last TurnEnd (`unfinished_usage`: what the loop bills for them)."""
        span.attributes[attr.PHI_TURN_UNFINISHED] = True
        if cut_off and not self.record.reports_usage():  # else the loop's usage already counts the turn
            replies = self.record.cut_off_turn().replies  # what `unfinished_usage` sums
            calls = [reply.usage for reply in replies if not is_replayed(reply)]
            span.attributes.update(_usage_attributes(self.record.unfinished_usage(), calls))
        replies = [
            event.message
            for _, event in span.phi_events
            if type(event) is MessageEnd and isinstance(event.message, AssistantMessage)
        ]
        if not replies:
            return
        reply = replies[-1]
        span.attributes[attr.RESPONSE_MODEL] = reply.model
        span.attributes[attr.RESPONSE_FINISH_REASONS] = (reply.stop_reason,)
        span.attributes.setdefault(attr.PROVIDER_NAME, reply.provider)
        span.attributes.setdefault(attr.REQUEST_MODEL, reply.model)
        if self.capture:
            span.attributes[attr.OUTPUT_MESSAGES] = json_text([genai_message(m) for m in replies])

    def _links(self) -> list[Link]:
        record, links = self.record, []
        parent = record.parent_loop_id
        # A link names its loop's first record; a compaction pass, which reuses its loop's
        # id, links that (the first record of an id naming itself links nothing).
        if (
            parent is not None
            and (parent != record.loop_id or self.ordinal)
            and (self.parent_span is None or not self.placements.spawned(record))
        ):
            links.append(
                Link(
                    _context(self.placements(parent)[0], loop_span_id(parent)),
                    {
                        attr.PHI_LINK_KIND: attr.LINK_CONTINUATION,
                        attr.PHI_CONTINUATION_KIND: record.kind.kind,
                    },
                )
            )
        group = record.parallel_group
        if group is not None:
            for sibling in group.all_loop_ids:
                if sibling != record.loop_id:
                    links.append(
                        Link(
                            _context(self.placements(sibling)[0], loop_span_id(sibling)),
                            {
                                attr.PHI_LINK_KIND: attr.LINK_PARALLEL,
                                attr.PHI_PARALLEL_SELECTED: sibling == group.selected_loop_id,
                            },
                        )
                    )
        return links

    def _loop_status(self) -> Status:
        record = self.record
        if isinstance(record.error, str):
            return Status(StatusCode.ERROR, escape_surrogates(record.error))
        if record.status == "Aborted":
            return Status(StatusCode.ERROR, "loop aborted before it ended")
        return _OK

    def _readable(
        self,
        span: _Span,
        span_id: int,
        parent: int | None,
        kind: SpanKind,
        *,
        links: Sequence[Link] = (),
        status: Status = _OK,
    ) -> ReadableSpan:
        attributes = span.attributes
        if self.capture:
            attributes[attr.PHI_EVENTS] = _events_attribute(span.phi_events)
        _escape_texts(attributes)
        if status is _OK and attr.ERROR_TYPE in attributes:
            status = Status(StatusCode.ERROR)
        operation = attributes[attr.OPERATION_NAME]
        target = {
            attr.OP_INVOKE_AGENT: attributes.get(attr.AGENT_NAME),
            attr.OP_CHAT: attributes.get(attr.REQUEST_MODEL),
            attr.OP_EXECUTE_TOOL: attributes.get(attr.TOOL_NAME),
        }[operation]
        return ReadableSpan(
            name=f"{operation} {target}" if target else operation,
            context=_context(self.trace_id, span_id),
            parent=None if parent is None else _context(self.trace_id, parent),
            resource=self.resource,
            attributes=attributes,
            events=span.events,
            links=links,
            kind=kind,
            status=status,
            start_time=_otlp_time(span.start),
            end_time=_otlp_time(max(span.end, span.start)),
            instrumentation_scope=_SCOPE,
        )


def _resource(resource: Resource | None) -> Resource:
    global _default_resource
    if resource is not None:
        return resource
    if _default_resource is None:
        # What the environment says (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES); our name
        # only where it names no service (the SDK's unknown_service).
        detected = Resource.create()
        if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
            detected = detected.merge(Resource({"service.name": "phi-session"}))
        _default_resource = detected
    return _default_resource


def session_spans(
    session: Session,
    *,
    capture_content: bool = False,
    resource: Resource | None = None,
    first_ordinals: Mapping[str, int] | None = None,
) -> list[ReadableSpan]:
    """The finished spans of `session`, children before their parents (as an SDK ends them).

    `first_ordinals`: for a part of a session (a drain exported on its own), per loop id,
    how many records of that id the session had before the part's first: the part's
    records of the id are numbered from there, so that each has the span ids it has in
    the whole session's export.
    """
    if not isinstance(session, Session):
        raise TypeError(f"expected a Session, got {type(session).__name__}")
    check_type("capture_content", capture_content, bool)
    check_type("resource", resource, Resource, optional=True)
    check_type("first_ordinals", first_ordinals, Mapping, optional=True)
    for loop_id, first in (first_ordinals or {}).items():
        check_type("first_ordinals keys", loop_id, str)
        check_unsigned(f"first_ordinals[{loop_id!r}]", first)
    chosen = _resource(resource)
    placements = _Placements(session)
    spans: list[ReadableSpan] = []
    # loop id -> the ordinal of its next record
    ordinals: dict[str, int] = dict(first_ordinals) if first_ordinals is not None else {}
    for record in session.loops:
        ordinal = ordinals.get(record.loop_id, 0)
        ordinals[record.loop_id] = ordinal + 1
        spans.extend(_LoopExport(session, record, ordinal, capture_content, chosen, placements).spans())
    return spans


def export_session(
    session: Session,
    exporter: SpanExporter,
    *,
    capture_content: bool = False,
    resource: Resource | None = None,
    first_ordinals: Mapping[str, int] | None = None,
) -> int:
    """Export `session` through `exporter`; returns the number of spans.

    `capture_content` adds messages, system instructions, tool arguments and results, and
    the exact phi-core events (``phi.events``, which make ingest lossless);
    `first_ordinals` is `session_spans`'. Without `resource`, the spans' is the environment's
    (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), of service ``phi-session`` if it
    names none. Raises `ExportError` when the exporter reports failure or raises.
    """
    _check_exporter(exporter)
    spans = session_spans(
        session, capture_content=capture_content, resource=resource, first_ordinals=first_ordinals
    )
    failed = f"{exporter!r} failed to export the {len(spans)} spans of {session.session_id}"
    try:
        result = exporter.export(spans)
    except Exception as error:  # an exporter may raise (a refused connection) instead of reporting
        raise ExportError(f"{failed}: {error}") from error
    if result is not SpanExportResult.SUCCESS:
        raise ExportError(failed)
    return len(spans)


def _check_exporter(exporter: object) -> None:
    if not callable(getattr(exporter, "export", None)):
        raise TypeError(f"exporter must be a SpanExporter, not {type(exporter).__name__}")


class _ExportedRecords:
    """The loop records exported so far, per session: a sink exports each drain of a
    session on its own, and a loop id's record drained after its first (a compaction pass,
    a second parallel evaluation) is numbered after the records exported before it.

    A record is its loop id and `RecordMark`, as in a store's merge: an amendment sends
    records again, and they keep their numbers. Bounded: the latest `_EXPORTED_MEMORY`
    sessions exported; one forgotten numbers its later records from its own drain again
    (span ids of an earlier record's, which they then overwrite at the backend).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the writer thread and a caller's retry both export
        # session id -> loop id -> the marks of its records, in order
        self._sessions: OrderedDict[str, dict[str, list[RecordMark]]] = OrderedDict()

    def first_ordinals(self, session: Session) -> dict[str, int]:
        """`session_spans`' `first_ordinals` of the drain `session`, which counts as exported."""
        with self._lock:
            exported = self._sessions.pop(session.session_id, None) or {}
            self._sessions[session.session_id] = exported  # the latest, forgotten last
            if len(self._sessions) > _EXPORTED_MEMORY:
                self._sessions.popitem(last=False)
            first: dict[str, int] = {}
            for record in session.loops:
                known = exported.setdefault(record.loop_id, [])
                mark = RecordMark.of(record)
                ordinal = mark.position_in(known)
                if ordinal is None:  # a new record (ids are reused a few times at most)
                    ordinal = len(known)
                    known.append(mark)
                first.setdefault(record.loop_id, ordinal)
            return first


class _AwaitingToolCall:
    """Sub-agent sessions exported while their spawn ref named no tool call (the sub-agent
    ended before its spawner's ToolExecutionEnd did): their loop spans went under the
    spawner's loop span. The amendment that names the call holds no loops; it is exported
    merged with what was exported before it, under the same span ids, now under the tool
    span (as `export_session` of the stored session has them). Only a session with records
    its spawner's loop spawned is kept (theirs are the spans that move), and only while
    that amendment may come: not once the recorder says the spawner is recorded elsewhere
    (`forget`). Bounded: the latest `_AWAITING_MEMORY` sessions, and `max_bytes`
    (`held_bytes`); one forgotten stays under its spawner's loop span."""

    def __init__(self, max_bytes: int) -> None:
        self._lock = threading.Lock()  # the writer thread and a caller's retry both export
        # session id -> what was exported, and its `held_bytes`
        self._sessions: OrderedDict[str, tuple[Session, int]] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def completed(self, session: Session) -> Session:
        """`session`, merged after what was exported of it if it names the awaited tool call."""
        spawn = session.parent_spawn_ref
        if spawn is None or not spawn.tool_call_id:
            return session
        with self._lock:
            earlier = self._sessions.get(session.session_id)
        return session if earlier is None else merge_sessions(earlier[0], session)

    def exported(self, session: Session) -> None:
        """`session` (as `completed` made it) was exported: kept while its call is awaited."""
        spawn = session.parent_spawn_ref
        with self._lock:
            earlier = self._forget(session.session_id)
            if spawn is None or spawn.tool_call_id:
                return
            whole = session if earlier is None else merge_sessions(earlier, session)
            if not any(record.parent_loop_id == spawn.parent_loop_id for record in whole.loops):
                return  # no span of it goes under the tool call: nothing to export again
            size = held_bytes(whole)
            self._sessions[session.session_id] = (whole, size)
            self._bytes += size
            while len(self._sessions) > _AWAITING_MEMORY or self._bytes > self._max_bytes:
                self._forget(next(iter(self._sessions)))  # the oldest (this one too, if too large)

    def forget(self, session_id: str) -> None:
        """No amendment naming `session_id`'s tool call is to come."""
        with self._lock:
            self._forget(session_id)

    def _forget(self, session_id: str) -> Session | None:
        """Under `_lock`: stop holding `session_id`; what was held of it."""
        held = self._sessions.pop(session_id, None)
        if held is None:
            return None
        self._bytes -= held[1]
        return held[0]


class _ExportTarget:
    """`export_session` as a save target: the export gets the drain-and-save machinery of
    stores (backlog, retries, exit hook) instead of a second worker of its own."""

    def __init__(
        self, exporter: SpanExporter, capture_content: bool, resource: Resource | None, max_bytes: int
    ) -> None:
        self.exporter = exporter
        self.capture_content = capture_content
        # Made now, not at the first export: that may come at interpreter exit (`close` by
        # the exit hook), when the default resource's detectors can no longer start threads.
        self.resource = _resource(resource)
        self.exported = _ExportedRecords()
        self.awaiting = _AwaitingToolCall(max_bytes)

    def __repr__(self) -> str:
        return f"the exporter {self.exporter!r}"

    def save(self, session: Session) -> None:
        session = self.awaiting.completed(session)
        export_session(
            session,
            self.exporter,
            capture_content=self.capture_content,
            resource=self.resource,
            first_ordinals=self.exported.first_ordinals(session),
        )
        self.awaiting.exported(session)

    async def asave(self, session: Session) -> None:
        await asyncio.to_thread(self.save, session)

    def unlinked(self, gap: SpawnGap) -> None:
        """`LinkingTarget`: the sub-agent `gap` names was recorded apart from its spawner, whose
        tool call this sink's recorder will never name."""
        if gap.header is not None:
            self.awaiting.forget(gap.session_id)


class OtelExportSink:
    """An event sink that records events and exports each session when it completes.

    Give it to a `Tracer` (or any producer) next to the recorder that saves sessions.
    Sessions complete when none of their loops is open (`SessionRecorder.checkpoint`).
    Contract, as for `AutoPersistingRecorder`, whose worker does the export:

    * Calling the sink never waits for the exporter, which runs in a background thread
      without any of our locks held, and never raises `ExportError`.
    * Nothing is dropped: when more than `max_pending_bytes` of sessions wait for the
      exporter, the producer blocks (a logged warning) until it catches up; a failed
      export is retried for `retry_for` seconds, then kept (`failed_sessions`) and tried
      again by `flush` (within its timeout) and `close` (within `retry_for` and a second,
      `CLOSE_GRACE`: on an exporter that is down, those not tried by then stay kept).
    * `flush` waits until every completed session is exported; `close` exports what is
      left (open loops as Aborted) and stops the worker. Both raise `ExportError` for
      sessions the exporter did not take (kept: the next call tries them again). A
      program that exits without `close` closes the sink at exit.

    The exporter stays the caller's. Events after `close` raise `PhiSessionError`.
    """

    wants_deltas = False

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        capture_content: bool = False,
        resource: Resource | None = None,
        config: SessionRecorderConfig | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        retry_for: float = 30.0,
    ) -> None:
        _check_exporter(exporter)
        check_type("capture_content", capture_content, bool)
        check_type("resource", resource, Resource, optional=True)
        self.exporter = exporter
        self.capture_content = capture_content
        self.resource = resource
        self.retry_for = check_seconds("retry_for", retry_for)
        self._worker = AutoPersistingRecorder(
            _ExportTarget(exporter, capture_content, resource, max_pending_bytes),
            config=config,
            max_pending_bytes=max_pending_bytes,
            retry_for=self.retry_for,
        )
        self.recorder = self._worker.recorder

    @checking_entry
    def __call__(self, event: AgentEvent) -> None:
        """Record one event, checked as `SessionRecorder.on_event` checks a hand-built one."""
        self._record(self._worker.on_event, event)

    def on_checked_event(self, event: AgentEvent) -> None:
        """`__call__` for a `Tracer`'s event (`SessionRecorder.on_checked_event`)."""
        self._record(self._worker.on_checked_event, event)

    def _record(self, entry: Callable[[AgentEvent], None], event: AgentEvent) -> None:
        entry(event)
        if type(event) is AgentEnd:  # its session only: a full checkpoint scans every open one
            self._worker.checkpoint(loop_id=event.loop_id)

    @property
    def exported_sessions(self) -> int:
        """Sessions exported so far (one exported at two checkpoints counts twice)."""
        return int(self._worker.stats()["sessions_saved"])

    def failed_sessions(self) -> list[Session]:
        """Sessions the exporter did not take (kept, tried again by `flush` and `close`)."""
        return self._worker.failed_sessions()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every completed session is exported; False if `timeout` seconds passed
        first (None or infinite: no limit).

        Raises `ExportError` if the exporter did not take some of them, tried again within
        what is left of `timeout`: on an exporter that is down, those not tried by then
        stay kept.
        """
        deadline = deadline_of("timeout", timeout)
        # Only an AgentEnd hands its session over at once: a parallel group's end (its
        # selection) completes one too, exported by the worker's next checkpoint otherwise.
        # Within the timeout: behind a lagging exporter, the wait for room has no end.
        self._worker.checkpoint(timeout=seconds_left(deadline))
        if not self._worker.wait_saved(seconds_left(deadline)):
            return False
        self._export_failed(seconds_left(deadline))
        return True

    def close(self) -> None:
        """Export what is left (open loops as Aborted) and stop the worker.

        Raises `ExportError` if the exporter did not take some sessions; a later `close`
        tries them again, for `retry_for` seconds and `CLOSE_GRACE` at most, as the first.
        """
        try:
            self._worker.close()
        except StoreError as error:  # the sessions the exporter did not take, still kept
            raise ExportError(str(error)) from error
        self._export_failed(self.retry_for + CLOSE_GRACE)  # those an earlier close could not send

    def _export_failed(self, within: float | None) -> None:
        """Export the `failed_sessions` again, for `within` seconds at most: on an exporter
        that is down, those not tried by then stay kept."""
        if failed := self._worker.retry_failed(within):
            raise ExportError(
                f"{self.exporter!r} did not take {failed} sessions (or there was no time left to try"
                " them); they are kept in failed_sessions() and tried again by flush and close"
            )
