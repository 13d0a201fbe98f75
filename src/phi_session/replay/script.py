"""A recorded run as a replay sees it: `RecordedTurn`s in order (`ReplayScript`).

A `RecordedTurn` knows what the model was asked (`RecordedTurn.request`) and what it
answered (`RecordedTurn.reply`: text, thinking, tool calls with their ids, usage,
stop reason) and the results of that turn's tool calls (`RecordedTurn.tool_results`).

Where the request comes from: the turn's captured request (``Turn.request_payload``,
or the loop's stored ``TurnRequest`` event of that turn) when there is one, with its
system prompt, messages and tools; otherwise system prompt and tools are unknown and
the messages are the context the model had: what the loops before this one
contribute (`Session.context_at`, the chain of ``parent_loop_id``), then this loop's
messages up to and including the turn's own inputs (its prompts and follow-ups, not
its tool results), each turn's tool results in the order of its reply's tool calls
(the order frameworks send them in, whichever ended first). The messages are in the
order they were emitted (the loop's event log): one injected during a turn after its
reply (steering while its tools run) follows that reply, among its tool results where
it was emitted, and so reaches the next turn's request, not its own.

A rebuilt context is edited as the agent edited its own, by the loop's events before
the turn (`_edit_context`): a ``PrunApplied`` hides the model's messages it names by
timestamp from the turns after it (phi-core's context pruning: with a memo, each
becomes a user message ``[Pruned context summary: MEMO]`` at its place), and an
applied ``RevertApplied`` leaves the turns after it the messages reached walking
``parentId`` back from its target, the abandoned span gone and the revert's tag
(`NodeTag`) on the target (phi-core's Composition I). A loop whose turns send the
result of an earlier loop's call (a run resuming one stopped for the call's approval)
has that result in place of the one the stopped loop holds (`_without_superseded`). A
captured request is what was sent: it is taken as it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from operator import attrgetter
from typing import NamedTuple

import msgspec
from msgspec.structs import replace

from .._checks import check_index, check_type
from ..errors import LoopNotFound, TurnNotFound
from ..events import (
    DEFAULT,
    ContinuationKind,
    MessageEnd,
    PrunApplied,
    RevertApplied,
    TurnEnd,
    TurnRequest,
    TurnStart,
)
from ..messages import (
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    NodeTag,
    TagKind,
    TextContent,
    ToolCall,
    ToolResultMessage,
    UserMessage,
    message_role,
)
from ..model import LoopRecord, Session, Turn
from .request import RequestShape

__all__ = ["HANDOFF_KEY", "REPLAY_TAG", "RecordedTurn", "ReplayScript", "deferred_result", "is_deferred"]

REPLAY_TAG = "replay"
"""The tag of a replay's loop kind: ``Rerun{"replay"}``."""
HANDOFF_KEY = "phi.handoff"
"""The ``AgentStart.metadata`` key of a loop that took over by a handoff its predecessor's
last reply does not show (a LangGraph handoff tool: the reply that called it keeps
``toolUse``, the call hands over only once it returns): the call that handed over,
``{"tool_call_id", "tool_name"}``, one of that reply's tool calls. Namespaced as
phi-session's own keys in a caller's metadata are (``"phi.session_id"``): an app's own
``"handoff"`` key is no handoff."""
_REPLAY = ContinuationKind.rerun(REPLAY_TAG)

_DEFERRED = ("[deferred: ", "]")


def deferred_result(reason: str) -> str:
    """The result recorded for a tool call the framework handed back to the caller instead
    of running it (awaiting approval, an external tool's): its call is left without a
    result in that loop, which phi-core's tool results cannot be; the run resuming it
    records the result it sends. `reason`: the framework's name for why."""
    return f"{_DEFERRED[0]}{reason}{_DEFERRED[1]}"


def is_deferred(result: ToolResultMessage) -> bool:
    """Whether `result` is a `deferred_result`: no answer the tool gave nor one the model
    was sent."""
    if result.is_error or len(result.content) != 1:
        return False
    (block,) = result.content
    return (
        type(block) is TextContent
        and block.text.startswith(_DEFERRED[0])
        and block.text.endswith(_DEFERRED[1])
    )


