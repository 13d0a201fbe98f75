"""Copies of what an agent gives to record (`_own_copy`, `_Owned`): its tool arguments,
metadata, details and messages as the JSON they are written as, so that what was
recorded does not change with the agent's objects and every store can write it. A
`Tracer` copies what it records so; a recorder's `on_event`, what it is given by hand
(`recordable_event`)."""

from __future__ import annotations

import collections
import json
import logging
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from operator import is_
from typing import Any, TypeVar, get_args

import msgspec
from msgspec.structs import replace

from ._checks import check_instance, check_type, plain_text
from ._failures import FailureTally
from ._strict import MAX_VALUE_DEPTH, clip_depth, nests_deeper, read_as_integer
from .codec import (
    EVENT_CLASSES,
    HOOKED_ONLY_AS_KEYS,
    check_event_fields,
    check_recordable,
    escape_surrogates,
    json_form,
    map_free_form,
    written_as_given,
)
from .events import (
    AgentEvent,
    AgentStart,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    TurnRequest,
    map_messages,
)
from .messages import (
    AgentMessage,
    AnnotatedRequestPayload,
    Content,
    ExtensionMessage,
    JsonSchemaFormat,
    Message,
    ToolCall,
    ToolDefinition,
    ToolResult,
)

_MESSAGE_TYPES: tuple[type, ...] = get_args(AgentMessage)


def copy_failures(logger: logging.Logger) -> FailureTally:
    """A tally of the values copied altered or as a stand-in (`_own_copy`); no traceback
    above DEBUG, as its text may quote them."""
    return FailureTally(
        logger, "copying", "they are recorded altered or as a stand-in (how: at DEBUG)", traceback=False
    )


def _owned(call: ToolCall, failures: FailureTally) -> ToolCall:
    """The call with arguments of its own (`_own_copy`)."""
    owned = _own_copy(call.arguments, failures, _ARGUMENTS)
    return call if owned is call.arguments else replace(call, arguments=owned)


def _owned_calls(blocks: tuple[Content, ...], failures: FailureTally) -> tuple[Content, ...]:
    """`blocks` with every tool call's arguments its own (`_owned`); `blocks` itself when
    none holds arguments that could change (and it is a tuple, not the agent's list)."""
    owned = tuple([_owned(block, failures) if type(block) is ToolCall else block for block in blocks])
    return blocks if type(blocks) is tuple and all(map(is_, owned, blocks)) else owned


_M = TypeVar("_M", bound=AgentMessage)
_V = TypeVar("_V")


def _owned_message(message: _M, failures: FailureTally) -> _M:
    """`message` with tool-call arguments (`_owned_calls`) or extension data
    (`_own_copy`) of its own; `message` itself when it holds none that could change."""
    if isinstance(message, ExtensionMessage):
        data = _own_copy(message.data, failures, _EXTENSION_DATA)
        return message if data is message.data else replace(message, data=data)
    given = message.content
    if type(given) is tuple and ToolCall not in map(type, given):
        return message  # most messages: the request's conversation holds them every turn
    content = _owned_calls(given, failures)
    return message if content is given else replace(message, content=content)


def _owned_result(result: ToolResult, failures: FailureTally) -> ToolResult:
    """`result` with details of its own (`_own_copy`)."""
    details = _own_copy(result.details, failures, _DETAILS)
    return result if details is result.details else replace(result, details=details)


def _owned_event(event: AgentEvent, owned: _Owned) -> AgentEvent:
    """A hand-built `event` (`Tracer.emit`) with copies of its own of what the scopes copy
    (`_own_copy`, `_Owned`): its tool arguments, loop metadata, tool result details, its
    messages' tool-call arguments and extension data, and a request's messages, tools and
    schema; `event` itself when it holds none that could change."""
    failures = owned.failures
    if type(event) is ToolExecutionStart:
        args = _own_copy(event.args, failures, _ARGUMENTS)
        return event if args is event.args else replace(event, args=args)
    if type(event) is AgentStart:
        metadata = _own_copy(event.metadata, failures, _METADATA)
        return event if metadata is event.metadata else replace(event, metadata=metadata)
    if type(event) is ToolExecutionUpdate:
        partial = _owned_result(event.partial_result, failures)
        return event if partial is event.partial_result else replace(event, partial_result=partial)
    if type(event) is ToolExecutionEnd:
        result = _owned_result(event.result, failures)
        return event if result is event.result else replace(event, result=result)
    if type(event) is TurnRequest:
        payload = owned.payload(event.payload, None)[2]
        return event if payload is event.payload else replace(event, payload=payload)
    # Copied, not remembered as `_Owned` would: a streamed reply's partial messages would
    # stay alive with their copies, each holding the tool arguments so far.
    return map_messages(event, lambda message: _owned_message(message, failures))


