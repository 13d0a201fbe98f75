"""The session model: Session -> LoopRecords -> Turns, with cross-session links.

`Session` and `LoopRecord` are mutable only so the recorder can build them; once a
loop is closed treat its record as finished. A record's collections are tuples
(lists given to it are made tuples), so a finished record cannot change under a
reader. Field order is phi-core's, so encoding gives phi-core's bytes. Extra
phi-session fields (``rejected``, ``error``) are written only when set, and phi-core
ignores them.

Garbage collection: the structs that hold a user's ``metadata`` (`Session`,
`LoopRecord`, `LoopEvent`, `events.AgentStart`) are tracked by the cyclic GC, so
metadata that refers back to its record, session or recorder is collected. The
other records are ``gc=False`` (far less GC work on large sessions), and so, once
the GC has seen them, are a record's tuples of them (all but ``events``); the free JSON
values inside messages and tool events (``arguments``, ``args``, ``details``,
``data``, ``schema``) are data: mutating one of them to refer back to a record
that holds it makes a cycle the GC cannot collect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec
from msgspec.structs import force_setattr

from ._checks import U64_MAX
from ._time import Timestamp
from .errors import LoopNotFound
from .events import (
    COMPACTION,
    INITIAL,
    AgentEvent,
    ContinuationKind,
    LoopConfigSnapshot,
    MessageEnd,
    SessionFormation,
    TurnEnd,
    TurnStart,
    TurnTrigger,
)
from .messages import (
    U32,
    U64,
    ZERO_USAGE,
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    ToolResultMessage,
    TurnId,
    Usage,
)

__all__ = [
    "ChildLoopRef",
    "CompactedSection",
    "CompactionBlock",
    "CutOffTurn",
    "LoopConfigSnapshot",
    "LoopEvent",
    "LoopRecord",
    "LoopStatus",
    "ModelCall",
    "ParallelGroupRecord",
    "Session",
    "SessionEvent",
    "SessionFormation",
    "SessionScope",
    "SpawnRef",
    "Turn",
    "TurnId",
    "TurnRange",
    "counted_total",
    "counted_usage",
    "is_replayed",
    "mark_replayed",
    "prompt_tokens",
    "uncached_input",
    "without_provider",
]

_T = TypeVar("_T")

LoopStatus = Literal["Pending", "Running", "Completed", "Rejected", "Aborted"]
SessionScope = Literal["ephemeral", "persistent"]


class _Record(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    pass


class ChildLoopRef(_Record, frozen=True):
    """Outbound link from a loop to a sub-agent loop it spawned in another session."""

    tool_call_id: str
    tool_name: str
    child_loop_id: str
    child_session_id: str


class SpawnRef(_Record, frozen=True):
    """Inbound link on a sub-agent's session: which loop and tool call spawned it."""

    parent_session_id: str
    parent_loop_id: str
    tool_call_id: str
    tool_name: str


class ParallelGroupRecord(_Record, frozen=True):
    """A loop's membership in a parallel evaluation group."""

    all_loop_ids: tuple[str, ...]
    selected_loop_id: str
    selected_config_index: U64
    evaluation_usage: Usage
    is_selected: bool


class LoopEvent(_Record, frozen=True, gc=True):  # may hold an AgentStart (metadata)
    """One stored event and its per-loop sequence number."""

    sequence: U64
    event: AgentEvent


class Turn(_Record, omit_defaults=True, frozen=True):
    """One model call and the tool executions that followed it."""

    turn_id: TurnId
    triggered_by: TurnTrigger | Literal["FollowUp"]
    usage: Usage
    input_messages: tuple[AgentMessage, ...]
    output_message: AgentMessage
    tool_results: tuple[AgentMessage, ...]
    started_at: Timestamp
    ended_at: Timestamp
    request_payload: AnnotatedRequestPayload | None = None

    def __post_init__(self) -> None:
        if self.triggered_by == "FollowUp":
            force_setattr(self, "triggered_by", "Continuation")

    @property
    def index(self) -> int:
        return self.turn_id.turn_index

    def duration(self) -> float:
        """Seconds from the turn's start to its end."""
        return self.ended_at - self.started_at

    def has_tool_calls(self) -> bool:
        return bool(self.tool_results)

    def all_messages(self) -> list[AgentMessage]:
        """Inputs, then the output, then the tool results."""
        return [*self.input_messages, self.output_message, *self.tool_results]


class TurnRange(_Record, rename="camel", frozen=True):
    """Inclusive range of turn indices."""

    start_turn: U32
    end_turn: U32


class CompactedSection(_Record, frozen=True):
    range: TurnRange
    messages: tuple[AgentMessage, ...]


class CompactionBlock(
    _Record, omit_defaults=True, kw_only=True, rename={"created_at": "createdAt"}, frozen=True
):
    """A non-destructive compaction overlay on a loop's messages."""

    keep_first: TurnRange | None = None
    keep_recent: CompactedSection | None = None
    keep_compacted: CompactedSection | None = None
    created_at: Timestamp


_NS_PER_MS = 1_000_000


