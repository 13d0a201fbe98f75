"""phi-core's JSON: decode and encode events, loop records and sessions.

Decoding is typed and strict (msgspec), with phi-core's leniencies handled on a
slower path that only exotic input takes: message metadata that does not parse is
dropped, extension messages with any role are recognised, phi-session's own keys
holding a value of another type than it writes are ignored (phi-core knows none of them). Encoding reproduces
phi-core's bytes: record objects in declaration order, LLM messages with every key
sorted, free-form values sorted, nanosecond timestamps, float32 temperatures.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from operator import is_
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin, overload

import msgspec
from msgspec.structs import force_setattr, replace

from . import _strict
from ._checks import check_type, counts_in_range
from ._float32 import Float32
from ._time import Timestamp
from .errors import DecodeError, InvalidArgument, UnwritableValue
from .events import (
    EVENT_TYPES,
    MESSAGE_FIELDS,
    MESSAGE_FIELDS_BY_TAG,
    AgentEnd,
    AgentEvent,
    AgentStart,
    ContinuationKind,
    LoopConfigSnapshot,
    MessageField,
    MessageUpdate,
    SessionFormation,
    map_messages,
    message_mappers,
)
from .messages import (
    LLM_MESSAGE_TYPES,
    AgentMessage,
    BlockProvenance,
    ExtensionMessage,
    Message,
    NodeTag,
    TextContent,
    ToolCall,
    TurnId,
    Usage,
    extension_message,
)
from .model import CompactedSection, CompactionBlock, LoopEvent, LoopRecord, Session, Turn

__all__ = [
    "decode_event",
    "decode_loop",
    "decode_messages",
    "decode_session",
    "encode",
    "encode_event",
    "encode_loop_with",
    "encode_message",
    "encode_plain_message",
    "encode_session",
    "escape_surrogates",
    "without_lone_surrogates",
]

logger = logging.getLogger("phi_session.codec")

_V = TypeVar("_V")
_U64_MAX = 2**64 - 1

EVENT_CLASSES: frozenset[type] = frozenset(EVENT_TYPES)
"""The event classes, for the cheap test of an event on a hot path: ``type(value) in
EVENT_CLASSES`` (a hash lookup; ``isinstance`` against `EVENT_TYPES` tries each class)."""


def not_an_event(what: str, value: object) -> TypeError:
    """The `TypeError` of `what` (a function) given `value`, which is not an event."""
    return TypeError(f"{what} takes an event, not {type(value).__name__}")


_HOOKED: dict[type, Callable[[Any], Any]] = {
    ContinuationKind: ContinuationKind.from_json,
    SessionFormation: SessionFormation.from_json,
}


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Timestamp:
        return Timestamp.parse(obj)
    if tp is Float32:
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            raise ValueError(f"expected a number, got {type(obj).__name__}")
        try:
            return Float32(obj)
        except OverflowError:  # an integer too large for any float: out of f32 range
            raise ValueError("number out of range") from None
    parse = _HOOKED.get(tp)
    if parse is None:
        raise NotImplementedError(f"no decoder for {tp!r}")
    if obj is None:
        raise ValueError("expected a value, got null")
    return parse(obj)


def _float32_json(value: Float32) -> msgspec.Raw:
    return msgspec.Raw(value.to_json())


# What each type msgspec does not know is written as; looked up by exact type (a
# timestamp is in nearly every event), subclasses by isinstance.
_JSON_FORMS: dict[type, Callable[[Any], Any]] = {
    Timestamp: Timestamp.__str__,
    Float32: _float32_json,
    ContinuationKind: ContinuationKind.to_json,
    SessionFormation: SessionFormation.to_json,
}


def json_form(obj: Any) -> Any:
    """The JSON form of a phi-session value msgspec does not write natively (a `Timestamp`...):
    the encoders' ``enc_hook``, and the redactor's, which scans values as they are written."""
    form = _JSON_FORMS.get(type(obj))
    if form is None:
        form = next((f for t, f in _JSON_FORMS.items() if isinstance(obj, t)), None)
        if form is None:
            # An int subclass is the integer it holds (msgspec writes only an IntEnum itself);
            # a bool, met here only as a dict key, is none.
            if isinstance(obj, int) and type(obj) is not bool:
                return int(obj)
            raise NotImplementedError(f"cannot encode {type(obj).__name__}")
    return form(obj)


def escape_surrogates(text: str) -> str:
    """`text` with its lone surrogates written as backslash escapes of their bytes
    (``\\xed\\xb3\\xbf``); `text` itself when it has none.

    Python text decoded from undecodable bytes (file names from ``os.listdir``,
    ``errors="surrogateescape"``) holds lone surrogates, which neither UTF-8 nor
    phi-core's JSON reader accepts; escaped, what they stood for is still there to read.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")
    return text