def recordable_event(event: AgentEvent, failures: FailureTally) -> AgentEvent:
    """`event`, built by hand and handed to a recorder (`SessionRecorder.on_event`), as
    `Tracer.emit` records it: `TypeError` or `InvalidArgument` for a field phi-core cannot
    hold, in the records it carries too (`check_recordable`: its messages, tool results,
    config snapshot, request), naming the field; its free-form values (tool arguments,
    metadata, details, extension data, a request's tool parameters and schema) copied as
    JSON (`_own_copy`, counted in `failures`) if a store could not write them as given (a
    `pathlib.Path`, a set of mixed types, a dict key that is no text); else `event` itself."""
    if type(event) not in EVENT_CLASSES:
        return event  # the recorder says what it is not
    check_event_fields(event)  # what reads back but the recorder cannot compute with (a datetime)
    check_recordable("event", event)
    if _copied_as_given(event):
        return event
    return _owned_event(event, _Owned(failures))


def _copied_as_given(value: Any) -> bool:
    """Whether `_own_copy` would hold each free-form value of `value` as it is: every store
    writes it (`written_as_given`), it holds nothing the copy changes (`_needs`: a NaN or
    infinity, an integer beyond 64 bits, bytes, a lone surrogate), and nothing nested
    deeper than phi-core reads (a bound: `value` holds its free-form values below its top)."""
    encoded = written_as_given(value)
    return encoded is not None and not nests_deeper(encoded, MAX_VALUE_DEPTH) and not _needs(value)[0]


def owned_free_form(value: _V, failures: FailureTally) -> _V:
    """`value` (a session, a record, an event) with each free-form value in it that no store
    writes as given copied as a `Tracer` copies it (`_own_copy`, counted in `failures`):
    for one changed after it was recorded (a processor changing an event in place, which
    the `Tracer` does not copy again). Itself when there is none."""

    def owned(item: Any) -> Any:
        if item is msgspec.UNSET or written_as_given(item) is not None:
            return item  # a plain field, or a free-form value written as it is
        return _own_copy(item, failures, _FREE_FORM)

    return map_free_form(value, owned)


