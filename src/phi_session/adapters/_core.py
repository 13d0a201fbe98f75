"""The adapter core: the rules every framework adapter shares, written once.

A framework adapter translates the framework's callbacks into calls on an
`AdapterCore`, which drives the instrumentation API (`phi_session.instrument`), so
the recorder's rules and the processors (redaction) apply to adapted runs too:

* **one framework run = one loop** (`AdapterCore.start_run` ... `AdapterCore.end_run`),
  state keyed by the framework's run id so concurrent runs interleave;
* **sessions**: the framework's session id is the session id (`session_id_for`
  maps one no store accepts to a UUIDv5, the original kept in the loop's
  ``metadata["framework_session_id"]``); without one, the adapter's own
  `AgentSession` (rotated after `rotate_after` seconds of inactivity);
* **continuation**: a later run in the same session continues its last loop
  (``Default``; a run whose history the framework rewound to an earlier loop's end, a
  ``Branch`` of that loop: `AdapterCore.start_run` ``rewound_to``), found in memory
  (the session's tracer, or the compact progress kept of a session let go of:
  `AdapterCore` ``max_idle_sessions``), else in `store`
  (which also seeds the loop counter, so loop ids never repeat across restarts; a later
  run reads only the loops other processes saved since, `AdapterCore._catch_up`);
  `AdapterCore.handoff` ends a loop with stop reason ``handoff`` and starts the next
  agent's loop continuing it;
* **replay and fork**: a top-level run started inside
  ``phi_session.replay.recording_as(lineage)`` is recorded into the lineage's
  session, continuing its loop with its kind and metadata (see
  `phi_session.replay.lineage`); a replay model answers from the recording through
  `ReplayCursor.recorded_reply` and `ReplayCursor.recorded_result`, which raise a
  failure that ended the original run again (`RecordedModelError`, `RecordedToolError`);
* **sub-agents**: a run started while an instrumented tool executes (`enter_tool`,
  a context variable shared by every adapter) becomes that tool's sub-agent: its own
  session, ``parent_loop_id``, trigger ``SubAgent``, and ``child_loop_id`` in the
  tool's result, recorded by the adapter starting it (its sinks and processors, not
  the tool's adapter's); one a run spawned outside any instrumented tool is linked one
  way (`AdapterCore.start_sub_agent`);
* **never disturb the host**: adapter code runs under `AdapterCore.guard` (or catches
  into `AdapterCore.fault`); a fault is counted and logged once (`failures`), and the
  run goes on;
* **default sink**: the embedded store (`phi_session.stores.default_store`) behind an
  `AutoPersistingRecorder`, which saves sessions as they complete through the one
  `SessionSaver`; `close` saves what is left, and so does interpreter exit, where runs
  still open end failed ("the interpreter exited during the run"); a process forked
  from the one that made the core (a pre-fork server's worker) records from its first
  run on into an embedded store of its own: its own recorder and connection;
* **one identity per session, however many adapter instances**: cores recording into
  the same place (the same embedded store, or the same sink objects) share their
  sessions' identities and the embedded store's one recorder (`_sessions`), so that a
  handler made per call continues the session's last loop and never reuses a loop id.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, TypeVar

import msgspec

from .._checks import check_callable, check_instance, check_seconds, check_type, check_usage
from .._failures import FailureTally
from .._fork import in_forked_child
from .._strict import clip_depth
from ..codec import escape_surrogates
from ..errors import (
    InvalidArgument,
    InvalidSessionId,
    MissingExtra,
    SessionNotFound,
    StoreError,
)
from ..events import DEFAULT, INITIAL, ContinuationKind, LoopConfigSnapshot
from ..identity import AgentSession, Clock
from ..ids import session_id_from_loop_id
from ..instrument import LoopScope, ToolScope, Tracer
from ..messages import (
    AnnotatedRequestPayload,
    AssistantMessage,
    Message,
    Usage,
)
from ..model import Session
from ..processors import Processor, Redactor, check_processors, check_redact
from ..replay import (
    Lineage,
    ReplayCursor,
    RequestShape,
    fork_lineage,
    recording_as,
    replay_lineage,
)
from ..replay.cursor import result_text
from ..replay.lineage import ActiveLineage, active_lineage, calling
from ..replay.script import deferred_result
from ..sinks import SinkLike
from ..stores.base import SessionStore, stored_loop_starts, validate_loop_session_id
from ._sessions import EmbeddedStore, book_for_sinks, embedded_store

__all__ = [
    "FRAMEWORK_SESSION_NAMESPACE",
    "AdapterCore",
    "AdapterRun",
    "ConvertedOnce",
    "RunningTool",
    "SinkArg",
    "deferred_result",
    "enter_tool",
    "jsonable",
    "leave_tool",
    "loop_config",
    "recorded_reply",
    "replay_recording",
    "require_extra",
    "result_text",
    "session_id_for",
    "since_last_reply",
    "usage_of",
]

logger = logging.getLogger("phi_session.adapters")

SinkArg = SinkLike | Iterable[SinkLike] | None
"""Where an adapter's events go: a sink, a list of sinks, or None for the embedded store."""

