"""The built-in secret scrubber: `Redactor`, a processor (`phi_session.processors`).

API-key and bearer-token patterns and named fields (``api_key``, ``authorization``,
``password``, ``token``, ``secret``...; camelCase and kebab-case names read as
snake_case) are replaced by ``"[REDACTED]"``. By default it covers config snapshots,
loop metadata, tool arguments (in ``ToolExecutionStart`` and in the tool calls of
every message; a JSON-string argument, or JSON written into a string value, is parsed
and its fields checked, and JSON that does not parse has its quoted fields checked;
``[name, value]`` pairs in a list, as headers are often given, are fields too) and error
texts (a failed tool's result included); ``redact_text=True`` extends it to message
text and tags, tool results, streaming deltas and progress text, a request's system
prompt and tool definitions (their parameters by pattern only: a schema names fields),
and prune and revert texts. Values of other types in them
(dataclasses, msgspec Structs, sets) are scanned as the JSON they are written as, and
a mapping's keys as well as its values.

Streamed text and thinking (with ``redact_text``) are redacted across deltas, as token
streams split keys: a `Tracer` has the redactor hold back the end of a reply's stream
where a secret may start (`Redactor.open_stream`), and passes it on, redacted, at the
front of a later delta or before the reply's ``MessageEnd``; the deltas stay in order
and make up the recorded message's text. The limit: a secret, or what decides it, longer
than `_STREAM_HOLD` characters without white space (or, for the user's patterns, than
that from its start) may pass in the deltas; the message is scanned whole and redacted.
Tool-call argument deltas, and deltas given to the redactor without `open_stream`, are
scanned piece by piece: a secret split across two of them is caught in the message only.
"""

from __future__ import annotations

import importlib
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable
from functools import partial
from itertools import compress, repeat, takewhile
from operator import is_
from typing import Any, TypeVar

import msgspec
from msgspec.structs import replace

from ._checks import check_each, check_instance, check_type
from ._strict import MAX_VALUE_DEPTH
from .codec import json_form, json_size
from .errors import InvalidArgument, PhiSessionError
from .events import (
    AgentEnd,
    AgentEvent,
    AgentStart,
    InputRejected,
    LoopConfigSnapshot,
    MessageEnd,
    MessageStart,
    MessageUpdate,
    ProgressMessage,
    PrunApplied,
    RevertApplied,
    StreamDelta,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    TurnRequest,
    map_messages,
    message_mappers,
)
from .messages import (
    AssistantMessage,
    Content,
    ExtensionMessage,
    NodeTag,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolDefinition,
    ToolResult,
    ToolResultMessage,
    UserMessage,
    extension_message,
    message_role,
    text_size,
)

__all__ = ["DEFAULT_SECRET_FIELDS", "DEFAULT_SECRET_PATTERNS", "REDACTED", "Redactor"]

REDACTED = "[REDACTED]"

_ASSIGNED_KEYS = (
    "api_key",
    "apikey",
    "key",
    "token",
    "access_token",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "sig",
    "signature",
)

DEFAULT_SECRET_PATTERNS: tuple[str, ...] = (
    r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}",  # OpenAI / Anthropic keys
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"\bAIza[0-9A-Za-z_\-]{35}",  # Google API keys
    r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWTs
    # Authorization: Bearer <token> (spelled Bearer, bearer or BEARER). Look-behinds are
    # tried at every position of a scanned text: a one-character one first rejects most.
    r"(?<= )(?:(?<=Bearer )|(?<=bearer )|(?<=BEARER ))[A-Za-z0-9\-._~+/]{8,}=*",
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)",  # user:password@ in URLs
    # key=<secret>, as in URL query strings and logs (one fixed-width look-behind per name).
    # Guarded by the "=" and then by the names' last letters, so that text dense in "="
    # (``a=b&c=d``, base64 padding) does not try every name at every "=".
    "(?<==)(?i:(?<=["
    + "".join(sorted({key[-1] for key in _ASSIGNED_KEYS}))
    + "]=)(?:"
    + "|".join(f"(?<=\\b{key}=)" for key in _ASSIGNED_KEYS)
    + r"))[^&#\s\"',;]+",
)
"""Regular expressions whose matches are secrets (only the secret part is replaced)."""


_PATTERN_TYPES = (str, re.Pattern)

# A quoted field name and the string value after it, to its closing quote or the end of
# the text (JSON cut short): `Redactor.redact_json_string`'s reading of text that does
# not parse. A name is short and unescaped: a scan started inside a string (a streamed
# piece, JSON escaped in JSON) gives up at once, at the next backslash.
_QUOTED_FIELD = re.compile(r'"([^"\\\n]{1,128})"\s*:\s*"((?:[^"\\]|\\.)*)')


def _alternation(patterns: Iterable[str | re.Pattern[str]]) -> re.Pattern[str]:
    # One alternation: a single scan per string.
    return re.compile("|".join(f"(?:{p.pattern if isinstance(p, re.Pattern) else p})" for p in patterns))


def _custom_alternations(patterns: list[str | re.Pattern[str]]) -> tuple[re.Pattern[str], ...]:
    """A user's patterns as `_alternation`s, run one after another; `InvalidArgument` naming
    one that does not compile or that backtracks catastrophically (`_backtracks`).

    A pattern with groups starts a new alternation: in one, groups are numbered across its
    patterns, and a backreference (``\\1``) in a later one would name an earlier one's group.
    A compiled pattern with flags (``re.IGNORECASE``, or ``(?i)`` in its text) runs alone,
    as compiled: joined with others, it would lose them.
    """
    runs: list[list[str | re.Pattern[str]] | re.Pattern[str]] = []
    for pattern in patterns:
        try:
            compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except re.error as error:
            raise InvalidArgument(f"secret pattern {pattern!r} does not compile: {error}") from None
        if _backtracks(compiled):
            raise InvalidArgument(
                f"secret pattern {pattern!r} repeats a repeat (as (a+)+ does): text nearly matching it"
                " would take exponential time to scan, holding up the agent; repeat something"
                " it must match between the runs, or use an atomic group (?>...) or a possessive"
                " repeat (a++) on Python 3.11+"
            )
        if isinstance(pattern, re.Pattern) and pattern.flags & ~re.UNICODE:
            runs.append(compiled)
            continue
        groups = compiled.groups
        last = runs[-1] if runs else None
        if groups or not isinstance(last, list):
            runs.append([pattern])
        else:
            last.append(pattern)
    try:
        return tuple(run if isinstance(run, re.Pattern) else _alternation(run) for run in runs)
    except re.error as error:  # each compiles alone: a global flag (``(?i)``) not at the start
        raise InvalidArgument(f"the secret patterns do not compile together: {error}") from None