def without_lone_surrogates(value: _V) -> _V:
    """`value` (a session, a record, an event, JSON data) with every text in it passed
    through `escape_surrogates`: itself when nothing changes, else a copy of the parts
    that do (the original is left as it is)."""
    if isinstance(value, str):
        return cast(_V, escape_surrogates(value))
    # serde's tagged enums hold text too: a Rerun's or Branch's tag, a previous session's id.
    if isinstance(value, ContinuationKind):
        tag = value.tag and escape_surrogates(value.tag)
        return value if tag is value.tag else cast(_V, ContinuationKind(value.kind, tag))
    if isinstance(value, SessionFormation):
        previous = value.previous_session_id and escape_surrogates(value.previous_session_id)
        if previous is value.previous_session_id:
            return value
        return cast(_V, SessionFormation(value.kind, value.timestamp, value.threshold_secs, previous))
    if isinstance(value, msgspec.Struct):
        return cast(_V, _mapped_fields(value, without_lone_surrogates))
    if isinstance(value, dict):
        pairs = [(without_lone_surrogates(k), without_lone_surrogates(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, value.items(), strict=True)):
            return value
        return cast(_V, dict(pairs))
    if isinstance(value, (list, tuple)):
        return cast(_V, _mapped_items(value, without_lone_surrogates))
    return value


_Items = list[Any] | tuple[Any, ...]


def within_depth(value: _V) -> _V:
    """`value` (a session, a record, an event, JSON data) with each free-form value in it
    as `_strict.clipped` copies it (`map_free_form`): for one nested too deep to write at
    all (or holding itself)."""
    return map_free_form(value, _strict.clipped)


def map_free_form(value: _V, fn: Callable[[Any], Any]) -> _V:
    """`value` (a session, a record, an event, JSON data) with ``fn(item)`` for each item
    in it that is no record (tool arguments, details, metadata, and plain fields). Itself
    when `fn` changes none, else a copy of the parts it changes (the original is left as
    it is)."""
    if isinstance(value, msgspec.Struct):
        return cast(_V, _mapped_fields(value, lambda item: map_free_form(item, fn)))
    if isinstance(value, (list, tuple)) and any(isinstance(item, msgspec.Struct) for item in value):
        return cast(_V, _mapped_items(value, lambda item: map_free_form(item, fn)))
    return cast(_V, fn(value))


def _mapped_fields(struct: msgspec.Struct, fn: Callable[[Any], Any]) -> msgspec.Struct:
    """`struct` with ``fn(value)`` for the value of each of its fields: itself when every
    one comes back unchanged, else a copy."""
    changed = {}
    for name in struct.__struct_fields__:
        item = getattr(struct, name)
        mapped = fn(item)
        if mapped is not item:
            changed[name] = mapped
    return replace(struct, **changed) if changed else struct


def _mapped_items(items: _Items, fn: Callable[[Any], Any]) -> _Items:
    """`items` (a list or tuple) with ``fn(item)`` for each: itself when every one comes
    back unchanged, else a copy of the same type."""
    mapped = [fn(item) for item in items]
    if all(a is b for a, b in zip(mapped, items, strict=True)):
        return items
    return mapped if isinstance(items, list) else tuple(mapped)


class _Encoder:
    """A msgspec JSON encoder that writes a document holding lone surrogates, which it
    refuses, as `without_lone_surrogates` makes it, and one holding a free-form value
    nested too deep to write (or holding itself) as `within_depth` makes it: a session is
    never lost to text its agent read from undecodable bytes, nor to such a value. Others
    pay nothing for it."""

    __slots__ = ("_encoder",)

    def __init__(
        self,
        order: Literal["deterministic", "sorted"] | None,
        enc_hook: Callable[[Any], Any] = json_form,
    ) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=enc_hook, order=order)

    def encode(self, document: Any) -> bytes:
        try:
            return self._encoder.encode(document)
        except (UnicodeEncodeError, RecursionError) as error:
            return self._encoder.encode(_writable(document, error))
        except _UNWRITABLE as error:
            raise self._unwritable(document, error) from None

    def encode_into(self, document: Any, buffer: bytearray) -> None:
        try:
            self._encoder.encode_into(document, buffer)
        except (UnicodeEncodeError, RecursionError) as error:
            self._encoder.encode_into(_writable(document, error), buffer)
        except _UNWRITABLE as error:
            raise self._unwritable(document, error) from None

    def as_given(self, value: Any) -> bytes | None:
        """`value` written as it is (not escaped or clipped by `_writable`), or None."""
        try:
            return self._encoder.encode(value)
        except (*_UNWRITABLE, UnicodeEncodeError, RecursionError):
            return None

    def writes(self, value: Any) -> bool:
        """Whether `value` is written without an `_UNWRITABLE` error."""
        try:
            self._encoder.encode(value)
        except _UNWRITABLE:
            return False
        except (UnicodeEncodeError, RecursionError):  # written escaped or clipped (`_writable`)
            pass
        return True

    def _unwritable(self, document: Any, error: Exception) -> UnwritableValue:
        """msgspec's `error` writing `document` (built by hand: what a `Tracer` or a decoder
        made is JSON) as a `TypeError` naming the value JSON cannot hold, a free-form one's
        (tool arguments, details...) or a dict key that is no text."""
        where, value = self._first_unwritable(type(document).__name__, document)
        return UnwritableValue(f"{where}: {value} cannot be written as JSON ({error})")

    def _first_unwritable(self, where: str, node: Any) -> tuple[str, str]:
        items: Iterable[tuple[str, Any]] = ()
        if isinstance(node, msgspec.Struct):
            items = ((f"{where}.{name}", getattr(node, name)) for name in node.__struct_fields__)
        elif isinstance(node, dict):
            for key in node:
                if not self.writes({key: None}):
                    return where, f"a dict key of type {type(key).__name__} ({key!r})"
            items = ((f"{where}[{key!r}]", item) for key, item in node.items())
        elif isinstance(node, (list, tuple)):
            items = ((f"{where}[{index}]", item) for index, item in enumerate(node))
        for place, item in items:
            if not self.writes(item):
                return self._first_unwritable(place, item)
        return where, f"a value of type {type(node).__name__}"


# What msgspec raises for a value it cannot write: a dict key that is no text (sorting
# keys) or none it writes as text, a value `json_form` has no JSON for.
_UNWRITABLE = (TypeError, NotImplementedError)


_refusing = contextvars.ContextVar("phi_session_refusing_unwritable", default=False)


@contextmanager
def refusing_unwritable() -> Iterator[None]:
    """Inside the block the encoders raise the error (`UnicodeEncodeError`, `RecursionError`)
    of a document they would write escaped or clipped. A store saving a session learns
    so, as it encodes it, that the session must first be made as stores write it: the
    alternative, encoding every session once more to check first, cost a tenth of a save."""
    token = _refusing.set(True)
    try:
        yield
    finally:
        _refusing.reset(token)


def _writable(document: Any, error: UnicodeEncodeError | RecursionError) -> Any:
    """`document`, which the encoder refused with `error`, as `_Encoder` writes it: clipped
    first (the one fault can hide the other, and escaping walks the whole depth); the
    error raised again inside `refusing_unwritable`."""
    if _refusing.get():
        raise error
    if isinstance(error, RecursionError):
        clipped = within_depth(document)
        if clipped is document:  # not a free-form value's doing
            raise error
        document = clipped
    return without_lone_surrogates(document)


# Record objects keep declaration order; free-form dicts are sorted ("deterministic").
_plain = _Encoder("deterministic")
_insertion_order = _Encoder(None)


def json_size(value: Any) -> int:
    """The length of `value`'s compact JSON encoding (as `json_text` writes it), in bytes."""
    return len(_insertion_order.encode(value))


def json_text(value: Any) -> str:
    """`value` (JSON data, or what `json_form` makes JSON of) as compact JSON text, keys in
    insertion order and lone surrogates escaped: JSON carried inside another format
    (span attributes), which must be valid UTF-8 whatever text the agent read."""
    return _insertion_order.encode(value).decode()


# LLM messages in their agent-message form have every key sorted, at every depth.
_sorted = _Encoder("sorted")


# -- Checking what a caller built ------------------------------------------------------------

# msgspec builds records without checking their fields: one of the wrong type or out of
# range is written as it is, and the session holding it no longer loads. A record is
# checked by reading its JSON back as its own type, as a store would load it.

HOOKED_ONLY_AS_KEYS = frozenset({tuple, list, dict, set, frozenset, bool, type(None), msgspec.Raw})
"""Types msgspec writes itself: its JSON encoder's ``enc_hook`` meets one only as a dict
key, which JSON holds as text only (a tuple: a grid cell)."""
# What stands for a value JSON cannot hold: free-form fields (tool arguments, details,
# extension data) take it, as they are copied as JSON on their own; a typed field refuses it.
_NOT_JSON = msgspec.Raw(b'{"\\u0000not JSON":0}')


def _checked_form(obj: Any) -> Any:
    if type(obj) in HOOKED_ONLY_AS_KEYS:
        return ""  # a dict key (JSON has only text keys): a free-form value's, copied on its own
    try:
        return json_form(obj)
    except NotImplementedError:
        return _NOT_JSON


_checking = _Encoder(None, _checked_form)
_check_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
# The commonest records given (an answer's text, its tool calls), whose typed fields are
# all text: checked as such, without the round trip.
_ALL_TEXT: dict[type, Callable[[Any], bool]] = {
    TextContent: lambda block: type(block.text) is str,
    ToolCall: lambda call: type(call.id) is str and type(call.name) is str,
}
_EXPECTED_TYPE = re.compile(r"[Ee]xpected `?([^`]+?)`?, got `?([^`]+?)`?$")
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_JSON_KINDS = {"array": "a sequence", "object": "an object", "null": "None"}
_ABSENT = object()


