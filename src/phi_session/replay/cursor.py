"""`ReplayCursor`: answers one replayed run's model calls and tool calls from a recording.

The contract a framework's replay model keeps (one cursor per replayed run):

1. At each model call, build the `RequestShape` of the framework's request (see
   `phi_session.replay.request`) and call `ReplayCursor.respond`. It checks the request
   against the next recorded turn and returns that turn's recorded
   `AssistantMessage` (text, thinking, tool calls with their recorded ids, usage,
   stop reason): turn it into the framework's response. It returns **None** when the
   run is handed over: to the live model past a fork point (``until_turn``), or to
   the fallback model after a divergence (``on_divergence="fallback"``); call your
   fallback / live model then, and from then on (it keeps returning None).
2. At each tool call of a replayed turn, call `ReplayCursor.tool_result` with the
   call's id, tool name and arguments (a dict or its JSON string). With
   ``tools="recorded"`` it returns the recorded `ToolResultMessage`: answer the tool
   call with its content (``is_error`` tells whether it failed) instead of running
   the tool. It returns **None** when the tool must run live: ``tools="live"``, or
   the run is handed over.
   `ReplayCursor.recorded_reply` and `ReplayCursor.recorded_result` are the same calls
   with a failure that ended the original run raised again (`RecordedModelError`,
   `RecordedToolError`): what every replay model answers with.
3. On a divergence with ``on_divergence="stop"`` both raise `ReplayDiverged`
   (carrying the `Divergence`; every later call raises it again); with
   ``"fallback"`` the first divergence is kept in `ReplayCursor.divergence` and the
   calls return None.

A replay of an unchanged agent never diverges: the recorded requests are compared
with the replayed ones as the model sees them (`phi_session.replay.request`). The
system prompt and the tools are compared only when both sides know them: a recording
without captured requests (``capture_requests`` off) has neither, so a changed system
prompt or tool list replays silently; the cursor logs a warning, once per replay, the
first time a replayed request has a system prompt or tools its recorded turn cannot
compare (logger ``phi_session.replay``). A recorded
request built from the loops before the replayed one (no captured request) also
matches a replayed request without those earlier messages.

Thread-safe: calls of one run may come from several threads or tasks (parallel tool
calls).
"""

from __future__ import annotations

import builtins
import logging
import sys
import threading
from bisect import bisect_left
from typing import Literal

from msgspec.structs import replace

from .._checks import check_index
from ..diff import same_json
from ..errors import InvalidArgument, RecordedModelError, RecordedToolError, ReplayDiverged
from ..messages import AgentMessage, AssistantMessage, TextContent, ToolCall, ToolResultMessage
from ..model import Session
from .divergence import Divergence, DivergenceKind
from .lineage import answered
from .request import Normalizer, RequestShape, clip, compare_messages, compare_tools, normal_arguments
from .script import RecordedTurn, ReplayScript, is_deferred

__all__ = [
    "OnDivergence",
    "ReplayCursor",
    "ToolsMode",
    "check_request",
    "recorded_exception",
    "recorded_tool_error",
    "result_text",
]

logger = logging.getLogger("phi_session.replay")

OnDivergence = Literal["stop", "fallback"]
ToolsMode = Literal["recorded", "live"]


def result_text(result: ToolResultMessage) -> str:
    """A recorded tool result's text (its text blocks, joined), as a replay answers with it."""
    return "".join(block.text for block in result.content if type(block) is TextContent)


def recorded_tool_error(result: ToolResultMessage) -> RecordedToolError:
    """A recorded tool failure as a replay raises it again: a `RecordedToolError` that is
    also the builtin exception class the tool raised, named in the recorded text
    (``"fetch failed: TimeoutError: slow"``, as a tool's exception is recorded), so that
    what caught that type in the original run (a retry on ``TimeoutError`` only) catches
    it again (but for `_NOT_REMADE`: a StopIteration, say, which a coroutine would turn
    into a RuntimeError). The agent's own exception classes are not made again (the
    recording has their name only): a plain `RecordedToolError`, which such a handler
    does not catch.
    A class not the builtin is recorded by its qualified name (``"fetch failed:
    redis.exceptions.TimeoutError: slow"``), so a bare name is the builtin's; a recording
    made before that rule names such a class bare too, and is taken for the builtin."""
    text = result_text(result)
    raised = recorded_exception(result)
    builtin = None if raised is None else _REMADE.get(raised.partition(":")[0])
    return RecordedToolError(text) if builtin is None else RecordedToolError.also_of(builtin)(text)