def _sharing_word_start(patterns: tuple[str, ...]) -> list[str]:
    """`patterns` with its leading run of word-start (``\\b``) patterns, none of which has
    a top-level ``|``, as one: the regex engine tries each branch at every position of a
    text, and one boundary test there instead of one per pattern scans text that holds
    an anchor (a file's code written by a tool, base64 data) several times faster."""
    run = list(takewhile(lambda pattern: pattern.startswith(r"\b"), patterns))
    shared = r"\b(?:" + "|".join(f"(?:{pattern[2:]})" for pattern in run) + ")"
    return [shared, *patterns[len(run) :]] if run else list(patterns)


_DEFAULT_PATTERN = _alternation(_sharing_word_start(DEFAULT_SECRET_PATTERNS))
# A literal every match of a default pattern contains ("=" and "://" for the URL ones),
# at most a few characters before the match starts; the first ones only at a word start.
_WORD_ANCHORS = (
    "sk-",
    "AKIA",
    "ASIA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xox",
    "AIza",
    "eyJ",
)
_ANCHORS = (*_WORD_ANCHORS, "Bearer ", "bearer ", "BEARER ", "://", "=")
_anchor_search = re.compile("|".join(map(re.escape, _ANCHORS))).search


def _heads(anchors: Iterable[str]) -> str:
    # The starts of `anchors` (their proper prefixes), the longest first.
    heads = {re.escape(anchor[:n]) for anchor in anchors for n in range(1, len(anchor))}
    return "|".join(sorted(heads, key=len, reverse=True))


# The start of an anchor at the end of a text: a streamed piece that the next one may
# complete into an anchor (the leftmost such start is wanted: the longest).
_ANCHOR_HEAD = rf"(?:\b(?:{_heads(_WORD_ANCHORS)})|{_heads(_ANCHORS[len(_WORD_ANCHORS) :])})\Z"
_anchor_head_search = re.compile(_ANCHOR_HEAD).search
# An anchor, or else (group 1) the start of one at the end: a streamed piece's one search.
_candidate_search = re.compile("|".join(map(re.escape, _ANCHORS)) + f"|({_ANCHOR_HEAD})").search
_LONGEST_ANCHOR = max(map(len, _ANCHORS))
# What of a stream's text passed on its next piece's look-behinds may read: the longest
# look-behind of a default pattern (``\bclient_secret=``, the ``\b`` reading one more).
_DEFAULT_LOOKBEHIND = max(map(len, _ASSIGNED_KEYS)) + 2
_space_search = re.compile(r"\s").search
# What may be a JSON object or array written into a string (`Redactor.redact_json_string`).
_json_head = re.compile(r"\s*[{\[]").match


def _clean_text(text: str) -> bool:
    """Whether the anchored defaults alone find nothing in `text`: no anchor, and no JSON
    in it, whose fields are checked by name."""
    return _anchor_search(text) is None and "{" not in text and "[" not in text


_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode
_FIELD_CACHE_LIMIT = 4096
_MEMO_LIMIT = 1024  # per redactor: the distinct contents of a long conversation's history
_HISTORY_LIMIT = 64  # per redactor: the conversations in flight (each holds its last history)
# What the remembered contents, and the remembered histories, may hold (their text and
# tool arguments, and the arguments' copies), per redactor: they outlive their sessions,
# and must not keep megabytes of drained conversations alive.
_MEMO_BYTES = 8 * 1024 * 1024
_HISTORY_BYTES = 8 * 1024 * 1024
_MEMO_VALUE_BYTES = 1024 * 1024  # a larger content is scanned again each time it comes
# Streamed text (`Redactor.open_stream`): the longest a secret is taken to be (what is
# held back behind the start of one; with the user's patterns, also what is kept of the
# text passed on, for the look-behinds of the next piece), the most held back at once (a
# match still growing past it is passed on, redacted as far as it goes), and the streams
# open at once per redactor.
_STREAM_HOLD = 256
_STREAM_HOLD_LIMIT = 4096
_STREAM_LIMIT = 1024
_STREAM_KINDS = {"Text": 1, "Thinking": 2}  # where a stream's state is in its entry
_NO_STREAM = ("", "")  # a kind not streamed yet: (what was passed on of it, what is held)
# One conversation in flight past `_HISTORY_BYTES` is remembered beside them, up to this
# (what it holds besides the messages the agent holds anyway: the arguments' copies).
_LARGE_HISTORY_BYTES = 256 * 1024 * 1024

DEFAULT_SECRET_FIELDS: frozenset[str] = frozenset(
    {
        "api_key",
        "apikey",
        "x_api_key",
        "authorization",
        "proxy_authorization",
        "password",
        "passwd",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth_token",
        "secret",
        "client_secret",
        "secret_key",
        "private_key",
        "secret_access_key",  # AWS's own JSON spelling: SecretAccessKey
        "aws_secret_access_key",
        "cookie",
        "set_cookie",
    }
)
"""Field names (compared case-insensitively, ``-`` read as ``_``) whose values are secrets."""

_SECRET_SUFFIXES = ("_token", "_secret", "_password", "_api_key", "_apikey")


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _normalize_field(name: str) -> str:
    # camelCase and kebab-case read as snake_case: ``accessToken`` and ``access-token``
    # are ``access_token`` (an all-caps name like ``X-API-KEY`` has no camel boundary).
    return _CAMEL_BOUNDARY.sub("_", name).lower().replace("-", "_")


_OneMessage = TypeVar("_OneMessage", MessageStart, MessageEnd)

# The pattern parser of the `re` module (its place changed in Python 3.11).
_sre_parse: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")


def _match_width(pattern: re.Pattern[str]) -> int:
    """The most characters a match of `pattern` spans, at most `_STREAM_HOLD` (the most
    when it cannot be told)."""
    try:
        return min(_STREAM_HOLD, int(_sre_parse.parse(pattern.pattern, pattern.flags).getwidth()[1]))
    except Exception:  # the parser is not a public interface
        return _STREAM_HOLD


def _backtracks(pattern: re.Pattern[str]) -> bool:
    """Whether `pattern` repeats (more than once) what may itself be a repeat alone
    (``(a+)+``, ``(\\w+\\s*)*``, ``(x|y+)+``, ``(a+){1,100}``, ``(a{1,30})+``): a string
    nearly matching it takes time exponential in its length, or polynomial with the outer
    bound as its power (``(a+){1,2}$`` on 3000 a's and a '!': 78 s), in C, holding the GIL
    (``re`` has no timeout). False when its parsed form cannot be read (the parser is not
    a public interface)."""
    try:
        parsed = _sre_parse.parse(pattern.pattern, pattern.flags)
        return _nests_a_repeat(parsed.state, parsed)
    except Exception:
        return False


def _nests_a_repeat(state: Any, items: Any) -> bool:
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            if av[1] > 1 and _repeats_alone(state, av[2]):
                return True
            subs = [av[2]]
        elif name == "POSSESSIVE_REPEAT":  # never backtracked into: only what it holds
            subs = [av[2]]
        elif name in ("SUBPATTERN", "ASSERT", "ASSERT_NOT"):
            subs = [av[-1]]
        elif name == "BRANCH":
            subs = av[1]
        elif name == "ATOMIC_GROUP":
            subs = [av]
        elif name == "GROUPREF_EXISTS":
            subs = [sub for sub in av[1:] if sub is not None]
        else:
            continue
        if any(_nests_a_repeat(state, sub) for sub in subs):
            return True
    return False


