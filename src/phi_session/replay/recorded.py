"""`RecordedModel`: the replay model of a hand-instrumented loop.

Where your loop calls its model, call ``model.next(request)`` (a `RequestShape`, or
just the messages you send); where it runs a tool, ask ``model.tool_result(call)``
first and run the tool only when it returns None::

    script = ReplayScript.from_session(session, loop_id)
    model = RecordedModel(script)                    # tools="recorded": no model, no tools
    with replay_lineage(script).loop(tracer) as loop:  # Rerun{replay} of the original loop
        ...
        reply = model.next(RequestShape(system_prompt=..., messages=context, tools=...))
        ...
        recorded = model.tool_result(call)           # a ToolResultMessage, or None: run it

Where the original run failed, the replay fails there too: a model call that raised is
raised again as `RecordedModelError`, a tool error that ended the run (or that a retry
of the same call followed) as `RecordedToolError`.

The recorded replies come back marked as served (`phi_session.model.is_replayed`): give
them to ``reply.finish(message=...)`` as they are, and the replay's turns carry the
recorded usage (a diff compares like with like) while billing leaves them out.

A fork is the same with ``until_turn=k`` and a `fallback` (any callable from a
`RequestShape` to an `AssistantMessage`: your live model, another model) and
`fork_lineage`. The divergence rules are `ReplayCursor`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._checks import check_type
from ..messages import AgentMessage, AssistantMessage, ToolCall, ToolResultMessage
from ..model import Session, mark_replayed
from .cursor import OnDivergence, ReplayCursor, ToolsMode
from .divergence import Divergence
from .request import RequestShape
from .script import ReplayScript

__all__ = ["ModelFn", "RecordedModel"]

ModelFn = Callable[[RequestShape], AssistantMessage]
"""A model as a plain function: the request in, the assistant's reply out."""


class RecordedModel:
    """Answers a hand loop's model calls from a recording (see the module docstring).

    `recording`: a `ReplayScript`, or a `Session` (then `loop_id` and `chain` pick
    the loops, as `ReplayScript.from_session`). `fallback` answers the model calls
    the recording does not: past `until_turn` (a fork), and after a divergence when
    ``on_divergence="fallback"`` (both require it).
    """

    def __init__(
        self,
        recording: ReplayScript | Session,
        loop_id: str | None = None,
        *,
        chain: bool = False,
        on_divergence: OnDivergence = "stop",
        tools: ToolsMode = "recorded",
        until_turn: int | None = None,
        fallback: ModelFn | None = None,
    ) -> None:
        self.cursor = ReplayCursor.of(
            recording,
            loop_id,
            chain=chain,
            on_divergence=on_divergence,
            tools=tools,
            until_turn=until_turn,
            fallback=fallback is not None,
        )
        self.script = self.cursor.script
        self.fallback = fallback

    def next(self, request: RequestShape | Sequence[AgentMessage]) -> AssistantMessage:
        """The reply to `request`: the recorded one, or the fallback model's once handed over.

        A recorded reply is marked as served (`phi_session.model.is_replayed`): finished
        as it is (``reply.finish(message=...)``), it is recorded with its recorded usage,
        which no roll-up bills again.

        Raises `ReplayDiverged` on a divergence in ``"stop"`` mode, and `RecordedModelError`
        where the recorded model call failed the original run
        (`ReplayCursor.recorded_reply`)."""
        shape = RequestShape.of(request)
        reply = self.cursor.recorded_reply(shape)
        if reply is not None:
            return mark_replayed(reply)
        # Handed over: only with until_turn or in fallback mode, which both need a fallback.
        assert self.fallback is not None
        return self.fallback(shape)

    def tool_result(self, call: ToolCall) -> ToolResultMessage | None:
        """The recorded result of `call`, or None: run the tool (see `ReplayCursor.tool_result`).

        Raises `RecordedToolError` where the recorded call failed the original run
        (`ReplayCursor.recorded_result`)."""
        check_type("call", call, ToolCall)
        return self.cursor.recorded_result(call.id, call.name, call.arguments)

    @property
    def divergence(self) -> Divergence | None:
        return self.cursor.divergence

    @property
    def finished(self) -> bool:
        return self.cursor.finished