class SharedContext:
    """The messages the requests of a loop's turns without a captured one are rebuilt
    from, shared by those turns (each its own would make a script of n turns hold n²
    messages): the first `inherited` of `past` (what the loops before it contribute, a
    list shared along a chain, which later loops extend), then the loop's own (`own`,
    growing turn by turn)."""

    __slots__ = ("inherited", "own", "past")

    def __init__(self, past: list[AgentMessage], own: list[AgentMessage] | None = None) -> None:
        self.past = past
        self.inherited = len(past)
        self.own: list[AgentMessage] = [] if own is None else own

    def edited(self, edit: _ContextEdit) -> SharedContext:
        """The context `edit` leaves of all of this one (`_edit_context`), in a new one: the
        turns before it keep theirs."""
        kept = _edit_context(self.messages(len(self.own)), edit.event, edit.turn)
        inherited = [message for position, message in kept if position < self.inherited]
        return SharedContext(inherited, [message for position, message in kept if position >= self.inherited])

    def messages(self, end: int) -> tuple[AgentMessage, ...]:
        """The inherited messages, then the first `end` of the loop's own."""
        return (*self.past[: self.inherited], *self.own[:end])

    def last_first(self, end: int) -> Iterator[AgentMessage]:
        """`messages` of `end`, last first, as far as the caller reads them (no copy)."""
        own, past = self.own, self.past
        for index in range(end - 1, -1, -1):
            yield own[index]
        for index in range(self.inherited - 1, -1, -1):
            yield past[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SharedContext):
            return NotImplemented
        mine, theirs = self.messages(len(self.own)), other.messages(len(other.own))
        return self.inherited == other.inherited and mine == theirs

    __hash__ = None  # type: ignore[assignment]  # it grows while a script is built

    def __repr__(self) -> str:
        return f"SharedContext({self.inherited} inherited, {len(self.own)} own messages)"