def check_recordable(name: str, value: msgspec.Struct, index: int | None = None) -> None:
    """`TypeError` (a field of the wrong type) or `InvalidArgument` (a value phi-core
    cannot hold: a negative count, an unknown stop reason) unless `value`, a record the
    caller built (a message, a config snapshot, a request, an event), reads back as its
    own type from its JSON; the error names the field, under `name` (``name[index]``
    with an `index`). Free-form fields are not looked at: they are copied as JSON where
    they are recorded."""
    kind = type(value)
    all_text = _ALL_TEXT.get(kind)
    if all_text is not None and all_text(value):
        return
    if index is not None:
        name = f"{name}[{index}]"
    try:
        data = _checking.encode(value)
    except RecursionError:  # a free-form value nested too deep to write (or holding itself),
        return  # which is recorded as a stand-in: records themselves are shallow
    decoder = _check_decoders.get(kind)
    if decoder is None:
        if len(_check_decoders) >= 64:  # record types are few (extension roles may not be)
            _check_decoders.clear()
        decoder = _check_decoders[kind] = msgspec.json.Decoder(kind, dec_hook=_dec_hook)
    try:
        decoder.decode(data)
    except (msgspec.ValidationError, ValueError) as error:
        lenient = _lenient_event_error(data, kind) if kind in EVENT_CLASSES else error
        if lenient is not None:
            # The typed union knows extension messages only by the role "extension": past
            # a message of another role, only the lenient reading finds what is wrong.
            raise _refused(name, value, lenient if str(error).endswith(".role`") else error) from None
    if _strict.holds_no_big_integer(data):
        return
    try:  # an integer may be beyond 64 bits, which phi-core reads as a float
        scan = _strict.Scan(data)
    except (ValueError, RecursionError):  # nested past phi-core's limit: only free-form values
        return  # are, and they are clipped where they are copied
    if scan.numbers_differ:
        try:
            _convert(scan.tree, kind)
        except (msgspec.ValidationError, ValueError) as error:
            where, found = _located(name, value, str(error).partition(" - at `")[2].rstrip("`"))
            raise InvalidArgument(
                f"{where}: {found!r} is beyond the 64-bit integers phi-core reads"
            ) from None


def written_as_given(value: Any) -> bytes | None:
    """`value`'s JSON if every store writes it as it is; None if a free-form value it holds
    (tool arguments, details, metadata) holds what JSON cannot (a `pathlib.Path`, an object
    of the caller's) or a dict key that is no text, which a copy as JSON turns into text
    (`_owning._own_copy`), or what stores write escaped or clipped (a lone surrogate,
    nesting msgspec cannot follow)."""
    return _plain.as_given(value)


def check_event_fields(event: Any) -> None:
    """`check_recordable` of an event handed to a recorder as checked where it was made
    (`SessionRecorder.on_checked_event`), at a cost small beside recording it: only its
    own fields of plain types (text, counts, flags, timestamps, usage, known words) are
    looked at, by type, and an event failing that is read back whole to name the field.
    The records it holds (messages, a config snapshot, a request, tool results) are not:
    reading them costs more than recording the event, and what a `Tracer` emits or a
    decoder reads was checked there (`on_event` checks them: `_owning.recordable_event`)."""
    kind = type(event)
    test = _OWN_FIELDS_TESTS.get(kind)
    if test is None or test(event):
        return
    for field in msgspec.structs.fields(kind):
        if field.type is Timestamp:  # text or a datetime would read back, but the recorder computes with it
            check_type(f"event.{field.name}", getattr(event, field.name), Timestamp)
    check_recordable("event", event)


def _own_fields_test(kind: type) -> Callable[[Any], bool] | None:
    """`check_event_fields`' test of an event of `kind` (None if it has no field to test)."""
    # (name, the classes allowed, a test of a value of them but None: its range or words)
    fields: list[tuple[str, frozenset[type], Callable[[Any], bool] | None]] = []
    for field in msgspec.structs.fields(kind):
        if field.name == "loop_id" and kind is not AgentStart:
            continue  # only ever looked up among the open loops, whose AgentStart was tested
        options = get_args(field.type) if get_origin(field.type) in (Union, UnionType) else (field.type,)
        allowed: set[type] = set()
        known: set[object] = set()
        extra: Callable[[Any], bool] | None = None
        for option in options:
            if get_origin(option) is Literal:  # phi-core's words are all text
                allowed.add(str)
                known.update(get_args(option))
                extra = frozenset(known).__contains__
            elif get_origin(option) is Annotated and get_args(option)[0] is int:  # a count
                allowed.add(int)
                limit = get_args(option)[1].le
                extra = range(_U64_MAX + 1 if limit is None else limit + 1).__contains__
            elif option is Usage:
                allowed.add(Usage)
                extra = counts_in_range
            elif option in _PLAIN_TYPES:
                allowed.add(option)
            else:
                break  # a record of its own, or free-form: not looked at
        else:
            fields.append((field.name, frozenset(allowed), extra))
    if not fields:
        return None

    # A loop over the fields: cheaper than building tuples of their values and types.
    def test(event: Any) -> bool:
        for name, allowed, extra in fields:
            value = getattr(event, name)
            if type(value) not in allowed or (extra is not None and value is not None and not extra(value)):
                return False
        return True

    return test


_PLAIN_TYPES = frozenset({str, bool, type(None), msgspec.UnsetType, Timestamp})
_OWN_FIELDS_TESTS = {kind: test for kind in EVENT_TYPES if (test := _own_fields_test(kind)) is not None}


def _lenient_event_error(data: bytes, kind: type) -> Exception | None:
    """What is wrong with an event the typed decoder refused, read as `decode_event` reads
    it (an extension message of any role, which the typed union knows only as
    "extension"); None if nothing is."""
    # phi-session's own keys are read strictly here: an event a caller built holding one of
    # another type is refused, not recorded holding it.
    try:
        _convert(_repair_event_messages(msgspec.json.decode(data), "$", _Placeholders()), kind)
    except (msgspec.ValidationError, ValueError) as error:  # DecodeError is a ValueError
        return error
    return None


def _refused(name: str, value: Any, error: Exception) -> Exception:
    """The error naming the field of `value` that decoding found wrong (`error`)."""
    message, _, path = str(error).partition(" - at `")
    where, found = _located(name, value, path.rstrip("`"))
    wrong_type = _EXPECTED_TYPE.match(message)
    if wrong_type is not None:
        expected, got = wrong_type.groups()
        actual = type(found).__name__ if found is not _ABSENT else got
        return TypeError(f"{where} must be {_JSON_KINDS.get(expected, expected)}, not {actual}")
    detail = message[:1].lower() + message[1:]
    if found is not _ABSENT and message.startswith("Expected"):
        detail += f"; got {found!r}"
    return InvalidArgument(f"{where}: {detail}")


def _located(name: str, value: Any, path: str) -> tuple[str, Any]:
    """msgspec's error `path` (``$.usage.input``) into `value` as its attribute names after
    `name`, and the value there (`_ABSENT` if it cannot be followed)."""
    where, node = name, value
    for key, index in _PATH_STEP.findall(path[1:]):
        if node is _ABSENT:
            where += f".{key}" if key else f"[{index}]"
            continue
        if key:
            fields = getattr(type(node), "__struct_encode_fields__", ())
            if key in fields:
                attribute = type(node).__struct_fields__[fields.index(key)]
                where, node = f"{where}.{attribute}", getattr(node, attribute)
            else:
                where, node = f"{where}.{key}", _ABSENT
        else:
            where += f"[{index}]"
            try:
                node = node[int(index)]
            except Exception:  # not a sequence after all: the path goes on as written
                node = _ABSENT
    return where, node


_event_decoder = msgspec.json.Decoder(AgentEvent, dec_hook=_dec_hook)


class LazyMessageUpdate(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="MessageUpdate"):
    """A streaming delta read only as far as the recorder needs to drop it.

    Its ``loop_id`` is typed; its message and delta are only checked to be
    well-formed JSON. A delta the recorder keeps is decoded fully (and validated).
    """

    loop_id: str
    message: msgspec.Raw
    delta: msgspec.Raw


def _recording_dec_hook(tp: type, obj: Any) -> Any:
    if tp is Timestamp:  # in nearly every event: first, as in `_dec_hook`
        return Timestamp.parse(obj)
    if tp is Float32 and type(obj) is int and obj == 0:
        # `0` or `-0` (read alike as the integer 0), which phi-core writes as 0.0 and -0.0:
        # only the strict parse tells them apart.
        raise ValueError("a float32 written as the integer 0")
    return _dec_hook(tp, obj)