FRAMEWORK_SESSION_NAMESPACE = uuid.UUID("6f1b7a0e-3c1d-5b8e-9a4f-2d6c0e8b1f37")
"""The UUIDv5 namespace of session ids derived from framework session ids."""

_T = TypeVar("_T")
_F = TypeVar("_F")


def replay_recording(
    cursor: ReplayCursor, *, tag: str = "fork", change: Any = None, fallback: str | None = None
) -> AbstractContextManager[Lineage]:
    """Where a replay model's run is recorded (`phi_session.replay.recording_as`): the
    recording's session, as a ``Rerun{replay}`` of the replayed loop, or for a fork
    (the cursor's ``until_turn``) a ``Branch{tag}`` whose metadata names the fork point
    and `change` (default: ``{"model": fallback}``, the name of the model forked to).

    With ``on_divergence="fallback"``, ``metadata["replay"]["fallback"]`` names the model
    that answers from a divergence on. The loop's metadata is recorded when it starts,
    before any divergence: where the fallback took over is the loop's first turn that
    differs from the original's (`phi_session.diff.diff_loops`)."""
    if cursor.until_turn is None:
        if cursor.on_divergence == "fallback":
            return recording_as(replay_lineage(cursor.script, fallback=fallback), cursor)
        return recording_as(replay_lineage(cursor.script), cursor)
    if change is None and fallback is not None:
        change = {"model": fallback}
    return recording_as(fork_lineage(cursor.script, cursor.until_turn, tag=tag, change=change), cursor)


def recorded_reply(
    cursor: ReplayCursor, request: AnnotatedRequestPayload, *, every_failure: bool = False
) -> AssistantMessage | None:
    """What a replay model answers a model call with: `ReplayCursor.recorded_reply` to
    `request` (the call's request as the adapter records it), `every_failure` as there."""
    return cursor.recorded_reply(RequestShape.from_payload(request), every_failure=every_failure)