class RecordedTurn(msgspec.Struct, frozen=True, kw_only=True):
    """One recorded model call: what was asked, what came back, what its tools returned.

    What was asked is its `captured` request, else rebuilt from `context`: its first
    `context_end` own messages after the inherited ones (`request` builds either)."""

    loop_id: str
    turn_index: int
    captured: RequestShape | None = None
    """The turn's captured request, if any."""
    context: SharedContext | None = None
    """Without one: the context of the turn's loop, shared by its turns."""
    context_end: int = 0
    """How many of the loop's own messages in `context` the turn's request holds."""
    inputs: tuple[AgentMessage, ...] = ()
    """The messages the turn itself added before the model call: the prompt of a first
    turn, follow-ups (as recorded, with their turn ids)."""
    reply: AssistantMessage
    """The model's answer, as recorded (its ``turn_id`` removed)."""
    tool_results: tuple[ToolResultMessage, ...] = ()
    """The results of the reply's tool calls, in the order they ended, each with its node
    in the conversation tree as its ``MessageEnd`` carried it (`_in_tree`)."""
    steering: tuple[tuple[int, AgentMessage], ...] = ()
    """The messages the turn added after the reply (steering while its tools ran), as
    recorded, each with how many of its tool results had ended before it."""
    edits: tuple[PrunApplied | RevertApplied, ...] = ()
    """The loop's edits of its context (``PrunApplied``, ``RevertApplied``) recorded since
    the turn before this one started: they edit this turn's context on, before its
    `inputs` (`_edit_context`)."""
    aborted: bool = False
    """Whether the original run failed in this turn: the last of a loop that ended
    ``Aborted`` (e.g. a tool raised), so no model call followed its tool results."""

    @property
    def request(self) -> RequestShape:
        """What the model was asked (see the module docstring); one rebuilt from `context`
        is built at each use (the turns of a loop share their messages)."""
        if self.captured is not None:
            return self.captured
        if self.context is None:
            return RequestShape()
        return RequestShape(messages=self.context.messages(self.context_end))

    def request_last_first(self) -> Iterator[AgentMessage]:
        """``request.messages``, last first, without building the request: reading what a
        request ends with costs what is read, where a rebuilt request copies the context."""
        if self.captured is not None:
            return reversed(self.captured.messages)
        if self.context is None:
            return iter(())
        return self.context.last_first(self.context_end)

    @property
    def inherited(self) -> int:
        """How many of ``request.messages`` (the first ones) came from the loops before this
        one; 0 for a captured request. A replayed request without them matches too (an
        agent run afresh, without the earlier conversation in memory)."""
        return 0 if self.captured is not None or self.context is None else self.context.inherited

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(block for block in self.reply.content if type(block) is ToolCall)

    def followed_by(self) -> list[AgentMessage]:
        """What follows the reply in the next turn's context: its tool results in the
        order of its calls (as frameworks send them), with the `steering` messages among
        them where they were emitted."""
        after: list[AgentMessage] = list(_in_call_order(self.tool_results, self.reply))
        for ended, message in reversed(self.steering):
            after.insert(ended, message)
        return after

    def result_of(self, call_id: str) -> ToolResultMessage | None:
        """The recorded result of tool call `call_id`, if it ended."""
        for result in self.tool_results:
            if result.tool_call_id == call_id:
                return result
        return None

    def input_result(self, call_id: str) -> ToolResultMessage | None:
        """The result of an earlier turn's tool call `call_id` among this turn's `inputs`:
        what a run resuming an interrupted one sends for a call that awaited approval or
        an outside answer (the approved tool's result, a denial), the latest if several."""
        found = None
        for message in self.inputs:
            if isinstance(message, ToolResultMessage) and message.tool_call_id == call_id:
                found = message
        return found

    def call_in_request(self, call_id: str) -> ToolCall | None:
        """Tool call `call_id` of a reply in this turn's request (read from its end), if any."""
        for message in self.request_last_first():
            if isinstance(message, AssistantMessage):
                for block in message.content:
                    if type(block) is ToolCall and block.id == call_id:
                        return block
        return None


_TAG_KINDS: dict[str, TagKind] = {
    "failure": "lesson",
    "tangent": "finding",
    "completion": "outcome",
    "step-summary": "checkpoint",
}
"""The `NodeTag` kind a revert of each category leaves on its target (phi-core's Composition I)."""


def _edit_context(
    messages: Sequence[AgentMessage], event: PrunApplied | RevertApplied, turn: int
) -> list[tuple[int, AgentMessage]]:
    """What the context `messages` is after `event`, recorded in turn `turn`: each message
    kept (or standing in for one) with the position in `messages` of the one it keeps.

    ``PrunApplied``: the model's messages (assistant replies, tool results) whose
    timestamp it names are gone (one a timestamp listed, the latest first), the user's
    never pruned; with a memo each becomes a user message ``[Pruned context summary:
    MEMO]`` of its timestamp, at its place (as phi-core's
    ``AgentContext::build_working_context`` renders a pruned entry).

    ``RevertApplied`` that was applied: the messages of the conversation tree are those
    reached walking ``parentId`` back from its target (the abandoned span is off that
    path), none of its ``abandoned_node_ids``; the target carries the revert's tag, of
    the kind its category gives (failure: lesson, tangent: finding, completion: outcome,
    step-summary: checkpoint), its summary as text (empty without one), created at
    `turn`. A tool result is a node too (phi-core stamps it; `RecordedTurn.tool_results`
    take their ids from their ``MessageEnd``), the next reply's parent; a message
    without a node id is in no tree: it stays, but for a tool result whose call went.
    """
    if isinstance(event, PrunApplied):
        return _pruned(messages, event)
    return _reverted(messages, event, turn)