def recorded_exception(result: ToolResultMessage) -> str | None:
    """The exception a failed tool's result was recorded as (`ToolScope.end` with one:
    ``"fetch failed: TimeoutError: slow"``), as its text names it (``"TimeoutError:
    slow"``); None for another result (a success, a framework's answer to the failure)."""
    text = result_text(result)
    prefix = f"{result.tool_name} failed: "
    return text[len(prefix) :] if result.is_error and text.startswith(prefix) else None


_NOT_REMADE: tuple[type[Exception], ...] = (
    # Raised in a coroutine or generator (a replayed tool's), it turns into a RuntimeError.
    StopIteration,
    StopAsyncIteration,
    # Not made from one text: their fields would be None (a traceback shows a SyntaxError
    # as '<no detail available>'), an ExceptionGroup needs its exceptions.
    UnicodeDecodeError,
    UnicodeEncodeError,
    UnicodeTranslateError,
    SyntaxError,
)
if sys.version_info >= (3, 11):
    _NOT_REMADE += (builtins.ExceptionGroup,)
_REMADE: dict[str, type[Exception]] = {
    name: kind
    for name, kind in vars(builtins).items()
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, _NOT_REMADE)
}
"""The builtin exception classes a recorded tool failure is raised again as, by name."""

_Messages = tuple[AgentMessage, ...]
_Matched = tuple[_Messages, _Messages]
"""The messages of a request that matched: the recorded ones it was compared with (all,
or those after the inherited ones) and the replayed ones."""


def check_request(
    turn: RecordedTurn, request: RequestShape, normalize: Normalizer | None = None
) -> Divergence | None:
    """The divergence between `request` and what `turn` was asked, or None when they match.

    `normalize`: a `Normalizer` kept over a run (each message read once)."""
    return _check(turn, turn.request, request, normalize if normalize is not None else Normalizer(), None)[0]


def _extends(recorded: _Messages, replayed: _Messages, before: _Matched) -> bool:
    """Whether both sides go on from the messages of the last request that matched: then
    only what follows needs comparing. Tuples compare their items by identity first, so
    an agent resending its messages (and a script sharing its recorded ones) costs next
    to nothing."""
    old_recorded, old_replayed = before
    return (
        len(recorded) >= len(old_recorded)
        and len(replayed) >= len(old_replayed)
        and recorded[: len(old_recorded)] == old_recorded
        and replayed[: len(old_replayed)] == old_replayed
    )


def _check(
    turn: RecordedTurn,
    recorded: RequestShape,
    request: RequestShape,
    normal: Normalizer,
    before: _Matched | None,
) -> tuple[Divergence | None, _Matched | None]:
    """`check_request` of `recorded` (`turn`'s request, built once), and the messages that
    matched; `before`: those of the last request that matched, if any."""

    def diverged(what: DivergenceKind, found: tuple[str, str | None, str | None]) -> Divergence:
        detail, expected, actual = found
        return Divergence(
            loop_id=turn.loop_id,
            turn_index=turn.turn_index,
            what=what,
            detail=detail,
            expected=expected,
            actual=actual,
        )

    if (
        recorded.system_prompt is not None
        and request.system_prompt is not None
        and recorded.system_prompt != request.system_prompt
    ):
        found = ("the system prompt differs", clip(recorded.system_prompt), clip(request.system_prompt))
        return diverged("system_prompt", found), None
    if recorded.tools is not None and request.tools is not None:
        tools = compare_tools(recorded.tools, request.tools)
        if tools is not None:
            return diverged("tools", tools), None
    replayed = request.messages
    full = recorded.messages
    # A request without the messages inherited from earlier loops matches too.
    sides = (full, full[turn.inherited :]) if turn.inherited else (full,)
    if before is not None:
        for side in sides:
            if _extends(side, replayed, before):
                if compare_messages(side[len(before[0]) :], replayed[len(before[1]) :], normal) is None:
                    return None, (side, replayed)
    messages = compare_messages(full, replayed, normal)
    if messages is None:
        return None, (full, replayed)
    for side in sides[1:]:
        if compare_messages(side, replayed, normal) is None:
            return None, (side, replayed)
    return diverged("messages", messages), None