class _Owned:
    """Copies of what the agent gave to record that it may change later (messages,
    request payloads, tool definitions; `_owned_message`, `_own_copy`), remembered by
    the object given: a request carries the whole conversation and the same tools
    every turn, and a message or tool copied once is recorded as that copy again (the
    same object as recorded before, which stores keep once), not copied anew.

    Holds at most `_OWNED_LIMIT` copies, each with the object given, so that its id
    stays its own; then it starts over (what it no longer holds is copied, and checked,
    again).
    """

    __slots__ = ("_copies", "failures")

    def __init__(self, failures: FailureTally) -> None:
        self.failures = failures
        self._copies: dict[int, tuple[object, Any]] = {}

    def message(self, message: _M) -> _M:
        """A copy of `message` as it is now (`_owned_message`), remembered as its copy
        (itself, if it holds nothing that could change): a request resending it takes it
        as copied and checked (`check_recordable`, by the caller, where it entered)."""
        owned = _owned_message(message, self.failures)
        self._remember(message, owned)
        return owned

    def payload(self, payload: AnnotatedRequestPayload, before: _Sent | None) -> _Sent:
        """`payload` with messages, tools and response schema of its own (those copied
        before as that copy; `payload` itself when it holds nothing that could change),
        and what to give as `before` with the next request of its loop.

        A request carries the conversation so far: the messages it shares with the
        loop's request `before` (which starts it, as the same objects) are taken as
        copied then, and only those after them are looked at.
        """
        # Its own fields; its messages and tools are checked where they are copied, once.
        check_recordable("payload", replace(payload, messages=(), tools=()))
        given = tuple(payload.messages)  # the agent's list would change with its conversation
        tools = payload.tools
        owned: tuple[Message, ...] = ()
        start = 0
        owned_tools = None
        if before is not None:
            known, known_tools, sent = before
            if len(known) <= len(given) and all(map(is_, known, given)):
                owned, start = sent.messages, len(known)
            if tools is known_tools and type(tools) is tuple:  # the same tools, as usual
                owned_tools = sent.tools
        if start < len(given):
            copies = self._copies
            fresh = []
            for index in range(start, len(given)):
                message = given[index]
                hit = copies.get(id(message))
                if hit is None or hit[0] is not message:
                    name = f"payload.messages[{index}]"
                    check_instance(name, message, _MESSAGE_TYPES, "a message")
                    check_recordable(name, message)
                    hit = (message, self.message(message))
                fresh.append(hit[1])
            owned += tuple(fresh)
        if owned_tools is None:
            owned_tools = tuple(map(self._tool, tools))
        response_format = payload.response_format
        if type(response_format) is JsonSchemaFormat:
            schema = _own_copy(response_format.schema, self.failures, _SCHEMA)
            if schema is not response_format.schema:
                response_format = replace(response_format, schema=schema)
        if not (
            type(payload.messages) is tuple
            and type(tools) is tuple
            and type(payload.provenance) is tuple
            and response_format is payload.response_format
            and all(map(is_, owned, given))
            and all(map(is_, owned_tools, tools))
        ):
            payload = replace(
                payload,
                messages=owned,
                tools=owned_tools,
                provenance=tuple(payload.provenance),
                response_format=response_format,
            )
        return given, tools, payload

    def _tool(self, tool: ToolDefinition) -> ToolDefinition:
        hit = self._copies.get(id(tool))
        if hit is not None and hit[0] is tool:
            return hit[1]  # type: ignore[no-any-return]
        check_type("payload.tools", tool, ToolDefinition)
        check_recordable("payload.tools", tool)
        parameters = _own_copy(tool.parameters, self.failures, _PARAMETERS)
        if parameters is tool.parameters:
            return tool
        owned = replace(tool, parameters=parameters)
        self._remember(tool, owned)
        return owned

    def _remember(self, given: object, owned: object) -> None:
        copies = self._copies  # tools of a loop run in threads: each step is atomic
        if len(copies) >= _OWNED_LIMIT:
            copies.clear()
        copies[id(given)] = (given, owned)


_Sent = tuple[tuple[AgentMessage, ...], Any, AnnotatedRequestPayload]
"""A loop's last request (`_Owned.payload`): its messages and tools as given, and as recorded."""
# How many copies `_Owned` remembers: the tool-calling messages of a long conversation,
# which a loop's first request carries again.
_OWNED_LIMIT = 1024


def _own_copy(value: Any, failures: FailureTally, what: str) -> Any:
    """A copy of what the agent gave to record (`what`: tool arguments, loop metadata, a
    tool result's details, extension message data...), as the JSON it is written as:
    what was recorded must not change (or gain an unredacted secret) when the agent
    later mutates the dict it passed in, and every sink and store must be able to
    write it.

    Values msgspec writes no JSON for are copied as `_json_value` makes them (a mapping
    as an object, a pydantic model as its JSON dump...), and bytes as text when they
    are UTF-8 (`_plain_data`), so that the redactor reads what they hold.

    Never raises into the agent: a value JSON cannot hold (a `pathlib.Path`, an object
    of the agent's, a dict key that is no text or number) is recorded as its ``str``, as
    is an integer beyond the 64 bits phi-core reads (it would read it as a float); a NaN
    or infinity as text (`_non_finite_text`: JSON has no such numbers, and msgspec writes
    them as null); text holding lone surrogates escaped (`escape_surrogates`, as stores
    save message text: UTF-8 has no such characters); containers nested deeper than
    phi-core reads inside a session (`MAX_VALUE_DEPTH`) as their JSON text; and a value
    that cannot be copied at all (self-referential, nested too deeply) as a stand-in
    naming the failure; all are counted in `failures`, and so is a dict key that is no
    text written as another key's text (JSON keys are text: the later value is kept).
    """
    if value is None:
        return value  # the commonest: no details, no metadata
    altered: list[Any] = []
    if type(value) in _SCALARS:  # a JSON string or a scalar cannot change: no copy
        value = _walked(value, altered)
        if altered:
            failures.record(what, _changes(altered))
        return value
    try:  # these are JSON values: a JSON round trip is the fast deep copy
        walk, keyed = _needs(value)
        if walk:
            value = _plain_data(value, _json_value, altered)
        encoded = _json_encode(value)
        copy = _json_decode(encoded)
        if keyed:  # inside the `try`: a value too deep to read back whole is too deep to copy
            altered += _keys_written_twice(copy, encoded)
    except RecursionError as error:
        failure: Exception = error
    except Exception as error:  # a value JSON cannot hold, or the agent's code (a mapping's) raised
        failure = error
        try:
            if _needs(value)[0]:
                value = _plain_data(value, _json_value_or_text, altered)
            encoded = _json_encode_as_text(value)
            written = _json_decode(encoded)
        except Exception as stand_in:  # a key JSON cannot hold, a `str` that raises
            failure = stand_in
        else:
            failures.record(what, failure)
            return _within_depth(written, encoded, failures, what)
    else:
        if altered:
            failures.record(what, _changes(altered))
        return _within_depth(copy, encoded, failures, what)
    failures.record(what, failure)
    return f"[NOT RECORDED: copying the {what} raised {type(failure).__name__}]"