def _repeats_alone(state: Any, items: Any) -> bool:
    """Whether `items` may match as one repeat of a varying count alone, all else matching
    empty (then a repeat of it splits a run of text in many ways). A fixed count (``{4}``)
    matches one way only: such a repeat counts only as what it repeats does."""
    items = list(items)
    for at, (op, av) in enumerate(items):
        if _sre_parse.SubPattern(state, items[:at] + items[at + 1 :]).getwidth()[0]:
            continue  # something else must match too, between two of its runs
        name = str(op)
        if (
            (name in ("MAX_REPEAT", "MIN_REPEAT") and (av[1] > max(av[0], 1) or _repeats_alone(state, av[2])))
            or (name == "SUBPATTERN" and _repeats_alone(state, av[-1]))
            or (name == "BRANCH" and any(_repeats_alone(state, branch) for branch in av[1]))
        ):
            return True
    return False


_MISSING: Any = object()  # a memo miss (a remembered result is never this object)
# Tool-call arguments of these types cannot change after a scan (None: not a tool call).
_UNCHANGEABLE = frozenset({type(None), str, int, float, bool})
_JSON_SCALARS = frozenset({type(None), int, float, bool})
_STRINGS = frozenset({str})
_is_str = str.__instancecheck__
# A remembered history: (messages, redacted, live arguments, their copy, size); see `_history`.
_HistoryEntry = tuple[tuple[Any, ...], tuple[Any, ...], list[Any], Any, int]
# A container's scan (`Redactor._walk`): yields the values nested in it, is sent them
# redacted, returns the container redacted.
_Scan = Generator[Any, Any, Any]


def _live_arguments(content: tuple[Content, ...]) -> list[Any]:
    """Each block's tool-call arguments (None for other blocks), found in C: as a list, so
    that it compares equal to its JSON copy while what could still change in it (dicts,
    lists) has not."""
    return list(map(getattr, content, repeat("arguments"), repeat(None)))


def _json_copy(value: Any, room: int) -> tuple[Any, int] | None:
    """A copy of a JSON value's dicts and lists that compares equal to it while it is
    unchanged, and about what its JSON weighs; None when that is over `room` bytes, or
    when the value holds anything but JSON's own types (which could change unseen, or
    never compare equal) or is nested deeper than phi-core reads (a comparison that deep
    could exceed the recursion limit; a cycle never ends).

    Its strings and numbers, which cannot change, are the value's own: comparing the two
    is a pointer test per leaf, not a reading of every text (a long conversation's
    arguments are compared on every request).
    """
    if type(value) is not list:  # the callers' case: a list of blocks' arguments
        return None
    size = 2
    copy: list[Any] = []
    stack: list[tuple[Any, Any, int]] = [(value, copy, 1)]
    while stack:
        source, target, depth = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            return None
        is_dict = type(source) is dict
        for key, item in source.items() if is_dict else enumerate(source):
            tp = type(item)
            if tp is str:
                new: Any = item
                size += len(item) + 3
            elif tp in _JSON_SCALARS:
                new = item
                size += 8
            elif tp is dict:
                new = {}
                stack.append((item, new, depth + 1))
                size += 2
            elif tp is list:
                new = []
                stack.append((item, new, depth + 1))
                size += 2
            else:
                return None
            if is_dict:
                if type(key) is not str:
                    return None
                size += len(key) + 3
                target[key] = new
            else:
                target.append(new)
        if size > room:
            return None
    return copy, size


def _content_size(content: tuple[Content, ...], arguments: list[Any]) -> int:
    """What `content` holds besides the tool arguments that could change: its text, and
    arguments given as a JSON string."""
    return sum(map(text_size, content)) + sum(len(a) for a in arguments if type(a) is str)


# What `json_size` raises: not JSON, or nested deeper than the codec goes from here.
_NOT_COPIED = (TypeError, ValueError, RecursionError, msgspec.EncodeError)


def _renamed(value: dict[Any, Any], renamed: dict[str, str]) -> dict[Any, Any]:
    """`value` with the keys in `renamed` renamed, in place: two keys redacted alike (two
    API keys as the keys of a usage table) are numbered (``[REDACTED]#2``), so that
    neither value is lost."""
    taken = {key for key in value if key not in renamed}
    result = {}
    for key, item in value.items():
        new_key = renamed.get(key)
        if new_key is None:
            result[key] = item
            continue
        unique, number = new_key, 1
        while unique in taken:
            number += 1
            unique = f"{new_key}#{number}"
        taken.add(unique)
        result[unique] = item
    return result