_recording_decoder = msgspec.json.Decoder(
    Union[tuple(LazyMessageUpdate if t is MessageUpdate else t for t in EVENT_TYPES)],
    dec_hook=_recording_dec_hook,
)


def decode_for_recording(data: bytes | str) -> AgentEvent | LazyMessageUpdate:
    """The recorder's fast path: like ``decode_event(data, strict=False)``, except that a
    ``MessageUpdate`` comes back as a `LazyMessageUpdate` (decode it fully if you keep it).
    An event the fast decoder does not take whole is read strictly, as phi-core reads it."""
    try:
        return _strip_plain(_recording_decoder.decode(data))  # type: ignore[no-any-return]
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, OverflowError, RecursionError):
        return decode_event(data)  # the full path: leniencies, phi-core's numbers, or a clear error


_session_decoder = msgspec.json.Decoder(Session, dec_hook=_dec_hook)
_loop_decoder = msgspec.json.Decoder(LoopRecord, dec_hook=_dec_hook)


class _MessageList(msgspec.Struct):
    """The object form `decode_messages` reads: messages under ``"messages"``, other keys
    ignored."""

    messages: list[AgentMessage]


_MessagesForm = list[AgentMessage] | _MessageList
_messages_decoder = msgspec.json.Decoder(_MessagesForm, dec_hook=_dec_hook)

T = TypeVar("T")

# -- Walking the agent-message positions of events and records -------------------------

MessageFn = Callable[[Any], Any]


def map_event_messages(event: Any, fn: MessageFn) -> Any:
    """`event` with every agent-form message replaced by ``fn(message)``."""
    return map_messages(event, fn, agent=True)


def _map_turn(turn: Turn, fn: MessageFn) -> Turn:
    return replace(
        turn,
        input_messages=tuple(fn(m) for m in turn.input_messages),
        output_message=fn(turn.output_message),
        tool_results=tuple(fn(m) for m in turn.tool_results),
    )


def _map_section(section: CompactedSection | None, fn: MessageFn) -> CompactedSection | None:
    if section is None:
        return None
    return replace(section, messages=tuple(fn(m) for m in section.messages))


def map_loop_messages(record: LoopRecord, fn: MessageFn) -> LoopRecord:
    """A copy of `record` with every agent-form message (events included) mapped by `fn`."""
    events = []
    mappers = message_mappers(agent=True)
    for item in record.events:
        mapper = mappers.get(type(item.event))
        mapped = item.event if mapper is None else mapper(item.event, fn)
        events.append(item if mapped is item.event else LoopEvent(sequence=item.sequence, event=mapped))
    block = record.compaction_block
    if isinstance(block, CompactionBlock):
        block = replace(
            block,
            keep_recent=_map_section(block.keep_recent, fn),
            keep_compacted=_map_section(block.keep_compacted, fn),
        )
    return replace(
        record,
        messages=[fn(m) for m in record.messages],  # made tuples by LoopRecord
        turns=[_map_turn(t, fn) for t in record.turns],
        events=events,
        compaction_block=block,
    )


# -- Encoding -----------------------------------------------------------------------------


def encode_message(message: AgentMessage) -> bytes:
    """The agent-message form of one message (LLM messages sorted, compact)."""
    if isinstance(message, ExtensionMessage):
        return _plain.encode(message)
    return _sorted.encode(message)


def _plain_message(message: Message) -> Message:
    # The plain form never carries agent metadata.
    if (
        message.turn_id is None
        and message.node_id is None
        and message.parent_id is None
        and not message.tags
        and message.provenance_hint is None
        and not message.phi_session_replayed
    ):
        return message
    return replace(
        message,
        turn_id=None,
        node_id=None,
        parent_id=None,
        tags=(),
        provenance_hint=None,
        phi_session_replayed=False,
    )


def stamped_plain(message: Message, turn_id: TurnId) -> Message:
    """`message` as a turn's tool results hold it: the plain form, stamped with `turn_id`
    (phi-core's ``Turn.tool_results`` are plain messages, which carry no other metadata)."""
    return replace(_plain_message(message), turn_id=turn_id)


def encode_plain_message(message: Message) -> bytes:
    """The plain form of one LLM message (as a ``TurnRequest``'s history holds it): agent
    metadata dropped, keys in declaration order, compact."""
    return _plain.encode(_plain_message(message))


def _strip_plain(event: Any) -> Any:
    """Drop agent metadata from the plain-form messages of an event."""
    return map_messages(event, _plain_message, agent=False)


def without_plain_metadata(record: LoopRecord) -> LoopRecord:
    """`record` without agent metadata in its plain-form messages: itself when it has
    none, else a copy. Decoders drop such metadata (as phi-core does) and encoders
    never write it, so a record encodes the same before and after a round trip."""
    events = None
    for index, item in enumerate(record.events):
        stripped = _strip_plain(item.event)
        if stripped is not item.event:
            events = events if events is not None else list(record.events)
            events[index] = LoopEvent(sequence=item.sequence, event=stripped)
    turns = None
    for index, turn in enumerate(record.turns):
        payload = turn.request_payload
        if payload is not None:
            messages = tuple(_plain_message(m) for m in payload.messages)
            if any(a is not b for a, b in zip(messages, payload.messages, strict=True)):
                turns = turns if turns is not None else list(record.turns)
                turns[index] = replace(turn, request_payload=replace(payload, messages=messages))
    if events is None and turns is None:
        return record
    return replace(
        record,
        events=events if events is not None else record.events,
        turns=turns if turns is not None else record.turns,
    )


# A document (a session, a loop record, an event) is encoded from a copy of it, its
# skeleton, holding each message's bytes in the message's place (a msgspec.Raw, written
# as it is). phi-core's session file repeats messages, each TurnRequest carrying the
# conversation so far and each streaming update the message being generated: a
# document's messages are encoded once per object, and the skeleton is made in one
# pass, without copying what holds no message.


class _MessageBytes:
    """The bytes of messages in one form, encoded once per object for one document.

    Keyed by identity: every message remembered is held, so its id cannot be reused
    while this memo lives, and a document's messages do not change while it is being
    encoded. The memo lives for one document only: the next one encodes afresh
    whatever may have changed since (a tool call's argument dict, say).
    """

    __slots__ = ("_encode", "_held", "_memo", "_pretty", "known")

    def __init__(self, encode: Callable[[Any], bytes]) -> None:
        self._encode = encode
        self._memo: dict[int, msgspec.Raw] = {}
        self._held: list[Any] = []
        self._pretty: dict[int, bytes] = {}
        self.known: Callable[[int], msgspec.Raw | None] = self._memo.get  # by id(message)

    def one(self, message: Any) -> msgspec.Raw:
        raw = self._memo.get(id(message))
        if raw is None:
            raw = self._memo[id(message)] = msgspec.Raw(self._encode(message))
            self._held.append(message)
        return raw

    def many(self, messages: tuple[Any, ...] | list[Any]) -> tuple[msgspec.Raw, ...]:
        known, one = self.known, self.one
        # Encoded messages are never empty (a Raw of no bytes would be falsy).
        return tuple([known(id(m)) or one(m) for m in messages])

    def pretty(self, message: Any) -> bytes:
        """The message's bytes pretty-printed, indented as at the top of a document."""
        data = self._pretty.get(id(message))
        if data is None:
            data = self._pretty[id(message)] = msgspec.json.format(self.one(message), indent=2)
        return data