def _json_value(value: Any) -> Any:
    """The JSON form of a value msgspec writes none for (the copy's ``enc_hook``): a
    mapping as an object, a pydantic model as its ``model_dump(mode="json")``, text
    (a `str` subclass) and bytes (a `bytes` subclass) as `_plain_data` keeps them,
    another collection (a deque, a dict view) as an array, a phi-session value as the
    codec writes it (`json_form`); `NotImplementedError` for any other (an iterator is
    not consumed), and `TypeError` for a dict key JSON cannot hold."""
    if type(value) in HOOKED_ONLY_AS_KEYS:  # a tuple turned into a list would come back here
        raise TypeError(f"a dict key of type {type(value).__name__} is no JSON key")
    if isinstance(value, str):
        return plain_text(value)
    if isinstance(value, Mapping):
        return dict(value)
    if getattr(type(value), "model_dump", None) is not None:  # the class's: no agent `__getattr__`
        return value.model_dump(mode="json")
    if isinstance(value, _BYTES):
        return _text_or_bytes(value)
    if isinstance(value, Collection):
        return list(value)
    return json_form(value)


def _json_value_or_text(value: Any) -> Any:
    """`_json_value`, or else the value's ``str``."""
    try:
        return _json_value(value)
    except Exception:  # none, or the agent's code raised: its text is what is left
        return str(value)


def _needs(value: Any) -> tuple[bool, bool]:
    """What copying `value` takes besides the JSON round trip: the walk (`_walked`) if it
    holds bytes, a NaN or infinity, an integer beyond 64 bits or a lone surrogate; a look
    for keys written twice (`_keys_written_twice`) if it holds a dict key that is no text.

    Read at C speed from its MessagePack, which refuses such integers and text (and such
    keys, when it sorts keys), where only bytes are written with these markers, and such
    floats with all exponent bits set (which other values may hold too: then a walk)."""
    try:
        try:
            return _walk_marked(_msgpack_encode_text_keys(value)), False
        except TypeError:  # a key that is no text, which the encoder cannot sort
            return _walk_marked(_msgpack_encode(value)), True
    except (OverflowError, UnicodeEncodeError):  # met before any key that is no text, maybe
        return True, True


def _walk_marked(packed: bytes) -> bool:
    return (
        0xC4 in packed or 0xC5 in packed or 0xC6 in packed  # ints: a byte needle is slower
    ) or (0xCB in packed and _NON_FINITE_PACKED.search(packed) is not None)


_NON_FINITE_PACKED = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")  # a float64's marker, sign, exponent


def _plain_data(value: Any, hook: Callable[[Any], Any], altered: list[Any]) -> Any:
    """`value` as plain data (`msgspec.to_builtins`, `hook` its ``enc_hook``), as `_walked`
    makes it."""
    return _walked(msgspec.to_builtins(value, builtin_types=_BYTES, enc_hook=hook), altered)