class ModelCall(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One model call of a loop (an assistant reply that reported usage): when it started,
    in milliseconds since the Unix epoch, and its token counts (`Usage`'s fields).

    Cost prices a loop call by call, because a price can depend on one request's
    input tokens (tiered prices), on its time and on the model that served it
    (`served_by`). Stored beside each loop by the SQL stores as a compact JSON array,
    so totals price calls without reading records.
    """

    started_ms: int
    input: int
    output: int
    reasoning: int
    cache_read: int
    cache_write: int
    total_tokens: int
    served_by: tuple[str, str] | None = None
    """The ``(provider, model)`` its reply names when not the loop config's (a fallback
    model, a router, a loop without a config); None: the loop config's model. Last, so
    the calls stored before it decode (and older readers ignore it)."""

    @classmethod
    def of(cls, started_at: Timestamp, usage: Usage, served_by: tuple[str, str] | None = None) -> ModelCall:
        return cls(
            started_at.ns // _NS_PER_MS,
            usage.input,
            usage.output,
            usage.reasoning,
            usage.cache_read,
            usage.cache_write,
            usage.total_tokens,
            served_by,
        )

    @property
    def started_at(self) -> Timestamp:
        return Timestamp.from_ns(self.started_ms * _NS_PER_MS)

    @property
    def usage(self) -> Usage:
        return Usage(
            input=self.input,
            output=self.output,
            reasoning=self.reasoning,
            cache_read=self.cache_read,
            cache_write=self.cache_write,
            total_tokens=self.total_tokens,
        )


_USAGE_FIELDS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")


def served_by(reply: AgentMessage, config: LoopConfigSnapshot | None) -> tuple[str, str] | None:
    """`ModelCall.served_by` of a call whose reply is `reply`, in a loop of `config`: the
    reply's provider and model when it names a model other than the config's (None: the
    config's, or a reply that names none)."""
    if not isinstance(reply, AssistantMessage) or not reply.model:
        return None
    if config is not None and reply.model == config.model and reply.provider == config.provider:
        return None
    return (reply.provider, reply.model)


def uncached_input(usage: Usage | ModelCall) -> int:
    """The input tokens of one call that were neither read from nor written to the cache.

    phi-core's providers fill `Usage` two ways. Anthropic's (``anthropic.rs``) writes the
    uncached input apart from ``cache_read`` and ``cache_write`` and no total (0), and
    phi-session's adapters write it apart too, with a total counting the cache on top
    (``input + output + cache_read + cache_write``). phi-core's OpenAI-compatible provider
    (``openai_compat.rs``: ``input`` = ``prompt_tokens``, ``cache_read`` = ``cached_tokens``,
    total = the provider's ``prompt + completion``) and Gemini's (``google.rs``: ``input`` =
    ``promptTokenCount``, ``cache_read`` = ``cachedContentTokenCount``, total =
    ``totalTokenCount``, which adds the thoughts and tool-use prompt to input and output)
    count the cache inside ``input``, with a total counting it once. So the cache is inside
    ``input`` when the call has cached tokens, no more than its input, and a total of at
    least ``input + output`` that is not ``input + output + cache_read + cache_write``.
    (A Gemini call whose uncounted thoughts equal its cached tokens exactly cannot be told
    apart, and is read as uncached input.)
    """
    cached = usage.cache_read + usage.cache_write
    counted = usage.input + usage.output
    if (
        cached
        and cached <= usage.input
        and usage.total_tokens >= counted
        and usage.total_tokens != counted + cached
    ):
        return usage.input - cached
    return usage.input


def prompt_tokens(usage: Usage | ModelCall) -> int:
    """Every input token of one call, read from the cache, written to it or neither: what
    the GenAI conventions' ``input_tokens`` count and tiered prices go by."""
    return uncached_input(usage) + usage.cache_read + usage.cache_write


def counted_total(usage: Usage | ModelCall) -> int:
    """One call's total tokens: its own ``total_tokens``, else (phi-core's Anthropic provider
    sets none) its input, cache and output tokens (`prompt_tokens` plus ``output``, which
    holds the reasoning)."""
    return usage.total_tokens or prompt_tokens(usage) + usage.output


def counted_usage(usage: Usage, calls: Iterable[Usage | ModelCall]) -> Usage:
    """`usage`, the sum of `calls`, with a total that counts the tokens of the calls that
    reported none (`counted_total`): what listings, filters and totals show. A record's own
    ``total_tokens`` stays as recorded."""
    untotalled = sum(counted_total(call) for call in calls if not call.total_tokens)
    if not untotalled:
        return usage
    return msgspec.structs.replace(usage, total_tokens=usage.total_tokens + untotalled)


def without_provider(provider: str | None, model: str) -> str:
    """`model` without a leading ``provider/``: a LiteLLM-style id (``openai/gpt-4o``) names
    its provider first, which a record names apart."""
    prefix = f"{provider}/" if provider else None
    return model[len(prefix) :] if prefix is not None and model.startswith(prefix) else model


def is_replayed(message: AgentMessage) -> bool:
    """Whether `message` is a reply a replay served from its recording instead of calling a
    model (`phi_session.replay`): its usage is the recorded call's, which no roll-up bills
    again (`LoopRecord.billed_usage`). It says so in agent metadata of phi-session's own
    (``"phiSessionReplayed": true``), which phi-core ignores and no model is sent."""
    return getattr(message, "phi_session_replayed", False) is True  # extension messages: never


def mark_replayed(message: AssistantMessage) -> AssistantMessage:
    """`message` marked as a reply served from a recording (`is_replayed`)."""
    if message.phi_session_replayed:
        return message
    return msgspec.structs.replace(message, phi_session_replayed=True)


def _less(usage: Usage, spent: Usage) -> Usage:
    """`usage` minus `spent`, field by field, never below zero."""
    return Usage(**{name: max(0, getattr(usage, name) - getattr(spent, name)) for name in _USAGE_FIELDS})


def _turn_calls(
    turn: Turn,
    replies: list[AssistantMessage] | None,
    config: LoopConfigSnapshot | None,
    *,
    replayed: bool = False,
) -> list[ModelCall]:
    """The calls of a finished `turn` whose ``MessageEnd`` events held `replies` (None:
    unknown). Several replies whose usages add up to the turn's are a call each, the first at
    the turn's start, a later one at its own timestamp when that falls within the turn (else
    the turn's start): priced apart, each on its model and tier. Otherwise the turn is one
    call, on its output's model. A reply a replay served is none unless `replayed`."""
    if replies and len(replies) > 1 and sum((reply.usage for reply in replies), ZERO_USAGE) == turn.usage:
        start, end = turn.started_at.ns // _NS_PER_MS, turn.ended_at.ns // _NS_PER_MS
        return [
            ModelCall.of(
                turn.started_at
                if number == 0 or not start <= reply.timestamp <= end
                else Timestamp.from_ns(reply.timestamp * _NS_PER_MS),
                reply.usage,
                served_by(reply, config),
            )
            for number, reply in enumerate(replies)
            if reply.usage != ZERO_USAGE and (replayed or not is_replayed(reply))
        ]
    if turn.usage == ZERO_USAGE or (not replayed and is_replayed(turn.output_message)):
        return []
    return [ModelCall.of(turn.started_at, turn.usage, served_by(turn.output_message, config))]


class CutOffTurn(NamedTuple):
    """The turn a loop was cut off in, before its ``TurnEnd`` (`LoopRecord.cut_off_turn`)."""

    started_at: Timestamp | None
    """Its ``TurnStart`` time (None: no TurnStart came)."""
    messages: tuple[AgentMessage, ...]
    """Its messages, in the order they ended."""

    @property
    def replies(self) -> list[AssistantMessage]:
        """Its assistant replies, in order."""
        return [message for message in self.messages if type(message) is AssistantMessage]


class LoopRecord(msgspec.Struct, kw_only=True):
    """A complete record of one agent-loop execution.

    Required fields are required when decoding too; `LoopRecord.start` builds the
    record of a loop that has just begun. Lists given for ``messages``, ``turns``,
    ``events``, ``children_loop_ids`` or ``child_loop_refs`` are stored as tuples.
    """

    loop_id: str
    session_id: str
    agent_id: str
    parent_loop_id: str | None = None
    continuation_kind: ContinuationKind | None = INITIAL
    started_at: Timestamp
    ended_at: Timestamp | None = None
    status: LoopStatus
    rejection: str | None = None
    config: LoopConfigSnapshot | None = None
    messages: tuple[AgentMessage, ...]
    turns: tuple[Turn, ...] = ()
    usage: Usage
    metadata: Any = None
    events: tuple[LoopEvent, ...]
    children_loop_ids: tuple[str, ...]
    child_loop_refs: tuple[ChildLoopRef, ...]
    parallel_group: ParallelGroupRecord | None = None
    compaction_block: CompactionBlock | msgspec.UnsetType | None = msgspec.UNSET
    error: str | msgspec.UnsetType = msgspec.UNSET
    """phi-session extension: why the loop failed, when it did (ignored by phi-core)."""

    def __post_init__(self) -> None:
        # Tuples, not lists: the GC stops tracking a tuple of gc=False records once it
        # has seen it, so its full collections do not walk every message held.
        if type(self.messages) is not tuple:
            self.messages = tuple(self.messages)
        if type(self.turns) is not tuple:
            self.turns = tuple(self.turns)
        if type(self.events) is not tuple:
            self.events = tuple(self.events)
        if type(self.children_loop_ids) is not tuple:
            self.children_loop_ids = tuple(self.children_loop_ids)
        if type(self.child_loop_refs) is not tuple:
            self.child_loop_refs = tuple(self.child_loop_refs)
        if self.continuation_kind is None:  # null means Initial here (not in AgentStart)
            self.continuation_kind = INITIAL
        if self.compaction_block is None:  # "skipped when empty": null reads as absent
            self.compaction_block = msgspec.UNSET

    @classmethod
    def start(
        cls,
        *,
        loop_id: str,
        session_id: str,
        agent_id: str,
        started_at: Timestamp,
        parent_loop_id: str | None = None,
        continuation_kind: ContinuationKind = INITIAL,
        config: LoopConfigSnapshot | None = None,
        metadata: Any = None,
        status: LoopStatus = "Running",
    ) -> LoopRecord:
        """A fresh record: no events, turns or messages yet, zero usage."""
        return cls(
            loop_id=loop_id,
            session_id=session_id,
            agent_id=agent_id,
            parent_loop_id=parent_loop_id,
            continuation_kind=continuation_kind,
            started_at=started_at,
            status=status,
            config=config,
            messages=(),
            usage=ZERO_USAGE,
            metadata=metadata,
            events=(),
            children_loop_ids=(),
            child_loop_refs=(),
        )

    @property
    def kind(self) -> ContinuationKind:
        return self.continuation_kind or INITIAL

    @property
    def reruns_parent(self) -> bool:
        """Whether this loop runs its parent again from its start: a replay or a fork
        recorded by `phi_session.replay` (continuation kind ``Rerun`` or ``Branch``, and
        ``metadata["replay"]`` or ``metadata["fork"]`` set). Its messages then stand in
        for its parent's in `Session.context_at`."""
        meta = self.metadata
        return (
            self.parent_loop_id is not None
            and self.kind.kind in ("Rerun", "Branch")
            and isinstance(meta, dict)
            and (isinstance(meta.get("replay"), dict) or isinstance(meta.get("fork"), dict))
        )

    def get_turn(self, turn_index: int) -> Turn | None:
        """The turn at `turn_index`, or None."""
        if 0 <= turn_index < len(self.turns):
            return self.turns[turn_index]
        return None

    def turn_count(self) -> int:
        return len(self.turns)

    def conversation(self) -> Sequence[AgentMessage]:
        """What was said in the loop: its ``messages``; for a loop that never ended (aborted,
        running), which phi-core leaves without them (they come with ``AgentEnd``), the
        messages of its stored ``MessageEnd`` events, in order."""
        if self.messages:
            return self.messages
        return [message for _, message in self._said_in_events()]

    def conversation_turns(self) -> Iterator[tuple[int | None, AgentMessage]]:
        """Each message of `conversation` with the index of the turn it was said in (None:
        outside any turn, as a loop's first prompt is): its ``turnId``'s."""
        if self.messages:
            return ((_turn_index_of(message), message) for message in self.messages)
        return self._said_in_events()

    def _said_in_events(self) -> Iterator[tuple[int | None, AgentMessage]]:
        # phi-core writes a MessageEnd's message without its turnId, which it gives a
        # reply and a tool result only when AgentEnd lists them: those take the turn
        # their events are in (between its TurnStart and TurnEnd), a prompt none.
        turn: int | None = None
        for stored in self.events:
            event = stored.event
            if type(event) is TurnStart:
                turn = event.turn_index
            elif type(event) is TurnEnd:
                turn = None
            elif type(event) is MessageEnd:
                message = event.message
                index = _turn_index_of(message)
                if index is None and isinstance(message, (AssistantMessage, ToolResultMessage)):
                    index = turn
                yield index, message

    def tool_call_count(self) -> int:
        return sum(len(turn.tool_results) for turn in self.turns)

    def last_seen(self) -> Timestamp:
        """When the loop was last seen: its end; for one that never ended (aborted, or running
        when saved: phi-core leaves its ``ended_at`` null), its last recorded event's time."""
        if self.ended_at is not None:
            return self.ended_at
        stamps = (getattr(stored.event, "timestamp", None) for stored in self.events)
        return max([self.started_at, *(stamp for stamp in stamps if isinstance(stamp, Timestamp))])

    def unfinished_usage(self) -> Usage:
        """The billed usage of the turn a loop without ``AgentEnd`` was cut off in (zero for the others).

        phi-core leaves a loop that never got its ``AgentEnd`` (aborted by ``flush``:
        a stream cut off, a process killed and its journal replayed; or still
        running) with zero ``usage`` and drops its unfinished turn, yet the model
        calls of that turn happened and were billed. Its event log still holds them:
        this is the usage of the assistant messages whose ``MessageEnd`` it holds
        after its last ``TurnEnd``, but for replies a replay served (`is_replayed`).
        Derived from the log, so the record keeps phi-core's bytes. Zero for a loop
        that reports its usage (`reports_usage`).
        """
        total = ZERO_USAGE
        if self.reports_usage():
            return total
        for reply in self.cut_off_turn().replies:
            if not is_replayed(reply):
                total = total + reply.usage
        return total

    def cut_off_turn(self) -> CutOffTurn:
        """What the loop's events hold after its last ``TurnEnd``: for a loop cut off before
        ``AgentEnd`` (`reports_usage` false), the turn it was cut off in, which phi-core
        drops from its ``turns``. Its ``TurnStart`` time and its messages (those of its
        ``MessageEnd`` events: a first turn's prompts too, as a finished turn's inputs hold
        them), in order."""
        messages: list[AgentMessage] = []
        turn_start: Timestamp | None = None
        for stored in reversed(self.events):
            event = stored.event
            if type(event) is TurnEnd:
                break
            if type(event) is TurnStart and turn_start is None:
                turn_start = event.timestamp
            elif type(event) is MessageEnd:
                messages.append(event.message)
        messages.reverse()
        return CutOffTurn(turn_start, tuple(messages))

    def reports_usage(self) -> bool:
        """Whether ``usage`` counts the loop's calls: it was closed by ``AgentEnd``
        (``ended_at`` set, or Completed/Rejected) or its usage is not zero."""
        return (
            self.ended_at is not None or self.status in ("Completed", "Rejected") or self.usage != ZERO_USAGE
        )

    def reported_usage(self) -> Usage:
        """Every token the loop's replies reported, the replayed ones' included: what two
        runs compare (`phi_session.diff`), a replay reporting its recording's usage.

        A loop that reports its usage (`reports_usage`): its ``usage``. A loop
        without ``AgentEnd``, whose ``usage`` phi-core leaves at zero: its finished
        turns' usage plus that of the replies of the turn it was cut off in.
        """
        if self.reports_usage():
            return self.usage
        total = ZERO_USAGE
        for turn in self.turns:
            total = total + turn.usage
        for reply in self.cut_off_turn().replies:
            total = total + reply.usage
        return total

    def counted_reported_usage(self) -> Usage:
        """`reported_usage` with a total that counts each reply that reported none, a
        replay's included (`counted_usage`, as `billed_usage` counts the billed ones): what
        two runs compare (`phi_session.diff`)."""
        replayed: list[ModelCall] = [
            call
            for turn in self.turns
            if is_replayed(turn.output_message)
            for call in self.turn_calls(turn, replayed=True)
        ]
        cut_off = [reply.usage for reply in self.cut_off_turn().replies if is_replayed(reply)]
        return counted_usage(self.reported_usage(), [*self.model_calls(), *replayed, *cut_off])

    def replayed_usage(self) -> Usage:
        """The usage of the replies a replay served from its recording (`is_replayed`): no
        model was called for them, the recorded call was billed where it was recorded.
        Those of the turn the loop was cut off in count too, whether or not an ``AgentEnd``
        came after it (one an OTLP ingest makes up reports them, as `reported_usage` does)."""
        total = ZERO_USAGE
        for turn in self.turns:
            if is_replayed(turn.output_message):
                total = total + turn.usage
        for reply in self.cut_off_turn().replies:
            if is_replayed(reply):
                total = total + reply.usage
        return total

    def billed_usage(self) -> Usage:
        """Every token the loop's model calls reported: what every roll-up counts.

        `reported_usage` without `replayed_usage` (a replay's served turns called no
        model; a loop reporting less than they did bills zero, never below). A loop
        without ``AgentEnd`` thus counts its finished turns and `unfinished_usage`.
        Summaries, `Session.billed_usage`, the stores' totals and cost all count this,
        so a cut-off stream is never under-billed and a replay never billed twice. Its
        ``total_tokens`` also counts the tokens of the calls that reported no total
        (`counted_usage`: phi-core's Anthropic provider sets none).
        """
        billed = self.billed_as_reported()
        if self._calls_all_totalled(billed):
            return billed  # no call to count again: spares `model_calls`' scan of the events
        return counted_usage(billed, self.model_calls())

    def _calls_all_totalled(self, billed: Usage) -> bool:
        """Whether every call `model_calls` makes of this loop reported a total, told from its
        turns alone: a loop reporting its usage whose turns are each one reply (their output's
        usage is the turn's) with a total or none, and add up to `billed` (no rest call)."""
        if not self.reports_usage():
            return False
        total = ZERO_USAGE
        for turn in self.turns:
            output = turn.output_message
            if turn.usage == ZERO_USAGE:
                continue
            if type(output) is not AssistantMessage or output.usage != turn.usage:
                return False
            if not is_replayed(output):
                if not turn.usage.total_tokens:
                    return False
                total = total + turn.usage
        return total == billed

    def billed_as_reported(self) -> Usage:
        """`billed_usage` with the total the calls reported: what `model_calls` splits, and
        what an export carries (the record's own figures)."""
        reported = self.reported_usage()
        replayed = self.replayed_usage()
        return reported if replayed == ZERO_USAGE else _less(reported, replayed)

    def model_calls(self) -> list[ModelCall]:
        """The loop's model calls with tokens, each with when it started: what cost prices,
        one call at a time. Their usages add up to `billed_usage` (its total as reported).

        Each call names the model that served it when its reply names another than the
        loop config's (`ModelCall.served_by`).
        Each assistant reply of a finished turn is one call (`turn_calls`: a turn may hold
        several, an errored reply and a fallback's); a reply a replay served is none
        (`is_replayed`). A loop cut off before ``AgentEnd`` adds
        each assistant ``MessageEnd`` of the turn it was cut off in (`unfinished_usage`),
        at that turn's ``TurnStart`` (the loop's start without one). A loop that reports
        more usage than its turns (a reply whose turn never ended, an adapter's own
        total) adds the difference as one call at its start; one whose turns report
        more than its billed usage cannot be split: that usage is then one call at its
        start, unless the billed counts that fall short are saturated (2**64 - 1).
        """
        config = self.config
        replies = self._turn_replies()
        calls = [
            call
            for position, turn in enumerate(self.turns)
            for call in _turn_calls(turn, None if replies is None else replies[position], config)
        ]
        if not self.reports_usage():
            cut_off = self.cut_off_turn()  # what `unfinished_usage` sums
            started_at = self.started_at if cut_off.started_at is None else cut_off.started_at
            calls += [
                ModelCall.of(started_at, reply.usage, served_by(reply, config))
                for reply in cut_off.replies
                if reply.usage != ZERO_USAGE and not is_replayed(reply)
            ]
            return calls
        billed = self.billed_as_reported()
        rest = [getattr(billed, name) for name in _USAGE_FIELDS]
        for call in calls:
            rest = [left - getattr(call, name) for left, name in zip(rest, _USAGE_FIELDS, strict=True)]
        # Turns reporting more than the loop cannot be split, unless only saturation explains
        # it: phi-core's loop counters stop at 2**64 - 1 where their turns' sum goes on.
        short = (
            value < 0 and getattr(billed, name) != U64_MAX
            for value, name in zip(rest, _USAGE_FIELDS, strict=True)
        )
        if any(short):
            return [ModelCall.of(self.started_at, billed)] if billed != ZERO_USAGE else []
        rest = [max(0, value) for value in rest]
        if any(rest):
            calls.append(ModelCall(self.started_at.ns // _NS_PER_MS, *rest))
        return calls

    def turn_calls(self, turn: Turn, *, replayed: bool = False) -> list[ModelCall]:
        """The model calls with tokens of `turn`, one of the loop's finished turns: one per
        assistant reply its ``MessageEnd`` events hold (each with its usage and model), or
        the turn as one call when its events do not account for its usage. A reply a replay
        served is none (it called no model) unless `replayed`."""
        output = turn.output_message
        if type(output) is AssistantMessage and output.usage == turn.usage:
            # its one reply's (no scan of the events)
            return _turn_calls(turn, None, self.config, replayed=replayed)
        replies = self._turn_replies()
        for position, candidate in enumerate(self.turns):
            if candidate is turn:
                found = None if replies is None else replies[position]
                return _turn_calls(turn, found, self.config, replayed=replayed)
        return _turn_calls(turn, None, self.config, replayed=replayed)

    def turn_usage(self, turn: Turn) -> Usage:
        """`turn`'s usage with a total that counts each of its replies that reported none
        (`counted_usage` over `turn_calls`, a replayed reply's included): what a turn shows
        and two runs compare. Its recorded ``usage`` sums its replies' totals as reported."""
        return counted_usage(turn.usage, self.turn_calls(turn, replayed=True))

    def _turn_replies(self) -> list[list[AssistantMessage]] | None:
        """The assistant replies of each finished turn, from the ``MessageEnd`` events between
        its ``TurnStart`` and ``TurnEnd`` (the recorder's pairing: a TurnStart again drops an
        attempt, a TurnEnd without one makes no turn); None when they do not pair with
        ``turns`` (a record without its events)."""
        out: list[list[AssistantMessage]] = []
        pending: list[AssistantMessage] | None = None
        for stored in self.events:
            event = stored.event
            if type(event) is TurnStart:
                pending = []
            elif type(event) is MessageEnd:
                if pending is not None and type(event.message) is AssistantMessage:
                    pending.append(event.message)
            elif type(event) is TurnEnd and pending is not None:
                out.append(pending)
                pending = None
        return out if len(out) == len(self.turns) else None

    def context_messages(self, *, most_recent: bool = True) -> list[AgentMessage]:
        """The messages this loop contributes to a resumed context.

        Without a compaction block, its own ``messages``. With one, the block
        stands in for them, as phi-core's context loader reads it: for the most
        recent loop of the chain, the ``keep_first`` part of its messages, the
        compacted summary, then the recent section; for an earlier loop
        (`most_recent` false) only the compacted summary.

        ``keep_first`` counts message groups as phi-core does: consecutive messages
        of one turn are a group, a message without a turn id (the prompt) is one of
        its own; the range takes the groups at those positions (none when it reaches
        past the last).
        """
        block = self.compaction_block
        if not isinstance(block, CompactionBlock):
            return list(self.messages)
        if not most_recent:
            return list(block.keep_compacted.messages) if block.keep_compacted is not None else []
        out: list[AgentMessage] = []
        if block.keep_first is not None:
            groups = _message_groups(self.messages)
            first, last = block.keep_first.start_turn, block.keep_first.end_turn
            if first < len(groups) and last < len(groups):
                out.extend(self.messages[groups[first][0] : groups[last][1] + 1])
        for section in (block.keep_compacted, block.keep_recent):
            if section is not None:
                out.extend(section.messages)
        return out


def _turn_index_of(message: AgentMessage) -> int | None:
    """The index of the turn `message`'s ``turnId`` names (None: it has none)."""
    turn_id = getattr(message, "turn_id", None)
    return None if turn_id is None else turn_id.turn_index


def _message_groups(messages: Sequence[AgentMessage]) -> list[tuple[int, int]]:
    """``(first, last)`` positions of each group of `messages` (`context_messages`)."""
    groups: list[tuple[int, int]] = []
    current: int | None = None
    for position, message in enumerate(messages):
        turn_index = _turn_index_of(message)
        if turn_index is not None and turn_index == current:
            groups[-1] = (groups[-1][0], position)
        else:
            groups.append((position, position))
        current = turn_index
    return groups


def keep_links(replaced: LoopRecord, winner: LoopRecord) -> LoopRecord:
    """`winner`, a version of `replaced`'s loop taking its place (a store's merge, a loop
    sent again), with the links only `replaced` has (``children_loop_ids``,
    ``child_loop_refs``, ``parallel_group``): a version made before a link was added, or
    by a producer that did not see it, must not remove it."""
    children = _union(winner.children_loop_ids, replaced.children_loop_ids)
    refs = _union(winner.child_loop_refs, replaced.child_loop_refs)
    group = winner.parallel_group if winner.parallel_group is not None else replaced.parallel_group
    if (
        len(children) == len(winner.children_loop_ids)
        and len(refs) == len(winner.child_loop_refs)
        and group is winner.parallel_group
    ):
        return winner
    return msgspec.structs.replace(
        winner, children_loop_ids=children, child_loop_refs=refs, parallel_group=group
    )


class RecordMark(NamedTuple):
    """What tells a record from the other records of its loop id (phi-core reuses ids: a
    compaction pass takes its loop's), whichever save or drain holds it: one home for a
    store's merge and `OtelExportSink`, small enough for a sink to keep of what it sent."""

    started_at: int
    """Its start (ns), which the loop saved or sent again keeps (a later snapshot, an amendment)."""
    compaction: bool
    """Whether it is a compaction pass, as its AgentStart says: a pass may start at its
    loop's very instant (a clock of ms), yet is never that loop's record."""
    ended_at: int | None
    """A compaction pass's end (ns), once it has one: two passes may start at one instant too."""
    running: bool
    """Whether it is a snapshot of a record still running (``Running``, ``Pending``): its
    end is yet to come, where a pass cut short (``Aborted``) has none for good."""

    @classmethod
    def of(cls, record: LoopRecord) -> RecordMark:
        compaction = record.kind == COMPACTION
        ended = record.ended_at
        return cls(
            record.started_at.ns,
            compaction,
            ended.ns if compaction and ended is not None else None,
            record.status in ("Running", "Pending"),
        )

    def position_in(self, marks: Sequence[RecordMark]) -> int | None:
        """The position of the first of `marks` marking this record, or None: the same start
        and kind and, for a compaction pass, the same end (or neither has one); else, if
        either is a running snapshot, any end (it has yet to reach its own). So a pass cut
        short (``Aborted``, no end) is never taken for a finished pass started at its instant."""
        alike = [
            n
            for n, mark in enumerate(marks)
            if mark.started_at == self.started_at and mark.compaction == self.compaction
        ]
        for n in alike:
            if marks[n].ended_at == self.ended_at:
                return n
        for n in alike:
            if self.running or marks[n].running:
                return n
        return None


def _union(kept: tuple[_T, ...], extra: tuple[_T, ...]) -> tuple[_T, ...]:
    return kept + tuple(item for item in extra if item not in kept)


class SessionEvent(NamedTuple):
    """One stored event of a session, as `Session.iter_events` yields it."""

    loop: LoopRecord | None
    """The loop it belongs to; None for a session-scoped event (ParallelLoopStart/End)."""
    sequence: int | None
    """Its per-loop sequence number; None for a session-scoped event."""
    event: AgentEvent


class Session(msgspec.Struct, kw_only=True):
    """All the loops recorded for one ``session_id``."""

    session_id: str
    agent_id: str
    created_at: Timestamp
    last_active_at: Timestamp
    formation: SessionFormation
    parent_spawn_ref: SpawnRef | None = None
    scope: SessionScope = "ephemeral"
    loops: list[LoopRecord]
    rejected: bool | msgspec.UnsetType = msgspec.UNSET
    """phi-session extension: ``before_task`` rejected the session (written only when true)."""
    session_events: list[AgentEvent] | msgspec.UnsetType = msgspec.UNSET
    """phi-session extension, opt-in: session-scoped events (ParallelLoopStart/End)."""

    def __post_init__(self) -> None:
        if self.rejected is False:
            self.rejected = msgspec.UNSET

    @property
    def is_rejected(self) -> bool:
        return self.rejected is True

    def get_loop(self, loop_id: str) -> LoopRecord | None:
        """The first loop with `loop_id`, or None."""
        for record in self.loops:
            if record.loop_id == loop_id:
                return record
        return None

    def loop_index(self) -> dict[str, LoopRecord]:
        """Each loop id's first loop (the one `get_loop` finds), in one pass: for looking up
        many loops (walking a chain of parents) without scanning the loops for each. It
        does not follow the session's later changes."""
        # Built backwards so that the first loop with an id is the one that stays.
        return {record.loop_id: record for record in reversed(self.loops)}

    def root_loops(self) -> list[LoopRecord]:
        """Loops without a parent in this session (origins and sub-agent roots)."""
        ids = {record.loop_id for record in self.loops}
        return [r for r in self.loops if r.parent_loop_id is None or r.parent_loop_id not in ids]

    def children_of(self, loop_id: str) -> list[LoopRecord]:
        """Same-session children of `loop_id`, in the order they finished."""
        parent = self.get_loop(loop_id)
        if parent is None:
            return []
        wanted = set(parent.children_loop_ids)
        return [r for r in self.loops if r.loop_id in wanted]

    def parallel_siblings(self, loop_id: str) -> list[LoopRecord]:
        """Every loop of the parallel group `loop_id` belongs to (itself included)."""
        record = self.get_loop(loop_id)
        if record is None or record.parallel_group is None:
            return []
        wanted = set(record.parallel_group.all_loop_ids)
        return [r for r in self.loops if r.loop_id in wanted]

    def loop_chain_to(self, loop_id: str, *, index: Mapping[str, LoopRecord] | None = None) -> list[str]:
        """Loop ids from the root down to `loop_id`, following ``parent_loop_id``.

        Unlike phi-core, a loop that names itself (or an ancestor) as parent, as
        phi-core's compaction pass does, ends the walk instead of looping forever.
        `index`: this session's `loop_index`, to reuse over many calls.
        """
        loops = self.loop_index() if index is None else index
        chain = [loop_id]
        seen = {loop_id}
        record = loops.get(loop_id)
        while record is not None and record.parent_loop_id is not None:
            parent = record.parent_loop_id
            if parent in seen:
                break
            chain.append(parent)
            seen.add(parent)
            record = loops.get(parent)
        chain.reverse()
        return chain

    def context_chain_to(self, loop_id: str, *, index: Mapping[str, LoopRecord] | None = None) -> list[str]:
        """The loops whose messages make up `context_at(loop_id)`, root first:
        `loop_chain_to` without the loops that a later loop of the chain runs again
        from their start (`LoopRecord.reruns_parent`: a replay or a fork).
        `index`: this session's `loop_index`, to reuse over many calls."""
        loops = self.loop_index() if index is None else index
        kept: list[str] = []
        for chain_id in self.loop_chain_to(loop_id, index=loops):
            record = loops.get(chain_id)
            if record is not None and record.reruns_parent and kept and kept[-1] == record.parent_loop_id:
                kept.pop()
            kept.append(chain_id)
        return kept

    def total_usage(self) -> Usage:
        """Token usage summed over every loop's ``usage``, as phi-core's ``total_usage``
        returns it: a loop cut off before ``AgentEnd`` counts zero. `billed_usage` counts it."""
        total = ZERO_USAGE
        for record in self.loops:
            total = total + record.usage
        return total

    def billed_usage(self) -> Usage:
        """Every token the session's model calls reported (`LoopRecord.billed_usage` summed):
        unlike `total_usage`, the unfinished turns of loops cut off before ``AgentEnd`` count,
        and the turns a replay served from its recording do not."""
        total = ZERO_USAGE
        for record in self.loops:
            total = total + record.billed_usage()
        return total

    def reported_usage(self) -> Usage:
        """Every token the session's replies reported (`LoopRecord.reported_usage` summed):
        `billed_usage` with the replayed turns' recorded usage counted again."""
        total = ZERO_USAGE
        for record in self.loops:
            total = total + record.reported_usage()
        return total

    def counted_reported_usage(self) -> Usage:
        """`reported_usage` with a total that counts the replies that reported none
        (`LoopRecord.counted_reported_usage` summed): what two runs compare."""
        total = ZERO_USAGE
        for record in self.loops:
            total = total + record.counted_reported_usage()
        return total

    def iter_events(self) -> Iterator[SessionEvent]:
        """Every stored event: each loop's (in session order) by sequence, then the session-scoped ones."""
        for record in self.loops:
            for stored in sorted(record.events, key=lambda item: item.sequence):
                yield SessionEvent(record, stored.sequence, stored.event)
        if not isinstance(self.session_events, msgspec.UnsetType):
            for event in self.session_events:
                yield SessionEvent(None, None, event)

    def context_at(
        self, loop_id: str, *, index: Mapping[str, LoopRecord] | None = None
    ) -> list[AgentMessage]:
        """The ordered message history needed to resume from `loop_id`.

        Messages of every loop along `loop_chain_to(loop_id)` that this session
        holds, root first, as phi-core's ``build_context_from_session`` loads them
        (every loop in scope): a loop with a compaction block contributes the
        block instead of its own messages (`LoopRecord.context_messages`).

        The chain follows ``parent_loop_id`` only, so a rerun or a branch replaces
        what it continues only when it continues the same parent (a rerun of loop
        L continues L's parent); a rerun that continues L itself resumes after L's
        messages. A compaction pass recorded from events carries only token
        estimates, not the summaries: its session has no compaction block unless
        one was stored, and then the messages come back uncompacted.
        A replay or a fork recorded by `phi_session.replay` runs its parent again
        from its start, so it stands in for its parent (`context_chain_to`): an
        extension of phi-session's, keyed by its own metadata, that no phi-core
        stream triggers.
        `index`: this session's `loop_index`, to reuse over many calls.
        Raises `LoopNotFound` for an unknown loop.
        """
        loops = self.loop_index() if index is None else index
        if loop_id not in loops:
            raise LoopNotFound(f"no loop {loop_id!r} in session {self.session_id!r}")
        history: list[AgentMessage] = []
        for chain_id in self.context_chain_to(loop_id, index=loops):
            record = loops.get(chain_id)
            if record is not None:  # None: the parent lives in another session (sub-agent)
                history.extend(record.context_messages(most_recent=chain_id == loop_id))
        return history