class _Mapped:
    """Messages in one form written as a caller's function makes them (`encode_loop_with`)."""

    __slots__ = ("known", "one")

    def __init__(self, fn: MessageFn) -> None:
        self.known: Callable[[int], None] = cast(Any, {}).get  # none: every message goes through `one`
        self.one = fn

    def many(self, messages: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
        return tuple(map(self.one, messages))


# The pretty form of a document is json.format over its compact bytes, except for the
# histories that requests carry: each TurnRequest carries the conversation so far, and
# formatting that would format each message again and again (json.format writes about
# 1 GB/s here, bytes.join ten times that). Each non-empty history is a marker in the
# skeleton instead; once that is formatted, the history's pretty bytes are joined in at
# its marker, each distinct message formatted once and indented once per depth. The
# marker holds a DEL byte, which msgspec writes as it is and bytes.find locates with
# memchr (a search for a longer needle runs no faster than json.format); a document
# with DEL bytes of its own is formatted whole. Other messages repeat at different
# depths or a few times: splicing them measured slower than formatting them in place.
_DEL = b"\x7f"
_MARKER = msgspec.Raw(b'"\x7f"')


class _PrettyHistories:
    """Plain-form histories whose messages stand at one depth of a pretty document: each
    that repeats a message of an earlier one written as the marker, the pieces of its
    pretty bytes appended to ``pieces``; the others (a request carrying only new
    messages) written in place, which costs less."""

    __slots__ = ("_bytes", "_close", "_memo", "_met", "_newline", "_open", "_pieces", "_separator")

    def __init__(self, messages: _MessageBytes, depth: int, pieces: list[list[bytes]]) -> None:
        self._bytes = messages
        self._memo: dict[int, bytes] = {}  # ids of messages that `messages` holds
        self._met: set[int] = set()  # of messages written in place, held by `messages` too
        self._pieces = pieces
        self._newline = b"\n" + b" " * depth
        self._open, self._separator = b"[" + self._newline, b"," + self._newline
        self._close = self._newline[:-2] + b"]"

    def many(self, messages: tuple[Any, ...] | list[Any]) -> Any:
        if not messages:
            return messages  # written []
        memo, ids = self._memo, list(map(id, messages))
        if self._met.isdisjoint(ids) and memo.keys().isdisjoint(ids):
            self._met.update(ids)
            return self._bytes.many(messages)
        found = list(map(memo.get, ids))
        index = 0
        while not all(found):  # pieces are never empty
            index = found.index(None, index)
            message = messages[index]
            found[index] = memo[id(message)] = self._bytes.pretty(message).replace(b"\n", self._newline)
        pieces = [self._separator] * (2 * len(found) + 1)
        pieces[1::2] = cast(list[bytes], found)
        pieces[0], pieces[-1] = self._open, self._close
        self._pieces.append(pieces)
        return _MARKER


class _ResentHistories:
    """Plain-form histories written as their messages' bytes. Each request of a
    conversation resends the one before it: a history whose first messages are the
    previous history's (the same objects) reuses that one's bytes and looks up only
    the messages after them."""

    __slots__ = ("_bytes", "_last", "_written")

    def __init__(self, messages: _MessageBytes) -> None:
        self._bytes = messages
        self._last: tuple[Any, ...] | list[Any] = ()
        self._written: tuple[msgspec.Raw, ...] = ()

    def many(self, messages: tuple[Any, ...] | list[Any]) -> tuple[msgspec.Raw, ...]:
        last = self._last
        if len(messages) >= len(last) and all(map(is_, messages, last)):
            written = self._written + self._bytes.many(messages[len(last) :])
        else:
            written = self._bytes.many(messages)
        self._last, self._written = messages, written  # held: their ids stay theirs
        return written


_Form = _MessageBytes | _Mapped
_Histories = _Mapped | _PrettyHistories | _ResentHistories


class _Item(msgspec.Struct, gc=False):
    """A `LoopEvent` of a skeleton, written the same: made faster (positional, untracked)."""

    sequence: int
    event: Any


# The streaming events (MessageStart, MessageUpdate, MessageEnd) are most of a loop's
# events and carry one agent-form message, their ``message``: their skeletons are made
# inline. The other events that carry messages go through their fields' writers.
_STREAMING = frozenset(tp for tp, fields in MESSAGE_FIELDS.items() if fields == (MessageField("message"),))
_CARRIERS = frozenset(MESSAGE_FIELDS) - _STREAMING


class _Skeleton:
    """Makes the skeletons of events and loop records: each message written by
    ``forms[agent]`` (by its form), except the histories that requests carry, written
    by ``histories(depth)``, depth being the indentation of a history's messages in a
    pretty loop record (whose fields stand at 2).

    A document's histories are met in document order (a `_PrettyHistories` relies on
    it): a loop's turns before its events.
    """

    __slots__ = ("_event_fields", "_forms", "_histories", "_request")

    def __init__(self, forms: tuple[_Form, _Form], histories: Callable[[int], _Histories]) -> None:
        self._forms = forms  # indexed by MessageField.agent
        self._histories = histories
        self._request = histories(10)
        # Per event type met, its message fields and their writers: made on first use, as
        # `encode_event` makes a skeleton for one event.
        self._event_fields: dict[type, tuple[tuple[str, str | None, MessageFn], ...]] = {}

    def _fields_of(self, tp: type) -> tuple[tuple[str, str | None, MessageFn], ...]:
        """Those of event type `tp` (empty for a type that carries no message)."""
        fields = self._event_fields[tp] = tuple(
            (field.name, field.within, self._writer(field, self._histories))
            for field in MESSAGE_FIELDS.get(tp, ())
        )
        return fields

    def _writer(self, field: MessageField, histories: Callable[[int], _Histories]) -> MessageFn:
        if field.within is not None and not field.agent:  # a request's history
            return histories(12).many
        form = self._forms[field.agent]
        return form.many if field.many else form.one

    def event(self, event: Any) -> Any:
        fields = self._event_fields.get(type(event)) or self._fields_of(type(event))
        return self._event(event, fields) if fields else event

    def _event(self, event: Any, fields: tuple[tuple[str, str | None, MessageFn], ...]) -> Any:
        skeleton = event.__copy__()  # a copy no one else holds yet: set its fields
        for name, within, write in fields:
            value = getattr(event, name)
            if within is not None:
                inner = value.__copy__()
                force_setattr(inner, within, write(getattr(value, within)))
                force_setattr(skeleton, name, inner)
            else:
                force_setattr(skeleton, name, write(value))
        return skeleton

    def _turn(self, turn: Turn) -> Turn:
        agent = self._forms[True]
        skeleton = _copy(turn)
        force_setattr(skeleton, "input_messages", agent.many(turn.input_messages))
        force_setattr(skeleton, "output_message", agent.one(turn.output_message))
        force_setattr(skeleton, "tool_results", agent.many(turn.tool_results))
        payload = turn.request_payload
        if payload is not None:
            payload = _copy(payload)
            force_setattr(payload, "messages", self._request.many(payload.messages))
            force_setattr(skeleton, "request_payload", payload)
        return skeleton

    def _section(self, section: CompactedSection | None) -> CompactedSection | None:
        if section is None:
            return None
        skeleton = _copy(section)
        force_setattr(skeleton, "messages", self._forms[True].many(section.messages))
        return skeleton

    def loop(self, record: LoopRecord) -> LoopRecord:
        skeleton = _copy(record)
        force_setattr(skeleton, "messages", self._forms[True].many(record.messages))
        # Lists: the skeleton is only encoded (as arrays, like the record's tuples).
        force_setattr(skeleton, "turns", [self._turn(turn) for turn in record.turns])
        agent = self._forms[True]
        known, one, event_of = agent.known, agent.one, self.event
        events: list[LoopEvent | _Item] = []
        append = events.append
        for item in record.events:
            event: Any = item.event
            if type(event) in _STREAMING:  # each one through the form: encode_loop_with counts them
                message = event.message
                raw = known(id(message)) or one(message)
                append(_Item(item.sequence, replace(event, message=raw)))  # faster than copy, set
            elif type(event) in _CARRIERS:
                append(_Item(item.sequence, event_of(event)))
            else:
                append(item)
        force_setattr(skeleton, "events", events)
        block = record.compaction_block
        if isinstance(block, CompactionBlock):
            block = _copy(block)
            force_setattr(block, "keep_recent", self._section(block.keep_recent))
            force_setattr(block, "keep_compacted", self._section(block.keep_compacted))
            skeleton.compaction_block = block
        return skeleton


_S = TypeVar("_S", bound=msgspec.Struct)


def _copy(struct: _S) -> _S:
    """A shallow copy of `struct` (frozen or not), for a skeleton to set fields of."""
    return struct.__copy__()  # type: ignore[attr-defined,no-any-return]


def _forms() -> tuple[_MessageBytes, _MessageBytes]:
    """For one document: every distinct message encoded once, in each form it takes
    (indexed by ``MessageField.agent``)."""
    return _MessageBytes(encode_plain_message), _MessageBytes(encode_message)


def _skeleton() -> _Skeleton:
    forms = _forms()
    return _Skeleton(forms, lambda _depth: _ResentHistories(forms[False]))


# A pretty document is formatted from its compact bytes, which live only until then.
# Encoding those into a new bytes object each time cost more than the encoding itself:
# glibc gives a freed buffer of a session's size back to the kernel, and the next one
# is page-faulted in again (two thirds of a pretty session's encoding time on the
# issue-11 workload). Each thread writes them over one buffer instead, kept unless a
# document grew it past _SCRATCH_KEPT (what a long-lived thread holds stays about that).
_scratch = threading.local()
_SCRATCH_KEPT = 16 * 1024 * 1024


def _formatted(document: Any) -> bytes:
    """``json.format(_plain.encode(document), indent=2)``, through the thread's buffer."""
    # Taken out while in use: an encoding that reentered (a hook encoding a document)
    # gets a buffer of its own.
    buffer: bytearray = _scratch.__dict__.pop("buffer", None) or bytearray()
    _plain.encode_into(document, buffer)
    with memoryview(buffer) as view:
        text = msgspec.json.format(view, indent=2)
    if len(buffer) <= _SCRATCH_KEPT:
        _scratch.buffer = buffer
    return text


def _pretty(document: Callable[[_Skeleton], Any], depth: int) -> bytes:
    """The pretty bytes of what `document` makes from a skeleton maker, its loop
    records standing at `depth` (their fields at ``depth + 2``)."""
    forms, histories = _forms(), list[list[bytes]]()
    skeleton = _Skeleton(forms, lambda at: _PrettyHistories(forms[False], depth + at, histories))
    text = _formatted(document(skeleton))
    if not histories:
        return text
    view, joined, start = memoryview(text), list[bytes | memoryview](), 0
    for pieces in histories:  # each marker, in order, is the next DEL byte...
        at = text.find(_DEL, start)
        joined.append(view[start : at - 1])  # up to the marker's opening quote
        joined += pieces
        start = at + 2
    if text.find(_DEL, start) != -1:  # ...unless the document holds DEL bytes of its own
        return _formatted(document(_skeleton()))
    joined.append(view[start:])
    return b"".join(joined)


def encode_event(event: AgentEvent) -> bytes:
    """One event, compact, exactly as phi-core writes an event-stream line (no newline).
    `TypeError` for anything else (a session: `encode_session`)."""
    if type(event) not in EVENT_CLASSES:
        raise not_an_event("encode_event()", event)
    return _plain.encode(_skeleton().event(event))


def encode_record(record: LoopConfigSnapshot | Usage) -> bytes:
    """A record carried inside events (a config snapshot, a usage), compact, as phi-core writes it."""
    return _plain.encode(record)


_RecordT = TypeVar("_RecordT", LoopConfigSnapshot, Usage)


def decode_record(data: bytes | str, kind: type[_RecordT]) -> _RecordT:
    """The inverse of `encode_record`. Raises `DecodeError`."""
    try:
        decoded: _RecordT = msgspec.json.decode(data, type=kind, dec_hook=_dec_hook)
    except (msgspec.DecodeError, UnicodeEncodeError) as error:  # ValidationError included; text
        raise DecodeError(f"not a {kind.__name__}: {error}") from None  # with lone surrogates: no JSON
    return decoded


def encode_session(session: Session, *, pretty: bool = True) -> bytes:
    """A session file's bytes: pretty-printed (two spaces), no final newline."""
    check_type("session", session, Session)

    def document(skeleton: _Skeleton) -> Session:
        return replace(session, loops=[skeleton.loop(record) for record in session.loops])

    return _pretty(document, 4) if pretty else _plain.encode(document(_skeleton()))


def encode_loop(record: LoopRecord, *, pretty: bool = True) -> bytes:
    check_type("record", record, LoopRecord)

    def document(skeleton: _Skeleton) -> LoopRecord:
        return skeleton.loop(record)

    return _pretty(document, 0) if pretty else _plain.encode(document(_skeleton()))


def encode_loop_with(record: LoopRecord, *, agent: MessageFn, plain: MessageFn) -> bytes:
    """`record`'s compact JSON with each agent-form message written as ``agent(message)``
    and each plain-form one (a ``TurnRequest``'s history) as ``plain(message)``: both
    return a ``msgspec.Raw``, written as it is. With `encode_message` and
    `encode_plain_message` behind them, these are `encode_loop`'s bytes; a store
    writes references instead, to keep each distinct message once."""
    forms = (_Mapped(plain), _Mapped(agent))
    return _plain.encode(_Skeleton(forms, lambda _depth: forms[False]).loop(record))


def encode(obj: Session | LoopRecord | AgentEvent | AgentMessage, *, pretty: bool | None = None) -> bytes:
    """phi-core's JSON for a Session, LoopRecord, event or message.

    Sessions and loop records are pretty-printed (the session-file layout) and
    events compact (the event-stream layout) unless `pretty` says otherwise.
    `TypeError` for anything else.
    """
    if pretty is not None and not isinstance(pretty, bool):
        raise TypeError(f"pretty must be bool or None, not {type(pretty).__name__}")
    if isinstance(obj, Session):
        return encode_session(obj, pretty=True if pretty is None else pretty)
    if isinstance(obj, LoopRecord):
        return encode_loop(obj, pretty=True if pretty is None else pretty)
    if isinstance(obj, (*LLM_MESSAGE_TYPES, ExtensionMessage)):
        data = encode_message(obj)
    elif type(obj) in EVENT_CLASSES:
        data = encode_event(obj)
    else:
        raise TypeError(f"encode() takes a Session, LoopRecord, event or message, not {type(obj).__name__}")
    return msgspec.json.format(data, indent=2) if pretty else data


# -- Decoding -------------------------------------------------------------------------------

_METADATA_TYPES: dict[str, Any] = {
    "turnId": TurnId,
    "nodeId": int,
    "parentId": int,
    "tags": tuple[NodeTag, ...],
    "provenanceHint": BlockProvenance,
    "phiSessionReplayed": bool,
}
_METADATA_FIELDS = {
    "turnId": "turn_id",
    "nodeId": "node_id",
    "parentId": "parent_id",
    "tags": "tags",
    "provenanceHint": "provenance_hint",
    "phiSessionReplayed": "phi_session_replayed",
}
_LlmMessage = Union[LLM_MESSAGE_TYPES]  # type: ignore[valid-type]


def _convert(obj: Any, tp: Any) -> Any:
    return msgspec.convert(obj, tp, dec_hook=_dec_hook)


def _lenient_metadata(key: str, value: Any) -> Any:
    """A metadata value, or None when it does not parse (phi-core drops it silently)."""
    if value is None:
        return None
    if key == "turnId" and isinstance(value, list) and len(value) == 2:
        value = {"loopId": value[0], "turnIndex": value[1]}  # serde also reads a record as an array
    try:
        parsed = _convert(value, _METADATA_TYPES[key])
    except (msgspec.ValidationError, ValueError, TypeError):
        return None
    if key in ("nodeId", "parentId") and not (0 <= parsed <= _U64_MAX):
        return None
    return parsed


class _Placeholders:
    """Extension messages with unusual roles cannot pass through msgspec.convert;
    they travel as placeholders and are put back afterwards. A placeholder's data is
    a private sentinel, so no input can pass for one."""

    _SENTINEL = object()

    def __init__(self) -> None:
        self.items: dict[str, ExtensionMessage] = {}

    def hide(self, message: ExtensionMessage) -> ExtensionMessage:
        key = str(len(self.items))
        self.items[key] = message
        return ExtensionMessage(kind=key, data=self._SENTINEL)

    def restore(self, message: Any) -> Any:
        if type(message) is ExtensionMessage and message.data is self._SENTINEL:
            return self.items[message.kind]
        return message


def _lenient_message(obj: Any, path: str, hidden: _Placeholders) -> AgentMessage:
    """Read an AgentMessage the way phi-core does: LLM message first, then extension."""
    if isinstance(obj, dict):
        if obj.get("role") in ("user", "assistant", "toolResult"):
            core = {k: v for k, v in obj.items() if k not in _METADATA_FIELDS}
            try:
                message = _convert(core, _LlmMessage)
            except (msgspec.ValidationError, ValueError):
                message = None
            if message is not None:
                metadata = {
                    _METADATA_FIELDS[key]: _lenient_metadata(key, obj.get(key)) for key in _METADATA_FIELDS
                }
                if metadata["tags"] is None:
                    metadata["tags"] = ()
                metadata["phi_session_replayed"] = metadata["phi_session_replayed"] is True
                return replace(message, **metadata)  # type: ignore[no-any-return]
        role, kind = obj.get("role"), obj.get("kind")
        if isinstance(role, str) and isinstance(kind, str) and "data" in obj:
            message = extension_message(role, kind, obj["data"])
            return message if type(message) is ExtensionMessage else hidden.hide(message)
    raise DecodeError(f"data did not match any variant of AgentMessage - at `{path}`")


def _lenient_plain(obj: Any, path: str) -> Any:
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in _METADATA_FIELDS}
    return obj


