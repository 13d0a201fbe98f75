"""Conversation content: content blocks, LLM messages, extension messages, tools, requests.

One set of classes serves both JSON forms phi-core uses (wire-format §3.6): the
*plain* form (role first, declaration order; in ``TurnEnd.tool_results`` and request
payloads) and the *agent-message* form (every key sorted, plus optional metadata
such as ``turnId``). The codec picks the form from where a message sits.
All classes are frozen: a message, once recorded, never changes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec.structs import force_setattr

from ._float32 import Float32

U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
"""An unsigned 32-bit integer field."""
U64 = Annotated[int, msgspec.Meta(ge=0)]
"""An unsigned 64-bit integer field (msgspec cannot bound above int64; the codec checks)."""

StopReason = Literal[
    "stop",
    "length",
    "toolUse",
    "error",
    "aborted",
    "maxTurns",
    "userStop",
    "handoff",
    "guardRail",
    "contextCompacted",
    "paused",
]
ThinkingLevel = Literal["off", "minimal", "low", "medium", "high"]
TagKind = Literal["lesson", "finding", "outcome", "checkpoint"]
ProvenanceRole = Literal["user-message", "assistant-response", "tool-call-request", "tool-call-result"]


class _Frozen(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Base of immutable, acyclic records (kept out of the cyclic GC's way)."""


class Usage(_Frozen, frozen=True):
    """Token counters of one model call, a turn, a loop or a session."""

    input: U64
    output: U64
    reasoning: U64 = 0
    cache_read: U64 = 0
    cache_write: U64 = 0
    total_tokens: U64 = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input=self.input + other.input,
            output=self.output + other.output,
            reasoning=self.reasoning + other.reasoning,
            cache_read=self.cache_read + other.cache_read,
            cache_write=self.cache_write + other.cache_write,
            total_tokens=self.total_tokens + other.total_tokens,
        )


ZERO_USAGE = Usage(input=0, output=0)


class TurnId(_Frozen, rename="camel", frozen=True):
    """The turn that produced a message: ``{"loopId": …, "turnIndex": …}``."""

    loop_id: str
    turn_index: U32


class NodeTag(_Frozen, frozen=True):
    """A revert summary annotation attached to a message."""

    kind: TagKind
    text: str
    created_at_turn: U32
    abandoned_node_ids: tuple[U64, ...]


# -- BlockProvenance: where one message of an assembled request came from ----------


class _Provenance(_Frozen, tag_field="kind", frozen=True):
    pass


class SystemPromptBlock(_Provenance, tag="system-prompt", frozen=True):
    pass


class IdentityBlock(_Provenance, tag="identity-block", frozen=True):
    name: str
    order: U32


class MemoryTierBlock(_Provenance, tag="memory-tier", frozen=True):
    tier: str
    record_id: str


class LoopTurnBlock(_Provenance, tag="loop-turn", frozen=True):
    turn_index: U64
    role: ProvenanceRole
    message_index: U64


class SteeringBlock(_Provenance, tag="steering", frozen=True):
    pass


class FollowUpBlock(_Provenance, tag="follow-up", frozen=True):
    pass


class UnknownBlock(_Provenance, tag="unknown", frozen=True):
    pass


BlockProvenance = Union[
    SystemPromptBlock,
    IdentityBlock,
    MemoryTierBlock,
    LoopTurnBlock,
    SteeringBlock,
    FollowUpBlock,
    UnknownBlock,
]

# -- Content blocks -----------------------------------------------------------------


class _Content(_Frozen, tag_field="type", frozen=True):
    pass


class TextContent(_Content, tag="text", frozen=True):
    text: str


class ImageContent(_Content, tag="image", rename={"mime_type": "mimeType"}, frozen=True):
    data: str
    mime_type: str


class ThinkingContent(_Content, tag="thinking", omit_defaults=True, frozen=True):
    thinking: str
    signature: str | None = None


class ToolCall(_Content, tag="toolCall", frozen=True):
    id: str
    name: str
    arguments: Any


Content = Union[TextContent, ImageContent, ThinkingContent, ToolCall]


def text_size(block: object) -> int:
    """The characters of text, thinking or image data a content block holds (0 for a
    tool call): what it weighs in memory, for the budgets that count it."""
    tp = type(block)
    if tp is TextContent:
        return len(block.text)  # type: ignore[attr-defined]
    if tp is ThinkingContent:
        return len(block.thinking)  # type: ignore[attr-defined]
    if tp is ImageContent:
        return len(block.data)  # type: ignore[attr-defined]
    return 0


# -- Messages -------------------------------------------------------------------------


def _message_key(name: str) -> str:
    # LLM messages use camelCase keys, except the snake_case ``error_message``.
    if name == "error_message":
        return name
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


