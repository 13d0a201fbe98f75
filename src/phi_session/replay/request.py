"""What a model was asked at one turn (`RequestShape`), and how two requests are compared.

A replay model (one per framework, or `RecordedModel` for a hand loop) turns the
framework's request into a `RequestShape` and hands it to `ReplayCursor.respond`.
Build it so that it says what the *model* sees:

* `system_prompt`: the system prompt / instructions, None when the framework's
  request does not let you know it (it is then not compared);
* `messages`: the conversation sent, oldest first, *without* the system prompt:
  user messages, the assistant's earlier replies (text and tool calls with their
  ids), tool results (call id and content);
* `tools`: the tools offered, None when not known (then not compared).

Comparison (`compare_messages`, `compare_tools`) looks only at what reaches the
model, normalised: roles; text (the text blocks of a message joined); images
(MIME type and data); tool calls (id, name, arguments as JSON values, a JSON
string being read as its value); tool results (call id and content). An empty
call id (of a call or a result) is unknown and matches any id: Google ADK sends the
model no ids for the calls it numbered itself. Ignored:
timestamps, usage, stop reasons, model and provider names, turn ids, node ids,
provenance, ``is_error`` and a result's tool name (most providers send neither),
and extension messages (never sent to a model). Thinking is compared only when both
sides carry it for that message: many frameworks drop reasoning from the history
they resend. Tools are compared by name, description and parameter schema, in any
order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import msgspec

from ..diff import same_json
from ..messages import (
    LLM_MESSAGE_TYPES,
    AgentMessage,
    AnnotatedRequestPayload,
    ImageContent,
    Message,
    TextContent,
    TextFormat,
    ThinkingContent,
    ToolCall,
    ToolDefinition,
    ToolResultMessage,
)

__all__ = [
    "Normalizer",
    "RequestShape",
    "clip",
    "compare_messages",
    "compare_tools",
    "normal_arguments",
    "reaches_model",
    "summarize",
]

_SUMMARY_LIMIT = 160


class RequestShape(msgspec.Struct, frozen=True, kw_only=True):
    """What a model was asked at one turn (see the module docstring for how to fill it)."""

    system_prompt: str | None = None
    """The system prompt; None: not known (not compared)."""
    messages: tuple[AgentMessage, ...] = ()
    """The full context sent, oldest first, without the system prompt."""
    tools: tuple[ToolDefinition, ...] | None = None
    """The tools offered; None: not known (not compared)."""

    @classmethod
    def from_payload(cls, payload: AnnotatedRequestPayload) -> RequestShape:
        """The shape of a captured request (``TurnRequest`` / ``Turn.request_payload``)."""
        return cls(system_prompt=payload.system_prompt, messages=payload.messages, tools=payload.tools)

    def to_payload(self, model_id: str, **options: Any) -> AnnotatedRequestPayload:
        """This request as a captured one, for ``LoopScope.turn(request=...)`` /
        ``TurnScope.request``: then a replay compares its system prompt and tools too.

        Unknown parts are recorded empty (no system prompt, no tools); extension messages
        are left out (they never reach a model). `options`: the payload's other fields
        (``thinking_level`` default ``"off"``, ``response_format`` default text,
        ``provenance``, ``max_tokens``, ``temperature``)."""
        options.setdefault("thinking_level", "off")
        options.setdefault("response_format", TextFormat())
        options.setdefault("provenance", ())
        return AnnotatedRequestPayload(
            system_prompt=self.system_prompt or "",
            messages=tuple(filter(reaches_model, self.messages)),
            tools=self.tools or (),
            model_id=model_id,
            **options,
        )

    @classmethod
    def of(cls, request: RequestShape | Sequence[AgentMessage]) -> RequestShape:
        """`request` itself, or a bare message list as a shape (system prompt and tools unknown)."""
        if isinstance(request, RequestShape):
            return request
        if isinstance(request, (str, bytes)) or not isinstance(request, Sequence):
            raise TypeError(
                f"expected a RequestShape or a sequence of messages, got {type(request).__name__}"
            )
        return cls(messages=tuple(request))


# -- normal forms ------------------------------------------------------------------------------


def reaches_model(message: AgentMessage) -> TypeGuard[Message]:
    """Whether `message` is sent to a model: extension messages never are."""
    return isinstance(message, LLM_MESSAGE_TYPES)


def normal_arguments(arguments: Any) -> Any:
    """Tool-call arguments as JSON values: a JSON string is read as the value it encodes."""
    if isinstance(arguments, (str, bytes)):
        try:
            return msgspec.json.decode(arguments)
        except msgspec.DecodeError:
            return arguments
    return arguments


class _Normal(msgspec.Struct, frozen=True):
    """One message as the model sees it (see the module docstring)."""

    role: str
    text: str
    thinking: str = ""
    images: tuple[tuple[str, str], ...] = ()
    calls: tuple[tuple[str, str, Any], ...] = ()
    call_id: str = ""

    def same(self, other: _Normal) -> bool:
        if (self.role, self.text, self.images) != (other.role, other.text, other.images):
            return False
        if not _same_id(self.call_id, other.call_id):
            return False
        if self.thinking and other.thinking and self.thinking != other.thinking:
            return False
        return len(self.calls) == len(other.calls) and all(
            _same_id(mine[0], theirs[0]) and mine[1] == theirs[1] and same_json(mine[2], theirs[2])
            for mine, theirs in zip(self.calls, other.calls, strict=True)
        )


def _same_id(a: str, b: str) -> bool:
    """Whether two tool call ids may name the same call: an empty id is unknown (Google
    ADK sends the model no ids for the calls it numbered itself)."""
    return a == b or not a or not b


def _normal(message: AgentMessage) -> _Normal | None:
    if not reaches_model(message):
        return None
    text: list[str] = []
    thinking: list[str] = []
    images: list[tuple[str, str]] = []
    calls: list[tuple[str, str, Any]] = []
    for block in message.content:
        if type(block) is TextContent:
            text.append(block.text)
        elif type(block) is ThinkingContent:
            thinking.append(block.thinking)
        elif type(block) is ToolCall:
            calls.append((block.id, block.name, normal_arguments(block.arguments)))
        elif type(block) is ImageContent:
            images.append((block.mime_type, block.data))
    role = type(message).__struct_config__.tag
    call_id = message.tool_call_id if isinstance(message, ToolResultMessage) else ""
    return _Normal(str(role), "".join(text), "".join(thinking), tuple(images), tuple(calls), call_id)


class Normalizer:
    """Normal forms of messages, each message read once: one per replayed run, since an
    agent resends the same message objects turn after turn (and a script shares its
    recorded ones), so each turn only reads what is new. Keeps the messages it read."""

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        self._memo: dict[int, tuple[AgentMessage, _Normal | None]] = {}

    def __call__(self, messages: Sequence[AgentMessage]) -> list[_Normal]:
        memo = self._memo
        out: list[_Normal] = []
        for message in messages:
            known = memo.get(id(message))
            if known is None or known[0] is not message:
                known = memo[id(message)] = (message, _normal(message))
            if known[1] is not None:
                out.append(known[1])
        return out


def _normals(messages: Sequence[AgentMessage]) -> list[_Normal]:
    return [n for n in map(_normal, messages) if n is not None]


def clip(text: str) -> str:
    """`text` on one line (whitespace runs collapsed to one space), clipped to 160 characters."""
    text = " ".join(text.split())
    return text if len(text) <= _SUMMARY_LIMIT else text[: _SUMMARY_LIMIT - 1] + "…"


def _describe(normal: _Normal | None) -> str:
    if normal is None:
        return "(no message)"
    parts = [normal.role]
    if normal.call_id:
        parts.append(f"[{normal.call_id}]")
    if normal.thinking:
        parts.append(f"thinking {normal.thinking!r}")
    if normal.text:
        parts.append(repr(normal.text))
    if normal.images:
        parts.append(f"{len(normal.images)} image(s)")
    for call_id, name, arguments in normal.calls:
        parts.append(f"{name}({msgspec.json.encode(arguments).decode()}) [{call_id}]")
    return clip(" ".join(parts))


def summarize(message: AgentMessage) -> str:
    """A one-line summary of `message` as the model sees it (role, text, calls)."""
    return _describe(_normal(message))


# -- comparisons -----------------------------------------------------------------------------


def compare_messages(
    expected: Sequence[AgentMessage],
    actual: Sequence[AgentMessage],
    normalize: Callable[[Sequence[AgentMessage]], list[_Normal]] = _normals,
) -> tuple[str, str, str] | None:
    """None when the two contexts are the same to the model; else ``(detail, expected, actual)``:
    a one-line description of the first difference and summaries of both sides.
    `normalize`: e.g. a `Normalizer`, to read each message once over a run."""
    want, got = normalize(expected), normalize(actual)
    for index, (a, b) in enumerate(zip(want, got, strict=False)):
        if not a.same(b):
            return f"message {index} differs", _describe(a), _describe(b)
    if len(want) == len(got):
        return None
    index = min(len(want), len(got))
    if len(got) > len(want):
        return (
            f"{len(got) - len(want)} more message(s) than recorded, from message {index}",
            f"{len(want)} messages",
            _describe(got[index]),
        )
    return (
        f"{len(want) - len(got)} recorded message(s) missing, from message {index}",
        _describe(want[index]),
        f"{len(got)} messages",
    )


def _tool_key(tool: ToolDefinition) -> tuple[str, str, bytes]:
    return tool.name, tool.description, msgspec.json.encode(tool.parameters, order="sorted")


def _changes(want: tuple[str, str, bytes], got: tuple[str, str, bytes]) -> list[str]:
    """What differs between two tools of one name: ``description``, ``parameters``."""
    return [
        part for part, a, b in zip(("description", "parameters"), want[1:], got[1:], strict=True) if a != b
    ]


def _show_tool(key: tuple[str, str, bytes], parts: Sequence[str]) -> str:
    """A tool by name and the `parts` of it that differ."""
    shown = [key[0]]
    if "description" in parts:
        shown.append(repr(key[1]))
    if "parameters" in parts:
        shown.append(key[2].decode())
    return clip(" ".join(shown))


def compare_tools(
    expected: Sequence[ToolDefinition], actual: Sequence[ToolDefinition]
) -> tuple[str, str, str] | None:
    """None when the same tools are offered (in any order); else ``(detail, expected, actual)``:
    both sides name the tools offered, or, when only tools of the same names changed,
    show the first changed tool's description and/or parameters."""
    want = {tool.name: _tool_key(tool) for tool in expected}
    got = {tool.name: _tool_key(tool) for tool in actual}
    if want == got:
        return None
    names = ", ".join
    added, removed = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
    changed = {
        name: _changes(want[name], got[name])
        for name in sorted(want.keys() & got.keys())
        if want[name] != got[name]
    }
    problems = []
    if added:
        problems.append(f"tool(s) added: {names(added)}")
    if removed:
        problems.append(f"tool(s) removed: {names(removed)}")
    if changed:
        described = (f"{name} ({', '.join(parts)})" for name, parts in changed.items())
        problems.append(f"tool(s) changed: {names(described)}")
    detail = clip("; ".join(problems))
    if added or removed:
        return detail, clip(names(sorted(want))), clip(names(sorted(got)))
    name, parts = next(iter(changed.items()))
    return detail, _show_tool(want[name], parts), _show_tool(got[name], parts)