def _pruned(messages: Sequence[AgentMessage], event: PrunApplied) -> list[tuple[int, AgentMessage]]:
    # phi-core prunes from the latest message back, one message a timestamp listed: of a
    # reply and its tool result stamped in one millisecond, the result goes.
    pruned = Counter(event.pruned_timestamps)
    kept: list[tuple[int, AgentMessage]] = []
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        if not isinstance(message, (AssistantMessage, ToolResultMessage)) or not pruned[message.timestamp]:
            kept.append((position, message))
            continue
        pruned[message.timestamp] -= 1
        if event.memo is not None:
            memo = TextContent(text=f"[Pruned context summary: {event.memo}]")
            kept.append((position, UserMessage(content=(memo,), timestamp=message.timestamp)))
    kept.reverse()
    return kept


def _reverted(
    messages: Sequence[AgentMessage], event: RevertApplied, turn: int
) -> list[tuple[int, AgentMessage]]:
    if not event.applied or event.target is None:  # refused: the context is as it was
        return list(enumerate(messages))
    nodes: dict[int, AgentMessage] = {}
    for message in messages:
        if (node_id := getattr(message, "node_id", None)) is not None:
            nodes[node_id] = message
    trunk: set[int] = set()
    step: int | None = event.target
    while step is not None and step in nodes and step not in trunk:
        trunk.add(step)
        step = getattr(nodes[step], "parent_id", None)
    abandoned = set(event.abandoned_node_ids)
    if not trunk:  # a target not in the context: only what it abandoned is gone
        trunk = set(nodes) - abandoned
    tag = NodeTag(
        kind=_TAG_KINDS[event.category],
        text=event.summary or "",
        created_at_turn=turn,
        abandoned_node_ids=event.abandoned_node_ids,
    )
    kept: list[tuple[int, AgentMessage]] = []
    dropped_calls: set[str] = set()  # a result without a node id goes with its call
    for position, message in enumerate(messages):
        node = getattr(message, "node_id", None)
        if node is not None and (node not in trunk or node in abandoned):
            if isinstance(message, AssistantMessage):
                dropped_calls.update(block.id for block in message.content if type(block) is ToolCall)
            continue
        if isinstance(message, ToolResultMessage) and node is None and message.tool_call_id in dropped_calls:
            continue
        if node == event.target and isinstance(message, (UserMessage, AssistantMessage, ToolResultMessage)):
            if not any(_same_tag(tag, other) for other in message.tags):  # a producer may have tagged it
                message = replace(message, tags=(*message.tags, tag))
        kept.append((position, message))
    return kept


def _same_tag(a: NodeTag, b: NodeTag) -> bool:
    return (a.kind, a.text, a.abandoned_node_ids) == (b.kind, b.text, b.abandoned_node_ids)


class _ContextEdit(NamedTuple):
    """A ``PrunApplied`` or ``RevertApplied`` of a loop's events: the first turn whose
    context it edits (the one after the turn it was recorded in), and that turn."""

    first_turn: int
    turn: int
    event: PrunApplied | RevertApplied


class _EventLog:
    """What a replay reads from a loop's events, in one pass: each turn's captured
    request (``TurnRequest``), how many of its inputs were emitted before its reply
    (the recorder's turn inputs are the messages other than the assistant's that end
    within the turn, in the order they end) and the edits of its context (`edits`)."""

    __slots__ = ("before_reply", "edits", "requests")

    def __init__(self, record: LoopRecord) -> None:
        self.requests: dict[int, AnnotatedRequestPayload] = {}
        self.before_reply: dict[int, int] = {}
        self.edits: list[_ContextEdit] = []
        turn: int | None = None
        started = -1  # the last turn started: an edit between turns edits the next one's
        ended = 0
        for stored in sorted(record.events, key=_SEQUENCE):
            event = stored.event
            if type(event) is PrunApplied or type(event) is RevertApplied:
                self.edits.append(_ContextEdit(started + 1, max(started, 0), event))
            elif type(event) is MessageEnd:
                if turn is not None:
                    if message_role(event.message) == "assistant":
                        self.before_reply[turn] = ended
                    else:
                        ended += 1
            elif type(event) is TurnStart:
                turn, ended, started = event.turn_index, 0, event.turn_index
            elif type(event) is TurnEnd:
                turn = None
            elif type(event) is TurnRequest:
                self.requests.setdefault(event.turn_index, event.payload)

    def request(self, turn: Turn) -> AnnotatedRequestPayload | None:
        """The captured request of `turn`, if any."""
        return turn.request_payload if turn.request_payload is not None else self.requests.get(turn.index)

    def split(self, turn: Turn) -> int:
        """How many of `turn`'s input messages came before its reply; all of them when the
        log does not say (a loop stored without its events)."""
        return min(self.before_reply.get(turn.index, len(turn.input_messages)), len(turn.input_messages))


