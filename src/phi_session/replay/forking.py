"""`fork`: run a recorded loop again up to a turn, then hand it to another model.

For a hand-instrumented agent whose own code you re-run, use `RecordedModel` with
``until_turn`` and `fork_lineage`. `fork` is the ready-made version for any recorded
loop, whatever produced it: it records a ``Branch{tag}`` loop of the original
session (parent the original loop, ``metadata["fork"]`` the fork point and the
change) that

1. repeats the recorded turns before `turn_index` as they were (their inputs,
   replies, tool calls and results: no model, no tool runs), then
2. from `turn_index` on calls `model` (any function from a `RequestShape` to an
   `AssistantMessage`) with the recorded context of that turn, runs the tools it
   calls (`tools`, by name) and goes on until a reply calls no tool.

The change can be another model (`model`), other inputs for the fork turn
(`prompt`: replaces what that turn added, e.g. the user's question of turn 0), and
other results for tool calls of the turn just before it (`tool_results`, by call
id). What the fork changed goes to ``metadata["fork"]["change"]``: `change` as given,
plus the prompt and replaced results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

from msgspec.structs import replace

from .._checks import check_callable, check_each, check_index, check_instance, check_type
from ..errors import InvalidArgument
from ..events import LoopConfigSnapshot, PrunApplied
from ..instrument import LoopScope, ToolScope, Tracer
from ..messages import AgentMessage, AssistantMessage, Content, TextContent, ToolCall, ToolResultMessage
from ..model import Session, mark_replayed
from .lineage import fork_lineage
from .recorded import ModelFn
from .request import RequestShape, compare_messages, reaches_model
from .script import RecordedTurn, ReplayScript

__all__ = ["ToolFn", "fork"]

_PROMPT_TYPES: tuple[type, ...] = (str, *get_args(AgentMessage))
_CONTENT_TYPES: tuple[type, ...] = get_args(Content)

ToolFn = Callable[[Any], str | Sequence[Content]]
"""A tool as a plain function: the call's arguments in, its result (text or content) out."""


def _text(content: str | Sequence[Content]) -> tuple[Content, ...]:
    return (TextContent(text=content),) if isinstance(content, str) else tuple(content)


def _apply(result: ToolResultMessage, replaced: Mapping[str, tuple[Content, ...]]) -> ToolResultMessage:
    content = replaced.get(result.tool_call_id)
    return result if content is None else replace(result, content=content, is_error=False)


def _finish_recorded(tool: ToolScope, result: ToolResultMessage | None) -> None:
    if result is None:
        tool.error("no recorded result")
        return
    if result.is_error:
        tool.error(result.content)
    else:
        tool.result(result.content)
    # Stamped and placed in the tree as recorded (as the repeated replies are): the
    # repeated edits of the context name it so (a prune by timestamp, a revert by node).
    tool.end(timestamp=result.timestamp, node_id=result.node_id, parent_id=result.parent_id)


def _edit_again(loop: LoopScope, turn: RecordedTurn) -> None:
    """Record again the edits of the context `turn` saw (`RecordedTurn.edits`), so that the
    fork's own record rebuilds the context it repeats as it was sent."""
    for edit in turn.edits:
        if isinstance(edit, PrunApplied):
            loop.prun(edit.tokens_removed, edit.messages_removed, edit.pruned_timestamps, edit.memo)
        else:
            loop.revert(
                edit.category,
                abandoned_node_ids=edit.abandoned_node_ids,
                applied=edit.applied,
                target=edit.target,
                summary=edit.summary,
                reason=edit.reason,
            )


def _run_tool(tool: ToolScope, call: ToolCall, tools: Mapping[str, ToolFn]) -> None:
    run = tools.get(call.name)
    if run is None:
        tool.error(f"no tool named {call.name!r}")
        return
    try:
        tool.result(run(call.arguments))
    except Exception as error:  # a failing tool is the model's to see, as in any agent loop
        tool.error(f"{type(error).__name__}: {error}")


def _repeat(loop: LoopScope, turn: RecordedTurn, replaced: Mapping[str, tuple[Content, ...]]) -> None:
    _edit_again(loop, turn)
    for message in turn.inputs:
        loop.user(message)
    steering = list(turn.steering)
    with loop.turn() as scope:
        with scope.assistant() as reply:
            reply.finish(message=mark_replayed(turn.reply))  # repeated: no model call to bill
        for ended, call in enumerate(scope.tool_calls):
            while steering and steering[0][0] <= ended:  # where it came among the results
                scope.user(steering.pop(0)[1])
            with scope.tool(call) as tool:
                recorded = turn.result_of(call.id)
                _finish_recorded(tool, None if recorded is None else _apply(recorded, replaced))
        for _, message in steering:
            scope.user(message)


def _sent(message: AgentMessage, captured: bool) -> bool:
    """Whether the fork sends `message` to its model: a captured request holds only what
    the model received, never an extension message; a rebuilt one holds them all."""
    return not captured or reaches_model(message)


def _inputs_at_end(messages: Sequence[AgentMessage], inputs: Sequence[AgentMessage]) -> int:
    """How many of `messages` (a turn's request) are, at its end, the last of the turn's
    own `inputs` as the model sees them: the fork sends the inputs (or its prompt)
    after the rest. A captured request need not end with all of them (a recording made
    before its adapter told the new input from the history it resent)."""
    count = 0
    while (
        count < min(len(messages), len(inputs))
        and compare_messages([messages[-1 - count]], [inputs[-1 - count]]) is None
    ):
        count += 1
    return count