def _walked(node: Any, altered: list[Any]) -> Any:
    """`node` (plain data) with its bytes that are UTF-8 as text (`_text_or_bytes`), and
    what phi-core cannot read as it is, each added to `altered`: its NaN and infinities as
    text (`_non_finite_text`), its integers beyond 64 bits as their decimal text, and its
    text holding lone surrogates escaped (`escape_surrogates`); and each key text that
    two keys of a dict become (`_KeyTwice`), the later value kept."""
    tp = type(node)
    if tp is dict:
        keys = [_walked_key(key, altered) for key in node]
        walked = dict(zip(keys, [_walked(item, altered) for item in node.values()], strict=True))
        if len(walked) < len(keys):
            altered += _repeated(keys)
        return walked
    if tp is list:
        return [_walked(item, altered) for item in node]
    if tp is str:
        escaped = escape_surrogates(node)
        if escaped is not node:
            altered.append(node)
        return escaped
    if tp is int:
        if read_as_integer(node):
            return node
        altered.append(node)
        return str(node)
    if tp in _BYTES:
        return _text_or_bytes(node)
    if tp is float and not math.isfinite(node):
        altered.append(node)
        return _non_finite_text(node)
    return node


def _walked_key(key: Any, altered: list[Any]) -> Any:
    # JSON writes an integer key as its decimal text, whatever its size: nothing is lost.
    return key if type(key) is int else _walked(key, altered)


class _KeyTwice(str):
    """A key's text that another key of its dict has too (JSON keys are text: a key that
    is none is written as text), which keeps the later value only."""


def _repeated(keys: Iterable[Any]) -> list[_KeyTwice]:
    return [_KeyTwice(key) for key, count in collections.Counter(keys).items() if count > 1]


def _keys_written_twice(copy: Any, encoded: bytes) -> list[_KeyTwice]:
    """The keys that `encoded` (JSON as msgspec writes it) holds twice in an object, of
    which `copy`, read from it, holds the later value; none when `copy` writes as long
    (the cheap test: it holds all that `encoded` does)."""
    if len(_json_encode(copy)) == len(encoded):
        return []
    twice: list[_KeyTwice] = []

    def note_repeated(pairs: list[tuple[str, Any]]) -> None:
        twice.extend(_repeated(key for key, _ in pairs))

    json.loads(encoded, object_pairs_hook=note_repeated)
    return twice


def _changes(altered: list[Any]) -> ValueError:
    """How a copy is not the value given, as `failures` count it: `altered`, what `_walked`
    changed and the keys written twice."""
    counts = collections.Counter(map(type, altered))
    changes = [f"{count} {_ALTERED[tp]}" for tp, count in counts.items() if tp is not _KeyTwice]
    twice = [key for key in altered if type(key) is _KeyTwice]
    if twice:
        changes.append(
            f"keys written as another key's text, the later value kept: {', '.join(map(repr, twice))}"
        )
    return ValueError(", ".join(changes))


_ALTERED = {
    float: "NaN or infinities recorded as text",
    int: "integers beyond 64 bits recorded as text",
    str: "texts with lone surrogates recorded escaped",
}


def _non_finite_text(number: float) -> str:
    """A NaN or infinity as the OTLP JSON mapping spells it, which ``float()`` reads back."""
    return "NaN" if number != number else "Infinity" if number > 0 else "-Infinity"


def _text_or_bytes(data: bytes | bytearray | memoryview) -> str | bytes:
    """Bytes as their text if they are UTF-8 (a header value, a token, a file's text);
    else as bytes, which JSON holds as base64."""
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        return bytes(data)


def _within_depth(copy: Any, encoded: bytes, failures: FailureTally, what: str) -> Any:
    """`copy` (`encoded`, written) with its containers nested too deep for phi-core as
    their JSON text (`clip_depth`), counted in `failures`."""
    if clip_depth(copy, encoded):
        failures.record(what, ValueError(f"nested deeper than {MAX_VALUE_DEPTH} levels"))
    return copy


_SCALARS = frozenset({str, int, float, bool, type(None)})
# What a `_Owned`'s failures count failures of.
_ARGUMENTS = "tool arguments"
_METADATA = "loop metadata"
_DETAILS = "tool result details"
_EXTENSION_DATA = "extension message data"
_PARAMETERS = "tool parameters"
_SCHEMA = "response format schema"
_FREE_FORM = "free-form values of a session to save"


_BYTES = (bytes, bytearray, memoryview)
_json_encode = msgspec.json.Encoder(enc_hook=_json_value).encode
_json_encode_as_text = msgspec.json.Encoder(enc_hook=_json_value_or_text).encode
_msgpack_encode = msgspec.msgpack.Encoder(enc_hook=_json_value_or_text).encode
_msgpack_encode_text_keys = msgspec.msgpack.Encoder(
    enc_hook=_json_value_or_text, order="deterministic"
).encode
_json_decode = msgspec.json.Decoder().decode