_SEQUENCE = attrgetter("sequence")


def _own_results(turn: Turn) -> set[str]:
    ids = {m.tool_call_id for m in turn.tool_results if isinstance(m, ToolResultMessage)}
    output = turn.output_message
    if isinstance(output, AssistantMessage):
        ids.update(block.id for block in output.content if type(block) is ToolCall)
    return ids


def _without_superseded(past: list[AgentMessage], record: LoopRecord) -> list[AgentMessage]:
    """`past` (the context before `record`) without the results of the calls that
    `record`'s turns answer in their inputs: a run resuming an interrupted one sends the
    approved tool's result (or a denial, an outside answer) in place of what the
    interrupted loop holds for the call (`deferred_result`, ADK's request for
    confirmation, LangGraph's ``[interrupted]``), which the model is never sent (one
    result per call). Only the results after the last call of that id are: a model may
    give an earlier call the same id (``call_0`` in every response), whose result stands.
    `past` itself when nothing is superseded (the usual case: no copy)."""
    answered: set[str] = set()
    for turn in record.turns:
        own = _own_results(turn)
        answered.update(
            m.tool_call_id
            for m in turn.input_messages
            if isinstance(m, ToolResultMessage) and m.tool_call_id not in own
        )
    if not answered:
        return past
    last_call: dict[str, int] = {}
    for position, message in enumerate(past):
        if isinstance(message, AssistantMessage):
            for block in message.content:
                if type(block) is ToolCall and block.id in answered:
                    last_call[block.id] = position
    superseded = {
        position
        for position, message in enumerate(past)
        if isinstance(message, ToolResultMessage)
        and message.tool_call_id in answered
        and position > last_call.get(message.tool_call_id, -1)
    }
    if not superseded:
        return past
    return [message for position, message in enumerate(past) if position not in superseded]


def _in_call_order(
    results: tuple[ToolResultMessage, ...], reply: AssistantMessage
) -> tuple[ToolResultMessage, ...]:
    """`results` (recorded in the order they ended) in the order of `reply`'s tool calls,
    as frameworks send them to the model; a result of no call of `reply` keeps its
    relative place, after them."""
    order: dict[str, int] = {}
    for block in reply.content:
        if type(block) is ToolCall:
            order.setdefault(block.id, len(order))
    return tuple(sorted(results, key=lambda result: order.get(result.tool_call_id, len(order))))


