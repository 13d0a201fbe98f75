"""The phi-core 0.10 ``AgentEvent`` vocabulary, as frozen typed records.

Every event is a `msgspec.Struct` tagged by ``"type"`` with its fields in phi-core's
order, so encoding one gives phi-core's bytes. Build events with keyword arguments.
``timestamp`` is required wherever phi-core requires it, when constructing as when
decoding (by this library or by your own msgspec decoder): pass
``timestamp=Timestamp.now()`` for "now". A default would be filled silently by every
decoder of these types, and a missing timestamp in phi-core's JSON is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from operator import attrgetter, is_
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol, TypeVar, Union

import msgspec
from msgspec.structs import force_setattr

from ._checks import check_text, check_type, plain_text
from ._collector import release_leaf
from ._float32 import Float32
from ._time import Timestamp
from .errors import InvalidArgument
from .messages import (
    U32,
    U64,
    AgentMessage,
    AnnotatedRequestPayload,
    Message,
    ThinkingLevel,
    ToolResult,
    Usage,
)

__all__ = [
    "COMPACTION",
    "DEFAULT",
    "EVENT_TYPES",
    "INITIAL",
    "MESSAGE_FIELDS",
    "MESSAGE_FIELDS_BY_TAG",
    "AgentEnd",
    "AgentEvent",
    "AgentStart",
    "ApiProtocol",
    "CompactionEnded",
    "CompactionStarted",
    "ContinuationKind",
    "Float32",
    "InputRejected",
    "LoopConfigSnapshot",
    "MessageEnd",
    "MessageField",
    "MessageMapper",
    "MessageStart",
    "MessageUpdate",
    "ParallelLoopEnd",
    "ParallelLoopStart",
    "ProgressMessage",
    "PrunApplied",
    "RevertApplied",
    "RevertCategory",
    "SessionFormation",
    "StreamDelta",
    "Timestamp",
    "ToolExecutionEnd",
    "ToolExecutionStart",
    "ToolExecutionUpdate",
    "TurnEnd",
    "TurnRequest",
    "TurnStart",
    "TurnTrigger",
    "map_messages",
    "message_mappers",
]

TurnTrigger = Literal["User", "SubAgent", "Continuation", "Branch"]
"""What started a turn. phi-core also reads the legacy ``"FollowUp"`` as ``"Continuation"``."""

ApiProtocol = Literal[
    "anthropic_messages",
    "open_ai_completions",
    "open_ai_responses",
    "azure_open_ai_responses",
    "google_generative_ai",
    "google_vertex",
    "bedrock_converse_stream",
]
RevertCategory = Literal["failure", "tangent", "completion", "step-summary"]

# -- Externally tagged enums ---------------------------------------------------------


def _variant(value: Any, type_name: str) -> tuple[str, Any]:
    """Split serde's externally tagged form into (variant name, payload)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        ((name, payload),) = value.items()
        return name, payload
    raise ValueError(f"expected a {type_name} (a string or a one-key object)")


def _struct_payload(payload: Any, fields: tuple[str, ...], variant: str) -> dict[str, Any]:
    """The payload of a data-carrying variant: an object, or (phi-core leniency) an array."""
    if isinstance(payload, list):
        if len(payload) != len(fields):
            raise ValueError(f"{variant}: expected {len(fields)} elements")
        return dict(zip(fields, payload, strict=True))
    if not isinstance(payload, dict):
        raise ValueError(f"{variant} carries data: expected an object")
    return payload


def _unit_payload(payload: Any, variant: str) -> None:
    if payload is not None:
        raise ValueError(f"{variant} carries no data")


def _tag_field(payload: dict[str, Any], key: str, variant: str) -> str:
    if key not in payload:
        raise ValueError(f"{variant}: missing required field `{key}`")
    value = payload[key]
    if not isinstance(value, str):
        raise ValueError(f"{variant}.{key}: expected a string")
    return value


# The types of the values a `_Variant` that sets ``_LEAF`` may hold and still be untracked.
_LEAF_VALUES = frozenset({str, int, type(None), Timestamp})