# phi-session's own keys, which phi-core does not know and so ignores whatever they hold
# (spec §1.4): one holding a value phi-session does not write there is read as absent.
_EXTENSION_KEYS: dict[str, tuple[tuple[str, Any], ...]] = {
    kind.__name__: tuple(
        (field.name, field.type) for field in msgspec.structs.fields(kind) if field.name in keys
    )
    for kind, keys in (
        (AgentStart, {"formation"}),
        (AgentEnd, {"error"}),
        (LoopRecord, {"error"}),
        (Session, {"rejected", "session_events"}),
    )
}
# Of those, the list of events: a list is the type phi-session writes there, so each of
# its events is read on its own, a bad one dropped (reported each time: it is lost) and
# the others kept.
_EVENT_LIST_KEY = ("Session", "session_events")
_ignored_extension_keys: set[str] = set()  # each ("AgentEnd.error") logged the first time only
_CONVERT_ERRORS = (msgspec.ValidationError, ValueError, OverflowError, RecursionError)


def _drop_misfit_extensions(obj: dict[str, Any], kind: str, hidden: _Placeholders) -> None:
    """Remove from `obj`, the tree of a `kind` (an event type, "LoopRecord", "Session"),
    each of phi-session's own keys holding a value of another type than it writes there,
    and from its list of events (`_EVENT_LIST_KEY`) each that is no event."""
    for key, tp in _EXTENSION_KEYS.get(kind, ()):
        if key not in obj:
            continue
        if (kind, key) == _EVENT_LIST_KEY and isinstance(obj[key], list):
            obj[key] = _kept_session_events(obj[key], obj.get("session_id"), hidden)
            continue
        error = _misfit_error(obj[key], tp)
        if error is not None:
            del obj[key]
            name = f"{kind}.{key}"
            if name not in _ignored_extension_keys:
                _ignored_extension_keys.add(name)
                found = str(error).partition(" - at `")[0]
                logger.warning("ignored %s as phi-core does: %s (logged once)", name, _lowered(found))