class _LlmMessage(_Frozen, tag_field="role", omit_defaults=True, rename=_message_key, frozen=True):
    """Fields shared by the three LLM roles: agent-side metadata, all optional.

    They are written only in the agent-message form, and only when set.
    """

    turn_id: TurnId | None = None
    node_id: U64 | None = None
    parent_id: U64 | None = None
    tags: tuple[NodeTag, ...] = ()
    provenance_hint: BlockProvenance | None = None
    phi_session_replayed: bool = False
    """phi-session's own: an assistant reply a replay served from its recording instead of
    calling a model (`phi_session.model.is_replayed`). phi-core ignores the key."""


class UserMessage(_LlmMessage, tag="user", kw_only=True, frozen=True):
    content: tuple[Content, ...]
    timestamp: U64
    """Milliseconds since the Unix epoch."""


class AssistantMessage(_LlmMessage, tag="assistant", kw_only=True, frozen=True):
    content: tuple[Content, ...]
    stop_reason: StopReason
    model: str
    provider: str
    usage: Usage
    timestamp: U64
    error_message: str | None = None


class ToolResultMessage(_LlmMessage, tag="toolResult", kw_only=True, frozen=True):
    tool_call_id: str
    tool_name: str
    content: tuple[Content, ...]
    is_error: bool
    timestamp: U64


class ExtensionMessage(_Frozen, tag_field="role", tag="extension", frozen=True):
    """An application-only message that never reaches the model.

    phi-core accepts any ``role`` string here; `role` gives it back.
    """

    kind: str
    data: Any

    @property
    def role(self) -> str:
        return type(self).__struct_config__.tag  # type: ignore[return-value]


Message = Union[UserMessage, AssistantMessage, ToolResultMessage]
"""An LLM-protocol message (phi-core's ``Message``)."""

AgentMessage = Union[UserMessage, AssistantMessage, ToolResultMessage, ExtensionMessage]
"""What agent loops exchange: an LLM message (with metadata) or an extension message."""

LLM_MESSAGE_TYPES = (UserMessage, AssistantMessage, ToolResultMessage)

_extension_classes: dict[str, type[ExtensionMessage]] = {"extension": ExtensionMessage}
_EXTENSION_CLASS_CACHE = 64


def extension_message(role: str, kind: str, data: Any = None) -> ExtensionMessage:
    """An extension message with any ``role`` (phi-core's constructor uses ``"extension"``)."""
    cls = _extension_classes.get(role)
    if cls is None:
        # The role is the class's tag, so an unusual role gets its own subclass; a few
        # are cached, but hostile input with endless roles must not grow memory.
        cls = type(f"ExtensionMessage[{role}]", (ExtensionMessage,), {}, tag=role)
        if len(_extension_classes) < _EXTENSION_CLASS_CACHE:
            _extension_classes[role] = cls
    return cls(kind=kind, data=data)


def message_role(message: AgentMessage) -> str:
    """The ``role`` string of any agent message."""
    return type(message).__struct_config__.tag  # type: ignore[return-value]


# -- Tools and request capture -------------------------------------------------------


class ToolResult(_Frozen, frozen=True):
    """What a tool returned, before it becomes a ``toolResult`` message."""

    content: tuple[Content, ...]
    details: Any = None
    child_loop_id: str | msgspec.UnsetType | None = msgspec.UNSET
    """Set by sub-agent tools only: the loop the tool ran."""

    def __post_init__(self) -> None:
        if self.child_loop_id is None:  # "skipped when empty": null reads as absent
            force_setattr(self, "child_loop_id", msgspec.UNSET)


class ToolDefinition(_Frozen, frozen=True):
    name: str
    description: str
    parameters: Any


class _ResponseFormat(_Frozen, tag_field="kind", frozen=True):
    pass


class TextFormat(_ResponseFormat, tag="text", frozen=True):
    pass


class JsonObjectFormat(_ResponseFormat, tag="json-object", frozen=True):
    pass


class JsonSchemaFormat(_ResponseFormat, tag="json-schema", frozen=True):
    schema: Any
    name: str
    strict: bool


ResponseFormat = Union[TextFormat, JsonObjectFormat, JsonSchemaFormat]


class AnnotatedRequestPayload(_Frozen, kw_only=True, frozen=True):
    """The exact request sent to the model in one turn."""

    system_prompt: str
    messages: tuple[Message, ...]
    provenance: tuple[BlockProvenance, ...]
    tools: tuple[ToolDefinition, ...]
    model_id: str
    thinking_level: ThinkingLevel
    max_tokens: U32 | None = None
    temperature: Float32 | None = None
    response_format: ResponseFormat
