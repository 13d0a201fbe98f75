"""Compare two recorded runs: two loops turn by turn, or two sessions loop by loop.

`diff_loops` aligns the turns of two loops by position (turn *i* of A with turn *i*
of B) and reports, per turn, what differs in content:

* ``input``: the messages the turn added before the model call (user prompts,
  extension messages; its tool results are compared under ``tool_result``);
* ``request``: when both turns captured their request (``TurnRequest``), its
  system prompt (line diff) and the tools offered (by name, each one's description
  and parameters compared as JSON); a turn without a captured request has
  nothing to compare here;
* ``text`` and ``thinking``: the assistant output's text and thinking, with a
  line diff;
* ``tool_call``: each call's name and arguments, the arguments compared as JSON
  structure (``tool_calls[0].arguments.city``), calls only on one side;
* ``tool_result``: each result's tool name, content and error flag, results
  matched to the calls in call order;
* ``stop_reason`` and ``error`` (the assistant message's error text).

A loop cut off before its end (no ``AgentEnd``: a stream cut short, a process
killed) was cut off in a turn its ``turns`` leave out: that turn, what its events hold
(`LoopRecord.cut_off_turn`: its inputs, its reply if it came, the results of the tools
that ended), is compared as one more position after its finished turns, without
duration (it never ended).

A loop also differs in itself (`LoopDiff.changes`, field ``loop``): in how it ended
(``loop.status``, ``loop.rejection``, ``loop.error``) and, when neither side has a
finished turn (an aborted prompt, a compaction pass, a loop cut off in its first
turn), in what was said in it (``loop.messages[0]``, `LoopRecord.conversation`); a
rejected loop holds no message. These count after its turns.

Runs are expected to differ in timing and token counts, so those are reported as
deltas (`UsageDelta`, seconds), never as divergence; so are the model that
answered and the tool call ids (`TurnDiff.incidental`), which a fresh run assigns
anew. A turn *diverges* when its content differs or it exists on one side only;
`LoopDiff.first_divergence` names the first such turn and its first change.
Thinking signatures are opaque and not compared.

`diff_sessions` pairs the loops of two sessions in tree order (`views.loop_order`:
each loop before the loops that continue it) and diffs each pair.
`diff_placed_loops` compares two loops read apart from their sessions (`PlacedLoop`,
found with `loop_position`), as the viewer does.

Every result is a frozen msgspec Struct; ``msgspec.json.encode`` gives the JSON of
``phi-session diff --json`` and of the viewer's ``/api/diff``, and
``msgspec.json.decode(data, type=LoopDiff | SessionDiff)`` reads it back (the
``diff`` field tells them apart).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

from ._checks import check_type
from .errors import InvalidArgument, InvalidSessionId, LoopNotFound, SessionNotFound
from .messages import (
    ZERO_USAGE,
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
    ExtensionMessage,
    ImageContent,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResultMessage,
    Usage,
    message_role,
)
from .model import CutOffTurn, LoopRecord, Session, Turn, counted_usage
from .stores.base import validate_session_id
from .views import loop_order

__all__ = [
    "ChangeKind",
    "FieldChange",
    "FieldName",
    "FirstDifference",
    "LoopDiff",
    "LoopSide",
    "PlacedLoop",
    "SessionDiff",
    "TurnDiff",
    "TurnStatus",
    "UsageDelta",
    "diff_loops",
    "diff_placed_loops",
    "diff_sessions",
    "find_loop",
    "load_ref",
    "loop_position",
    "parse_ref",
]

ChangeKind = Literal["changed", "added", "removed"]
"""``added``: only in B; ``removed``: only in A; ``changed``: on both sides, different."""
FieldName = Literal[
    "input",
    "request",
    "text",
    "thinking",
    "tool_call",
    "tool_result",
    "stop_reason",
    "error",
    "model",
    "tool_call_id",
    "loop",
]
TurnStatus = Literal["equal", "changed", "added", "removed"]


class _Result(msgspec.Struct, frozen=True, kw_only=True):
    pass


class UsageDelta(_Result, frozen=True):
    """B's token counts minus A's, field by field (a side without usage counts as zero)."""

    input: int = 0
    output: int = 0
    reasoning: int = 0
    cache_read: int = 0
    cache_write: int = 0
    total_tokens: int = 0

    @classmethod
    def between(cls, a: Usage | None, b: Usage | None) -> UsageDelta:
        def value(usage: Usage | None, name: str) -> int:
            return 0 if usage is None else int(getattr(usage, name))

        return cls(**{name: value(b, name) - value(a, name) for name in cls.__struct_fields__})

    def is_zero(self) -> bool:
        return all(getattr(self, name) == 0 for name in self.__struct_fields__)


class FieldChange(_Result, frozen=True):
    """One difference inside a turn: where it is and each side's value.

    `path` names the place: ``input[0]``, ``request.system_prompt``,
    ``request.tools.read_file.parameters``, ``output.text``, ``output.thinking``,
    ``output.stop_reason``, ``tool_calls[0].name``, ``tool_calls[0].arguments.city``,
    ``tool_results[1].content``... `a` and `b` are the JSON values of each side;
    the side that lacks the value has none (UNSET: absent from the JSON): `kind`
    ``added`` has only `b`, ``removed`` only `a`. A text that changed carries
    `text_diff`: unified diff lines from A to B (``@@`` hunk heads, then lines
    prefixed ``-``, ``+`` or a space), without the file header.
    """

    field: FieldName
    path: str
    kind: ChangeKind
    a: Any = msgspec.UNSET
    b: Any = msgspec.UNSET
    text_diff: tuple[str, ...] = ()


class TurnDiff(_Result, frozen=True):
    """Turn `index` of A against turn `index` of B (its position in each loop's turns).

    `status` is ``added`` (only in B), ``removed`` (only in A), ``changed`` (some
    content `changes`) or ``equal``. `incidental` lists what differs without making
    the turn diverge: the model that answered, tool call ids. `usage_delta` and
    `seconds_delta` are B minus A (`seconds_delta` None unless both sides exist);
    the seconds are each turn's duration, start to end.
    """

    index: int
    status: TurnStatus
    changes: tuple[FieldChange, ...] = ()
    incidental: tuple[FieldChange, ...] = ()
    usage_a: Usage | None = None
    usage_b: Usage | None = None
    usage_delta: UsageDelta = UsageDelta()
    seconds_a: float | None = None
    seconds_b: float | None = None
    seconds_delta: float | None = None

    @property
    def diverged(self) -> bool:
        return self.status != "equal"


class FirstDifference(_Result, frozen=True):
    """Where two runs first differ in content.

    `turn` is the turn index (None when a whole loop exists on one side only);
    `field` and `path` are those of the first change (``turn`` for a turn on one
    side only, ``loop`` for a loop on one side only or one that differs in itself);
    `summary` says it in a line.
    """

    loop_a: str | None
    loop_b: str | None
    turn: int | None
    field: str
    path: str
    summary: str


class PlacedLoop(NamedTuple):
    """A loop and where it is: its session's id and its index in ``session.loops``, all
    a diff needs of its session (`diff_placed_loops`)."""

    session_id: str
    position: int
    record: LoopRecord


class LoopSide(_Result, frozen=True):
    """One compared loop: where it is and what it is.

    `position` is its index in ``session.loops`` (``phi-session show`` numbers it
    ``#position+1``); `continuation` is its kind, ``Branch:tag`` for a tagged one;
    `model` its config's ``provider/model`` (None without a config); `usage` what its
    replies reported (`LoopRecord.counted_reported_usage`: a loop cut off before its end
    counts its turns; a replay's turns, the recorded usage, though not billed again; its
    total counts a reply that reported none);
    `seconds` its duration (None while it has not ended).
    """

    session_id: str
    loop_id: str
    position: int
    continuation: str
    parent_loop_id: str | None
    status: str
    model: str | None
    turn_count: int
    usage: Usage
    seconds: float | None


class LoopDiff(_Result, frozen=True, kw_only=True, tag="loops", tag_field="diff"):
    """Loop A against loop B, turn by turn (`diff_loops`).

    `turns` holds one `TurnDiff` per position of the longer loop; `changes` what
    differs in the loops themselves (field ``loop``, see the module docstring).
    `first_divergence` is None when neither does (`identical`). `usage_delta` and
    `seconds_delta` compare the loops' totals, B minus A.
    """

    a: LoopSide
    b: LoopSide
    turns: tuple[TurnDiff, ...]
    changes: tuple[FieldChange, ...] = ()
    first_divergence: FirstDifference | None
    usage_delta: UsageDelta
    seconds_delta: float | None

    @property
    def identical(self) -> bool:
        """Neither a turn nor the loops differ (timing, usage and incidental differences aside)."""
        return self.first_divergence is None

    @property
    def diverged_turns(self) -> list[int]:
        """The indices of the turns that diverge, in order."""
        return [turn.index for turn in self.turns if turn.diverged]


class SessionDiff(_Result, frozen=True, tag="sessions", tag_field="diff"):
    """Session A against session B, loop by loop in tree order (`diff_sessions`).

    `loops` pairs the n-th loop of A's tree with the n-th of B's; the loops past
    the shorter tree are `only_in_a` or `only_in_b`. `first_divergence` is the first
    pair's that diverges, or the first loop on one side only, in tree order.
    """

    session_a: str
    session_b: str
    loops: tuple[LoopDiff, ...]
    only_in_a: tuple[LoopSide, ...]
    only_in_b: tuple[LoopSide, ...]
    first_divergence: FirstDifference | None
    usage_delta: UsageDelta

    @property
    def identical(self) -> bool:
        return self.first_divergence is None


# -- naming loops -------------------------------------------------------------------------------

_POSITION = re.compile(r"#([1-9][0-9]{0,8})")


def parse_ref(text: str, loop: str | None = None) -> tuple[str, str | None]:
    """``SESSION`` or ``SESSION:LOOP`` as ``(session id, loop or None)``.

    The text is split at its first ``:``, so a session id holding a colon is
    written with its `loop` named apart: then `text` is the whole session id
    (an empty `loop` is an `InvalidArgument`). The loop is a loop id or ``#N`` (see
    `find_loop`). An empty loop after the colon (``SESSION:``) is None. `load_ref`
    reads a whole session whose id holds a colon too.
    """
    if not isinstance(text, str) or not isinstance(loop, (str, type(None))):
        raise TypeError("a loop reference and its loop must be str")
    if loop is not None:
        if not loop:
            raise InvalidArgument("empty loop")
        return text, loop
    session_id, colon, named = text.partition(":")
    return session_id, (named if colon and named else None)


_Loaded = TypeVar("_Loaded")


def load_ref(text: str, loop: str | None, load: Callable[[str], _Loaded]) -> tuple[_Loaded, str | None]:
    """The session a reference names, loaded by `load` (which raises `SessionNotFound`
    for an id not stored), and its loop or None, as `parse_ref` reads them; but a text
    holding a colon that is, whole, the id of a stored session names that session:
    ``team:alpha`` is the session ``team:alpha`` when there is one, else the loop
    ``alpha`` of the session ``team``.
    """
    if not isinstance(text, str):
        raise TypeError("a loop reference and its loop must be str")
    if loop is None and ":" in text:
        try:
            return load(validate_session_id(text)), None
        except (SessionNotFound, InvalidSessionId):
            pass  # not a stored session's id: SESSION:LOOP
    session_id, named = parse_ref(text, loop)
    return load(session_id), named


def find_loop(session: Session, loop: str) -> LoopRecord:
    """The loop of `session` named `loop`: its id, or ``#N`` for the N-th loop of
    ``session.loops`` (as ``phi-session show`` numbers them) when no loop has that id.

    Raises `LoopNotFound`.
    """
    index = _loop_index(session, loop)  # first: it checks the arguments' types
    return session.loops[index]


def loop_position(session_id: str, loop_ids: Sequence[str], loop: str) -> int:
    """The index in `loop_ids` (the ids of session `session_id`'s loops in order, as
    ``session.loops`` or its outline lists them) of the loop `loop` names, as `find_loop`
    reads it. Raises `LoopNotFound`."""
    for index, loop_id in enumerate(loop_ids):
        if loop_id == loop:  # the first with the id, as `Session.get_loop` reads it
            return index
    match = _POSITION.fullmatch(loop)
    if match is not None and int(match.group(1)) <= len(loop_ids):
        return int(match.group(1)) - 1
    raise LoopNotFound(f"no loop {loop!r} in session {session_id!r}")


def _loop_index(session: Session, loop: str) -> int:
    """The index in ``session.loops`` of the loop `find_loop` finds."""
    check_type("session", session, Session)
    check_type("loop", loop, str)
    return loop_position(session.session_id, [record.loop_id for record in session.loops], loop)


# -- the diffs -------------------------------------------------------------------------------------


def diff_loops(session_a: Session, loop_a: str, session_b: Session, loop_b: str) -> LoopDiff:
    """Loop `loop_a` of `session_a` against loop `loop_b` of `session_b`, turn by turn.

    The loops are named as `find_loop` reads them; both may be in one session (a
    fork and its parent). Raises `LoopNotFound`.
    """
    placed_a = _placed(session_a, _loop_index(session_a, loop_a))
    return _diff_pair(placed_a, _placed(session_b, _loop_index(session_b, loop_b)))


def diff_placed_loops(a: PlacedLoop, b: PlacedLoop) -> LoopDiff:
    """Loop `a` against loop `b`, turn by turn, as `diff_loops` compares them, from the
    loops alone (read with `SessionStore.load_loops`, say, rather than their sessions)."""
    check_type("a", a, PlacedLoop)
    check_type("b", b, PlacedLoop)
    return _diff_pair(a, b)


def diff_sessions(a: Session, b: Session) -> SessionDiff:
    """Session `a` against session `b`: their loops paired in tree order, each pair diffed."""
    check_type("a", a, Session)
    check_type("b", b, Session)
    order_a = [index for index, _ in loop_order(a)]
    order_b = [index for index, _ in loop_order(b)]
    pairs = [
        _diff_pair(_placed(a, index_a), _placed(b, index_b))
        for index_a, index_b in zip(order_a, order_b, strict=False)
    ]
    shared = len(pairs)
    only_a = tuple(_side(_placed(a, index)) for index in order_a[shared:])
    only_b = tuple(_side(_placed(b, index)) for index in order_b[shared:])
    first = next((pair.first_divergence for pair in pairs if pair.first_divergence is not None), None)
    if first is None and (only_a or only_b):
        side, label = (only_a[0], "A") if only_a else (only_b[0], "B")
        first = FirstDifference(
            loop_a=side.loop_id if only_a else None,
            loop_b=None if only_a else side.loop_id,
            turn=None,
            field="loop",
            path=f"loops[{shared}]",
            summary=f"loop {side.loop_id} (#{side.position + 1}) is only in {label}",
        )
    return SessionDiff(
        session_a=a.session_id,
        session_b=b.session_id,
        loops=tuple(pairs),
        only_in_a=only_a,
        only_in_b=only_b,
        first_divergence=first,
        usage_delta=UsageDelta.between(a.counted_reported_usage(), b.counted_reported_usage()),
    )


def _placed(session: Session, position: int) -> PlacedLoop:
    return PlacedLoop(session.session_id, position, session.loops[position])


def _side(placed: PlacedLoop) -> LoopSide:
    record = placed.record
    kind = record.kind
    config = record.config
    return LoopSide(
        session_id=placed.session_id,
        loop_id=record.loop_id,
        position=placed.position,
        continuation=kind.kind if kind.tag is None else f"{kind.kind}:{kind.tag}",
        parent_loop_id=record.parent_loop_id,
        status=record.status,
        model=None if config is None else f"{config.provider}/{config.model}",
        turn_count=len(record.turns),
        usage=record.counted_reported_usage(),
        seconds=None if record.ended_at is None else record.ended_at - record.started_at,
    )


def _diff_pair(placed_a: PlacedLoop, placed_b: PlacedLoop) -> LoopDiff:
    a, b = placed_a.record, placed_b.record
    side_a, side_b = _side(placed_a), _side(placed_b)
    steps_a, steps_b = _steps(a), _steps(b)
    if not a.turns and not b.turns:  # compared as the loops' messages (`_loop_changes`)
        steps_a, steps_b = [], []
    turns = [
        _diff_turn(index, _at(steps_a, index), _at(steps_b, index))
        for index in range(max(len(steps_a), len(steps_b)))
    ]
    changes = tuple(_loop_changes(a, b))
    first = next((turn for turn in turns if turn.diverged), None)
    if first is not None:
        divergence: FirstDifference | None = _divergence(a.loop_id, b.loop_id, first)
    elif changes:
        divergence = FirstDifference(
            loop_a=a.loop_id,
            loop_b=b.loop_id,
            turn=None,
            field="loop",
            path=changes[0].path,
            summary=_what(changes),
        )
    else:
        divergence = None
    both_ended = side_a.seconds is not None and side_b.seconds is not None
    return LoopDiff(
        a=side_a,
        b=side_b,
        turns=tuple(turns),
        changes=changes,
        first_divergence=divergence,
        usage_delta=UsageDelta.between(side_a.usage, side_b.usage),
        seconds_delta=round((side_b.seconds or 0.0) - (side_a.seconds or 0.0), 9) if both_ended else None,
    )


def _divergence(loop_a: str, loop_b: str, turn: TurnDiff) -> FirstDifference:
    if turn.status in ("added", "removed"):
        where = "B" if turn.status == "added" else "A"
        field, path, what = "turn", f"turns[{turn.index}]", f"only in {where}"
    else:
        field, path, what = turn.changes[0].field, turn.changes[0].path, _what(turn.changes)
    return FirstDifference(
        loop_a=loop_a,
        loop_b=loop_b,
        turn=turn.index,
        field=field,
        path=path,
        summary=f"turn {turn.index}: {what}",
    )


def _what(changes: Sequence[FieldChange]) -> str:
    """The first of `changes` in a line, and how many more there are."""
    first = changes[0]
    more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
    return f"{first.path} {first.kind}{more}"


def _loop_changes(a: LoopRecord, b: LoopRecord) -> Iterator[FieldChange]:
    """What differs in the loops themselves: without finished turns on either side what
    was said in them (what their turns' inputs would show; a loop cut off before its end
    has it in its events only), then how each ended."""
    if not a.turns and not b.turns:
        yield from _text_changes("loop", "loop.messages", a.conversation(), b.conversation())
    for name in ("status", "rejection", "error"):
        value_a, value_b = (getattr(record, name) for record in (a, b))
        if value_a != value_b:  # an error not set (UNSET) shows as null
            yield FieldChange(
                field="loop",
                path=f"loop.{name}",
                kind="changed",
                a=None if value_a is msgspec.UNSET else value_a,
                b=None if value_b is msgspec.UNSET else value_b,
            )


class _Step(NamedTuple):
    """A turn as two runs compare it: a finished `Turn`, or the one a loop was cut off in."""

    inputs: Sequence[AgentMessage]
    """The messages it added (prompts, follow-ups, steering, the results a resuming run
    sends for an earlier loop's calls), not its own tool results."""
    output: AgentMessage | None
    """Its reply; None: cut off before it."""
    results: Sequence[ToolResultMessage]
    """Its tool results, in the order of its calls (`_results_in_call_order`)."""
    request: AnnotatedRequestPayload | None
    usage: Usage
    seconds: float | None
    """Its duration; None: it never ended."""

    @classmethod
    def of(cls, turn: Turn, usage: Usage) -> _Step:
        """`turn`, with its `usage` as it shows (`LoopRecord.turn_usage`)."""
        # The turn's tool results sit in its input messages too: they are compared as
        # results. A result of another call is an input: a run resuming one that stopped
        # for a call's approval sends the approved tool's result (or a denial) first.
        results = [m for m in turn.tool_results if isinstance(m, ToolResultMessage)]
        own = {m.tool_call_id for m in results}
        inputs = [
            m for m in turn.input_messages if not (isinstance(m, ToolResultMessage) and m.tool_call_id in own)
        ]
        output = turn.output_message
        return cls(
            inputs,
            output,
            _results_in_call_order(results, output),
            turn.request_payload,
            usage,
            turn.duration(),
        )

    @classmethod
    def cut_off(cls, turn: CutOffTurn) -> _Step:
        replies = turn.replies
        output: AgentMessage | None = replies[-1] if replies else None
        calls = {call.id for reply in replies for call in _tool_calls(reply)}
        results = [m for m in turn.messages if isinstance(m, ToolResultMessage) and m.tool_call_id in calls]
        inputs = [
            m
            for m in turn.messages
            if not isinstance(m, AssistantMessage)
            and not (isinstance(m, ToolResultMessage) and m.tool_call_id in calls)
        ]
        usage = ZERO_USAGE
        for reply in replies:
            usage = usage + reply.usage
        usage = counted_usage(usage, [reply.usage for reply in replies])
        return cls(inputs, output, _results_in_call_order(results, output), None, usage, None)


def _steps(record: LoopRecord) -> list[_Step]:
    """The turns of `record` as compared: its finished turns, then, for a loop cut off
    before its end (`LoopRecord.reports_usage` false), the turn it was cut off in, once
    it started or said something."""
    steps = [_Step.of(turn, record.turn_usage(turn)) for turn in record.turns]
    if not record.reports_usage():
        cut_off = record.cut_off_turn()
        if cut_off.started_at is not None or cut_off.messages:
            steps.append(_Step.cut_off(cut_off))
    return steps


def _at(steps: list[_Step], index: int) -> _Step | None:
    return steps[index] if index < len(steps) else None


def _diff_turn(index: int, a: _Step | None, b: _Step | None) -> TurnDiff:
    seconds_a = None if a is None else a.seconds
    seconds_b = None if b is None else b.seconds
    usage_a = None if a is None else a.usage
    usage_b = None if b is None else b.usage
    timing: dict[str, Any] = {
        "usage_a": usage_a,
        "usage_b": usage_b,
        "usage_delta": UsageDelta.between(usage_a, usage_b),
        "seconds_a": seconds_a,
        "seconds_b": seconds_b,
    }
    if a is None or b is None:
        kind: ChangeKind = "added" if a is None else "removed"
        present = b if a is None else a
        assert present is not None  # one side at least: the index is below the longer loop's length
        return TurnDiff(index=index, status=kind, changes=tuple(_whole_turn(present, kind)), **timing)
    changes: list[FieldChange] = []
    incidental: list[FieldChange] = []
    changes.extend(_text_changes("input", "input", a.inputs, b.inputs, _input_text))
    _compare_input_ids(a.inputs, b.inputs, incidental)
    _compare_requests(a, b, changes)
    _compare_output(a.output, b.output, changes, incidental)
    _compare_tool_results(a, b, changes, incidental)
    return TurnDiff(
        index=index,
        status="changed" if changes else "equal",
        changes=tuple(changes),
        incidental=tuple(incidental),
        seconds_delta=None if seconds_a is None or seconds_b is None else round(seconds_b - seconds_a, 9),
        **timing,
    )


# -- what is compared ---------------------------------------------------------------------------


def _blocks_text(blocks: Sequence[Content], kind: type[TextContent] | type[ThinkingContent]) -> str:
    """The text (or thinking) of `blocks`, one block a line; an image among text as a
    placeholder naming its type, size and digest, so that another image shows."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, TextContent) and kind is TextContent:
            parts.append(block.text)
        elif isinstance(block, ThinkingContent) and kind is ThinkingContent:
            parts.append(block.thinking)
        elif isinstance(block, ImageContent) and kind is TextContent:
            digest = hashlib.sha256(block.data.encode()).hexdigest()[:12]
            parts.append(f"[image {block.mime_type}, {len(block.data):,} base64 chars, sha256 {digest}]")
    return "\n".join(parts)


def _message_text(message: AgentMessage | None) -> str:
    if message is None:  # a turn cut off before its reply
        return ""
    if isinstance(message, ExtensionMessage):
        data = msgspec.json.encode(message.data).decode()
        return f"[{message_role(message)} {message.kind}] {data}"
    return _blocks_text(message.content, TextContent)


def _input_text(message: AgentMessage) -> str:
    """An input as compared: its text; a tool result (one a resuming run sends for an
    earlier loop's call) naming its tool and whether it failed, not its call's id, which
    a fresh run assigns anew (`_compare_input_ids`)."""
    text = _message_text(message)
    if isinstance(message, ToolResultMessage):
        failed = " error" if message.is_error else ""
        return f"[toolResult {message.tool_name}{failed}] {text}"
    return text


def _compare_input_ids(
    a: Sequence[AgentMessage], b: Sequence[AgentMessage], incidental: list[FieldChange]
) -> None:
    """The call ids of the tool results among the inputs, by position: incidental."""
    for index, (input_a, input_b) in enumerate(zip(a, b, strict=False)):
        if not (isinstance(input_a, ToolResultMessage) and isinstance(input_b, ToolResultMessage)):
            continue
        if input_a.tool_call_id != input_b.tool_call_id:
            incidental.append(
                FieldChange(
                    field="tool_call_id",
                    path=f"input[{index}].tool_call_id",
                    kind="changed",
                    a=input_a.tool_call_id,
                    b=input_b.tool_call_id,
                )
            )


def _text_change(field: FieldName, path: str, a: str, b: str) -> FieldChange:
    lines = difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=2)
    return FieldChange(field=field, path=path, kind="changed", a=a, b=b, text_diff=tuple(lines)[2:])


def _whole_turn(turn: _Step, kind: ChangeKind) -> Iterator[FieldChange]:
    """What a turn on one side only holds, each part a change of `kind` (``added``:
    the turn is B's, ``removed``: A's)."""
    side = "b" if kind == "added" else "a"

    def part(field: FieldName, path: str, value: Any) -> FieldChange:
        return FieldChange(field=field, path=path, kind=kind, **{side: value})

    for index, message in enumerate(turn.inputs):
        yield part("input", f"input[{index}]", _input_text(message))
    output = turn.output
    if _message_text(output):
        yield part("text", "output.text", _message_text(output))
    if _thinking(output):
        yield part("thinking", "output.thinking", _thinking(output))
    for index, call in enumerate(_tool_calls(output)):
        yield part("tool_call", f"tool_calls[{index}]", _call_json(call))
    for index, result in enumerate(turn.results):
        yield part("tool_result", f"tool_results[{index}]", _result_json(result))
    if isinstance(output, AssistantMessage):
        yield part("stop_reason", "output.stop_reason", output.stop_reason)
        if output.error_message is not None:
            yield part("error", "output.error_message", output.error_message)


def _text_changes(
    field: FieldName,
    path: str,
    a: Sequence[AgentMessage],
    b: Sequence[AgentMessage],
    text: Callable[[AgentMessage], str] = _message_text,
) -> Iterator[FieldChange]:
    """The messages of `a` and `b` (``path[0]``...) that differ in `text`, by position."""
    texts_a, texts_b = [text(m) for m in a], [text(m) for m in b]
    for index in range(max(len(texts_a), len(texts_b))):
        where = f"{path}[{index}]"
        if index >= len(texts_b):
            yield FieldChange(field=field, path=where, kind="removed", a=texts_a[index])
        elif index >= len(texts_a):
            yield FieldChange(field=field, path=where, kind="added", b=texts_b[index])
        elif texts_a[index] != texts_b[index]:
            yield _text_change(field, where, texts_a[index], texts_b[index])


def _compare_requests(a: _Step, b: _Step, changes: list[FieldChange]) -> None:
    request_a, request_b = a.request, b.request
    if request_a is None or request_b is None:
        return
    if request_a.system_prompt != request_b.system_prompt:
        changes.append(
            _text_change("request", "request.system_prompt", request_a.system_prompt, request_b.system_prompt)
        )
    tools_a, tools_b = (
        {
            tool.name: {"description": tool.description, "parameters": tool.parameters}
            for tool in request.tools
        }
        for request in (request_a, request_b)
    )
    changes.extend(_json_changes("request", "request.tools", tools_a, tools_b))


def _tool_calls(message: AgentMessage | None) -> list[ToolCall]:
    if message is None or isinstance(message, ExtensionMessage):
        return []
    return [block for block in message.content if isinstance(block, ToolCall)]


def _compare_output(
    a: AgentMessage | None, b: AgentMessage | None, changes: list[FieldChange], incidental: list[FieldChange]
) -> None:
    if _message_text(a) != _message_text(b):
        changes.append(_text_change("text", "output.text", _message_text(a), _message_text(b)))
    if _thinking(a) != _thinking(b):
        changes.append(_text_change("thinking", "output.thinking", _thinking(a), _thinking(b)))
    _compare_calls(_tool_calls(a), _tool_calls(b), changes, incidental)
    assistant_a = a if isinstance(a, AssistantMessage) else None
    assistant_b = b if isinstance(b, AssistantMessage) else None
    fields: tuple[tuple[FieldName, str], ...] = (("stop_reason", "stop_reason"), ("error", "error_message"))
    for field, name in fields:
        value_a = getattr(assistant_a, name, None)
        value_b = getattr(assistant_b, name, None)
        if value_a != value_b:
            changes.append(
                FieldChange(field=field, path=f"output.{name}", kind="changed", a=value_a, b=value_b)
            )
    model_a = None if assistant_a is None else f"{assistant_a.provider}/{assistant_a.model}"
    model_b = None if assistant_b is None else f"{assistant_b.provider}/{assistant_b.model}"
    if model_a != model_b:
        incidental.append(
            FieldChange(field="model", path="output.model", kind="changed", a=model_a, b=model_b)
        )


def _thinking(message: AgentMessage | None) -> str:
    if message is None or isinstance(message, ExtensionMessage):
        return ""
    return _blocks_text(message.content, ThinkingContent)


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}


def _compare_calls(
    calls_a: list[ToolCall],
    calls_b: list[ToolCall],
    changes: list[FieldChange],
    incidental: list[FieldChange],
) -> None:
    for index in range(max(len(calls_a), len(calls_b))):
        path = f"tool_calls[{index}]"
        if index >= len(calls_b):
            changes.append(
                FieldChange(field="tool_call", path=path, kind="removed", a=_call_json(calls_a[index]))
            )
            continue
        if index >= len(calls_a):
            changes.append(
                FieldChange(field="tool_call", path=path, kind="added", b=_call_json(calls_b[index]))
            )
            continue
        call_a, call_b = calls_a[index], calls_b[index]
        if call_a.name != call_b.name:
            changes.append(
                FieldChange(
                    field="tool_call", path=f"{path}.name", kind="changed", a=call_a.name, b=call_b.name
                )
            )
        changes.extend(_json_changes("tool_call", f"{path}.arguments", call_a.arguments, call_b.arguments))
        if call_a.id != call_b.id:
            incidental.append(
                FieldChange(field="tool_call_id", path=f"{path}.id", kind="changed", a=call_a.id, b=call_b.id)
            )


def _results_in_call_order(
    results: list[ToolResultMessage], reply: AgentMessage | None
) -> list[ToolResultMessage]:
    """A turn's tool `results` in the order of its `reply`'s calls (tools may end in any
    order); a result of no call of the turn comes last, in recorded order."""
    rank = {call.id: index for index, call in enumerate(_tool_calls(reply))}
    return sorted(results, key=lambda message: rank.get(message.tool_call_id, len(rank)))


def _result_json(result: ToolResultMessage) -> dict[str, Any]:
    return {
        "tool_call_id": result.tool_call_id,
        "tool_name": result.tool_name,
        "content": _blocks_text(result.content, TextContent),
        "is_error": result.is_error,
    }


def _compare_tool_results(
    a: _Step, b: _Step, changes: list[FieldChange], incidental: list[FieldChange]
) -> None:
    results_a, results_b = a.results, b.results
    for index in range(max(len(results_a), len(results_b))):
        path = f"tool_results[{index}]"
        if index >= len(results_b):
            changes.append(
                FieldChange(field="tool_result", path=path, kind="removed", a=_result_json(results_a[index]))
            )
            continue
        if index >= len(results_a):
            changes.append(
                FieldChange(field="tool_result", path=path, kind="added", b=_result_json(results_b[index]))
            )
            continue
        json_a, json_b = _result_json(results_a[index]), _result_json(results_b[index])
        for key in ("tool_name", "content", "is_error"):
            if json_a[key] == json_b[key]:
                continue
            if key == "content":
                changes.append(_text_change("tool_result", f"{path}.content", json_a[key], json_b[key]))
            else:
                changes.append(
                    FieldChange(
                        field="tool_result",
                        path=f"{path}.{key}",
                        kind="changed",
                        a=json_a[key],
                        b=json_b[key],
                    )
                )
        if json_a["tool_call_id"] != json_b["tool_call_id"]:
            incidental.append(
                FieldChange(
                    field="tool_call_id",
                    path=f"{path}.tool_call_id",
                    kind="changed",
                    a=json_a["tool_call_id"],
                    b=json_b["tool_call_id"],
                )
            )


# -- JSON structure ------------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{msgspec.json.encode(key).decode()}]"


def _same(a: Any, b: Any) -> bool:
    # JSON numbers compare by value (1 and 1.0 are one number); a boolean is never a number.
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return a == b
    return type(a) is type(b) and a == b


def same_json(a: Any, b: Any) -> bool:
    """Whether JSON values are equal as JSON: numbers by value, a boolean never a number
    (``True == 1`` in Python), objects whatever their keys' order, arrays item by item.
    Iterative, as `_json_changes`."""
    pending: list[tuple[Any, Any]] = [(a, b)]
    while pending:
        value_a, value_b = pending.pop()
        if isinstance(value_a, dict) and isinstance(value_b, dict):
            if value_a.keys() != value_b.keys():
                return False
            pending.extend((item, value_b[key]) for key, item in value_a.items())
        elif isinstance(value_a, list) and isinstance(value_b, list):
            if len(value_a) != len(value_b):
                return False
            pending.extend(zip(value_a, value_b, strict=True))
        elif not _same(value_a, value_b):
            return False
    return True


_MISSING: Any = object()
"""The side of a key or item that only the other side has."""


def _json_changes(field: FieldName, path: str, a: Any, b: Any) -> Iterator[FieldChange]:
    """The leaves where JSON values `a` and `b` differ, in document order: keys and
    items on one side only are added or removed, other differing values changed;
    lists compare by position. Iterative: arguments nested thousands deep must not
    hit the recursion limit."""
    pending: list[tuple[str, Any, Any]] = [(path, a, b)]
    while pending:
        where, value_a, value_b = pending.pop()
        nested: list[tuple[str, Any, Any]] = []
        if value_b is _MISSING:
            yield FieldChange(field=field, path=where, kind="removed", a=value_a)
        elif value_a is _MISSING:
            yield FieldChange(field=field, path=where, kind="added", b=value_b)
        elif isinstance(value_a, dict) and isinstance(value_b, dict):
            for key in [*value_a, *(key for key in value_b if key not in value_a)]:
                nested.append(
                    (_key_path(where, str(key)), value_a.get(key, _MISSING), value_b.get(key, _MISSING))
                )
        elif isinstance(value_a, list) and isinstance(value_b, list):
            for index in range(max(len(value_a), len(value_b))):
                item_a = value_a[index] if index < len(value_a) else _MISSING
                item_b = value_b[index] if index < len(value_b) else _MISSING
                nested.append((f"{where}[{index}]", item_a, item_b))
        elif not _same(value_a, value_b):
            if isinstance(value_a, str) and isinstance(value_b, str) and ("\n" in value_a or "\n" in value_b):
                yield _text_change(field, where, value_a, value_b)
            else:
                yield FieldChange(field=field, path=where, kind="changed", a=value_a, b=value_b)
        pending.extend(reversed(nested))