def require_extra(extra: str, *modules: str) -> None:
    """Import `modules`, or raise `MissingExtra` naming ``pip install 'phi-session[extra]'``."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise MissingExtra(
                f"phi_session.adapters needs {module} ({error}): pip install 'phi-session[{extra}]'"
            ) from error


def session_id_for(framework_session_id: str) -> str:
    """The phi session id of a framework session id: itself when it is a usable id,
    else (empty, or containing ``.``, ``/``, NUL, or anything no store accepts) its UUIDv5.

    A ``.`` would be ambiguous inside loop ids (``{session_id}.{config_id}.{N}``).
    Total: text with lone surrogates (decoded from undecodable bytes) gets one too.
    """
    try:
        return validate_loop_session_id(framework_session_id)
    except InvalidSessionId:
        pass
    # uuid5 itself, over bytes that lone surrogates do not fail (valid text: its UTF-8, as uuid5).
    name = framework_session_id.encode("utf-8", "surrogatepass")
    digest = hashlib.sha1(FRAMEWORK_SESSION_NAMESPACE.bytes + name, usedforsecurity=False).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


_CONFIGS: dict[tuple[str, str, str | None, str | None], LoopConfigSnapshot] = {}
_CONFIG_LIMIT = 256  # an adapter's agents and models are few; never grow without bound


def loop_config(
    model: str, provider: str, name: str | None = None, config_id: str | None = None
) -> LoopConfigSnapshot:
    """The `LoopConfigSnapshot` of these values, one object per distinct values: what the
    tracer and the redactor derive from a config (its loop-id segment, its filled-in and
    redacted forms) they keep per object, so every run of an agent reuses it."""
    key = (model, provider, name, config_id)
    config = _CONFIGS.get(key)
    if config is None:
        config = LoopConfigSnapshot(model=model, provider=provider, name=name, config_id=config_id)
        if len(_CONFIGS) >= _CONFIG_LIMIT:
            _CONFIGS.clear()
        _CONFIGS[key] = config
    return config


_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode
_NOT_JSON = (TypeError, ValueError, RecursionError, msgspec.EncodeError)


def jsonable(value: Any) -> Any:
    """`value` as JSON data (what a session can store), a copy of its own: what a host
    hands over that is not JSON (an object, a key that is no string) becomes its
    ``repr``, text its lone surrogates escaped, a container met again inside itself (a
    cycle, which no encoder ends) Python's mark for one, ``{...}`` or ``[...]``, and a
    container nested deeper than phi-core reads inside a session its JSON text
    (`clip_depth`)."""
    try:
        encoded = _json_encode(value)
        data = _json_decode(encoded)
    except _NOT_JSON:
        data = _rebuilt(value, set())
        encoded = _json_encode(data)
    clip_depth(data, encoded)
    return data


def _rebuilt(value: Any, enclosing: set[int]) -> Any:
    """`jsonable` of a value the encoder refused, part by part; `enclosing`: the ids of
    the containers it is inside."""
    if isinstance(value, str):  # refused for its lone surrogates
        return escape_surrogates(value)
    if not isinstance(value, (Mapping, list, tuple)):
        try:
            return _json_decode(_json_encode(value))
        except _NOT_JSON:
            return repr(value)
    if id(value) in enclosing:
        return "{...}" if isinstance(value, Mapping) else "[...]"
    enclosing.add(id(value))
    try:
        if isinstance(value, Mapping):
            return {escape_surrogates(str(key)): _rebuilt(item, enclosing) for key, item in value.items()}
        return [_rebuilt(item, enclosing) for item in value]
    finally:
        enclosing.discard(id(value))


def since_last_reply(items: Sequence[_T], is_reply: Callable[[_T], bool]) -> Sequence[_T]:
    """The items of a model input after its last reply (`is_reply`): what a run adds to
    the history it was handed. A conversation is continued by sending the earlier
    turns again (the previous loop's context, which the session holds already) with the
    new messages after them: only those are the new loop's input."""
    for index in range(len(items) - 1, -1, -1):
        if is_reply(items[index]):
            return items[index + 1 :]
    return items


def usage_of(
    input: int | None,
    output: int | None,
    *,
    cache_read: int | None = 0,
    cache_write: int | None = 0,
    reasoning: int | None = 0,
    total: int | None = None,
) -> Usage:
    """One model response's `Usage` from a framework's counters (None counts as 0), its
    `input` without the cache: with no total (None, 0), the total is
    ``input + output + cache_read + cache_write``, as `model.uncached_input` reads the
    adapters' records. `TypeError` or `InvalidArgument` for a counter that is no count (a
    float, a negative number), which no store could load again."""
    usage = Usage(
        input=input or 0,
        output=output or 0,
        cache_read=cache_read or 0,
        cache_write=cache_write or 0,
        reasoning=reasoning or 0,
        total_tokens=total or 0,
    )
    if not total:  # summed once each counter is known to be a count (a str would not add up)
        check_usage("usage", usage)
        usage = msgspec.structs.replace(
            usage, total_tokens=usage.input + usage.output + usage.cache_read + usage.cache_write
        )
    check_usage("usage", usage)
    return usage


class ConvertedOnce(Generic[_F]):
    """Framework messages in phi-core's form, each converted once: a framework sends the
    same history objects again with every model call, and a captured request converts
    them all (`AdapterCore.capture_requests`).

    `convert(message, timestamp)` is the conversion; `fingerprint(message)` what it reads
    from the message, compared by value: a message changed since its conversion (a host
    may edit its history between calls) is converted again. A message met again is the
    one converted before, with the `timestamp` asked for. Entries hold their message (so
    its id stays its own): keep one per run, not longer.
    """

    __slots__ = ("_convert", "_fingerprint", "_known")

    def __init__(
        self, convert: Callable[[_F, int], Message | None], fingerprint: Callable[[_F], object]
    ) -> None:
        self._convert = convert
        self._fingerprint = fingerprint
        self._known: dict[int, tuple[_F, object, Message | None]] = {}

    def __call__(self, message: _F, timestamp: int) -> Message | None:
        seen = self._fingerprint(message)
        known = self._known.get(id(message))
        if known is None or known[0] is not message or known[1] != seen:
            converted = self._convert(message, timestamp)
            self._known[id(message)] = (message, seen, converted)
            return converted
        converted = known[2]
        if converted is None or converted.timestamp == timestamp:
            return converted
        return msgspec.structs.replace(converted, timestamp=timestamp)


RunningTool = ToolScope | Callable[[], ToolScope | None]
"""A tool executing: its scope, or a callable that starts it on demand (for frameworks
that learn a tool's exact call id only after the tool began; None if it cannot start)."""

# The tool executing in this thread or task, if any: a run started under it is that
# tool's sub-agent, whichever adapter instruments the tool and the run.
_running_tool: ContextVar[RunningTool | None] = ContextVar("phi_session_running_tool", default=None)


def enter_tool(tool: RunningTool) -> Token[RunningTool | None]:
    """Mark `tool` as executing in this context (call from the tool's own thread or task)."""
    return _running_tool.set(tool)


def leave_tool(token: Token[RunningTool | None]) -> None:
    """Undo `enter_tool`; from another context (a framework ending the tool elsewhere),
    the mark is cleared there instead."""
    try:
        _running_tool.reset(token)
    except ValueError:
        _running_tool.set(None)


def _parent_tool() -> ToolScope | None:
    running = _running_tool.get()
    tool = running() if callable(running) else running
    return tool if tool is not None and tool.running else None


class _Guard:
    """`AdapterCore.guard`: an exception leaving the block is counted and logged once,
    never raised. A plain class rather than ``@contextmanager``: it wraps every
    framework callback, and a generator-based manager costs several times as much per
    use. Stateless, so one instance serves every (nested, concurrent) use."""

    __slots__ = ("_core",)

    def __init__(self, core: AdapterCore) -> None:
        self._core = core

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, error: BaseException | None, tb: object) -> bool:
        if isinstance(error, Exception):
            self._core.failures.record(self._core, error)
            return True
        return False