class _Variant:
    """A value of one of serde's externally tagged enums: immutable, compared by value.

    Subclasses name their attributes in ``_FIELDS`` (equality, hashing and repr use them).
    A class that sets ``_LEAF`` holds only strings, numbers, None and timestamps: its
    instances can never be part of a cycle and are kept out of the cyclic collector
    (`phi_session._collector`), as are the events and records holding them. A subclass
    of it may hold more and stays tracked, as does an instance given a value of another
    type (a `Timestamp` subclass, say).
    """

    __slots__ = ()
    _FIELDS: tuple[str, ...]

    def _init(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if "_LEAF" in type(self).__dict__ and all(type(v) in _LEAF_VALUES for v in values.values()):
            release_leaf(self)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = [repr(v) for v in self._values() if v is not None]
        return f"{type(self).__name__}({', '.join(shown)})"


class ContinuationKind(_Variant):
    """How a loop relates to the loop it continues.

    ``kind`` is one of ``"Initial"``, ``"Default"``, ``"Rerun"``, ``"Branch"``,
    ``"Compaction"``; ``tag`` is the opaque tag of a Rerun or Branch. Use the
    constants `INITIAL`, `DEFAULT`, `COMPACTION` or `ContinuationKind.rerun(tag)` /
    `ContinuationKind.branch(tag)`.
    """

    __slots__ = ("kind", "tag")
    _FIELDS = ("kind", "tag")
    _LEAF = True
    UNIT_KINDS = ("Initial", "Default", "Compaction")
    TAGGED_KINDS = ("Rerun", "Branch")
    kind: str
    tag: str | None

    def __init__(self, kind: str, tag: str | None = None) -> None:
        if kind in self.UNIT_KINDS:
            if tag is not None:
                raise InvalidArgument(f"{kind} carries no tag")
        elif kind in self.TAGGED_KINDS:
            if tag is None:
                raise InvalidArgument(f"{kind} needs a string tag")
            tag = check_text(f"a {kind} tag", tag)
        else:
            check_type("a continuation kind", kind, str)
            raise InvalidArgument(f"unknown continuation kind {kind!r}")
        self._init(kind=plain_text(kind), tag=tag)

    @classmethod
    def rerun(cls, tag: str) -> ContinuationKind:
        return cls("Rerun", tag)

    @classmethod
    def branch(cls, tag: str) -> ContinuationKind:
        return cls("Branch", tag)

    @classmethod
    def from_json(cls, value: Any) -> ContinuationKind:
        name, payload = _variant(value, "ContinuationKind")
        if name in cls.UNIT_KINDS:
            _unit_payload(payload, name)
            return _UNIT_CONTINUATIONS[name]
        if name in cls.TAGGED_KINDS:
            if payload is None:
                raise ValueError(f'{name} carries data: expected {{"{name}": {{"tag": …}}}}')
            return cls(name, _tag_field(_struct_payload(payload, ("tag",), name), "tag", name))
        raise ValueError(f"unknown variant {name!r} of ContinuationKind")

    def to_json(self) -> Any:
        return self.kind if self.tag is None else {self.kind: {"tag": self.tag}}


INITIAL = ContinuationKind("Initial")
DEFAULT = ContinuationKind("Default")
COMPACTION = ContinuationKind("Compaction")
_UNIT_CONTINUATIONS = {"Initial": INITIAL, "Default": DEFAULT, "Compaction": COMPACTION}


class _Fragment(msgspec.Struct, frozen=True, gc=False):
    """What a `StreamDelta` variant carries, spelled as phi-core writes it."""

    delta: str


# phi-core also reads a variant's payload as an array of its fields (`{"Text": ["…"]}`);
# decoding accepts that spelling and `StreamDelta.__post_init__` turns it into a `_Fragment`.
_Payload = Union[_Fragment, tuple[str], msgspec.UnsetType]


class _StreamDeltaType(msgspec.StructMeta):
    """Lets ``StreamDelta(kind, delta)`` read as it always has, over the wire-shaped fields."""

    def __call__(cls, kind: str, delta: str) -> Any:
        build = _DELTA_BUILDERS.get(kind) if isinstance(kind, str) else None
        if build is None:
            check_type("a stream delta kind", kind, str)
            raise InvalidArgument(f"unknown stream delta kind {kind!r}")
        if not isinstance(delta, str):
            raise TypeError(f"a stream delta is a str, not {type(delta).__name__}")
        return build(delta)


class StreamDelta(
    msgspec.Struct,
    frozen=True,
    gc=False,
    omit_defaults=True,
    forbid_unknown_fields=True,
    metaclass=_StreamDeltaType,
):
    """One streaming fragment: ``kind`` is ``"Text"``, ``"Thinking"`` or ``"ToolCallDelta"``.

    Build one with ``StreamDelta(kind, delta)`` or `StreamDelta.text` / `.thinking` /
    `.tool_call`. It is a msgspec Struct whose one set field is named after its kind, which
    is phi-core's externally tagged spelling (``{"Text": {"delta": "…"}}``): msgspec writes
    and reads it directly, and, untracked by the cyclic collector, the thousands of chunks a
    recorder keeps cost the collector nothing.
    """

    Text: _Payload = msgspec.UNSET
    Thinking: _Payload = msgspec.UNSET
    ToolCallDelta: _Payload = msgspec.UNSET

    KINDS: ClassVar[tuple[str, ...]] = ("Text", "Thinking", "ToolCallDelta")

    if TYPE_CHECKING:

        def __init__(self, kind: str, delta: str) -> None: ...

    def __post_init__(self) -> None:
        # Construction always sets one fragment; this is for what a decoder reads.
        text, thinking, tool_call = self.Text, self.Thinking, self.ToolCallDelta
        unset = msgspec.UNSET
        if (text is unset) + (thinking is unset) + (tool_call is unset) != 2:
            raise ValueError("a StreamDelta has exactly one of Text, Thinking or ToolCallDelta")
        if type(text) is tuple or type(thinking) is tuple or type(tool_call) is tuple:
            force_setattr(self, self.kind, _Fragment(self._payload()[0]))

    def _payload(self) -> Any:
        text = self.Text
        if text is not msgspec.UNSET:
            return text
        thinking = self.Thinking
        return thinking if thinking is not msgspec.UNSET else self.ToolCallDelta

    @property
    def kind(self) -> str:
        if self.Text is not msgspec.UNSET:
            return "Text"
        return "Thinking" if self.Thinking is not msgspec.UNSET else "ToolCallDelta"

    @property
    def delta(self) -> str:
        fragment: _Fragment = self._payload()
        return fragment.delta

    @classmethod
    def text(cls, delta: str) -> StreamDelta:
        return _text_delta(delta)

    @classmethod
    def thinking(cls, delta: str) -> StreamDelta:
        return _thinking_delta(delta)

    @classmethod
    def tool_call(cls, delta: str) -> StreamDelta:
        return _tool_call_delta(delta)

    @classmethod
    def from_json(cls, value: Any) -> StreamDelta:
        """Read phi-core's JSON form (already parsed); ``ValueError`` when it is not one."""
        try:
            return msgspec.convert(value, cls)
        except msgspec.ValidationError as error:
            raise ValueError(f"invalid StreamDelta: {error}") from None

    def to_json(self) -> Any:
        return {self.kind: {"delta": self.delta}}

    def __repr__(self) -> str:
        return f"StreamDelta({self.kind!r}, {self.delta!r})"

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (StreamDelta, (self.kind, self.delta))


_plain_new = msgspec.StructMeta.__call__  # the Struct's own constructor, not `_StreamDeltaType`'s
_TEXT: StreamDelta = _plain_new(StreamDelta, Text=_Fragment(""))
_THINKING: StreamDelta = _plain_new(StreamDelta, Thinking=_Fragment(""))
_TOOL_CALL: StreamDelta = _plain_new(StreamDelta, ToolCallDelta=_Fragment(""))


# A producer builds one delta per streamed token: these skip ``StreamDelta(kind, delta)``'s
# checks, which a known kind does not need, and `__post_init__` (`replace` would run it),
# which only what a decoder reads needs: a copy of the kind's template, its fragment set.
_copy_text: Callable[[], StreamDelta] = _TEXT.__copy__  # type: ignore[attr-defined]
_copy_thinking: Callable[[], StreamDelta] = _THINKING.__copy__  # type: ignore[attr-defined]
_copy_tool_call: Callable[[], StreamDelta] = _TOOL_CALL.__copy__  # type: ignore[attr-defined]


def _text_delta(delta: str) -> StreamDelta:
    built = _copy_text()
    force_setattr(built, "Text", _Fragment(delta))
    return built


def _thinking_delta(delta: str) -> StreamDelta:
    built = _copy_thinking()
    force_setattr(built, "Thinking", _Fragment(delta))
    return built


def _tool_call_delta(delta: str) -> StreamDelta:
    built = _copy_tool_call()
    force_setattr(built, "ToolCallDelta", _Fragment(delta))
    return built


_DELTA_BUILDERS: dict[str, Callable[[str], StreamDelta]] = {
    "Text": _text_delta,
    "Thinking": _thinking_delta,
    "ToolCallDelta": _tool_call_delta,
}


def delta_builder(kind: str) -> Callable[[str], StreamDelta]:
    """What builds a `StreamDelta` of the valid `kind` from its text, unchecked."""
    return _DELTA_BUILDERS[kind]


class SessionFormation(_Variant):
    """Why a session was opened: ``Explicit``, ``FirstLoop`` or ``InactivityTimeout``."""

    __slots__ = ("kind", "previous_session_id", "threshold_secs", "timestamp")
    _FIELDS = ("kind", "timestamp", "threshold_secs", "previous_session_id")
    _LEAF = True
    KINDS = ("Explicit", "FirstLoop", "InactivityTimeout")
    kind: str
    timestamp: Timestamp
    threshold_secs: int | None
    previous_session_id: str | None

    def __init__(
        self,
        kind: str,
        timestamp: Timestamp,
        threshold_secs: int | None = None,
        previous_session_id: str | None = None,
    ) -> None:
        if kind not in self.KINDS:
            check_type("a session formation", kind, str)
            raise InvalidArgument(f"unknown session formation {kind!r}")
        if kind == "InactivityTimeout":
            if threshold_secs is not None and (
                not isinstance(threshold_secs, int) or isinstance(threshold_secs, bool)
            ):
                raise TypeError("InactivityTimeout.threshold_secs: expected an unsigned integer")
            if threshold_secs is None or not (0 <= threshold_secs <= _U64_MAX):
                raise InvalidArgument("InactivityTimeout.threshold_secs: expected an unsigned integer")
        elif threshold_secs is not None or previous_session_id is not None:
            raise InvalidArgument(f"{kind} carries only a timestamp")
        self._init(
            kind=kind,
            timestamp=timestamp,
            threshold_secs=threshold_secs,
            previous_session_id=previous_session_id,
        )

    @classmethod
    def first_loop(cls, timestamp: Timestamp) -> SessionFormation:
        return cls("FirstLoop", timestamp)

    @classmethod
    def explicit(cls, timestamp: Timestamp) -> SessionFormation:
        return cls("Explicit", timestamp)

    @classmethod
    def inactivity_timeout(
        cls, threshold_secs: int, previous_session_id: str | None, timestamp: Timestamp
    ) -> SessionFormation:
        return cls("InactivityTimeout", timestamp, threshold_secs, previous_session_id)

    @classmethod
    def from_json(cls, value: Any) -> SessionFormation:
        if not isinstance(value, dict):
            raise ValueError('expected a SessionFormation object such as {"FirstLoop": {…}}')
        name, payload = _variant(value, "SessionFormation")
        if name not in cls.KINDS:
            raise ValueError(f"unknown variant {name!r} of SessionFormation")
        if name == "InactivityTimeout":
            fields = _struct_payload(payload, ("threshold_secs", "previous_session_id", "timestamp"), name)
            if "threshold_secs" not in fields:
                raise ValueError(f"{name}: missing required field `threshold_secs`")
            previous = fields.get("previous_session_id")
            if previous is not None and not isinstance(previous, str):
                raise ValueError(f"{name}.previous_session_id: expected a string or null")
            return cls(name, _timestamp_field(fields, name), fields["threshold_secs"], previous)
        return cls(name, _timestamp_field(_struct_payload(payload, ("timestamp",), name), name))

    def to_json(self) -> Any:
        if self.kind == "InactivityTimeout":
            return {
                self.kind: _InactivityPayload(
                    threshold_secs=self.threshold_secs or 0,
                    previous_session_id=self.previous_session_id,
                    timestamp=self.timestamp,
                )
            }
        return {self.kind: _TimestampPayload(timestamp=self.timestamp)}


_U64_MAX = 2**64 - 1


class _TimestampPayload(msgspec.Struct, frozen=True, kw_only=True):
    timestamp: Timestamp


class _InactivityPayload(msgspec.Struct, frozen=True, kw_only=True):
    # Declared in phi-core's key order (a plain dict would be written sorted).
    threshold_secs: int
    previous_session_id: str | None
    timestamp: Timestamp


def _timestamp_field(payload: dict[str, Any], variant: str) -> Timestamp:
    if "timestamp" not in payload:
        raise ValueError(f"{variant}: missing required field `timestamp`")
    return Timestamp.parse(payload["timestamp"])


# -- Records carried by events --------------------------------------------------------


class LoopConfigSnapshot(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Which model and settings ran a loop (``config_id`` is always written, maybe null)."""

    model: str
    provider: str
    config_id: str | None = None
    name: str | msgspec.UnsetType | None = msgspec.UNSET
    api: ApiProtocol | msgspec.UnsetType | None = msgspec.UNSET
    base_url: str | msgspec.UnsetType | None = msgspec.UNSET
    reasoning: bool | msgspec.UnsetType | None = msgspec.UNSET
    context_window: U32 | msgspec.UnsetType | None = msgspec.UNSET
    max_tokens: U32 | msgspec.UnsetType | None = msgspec.UNSET
    thinking_level: ThinkingLevel | msgspec.UnsetType | None = msgspec.UNSET
    temperature: Float32 | msgspec.UnsetType | None = msgspec.UNSET

    def __post_init__(self) -> None:
        # "Skipped when empty": null on input means absent; never write null back.
        for name in _SNAPSHOT_OPTIONAL:
            if getattr(self, name) is None:
                force_setattr(self, name, msgspec.UNSET)
        temperature = self.temperature
        if isinstance(temperature, float) and not isinstance(temperature, Float32):
            force_setattr(self, "temperature", Float32(temperature))


_SNAPSHOT_OPTIONAL = (
    "name",
    "api",
    "base_url",
    "reasoning",
    "context_window",
    "max_tokens",
    "thinking_level",
    "temperature",
)

# -- Events ---------------------------------------------------------------------------


class _Event(msgspec.Struct, frozen=True, kw_only=True, gc=False, tag_field="type", tag=True):
    pass


class AgentStart(_Event, kw_only=True, frozen=True, gc=True):  # holds user metadata
    """A loop begins."""

    agent_id: str
    session_id: str
    loop_id: str
    parent_loop_id: str | None = None
    continuation_kind: ContinuationKind = INITIAL
    timestamp: Timestamp
    metadata: Any = None
    config_snapshot: LoopConfigSnapshot | msgspec.UnsetType | None = msgspec.UNSET
    formation: SessionFormation | msgspec.UnsetType = msgspec.UNSET
    """phi-session extension: why the session was opened (ignored by phi-core)."""

    def __post_init__(self) -> None:
        if self.config_snapshot is None:
            force_setattr(self, "config_snapshot", msgspec.UNSET)


class AgentEnd(_Event, kw_only=True, frozen=True):
    """A loop ends; ``rejection`` is set when the initial input was rejected."""

    loop_id: str
    messages: tuple[AgentMessage, ...]
    usage: Usage
    timestamp: Timestamp
    rejection: str | None = None
    error: str | msgspec.UnsetType = msgspec.UNSET
    """phi-session extension: the loop failed with this error (ignored by phi-core)."""


class TurnStart(_Event, kw_only=True, frozen=True):
    loop_id: str
    turn_index: U32
    timestamp: Timestamp
    triggered_by: TurnTrigger | Literal["FollowUp"]

    def __post_init__(self) -> None:
        if self.triggered_by == "FollowUp":
            force_setattr(self, "triggered_by", "Continuation")


class TurnRequest(_Event, kw_only=True, frozen=True):
    """The fully assembled request of a turn."""

    loop_id: str
    turn_index: U32
    payload: AnnotatedRequestPayload
    timestamp: Timestamp


class TurnEnd(_Event, kw_only=True, frozen=True):
    loop_id: str
    message: AgentMessage
    usage: Usage
    timestamp: Timestamp
    tool_results: tuple[Message, ...] = ()


class MessageStart(_Event, kw_only=True, frozen=True):
    loop_id: str
    message: AgentMessage


class MessageUpdate(_Event, kw_only=True, frozen=True):
    """One streaming delta of the message being generated."""

    loop_id: str
    message: AgentMessage
    delta: StreamDelta


class MessageEnd(_Event, kw_only=True, frozen=True):
    loop_id: str
    message: AgentMessage


class ToolExecutionStart(_Event, kw_only=True, frozen=True):
    loop_id: str
    tool_call_id: str
    tool_name: str
    args: Any


class ToolExecutionUpdate(_Event, kw_only=True, frozen=True):
    loop_id: str
    tool_call_id: str
    tool_name: str
    partial_result: ToolResult


class ToolExecutionEnd(_Event, kw_only=True, frozen=True):
    loop_id: str
    tool_call_id: str
    tool_name: str
    result: ToolResult
    is_error: bool
    child_loop_id: str | None = None


class ProgressMessage(_Event, kw_only=True, frozen=True):
    loop_id: str
    tool_call_id: str
    tool_name: str
    text: str


class InputRejected(_Event, kw_only=True, frozen=True):
    loop_id: str
    reason: str


class ParallelLoopStart(_Event, kw_only=True, frozen=True):
    session_id: str
    loop_ids: tuple[str, ...]
    timestamp: Timestamp


class ParallelLoopEnd(_Event, kw_only=True, frozen=True):
    session_id: str
    selected_loop_id: str
    selected_config_index: U64
    evaluation_usage: Usage
    timestamp: Timestamp


class CompactionStarted(_Event, kw_only=True, frozen=True):
    loop_id: str
    estimated_tokens: U64
    message_count: U64
    timestamp: Timestamp


class PrunApplied(_Event, kw_only=True, frozen=True):
    loop_id: str
    tokens_removed: U64
    messages_removed: U64
    memo: str | None = None
    pruned_timestamps: tuple[U64, ...]
    timestamp: Timestamp


class RevertApplied(_Event, kw_only=True, frozen=True):
    loop_id: str
    category: RevertCategory
    target: U64 | None = None
    abandoned_node_ids: tuple[U64, ...]
    summary: str | None = None
    applied: bool
    reason: str | None = None
    timestamp: Timestamp


class CompactionEnded(_Event, kw_only=True, frozen=True):
    loop_id: str
    messages_before: U64
    messages_after: U64
    estimated_tokens_before: U64
    estimated_tokens_after: U64
    loops_compacted: U64
    timestamp: Timestamp


AgentEvent = Union[
    AgentStart,
    AgentEnd,
    TurnStart,
    TurnRequest,
    TurnEnd,
    MessageStart,
    MessageUpdate,
    MessageEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    ToolExecutionEnd,
    ProgressMessage,
    InputRejected,
    ParallelLoopStart,
    ParallelLoopEnd,
    CompactionStarted,
    PrunApplied,
    RevertApplied,
    CompactionEnded,
]
"""Any of the 19 event types of phi-core 0.10."""

EVENT_TYPES: tuple[type, ...] = AgentEvent.__args__  # type: ignore[attr-defined]
"""The 19 event classes, in phi-core's declaration order."""


# -- Where events carry messages ------------------------------------------------------


class MessageField(NamedTuple):
    """A field of an event type that carries messages; its name is also its JSON key.

    * `many`: a tuple of messages rather than one message.
    * `agent`: messages in the agent-message form (`AgentMessage`: metadata such as
      ``turnId``, extension messages, every key written sorted, read leniently by
      phi-core); otherwise in the plain form (`Message`: record objects without
      agent metadata).
    * `within`: the messages are this field of the field's value (the ``messages``
      of ``TurnRequest.payload``).
    """

    name: str
    many: bool = False
    agent: bool = True
    within: str | None = None


MESSAGE_FIELDS: dict[type, tuple[MessageField, ...]] = {
    MessageStart: (MessageField("message"),),
    MessageUpdate: (MessageField("message"),),
    MessageEnd: (MessageField("message"),),
    TurnEnd: (MessageField("message"), MessageField("tool_results", many=True, agent=False)),
    AgentEnd: (MessageField("messages", many=True),),
    TurnRequest: (MessageField("payload", many=True, agent=False, within="messages"),),
}
"""Which fields of which event types carry messages, in which form: the one statement
of it that encoding, decoding (lenient and strict), the redactor and `withhold` follow."""

MESSAGE_FIELDS_BY_TAG: dict[str, tuple[MessageField, ...]] = {
    tp.__name__: fields for tp, fields in MESSAGE_FIELDS.items()
}
"""`MESSAGE_FIELDS` by the events' JSON ``"type"`` tag, for code that reads JSON trees."""

_E = TypeVar("_E", bound=msgspec.Struct)
_S = TypeVar("_S", bound=msgspec.Struct)
_MessageFn = Callable[[Any], Any]
_MessagesFn = Callable[[tuple[Any, ...]], tuple[Any, ...]]


def map_messages(
    event: _E, fn: _MessageFn, *, agent: bool | None = None, many: _MessagesFn | None = None
) -> _E:
    """`event` with every message in its message fields replaced by ``fn(message)``.

    `agent` limits this to the agent-form (True) or the plain-form (False) fields.
    `many`, if given, maps a whole tuple of messages instead (``many(messages)``,
    returning the very same tuple when nothing changed), for callers that can do a
    long history faster than message by message.
    Returns `event` itself when `fn` returns every message unchanged.
    """
    mapper = _MAPPERS[agent].get(type(event))
    return event if mapper is None else mapper(event, fn, many)


class MessageMapper(Protocol):
    """`map_messages` for events of one type: ``mapper(event, fn[, many])``."""

    def __call__(self, event: Any, fn: Callable[[Any], Any], many: _MessagesFn | None = None) -> Any: ...


def message_mappers(*, agent: bool | None = None) -> Mapping[type, MessageMapper]:
    """`map_messages` per event type that has message fields (of the form `agent` selects),
    for loops over many events: one lookup, no call for events without messages."""
    return _MAPPERS[agent]


def _map_fields(
    fields: tuple[MessageField, ...], event: _E, fn: _MessageFn, many: _MessagesFn | None = None
) -> _E:
    result = event
    for name, is_many, _, within in fields:
        value = getattr(event, name)
        messages = value if within is None else getattr(value, within)
        mapped = _map_many(messages, fn, many) if is_many else fn(messages)
        if mapped is messages:
            continue
        if within is not None:
            mapped = _replaced(value, within, mapped)
        result = _replaced(result, name, mapped) if result is event else _set(result, name, mapped)
    return result


def _map_many(messages: tuple[Any, ...], fn: _MessageFn, many: _MessagesFn | None) -> tuple[Any, ...]:
    """`messages` mapped by `many` if given, else one by one by `fn`; `messages` itself
    when nothing changed."""
    if many is not None:
        return many(messages)
    mapped = tuple(map(fn, messages))
    return messages if all(map(is_, mapped, messages)) else mapped


def _mapper(fields: tuple[MessageField, ...]) -> MessageMapper:
    """`map_messages` for events with these message fields, built once per event type."""
    if any(field.within is not None for field in fields):
        return partial(_map_fields, fields)
    if len(fields) == 1 and not fields[0].many:
        # One message, as in most events with any: on encoding's and the redactor's hot path.
        name = fields[0].name
        get = attrgetter(name)

        def one(event: Any, fn: _MessageFn, many: _MessagesFn | None = None) -> Any:
            message = get(event)
            mapped = fn(message)
            if mapped is message:
                return event
            fresh = event.__copy__()  # as _replaced does, inline on this hot path
            force_setattr(fresh, name, mapped)
            return fresh

        return one
    if len(fields) == 2 and not fields[0].many and fields[1].many:
        # A message and a tuple of them (``TurnEnd``: every turn's end), in one step.
        name, names = fields[0].name, fields[1].name
        get_both = attrgetter(name, names)

        def one_and_many(event: Any, fn: _MessageFn, many: _MessagesFn | None = None) -> Any:
            message, messages = get_both(event)
            mapped, mapped_many = fn(message), _map_many(messages, fn, many)
            if mapped is message and mapped_many is messages:
                return event
            fresh = event.__copy__()
            force_setattr(fresh, name, mapped)
            force_setattr(fresh, names, mapped_many)
            return fresh

        return one_and_many
    return partial(_map_fields, fields)


_MAPPERS: dict[bool | None, dict[type, MessageMapper]] = {
    agent: {
        tp: _mapper(kept)
        for tp, fields in MESSAGE_FIELDS.items()
        if (kept := tuple(f for f in fields if agent is None or f.agent is agent))
    }
    for agent in (None, True, False)
}


def _replaced(struct: _S, name: str, value: Any) -> _S:
    """A copy of `struct` with field `name` set to `value`.

    As ``msgspec.structs.replace(struct, **{name: value})`` does, in a fraction of
    the time that takes with a keyword built at run time."""
    fresh: _S = struct.__copy__()  # type: ignore[attr-defined]
    return _set(fresh, name, value)


def _set(fresh: _S, name: str, value: Any) -> _S:
    force_setattr(fresh, name, value)  # `fresh` is a copy no one else holds yet
    return fresh