class ReplayCursor:
    """Answers one replayed run from `script` (see the module docstring for the contract).

    * `on_divergence`: ``"stop"`` raises `ReplayDiverged`; ``"fallback"`` hands the
      run to the caller's fallback model (calls return None).
    * `tools`: ``"recorded"`` answers tool calls from the recording; ``"live"``
      leaves them to the real tools (`tool_result` returns None).
    * `until_turn`: a fork point: the recorded turns before it are replayed, the
      model calls from it on return None (the live model answers), which is no
      divergence. It is a position in the script (for a one-loop script, the turn
      index).
    """

    def __init__(
        self,
        script: ReplayScript,
        *,
        on_divergence: OnDivergence = "stop",
        tools: ToolsMode = "recorded",
        until_turn: int | None = None,
    ) -> None:
        if not isinstance(script, ReplayScript):
            raise TypeError(f"expected a ReplayScript, got {type(script).__name__}")
        if on_divergence not in ("stop", "fallback"):
            raise InvalidArgument(f"on_divergence must be 'stop' or 'fallback', not {on_divergence!r}")
        if tools not in ("recorded", "live"):
            raise InvalidArgument(f"tools must be 'recorded' or 'live', not {tools!r}")
        if until_turn is not None:
            until_turn = check_index("until_turn", until_turn, "int or None")
            script.turn(until_turn)  # TurnNotFound for a fork point the recording does not have
        self.script = script
        self.on_divergence: OnDivergence = on_divergence
        self.tools: ToolsMode = tools
        self.until_turn = until_turn
        self._lock = threading.Lock()
        self._served = 0
        self._handed_over = False
        self._divergence: Divergence | None = None
        self._normalize = Normalizer()
        self._matched: _Matched | None = None  # the messages of the last request served
        self._warned_uncompared = False
        self._answered: dict[str, ToolResultMessage] = {}  # see `answered`
        # a turn's tool call, and whether asked awaiting its answer -> results served
        self._tries: dict[tuple[str, int, str, bool], int] = {}
        # tool call id -> the positions in the script of the turns that made it, in order:
        # a provider numbering calls per reply ("call_0") reuses ids across turns.
        self._calls: dict[str, list[int]] = {}
        # tool call id -> the positions of the turns whose inputs hold a result of it: a
        # run resuming an interrupted one answers the calls that awaited approval there.
        self._resumed: dict[str, list[int]] = {}
        for position, turn in enumerate(script.turns):
            for call in turn.tool_calls:
                self._calls.setdefault(call.id, []).append(position)
            for message in turn.inputs:
                if isinstance(message, ToolResultMessage):
                    self._resumed.setdefault(message.tool_call_id, []).append(position)

    @classmethod
    def of(
        cls,
        recording: ReplayScript | Session,
        loop_id: str | None = None,
        *,
        chain: bool = False,
        on_divergence: OnDivergence = "stop",
        tools: ToolsMode = "recorded",
        until_turn: int | None = None,
        fallback: bool = False,
    ) -> ReplayCursor:
        """The cursor a replay model drives (`RecordedModel`, each framework's).

        `recording`: a `ReplayScript`, or a `Session` whose loop `loop_id` is replayed
        (default as `ReplayScript.from_session`; `chain`: with the loops it continues).
        `fallback`: whether the replay model has a fallback model; `until_turn` and
        ``on_divergence="fallback"`` hand calls over to it, so they need one
        (`InvalidArgument` without)."""
        script = (
            recording
            if isinstance(recording, ReplayScript)
            else ReplayScript.from_session(recording, loop_id, chain=chain)
        )
        if not fallback and (until_turn is not None or on_divergence == "fallback"):
            raise InvalidArgument("until_turn and on_divergence='fallback' need a fallback model")
        return cls(script, on_divergence=on_divergence, tools=tools, until_turn=until_turn)

    # -- state ----------------------------------------------------------------------------

    @property
    def turns_served(self) -> int:
        """How many recorded replies `respond` has returned."""
        return self._served

    @property
    def divergence(self) -> Divergence | None:
        """The first divergence, if any."""
        return self._divergence

    def turn_of(self, call_id: str) -> RecordedTurn | None:
        """The latest replayed turn whose reply made tool call `call_id` (the one
        `tool_result` answers it from), None if no turn replayed so far made it."""
        made = self._made_at(call_id)
        return None if made is None else self.script.turns[made]

    def _made_at(self, call_id: str) -> int | None:
        """`turn_of`'s position in the script."""
        positions = self._calls.get(call_id, ())
        made = bisect_left(positions, self._served)
        return positions[made - 1] if made else None

    def _resumed_at(self, call_id: str, made: int | None) -> list[int]:
        """The positions of the turns after `made` (the turn that made call `call_id`), up
        to the one replayed next, whose inputs answer the call: the run resuming an
        interrupted one runs the approved tool before its first model call."""
        positions = self._resumed.get(call_id, ())
        start = 0 if made is None else bisect_left(positions, made + 1)
        return list(positions[start : bisect_left(positions, self._served + 1)])

    @property
    def handed_over(self) -> bool:
        """Whether model calls now go to the live or fallback model (fork point reached, or
        a divergence in ``"fallback"`` mode)."""
        return self._handed_over

    @property
    def finished(self) -> bool:
        """Whether every recorded turn the cursor was to serve has been served (up to
        `until_turn` for a fork) without a divergence."""
        end = len(self.script.turns) if self.until_turn is None else self.until_turn
        return self._divergence is None and self._served >= end

    # -- answers --------------------------------------------------------------------------

    def respond(self, request: RequestShape) -> AssistantMessage | None:
        """The recorded reply to `request` (the next turn's), or None when handed over.

        Raises `ReplayDiverged` on a divergence in ``"stop"`` mode."""
        if not isinstance(request, RequestShape):
            raise TypeError(f"expected a RequestShape, got {type(request).__name__}")
        with self._lock:
            if self._handed_over:
                return None
            self._raise_if_stopped()
            position = self._served
            if self.until_turn is not None and position >= self.until_turn:
                self._handed_over = True
                return None
            turns = self.script.turns
            if position >= len(turns):
                last = turns[-1] if turns else None
                self._diverge(
                    Divergence(
                        loop_id=last.loop_id if last is not None else self.script.loop_id,
                        turn_index=last.turn_index + 1 if last is not None else 0,
                        what="exhausted",
                        detail=f"a model call after the {len(turns)} recorded turn(s)",
                    )
                )
                return None
            turn = turns[position]
            recorded = turn.request
            self._warn_if_uncompared(turn, recorded, request)
            found, self._matched = _check(turn, recorded, request, self._normalize, self._matched)
            if found is not None:
                self._diverge(found)
                return None
            self._served = position + 1
        answered(self)
        return turn.reply

    def tool_result(
        self, call_id: str, name: str, arguments: object, *, awaiting_answer: bool = False
    ) -> ToolResultMessage | None:
        """The recorded result of a tool call of a replayed turn, or None when the tool
        must run live (``tools="live"``, or handed over).

        The call must be one of the replayed turns' (same id and tool name) with the
        same arguments; else a ``tool_call`` / ``tool_arguments`` divergence. An id that
        several turns made is the latest replayed one's (`turn_of`). A call run again
        (a framework retrying a failed tool under the same id) is answered with its
        recorded results in turn, past the last with the last. A call answered in a later
        turn's inputs, up to the one replayed next (a run resuming one stopped for the
        call's approval, which runs the tool before its first model call) has that result
        after its own turn's: the stopped run's `deferred_result` never stands in for it
        (the framework never asks a tool awaiting approval), and a call of a loop the
        script does not replay is answered from it too (checked against the call in the
        turn's request).

        `awaiting_answer`: the call is asked in the run that made it, no answer yet given
        for it (pydantic-ai: a tool raising ApprovalRequired unless approved, asked again
        in the run resuming it): that run's recorded results stand, a `deferred_result`
        among them (the tool stopped the run there), not those a resuming run sent."""
        answer = self._tool_answer(call_id, name, arguments, awaiting_answer)
        return None if answer is None else answer[0]

    def _tool_answer(
        self, call_id: str, name: str, arguments: object, awaiting_answer: bool
    ) -> tuple[ToolResultMessage, bool] | None:
        """`tool_result`, and whether it failed the original run there: a recorded error that
        ended its run, or one a retry followed (a later attempt of the same turn's)."""
        with self._lock:
            if self._handed_over or self.tools == "live":
                return None
            self._raise_if_stopped()
            turns = self.script.turns
            made = self._made_at(call_id)
            resumed = self._resumed_at(call_id, made)
            if made is None and not resumed:
                last = turns[self._served - 1] if self._served else None
                where = f"the replayed turns hold no tool call {call_id!r} ({name})"
                self._diverge(
                    Divergence(
                        loop_id=last.loop_id if last is not None else self.script.loop_id,
                        turn_index=last.turn_index if last is not None else 0,
                        what="tool_call",
                        detail=where,
                        actual=f"{name} [{call_id}]",
                    )
                )
                return None
            # The results the call was answered with, in order: its own turn's (a retry
            # ran it again under the same id), then those a resuming run sent for it.
            later = (
                []
                if awaiting_answer and made is not None
                else [result for q in resumed if (result := turns[q].input_result(call_id)) is not None]
            )
            if made is None:
                turn = turns[resumed[-1]]
                call = turn.call_in_request(call_id)
                own: list[ToolResultMessage] = []
            else:
                turn = turns[made]
                call = next(block for block in turn.tool_calls if block.id == call_id)
                own = [result for result in turn.tool_results if result.tool_call_id == call_id]
                if later:
                    # What was recorded while the call awaited its answer: the tool never
                    # gave it, nor was the model sent it.
                    own = [result for result in own if not is_deferred(result)]
            results = own + later
            if call is None:  # a call of a loop the script does not replay: named by its result
                call = ToolCall(id=call_id, name=results[-1].tool_name, arguments=arguments)
            problem = self._call_problem(call, name, arguments, not results)
            if problem is not None:
                what, detail, expected, actual = problem
                self._diverge(
                    Divergence(
                        loop_id=turn.loop_id,
                        turn_index=turn.turn_index,
                        what=what,
                        detail=detail,
                        expected=expected,
                        actual=actual,
                    )
                )
                return None
            key = (turn.loop_id, turn.turn_index, call_id, awaiting_answer)
            tried = self._tries.get(key, 0)
            self._tries[key] = tried + 1
            index = min(tried, len(results) - 1)
            failed_run = index < len(own) and (index < len(own) - 1 or turn.aborted)
            return replace(results[index], turn_id=None), failed_run

    def recorded_reply(
        self, request: RequestShape, *, every_failure: bool = False
    ) -> AssistantMessage | None:
        """`respond`, with a reply that failed the original run raised again.

        A reply that failed the original run (the model call raised: a reply stopped with
        ``error`` or ``aborted`` in the turn its loop was recorded ``Aborted`` in) is
        raised as `RecordedModelError` instead, with the recorded error text: the replay
        fails where the original did, rather than ending on an empty reply as if it had
        succeeded. A failed reply the run went on from (a response the agent took as it
        was) is returned, for the replay to answer as that response; with
        `every_failure`, for a framework whose model failures are always exceptions
        (LangChain), it is raised too, so that what the run went on with (a fallback
        model, a retry) sees the failure the original saw."""
        reply = self.respond(request)
        if reply is not None and reply.stop_reason in ("error", "aborted"):
            # `respond` returns the script's own reply objects.
            if every_failure or any(turn.reply is reply and turn.aborted for turn in self.script.turns):
                raise RecordedModelError(reply.error_message or reply.stop_reason)
        return reply

    def recorded_result(
        self, call_id: str, name: str, arguments: object, *, awaiting_answer: bool = False
    ) -> ToolResultMessage | None:
        """`tool_result`, with a recorded error that ended the original run raised again.

        A recorded error that ended the original run (the tool raised, and its loop was
        recorded ``Aborted`` in that turn) is raised as `RecordedToolError` instead (also of
        the builtin exception class recorded: `recorded_tool_error`), with the recorded
        error text: the replay fails where the original did, rather than
        sending the error to a model call the recording does not have; so is one a later
        result of the same call followed (the tool raised, and the framework ran it again:
        a retry retries on the exception). An error the run went on from is returned, for
        the replay to answer as the original did (an error message to the model)."""
        answer = self._tool_answer(call_id, name, arguments, awaiting_answer)
        if answer is None:
            return None
        result, failed_run = answer
        if result.is_error and failed_run:
            raise recorded_tool_error(result)
        return result

    def answered(self, call_id: str, result: ToolResultMessage) -> None:
        """A replay model answered tool call `call_id` with `result` (its `tool_result`)
        without running the tool, where the framework then reports its answer as the
        tool's success: the adapter recording the call takes `result` back
        (`take_answered`), to record the recorded result, an error as an error."""
        with self._lock:
            self._answered[call_id] = result

    def take_answered(self, call_id: str) -> ToolResultMessage | None:
        """The recorded result tool call `call_id` was answered with (`answered`), once;
        None for a call that ran."""
        with self._lock:
            return self._answered.pop(call_id, None)

    @staticmethod
    def _call_problem(
        call: ToolCall, name: str, arguments: object, no_result: bool
    ) -> tuple[DivergenceKind, str, str | None, str | None] | None:
        if call.name != name:
            return "tool_call", f"tool call {call.id!r} was to {call.name}, not {name}", call.name, name
        recorded, given = normal_arguments(call.arguments), normal_arguments(arguments)
        if not same_json(recorded, given):
            return (
                "tool_arguments",
                f"{name} [{call.id}] called with other arguments",
                clip(repr(recorded)),
                clip(repr(given)),
            )
        if no_result:
            return "tool_call", f"tool call {call.id!r} ({name}) has no recorded result", None, None
        return None

    def _warn_if_uncompared(self, turn: RecordedTurn, recorded: RequestShape, request: RequestShape) -> None:
        # Otherwise an agent with another system prompt or other tools replays as if
        # unchanged, and nothing tells the user why.
        if self._warned_uncompared or not (
            (recorded.system_prompt is None and request.system_prompt is not None)
            or (recorded.tools is None and request.tools is not None)
        ):
            return
        self._warned_uncompared = True
        logger.warning(
            "replay of %s: turn %d has no captured request (record with capture_requests=True): "
            "only the messages are compared, not the system prompt or the tools",
            turn.loop_id,
            turn.turn_index,
        )

    # -- divergence -----------------------------------------------------------------------

    def _raise_if_stopped(self) -> None:
        if self._divergence is not None and self.on_divergence == "stop":
            raise ReplayDiverged(self._divergence)

    def _diverge(self, divergence: Divergence) -> None:
        """Keep the first divergence; raise it (``"stop"``) or hand over (``"fallback"``)."""
        if self._divergence is None:
            self._divergence = divergence
        if self.on_divergence == "stop":
            raise ReplayDiverged(divergence)
        self._handed_over = True
