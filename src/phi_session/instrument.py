"""The instrumentation API: emit a correct phi-core event stream from any agent loop.

Wrap the parts of a hand-written agent loop in context managers (``with`` or
``async with``) and the `Tracer` emits the events phi-core's own agent would, in
phi-core's order, filling in what is tedious to get right: loop ids
(``{session_id}.{config_id}.{N}``), turn indices, timestamps from the agent's clock,
``turnId`` stamps, per-turn and per-loop usage sums, the plain tool results of
``TurnEnd``, the message list of ``AgentEnd``, sub-agent links and the session's
formation::

    tracer = Tracer(AgentSession(), sinks=[recorder], config=snapshot)
    with tracer.loop() as loop:
        loop.user("What is in notes.txt?")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                for chunk in stream:
                    reply.text_delta(chunk)
                reply.finish(tool_calls=calls, usage=usage)
            for call in turn.tool_calls:
                with turn.tool(call) as tool:
                    tool.result(run(call))

An exception escaping a scope ends it visibly failed and is re-raised: a message is
finished with ``stopReason`` ``"error"`` (``"aborted"`` on cancellation), a tool
with an error result, a turn with what it has, and the loop with an ``AgentEnd``
carrying the error (recorded as status ``Aborted`` with ``error``; phi-core still
loads the file). Recording never raises into the agent: processors fail closed and
sinks are isolated (`phi_session.processors`, `phi_session.sinks`). Using a scope
that is not running (not started, or already ended) is a programming error and
raises `InstrumentationError`; so is a streamed delta that is no ``str`` (`TypeError`).
Every other argument is checked where it enters (the scope's creation, start or
finish, never per delta): `TypeError` for a wrong type, `InvalidArgument` for a value
phi-core cannot hold (an unknown stop reason, a negative count), before anything is
emitted, so what is recorded always loads again.

Scope methods never wait and do no I/O of their own (a sink may: `JsonlSink` writes a
line per event), so coroutines call them directly; ``async with`` works like ``with``.
A loop's tool scopes may run concurrently (threads or tasks); other scopes belong to
one thread or task at a time.

How the scopes fit together (the seam a framework adapter drives from the framework's
callbacks): each scope is a small state machine, new -> running (`start`) -> ended
(`end`, or `finish`/`select`), driven only through its public methods, so a callback
maps onto one call (a model call starting: ``turn.assistant().start()``; a tool
starting: ``turn.tool(call).start()``; any failure: ``scope.end(error)``). Behind
them, no scope touches another's internals. All scopes of a loop share one
`_LoopState`, the single owner of what the loop records (it emits, reads the clock,
keeps the messages waiting for a turn and the open turn, and adds each ended turn's
messages and usage); a turn's message and tool scopes share the turn's `_TurnState`
(its assistant message, usage and tool bookkeeping); and events leave through the
tracer's `_Outlet` (processors, then sinks) only.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from operator import attrgetter
from types import FunctionType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, get_args

import msgspec
from msgspec.structs import replace

from ._checks import (
    check_choice,
    check_counts,
    check_each,
    check_index,
    check_instance,
    check_text,
    check_type,
    check_unsigned,
    check_usage,
    plain_text,
    saturated,
)
from ._owning import (
    _ARGUMENTS,
    _DETAILS,
    _METADATA,
    _own_copy,
    _Owned,
    _owned_event,
    _owned_result,
    _Sent,
    copy_failures,
)
from ._time import MAX_MILLIS, Timestamp
from .codec import (
    EVENT_CLASSES,
    check_recordable,
    not_an_event,
)
from .errors import InstrumentationError, InvalidArgument, RecordedModelError, RecordedToolError
from .events import (
    DEFAULT,
    INITIAL,
    AgentEnd,
    AgentEvent,
    AgentStart,
    CompactionEnded,
    CompactionStarted,
    ContinuationKind,
    InputRejected,
    LoopConfigSnapshot,
    MessageEnd,
    MessageStart,
    MessageUpdate,
    ParallelLoopEnd,
    ParallelLoopStart,
    ProgressMessage,
    PrunApplied,
    RevertApplied,
    RevertCategory,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    TurnEnd,
    TurnRequest,
    TurnStart,
    TurnTrigger,
    delta_builder,
)
from .identity import AgentSession, config_id_of
from .messages import (
    ZERO_USAGE,
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
    ExtensionMessage,
    StopReason,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResult,
    ToolResultMessage,
    TurnId,
    Usage,
    UserMessage,
)
from .model import mark_replayed
from .processors import Processor, ProcessorChain, Redactor, default_processors
from .sinks import FanOut, SinkLike

if TYPE_CHECKING:
    from .model import Session
    from .replay.cursor import ReplayCursor
    from .replay.lineage import ActiveLineage

__all__ = [
    "CompactionScope",
    "InstrumentationError",
    "LoopScope",
    "MessageScope",
    "ParallelGroup",
    "ToolScope",
    "Tracer",
    "TurnScope",
    "tool_failure_text",
]

_CANCELLATIONS = (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit)


_text_delta = delta_builder("Text")
_thinking_delta = delta_builder("Thinking")
_tool_call_delta = delta_builder("ToolCallDelta")


_CONTENT_TYPES: tuple[type, ...] = get_args(Content)
_STOP_REASONS = get_args(StopReason)
_TRIGGERS = get_args(TurnTrigger)
_REVERT_CATEGORIES = get_args(RevertCategory)


def _content(name: str, value: str | Sequence[Content]) -> tuple[Content, ...]:
    """Text or content blocks as blocks; `TypeError` (naming argument `name`) for others,
    and for blocks holding what phi-core cannot (`_checked_each`)."""
    if isinstance(value, str):
        return (TextContent(text=plain_text(value)),)
    if not isinstance(value, Iterable) or isinstance(value, bytes):
        raise TypeError(f"{name} must be str or a sequence of content blocks, not {type(value).__name__}")
    return _checked_each(name, check_each(name, value, _CONTENT_TYPES, "a content block"))


def _checked_each(name: str, records: tuple[_R, ...]) -> tuple[_R, ...]:
    """`records` (content blocks, tool calls), each checked by `check_recordable`."""
    for index, record in enumerate(records):
        check_recordable(name, record, index)
    return records


_R = TypeVar("_R", bound=msgspec.Struct)


def _describe(error: BaseException | str, *, qualified: bool = False) -> str:
    """`error` as recorded: ``"TimeoutError: slow"``. `qualified` (a tool's failure, which
    a replay raises again as its builtin class, `recorded_tool_error`): a class that is
    not the builtin of its name by its qualified name (``"redis.exceptions.TimeoutError:
    slow"``), so that a bare name is always the builtin's."""
    if isinstance(error, str):
        return plain_text(error)
    if isinstance(error, RecordedModelError):
        return str(error)  # a replay raising a recorded failure: recorded as the original was
    kind = type(error)
    name = kind.__name__
    if qualified and getattr(builtins, name, None) is not kind:
        name = f"{kind.__module__}.{kind.__qualname__}"
    try:
        text = str(error)
    except Exception as failure:  # the agent's own exception must stay the one it sees
        return f"{name} (str() failed: {type(failure).__name__})"
    return f"{name}: {text}" if text else name


def tool_failure_text(tool_name: str, error: BaseException | str) -> str:
    """The result text of tool `tool_name` failing with `error`, as `ToolScope.end` records
    it (an adapter recording a tool outside any turn writes the same)."""
    # A replay raising a recorded failure: recorded as the original was.
    return (
        str(error)
        if isinstance(error, RecordedToolError)
        else f"{tool_name} failed: {_describe(error, qualified=True)}"
    )


def _stop_reason(error: BaseException | str) -> StopReason:
    return "aborted" if isinstance(error, _CANCELLATIONS) else "error"


S = TypeVar("S", bound="_Scope")

logger = logging.getLogger("phi_session.instrument")

_TOOL_CUT_SHORT = "turn ended while the tool was running"

_thread_id = threading.get_ident

_NO_OUTCOME: tuple[tuple[Content, ...], Any, bool] = ((), None, False)  # an empty success

ToolFinisher = Callable[[BaseException | str | None], None]
"""Emits the end of a tool its turn cut short (see `_TurnState.close`)."""


def _started_twice(scope: _Scope) -> InstrumentationError:
    return InstrumentationError(f"{type(scope).__name__} already started")


def _delta_text(method: str, value: object) -> str:
    """A delta given to `method` that is no `str` itself, as `plain_text`; `TypeError`
    for what is no text."""
    if not isinstance(value, str):
        raise TypeError(f"{method}() takes a str, not {type(value).__name__}")
    return plain_text(value)


def _not_running(scope: _Scope) -> InstrumentationError:
    what = "already ended" if scope.ended else "not started"
    return InstrumentationError(f"{type(scope).__name__} is {what}")


class _Scope:
    """A span of the event stream: `start` emits its opening event, `end` its closing one.

    Used as a (sync or async) context manager, an exception leaving the block ends
    the scope with that error and is re-raised.

    A `start` does whatever may raise (refusals, reading the clock) before it marks the
    scope running and emits: one that raised leaves the scope new, to be started again.
    """

    # The phase (new, running, ended) as two flags, read through C-level properties:
    # adapters ask `running` before most calls, and it costs them no Python frame.
    __slots__ = ("_ended", "_running")

    def __init__(self) -> None:
        self._running = False
        self._ended = False

    def _require_new(self) -> None:
        if self._running or self._ended:
            raise _started_twice(self)

    def _close(self) -> None:
        self._running = False
        self._ended = True

    def _require_running(self) -> None:
        if not self._running:
            raise _not_running(self)

    if TYPE_CHECKING:

        @property
        def running(self) -> bool:
            """Started and not yet ended."""

        @property
        def ended(self) -> bool:
            """Ended (by `end`, `finish`, `select` or its owner)."""

    else:  # the same, read in C
        running = property(attrgetter("_running"), doc="Started and not yet ended.")
        ended = property(attrgetter("_ended"), doc="Ended (by `end`, `finish`, `select` or its owner).")

    def start(self: S) -> S:
        raise NotImplementedError

    def end(self, error: BaseException | str | None = None) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._running:
            self.end(exc)

    async def __aenter__(self: S) -> S:
        return self.start()

    async def __aexit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._running:
            self.end(exc)


# -- the state scopes share -------------------------------------------------------------------


class _Outlet:
    """Where the scopes of one `Tracer` send their events: its processors, then its sinks.

    The only part of the tracer its scopes know, as an Agents SDK span knows only its
    processor. It also fills in the ``config_id`` of the snapshots loops announce.
    """

    __slots__ = (
        "_after",
        "_checked",
        "_deliver",
        "_filled",
        "_segments",
        "_streaming",
        "copy_failures",
        "emit",
        "emit_prose",
        "owned",
        "wants_deltas",
    )

    def __init__(self, processors: ProcessorChain, fanout: FanOut) -> None:
        self.wants_deltas = fanout.wants_deltas
        self.copy_failures = copy_failures(logger)
        """Tool arguments, loop metadata, tool result details, extension message data and a
        request's tool parameters and response schema not copied as given (`_own_copy`)."""
        self.owned = _Owned(self.copy_failures)
        """The copies recorded of the agent's messages, request payloads and tools."""
        self._filled: dict[tuple[int, str], tuple[LoopConfigSnapshot, LoopConfigSnapshot]] = {}
        self._segments: dict[int, tuple[LoopConfigSnapshot, str]] = {}
        self._checked: dict[int, LoopConfigSnapshot] = {}
        self.emit: Callable[[AgentEvent], None] = _emitter(processors, fanout)
        """Run an event through the processors, then deliver it to every sink. Never raises."""
        self.emit_prose: Callable[[MessageUpdate], None] = _prose_emitter(processors, fanout, self.emit)
        """`emit` for a text or thinking delta into phi-core's empty placeholder message."""
        # The chain's redactors, by place: the last with `redact_text` holds back the end of
        # a reply's text where a secret may start (`Redactor.open_stream`), and what it
        # passes on later runs through the processors after it, as its deltas did.
        self._streaming = [(at, p) for at, p in enumerate(processors.processors) if isinstance(p, Redactor)]
        self._after = processors.run_from
        self._deliver = fanout.deliver

    def open_stream(self, placeholder: AssistantMessage) -> bool:
        """Whether the redactor holds back the end of the text and thinking streamed into
        `placeholder` (`Redactor.open_stream`), to be passed on by `release_stream`. Each
        kind keeps what it holds while the other streams: passing it on then would send a
        secret's start unredacted, its end still to come."""
        # `redact_text` read per reply, as each redactor reads it per event.
        holding = [redactor for _, redactor in self._streaming if redactor.redact_text]
        return bool(holding) and holding[-1].open_stream(placeholder)

    def release_stream(self, loop_id: str, placeholder: AssistantMessage) -> None:
        """Deliver what the redactor held back of a stream (`open_stream`), as deltas; the
        stream ends."""
        for at, redactor in self._streaming:  # the one holding it (`close_stream`: () for the others)
            try:
                deltas = redactor.close_stream(placeholder)
            except Exception:  # never raised into the agent; what it held is in the finished message
                logger.exception("the redactor could not pass on the end of a streamed reply")
                continue
            for delta in deltas:
                event = self._after(at + 1, MessageUpdate(loop_id=loop_id, message=placeholder, delta=delta))
                if event is not None:
                    self._deliver(event)

    def check_config(self, config: LoopConfigSnapshot | None, name: str = "config") -> None:
        """`check_recordable` of a loop's config snapshot (argument `name`), once per object
        (an agent's loops share theirs)."""
        if config is None or self._checked.get(id(config)) is config:
            return
        check_recordable(name, config)
        if len(self._checked) >= 64:  # configs are few; never grow without bound
            self._checked.clear()
        self._checked[id(config)] = config

    def snapshot(self, config: LoopConfigSnapshot, segment: str) -> LoopConfigSnapshot:
        """`config` with ``config_id`` filled in, as phi-core's loop does; one object per
        (config, segment), so that processors can recognize a snapshot they have seen."""
        key = (id(config), segment)
        cached = self._filled.get(key)
        if cached is None or cached[0] is not config:
            cached = (config, replace(config, config_id=segment))
            if len(self._filled) >= 64:  # configs are few; never grow without bound
                self._filled.clear()
            self._filled[key] = cached
        return cached[1]

    def segment(self, config: LoopConfigSnapshot) -> str:
        """`config_id_of(config)`, derived once per config object (a framework adapter
        starts every run of an agent with the same one)."""
        cached = self._segments.get(id(config))
        if cached is None or cached[0] is not config:
            cached = (config, config_id_of(config))
            if len(self._segments) >= 64:  # configs are few; never grow without bound
                self._segments.clear()
            self._segments[id(config)] = cached
        return cached[1]


def _emitter(processors: ProcessorChain, fanout: FanOut) -> Callable[[AgentEvent], None]:
    """`_Outlet.emit`: every event takes it, so its usual shape (one processor, the
    redactor, and one sink) runs both stages inline, with their failure isolation,
    in one call; without processors it is the delivery itself."""
    if not processors:
        return fanout.deliver
    processor, lone = processors.lone, fanout.lone
    if processor is None or lone is None:
        process, deliver = processors.process, fanout.deliver

        def emit(event: AgentEvent) -> None:
            processed = process(event)
            if processed is not None:
                deliver(processed)

        return emit
    sink, receive = lone
    passed_on, withheld, sink_failed = processors.passed_on, processors.withheld, fanout.failed
    # A processor object's own `__call__`, bound: calling the object goes through a slot
    # lookup and an argument copy on every event.
    run = processor.__call__ if isinstance(type(processor).__call__, FunctionType) else processor

    def emit_inline(event: AgentEvent) -> None:
        # Dropped events return early: an event passed on as it came takes no None test.
        try:
            processed = run(event)
        except Exception as error:
            processed = withheld(processor, event, error)
            if processed is None:
                return
        else:
            if processed is not event:
                processed = passed_on(processor, event, processed)
                if processed is None:
                    return
        try:
            receive(processed)
        except Exception as error:
            sink_failed(sink, error)

    return emit_inline


def _prose_emitter(
    processors: ProcessorChain, fanout: FanOut, emit: Callable[[AgentEvent], None]
) -> Callable[[MessageUpdate], None]:
    """`_Outlet.emit_prose`: most events of a stream are text and thinking deltas into
    phi-core's empty placeholder, which the redactor passes on as they came unless it
    redacts text (`Redactor.__call__`); with the redactor as the only processor and one
    sink, they go straight to the sink (as `emit` would deliver them)."""
    lone = fanout.lone
    redactor = processors.lone
    if type(redactor) is not Redactor or lone is None:
        return emit
    sink, receive = lone
    sink_failed = fanout.failed

    def emit_prose(event: MessageUpdate) -> None:
        if redactor.redact_text:  # read per event, as the redactor does
            emit(event)
            return
        try:
            receive(event)
        except Exception as error:
            sink_failed(sink, error)

    return emit_prose


class _LoopState:
    """One loop's state, owned here and shared by every scope of the loop.

    The loop, its turns, their messages and tools, and its compactions never touch
    each other's internals: they emit, read the clock and record through this object,
    the one owner of what the loop records (its messages and usage, the messages
    waiting for a turn, the open turn).
    """

    __slots__ = (
        "_compactions",
        "_pending",
        "_sent",
        "agent",
        "config",
        "emit",
        "lock",
        "loop_id",
        "messages",
        "millis",
        "now",
        "outlet",
        "replay",
        "replies_served",
        "scope",
        "served",
        "turn",
        "usage",
        "wants_deltas",
    )

    def __init__(
        self,
        scope: LoopScope,
        outlet: _Outlet,
        agent: AgentSession,
        loop_id: str,
        config: LoopConfigSnapshot | None,
        replay: ReplayCursor | ActiveLineage | None = None,
    ) -> None:
        self.scope: LoopScope | None = scope
        self.outlet = outlet
        self.emit = outlet.emit
        self.wants_deltas = outlet.wants_deltas
        self.agent = agent
        self.now: Callable[[], Timestamp] = agent.now
        """The agent's clock, as an event timestamp."""
        self.millis: Callable[[], int] = agent.millis
        """The agent's clock in epoch milliseconds (message timestamps)."""
        self.loop_id = loop_id
        self.config = config
        self.replay = replay
        """The replay answering the loop's model calls, if any (`Tracer.loop`)."""
        from .replay.lineage import ActiveLineage  # here: that module imports this one

        self.replies_served: Callable[[], int] = lambda: 0
        """How many recorded replies `replay` served to the loop's model calls: a block's
        cursor may answer several loops (concurrent runs), a cursor given to the loop
        itself only this one (all it served, some maybe before the loop started)."""
        if isinstance(replay, ActiveLineage):
            self.replies_served = partial(replay.served_in, loop_id)
        elif replay is not None:
            self.replies_served = lambda: replay.turns_served
        self.served = self.replies_served()
        """How many of the recorded replies served to the loop are recorded (as its replies,
        or before it started)."""
        self.lock = threading.Lock()  # guards the tool bookkeeping of the loop's turns
        self.messages: list[AgentMessage] = []
        """What ``AgentEnd`` will carry: the turns' messages and those emitted outside a turn."""
        self.usage: Usage = ZERO_USAGE
        self.turn: TurnScope | None = None
        """The turn `LoopScope.turn` opened last, until it ends."""
        self._pending: list[AgentMessage] = []  # prompts / follow-ups waiting for the next turn
        self._compactions: dict[CompactionScope, None] = {}  # running, in start order
        self._sent: _Sent | None = None  # the last request, whose copies the next one reuses

    def require_running(self) -> None:
        scope = self.scope
        if scope is None:
            raise InstrumentationError("LoopScope is already ended")
        if not scope.running:
            raise _not_running(scope)

    def detach(self) -> None:
        """The loop ended: drop the reference back to its scope, the one cycle between
        them, so that both are freed when the agent lets go (not by the collector)."""
        self.scope = None

    # -- compactions (under `lock`: one may end in another thread as the loop ends) --------

    def compaction_started(self, compaction: CompactionScope) -> None:
        self._compactions[compaction] = None

    def compaction_ending(self, compaction: CompactionScope) -> bool:
        """Whether `compaction` ends now by its own call (False: the loop ended it)."""
        return self._compactions.pop(compaction, False) is None

    def end_compactions(self, error: BaseException | str | None) -> None:
        """The loop ends: end the compactions still running first, as leaving their scopes
        would (with `error`: no ``CompactionEnded``)."""
        with self.lock:
            taken, self._compactions = list(self._compactions), {}
        for compaction in taken:
            compaction.cut_short(error)

    def user_message(self, content: str | Sequence[Content] | AgentMessage) -> AgentMessage:
        if isinstance(content, (UserMessage, AssistantMessage, ToolResultMessage, ExtensionMessage)):
            check_recordable("content", content)
            return content
        return UserMessage(content=_content("content", content), timestamp=self.millis())

    def request(self, payload: AnnotatedRequestPayload) -> AnnotatedRequestPayload:
        """`payload` as recorded: with copies of its own of what could change (`_Owned.payload`)."""
        self._sent = sent = self.outlet.owned.payload(payload, self._sent)
        return sent[2]

    def emit_message(self, message: AgentMessage) -> None:
        """A complete message: ``MessageStart`` and ``MessageEnd``."""
        emit = self.emit
        emit(MessageStart(loop_id=self.loop_id, message=message))
        emit(MessageEnd(loop_id=self.loop_id, message=message))

    # -- messages waiting for a turn --------------------------------------------------------

    def wait_for_turn(self, message: AgentMessage) -> None:
        self._pending.append(message)

    def emit_waiting(self, turn_id: TurnId | None) -> None:
        """Emit the waiting messages: prompts as they are, follow-ups stamped with the turn."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for message in pending:
            if turn_id is not None and not isinstance(message, ExtensionMessage):
                message = replace(message, turn_id=turn_id)
            self.emit_message(message)
            self.messages.append(message)

    def discard_waiting(self) -> None:
        self._pending.clear()

    # -- turns ------------------------------------------------------------------------------

    def open_turn(self, turn: TurnScope) -> None:
        if self.turn is not None:
            raise InstrumentationError(f"loop {self.loop_id} already has an open turn")
        self.turn = turn

    def close_turn(self) -> None:
        """The open turn is over: the loop may open the next one."""
        self.turn = None

    def record(self, messages: Iterable[AgentMessage], usage: Usage) -> None:
        """Add an ended turn's messages and usage to what ``AgentEnd`` will carry."""
        self.messages.extend(messages)
        self.usage = _summed(self.usage, usage)


def _summed(total: Usage, usage: Usage) -> Usage:
    """`total` + `usage`, a turn's or a loop's usage so far: each counter saturated at the
    largest phi-core holds, as no sink takes one beyond it (it would lose the ``TurnEnd``
    or ``AgentEnd`` carrying it). The first saturation is logged."""
    if total is ZERO_USAGE:
        return usage
    summed = total + usage  # `Usage.__add__` stays exact: stores sum totals past 64 bits with it
    capped = saturated(summed)
    if capped is not summed and not _saturation_logged.is_set():
        _saturation_logged.set()
        logger.warning("a turn's or loop's usage is beyond 64-bit counters: recorded saturated at 2**64 - 1")
    return capped


_saturation_logged = threading.Event()  # once per process: the limit is the same for all


class _TurnState:
    """One turn's state, owned here and shared by the turn and its message and tool scopes:
    its assistant message and usage so far, and its tools.

    Tools may start and end in other threads or tasks while the turn ends. The tool
    bookkeeping is guarded by the loop's lock (`lock`), so that each tool
    ends exactly once, by itself or cut short by the turn, and ``TurnEnd`` carries the
    result of every tool that ended. A tool registers how to cut it short when it
    starts (`tool_started`); the turn's end calls that under the lock (`close`) and
    emits the ends it returns outside the lock.
    """

    __slots__ = (
        "_ending",
        "_idle",
        "_open",
        "_waiting",
        "given",
        "lock",
        "message",
        "results",
        "scope",
        "started",
        "usage",
    )

    def __init__(self, scope: TurnScope, loop: _LoopState) -> None:
        self.scope: TurnScope | None = scope
        self.started: Timestamp | None = None
        """When the turn started (``TurnStart``): none of its tools ended earlier."""
        self.message: AssistantMessage | None = None
        """The (last) assistant message as recorded, its tool calls copies of their own."""
        self.given: AssistantMessage | None = None
        """That message as the agent gave it, with its own tool calls: what the agent gets
        back, so that changing them leaves the recorded one alone."""
        self.usage: Usage = ZERO_USAGE
        self.results: list[ToolResultMessage] = []
        # Tools started and not yet ending (a dict keeps their start order), with how
        # to cut each short; the threads of the tool ends under way (emitting), one
        # entry per end.
        self._open: dict[ToolScope, Callable[[], ToolFinisher]] = {}
        self._ending: list[int] = []
        self.lock = loop.lock
        # Built by the first `wait_idle` that has to wait: most turns never need one.
        self._idle: threading.Condition | None = None
        self._waiting = 0  # threads in `wait_idle`: without one, a tool's end notifies no one

    def require_running(self) -> None:
        scope = self.scope
        if scope is None:
            raise InstrumentationError("TurnScope is already ended")
        if not scope.running:
            raise _not_running(scope)

    def finished(self, message: AssistantMessage, given: AssistantMessage) -> None:
        """An assistant message of the turn is final: `message` as recorded, `given` as the
        agent gave it."""
        self.message = message
        self.given = given
        self.usage = _summed(self.usage, message.usage)

    def tool_started(self, tool: ToolScope, cut_short: Callable[[], ToolFinisher]) -> None:
        """Register a starting tool (holding the loop's lock); refused once the turn ended.

        `cut_short` is called, under the lock, if the turn ends while the tool runs: it
        ends the tool and returns what emits its end.
        """
        scope = self.scope
        if scope is None or not scope.running:
            self.require_running()  # raises
        self._open[tool] = cut_short

    def tool_ending(self, tool: ToolScope) -> None:
        """Note (holding the loop's lock) that `tool` has begun to end in this thread."""
        del self._open[tool]
        self._ending.append(_thread_id())

    def tool_done(self, message: ToolResultMessage | None) -> None:
        """A tool end noted by `tool_ending` or `close` is over (`message` is None if it failed)."""
        with self.lock:  # tools of one turn may finish concurrently
            if message is not None:
                self.results.append(message)
            self._ending.remove(_thread_id())
            idle = self._idle
            if self._waiting and idle is not None:  # `notify_all` is pure Python: not on every tool's end
                idle.notify_all()

    def close(self) -> Sequence[ToolFinisher]:
        """The turn ends (holding the loop's lock): drop the reference back to its scope
        (see `_LoopState.detach`) and cut short every tool still running.

        Returns what emits their ends, to run outside the lock.
        """
        self.scope = None
        cut = self._open
        if not cut:  # as usual: every tool ended already
            return ()
        self._open = {}
        finishers = []
        thread = _thread_id()
        for cut_short in cut.values():
            finishers.append(cut_short())
            self._ending.append(thread)
        return finishers

    def wait_idle(self) -> None:
        """Wait for the tool ends under way in other threads (this thread's own, as when
        a sink ends the turn during a tool's end, cannot be waited for)."""
        # Once the turn is closed no other thread adds a tool end, so none under way
        # now means none to wait for: most turns skip the lock.
        if not self._ending:
            return
        with self.lock:
            me = _thread_id()
            if not self._ending or all(thread == me for thread in self._ending):
                return
            idle = self._idle
            if idle is None:
                idle = self._idle = threading.Condition(self.lock)
            self._waiting += 1
            try:
                idle.wait_for(lambda: all(thread == me for thread in self._ending))
            finally:
                self._waiting -= 1


# -- the tracer ---------------------------------------------------------------------------------


class Tracer:
    """Emits phi-core events for an agent's loops into sinks, through processors.

    * `agent`: the identity (ids, rotation, clock); a fresh `AgentSession` by default.
    * `sinks`: where events go (`phi_session.sinks`): recorders, queues, files, callables.
    * `processors`: run on every event before any sink (`phi_session.processors`);
      then the built-in `Redactor` unless ``redact=False`` or they hold a `Redactor`
      (or pass your own as `redact`).
    * `config`: the default `LoopConfigSnapshot` of loops that do not give one.

    `emit(event)` sends a hand-built event the same way. Thread-safe. `flush()` and
    `close()` flush and close the sinks (`phi_session.sinks.Sink`); leaving a
    ``with Tracer(...)`` block closes them.
    """

    def __init__(
        self,
        agent: AgentSession | None = None,
        *,
        sinks: Iterable[SinkLike] = (),
        processors: Sequence[Processor] = (),
        redact: bool | Redactor = True,
        config: LoopConfigSnapshot | None = None,
    ) -> None:
        check_type("agent", agent, AgentSession, optional=True)
        check_type("config", config, LoopConfigSnapshot, optional=True)
        self.agent = agent if agent is not None else AgentSession()
        self.config = config
        self.fanout = FanOut(sinks)
        self.processors = default_processors(redact, processors)
        self._outlet = _Outlet(self.processors, self.fanout)
        self._outlet.check_config(config)
        self.wants_deltas = self.fanout.wants_deltas
        """Whether streaming deltas are built at all (some sink keeps them)."""
        # The identities `for_session` records into, by session id, shared with every twin
        # (`for_agent` copies this dict's reference): the session object a replay is given
        # does not hold the loops earlier replays recorded, so a new identity built from it
        # again would reuse their loop ids. One per session joined, for the tracer's life.
        self._joined: dict[str, AgentSession] = {}

    def emit(self, event: AgentEvent) -> None:
        """Run `event` through the processors, then deliver it to every sink. Never raises
        (but `TypeError` for what is not an event, and `TypeError` or `InvalidArgument` for
        one holding what phi-core cannot: `check_recordable`). Its tool arguments, metadata,
        details and message data are recorded as they are now, as the scopes record them."""
        if type(event) not in EVENT_CLASSES:
            raise not_an_event("emit()", event)
        check_recordable("event", event)
        outlet = self._outlet
        outlet.emit(_owned_event(event, outlet.owned))  # as the scopes record: the agent may change its dicts

    def for_agent(self, agent: AgentSession) -> Tracer:
        """A tracer of another identity sharing this one's processors, sinks and default
        config (a framework adapter's tracer per framework session)."""
        twin = object.__new__(type(self))  # a shallow copy, without `copy.copy`'s detour
        twin.__dict__.update(self.__dict__)
        twin.agent = agent
        return twin

    def for_session(self, session: Session) -> Tracer:
        """A tracer recording into the recorded `session` (its agent and session ids, new
        loop ids after its loops', `AgentSession.continuing`), sharing this one's
        processors, sinks, default config, clock and id factory: how a replayed or
        forked loop joins the session it came from (`phi_session.replay.Lineage.loop`).

        A session joined before (by this tracer or a twin), or the tracer's own current
        session, goes on with the identity already recording it: its loop ids continue
        after the loops recorded since (a second replay of the same `session` object),
        and continuations follow its own last loop."""
        own = self.agent
        agent = own if own.session_id == session.session_id else self._joined.get(session.session_id)
        if agent is None:  # a concurrent first join may win: its identity is the one then
            joining = AgentSession.continuing(session, clock=own.clock, id_factory=own.id_factory)
            agent = self._joined.setdefault(session.session_id, joining)
        if agent.last_loop_id is None:  # none of its own yet: it goes on from the recording's
            agent.resume_session(session)
        else:  # counters only: `session` may hold loops recorded elsewhere since (a store's copy)
            agent.resume((record.loop_id for record in session.loops), None)
        return self if agent is own else self.for_agent(agent)

    # -- scopes ---------------------------------------------------------------------------

    def loop(
        self,
        config: LoopConfigSnapshot | None = None,
        *,
        continues: str | None = None,
        kind: ContinuationKind | None = None,
        metadata: Any = None,
        config_id: str | None = None,
        replay: ReplayCursor | ActiveLineage | None = None,
    ) -> LoopScope:
        """A new loop of the agent's current session (started on ``with`` or `LoopScope.start`).

        Its loop id is allocated now, so rotate (`AgentSession.check_and_rotate`)
        before creating the loop, not between creating and starting it.

        * `config`: its snapshot (default: the tracer's); `config_id` overrides the
          loop-id segment derived from it (`phi_session.identity.config_id_of`).
        * `continues`: the loop this one continues (its ``parent_loop_id``).
        * `kind`: ``INITIAL`` for an origin (the default without `continues`),
          ``DEFAULT`` (the default with it), ``ContinuationKind.rerun(tag)``,
          ``ContinuationKind.branch(tag)`` or ``COMPACTION``. A continuation kind
          without `continues` continues the agent's last loop, as phi-core does.
        * `replay`: the `phi_session.replay.ReplayCursor` answering the loop's model
          calls, for an agent that builds its replies itself (a framework adapter's):
          each reply finished while a recorded reply the cursor served is not yet
          recorded is that one, and is marked as served
          (`phi_session.model.is_replayed`), so no roll-up bills it. An adapter gives
          the `phi_session.replay.recording_as` block it runs in (its cursors, one per
          agent of a handoff say, may be known only once they answer a call): the
          loop's replies are then those they served to model calls made where the
          loop's run runs (`phi_session.replay.lineage.calling`), not a concurrent run's.
        """
        check_type("config", config, LoopConfigSnapshot, optional=True)
        config_id = check_text("config_id", config_id, optional=True)
        config = config if config is not None else self.config
        self._outlet.check_config(config)
        kind, continues = self._lineage(kind, continues)
        segment = self._segment(config, config_id)
        agent = self.agent
        session_id, loop_id = agent.allocate_loop(segment)
        return LoopScope(
            self._outlet,
            agent,
            loop_id,
            session_id,
            config,
            segment,
            parent_loop_id=continues,
            kind=kind,
            metadata=metadata,
            replay=replay,
        )

    def parallel(
        self,
        configs: Sequence[LoopConfigSnapshot],
        *,
        continues: str | None = None,
        kind: ContinuationKind | None = None,
        metadata: Any = None,
    ) -> ParallelGroup:
        """A parallel evaluation: one branch loop per config, then a winner (`ParallelGroup`).

        The branches' loop ids are allocated in one step, so all of them belong to one
        session even while another thread rotates it.
        """
        configs = check_each("configs", configs, LoopConfigSnapshot, "LoopConfigSnapshot")
        if not configs:
            raise InvalidArgument("a parallel group needs at least one config")
        for index, config in enumerate(configs):
            self._outlet.check_config(config, f"configs[{index}]")
        kind, continues = self._lineage(kind, continues)
        agent = self.agent
        segments = [self._segment(config, None) for config in configs]
        session_id, loop_ids = agent.allocate_loops(segments)
        branches = [
            LoopScope(
                self._outlet,
                agent,
                loop_id,
                session_id,
                config,
                segment,
                parent_loop_id=continues,
                kind=kind,
                metadata=metadata,
            )
            for config, segment, loop_id in zip(configs, segments, loop_ids, strict=True)
        ]
        return ParallelGroup(self._outlet, agent, session_id, branches)

    def _lineage(
        self, kind: ContinuationKind | None, continues: str | None
    ) -> tuple[ContinuationKind, str | None]:
        check_type("kind", kind, ContinuationKind, optional=True)
        continues = check_text("continues", continues, optional=True)
        if kind is None:
            return (INITIAL if continues is None else DEFAULT), continues
        if continues is None and kind != INITIAL:
            continues = self.agent.last_loop_id
        return kind, continues

    def _segment(self, config: LoopConfigSnapshot | None, config_id: str | None) -> str:
        if config_id is not None:
            return config_id
        if config is None:
            raise InvalidArgument("a loop needs a config snapshot (here or on the Tracer) or a config_id")
        return self._outlet.segment(config)

    # -- sinks ----------------------------------------------------------------------------

    @property
    def sink_errors(self) -> dict[str, int]:
        """Failed deliveries per sink (see `FanOut.errors`)."""
        return self.fanout.errors

    @property
    def processor_failures(self) -> dict[str, int]:
        """Failures per processor; their events went on with content withheld."""
        return self.processors.failures

    @property
    def argument_failures(self) -> int:
        """Tool arguments (and loop metadata, tool result details, extension message data,
        a request's tool parameters and response schema) not recorded as given:
        holding a value or dict key JSON cannot hold or an integer beyond 64 bits (recorded
        as its ``str``), a NaN or infinity (recorded as ``"NaN"``, ``"Infinity"``,
        ``"-Infinity"``), text with lone surrogates (recorded escaped), a dict key written
        as another key's text (the later value kept), nested deeper than phi-core reads
        in a session (the deepest containers recorded as their JSON text), or
        self-referential or nested too deeply to copy (recorded as a stand-in); counted
        each time they are recorded (a call's message, then its tool's start)."""
        return self._outlet.copy_failures.total

    def flush(self) -> None:
        """Flush every sink (see `Sink.flush`). Never raises."""
        self.fanout.flush()

    def close(self) -> None:
        """Close every sink (see `Sink.close`). Never raises. An event emitted after it (a
        run still going) that a sink can no longer take is counted in `sink_errors`."""
        self.fanout.close()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the scopes -------------------------------------------------------------------------------


class LoopScope(_Scope):
    """One agent loop: ``AgentStart`` ... ``AgentEnd``. Create with `Tracer.loop`.

    `user` adds a prompt (before the first turn) or a follow-up message (between
    turns: emitted at the start of the next turn; during a turn: at once, and
    ``messages`` keep the order of emission: after the turn's reply, it follows it).
    `turn()` opens the next turn. `reject(reason)` records an input rejection;
    before the first turn it ends the loop as rejected. ``messages`` and ``usage``
    are what ``AgentEnd`` will carry.
    """

    __slots__ = (
        "_agent",
        "_loop",
        "config",
        "error",
        "first_trigger",
        "kind",
        "loop_id",
        "metadata",
        "parent_loop_id",
        "rejection",
        "segment",
        "session_id",
        "turns",
    )

    def __init__(
        self,
        outlet: _Outlet,
        agent: AgentSession,
        loop_id: str,
        session_id: str,
        config: LoopConfigSnapshot | None,
        segment: str,
        *,
        parent_loop_id: str | None,
        kind: ContinuationKind,
        metadata: Any,
        first_trigger: TurnTrigger | None = None,
        replay: ReplayCursor | ActiveLineage | None = None,
    ) -> None:
        super().__init__()
        self._agent = agent
        self._loop = _LoopState(self, outlet, agent, loop_id, config, replay)
        self.loop_id = loop_id
        self.session_id = session_id
        self.config = config
        self.segment = segment
        self.parent_loop_id = parent_loop_id
        self.kind = kind
        self.metadata = metadata
        if first_trigger is None:
            first_trigger = (
                "User" if kind == INITIAL else "Branch" if kind.kind == "Branch" else "Continuation"
            )
        self.first_trigger: TurnTrigger = first_trigger
        self.turns = 0
        self.rejection: str | None = None
        self.error: str | None = None

    @property
    def agent_id(self) -> str:
        return self._agent.agent_id

    @property
    def messages(self) -> tuple[AgentMessage, ...]:
        """The messages ``AgentEnd`` will carry, so far (a copy: the agent may build on it)."""
        return tuple(self._loop.messages)

    @property
    def usage(self) -> Usage:
        """The usage ``AgentEnd`` will carry, so far (the sum of the ended turns')."""
        return self._loop.usage

    @property
    def status(self) -> str:
        """``"pending"``, ``"running"``, ``"completed"``, ``"rejected"`` or ``"failed"``."""
        if self._running:
            return "running"
        if not self._ended:
            return "pending"
        if self.error is not None:
            return "failed"
        return "rejected" if self.rejection is not None else "completed"

    def start(self) -> LoopScope:
        """Emit ``AgentStart``. The first loop of a session carries the session's formation."""
        self._require_new()
        agent = self._agent
        at = agent.clock()
        timestamp = agent.stamp(at)
        config = self.config
        if config is not None and config.config_id is None:
            config = self._loop.outlet.snapshot(config, self.segment)
        self._running = True
        # Past all that may raise: this claims the session's formation for this loop.
        formation = agent.loop_started(self.session_id, self.loop_id, at)
        self._loop.emit(
            AgentStart(
                agent_id=agent.agent_id,
                session_id=self.session_id,
                loop_id=self.loop_id,
                parent_loop_id=self.parent_loop_id,
                continuation_kind=self.kind,
                timestamp=timestamp,
                metadata=_own_copy(self.metadata, self._loop.outlet.copy_failures, _METADATA),
                config_snapshot=config,
                formation=formation if formation is not None else msgspec.UNSET,
            )
        )
        return self

    # -- content --------------------------------------------------------------------------

    def user(self, content: str | Sequence[Content] | AgentMessage) -> AgentMessage:
        """Add a user message (text, content blocks, or a ready message). Returns the message."""
        if not self._running:
            raise _not_running(self)
        loop = self._loop
        turn = loop.turn
        if turn is not None:
            return turn.user(content)
        message = loop.user_message(content)
        loop.wait_for_turn(loop.outlet.owned.message(message))
        return message

    def turn(
        self, trigger: TurnTrigger | None = None, *, request: AnnotatedRequestPayload | None = None
    ) -> TurnScope:
        """The next turn (one model call and its tool executions).

        `trigger` defaults to phi-core's choice (``User``, ``SubAgent`` or ``Branch``
        for the first turn, depending on the loop, ``Continuation`` after);
        `request` emits the turn's ``TurnRequest`` right after its inputs; it is checked
        and copied now.
        """
        if not self._running:
            raise _not_running(self)
        check_type("request", request, AnnotatedRequestPayload, optional=True)
        if trigger is None:
            trigger = self.first_trigger if self.turns == 0 else "Continuation"
        else:
            trigger = check_choice("trigger", trigger, _TRIGGERS)
        loop = self._loop
        # Checked (and copied) here: a refused request opens no turn, so the agent may retry.
        recorded = None if request is None else loop.request(request)
        scope = TurnScope(self, loop, self.turns, trigger, recorded)
        loop.open_turn(scope)
        self.turns += 1
        return scope

    def reject(self, reason: str) -> None:
        """Record that an input filter rejected input (``InputRejected``).

        Before the first turn the initial input is what was rejected: the loop ends
        at once with ``AgentEnd`` carrying the rejection, no messages and zero usage
        (status ``Rejected``), and the waiting prompts are discarded, as in phi-core
        (a compaction still running is ended first, as `end` does). Later, the loop goes on.
        """
        self._require_running()
        reason = check_text("reason", reason)
        loop = self._loop
        loop.emit(InputRejected(loop_id=self.loop_id, reason=reason))
        if self.turns == 0:
            loop.discard_waiting()
            loop.end_compactions(None)  # a running compaction's end must not follow AgentEnd
            self.rejection = reason
            self._close()
            loop.detach()
            loop.emit(
                AgentEnd(
                    loop_id=self.loop_id,
                    messages=(),
                    usage=ZERO_USAGE,
                    timestamp=loop.now(),
                    rejection=reason,
                )
            )

    def compaction(self, estimated_tokens: int, message_count: int) -> CompactionScope:
        """A context compaction: ``CompactionStarted`` now, ``CompactionEnded`` at the end."""
        self._require_running()
        return CompactionScope(self._loop, estimated_tokens, message_count)

    def prun(
        self,
        tokens_removed: int,
        messages_removed: int,
        pruned_timestamps: Sequence[int] = (),
        memo: str | None = None,
    ) -> None:
        """Record a ``PrunApplied`` (messages pruned from the context; timestamps in epoch ms)."""
        self._require_running()
        check_unsigned("tokens_removed", tokens_removed)
        check_unsigned("messages_removed", messages_removed)
        timestamps = check_counts("pruned_timestamps", pruned_timestamps)
        memo = check_text("memo", memo, optional=True)
        loop = self._loop
        loop.emit(
            PrunApplied(
                loop_id=self.loop_id,
                tokens_removed=tokens_removed,
                messages_removed=messages_removed,
                memo=memo,
                pruned_timestamps=timestamps,
                timestamp=loop.now(),
            )
        )

    def revert(
        self,
        category: RevertCategory,
        *,
        abandoned_node_ids: Sequence[int] = (),
        applied: bool = True,
        target: int | None = None,
        summary: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Record a ``RevertApplied`` (the context rolled back to `target`)."""
        self._require_running()
        category = check_choice("category", category, _REVERT_CATEGORIES)
        node_ids = check_counts("abandoned_node_ids", abandoned_node_ids)
        check_instance("applied", applied, bool, "bool")
        check_unsigned("target", target, optional=True)
        summary = check_text("summary", summary, optional=True)
        reason = check_text("reason", reason, optional=True)
        loop = self._loop
        loop.emit(
            RevertApplied(
                loop_id=self.loop_id,
                category=category,
                target=target,
                abandoned_node_ids=node_ids,
                summary=summary,
                applied=applied,
                reason=reason,
                timestamp=loop.now(),
            )
        )

    # -- end ------------------------------------------------------------------------------

    def end(self, error: BaseException | str | None = None) -> None:
        """Emit ``AgentEnd``; with `error`, the loop is recorded as failed (status ``Aborted``).

        An open turn is ended first (with the same error); messages still waiting
        for a turn are emitted outside any turn so that none is lost.
        """
        if not self._running:
            raise _not_running(self)
        loop = self._loop
        turn = loop.turn
        if turn is not None and turn.running:
            turn.end(error if error is not None else "the loop ended while this turn was open")
        loop.end_compactions(error)
        loop.emit_waiting(None)
        self._close()
        loop.detach()
        if error is not None:
            self.error = _describe(error)
        loop.emit(
            AgentEnd(
                loop_id=self.loop_id,
                messages=tuple(loop.messages),
                usage=loop.usage,
                timestamp=loop.now(),
                error=self.error if self.error is not None else msgspec.UNSET,
            )
        )

    def __repr__(self) -> str:
        return f"LoopScope({self.loop_id!r}, {self.status})"


class TurnScope(_Scope):
    """One turn: ``TurnStart`` ... ``TurnEnd``. Create with `LoopScope.turn`."""

    __slots__ = (
        "_inputs",
        "_loop",
        "_loop_scope",
        "_message",
        "_request",
        "_steering",
        "_turn",
        "index",
        "trigger",
        "turn_id",
    )

    def __init__(
        self,
        loop_scope: LoopScope,
        loop: _LoopState,
        index: int,
        trigger: TurnTrigger,
        request: AnnotatedRequestPayload | None,
    ) -> None:
        self._running = self._ended = False  # `_Scope.__init__`, inline: one scope per turn, reply, tool
        self._loop_scope = loop_scope
        self._loop = loop
        self._turn = _TurnState(self, loop)
        self.index = index
        self.trigger: TurnTrigger = trigger
        self.turn_id = TurnId(loop_id=loop.loop_id, turn_index=index)
        self._request = request  # as recorded (`_LoopState.request`)
        self._inputs: list[AgentMessage] = []  # injected during the turn (`inputs`)
        # Of `inputs`, those injected after the turn's reply (steering while its tools
        # run), each with the reply it followed and how many tool results had ended.
        self._steering: list[tuple[AgentMessage, AssistantMessage, int]] = []
        self._message: MessageScope | None = None

    @property
    def loop(self) -> LoopScope:
        return self._loop_scope

    @property
    def message(self) -> AssistantMessage | None:
        """The turn's (last) assistant message, once finished (as `MessageScope.finish`
        returned it)."""
        return self._turn.given

    @property
    def usage(self) -> Usage:
        """The usage of the turn's finished assistant messages."""
        return self._turn.usage

    @property
    def tool_results(self) -> tuple[ToolResultMessage, ...]:
        """The results of the turn's ended tools, in the order they ended (a copy)."""
        return tuple(self._turn.results)

    @property
    def inputs(self) -> tuple[AgentMessage, ...]:
        """Messages injected during the turn (with ``turnId``), as recorded (a copy)."""
        return tuple(self._inputs)

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls of the turn's assistant message (empty before it is finished): the
        agent's own, which it may change (say, to add a credential) without changing
        what was recorded."""
        message = self._turn.given
        if message is None:
            return ()
        return tuple(block for block in message.content if type(block) is ToolCall)

    def start(self) -> TurnScope:
        """Emit ``TurnStart``, the waiting prompts or follow-ups, and the request if given."""
        if self._running or self._ended:  # `_require_new`, inline: one per turn, reply, tool
            raise _started_twice(self)
        loop = self._loop
        scope = loop.scope
        if scope is None or not scope.running:
            loop.require_running()  # raises
        start = TurnStart(
            loop_id=loop.loop_id, turn_index=self.index, timestamp=loop.now(), triggered_by=self.trigger
        )
        self._running = True
        self._turn.started = start.timestamp
        loop.emit(start)
        loop.emit_waiting(None if self.index == 0 else self.turn_id)
        if self._request is not None:
            self._emit_request(self._request)
        return self

    def user(self, content: str | Sequence[Content] | AgentMessage) -> AgentMessage:
        """Inject a message (steering / follow-up) into this turn, stamped with its ``turnId``.

        The message returned holds the tool calls (or extension data) given; the one
        recorded, copies of them (`_own_copy`)."""
        self._require_running()
        loop = self._loop
        message = loop.user_message(content)
        if not isinstance(message, ExtensionMessage):
            message = replace(message, turn_id=self.turn_id)
        recorded = loop.outlet.owned.message(message)
        loop.emit_message(recorded)
        self._inputs.append(recorded)
        turn = self._turn
        if turn.message is not None:
            self._steering.append((recorded, turn.message, len(turn.results)))
        return message

    def request(self, payload: AnnotatedRequestPayload) -> None:
        """Emit the turn's ``TurnRequest`` (the fully assembled request to the model)."""
        if not self._running:
            raise _not_running(self)
        check_type("payload", payload, AnnotatedRequestPayload)
        self._emit_request(self._loop.request(payload))

    def _emit_request(self, recorded: AnnotatedRequestPayload) -> None:
        loop = self._loop
        loop.emit(
            TurnRequest(
                loop_id=loop.loop_id,
                turn_index=self.index,
                payload=recorded,
                timestamp=loop.now(),
            )
        )

    def compaction(self, estimated_tokens: int, message_count: int) -> CompactionScope:
        """A compaction during this turn (see `LoopScope.compaction`)."""
        self._require_running()
        return CompactionScope(self._loop, estimated_tokens, message_count)

    def assistant(self, *, model: str | None = None, provider: str | None = None) -> MessageScope:
        """The model's reply: ``MessageStart`` (placeholder), deltas, ``MessageEnd``.

        `model` and `provider` default to the loop's config.
        """
        if not self._running:
            raise _not_running(self)
        if self._message is not None and self._message.running:
            raise InstrumentationError("the turn's previous assistant message is still open")
        model = check_text("model", model, optional=True)
        provider = check_text("provider", provider, optional=True)
        config = self._loop.config
        scope = MessageScope(
            self._loop,
            self._turn,
            model if model is not None else (config.model if config is not None else ""),
            provider if provider is not None else (config.provider if config is not None else ""),
        )
        self._message = scope
        return scope

    def tool(
        self,
        call: ToolCall | None = None,
        *,
        id: str | None = None,
        name: str | None = None,
        args: Any = None,
    ) -> ToolScope:
        """One tool execution, for `call` (or an explicit `id`, `name` and `args`)."""
        if not self._running:
            raise _not_running(self)
        if call is not None:
            check_type("call", call, ToolCall)
            id, name, args = call.id, call.name, call.arguments
        if id is None or name is None:
            raise TypeError("tool() needs a ToolCall or both id= and name=")
        return ToolScope(self._loop, self._turn, check_text("id", id), check_text("name", name), args)

    def end(self, error: BaseException | str | None = None) -> None:
        """Emit ``TurnEnd`` with the assistant message, the usage and the tool results.

        Open message and tool scopes are ended first (with `error`). A turn that
        never got an assistant message ends with a synthesized one (empty text,
        ``stopReason`` ``"error"``/``"aborted"`` and the reason), as phi-core does
        for a failed provider call.
        """
        loop, turn = self._loop, self._turn
        # Tools may be ending in other threads or tasks: the turn's own state and the
        # set of tools it cuts short are taken in one step under the loop's lock, so
        # each tool is ended exactly once, by itself or by the turn.
        with turn.lock:
            if not self._running:
                raise _not_running(self)
            self._running, self._ended = False, True  # `_close`, inline
            cut_short = turn.close()
        scope = self._message
        if scope is not None and scope.running:
            scope.end(error if error is not None else "the turn ended while this scope was open")
        if cut_short:
            tool_reason = _TOOL_CUT_SHORT if error is None else f"{_TOOL_CUT_SHORT} ({_describe(error)})"
            for finish in cut_short:
                finish(tool_reason)
        turn.wait_idle()
        loop.close_turn()
        message = turn.message
        if message is None:
            config = loop.config
            message = AssistantMessage(
                content=(TextContent(text=""),),
                stop_reason="aborted" if error is None else _stop_reason(error),
                model=config.model if config is not None else "",
                provider=config.provider if config is not None else "",
                usage=ZERO_USAGE,
                timestamp=loop.millis(),
                error_message=(
                    _describe(error) if error is not None else "turn ended without an assistant message"
                ),
            )
        turn_id = self.turn_id
        stamped = replace(message, turn_id=turn_id)
        results = tuple(turn.results)
        loop.emit(
            TurnEnd(
                loop_id=loop.loop_id,
                message=stamped,
                usage=turn.usage,
                timestamp=loop.now(),
                tool_results=results,
            )
        )
        stamped_results = map(partial(replace, turn_id=turn_id), results)
        if self._steering:
            loop.record(self._in_emitted_order(message, stamped, list(stamped_results)), turn.usage)
        else:
            loop.record((*self._inputs, stamped, *stamped_results), turn.usage)

    def _in_emitted_order(
        self, reply: AssistantMessage, stamped: AssistantMessage, results: list[AgentMessage]
    ) -> list[AgentMessage]:
        """The turn's messages in the order they were emitted, as phi-core's loop messages
        are: the messages injected after `reply` (`stamped`: as recorded) follow it, among
        its tool `results` where they were emitted."""
        late = [(injected, ended) for injected, after, ended in self._steering if after is reply]
        inputs = self._inputs
        for injected, ended in reversed(late):
            results.insert(ended, injected)
        return [*inputs[: len(inputs) - len(late)], stamped, *results]


class MessageScope(_Scope):
    """The assistant's reply in a turn: deltas while it streams, then `finish`.

    Without explicit content, `finish` builds it from the streamed thinking and text
    (then the given tool calls). Leaving the scope without `finish` finishes with
    what streamed; with an exception, with ``stopReason`` ``"error"`` (or
    ``"aborted"``) and the error text.
    """

    __slots__ = (
        "_deltas",
        "_emit",
        "_emit_prose",
        "_held",
        "_loop",
        "_loop_id",
        "_placeholder",
        "_text",
        "_thinking",
        "_turn",
        "message",
        "model",
        "provider",
    )

    def __init__(self, loop: _LoopState, turn: _TurnState, model: str, provider: str) -> None:
        self._running = self._ended = False  # `_Scope.__init__`, inline: one scope per turn, reply, tool
        self._loop = loop
        self._turn = turn
        self._loop_id = loop.loop_id
        self.model = model
        self.provider = provider
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._deltas = loop.wants_deltas
        self._emit = loop.emit
        self._emit_prose = loop.outlet.emit_prose
        # phi-core's empty placeholder, sent with MessageStart and every MessageUpdate.
        self._placeholder = AssistantMessage(
            content=(),
            stop_reason="stop",
            model=model,
            provider="",
            usage=ZERO_USAGE,
            timestamp=loop.millis(),
        )
        self.message: AssistantMessage | None = None
        self._held = False  # the redactor holds back the end of its text (`_Outlet.open_stream`)

    def start(self) -> MessageScope:
        """Emit ``MessageStart`` with the placeholder message."""
        if self._running or self._ended:  # `_require_new`, inline
            raise _started_twice(self)
        turn = self._turn.scope
        if turn is None or not turn.running:
            self._turn.require_running()  # raises
        self._running = True
        self._emit(MessageStart(loop_id=self._loop_id, message=self._placeholder))
        if self._deltas:
            self._held = self._loop.outlet.open_stream(self._placeholder)
        return self

    # The three delta methods run once per streamed token: each builds its event inline,
    # and refuses a piece that is no text (a stream's empty ``delta.content`` is None) at
    # once, before it reaches a sink or the message built from the pieces (text of a str
    # subclass is taken as the str it holds).
    def text_delta(self, text: str) -> None:
        """A piece of streamed answer text."""
        if not self._running:
            self._require_running()
        if type(text) is not str:
            text = _delta_text("text_delta", text)
        self._text.append(text)
        if self._deltas:
            delta = _text_delta(text)
            self._emit_prose(MessageUpdate(loop_id=self._loop_id, message=self._placeholder, delta=delta))

    def thinking_delta(self, text: str) -> None:
        """A piece of streamed reasoning."""
        if not self._running:
            self._require_running()
        if type(text) is not str:
            text = _delta_text("thinking_delta", text)
        self._thinking.append(text)
        if self._deltas:
            delta = _thinking_delta(text)
            self._emit_prose(MessageUpdate(loop_id=self._loop_id, message=self._placeholder, delta=delta))

    def tool_call_delta(self, json_fragment: str) -> None:
        """A piece of a tool call's streamed JSON arguments (pass the parsed call to `finish`)."""
        if not self._running:
            self._require_running()
        if type(json_fragment) is not str:
            json_fragment = _delta_text("tool_call_delta", json_fragment)
        if self._deltas:
            delta = _tool_call_delta(json_fragment)
            self._emit(MessageUpdate(loop_id=self._loop_id, message=self._placeholder, delta=delta))

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return "".join(self._text)

    def finish(
        self,
        content: str | Sequence[Content] | None = None,
        *,
        tool_calls: Sequence[ToolCall] | None = (),
        usage: Usage | None = None,
        stop_reason: StopReason | None = None,
        error_message: str | None = None,
        message: AssistantMessage | None = None,
    ) -> AssistantMessage:
        """Emit ``MessageEnd`` with the final message and return it.

        Give the whole `message`, or its parts: `content` (default: the streamed
        thinking and text), `tool_calls` (appended), `usage` (default zero) and
        `stop_reason` (default ``"toolUse"`` with tool calls, else ``"stop"``).

        The message returned holds the tool calls given; the one recorded, copies of
        them (`_own_copy`).
        """
        if not self._running:
            raise _not_running(self)
        if message is None:
            blocks = self._streamed() if content is None else _content("content", content)
            calls = _checked_each(
                "tool_calls", check_each("tool_calls", tool_calls or (), ToolCall, "ToolCall")
            )
            if calls:
                blocks = (*blocks, *calls)
            check_usage("usage", usage, optional=True)
            error_message = check_text("error_message", error_message, optional=True)
            if stop_reason is None:
                stop_reason = "toolUse" if calls or any(type(b) is ToolCall for b in blocks) else "stop"
            else:
                stop_reason = check_choice("stop_reason", stop_reason, _STOP_REASONS)
            message = AssistantMessage(
                content=blocks,
                stop_reason=stop_reason,
                model=self.model,
                provider=self.provider,
                usage=usage if usage is not None else ZERO_USAGE,
                timestamp=self._loop.millis(),
                error_message=error_message,
            )
        else:
            check_type("message", message, AssistantMessage)
            check_recordable("message", message)
        loop = self._loop
        if loop.replay is not None and loop.replies_served() > loop.served:
            # A recorded reply the replay served is not yet recorded: this is it. Counted
            # here, not from the turn's start: a framework may start the turn after its
            # model call returned, or finish a reply after its next model call.
            loop.served += 1
            message = mark_replayed(message)
        recorded = loop.outlet.owned.message(message)
        self._running, self._ended = False, True  # `_close`, inline
        self.message = message
        if self._held:  # the end of the streamed text, before the message it ends
            loop.outlet.release_stream(self._loop_id, self._placeholder)
        self._emit(MessageEnd(loop_id=self._loop_id, message=recorded))
        self._turn.finished(recorded, message)
        return message

    def _streamed(self) -> tuple[Content, ...]:
        blocks: list[Content] = []
        if self._thinking:
            blocks.append(ThinkingContent(thinking="".join(self._thinking)))
        if self._text:
            blocks.append(TextContent(text="".join(self._text)))
        return tuple(blocks)

    def end(
        self,
        error: BaseException | str | None = None,
        *,
        content: Sequence[Content] | None = None,
        tool_calls: Sequence[ToolCall] | None = (),
        usage: Usage | None = None,
    ) -> None:
        """Finish with what streamed, or what came of the reply (`content`, `tool_calls` and
        `usage`, as for `finish`); with `error`, as a failed reply."""
        self._require_running()
        if error is None:
            self.finish(content, tool_calls=tool_calls, usage=usage)
        else:
            self.finish(
                content,
                tool_calls=tool_calls,
                usage=usage,
                stop_reason=_stop_reason(error),
                error_message=_describe(error),
            )


class ToolScope(_Scope):
    """One tool execution: ``ToolExecutionStart`` ... ``ToolExecutionEnd`` and its
    ``toolResult`` message. Create with `TurnScope.tool`.

    Set the outcome with `result` or `error` (the last call wins; none means an
    empty success). Leaving with an exception records it as the tool's error. A
    sub-agent run with `sub_agent` is linked both ways: its loop's
    ``parent_loop_id`` is this loop, and this result's ``child_loop_id`` is its loop.
    """

    __slots__ = (
        "_child_agent",
        "_child_loop_id",
        "_cut",
        "_loop",
        "_outcome",
        "_turn",
        "args",
        "tool_call_id",
        "tool_name",
    )

    def __init__(
        self, loop: _LoopState, turn: _TurnState, tool_call_id: str, tool_name: str, args: Any
    ) -> None:
        self._running = self._ended = False  # `_Scope.__init__`, inline: one scope per turn, reply, tool
        self._loop = loop
        self._turn = turn
        self.tool_call_id = tool_call_id
        self.tool_name = tool_name
        self.args = args
        # The result's content, details and whether it is an error: set in one step.
        self._outcome: tuple[tuple[Content, ...], Any, bool] = _NO_OUTCOME
        self._child_loop_id: str | None = None
        self._child_agent: AgentSession | None = None
        self._cut = False  # ended by its turn while running

    def start(self) -> ToolScope:
        """Emit ``ToolExecutionStart`` with a copy of the arguments (`_own_copy`),
        which passes the redactor first."""
        if self._running or self._ended:  # `_require_new`, inline
            raise _started_twice(self)
        loop = self._loop
        with loop.lock:  # atomic with the turn's end: never a tool its turn misses
            self._turn.tool_started(self, self._cut_short)
            self._running = True
        loop.emit(
            ToolExecutionStart(
                loop_id=loop.loop_id,
                tool_call_id=self.tool_call_id,
                tool_name=self.tool_name,
                args=_own_copy(self.args, loop.outlet.copy_failures, _ARGUMENTS),
            )
        )
        return self

    def update(self, partial: str | Sequence[Content] | ToolResult, details: Any = None) -> None:
        """A partial result (``ToolExecutionUpdate``)."""
        if not self._running and not self._still_open("update"):
            return
        loop = self._loop
        if not isinstance(partial, ToolResult):
            partial = ToolResult(content=_content("partial", partial), details=details)
        else:
            check_recordable("partial", partial)
        partial = _owned_result(partial, loop.outlet.copy_failures)
        loop.emit(
            ToolExecutionUpdate(
                loop_id=loop.loop_id,
                tool_call_id=self.tool_call_id,
                tool_name=self.tool_name,
                partial_result=partial,
            )
        )

    def progress(self, text: str) -> None:
        """A progress note (``ProgressMessage``)."""
        if not self._running and not self._still_open("progress"):
            return
        text = check_text("text", text)
        loop = self._loop
        loop.emit(
            ProgressMessage(
                loop_id=loop.loop_id,
                tool_call_id=self.tool_call_id,
                tool_name=self.tool_name,
                text=text,
            )
        )

    def result(self, content: str | Sequence[Content], details: Any = None) -> None:
        """The tool's successful result (emitted when the scope ends; `details` copied now,
        `_own_copy`)."""
        if not self._running and not self._still_open("result"):
            return
        self._outcome = (_content("content", content), self._own_details(details), False)

    def error(self, content: str | Sequence[Content], details: Any = None) -> None:
        """The tool's error result (emitted when the scope ends; `details` copied now); the
        loop goes on."""
        if not self._running and not self._still_open("error"):
            return
        self._outcome = (_content("content", content), self._own_details(details), True)

    def _own_details(self, details: Any) -> Any:
        # Copied at the call, as documented: the agent may go on changing its dict.
        return _own_copy(details, self._loop.outlet.copy_failures, _DETAILS)

    def sub_agent(
        self,
        config: LoopConfigSnapshot | None = None,
        *,
        agent: AgentSession | None = None,
        metadata: Any = None,
        config_id: str | None = None,
        tracer: Tracer | None = None,
    ) -> LoopScope:
        """A sub-agent's loop, in a session of its own, spawned by this tool call.

        `agent`: the sub-agent's identity (default: fresh ids, this agent's clock).
        `tracer`: whose processors and sinks record the loop (default: this tool's; its
        identity is not used): a sub-agent instrumented apart (by another framework
        adapter, with sinks and redaction of its own) is recorded there, the links
        alone tying it to this call.
        The loop id segment is ``sub`` (phi-core's) unless `config_id` or the
        config's own ``config_id`` says otherwise. Its first turn is triggered by
        ``SubAgent``. Once it ends, this tool's result carries its loop id.

        A tool call spawns one sub-agent session: called again (with no `agent`, or
        the same one), the new loop continues that session's last loop (``Default``),
        as the result can name only one child loop (the first).
        """
        self._require_running()
        check_type("config", config, LoopConfigSnapshot, optional=True)
        check_type("agent", agent, AgentSession, optional=True)
        check_type("tracer", tracer, Tracer, optional=True)
        config_id = check_text("config_id", config_id, optional=True)
        loop = self._loop
        config = config if config is not None else loop.config
        if config_id is None:
            config_id = config.config_id if config is not None and config.config_id is not None else "sub"
        spawned = self._child_agent
        if spawned is not None and (agent is None or agent is spawned):
            child, parent, kind = spawned, spawned.last_loop_id or self._child_loop_id, DEFAULT
        else:
            child = agent if agent is not None else loop.agent.spawn()
            parent, kind = loop.loop_id, INITIAL
        if tracer is None:
            loop.outlet.check_config(config)
            session_id, loop_id = child.allocate_loop(config_id)
            scope = LoopScope(
                loop.outlet,
                child,
                loop_id,
                session_id,
                config,
                config_id,
                parent_loop_id=parent,
                kind=kind,
                metadata=metadata,
            )
        else:
            scope = tracer.for_agent(child).loop(
                config, continues=parent, kind=kind, metadata=metadata, config_id=config_id
            )
        if kind == INITIAL:
            scope.first_trigger = "SubAgent"
            if spawned is None:
                self._child_loop_id, self._child_agent = scope.loop_id, child
        return scope

    @property
    def sub_agent_identity(self) -> AgentSession | None:
        """The identity of the sub-agent this tool call spawned (`sub_agent`), if any."""
        return self._child_agent

    def _still_open(self, what: str) -> bool:
        """Whether a call may act: False (logged) once the turn has cut the tool short,
        so a tool still running in another thread or task does not fail its agent.
        (Callers ask `_running` first: a running tool was never cut short.)"""
        if self._cut:
            logger.info(
                "tool %s (%s): %s ignored, its turn already ended it", self.tool_name, self.tool_call_id, what
            )
            return False
        if not self._running:
            raise _not_running(self)
        return True

    def _cut_short(self) -> ToolFinisher:
        """Called by the ending turn, under the loop's lock, while the tool runs."""
        self._close()
        self._cut = True
        return self._emit_end

    def end(
        self,
        error: BaseException | str | None = None,
        *,
        timestamp: int | None = None,
        node_id: int | None = None,
        parent_id: int | None = None,
    ) -> None:
        """Emit ``ToolExecutionEnd`` and the ``toolResult`` message; with `error`, as a failure.

        `timestamp`: the message's (epoch milliseconds; default now), for a tool that
        finished earlier than its result was known: `InvalidArgument` for one past the
        years phi-core reads (`Timestamp`); one before the turn started is taken as given,
        as a clock set back would give it (an adapter's reading must not lose the result).
        `node_id`, `parent_id`: the message's node in the conversation tree (phi-core's
        revert mode stamps a tool result too), as a reply's own message carries them.
        Error texts (exception messages) reach sinks through the redactor
        like any failed tool's result. After the turn cut the tool short, a no-op (logged).
        """
        if timestamp is not None:
            check_unsigned("timestamp", timestamp)
            if timestamp > MAX_MILLIS:
                raise InvalidArgument(f"timestamp {timestamp} ms is past the years a Timestamp holds")
        check_unsigned("node_id", node_id, optional=True)
        check_unsigned("parent_id", parent_id, optional=True)
        with self._loop.lock:  # atomic with the turn's end: each tool ends once
            if not self._running and not self._still_open("end"):
                return
            self._running, self._ended = False, True  # `_close`, inline
            self._turn.tool_ending(self)
        self._emit_end(error, timestamp, node_id, parent_id)

    def _emit_end(
        self,
        error: BaseException | str | None,
        timestamp: int | None = None,
        node_id: int | None = None,
        parent_id: int | None = None,
    ) -> None:
        message: ToolResultMessage | None = None
        try:
            content, details, is_error = self._outcome
            if error is not None:
                content, is_error = (TextContent(text=tool_failure_text(self.tool_name, error)),), True
            loop = self._loop
            child = self._child_loop_id
            result = ToolResult(
                content=content,
                details=details,  # copied by `result` or `error`
                child_loop_id=child if child is not None else msgspec.UNSET,
            )
            loop.emit(
                ToolExecutionEnd(
                    loop_id=loop.loop_id,
                    tool_call_id=self.tool_call_id,
                    tool_name=self.tool_name,
                    result=result,
                    is_error=is_error,
                    child_loop_id=child,
                )
            )
            # Remembered (`_Owned.message`): the agent's next request resends it.
            message = loop.outlet.owned.message(
                ToolResultMessage(
                    tool_call_id=self.tool_call_id,
                    tool_name=self.tool_name,
                    content=content,
                    is_error=is_error,
                    timestamp=loop.millis() if timestamp is None else timestamp,
                    node_id=node_id,
                    parent_id=parent_id,
                )
            )
            loop.emit_message(message)
        finally:
            self._turn.tool_done(message)


class CompactionScope(_Scope):
    """A context compaction: ``CompactionStarted`` ... ``CompactionEnded``.

    Report the outcome with `done`; leaving without it records that nothing was
    compacted; leaving with an exception emits no ``CompactionEnded`` (the loop's
    error tells why).
    """

    __slots__ = ("_after", "_cut", "_loop", "estimated_tokens", "message_count")

    def __init__(self, loop: _LoopState, estimated_tokens: int, message_count: int) -> None:
        check_unsigned("estimated_tokens", estimated_tokens)
        check_unsigned("message_count", message_count)
        super().__init__()
        self._loop = loop
        self.estimated_tokens = estimated_tokens
        self.message_count = message_count
        self._after: tuple[int, int, int] | None = None
        self._cut = False  # ended by its loop's end

    def start(self) -> CompactionScope:
        self._require_new()
        loop = self._loop
        loop.require_running()  # its events would follow the loop's AgentEnd
        start = CompactionStarted(
            loop_id=loop.loop_id,
            estimated_tokens=self.estimated_tokens,
            message_count=self.message_count,
            timestamp=loop.now(),
        )
        with loop.lock:
            self._running = True
            loop.compaction_started(self)
        loop.emit(start)
        return self

    def done(self, *, messages_after: int, estimated_tokens_after: int, loops_compacted: int = 1) -> None:
        """The result of the compaction (emitted when the scope ends). After its loop ended
        it, a no-op (logged)."""
        if self._cut:
            self._ignored("done")
            return
        self._require_running()
        check_unsigned("messages_after", messages_after)
        check_unsigned("estimated_tokens_after", estimated_tokens_after)
        check_unsigned("loops_compacted", loops_compacted)
        self._after = (messages_after, estimated_tokens_after, loops_compacted)

    def end(self, error: BaseException | str | None = None) -> None:
        """Emit ``CompactionEnded`` (none with `error`). After its loop ended it (as the
        loop's end does a compaction still running), a no-op."""
        loop = self._loop
        with loop.lock:
            if not loop.compaction_ending(self):
                if self._cut:
                    self._ignored("end")
                    return
                raise _not_running(self)
        self._emit_end(error)

    def _ignored(self, what: str) -> None:
        logger.info("compaction of loop %s: %s ignored, its loop already ended it", self._loop.loop_id, what)

    def cut_short(self, error: BaseException | str | None) -> None:
        """Its loop ends (and has taken it out of its running compactions) first."""
        self._cut = True
        self._emit_end(error)

    def _emit_end(self, error: BaseException | str | None) -> None:
        self._close()
        if error is not None:
            return
        messages_after, tokens_after, loops = self._after or (self.message_count, self.estimated_tokens, 0)
        loop = self._loop
        loop.emit(
            CompactionEnded(
                loop_id=loop.loop_id,
                messages_before=self.message_count,
                messages_after=messages_after,
                estimated_tokens_before=self.estimated_tokens,
                estimated_tokens_after=tokens_after,
                loops_compacted=loops,
                timestamp=loop.now(),
            )
        )


class ParallelGroup(_Scope):
    """A parallel evaluation: branch loops announced together, then one selected.

    Entering emits ``ParallelLoopStart`` with every branch's loop id. Run each
    branch with ``with group.branch(i) as loop`` (concurrently if you like), then
    call `select` with the winner and the judge's usage (``ParallelLoopEnd``); the
    winner becomes the loop that later continuations follow (unless the session was
    rotated since the group was made: the new session's are not). Branches never run
    are recorded as ``Aborted`` when the recorder flushes.
    """

    __slots__ = ("_agent", "_outlet", "branches", "selected", "session_id")

    def __init__(
        self, outlet: _Outlet, agent: AgentSession, session_id: str, branches: list[LoopScope]
    ) -> None:
        super().__init__()
        self._outlet = outlet
        self._agent = agent
        self.session_id = session_id
        self.branches: tuple[LoopScope, ...] = tuple(branches)
        self.selected: LoopScope | None = None

    @property
    def loop_ids(self) -> tuple[str, ...]:
        return tuple(branch.loop_id for branch in self.branches)

    def start(self) -> ParallelGroup:
        self._require_new()
        start = ParallelLoopStart(
            session_id=self.session_id, loop_ids=self.loop_ids, timestamp=self._agent.now()
        )
        self._running = True
        self._outlet.emit(start)
        return self

    def branch(self, index: int) -> LoopScope:
        """The loop of branch `index` (0-based, in config order); start it with ``with``."""
        self._require_running()
        return self.branches[self._position("index", index)]

    def select(self, winner: int | str, *, evaluation_usage: Usage = ZERO_USAGE) -> LoopScope:
        """Choose the winning branch (by loop id, or by index as `branch` takes it: a
        negative one counts from the end); emits ``ParallelLoopEnd``."""
        self._require_running()
        check_usage("evaluation_usage", evaluation_usage)
        if isinstance(winner, str):
            ids = self.loop_ids
            if winner not in ids:
                raise InvalidArgument(f"{winner!r} is not a branch of this group")
            index = ids.index(winner)
        else:
            index = self._position("winner", winner, "int or str")
        chosen = self.branches[index]
        agent = self._agent
        self._outlet.emit(
            ParallelLoopEnd(
                session_id=self.session_id,
                selected_loop_id=chosen.loop_id,
                selected_config_index=index,
                evaluation_usage=evaluation_usage,
                timestamp=agent.now(),
            )
        )
        self.selected = chosen
        agent.set_last_loop(chosen.loop_id, session_id=self.session_id)  # not after a rotation
        self._close()
        return chosen

    def _position(self, name: str, index: int, described: str = "int") -> int:
        """The position of branch `index`, a negative one counting from the end (the
        position is what is recorded: phi-core refuses an index below 0)."""
        index = check_index(name, index, described)
        count = len(self.branches)
        if not -count <= index < count:
            raise InvalidArgument(f"{name}: no branch {index} in a group of {count}")
        return index % count

    def end(self, error: BaseException | str | None = None) -> None:
        """Close the group; without a `select`, no winner is recorded."""
        self._require_running()
        self._close()