def _check_arguments(
    model: ModelFn,
    tracer: Tracer,
    tools: Mapping[str, ToolFn] | None,
    prompt: str | Sequence[AgentMessage] | None,
    tool_results: Mapping[str, str | Sequence[Content]] | None,
    tag: str,
    change: Mapping[str, Any] | None,
    config: LoopConfigSnapshot | None,
    max_turns: int,
) -> None:
    """`fork`'s checks of what it is given, made before it records anything."""
    check_callable("model", model)
    check_type("tracer", tracer, Tracer)
    if tools is not None:
        check_instance("tools", tools, Mapping, "a mapping of names to functions or None")
        for name, run in tools.items():
            check_type("a key of tools", name, str)
            check_callable(f"tools[{name!r}]", run)
    if prompt is not None and not isinstance(prompt, str):
        check_each("prompt", prompt, _PROMPT_TYPES, "str or a message")
    if tool_results is not None:
        check_instance("tool_results", tool_results, Mapping, "a mapping of call ids to results or None")
        for call_id, content in tool_results.items():
            check_type("a key of tool_results", call_id, str)
            if isinstance(content, str):
                continue
            where = f"tool_results[{call_id!r}]"
            if isinstance(content, bytes) or not isinstance(content, Sequence):
                raise TypeError(f"{where} must be str or content blocks, not {type(content).__name__}")
            check_each(where, content, _CONTENT_TYPES, "a content block")
    check_type("tag", tag, str)
    check_instance("change", change, (Mapping, type(None)), "a mapping or None")
    check_type("config", config, LoopConfigSnapshot, optional=True)
    check_type("max_turns", max_turns, int)
    if max_turns < 1:
        raise InvalidArgument(f"max_turns must be at least 1, got {max_turns}")


def fork(
    session: Session,
    loop_id: str,
    turn_index: int,
    *,
    model: ModelFn,
    tracer: Tracer,
    tools: Mapping[str, ToolFn] | None = None,
    prompt: str | Sequence[AgentMessage] | None = None,
    tool_results: Mapping[str, str | Sequence[Content]] | None = None,
    tag: str = "fork",
    change: Mapping[str, Any] | None = None,
    config: LoopConfigSnapshot | None = None,
    max_turns: int = 20,
) -> LoopScope:
    """Fork loop `loop_id` of `session` at turn `turn_index` (see the module docstring).

    The fork is recorded through `tracer` (its sinks and processors; `config` or the
    tracer's own config names the model of the new loop) as a loop of `session`;
    returns its ended scope (``loop_id``, ``messages``, ``usage``, ``status``). A
    model that keeps calling tools is stopped after `max_turns` live turns.

    Raises `LoopNotFound` / `TurnNotFound` for a fork point the session lacks, and
    `InvalidArgument` for a replaced tool result of a call that is not the previous turn's
    (later recorded turns saw the original result). Every argument is checked before
    anything is recorded: `TypeError` for one of the wrong type, `InvalidArgument` for a
    `max_turns` below 1 (a fork that would never call `model`).
    """
    turn_index = check_index("turn_index", turn_index)
    _check_arguments(model, tracer, tools, prompt, tool_results, tag, change, config, max_turns)
    script = ReplayScript.from_session(session, loop_id)
    point = script.turn(turn_index)
    replaced = {call_id: _text(content) for call_id, content in (tool_results or {}).items()}
    previous = {call.id for call in script.turns[turn_index - 1].tool_calls} if turn_index else set()
    stray = sorted(set(replaced) - previous)
    if stray:
        where = (
            f"not a tool call of turn {turn_index - 1}, the turn before the fork"
            if turn_index
            else "turn 0 has no turn before it whose tool results could be replaced"
        )
        raise InvalidArgument(f"tool_results: {', '.join(stray)}: {where}")
    inputs: Sequence[str | AgentMessage] = point.inputs
    described: dict[str, Any] = dict(change or {})
    if prompt is not None:
        inputs = [prompt] if isinstance(prompt, str) else prompt
        described["prompt"] = prompt if isinstance(prompt, str) else f"{len(prompt)} message(s)"
    if tool_results:
        described["tool_results"] = sorted(replaced)
    lineage = fork_lineage(script, turn_index, tag=tag, change=described or None)
    request = point.request
    captured = point.captured is not None
    own = [m for m in point.inputs if _sent(m, captured)]
    earlier = request.messages[: len(request.messages) - _inputs_at_end(request.messages, own)]
    # Only the results after the previous turn's reply (the context's last assistant
    # message) are replaced: an earlier turn may have made a call of the same id.
    replies = (i for i, m in enumerate(earlier) if isinstance(m, AssistantMessage))
    previous_end = 1 + max(replies, default=-1)
    context: list[AgentMessage] = [
        *earlier[:previous_end],
        *(_apply(m, replaced) if isinstance(m, ToolResultMessage) else m for m in earlier[previous_end:]),
    ]
    with lineage.loop(tracer, config) as loop:
        for position, turn in enumerate(script.turns[:turn_index]):
            _repeat(loop, turn, replaced if position == turn_index - 1 else {})
        _edit_again(loop, point)
        for message in inputs:
            recorded = loop.user(message)
            if _sent(recorded, captured):
                context.append(recorded)
        for _ in range(max_turns):
            with loop.turn() as scope:
                shape = RequestShape(
                    system_prompt=request.system_prompt, messages=tuple(context), tools=request.tools
                )
                with scope.assistant() as reply:
                    answer = reply.finish(message=model(shape))
                context.append(answer)
                for call in scope.tool_calls:
                    with scope.tool(call) as tool:
                        _run_tool(tool, call, tools or {})
                context.extend(scope.tool_results)
            if not scope.tool_calls:
                break
    return loop