class Redactor:
    """The built-in secret scrubber: a processor (see the module docs for what it covers).

    `extra_patterns` and `extra_fields` add to the defaults; `patterns` and `fields`
    replace them (`InvalidArgument` for a pattern that repeats a repeat, ``(a+)+``:
    it may backtrack catastrophically, and ``re`` has no timeout). A field match
    replaces the whole value; a pattern match replaces only the secret
    (``Bearer [REDACTED]``). Streaming deltas (tool-call arguments, read
    as JSON or a piece of it; text and thinking with `redact_text`) are scanned piece by
    piece, so a secret split across two deltas is not caught there (it is in the final
    message), except the text and thinking of a stream opened with `open_stream` (as a
    `Tracer` does), whose end is held back where a secret may start. Thread-safe.
    """

    def __init__(
        self,
        *,
        patterns: Iterable[str | re.Pattern[str]] = DEFAULT_SECRET_PATTERNS,
        fields: Iterable[str] = DEFAULT_SECRET_FIELDS,
        extra_patterns: Iterable[str | re.Pattern[str]] = (),
        extra_fields: Iterable[str] = (),
        replacement: str = REDACTED,
        redact_text: bool = False,
    ) -> None:
        # Checked here: a pattern or field of another type (a lone string, iterated as its
        # letters) would leave the secrets it was meant to catch in place.
        extra = check_each("extra_patterns", extra_patterns, _PATTERN_TYPES, "str or re.Pattern")
        if patterns is DEFAULT_SECRET_PATTERNS:
            self._default: re.Pattern[str] | None = _DEFAULT_PATTERN
            custom = list(extra)
        else:
            self._default = None
            custom = [*check_each("patterns", patterns, _PATTERN_TYPES, "str or re.Pattern"), *extra]
        fields = check_each("fields", fields, str, "str")
        extra_fields = check_each("extra_fields", extra_fields, str, "str")
        check_type("replacement", replacement, str)
        check_instance("redact_text", redact_text, bool, "bool")
        self._custom = _custom_alternations(custom)
        # Only the anchored defaults apply: a plain string without an anchor is clean.
        self._anchored_only = not self._custom and self._default is not None
        self._fields = frozenset(_normalize_field(f) for f in (*fields, *extra_fields))
        self.replacement = replacement
        self.redact_text = redact_text
        self._field_verdicts: dict[str, bool] = {}
        # The names `_field_verdicts` holds False for and without an anchor (no secret in
        # them either), where the anchored defaults alone apply (`_known_clean`'s
        # shortcut; it stays empty otherwise).
        self._clean_fields: set[str] = set()
        # id -> (value, result, live, witness, size); ordered to drop the oldest in O(1) (a
        # plain dict's first entry is found past every entry deleted before it)
        self._memo: OrderedDict[int, tuple[Any, Any, Any, Any, int]] = OrderedDict()
        self._memo_bytes = 0  # the sizes of `_memo`'s entries (`_MEMO_BYTES`)
        self._memo_lock = threading.Lock()
        # id(first message) -> (history, result, live, witness, size): see `_history`.
        self._histories: OrderedDict[int, _HistoryEntry] = OrderedDict()
        self._history_bytes = 0
        # (id(first message), entry, `_history_stores` then): the one history over
        # `_HISTORY_BYTES` (see `_history`), and the count of histories remembered.
        self._large_history: tuple[int, _HistoryEntry, int] | None = None
        self._history_stores = 0
        # id(placeholder) -> [placeholder, text state, thinking state]: see `open_stream`.
        self._streams: dict[int, list[Any]] = {}
        self._passes = ((self._default,) if self._default is not None else ()) + self._custom
        # What must be held back of a stream for the user's patterns (the default ones
        # are found by their anchors): a match that starts before it is whole, and the
        # character after it seen (``\b``).
        self._stream_width = max((_match_width(p) + 1 for p in self._custom), default=0)
        # What is kept of the text passed on, for the look-behinds of the next piece.
        self._stream_context = _STREAM_HOLD if self._custom else _DEFAULT_LOOKBEHIND
        # Per event type, what to scan; events of other types pass untouched, at the
        # cost of one dict lookup. Messages are wherever `MESSAGE_FIELDS` says.
        self._handlers: dict[type, Callable[[Any], AgentEvent]] = {
            tp: partial(mapper, fn=self._message) for tp, mapper in message_mappers().items()
        }
        self._handlers[TurnRequest] = partial(
            message_mappers()[TurnRequest], fn=self._message, many=self._history
        )
        self._handlers.update(
            {
                MessageStart: self._one_message,  # a message's every event: no mapper in between
                MessageEnd: self._one_message,
                AgentStart: self._agent_start,
                AgentEnd: self._agent_end,
                MessageUpdate: self._update,
                ToolExecutionStart: self._tool_start,
                InputRejected: self._input_rejected,
                ToolExecutionEnd: self._tool_end,
            }
        )
        if redact_text:
            # Text outside messages, as `processors.withhold` takes it for content.
            self._request_messages = self._handlers[TurnRequest]
            self._handlers.update(
                {
                    TurnRequest: self._turn_request,
                    ToolExecutionUpdate: self._tool_update,
                    ProgressMessage: self._progress,
                    PrunApplied: self._prun,
                    RevertApplied: self._revert,
                }
            )

    def __repr__(self) -> str:
        return f"Redactor(redact_text={self.redact_text})"

    # -- values -------------------------------------------------------------------------

    def is_secret_field(self, name: str) -> bool:
        """Whether a field of this name holds a secret (``X-Api-Key`` reads as ``x_api_key``)."""
        verdict = self._field_verdicts.get(name)
        if verdict is None:
            key = _normalize_field(name)
            verdict = key in self._fields or key.endswith(_SECRET_SUFFIXES)
            if len(self._field_verdicts) < _FIELD_CACHE_LIMIT:  # field names repeat; bound the cache
                self._field_verdicts[name] = verdict
                if not verdict and self._anchored_only and _anchor_search(name) is None:
                    self._clean_fields.add(name)
        return verdict

    def redact_string(self, text: str) -> str:
        """`text` with every pattern match replaced (the same object when nothing matched)."""
        default = self._default
        # The default patterns are only run on text holding one of their literal
        # anchors: most text has none, and the anchor scan is many times cheaper.
        if default is not None and _anchor_search(text) is not None:
            redacted, count = default.subn(self._template(), text)
            if count:
                text = redacted
        for custom in self._custom:
            redacted, count = custom.subn(self._template(), text)
            if count:
                text = redacted
        return text

    def _template(self) -> str:
        # `replacement` as a `re.sub` template of itself: its backslashes are no escapes
        # (``\g<0>`` would put the secret back, ``\d`` raise on every event).
        return self.replacement.replace("\\", "\\\\")

    def redact_value(self, value: Any) -> Any:
        """A JSON-like value with secret fields and secret patterns replaced (a value of
        another type, as the JSON it is written as: `_scan_object`), however deeply nested.

        Returns the very same object when nothing needed redacting, so clean
        values cost no allocation.
        """
        tp = type(value)
        if tp is str:
            return self._redact_str(value)
        if tp is dict:
            return self._redact_dict(value)
        if tp in _UNCHANGEABLE:
            return value
        return self._walk(value, self._scan(value))

    def _redact_str(self, text: str) -> str:
        # A string value in a value: JSON written into it (a request body) is read as JSON.
        return self.redact_json_string(text) if _json_head(text) else self.redact_string(text)

    def _is_secret_pair(self, item: list[Any] | tuple[Any, ...]) -> bool:
        return len(item) == 2 and _is_str(item[0]) and _is_str(item[1]) and self.is_secret_field(item[0])

    def _redact_patterns(self, value: Any) -> Any:
        """`value` with its pattern matches replaced, its field names not read as secret
        fields: a tool's parameters (a JSON schema names the fields it describes)."""
        tp = type(value)
        if tp is str:
            return self.redact_string(value)
        if tp in _UNCHANGEABLE:
            return value
        return self._walk(value, self._scan(value, names=False), names=False)

    def _walk(self, value: Any, scan: _Scan, names: bool = True) -> Any:
        """What `scan` (of `value`) returns, driven without recursion, so that arguments
        nested deeper than the interpreter's recursion limit are scanned and kept too:
        each open container is a generator that yields the containers nested in it and
        is sent them redacted (`names`: secret field names are read as such). A container
        nested in itself raises `PhiSessionError`: a cyclic value would be walked
        forever (the chain withholds the event instead)."""
        open_scans: list[_Scan] = []  # the containers around the one scanned, outermost first
        open_ids = [id(value)]  # the ids of those containers and of the one scanned
        on_path = {id(value)}
        sent: Any = None
        while True:
            try:
                nested = scan.send(sent)
            except StopIteration as finished:
                on_path.discard(open_ids.pop())
                if not open_scans:
                    return finished.value
                scan, sent = open_scans.pop(), finished.value
                continue
            tp = type(nested)
            if tp is dict:
                if self._known_clean(nested):
                    sent = nested
                    continue
            elif tp is str:  # what `_scan_object` writes may be a plain value
                sent = self.redact_string(nested)
                continue
            elif tp in _UNCHANGEABLE:
                sent = nested
                continue
            key = id(nested)
            if key in on_path:
                raise PhiSessionError(f"a {type(nested).__name__} nested in itself cannot be redacted")
            open_scans.append(scan)
            open_ids.append(key)
            on_path.add(key)
            scan = self._scan_dict(nested, names) if tp is dict else self._scan(nested, names)
            sent = None

    def _scan(self, value: Any, names: bool = True) -> _Scan:
        if isinstance(value, dict):
            return self._scan_dict(value, names)
        if isinstance(value, (list, tuple)):
            return self._scan_items(value, names)
        return self._scan_object(value)

    def _scan_items(self, value: list[Any] | tuple[Any, ...], names: bool = True) -> _Scan:
        items = []
        for item in value:
            tp = type(item)  # plain values inline: a yield costs more than their scan
            if tp is str:
                items.append(self._redact_str(item) if names else self.redact_string(item))
            elif tp in _UNCHANGEABLE:
                items.append(item)
            elif names and (tp is list or tp is tuple) and self._is_secret_pair(item):
                # A (name, value) pair in a list of them, as headers are often given.
                items.append(tp((item[0], self.replacement)))
            else:
                items.append((yield item))
        if any(new is not old for new, old in zip(items, value, strict=True)):
            return items if isinstance(value, list) else tuple(items)
        return value

    def _scan_object(self, value: Any) -> _Scan:
        """A value of any other type (a dataclass, a msgspec Struct, a set, a str subclass...)
        scanned as the JSON it is written as; that JSON value, redacted, replaces it only
        when something in it was a secret. `PhiSessionError` for a value it cannot read:
        unscanned, it must not be passed on (the chain withholds the event)."""
        if isinstance(value, str):
            return self.redact_string(value)
        try:
            written = msgspec.to_builtins(value, enc_hook=json_form)
        except Exception:
            # What the encoders write but `to_builtins` refuses (a `msgspec.Raw`, verbatim
            # JSON, anywhere in it) is read back from that JSON.
            try:
                written = _json_decode(_json_encode(value, enc_hook=json_form))
            except Exception:
                raise PhiSessionError(f"a {type(value).__name__} cannot be read to be redacted") from None
        redacted = yield written
        return value if redacted is written else redacted

    def _known_clean(self, value: dict[Any, Any]) -> bool:
        # The usual tool arguments: known clean field names (none is known unless the
        # anchored defaults alone apply) with string values, and maybe numbers, booleans
        # or None (`_scan_dict` passes those by), cleared in C, without a walk, when no
        # string holds an anchor (an anchor has no newline: none spans two values).
        if not self._clean_fields.issuperset(value):
            return False
        values = value.values()
        kinds = set(map(type, values))
        if kinds <= _STRINGS:
            return _clean_text("\n".join(values))
        if kinds <= _UNCHANGEABLE:  # exact types: these strings are the values of type str
            return _clean_text("\n".join(filter(_is_str, values)))
        return False

    def _redact_dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        return value if self._known_clean(value) else self._walk(value, self._scan_dict(value))

    def _scan_dict(self, value: dict[Any, Any], names: bool = True) -> _Scan:
        changed: dict[Any, Any] | None = None
        renamed: dict[str, str] | None = None  # keys holding a secret (used as an id, a map key)
        verdicts = self._field_verdicts
        clean = self._clean_fields
        # Plain strings are checked inline (no call) when only the anchored defaults apply:
        # tool arguments are mostly short clean strings.
        quick = self._anchored_only
        for key, item in value.items():
            if key not in clean and isinstance(key, str):
                new_key = self.redact_string(key)
                if new_key is not key:
                    if renamed is None:
                        renamed = {}
                    renamed[key] = new_key
            if item is None:
                continue
            secret = verdicts.get(key) if names else False
            if secret is None:
                secret = isinstance(key, str) and self.is_secret_field(key)
            tp = type(item)
            if secret:
                new: Any = self.replacement
            elif tp is str:
                if quick and _anchor_search(item) is None and not _json_head(item):
                    continue
                new = self._redact_str(item) if names else self.redact_string(item)
            elif tp in _UNCHANGEABLE:
                continue
            else:
                new = yield item
            if new is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        if renamed is not None:
            return _renamed(changed or value, renamed)
        return value if changed is None else changed

    # -- messages -----------------------------------------------------------------------

    def redact_json_string(self, text: str) -> str:
        """`text` redacted; a JSON object or array is redacted as its parsed value.

        Tool arguments often arrive as a JSON string (``'{"password": "x"}'``): its
        secret *fields* are only visible once parsed. A changed value is re-encoded
        compactly. Anything else (JSON cut short or malformed, a streamed piece of it)
        gets `redact_string`, and the string values of the secret fields quoted in it
        (``"password": "x``) are replaced too.
        """
        if _json_head(text):
            try:
                parsed = _json_decode(text)
            except (msgspec.DecodeError, RecursionError):  # nested deeper than msgspec reads: as text
                pass
            else:
                redacted = self.redact_value(parsed)
                return text if redacted is parsed else _json_encode(redacted).decode()
        text = self.redact_string(text)
        if '"' not in text:
            return text
        redacted = _QUOTED_FIELD.sub(self._quoted_field, text)
        return text if redacted == text else redacted

    def _quoted_field(self, match: re.Match[str]) -> str:
        # The value of a secret field, up to its closing quote or the end of the text.
        if not self.is_secret_field(match[1]):
            return match[0]
        return match[0][: match.start(2) - match.start()] + _json_encode(self.replacement).decode()[1:-1]

    def _recall(self, value: Any) -> Any:
        """What was returned for `value` when it was last scanned, or `_MISSING`.

        Entries hold the object itself, so its id cannot be reused while remembered,
        and the entry holds only while what could still change inside it (``live``:
        a content's mutable tool arguments) equals the copy taken before that scan
        (``witness``). Lock-free: a hit holds its object, so the identity check is reliable.
        """
        hit = self._memo.get(id(value))
        if hit is not None and hit[0] is value and hit[2] == hit[3]:
            return hit[1]
        return _MISSING

    def _remember(self, value: Any, result: Any, size: int, live: Any = None, witness: Any = None) -> None:
        """Remember `result` for `value`, which holds `size` bytes (with `live` and `witness`)."""
        if size > _MEMO_VALUE_BYTES:
            return
        with self._memo_lock:
            memo = self._memo
            while memo and (len(memo) >= _MEMO_LIMIT or self._memo_bytes + size > _MEMO_BYTES):
                self._memo_bytes -= memo.popitem(last=False)[1][4]  # the oldest entry
            old = memo.pop(id(value), None)  # scanned by two threads at once
            if old is not None:
                self._memo_bytes -= old[4]
            memo[id(value)] = (value, result, live, witness, size)
            self._memo_bytes += size

    def _snapshot_once(self, snapshot: LoopConfigSnapshot) -> LoopConfigSnapshot:
        # Every loop of an agent announces the same snapshot object: scanned once.
        result = self._recall(snapshot)
        if result is _MISSING:
            result = self._snapshot(snapshot)
            self._remember(snapshot, result, 0)  # a few names
        return result  # type: ignore[no-any-return]

    def _arguments(self, arguments: Any) -> Any:
        # A dict or list is not remembered here: it is the agent's own object, seen once
        # (``ToolExecutionStart``), and may still change; a message's are remembered
        # with their content (`_content`). A JSON string is immutable: scanned once.
        tp = type(arguments)
        if tp is dict:  # as `redact_value` would, one call less
            return self._redact_dict(arguments)
        if tp is str:
            result = self._recall(arguments)
            if result is _MISSING:
                result = self.redact_json_string(arguments)
                self._remember(arguments, result, len(arguments))
            return result
        return self.redact_value(arguments)

    def _content(self, content: tuple[Content, ...]) -> tuple[Content, ...]:
        """`content` redacted, each distinct content scanned once.

        One message's content reaches the redactor again and again (``MessageEnd``,
        ``TurnEnd``, ``AgentEnd``, and every later ``TurnRequest``'s history). Its
        tool calls' arguments may be dicts or lists that could still change (gain a
        secret after the scan): the entry keeps a copy of them taken before the scan
        and holds only while they still equal it; arguments that do not copy as JSON
        are never remembered, nor is a content over `_MEMO_VALUE_BYTES`.
        """
        if not content:
            return content
        hit = self._memo.get(id(content))  # `_recall`, inline: most contents come again
        if hit is not None and hit[0] is content and hit[2] == hit[3]:
            return hit[1]  # type: ignore[no-any-return]
        arguments = _live_arguments(content)
        # Nothing in it can change (most contents: no tool call, or arguments as a JSON
        # string): an entry without lists, which the cyclic collector stops tracking.
        live: list[Any] | None = None
        witness: Any = None
        size = _content_size(content, arguments)
        if not set(map(type, arguments)) <= _UNCHANGEABLE:
            # The live arguments and their copy: each counted as their JSON.
            copied = _json_copy(arguments, (_MEMO_VALUE_BYTES - size) // 2)
            if copied is None:
                return self._scan_content(content)
            witness, arguments_size = copied
            size += 2 * arguments_size
            live = arguments
        result = self._scan_content(content)
        self._remember(content, result, size, live, witness)
        return result

    def _history(self, messages: tuple[Any, ...]) -> tuple[Any, ...]:
        """A request's history redacted (the very same tuple when nothing changed).

        A conversation's history comes again in every ``TurnRequest``, grown by the
        messages since the last one: the history remembered for its first message, if
        this one starts with it, is taken as redacted then, and only the messages
        after it are scanned (a long conversation is not walked message by message
        on every turn). As in `_content`, what could still change (tool-call
        arguments) is compared with a copy taken before the scan; a history holding
        anything else that could change (extension data with text redaction on,
        arguments that do not copy as JSON) is not remembered (the shorter one
        remembered before it still serves). The histories remembered weigh at most
        `_HISTORY_BYTES`, beside the one last given that weighs more on its own (a
        conversation that outgrew the budget, in flight: past it, every request was
        scanned whole, the memo evicting in turn each content the next one needed) up to
        `_LARGE_HISTORY_BYTES`, until the next such history replaces it or
        `_HISTORY_LIMIT` requests of other histories pass without it.
        """
        if not messages:
            return messages
        key = id(messages[0])
        start, done, live, witness, size = 0, (), [], [], 0
        hit = self._histories.get(key)
        if hit is None:
            large = self._large_history  # read once: another thread may replace it
            if large is not None and large[0] == key:
                hit = large[1]
        if hit is not None:
            known, result, known_live, known_witness, known_size = hit
            if len(known) <= len(messages) and all(map(is_, known, messages)) and known_live == known_witness:
                start, live, witness, size = len(known), known_live, known_witness, known_size
                done = () if result is known else result  # () while nothing in it was redacted
        fresh = messages[start:]
        mapped = tuple(map(self._message, fresh))
        if all(map(is_, mapped, fresh)):
            result = done + fresh if done else messages
        else:
            result = (done or messages[:start]) + mapped
        fresh_live = []
        for message in fresh:
            if type(message) is AssistantMessage:
                arguments = _live_arguments(message.content)
                size += _content_size(message.content, arguments)
                fresh_live += arguments
            elif isinstance(message, ExtensionMessage):
                if self.redact_text:
                    return result
                try:
                    size += json_size(message.data)
                except _NOT_COPIED:
                    return result
            else:
                size += sum(map(text_size, message.content))
        if fresh_live:
            copied = _json_copy(fresh_live, (_LARGE_HISTORY_BYTES - size) // 2)
            if copied is None:
                return result
            witness = witness + copied[0]
            size += 2 * copied[1]
            live = live + fresh_live
        if size > _LARGE_HISTORY_BYTES:
            return result
        entry = (messages, result, live, witness, size)
        with self._memo_lock:
            histories = self._histories
            old = histories.pop(key, None)
            if old is not None:
                self._history_bytes -= old[4]
            self._history_stores += 1
            if size > _HISTORY_BYTES:
                self._large_history = (key, entry, self._history_stores)
                return result
            large = self._large_history
            # Dropped once shrunk (pruned) back under the budget, or once not asked for
            # while `_HISTORY_LIMIT` others were (its conversation most likely over).
            if large is not None and (large[0] == key or self._history_stores - large[2] > _HISTORY_LIMIT):
                self._large_history = None
            # Re-inserted last: the oldest conversation goes first.
            while histories and (
                len(histories) >= _HISTORY_LIMIT or self._history_bytes + size > _HISTORY_BYTES
            ):
                self._history_bytes -= histories.popitem(last=False)[1][4]
            histories[key] = entry
            self._history_bytes += size
        return result

    def _messages(self, messages: tuple[Any, ...]) -> tuple[Any, ...]:
        """A run's messages redacted (the very same tuple when nothing changed): each was
        seen as it ended, so most come back untouched. Without text redaction a tool
        result that did not fail has nothing to scan: only the others go through
        `_message` (picked in C: only tool results have an ``is_error``)."""
        scanned = (
            messages
            if self.redact_text
            else tuple(compress(messages, map(getattr, messages, repeat("is_error"), repeat(True))))
        )
        if all(map(is_, map(self._message, scanned), scanned)):
            return messages
        return tuple(map(self._message, messages))  # something changed: every message in its place

    def _error_content(self, content: tuple[Content, ...]) -> tuple[Content, ...]:
        # A failed tool's text is usually an exception message (URLs with keys,
        # headers): always scanned, with or without `redact_text`. Errors are rare
        # and may share no identity with anything scanned before: no memo.
        return self._scan_content(content, all_text=True)

    def _scan_content(self, content: tuple[Content, ...], all_text: bool = False) -> tuple[Content, ...]:
        redact_text = self.redact_text or all_text
        out: list[Content] | None = None
        for index, block in enumerate(content):  # an unchanged block goes on at once
            new: Content
            if type(block) is ToolCall:
                arguments = block.arguments  # `_arguments`, its usual dict case inline:
                redacted = (
                    self._redact_dict(arguments) if type(arguments) is dict else self._arguments(arguments)
                )
                if redacted is arguments:
                    continue
                new = replace(block, arguments=redacted)
            elif not redact_text:
                continue
            elif type(block) is TextContent:
                text = self.redact_string(block.text)
                if text is block.text:
                    continue
                new = TextContent(text=text)
            elif type(block) is ThinkingContent:
                thinking = self.redact_string(block.thinking)
                if thinking is block.thinking:
                    continue
                new = replace(block, thinking=thinking)
            else:
                continue
            if out is None:
                out = list(content)
            out[index] = new
        return content if out is None else tuple(out)

    def _message(self, message: Any) -> Any:
        tp = type(message)
        if tp is AssistantMessage:
            content = self._content(message.content)
            error = message.error_message
            if error is None and not message.tags:
                return message if content is message.content else replace(message, content=content)
            error = None if error is None else self.redact_string(error)
            tags = self._tags(message.tags)
            if content is message.content and error is message.error_message and tags is message.tags:
                return message
            return replace(message, content=content, error_message=error, tags=tags)
        if not self.redact_text:
            # Tool results carry no tool arguments: without text redaction only failed
            # ones (error texts) are scanned.
            if tp is ToolResultMessage and message.is_error:
                content = self._error_content(message.content)
                return message if content is message.content else replace(message, content=content)
            return message
        if tp is UserMessage or tp is ToolResultMessage:
            content = self._content(message.content)
            tags = self._tags(message.tags)
            if content is message.content and tags is message.tags:
                return message
            return replace(message, content=content, tags=tags)
        if isinstance(message, ExtensionMessage):
            data = self.redact_value(message.data)
            return (
                message
                if data is message.data
                else extension_message(message_role(message), message.kind, data)
            )
        return message

    def _tags(self, tags: tuple[NodeTag, ...]) -> tuple[NodeTag, ...]:
        # A tag's text (a lesson learnt, a summary) is message text: scanned with `redact_text`.
        if not (tags and self.redact_text):
            return tags
        texts = [self.redact_string(tag.text) for tag in tags]
        if all(text is tag.text for text, tag in zip(texts, tags, strict=True)):
            return tags
        return tuple(replace(tag, text=text) for text, tag in zip(texts, tags, strict=True))

    def _result(self, result: ToolResult, is_error: bool = False) -> ToolResult:
        content = self._error_content(result.content) if is_error else self._content(result.content)
        details = self.redact_value(result.details)
        if content is result.content and details is result.details:
            return result
        return replace(result, content=content, details=details)

    def _snapshot(self, snapshot: LoopConfigSnapshot) -> LoopConfigSnapshot:
        changes = {}
        for name in ("model", "provider", "config_id", "name", "base_url"):
            value = getattr(snapshot, name)
            if isinstance(value, str):
                new = self.redact_string(value)
                if new is not value:
                    changes[name] = new
        return replace(snapshot, **changes) if changes else snapshot

    # -- events -------------------------------------------------------------------------

    def __call__(self, event: AgentEvent) -> AgentEvent:
        if type(event) is MessageUpdate:  # most events of a stream: no handler lookup
            message = event.message
            if (
                type(message) is AssistantMessage
                and not message.content
                and message.error_message is None
                and event.delta.ToolCallDelta is msgspec.UNSET  # not a tool call's arguments
                and not self.redact_text
            ):
                # Prose streamed into phi-core's empty placeholder: nothing to scan (a
                # `Tracer` delivers these without the call: `instrument._prose_emitter`).
                return event
            return self._update(event)
        handler = self._handlers.get(type(event))
        return event if handler is None else handler(event)

    def _one_message(self, event: _OneMessage) -> _OneMessage:
        message: Any = event.message
        tp = type(message)
        # What `_message` would pass untouched, most frequent first.
        if tp is ToolResultMessage:
            if not (message.is_error or self.redact_text):
                return event
        elif tp is AssistantMessage:
            if not message.content and message.error_message is None and not message.tags:
                return event  # phi-core's empty placeholder: nothing in it
        elif tp is UserMessage and not self.redact_text:
            return event
        new = self._message(message)
        return event if new is message else replace(event, message=new)

    def _tool_start(self, event: ToolExecutionStart) -> ToolExecutionStart:
        args = event.args
        # `_arguments`, its usual dict case inline.
        redacted = self._redact_dict(args) if type(args) is dict else self._arguments(args)
        return event if redacted is args else replace(event, args=redacted)

    def _tool_end(self, event: ToolExecutionEnd) -> ToolExecutionEnd:
        if not (event.is_error or self.redact_text):
            return event
        result = self._result(event.result, is_error=event.is_error)
        return event if result is event.result else replace(event, result=result)

    def _tool_update(self, event: ToolExecutionUpdate) -> ToolExecutionUpdate:
        result = self._result(event.partial_result)
        return event if result is event.partial_result else replace(event, partial_result=result)

    def _input_rejected(self, event: InputRejected) -> InputRejected:
        reason = self.redact_string(event.reason)
        return event if reason is event.reason else replace(event, reason=reason)

    def _turn_request(self, event: TurnRequest) -> TurnRequest:
        event = self._request_messages(event)  # type: ignore[assignment]
        payload = event.payload
        prompt = self.redact_string(payload.system_prompt)
        tools = tuple(map(self._tool, payload.tools))
        if prompt is payload.system_prompt and all(map(is_, tools, payload.tools)):
            return event
        return replace(event, payload=replace(payload, system_prompt=prompt, tools=tools))

    def _tool(self, tool: ToolDefinition) -> ToolDefinition:
        description = self.redact_string(tool.description)
        parameters = self._redact_patterns(tool.parameters)
        if description is tool.description and parameters is tool.parameters:
            return tool
        return replace(tool, description=description, parameters=parameters)

    def _prun(self, event: PrunApplied) -> PrunApplied:
        memo = None if event.memo is None else self.redact_string(event.memo)
        return event if memo is event.memo else replace(event, memo=memo)

    def _revert(self, event: RevertApplied) -> RevertApplied:
        summary = None if event.summary is None else self.redact_string(event.summary)
        reason = None if event.reason is None else self.redact_string(event.reason)
        if summary is event.summary and reason is event.reason:
            return event
        return replace(event, summary=summary, reason=reason)

    def _progress(self, event: ProgressMessage) -> ProgressMessage:
        text = self.redact_string(event.text)
        return event if text is event.text else replace(event, text=text)

    def _update(self, event: MessageUpdate) -> MessageUpdate:
        delta = event.delta
        # A tool call's arguments are always scanned (as JSON, or a piece of it), text and
        # thinking with `redact_text`.
        arguments = delta.ToolCallDelta is not msgspec.UNSET
        if arguments or self.redact_text:
            piece = delta.delta
            message = event.message
            stream = self._streams.get(id(message)) if self._streams and not arguments else None
            if stream is not None and stream[0] is message:  # held back where a secret may start
                text = self._stream(stream, 1 if delta.Text is not msgspec.UNSET else 2, piece)
            else:
                text = self.redact_json_string(piece) if arguments else self.redact_string(piece)
            if text is not piece:
                event = replace(event, delta=StreamDelta(delta.kind, text))
        message = event.message
        if (
            type(message) is AssistantMessage
            and not message.content
            and message.error_message is None
            and not message.tags
        ):
            return event  # phi-core's empty placeholder: nothing to scan
        return map_messages(event, self._message)

    # -- streamed text --------------------------------------------------------------------

    def open_stream(self, message: AssistantMessage) -> bool:
        """Hold back, from now on, the end of the text and thinking streamed in deltas
        carrying `message` (phi-core's placeholder of a reply, the one object every
        delta of it carries) wherever a secret may start that the next deltas complete:
        it is passed on, redacted, at the front of a later delta, so that a secret split
        across deltas is redacted in them as in the finished message (a `Tracer` does
        this for each reply). Each kind (text, thinking) holds its own end, kept while
        the other streams. The caller passes on what `close_stream` returns once the
        stream ends, through the processors after this one: a delta's text is then what
        the redactor passed on.

        What is held back is at most `_STREAM_HOLD` characters behind the start of a
        possible secret (an anchor of the default patterns; for the user's patterns, the
        longest they match, from their parsed form), and a match still growing is held
        to `_STREAM_HOLD_LIMIT` characters. False, holding nothing, without
        `redact_text` or with `_STREAM_LIMIT` streams open.
        """
        if not self.redact_text:
            return False
        with self._memo_lock:
            streams = self._streams
            if len(streams) >= _STREAM_LIMIT:  # abandoned replies: scanned piece by piece
                return False
            streams[id(message)] = [message, _NO_STREAM, _NO_STREAM]
        return True

    def close_stream(self, message: AssistantMessage) -> tuple[StreamDelta, ...]:
        """What was held back of the stream `open_stream` opened for `message`, redacted,
        as the deltas to pass on (none for a kind that holds nothing); the stream ends."""
        stream = self._streams.get(id(message))
        if stream is None or stream[0] is not message:
            return ()
        with self._memo_lock:
            self._streams.pop(id(message), None)
        out = []
        for name, index in _STREAM_KINDS.items():
            context, held = stream[index]
            if held:
                out.append(StreamDelta(name, self._released(context + held, len(context), len(held))))
        return tuple(out)

    def _stream(self, stream: list[Any], index: int, piece: str) -> str:
        """What to pass on, redacted, of the text of a stream (`open_stream`) that `piece`
        continues: what it held back and `piece`, but for a tail that a secret may start
        in and the next piece complete."""
        context, held = stream[index]
        text = held + piece if held else piece
        end = cut = len(text)
        default = self._default
        found = None if default is None else _candidate_search(text)
        if found is not None and found.lastindex:  # no anchor, only the start of one at the end
            cut, found = found.start(), None
        if found is None and not self._custom:
            # Nothing to redact, nothing a secret may start in (the usual piece): one
            # search, and what look-behinds need kept.
            released = text[:cut] if cut < end else text
            length = self._stream_context
            kept = released[-length:] if len(released) >= length else (context + released)[-length:]
            stream[index] = kept, text[cut:]
            return piece if released is piece else released
        if default is not None:
            head = _anchor_head_search(text, max(0, end - _LONGEST_ANCHOR + 1))
            if head is not None:  # an anchor the next piece may complete
                cut = head.start()
            # A secret may start at an anchor and end in the next pieces, unless white
            # space follows it: a default pattern matches none (but in "Bearer ").
            anchor = _anchor_search(text, max(0, end - _STREAM_HOLD))
            while anchor is not None and _space_search(text, anchor.end()) is not None:
                anchor = _anchor_search(text, anchor.end())
            if anchor is not None:
                cut = min(cut, anchor.start())
        if self._custom:
            cut = min(cut, max(0, end - self._stream_width))
        scanned = context + text
        start = len(context)
        # Held from the start of a match that the held tail (or the next piece) may
        # lengthen or end otherwise; one pass may move the cut into another's match.
        moved = True
        while moved:
            moved = False
            for pattern in self._passes:
                for match in pattern.finditer(scanned, start):
                    at = match.start() - start
                    if at >= cut:
                        break
                    if match.end() - start > cut or match.end() - start == end:
                        if pattern is default:  # from its anchor: without it, the rest would pass for clean
                            anchor = _anchor_search(text, max(0, at - _LONGEST_ANCHOR))
                            if anchor is not None and anchor.start() < at:
                                at = anchor.start()
                        cut, moved = at, True
                        break
        cut = max(cut, end - _STREAM_HOLD_LIMIT)
        stream[index] = self._context(context, text, cut), text[cut:]
        released = self._released(scanned, start, cut) if cut else ""
        return piece if released == piece else released

    def _context(self, context: str, text: str, cut: int) -> str:
        # What look-behinds read of the text passed on: `context`, then `text` to `cut`.
        length = self._stream_context
        if cut >= length:
            return text[cut - length : cut]
        return (context + text[:cut])[-length:] if cut else context

    def _released(self, scanned: str, start: int, length: int) -> str:
        """`redact_string` of the `length` characters of `scanned` from `start` (what is
        passed on of a stream), what comes before read for look-behinds and what comes
        after for look-aheads; a match running past them is redacted up to their end."""
        end = start + length
        for pattern in self._passes:
            pieces: list[str] = []
            last = start
            for match in pattern.finditer(scanned, start):
                if match.start() >= end:
                    break
                pieces += (scanned[last : match.start()], self.replacement)
                last = min(match.end(), end)
                if last == end:
                    break
            if pieces:
                pieces.append(scanned[last:end])
                redacted = "".join(pieces)
                scanned = scanned[:start] + redacted + scanned[end:]
                end = start + len(redacted)
        return scanned[start:end]

    def _agent_start(self, event: AgentStart) -> AgentStart:
        snapshot = event.config_snapshot
        new_snapshot = self._snapshot_once(snapshot) if isinstance(snapshot, LoopConfigSnapshot) else snapshot
        metadata = self.redact_value(event.metadata)
        if new_snapshot is snapshot and metadata is event.metadata:
            return event
        return replace(event, config_snapshot=new_snapshot, metadata=metadata)

    def _agent_end(self, event: AgentEnd) -> AgentEnd:
        event = map_messages(event, self._message, many=self._messages)
        error = event.error
        new_error = self.redact_string(error) if isinstance(error, str) else error
        rejection = event.rejection
        new_rejection = None if rejection is None else self.redact_string(rejection)
        if new_error is error and new_rejection is rejection:
            return event
        return replace(event, error=new_error, rejection=new_rejection)