def _recorded_turns(record: LoopRecord, past: list[AgentMessage]) -> Iterator[RecordedTurn]:
    """The turns of `record`, whose context is `past` (what the loops before it contribute)."""
    log = _EventLog(record)
    context = SharedContext(past)
    local = context.own
    edits = iter(log.edits)
    edit = next(edits, None)
    for turn in record.turns:
        applied: list[PrunApplied | RevertApplied] = []
        while edit is not None and edit.first_turn <= turn.index:
            context = context.edited(edit)
            local = context.own
            applied.append(edit.event)
            edit = next(edits, None)
        output = turn.output_message
        if not isinstance(output, AssistantMessage):
            raise TurnNotFound(f"turn {turn.index} of loop {record.loop_id} has no assistant reply to replay")
        own = _own_results(turn)
        split = log.split(turn)
        # phi-core's turn inputs also hold the turn's own tool results, which the model
        # had not seen when it was called.
        inputs = tuple(
            m
            for m in turn.input_messages[:split]
            if not (isinstance(m, ToolResultMessage) and m.tool_call_id in own)
        )
        steering: list[tuple[int, AgentMessage]] = []
        ended = 0
        for message in turn.input_messages[split:]:
            if isinstance(message, ToolResultMessage) and message.tool_call_id in own:
                ended += 1
            else:
                steering.append((ended, message))
        local.extend(inputs)
        payload = log.request(turn)
        recorded = RecordedTurn(
            loop_id=record.loop_id,
            turn_index=turn.index,
            captured=None if payload is None else RequestShape.from_payload(payload),
            context=context if payload is None else None,
            context_end=len(local),
            inputs=inputs,
            reply=replace(output, turn_id=None),
            tool_results=_in_tree(turn),
            steering=tuple(steering),
            edits=tuple(applied),
            aborted=record.status == "Aborted" and turn is record.turns[-1],
        )
        yield recorded
        local.append(output)
        local.extend(recorded.followed_by())


def _in_tree(turn: Turn) -> tuple[ToolResultMessage, ...]:
    """`turn`'s tool results, each with its node in the conversation tree (``nodeId``,
    ``parentId``) as its ``MessageEnd`` carried it (the turn's inputs): a ``TurnEnd``'s
    plain results carry none, and a revert walks the tree through them (the next
    reply's parent is the last result)."""
    results = tuple(m for m in turn.tool_results if isinstance(m, ToolResultMessage))
    stamped = {
        m.tool_call_id: m
        for m in turn.input_messages
        if isinstance(m, ToolResultMessage) and m.node_id is not None
    }
    if not stamped:
        return results
    return tuple(
        replace(m, node_id=stamped[m.tool_call_id].node_id, parent_id=stamped[m.tool_call_id].parent_id)
        if m.node_id is None and m.tool_call_id in stamped
        else m
        for m in results
    )


def _of_a_replay(record: LoopRecord) -> bool:
    """Whether `record` was recorded by a replay: its ``Rerun{"replay"}`` loop, or a
    handoff or later run of it (they carry its lineage's ``metadata["replay"]``)."""
    meta = record.metadata
    return record.kind == _REPLAY or (isinstance(meta, dict) and isinstance(meta.get("replay"), dict))


def _names_a_call_of(metadata: object, reply: AssistantMessage) -> bool:
    """Whether `metadata` names one of `reply`'s tool calls as the call that handed over
    (`HANDOFF_KEY`: its id and tool name)."""
    named = metadata.get(HANDOFF_KEY) if isinstance(metadata, dict) else None
    if not isinstance(named, dict):
        return False
    return any(
        type(block) is ToolCall
        and (block.id, block.name) == (named.get("tool_call_id"), named.get("tool_name"))
        for block in reply.content
    )


def _handed_over(index: Mapping[str, LoopRecord], before: str, after: str) -> bool:
    """Whether loop `after` took over from loop `before` by a handoff, within one run: it
    continues it (``Default``) and `before`'s last reply stopped with ``handoff``, or
    `after`'s metadata names a tool call of that reply as the call that handed over
    (`HANDOFF_KEY`)."""
    record, earlier = index.get(after), index.get(before)
    if record is None or earlier is None or not earlier.turns:
        return False
    if record.kind != DEFAULT or record.parent_loop_id != before:
        return False
    last = earlier.turns[-1].output_message
    if not isinstance(last, AssistantMessage):
        return False
    return last.stop_reason == "handoff" or _names_a_call_of(record.metadata, last)


def _run_to(session: Session, loop_id: str, index: Mapping[str, LoopRecord]) -> list[str]:
    """`loop_id` with the loops of its run that handed over to it, first first."""
    chain = session.context_chain_to(loop_id, index=index)
    start = len(chain) - 1
    while start > 0 and _handed_over(index, chain[start - 1], chain[start]):
        start -= 1
    return chain[start:]