def _misfit_error(value: Any, tp: Any) -> Exception | None:
    """Why `value` is not of type `tp` (None if it is)."""
    try:
        _convert(value, tp)
    except _CONVERT_ERRORS as error:
        return error
    return None


def _kept_session_events(events: list[Any], session_id: Any, hidden: _Placeholders) -> list[Any]:
    """The items of a session's `session_events` that are events, read, each other dropped
    with a warning."""
    kept = []
    for index, item in enumerate(events):
        try:
            kept.append(_read_session_event(item, hidden))
        except _CONVERT_ERRORS as error:
            logger.warning(
                "session %r: dropped session_events[%d], no event: %s",
                session_id,
                index,
                _lowered(str(error)),
            )
    return kept


def _read_session_event(item: Any, hidden: _Placeholders) -> AgentEvent:
    """`item` of a session's `session_events` read as `decode_event` reads an event (its
    tree repaired in place)."""
    return _convert(_repair_event(item, "$", hidden), AgentEvent)  # type: ignore[no-any-return]


def _kept_by_decoding(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """`obj`, the tree of a `kind`, with None in place of what `_drop_misfit_extensions`
    drops from it, unchanged (`_strict.Kept`: the strict checks need not look there)."""
    own = _EXTENSION_KEYS.get(kind)
    if own is None:
        return obj
    kept = dict(obj)
    for key, tp in own:
        if key not in obj:
            continue
        if (kind, key) == _EVENT_LIST_KEY and isinstance(obj[key], list):
            kept[key] = [item if _is_session_event(item) else None for item in obj[key]]
        elif _misfit_error(obj[key], tp) is not None:
            kept[key] = None
    return kept


def _is_session_event(item: Any) -> bool:
    """Whether decoding keeps `item` of a session's `session_events` (read on a copy)."""
    try:
        _read_session_event(copy.deepcopy(item), _Placeholders())
    except _CONVERT_ERRORS:
        return False
    return True


def _lowered(message: str) -> str:
    """An error's message as the middle of a sentence."""
    return message[:1].lower() + message[1:]


def _repair_event(obj: Any, path: str, hidden: _Placeholders) -> Any:
    """An event's tree as phi-core reads it: phi-session's own keys of another type
    dropped, its agent-form messages read leniently."""
    if isinstance(obj, dict) and isinstance(obj.get("type"), str):
        _drop_misfit_extensions(obj, obj["type"], hidden)
    return _repair_event_messages(obj, path, hidden)


def _repair_event_messages(obj: Any, path: str, hidden: _Placeholders) -> Any:
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("type")
    for field in MESSAGE_FIELDS_BY_TAG.get(kind, ()) if isinstance(kind, str) else ():
        container: Any = obj
        key, where = field.name, f"{path}.{field.name}"
        if field.within is not None:
            container, key, where = obj.get(field.name), field.within, f"{where}.{field.within}"
            if not isinstance(container, dict):
                continue
        if key not in container:
            continue
        value = container[key]
        if not field.many:
            container[key] = _lenient_field(field, value, where, hidden)
        elif isinstance(value, list):
            container[key] = [_lenient_field(field, m, f"{where}[{i}]", hidden) for i, m in enumerate(value)]
    return obj


def _lenient_field(field: MessageField, obj: Any, path: str, hidden: _Placeholders) -> Any:
    return _lenient_message(obj, path, hidden) if field.agent else _lenient_plain(obj, path)


def _repair_payload(payload: Any, path: str) -> None:
    if isinstance(payload, dict) and isinstance(payload.get("messages"), list):
        payload["messages"] = [_lenient_plain(m, path) for m in payload["messages"]]


def _repair_messages(container: dict[str, Any], key: str, path: str, hidden: _Placeholders) -> None:
    value = container.get(key)
    if isinstance(value, list):
        container[key] = [_lenient_message(m, f"{path}.{key}[{i}]", hidden) for i, m in enumerate(value)]


def _repair_loop(obj: Any, path: str, hidden: _Placeholders) -> Any:
    if not isinstance(obj, dict):
        return obj
    _drop_misfit_extensions(obj, "LoopRecord", hidden)
    _repair_messages(obj, "messages", path, hidden)
    turns = obj.get("turns")
    if isinstance(turns, list):
        for i, turn in enumerate(turns):
            if isinstance(turn, dict):
                turn_path = f"{path}.turns[{i}]"
                _repair_messages(turn, "input_messages", turn_path, hidden)
                _repair_messages(turn, "tool_results", turn_path, hidden)
                if "output_message" in turn:
                    turn["output_message"] = _lenient_message(
                        turn["output_message"], f"{turn_path}.output_message", hidden
                    )
                _repair_payload(turn.get("request_payload"), turn_path)
    events = obj.get("events")
    if isinstance(events, list):
        for i, item in enumerate(events):
            if isinstance(item, dict) and "event" in item:
                item["event"] = _repair_event(item["event"], f"{path}.events[{i}].event", hidden)
    block = obj.get("compaction_block")
    if isinstance(block, dict):
        for section in ("keep_recent", "keep_compacted"):
            if isinstance(block.get(section), dict):
                _repair_messages(block[section], "messages", f"{path}.compaction_block.{section}", hidden)
    return obj


def _repair_session(obj: Any, path: str, hidden: _Placeholders) -> Any:
    if not isinstance(obj, dict):
        return obj
    _drop_misfit_extensions(obj, "Session", hidden)
    if isinstance(obj.get("loops"), list):
        obj["loops"] = [_repair_loop(r, f"{path}.loops[{i}]", hidden) for i, r in enumerate(obj["loops"])]
    return obj


def _too_deep() -> DecodeError:
    """What a value nested past what msgspec reads (its `RecursionError`) is: one line."""
    return DecodeError(f"nesting too deep (phi-core allows {_strict.MAX_DEPTH} levels)")


@overload
def decode_json(data: bytes) -> Any: ...
@overload
def decode_json(data: bytes, tp: type[_V]) -> _V: ...
def decode_json(data: bytes, tp: Any = Any) -> Any:
    """`data` as plain JSON (of `tp`, as ``msgspec.json.decode`` reads it), any reason it
    cannot be read a `DecodeError`: a value nested too deep too, which msgspec raises as a
    `RecursionError` no caller of it expects."""
    try:
        return msgspec.json.decode(data, type=tp)
    except msgspec.DecodeError as error:
        raise DecodeError(str(error)) from None
    except RecursionError:
        raise _too_deep() from None


def _decode(
    data: bytes | str,
    decoder: msgspec.json.Decoder[Any],
    tp: Any,
    repair: Callable[[Any, str, _Placeholders], Any],
    restore: Callable[[Any, MessageFn], Any],
    check: Callable[[Any, _strict.Kept], None] | None,
) -> Any:
    """Fast typed decode; phi-core's leniencies on a generic retry; `check` for strictness."""
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"expected bytes or str, got {type(data).__name__}")
    try:
        value = decoder.decode(data)
        lenient = False
    except msgspec.ValidationError as fast_error:
        value, lenient = fast_error, True
    except msgspec.DecodeError as error:
        raise DecodeError(str(error)) from None
    except (ValueError, OverflowError) as error:  # raised by our own parsers (timestamps, tagged enums)
        raise DecodeError(str(error)) from None
    except RecursionError:
        raise _too_deep() from None
    tree = None
    if check is not None:
        try:
            scan = _strict.Scan(data)
        except ValueError as error:
            raise DecodeError(str(error)) from None
        except RecursionError:
            raise _too_deep() from None
        if scan.numbers_differ:  # read numbers as phi-core does, then convert again
            tree, lenient = scan.tree, True
        # What the typed decoder took, decoding keeps whole; else it may drop what phi-core ignores.
        check(scan.tree, _kept_by_decoding if lenient else _strict.kept_whole)
    if not lenient:
        return value
    hidden = _Placeholders()
    try:
        if tree is None:
            tree = msgspec.json.decode(data)
        value = _convert(repair(tree, "$", hidden), tp)
    except msgspec.ValidationError as error:
        raise DecodeError(str(error)) from None
    except DecodeError:
        raise
    except (ValueError, OverflowError) as error:
        raise DecodeError(str(error)) from None
    except RecursionError:
        raise _too_deep() from None
    return restore(value, hidden.restore) if hidden.items else value


