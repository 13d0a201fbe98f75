"""Processors: what every event passes through before any sink, recorder or file sees it.

A processor (`Processor`) is a plain callable (structlog style) that takes an event
and returns the event to pass on: the same one, a modified copy (events are frozen:
use ``msgspec.structs.replace``), or None to drop it on purpose. `ProcessorChain`
runs them in order.

A processor that raises (or returns something that is not an event) *fails closed*:
the event goes on with its content withheld (`withhold`) and a note naming the
processor and the exception type, so it is never passed on unredacted and never
lost without a trace. The failure is logged once per processor and counted.

`Redactor` (`phi_session.redactor`, also importable from here) is the built-in
secret scrubber.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Protocol

from msgspec.structs import replace

from ._checks import check_callable, check_instance
from ._failures import FailureTally
from ._owning import copy_failures, recordable_event
from .codec import EVENT_CLASSES
from .errors import InvalidArgument
from .events import (
    AgentEnd,
    AgentEvent,
    AgentStart,
    InputRejected,
    LoopConfigSnapshot,
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
)
from .messages import (
    AgentMessage,
    AssistantMessage,
    Content,
    ExtensionMessage,
    TextContent,
    ToolResult,
    extension_message,
    message_role,
)
from .redactor import DEFAULT_SECRET_FIELDS, DEFAULT_SECRET_PATTERNS, REDACTED, Redactor

__all__ = [
    "DEFAULT_SECRET_FIELDS",
    "DEFAULT_SECRET_PATTERNS",
    "REDACTED",
    "Processor",
    "ProcessorChain",
    "Redactor",
    "withhold",
]

logger = logging.getLogger("phi_session.processors")


class Processor(Protocol):
    """What every event passes through before any sink; `ProcessorChain` drives it.

    The contract:

    * ``processor(event)`` returns the event to pass on: `event` itself, a modified
      copy (events are frozen: ``msgspec.structs.replace``), or None to drop it on
      purpose.
    * It runs on the agent's own path, in whatever thread or task emits, possibly
      concurrently: it is thread-safe, fast, and never blocks (no I/O, no waiting).
    * It never raises into the agent: if it raises anyway (or returns something that
      is not an event), the chain fails closed (the event goes on with its content
      withheld, see `withhold`), logs the processor's first failure and counts all.
    * It holds no resources: processors have no lifecycle (sinks do, see
      `phi_session.sinks.Sink`).

    Any plain callable with this signature is a processor.
    """

    def __call__(self, event: AgentEvent, /) -> AgentEvent | None: ...


def _note(processor: object, error: BaseException) -> str:
    name = getattr(processor, "__qualname__", None) or type(processor).__qualname__
    # The exception's message is left out on purpose: it may quote the very secret
    # the processor was about to remove.
    return f"[WITHHELD: processor {name} raised {type(error).__name__}]"


# -- withholding -----------------------------------------------------------------------


def _withhold_content(note: str) -> tuple[Content, ...]:
    return (TextContent(text=note),)


def _withhold_message(message: AgentMessage, note: str) -> AgentMessage:
    if isinstance(message, ExtensionMessage):
        return extension_message(message_role(message), message.kind, {"withheld": note})
    content = _withhold_content(note) if message.content else ()
    if isinstance(message, AssistantMessage):
        return replace(
            message,
            content=content,
            tags=(),  # a tag's text may quote what is withheld
            error_message=None if message.error_message is None else note,
        )
    return replace(message, content=content, tags=())


def _withhold_result(result: ToolResult, note: str) -> ToolResult:
    return replace(result, content=_withhold_content(note), details=None)


def _optional(value: str | None, note: str) -> str | None:
    return None if value is None else note


def _withhold_agent_start(event: AgentStart, note: str) -> AgentStart:
    snapshot = event.config_snapshot
    if isinstance(snapshot, LoopConfigSnapshot):
        # Model, provider and config id identify the loop; everything else goes.
        snapshot = LoopConfigSnapshot(
            model=snapshot.model, provider=snapshot.provider, config_id=snapshot.config_id
        )
    return replace(
        event, config_snapshot=snapshot, metadata=None if event.metadata is None else {"withheld": note}
    )


def _withhold_agent_end(event: AgentEnd, note: str) -> AgentEnd:
    return replace(
        event,
        rejection=_optional(event.rejection, note),
        error=note if isinstance(event.error, str) else event.error,
    )


# Per event type, how to withhold its content outside its message fields.
_WITHHOLD: dict[type, Callable[[Any, str], Any]] = {
    AgentStart: _withhold_agent_start,
    AgentEnd: _withhold_agent_end,
    MessageUpdate: lambda e, note: replace(e, delta=StreamDelta(e.delta.kind, note)),
    TurnRequest: lambda e, note: replace(
        e, payload=replace(e.payload, system_prompt=note, messages=(), provenance=(), tools=())
    ),
    ToolExecutionStart: lambda e, note: replace(e, args={"withheld": note}),
    ToolExecutionUpdate: lambda e, note: replace(e, partial_result=_withhold_result(e.partial_result, note)),
    ToolExecutionEnd: lambda e, note: replace(e, result=_withhold_result(e.result, note)),
    ProgressMessage: lambda e, note: replace(e, text=note),
    InputRejected: lambda e, note: replace(e, reason=note),
    PrunApplied: lambda e, note: replace(e, memo=_optional(e.memo, note)),
    RevertApplied: lambda e, note: replace(
        e, summary=_optional(e.summary, note), reason=_optional(e.reason, note)
    ),
}


def withhold(event: AgentEvent, note: str) -> AgentEvent:
    """`event` with every piece of content replaced by `note`; ids, counters and usage kept.

    Used when a processor fails: what remains is safe to record whatever the content
    was. Every message (`phi_session.events.MESSAGE_FIELDS`) keeps its role and
    metadata but not its content; events without content (``TurnStart``, parallel
    and compaction events) come back unchanged.
    """
    event = map_messages(event, lambda message: _withhold_message(message, note))
    strip = _WITHHOLD.get(type(event))
    return event if strip is None else strip(event, note)


# -- the chain -------------------------------------------------------------------------------


class ProcessorChain:
    """Runs processors in order; a failing processor fails closed (see the module docs).

    Calling the chain returns the processed event, or None when a processor dropped
    it. It never raises. Thread-safe if the processors are.
    """

    def __init__(self, processors: Iterable[Processor] = ()) -> None:
        self.processors: tuple[Processor, ...] = tuple(processors)
        check_processors(self.processors)
        self._failures = FailureTally(
            logger, "processor", "its events are recorded with content withheld", traceback=False
        )
        self._copy_failures = copy_failures(logger)
        """Free-form values of a processor's own events recorded as their JSON copy."""
        self._lock = threading.Lock()
        self.dropped = 0
        """Events a processor dropped on purpose (returned None)."""
        self.lone: Processor | None = self.processors[0] if len(self.processors) == 1 else None
        """The chain's only processor, if it has exactly one (a `Tracer` then runs it inline,
        with `passed_on` and `withheld`)."""
        self.process: Callable[[AgentEvent], AgentEvent | None] = (
            self._run_one if self.lone is not None else partial(self.run_from, 0)
        )
        """Calling the chain, without the ``__call__`` indirection (what a `Tracer` calls)."""

    def __bool__(self) -> bool:
        return bool(self.processors)

    def __call__(self, event: AgentEvent) -> AgentEvent | None:
        """The processed event, or None if a processor dropped it. Never raises."""
        return self.process(event)

    def run_from(self, start: int, event: AgentEvent) -> AgentEvent | None:
        """`event` run through the chain's processors from the one at `start` on (all of
        them: calling the chain), or None if one dropped it. Never raises."""
        for processor in self.processors[start:] if start else self.processors:
            try:
                result = processor(event)
            except Exception as error:
                kept = self.withheld(processor, event, error)
                if kept is None:
                    return None
                event = kept
                continue
            passed = self.passed_on(processor, event, result)
            if passed is None:
                return None
            event = passed
        return event

    def _run_one(self, event: AgentEvent) -> AgentEvent | None:
        # The usual chain (the redactor alone), on every event: no loop.
        (processor,) = self.processors
        try:
            result = processor(event)
        except Exception as error:
            return self.withheld(processor, event, error)
        if result is event:
            return event
        return self.passed_on(processor, event, result)

    def passed_on(self, processor: Processor, event: AgentEvent, result: Any) -> AgentEvent | None:
        """What a processor's `result` for `event` passes on: None if it dropped it, the
        event withheld if it returned something that is not an event, or an event of its
        own holding what phi-core cannot (`recordable_event`: a `Tracer`'s recorders take
        its events as checked, `SessionRecorder.on_checked_event`), which passes on with
        its free-form values copied as JSON where stores could not write them."""
        if result is None:
            with self._lock:
                self.dropped += 1
            return None
        if result is not event:
            if type(result) not in EVENT_CLASSES:
                return self.withheld(processor, event, TypeError(f"returned {type(result).__name__}"))
            if type(processor) is not Redactor:  # which only puts text for text in what it was given
                try:
                    return recordable_event(result, self._copy_failures)
                except (TypeError, InvalidArgument) as error:
                    return self.withheld(processor, event, error)
        return result  # type: ignore[no-any-return]

    def withheld(self, processor: Processor, event: AgentEvent, error: Exception) -> AgentEvent | None:
        """What passes on when `processor` raised `error` on `event`: the event with its
        content withheld (None in the unexpected case it cannot be); the failure is counted."""
        self._failures.record(processor, error)
        try:
            return withhold(event, _note(processor, error))
        except Exception:  # cannot happen with well-formed events; never pass content on
            logger.exception(
                "could not withhold the content of a %s event; it was dropped", type(event).__name__
            )
            return None

    @property
    def failures(self) -> dict[str, int]:
        """Failure count per processor (by repr, `FailureTally.counts`), for those that
        failed at least once."""
        return self._failures.counts