class ReplayScript(msgspec.Struct, frozen=True, kw_only=True):
    """The recorded turns of one loop, or of a chain of loops, in the order they ran.

    Build with `from_session`. `session` is the recording (a replay or fork is
    recorded into it, see `phi_session.replay.lineage`); `loop_ids` the loops replayed,
    in order; `turns` their turns, in order.
    """

    session: Session
    loop_ids: tuple[str, ...]
    turns: tuple[RecordedTurn, ...]

    @classmethod
    def from_session(
        cls, session: Session, loop_id: str | None = None, *, chain: bool = False
    ) -> ReplayScript:
        """The turns of `loop_id`.

        The default is the last run of `session` that is not a replay: the loop that
        started last without being recorded by a replay (`replay_lineage`: its
        ``Rerun{"replay"}`` loop and the loops of the run that carry its metadata) and
        with turns (a compaction pass or a rejected input made no model call), with
        the loops that handed over to it within its run (an agent's handoff, a
        transfer: a ``Default`` continuation of a loop whose last reply stopped with
        ``handoff``, or one whose metadata names a tool call of that reply as the call
        that handed over, `HANDOFF_KEY`), first first. So a handoff run replays whole,
        the last run of the agent or the last fork, and a live session object that has
        since recorded replays of it (a `SessionRecorder`'s) still defaults to the run
        they replayed.
        A `loop_id` given is that loop alone.

        With `chain`, the turns of every loop whose messages make up the context of
        `loop_id` (`Session.context_chain_to`: root first), as a conversation of
        several runs replays. Raises `LoopNotFound` for a loop the session does not
        hold (or a session without loops), `TurnNotFound` for a turn without an
        assistant reply.
        """
        if not isinstance(session, Session):
            raise TypeError(f"expected a Session, got {type(session).__name__}")
        check_type("loop_id", loop_id, str, optional=True)
        picked = loop_id is None
        if loop_id is None:
            runs = [record for record in session.loops if record.turns and not _of_a_replay(record)]
            if not runs:
                raise LoopNotFound(
                    f"session {session.session_id!r} has no loop to replay "
                    "(replays do not count, nor loops without turns)"
                )
            loop_id = max(runs, key=lambda record: record.started_at.ns).loop_id
        index = session.loop_index()  # built once: every loop of a chain looks up its parents
        if loop_id not in index:
            raise LoopNotFound(f"no loop {loop_id!r} in session {session.session_id!r}")
        if chain:
            ids = session.context_chain_to(loop_id, index=index)
        else:
            ids = _run_to(session, loop_id, index) if picked else [loop_id]
        records = [record for record in map(index.get, ids) if record is not None]
        turns: list[RecordedTurn] = []
        if records:
            # Each loop's context goes on from the one before it (`ids` follow a chain):
            # what the first one's loops contribute, then each loop's own in turn.
            first = records[0]
            context = session.context_at(first.loop_id, index=index)
            past = context[: len(context) - len(first.context_messages())]
            for record in records:
                past = _without_superseded(past, record)
                turns.extend(_recorded_turns(record, past))
                past.extend(record.context_messages(most_recent=False))
        return cls(session=session, loop_ids=tuple(record.loop_id for record in records), turns=tuple(turns))

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def loop_id(self) -> str:
        """The last loop replayed (the one asked for)."""
        return self.loop_ids[-1]

    def turn(self, position: int) -> RecordedTurn:
        """The recorded turn at `position` (0-based, across the script's loops).

        Raises `TurnNotFound` when the script has no such turn, `TypeError` for a
        `position` that is no int (a bool is none)."""
        position = check_index("position", position)
        if not 0 <= position < len(self.turns):
            raise TurnNotFound(
                f"loop {self.loop_id} has no turn {position} (it has {len(self.turns)} turn(s): "
                f"0..{len(self.turns) - 1})"
                if self.turns
                else f"loop {self.loop_id} has no turns"
            )
        return self.turns[position]

    def __len__(self) -> int:
        return len(self.turns)