@dataclass
class AdapterRun:
    """One framework run being recorded: its loop, the tracer its continuations use, and
    what they carry on (handoffs and branches): the metadata (the framework session id a
    derived session id stands for, and what a replay or a fork's lineage marks its loops
    with) and the ``recording_as`` block whose replay cursor answers its model calls,
    whose served replies are recorded tagged (`phi_session.replay.recording_as`)."""

    key: object
    loop: LoopScope
    tracer: Tracer
    inherited: dict[str, Any] = field(default_factory=dict)
    replay: ActiveLineage | None = None


class AdapterCore:
    """Shared state and rules of one installed adapter (see the module docstring).

    * `framework`: the adapter's name (``"openai-agents"``), in logs and metadata.
    * `sink`: a sink, a list of sinks, or None: the embedded store (`default_store`),
      saved as sessions complete.
    * `store`: where earlier runs of a framework session are looked up for
      continuations (default: the embedded store when `sink` is None, else none).
    * `agent`: the identity of runs without a framework session id (fresh by default);
      `rotate_after`: its inactivity rotation in seconds or a timedelta (None: never).
    * `processors`, `redact`: as for `Tracer`.
    * `capture_requests`: the adapter records each turn's request (``TurnRequest``);
      the embedded store's recorder then keeps them (`Turn.request_payload`), as a
      replay compares against them (`phi_session.replay`).
    * `max_idle_sessions`: how many framework sessions without an open run keep their
      identity (an `AgentSession`, ~840 bytes); each run start lets go of the least
      recently used beyond it (`idle_sessions`). A session with an open run is always
      held. Cores recording into the same place share these (the largest limit applies).

    A session let go of leaves its identity's compact progress (`AgentSession.progress`:
    its last loop and loop counters, ~110 bytes with one config), from which its next run
    goes on exactly: it continues the session's last loop and never reuses a loop id.
    These entries stay while a core records there, one per framework session seen: neither
    the store nor a sink can stand in for them, as the store may not have saved a
    session's latest loops yet (the embedded store's recorder saves sessions as they
    complete, on another thread) and does not record which loop continuations follow
    (after parallel branches, the branching loop rather than the branch that started last).
    """

    def __init__(
        self,
        framework: str,
        sink: SinkArg = None,
        *,
        store: SessionStore | None = None,
        agent: AgentSession | None = None,
        clock: Clock | None = None,
        rotate_after: float | timedelta | None = 1800.0,
        processors: Iterable[Processor] = (),
        redact: bool | Redactor = True,
        capture_requests: bool = False,
        max_idle_sessions: int = 4096,
    ) -> None:
        # All checked before the embedded store is opened (a store given as a path, say,
        # would lose every run at its first save).
        check_type("framework", framework, str)
        check_type("store", store, SessionStore, optional=True)
        check_type("agent", agent, AgentSession, optional=True)
        check_callable("clock", clock, optional=True)
        check_seconds("rotate_after", rotate_after, optional=True, duration=True)
        processors = list(processors)
        check_processors(processors)
        check_redact(redact)
        check_instance("capture_requests", capture_requests, bool, "bool")
        check_type("max_idle_sessions", max_idle_sessions, int)
        if max_idle_sessions < 0:
            raise InvalidArgument(f"max_idle_sessions must be >= 0, got {max_idle_sessions}")
        self.framework = framework
        self.capture_requests = capture_requests
        self.failures = FailureTally(
            logger, f"{framework} adapter", "the run goes on, its record may be incomplete", traceback=True
        )
        self._guard = _Guard(self)
        self.max_idle_sessions = max_idle_sessions
        self.agent = agent if agent is not None else AgentSession(clock=clock)
        self.rotate_after = rotate_after
        self._lock = threading.Lock()  # guards `_runs`; taken before the book's, never after
        self._runs: dict[object, AdapterRun] = {}
        self._embedded: EmbeddedStore | None = None
        # With the embedded store: what recording there again after `close` takes (a
        # plugin closed with its runner, then given to the next one).
        self._rejoin: tuple[SessionStore | None, list[Processor], bool | Redactor] | None = None
        if sink is None:
            self._rejoin = (store, processors, redact)
            self._join_embedded(*self._rejoin)
            in_forked_child(self, AdapterCore._leave_in_child)
        else:
            sinks = [sink] if callable(sink) or not isinstance(sink, Iterable) else list(sink)
            self._book = book_for_sinks(sinks, max_idle_sessions)
            self.store = store
            self.tracer = Tracer(self.agent, sinks=sinks, processors=processors, redact=redact)

    def _join_embedded(
        self, store: SessionStore | None, processors: list[Processor], redact: bool | Redactor
    ) -> None:
        """Record into the embedded store: its recorder, store and session book."""
        from ..stores import default_store

        embedded = embedded_store(store, self.max_idle_sessions, default_store, self)
        self._embedded, self.store, self._book = embedded, embedded.store, embedded.book
        self.tracer = Tracer(
            self.agent, sinks=[embedded.persister.on_event], processors=processors, redact=redact
        )

    def _leave_in_child(self) -> None:
        """In a forked child: the embedded store's recorder (its writer thread, its exit hook,
        the store's connections) and the runs open are the parent's, which saves them; the
        child's next run joins an embedded store of the child's own (`start_run`)."""
        self._lock = threading.Lock()  # a parent thread may have held it; it does not exist here
        self._runs.clear()
        self._embedded = None

    def __repr__(self) -> str:
        return f"AdapterCore({self.framework!r})"

    # -- fault isolation ------------------------------------------------------------------

    def guard(self) -> AbstractContextManager[None]:
        """Run adapter code: an exception is counted and logged once, never raised."""
        return self._guard

    def fault(self, error: Exception) -> None:
        """Count and log (once) a fault an adapter's hook caught itself: the hooks that run
        on every span, event or tool call use ``try`` / ``except Exception`` with this
        rather than `guard`, whose ``__enter__`` and ``__exit__`` are two calls each time."""
        self.failures.record(self, error)

    def safely(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``fn(*args, **kwargs)`` under `guard`; None if it failed."""
        with self._guard:
            return fn(*args, **kwargs)
        return None

    @property
    def fault_count(self) -> int:
        """Adapter faults so far (each was logged once per adapter, the runs went on)."""
        return self.failures.total

    # -- runs -----------------------------------------------------------------------------

    def claim(self, key: object) -> bool:
        """Whether this core records framework run `key`: False if another core recording
        into the same place does (a framework calling both for each event of the run), until
        that core's `unclaim`."""
        self._record_again()  # the book of the run's destination
        return self._book.claim((self.framework, key), self) is self

    def unclaim(self, key: object) -> None:
        """The run `key` this core claimed ended."""
        self._book.unclaim((self.framework, key), self)

    def leave_note(self, key: str, note: Any) -> None:
        """Leave `note` under `key` for the next run that a core recording into the same
        place starts to `take_note`: an interrupted run's state for the next run of its
        framework session, say."""
        self._record_again()  # the book of the run's destination
        self._book.leave((self.framework, key), note)

    def take_note(self, key: str) -> Any:
        """The note left under `key` (then forgotten), if any."""
        self._record_again()
        return self._book.take((self.framework, key))

    def keep_note(self, key: str, note: Any) -> None:
        """Keep `note` under `key` for any later runs that cores recording into the same
        place start to `read_note`: the loop of a framework run for the runs going on
        from it, say. Kept apart from `leave_note`'s, so that one per run never pushes
        those out."""
        self._record_again()
        self._book.keep((self.framework, key), note)

    def read_note(self, key: str) -> Any:
        """The note kept under `key` (`keep_note`), if any, kept for the runs reading it later."""
        self._record_again()
        return self._book.read((self.framework, key))

    def start_run(
        self,
        key: object,
        config: LoopConfigSnapshot,
        *,
        framework_session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        kind: ContinuationKind | None = None,
        rewound_to: str | None = None,
        detached: bool = False,
    ) -> AdapterRun:
        """Start the loop of a framework run known by `key` (its run id); returns it.

        Under a running instrumented tool it is that tool's sub-agent; else it joins
        the framework session (continuing its last loop) or, without one, the
        adapter's own session. The loop's metadata gets ``framework`` and, when the
        session id was derived, ``framework_session_id``. `kind` is how it continues
        the session's last loop (default ``Default``; e.g. ``Branch`` for a run
        resumed from an earlier checkpoint); a first loop is always ``Initial``.
        `rewound_to`: the loop of the framework session at whose end the run's history
        ends, when the framework tells: an earlier loop than the session's last (the
        history rewound), the run continues it instead, as `kind`; the last loop, or
        none of the session's, the run continues the last loop as ``Default``.
        `detached`: the run's history is no loop's context (cut from a run's messages): it
        continues none (``Initial``, without parent) rather than claim one's context.
        """
        self._record_again()
        meta: dict[str, Any] = {"framework": self.framework, **(metadata or {})}
        parent_tool = _parent_tool()
        if parent_tool is not None:
            # A later run under the same tool call continues its sub-agent's session.
            child = parent_tool.sub_agent_identity or self.agent.spawn()
            # Recorded by this adapter (its sinks, its processors), whoever records the tool.
            loop = parent_tool.sub_agent(config, agent=child, metadata=meta, tracer=self.tracer)
            tracer = self.tracer.for_agent(child)
            return self._open(AdapterRun(key, loop, tracer))
        inherited: dict[str, Any] = {}
        replay: ActiveLineage | None = None
        if (lineage := active_lineage()) is not None:
            # A replay or a fork (phi_session.replay.recording_as): into the recorded session.
            tracer = self._session_tracer(lineage.lineage.session.session_id, lineage.lineage.session)
            continues, kind = lineage.continuation(tracer.agent.last_loop_id)
            inherited.update(lineage.lineage.metadata)
            replay = lineage
        else:
            if framework_session_id is not None:
                tracer = self._session_tracer(session_id_for(framework_session_id))
                # Kept where the session id is not the framework's: derived from it, or a
                # session of the run's own (the stored one unreadable).
                if tracer.agent.session_id != framework_session_id:
                    inherited["framework_session_id"] = escape_surrogates(framework_session_id)
            else:
                tracer = self.tracer
                if self.rotate_after is not None:
                    self.agent.check_and_rotate(self.rotate_after)
            continues = None if detached else tracer.agent.last_loop_id
            if rewound_to is not None and not detached:
                if rewound_to != continues and session_id_from_loop_id(rewound_to) == tracer.agent.session_id:
                    continues = rewound_to
                else:  # no rewind: the run goes on from where the session is
                    kind = None
            kind = INITIAL if continues is None else DEFAULT if kind is None else kind
        return self._start_loop(key, tracer, config, continues, kind, meta, inherited, replay)

    def start_sub_agent(
        self,
        key: object,
        config: LoopConfigSnapshot,
        parent_loop_id: str | None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> AdapterRun:
        """Start the loop of a framework run that another run spawned outside any
        instrumented tool (inside a tool the framework ran outside a model turn): a
        sub-agent in a session of its own, its ``parent_loop_id`` the spawning loop
        `parent_loop_id` (None: not known). The link goes one way: no tool result names
        the sub-agent, so its session's ``parent_spawn_ref`` names no tool call. Its loop
        id segment is ``sub`` (unless the config names one), as `ToolScope.sub_agent`'s;
        give its first turn the trigger ``SubAgent`` (`LoopScope.turn`), as theirs have."""
        self._record_again()
        meta: dict[str, Any] = {"framework": self.framework, **(metadata or {})}
        tracer = self.tracer.for_agent(self.agent.spawn())
        config_id = config.config_id if config.config_id is not None else "sub"
        loop = tracer.loop(config, continues=parent_loop_id, kind=INITIAL, metadata=meta, config_id=config_id)
        return self._open(AdapterRun(key, loop, tracer))

    def _record_again(self) -> None:
        """Record into the embedded store again after `close` (see `_rejoin`)."""
        if self._embedded is None and (rejoin := self._rejoin) is not None:
            with self._lock:
                if self._embedded is None:
                    self._join_embedded(*rejoin)

    def _session_tracer(self, session_id: str, recorded: Session | None = None) -> Tracer:
        """A tracer of session `session_id`, whose identity is held for one run; `recorded`:
        a recording of it that new loop ids must not collide with (a replay's)."""
        clock, id_factory = self.agent.clock, self.agent.id_factory
        held = self._book.hold(session_id, clock, id_factory)
        if held is not None:
            agent, stored = held
            if stored is not None:  # no run of it open here: other processes may have gone on
                self._catch_up(agent, stored)
        else:
            if recorded is not None:
                agent = AgentSession.continuing(recorded, clock=clock, id_factory=id_factory)
            else:
                agent = AgentSession.of_destination(
                    self.agent.agent_id, session_id, clock=clock, id_factory=id_factory
                )
            try:
                stored = self._resume_from_store(agent)
            except StoreError as error:
                # Without the stored loops, a new loop could take the id of one of them. The
                # run is recorded in a session of its own (not held: the next run of the
                # session asks the store again), rather than not at all.
                fresh = AgentSession(self.agent.agent_id, clock=clock, id_factory=id_factory)
                logger.warning(
                    "session %r could not be read from the store (%s): this run is recorded in "
                    "session %s, with framework_session_id in its metadata",
                    session_id,
                    error,
                    fresh.session_id,
                )
                return self.tracer.for_agent(fresh)
            agent = self._book.add(agent, stored)  # a concurrent first run of the session may have won
        if recorded is not None:  # counters only: continuations follow this tracer's runs
            agent.resume((record.loop_id for record in recorded.loops), None)
        return self.tracer.for_agent(agent)

    def _start_loop(
        self,
        key: object,
        tracer: Tracer,
        config: LoopConfigSnapshot,
        continues: str | None,
        kind: ContinuationKind,
        meta: dict[str, Any],
        inherited: dict[str, Any],
        replay: ActiveLineage | None,
    ) -> AdapterRun:
        """Start and register, as `key`, a loop of `tracer` (its session held for it), its
        metadata `meta` with what its run's continuations carry on (`inherited`, and
        `replay`: the cursor answering its model calls, `Tracer.loop`)."""
        try:
            loop = tracer.loop(
                config, continues=continues, kind=kind, metadata={**meta, **inherited}, replay=replay
            )
        except BaseException:
            self._book.release(tracer.agent)
            raise
        if replay is not None:
            calling(loop.loop_id)  # the replies served to model calls made here are its
        return self._open(AdapterRun(key, loop, tracer, inherited, replay))

    def _open(self, run: AdapterRun) -> AdapterRun:
        """Register and start `run`, whose session (if a framework session's) is held for
        it; a run it replaces under the same key lets go of its own hold. Idle sessions
        beyond `max_idle_sessions` are let go of here."""
        with self._lock:
            replaced = self._runs.get(run.key)
            self._runs[run.key] = run
        if replaced is not None:
            self._book.release(replaced.tracer.agent)
        self._book.let_go()
        run.loop.start()
        return run

    def _resume_from_store(self, agent: AgentSession) -> int | None:
        """Go on after the stored loops of `agent`'s session; how many were read (None:
        no store)."""
        store = self.store
        if store is None:
            return None
        try:
            # The outline: loop ids and start times without the messages, in the host's
            # thread, once per session and process (later runs read only what is new).
            outline = store.load_outline(agent.session_id)
        except (SessionNotFound, InvalidSessionId):
            return 0
        agent.resume_recorded(outline.loops)
        return len(outline.loops)

    def _catch_up(self, agent: AgentSession, stored: int) -> None:
        """Go on after the loops of `agent`'s session that other processes (a web app's
        other workers) saved since this one read its first `stored` loops: a run of it
        there must not reuse their loop numbers, and continues the session's last loop.
        One index range read per run start (`LoopStarts.loop_starts`)."""
        store = self.store
        if store is None:
            return
        try:
            loops = stored_loop_starts(store, agent.session_id, stored)
        except SessionNotFound:
            return  # not saved yet (or deleted): this process's memory is all there is
        except StoreError as error:
            logger.warning(
                "session %r could not be read from the store (%s): its run goes on from this "
                "process's memory, missing the loops other processes saved since",
                agent.session_id,
                error,
            )
            return
        agent.go_on_after(loops)
        self._book.read_stored(agent.session_id, stored + len(loops))

    def run(self, key: object) -> AdapterRun | None:
        """The open run known by `key`, if any."""
        return self._runs.get(key)

    def handoff(
        self, key: object, config: LoopConfigSnapshot, *, metadata: dict[str, Any] | None = None
    ) -> AdapterRun | None:
        """Hand the run `key` over to another agent: its loop ends (its last assistant
        message should carry stop reason ``handoff``; where it cannot, name that message's
        tool call that handed over in `metadata`, `phi_session.replay.script.HANDOFF_KEY`)
        and the next agent's loop, in the same session, continues it. Returns the new run
        (None if `key` was not open)."""
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                return None
            self._book.hold_again(run.tracer.agent)
        if run.loop.running:
            run.loop.end()
        return self._continue(key, run, config, DEFAULT, metadata)

    def branch(
        self,
        key: object,
        parent_key: object,
        config: LoopConfigSnapshot,
        tag: str,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> AdapterRun | None:
        """Start the run `key` as a ``Branch{tag}`` of run `parent_key`'s loop (running
        or ended), in its session: a framework's parallel branch. Several branches may
        fork from one loop; no winner is recorded. Returns the new run (None if
        `parent_key` is not open)."""
        with self._lock:
            parent = self._runs.get(parent_key)
            if parent is None:
                return None
            self._book.hold_again(parent.tracer.agent)
        return self._continue(key, parent, config, ContinuationKind.branch(tag), metadata)

    def _continue(
        self,
        key: object,
        run: AdapterRun,
        config: LoopConfigSnapshot,
        kind: ContinuationKind,
        metadata: dict[str, Any] | None,
    ) -> AdapterRun:
        """Start and register, as `key`, a loop continuing `run`'s with `kind` (its session
        held for it by the caller)."""
        meta: dict[str, Any] = {"framework": self.framework, **(metadata or {})}
        return self._start_loop(
            key, run.tracer, config, run.loop.loop_id, kind, meta, run.inherited, run.replay
        )

    def end_run(self, key: object, error: BaseException | str | None = None) -> AdapterRun | None:
        """End the run `key`: its loop ends (failed, status ``Aborted``, with `error`)."""
        with self._lock:
            run = self._runs.pop(key, None)
            if run is not None:
                # Under the core's lock, so that no handoff holds the session again after
                # it may have been let go of.
                self._book.release(run.tracer.agent)
        if run is not None and run.loop.running:
            run.loop.end(error)
        return run

    @property
    def open_runs(self) -> int:
        return len(self._runs)

    @property
    def idle_sessions(self) -> int:
        """Framework sessions without an open run whose tracer is held (at most
        `max_idle_sessions` after each run start)."""
        return self._book.idle

    # -- lifetime -------------------------------------------------------------------------

    def flush(self) -> None:
        """Flush the sinks; the embedded store saves what is finished. Runs go on."""
        self.tracer.flush()
        if self._embedded is not None:
            self.safely(self._embedded.save_finished)

    def close(self) -> None:
        """End runs still open (as failed: the adapter closed under them), then flush the
        sinks; the embedded store saves what is finished (and, if no other adapter uses
        it, closes). A run started afterwards records into the embedded store again."""
        self.end_open_runs(f"the {self.framework} adapter was closed during the run")
        self.tracer.flush()
        if self._embedded is not None:
            embedded, self._embedded = self._embedded, None
            self.safely(embedded.leave, self)

    def end_open_runs(self, reason: str) -> None:
        """End every run still open as failed, with `reason`."""
        with self._lock:
            keys = list(self._runs)
        for key in keys:
            self.safely(self.end_run, key, reason)