def check_processors(processors: Sequence[object]) -> None:
    """`TypeError` unless every processor is callable: one that is not would withhold the
    content of every event."""
    for index, processor in enumerate(processors):
        check_callable(f"processors[{index}]", processor)


def check_redact(redact: object) -> None:
    """`TypeError` unless `redact` is a bool or a `Redactor`: a truthy ``"yes"`` or ``1``
    must not turn redaction off."""
    check_instance("redact", redact, (bool, Redactor), "a bool or a Redactor")


def default_processors(redact: bool | Redactor, processors: Sequence[Processor]) -> ProcessorChain:
    """The chain a `Tracer` runs: the user's processors, then the redactor (last, so
    that nothing a processor adds escapes it; with ``redact=True``, a default one, also
    after a `Redactor` of the user's: the default patterns always apply). A
    `ProcessorChain` among them (not a subclass, whose own call may differ) runs as its
    processors, in their place (its own counts left at zero: the tracer's chain counts
    them). A `Redactor` given twice (in
    `processors` and as `redact`, or in a chain in `processors`) runs once, at its last
    place: twice, it would hold back the end of a stream twice, garbling its deltas."""
    check_redact(redact)
    chain = _spliced(processors)
    if redact is True:
        chain.append(Redactor())
    elif isinstance(redact, Redactor):
        chain.append(redact)
    last = {id(p): at for at, p in enumerate(chain) if isinstance(p, Redactor)}
    return ProcessorChain(p for at, p in enumerate(chain) if last.get(id(p), at) == at)


def _spliced(processors: Sequence[Processor]) -> list[Processor]:
    """`processors`, each `ProcessorChain` among them (at any depth) replaced by its own
    (a subclass is kept whole: it may run them otherwise)."""
    return [
        inner
        for processor in processors
        for inner in (_spliced(processor.processors) if type(processor) is ProcessorChain else (processor,))
    ]