def _restore_session(session: Session, fn: MessageFn) -> Session:
    session.loops = [map_loop_messages(r, fn) for r in session.loops]
    if not isinstance(session.session_events, msgspec.UnsetType):
        session.session_events = [map_event_messages(event, fn) for event in session.session_events]
    return session


def _repair_message_list(obj: Any, path: str, hidden: _Placeholders) -> Any:
    if isinstance(obj, list):
        return [_lenient_message(m, f"{path}[{i}]", hidden) for i, m in enumerate(obj)]
    if isinstance(obj, dict):
        _repair_messages(obj, "messages", path, hidden)
    return obj


def _listed(value: list[AgentMessage] | _MessageList) -> list[AgentMessage]:
    return value.messages if isinstance(value, _MessageList) else value


def decode_messages(data: bytes | str) -> list[AgentMessage]:
    """Read agent messages in their agent-message JSON (`encode_message`'s): a JSON array
    of them, or an object holding one under ``"messages"`` (what ``phi-session fork
    --out`` writes; other keys are ignored). Raises `DecodeError`."""
    value = _decode(
        data,
        _messages_decoder,
        _MessagesForm,
        _repair_message_list,
        lambda found, fn: [fn(message) for message in _listed(found)],
        None,
    )
    return _listed(value)


def decode_event(data: bytes | str, *, strict: bool = True) -> AgentEvent:
    """Read one event (one line of an event stream). Raises `DecodeError`.

    With ``strict=False`` the slower second parse that matches phi-core on exotic
    input is skipped: repeated keys in record objects then win silently, integers
    beyond 64 bits are kept and ``-0`` reads as 0 (as on the recorder's fast path).
    """
    check = _strict.check_event if strict else None
    try:
        event = _decode(data, _event_decoder, AgentEvent, _repair_event, map_event_messages, check)
    except DecodeError as error:
        if str(error).endswith("- at `$.type`"):  # name the vocabulary, as phi-core does
            known = ", ".join(t.__name__ for t in EVENT_TYPES)
            raise DecodeError(f"{error}: unknown event type (phi-core 0.10 knows {known})") from None
        raise
    return _strip_plain(event)  # type: ignore[no-any-return]


def decode_session(data: bytes | str, *, strict: bool = True) -> Session:
    """Read a session file. Raises `DecodeError` (see `decode_event` for `strict`)."""
    check = _strict.check_session if strict else None
    session: Session = _decode(data, _session_decoder, Session, _repair_session, _restore_session, check)
    session.loops = [without_plain_metadata(record) for record in session.loops]
    return session


def decode_loop(data: bytes | str, *, strict: bool = True) -> LoopRecord:
    """Read one loop record. Raises `DecodeError` (see `decode_event` for `strict`)."""
    check = _strict.check_loop if strict else None
    record: LoopRecord = _decode(data, _loop_decoder, LoopRecord, _repair_loop, map_loop_messages, check)
    return without_plain_metadata(record)
