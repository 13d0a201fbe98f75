"""The checks that make decoding reject exactly what phi-core rejects.

msgspec, like most JSON readers, lets a repeated key win silently, reads ``-0`` as
the integer 0 and keeps integers of any size. phi-core (serde_json) rejects
repeated keys in record objects, reads ``-0`` as the float -0.0, turns integers
beyond the 64-bit ranges into floats, and refuses nesting deeper than 128.
This second, slower parse (stdlib ``json`` with hooks) finds those cases; it runs
only in strict decoding, never on the recorder's hot path. `clip_depth` keeps what is
recorded within the nesting limit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import Any

import msgspec

from .errors import DecodeError
from .events import MESSAGE_FIELDS_BY_TAG

_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)


def read_as_integer(value: int) -> bool:
    """Whether phi-core reads `value`, an integer in a free-form value, as the integer it
    is: it reads one beyond its 64-bit integers as a float."""
    return _I64_MIN <= value <= _U64_MAX


MAX_DEPTH = 128
MAX_VALUE_DEPTH = MAX_DEPTH - 11
"""How deep a free-form value (tool arguments, a tool result's details, loop metadata)
may nest for phi-core to read the session holding it: the deepest place a session holds
one is under 11 levels (the session, its loops, a loop, its events, one, its event, a
`TurnRequest`'s payload, its messages, one, its content, a tool call)."""
# Free-form values, where phi-core lets the last repeated key win.
_FREE_FORM = frozenset({"metadata", "args", "arguments", "details", "data", "parameters", "schema"})
# Per event type, the fields holding agent-form messages, which phi-core reads leniently
# (repeated keys included); plain-form messages are record objects like any other.
_AGENT_MESSAGE_KEYS = {
    tag: frozenset(field.name for field in fields if field.agent)
    for tag, fields in MESSAGE_FIELDS_BY_TAG.items()
}
_NO_KEYS: frozenset[str] = frozenset()


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object in which some key appeared more than once."""

    repeated: str = ""


class Scan:
    """The result of the strict parse: the tree phi-core would see and what was odd."""

    def __init__(self, data: bytes | str) -> None:
        self.repeated = False
        self.numbers_differ = False
        text = str(data, "utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        self.tree: Any = json.loads(text, object_pairs_hook=self._pairs, parse_int=self._int)
        if text.count("[") + text.count("{") > MAX_DEPTH and _depth(self.tree) > MAX_DEPTH:
            raise DecodeError(f"nesting deeper than {MAX_DEPTH} levels")

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            self.repeated = True
            seen: set[str] = set()
            repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            obj = _Repeated(obj)
            obj.repeated = repeated
        return obj

    def _int(self, token: str) -> int | float:
        if token == "-0":
            self.numbers_differ = True
            return -0.0
        value = int(token)
        if not read_as_integer(value):
            self.numbers_differ = True
            number = float(token)
            if math.isinf(number):  # beyond any float, as serde_json says
                raise DecodeError(f"number out of range: {token[:20]}…")
            return number
        return value


# JSON that msgspec wrote holds no repeated key and no `-0`: strict decoding can give
# something else than lenient decoding only for an integer beyond 64 bits or nesting
# past the limit. `strict_adds_nothing` rules both out at C speed, so that decoding
# what was just encoded need not pay for the second parse.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_MAYBE_TOO_BIG = b"0" * 19  # 19 digits in a row: an integer that may not fit (or a string's digits)
# Formatted one space a level, the elements of a container at the limit stand on lines
# indented by MAX_DEPTH spaces: one of them that is a container (alone or after its key)
# is nested one level too deep, and anything deeper is inside such a one.
_TOO_DEEP = re.compile(rb'\n {%d}(?:[\[{]|"(?:[^"\\]|\\.)*": [\[{])' % MAX_DEPTH)
# Indentation can make the formatted text far longer than the JSON (a long array nested
# deep). Each of its lines (at most two per container and one per comma) is indented by at
# most one space per container: where that could pass this many bytes, the strict parse decides.
_INDENT_BUDGET = 16 * 1024 * 1024


def holds_no_big_integer(data: bytes) -> bool:
    """Whether `data`, JSON as msgspec writes it, is sure to hold no integer beyond 64
    bits (False also where it merely might)."""
    return data.translate(_DIGITS_ONLY).find(_MAYBE_TOO_BIG) == -1


def strict_adds_nothing(data: bytes) -> bool:
    """Whether strict decoding of `data`, JSON as msgspec writes it, is sure to give what
    lenient decoding gives (False also where it merely might not)."""
    if not holds_no_big_integer(data):
        return False
    containers = data.count(b"[") + data.count(b"{")
    if containers <= MAX_DEPTH:
        return True
    if (2 * containers + data.count(b",")) * containers > _INDENT_BUDGET:
        return False
    return _TOO_DEEP.search(msgspec.json.format(data, indent=1)) is None


_encode = msgspec.json.Encoder().encode


def clip_depth(tree: Any, encoded: bytes) -> bool:
    """Replace, in `tree` (JSON data of the caller's own; `encoded`, its JSON), each
    container nested deeper than `MAX_VALUE_DEPTH` by its JSON text (`json_text`); whether it
    held one."""
    return nests_deeper(encoded, MAX_VALUE_DEPTH) and _clip(tree, 1)


def nests_deeper(encoded: bytes, depth: int) -> bool:
    """Whether `encoded`, JSON as msgspec writes it, nests containers deeper than `depth`."""
    if encoded.count(b"[") + encoded.count(b"{") <= depth:
        return False  # a bound at C speed (brackets inside strings count too)
    brackets = _STRING.sub(b"", encoded).translate(None, _NO_BRACKET)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > depth


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NO_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEP = [1 if byte in b"[{" else -1 for byte in range(256)]


def clipped(value: Any) -> Any:
    """`value` (JSON data of another's, which may be nested too deep to write at all, or
    hold itself) as `clip_depth` leaves a copy of it, a container inside itself cut as one
    that cannot be written: `value` itself if nothing is cut. A container held in more than
    one place is copied again at each (as the encoder writes it) only `_REPEATS_BUDGET`
    times in all, later places cut as well: a container holding another twice, a few
    hundred levels down, is written as more containers than there are atoms."""
    enclosing: set[int] = set()  # the ids of the containers being copied
    copied_once: set[int] = set()
    texts: dict[int, str] = {}  # `json_text` of the containers under the limit, by id
    repeats = 0
    cut = False

    def copied(node: Any, level: int) -> Any:
        """`node`, standing at `level`, its containers down to `MAX_VALUE_DEPTH` copied and
        those under them replaced by their JSON text (`json_text`)."""
        nonlocal cut, repeats
        if not isinstance(node, (dict, list, tuple)):
            return node
        if level > MAX_VALUE_DEPTH:
            cut = True
            if id(node) not in texts:
                texts[id(node)] = json_text(node)
            return texts[id(node)]
        if id(node) in copied_once:
            repeats += 1
        if id(node) in enclosing or repeats > _REPEATS_BUDGET:
            cut = True
            return _UNWRITABLE
        enclosing.add(id(node))
        copied_once.add(id(node))
        if isinstance(node, dict):
            copy: Any = {key: copied(item, level + 1) for key, item in node.items()}
        else:
            copy = [copied(item, level + 1) for item in node]
        enclosing.discard(id(node))
        return copy

    copy = copied(value, 1)
    return copy if cut else value


_REPEATS_BUDGET = 100_000
_UNWRITABLE = "[NOT RECORDED: writing it raised RecursionError]"


def _clip(node: Any, level: int) -> bool:
    """`clip_depth` of `node`, standing at `level`."""
    if isinstance(node, dict):
        keys: Any = list(node)
    elif isinstance(node, list):
        keys = range(len(node))
    else:
        return False
    clipped = False
    for key in keys:
        item = node[key]
        if not isinstance(item, (dict, list, tuple)):
            continue
        if level == MAX_VALUE_DEPTH:
            node[key] = json_text(item)
            clipped = True
        elif _clip(item, level + 1):
            clipped = True
    return clipped


def json_text(node: Any) -> str:
    """`node`'s JSON text, or a stand-in where the encoder cannot write it (nested too deep
    for its recursion limit, holding itself, holding what is no JSON)."""
    try:
        return _encode(node).decode()
    except RecursionError:
        return _UNWRITABLE
    except (TypeError, ValueError) as error:
        return f"[NOT RECORDED: writing it raised {type(error).__name__}]"


def _depth(node: Any) -> int:
    deepest, stack = 0, [(node, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def _reject_repeated(node: Any, path: str) -> None:
    if isinstance(node, _Repeated):
        raise DecodeError(f"duplicate field `{node.repeated}` - at `{path}`")


def _check_generic(node: Any, path: str) -> None:
    if isinstance(node, dict):
        _reject_repeated(node, path)
        for key, value in node.items():
            if key not in _FREE_FORM:
                _check_generic(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_generic(value, f"{path}[{index}]")


Kept = Callable[[str, dict[str, Any]], Mapping[str, Any]]
"""A record's items as decoding keeps them, given its kind (an event's type, "", "LoopRecord",
"Session") and its object: None in place of what decoding drops, as phi-core ignores it (a
key of phi-session's own holding a value of another type, an item of its list of events
that is no event), which the checks then leave alone."""


def kept_whole(kind: str, node: dict[str, Any]) -> Mapping[str, Any]:
    """The `Kept` of a record decoding drops nothing of."""
    return node


def check_event(node: Any, kept: Kept, path: str = "$") -> None:
    """Reject repeated keys in the record objects of an event (agent messages may repeat)."""
    if not isinstance(node, dict):
        return
    _reject_repeated(node, path)
    kind = node.get("type")
    if not isinstance(kind, str):  # not an event at all, and the typed decode names the error
        kind = ""
    messages = _AGENT_MESSAGE_KEYS.get(kind, _NO_KEYS)
    for key, value in kept(kind, node).items():
        if key in _FREE_FORM or key in messages:
            continue
        _check_generic(value, f"{path}.{key}")


def check_loop(node: Any, kept: Kept, path: str = "$") -> None:
    if not isinstance(node, dict):
        return
    _reject_repeated(node, path)
    for key, value in kept("LoopRecord", node).items():
        where = f"{path}.{key}"
        if key in ("messages", "metadata"):
            continue
        if key == "turns" and isinstance(value, list):
            for index, turn in enumerate(value):
                _check_fields(turn, f"{where}[{index}]", ("input_messages", "output_message", "tool_results"))
        elif key == "events" and isinstance(value, list):
            for index, item in enumerate(value):
                item_path = f"{where}[{index}]"
                if isinstance(item, dict):
                    _reject_repeated(item, item_path)
                    check_event(item.get("event"), kept, f"{item_path}.event")
        elif key == "compaction_block" and isinstance(value, dict):
            _reject_repeated(value, where)
            for part, section in value.items():
                _check_fields(section, f"{where}.{part}", ("messages",))
        else:
            _check_generic(value, where)


def _check_fields(node: Any, path: str, skipped: tuple[str, ...]) -> None:
    if isinstance(node, dict):
        _reject_repeated(node, path)
        for key, value in node.items():
            if key not in skipped:
                _check_generic(value, f"{path}.{key}")
    else:
        _check_generic(node, path)


def check_session(node: Any, kept: Kept, path: str = "$") -> None:
    if not isinstance(node, dict):
        return
    _reject_repeated(node, path)
    for key, value in kept("Session", node).items():
        if key == "loops" and isinstance(value, list):
            for index, record in enumerate(value):
                check_loop(record, kept, f"{path}.loops[{index}]")
        else:
            _check_generic(value, f"{path}.{key}")
