"""Deterministic phi-core event streams for the benchmarks (issue 3, item 8).

Every event is built from the real `phi_session` event classes and every line is
written by `phi_session.encode_event`, so the lines are exactly what phi-core
would emit for the same events. Nothing depends on the wall clock or on global
random state: the same ``sessions`` and ``seed`` always give the same bytes.

Shape (per session, sessions one after another):

* 5 loops: loop 1 is ``Initial``; loops 2-5 continue loop 1 (``parent_loop_id`` =
  loop 1, ``continuation_kind`` ``Default``). Loop ids are
  ``{session_id}.anthropic.claude-sonnet-4-5.{N}``; session and agent ids are
  UUID-shaped strings drawn from the seeded generator (10 agents share the sessions).
* each loop: ``AgentStart`` (with a realistic ``LoopConfigSnapshot``), 4 turns,
  ``AgentEnd`` carrying the loop's messages and its summed usage.
* each turn: ``TurnStart``; on the first turn of a loop the user prompt
  (``MessageStart``/``MessageEnd``); ``MessageStart`` with phi-core's empty assistant
  placeholder; 20 ``MessageUpdate`` deltas (Thinking, Text and, in tool turns,
  ToolCallDelta; concatenated they spell the final content); ``MessageEnd`` with the
  final assistant message; then, except in a loop's last turn (``stopReason``
  ``"stop"``), 2 tool calls with ~100-character JSON arguments and ~500-character
  results, each as ``ToolExecutionStart``, ``ToolExecutionEnd`` and the ``toolResult``
  message's ``MessageStart``/``MessageEnd``; finally ``TurnEnd`` (message with
  ``turnId``, usage, plain tool results). No ``TurnRequest`` events.

That is `EVENTS_PER_LOOP` = 124 events per loop (80 of them ``MessageUpdate``), so
W1 is 62,000 events and W2 620,000.

Stable API (other benchmarks import this module after putting ``benchmarks/`` on
``sys.path``):

* ``W1 = 100``, ``W2 = 1000``: session counts of the two standard workloads.
* ``events(sessions=100, *, seed=0) -> Iterator[AgentEvent]``: the stream, lazily.
* ``lines(sessions=100, *, seed=0) -> list[bytes]``: the same stream as compact
  JSON lines, without trailing newlines.
* ``LOOPS_PER_SESSION``, ``TURNS_PER_LOOP``, ``DELTAS_PER_TURN``, ``TOOLS_PER_TURN``,
  ``EVENTS_PER_LOOP``, ``EVENTS_PER_SESSION``: the shape, for expected counts.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator

from msgspec.structs import replace

from phi_session import (
    DEFAULT,
    INITIAL,
    AgentEnd,
    AgentEvent,
    AgentMessage,
    AgentStart,
    AssistantMessage,
    LoopConfigSnapshot,
    MessageEnd,
    MessageStart,
    MessageUpdate,
    StreamDelta,
    TextContent,
    ThinkingContent,
    Timestamp,
    ToolCall,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResult,
    ToolResultMessage,
    TurnEnd,
    TurnId,
    TurnStart,
    Usage,
    UserMessage,
    encode_event,
)

__all__ = [
    "DELTAS_PER_TURN",
    "EVENTS_PER_LOOP",
    "EVENTS_PER_SESSION",
    "LOOPS_PER_SESSION",
    "TOOLS_PER_TURN",
    "TURNS_PER_LOOP",
    "W1",
    "W2",
    "events",
    "lines",
]

W1 = 100
W2 = 1000

LOOPS_PER_SESSION = 5
TURNS_PER_LOOP = 4
DELTAS_PER_TURN = 20
TOOLS_PER_TURN = 2

# Delta mix of one turn. Tool turns stream each call's arguments in two pieces.
_THINKING_DELTAS = 4
_TOOL_CALL_DELTAS_PER_CALL = 2
_TOOL_TURN_TEXT_DELTAS = DELTAS_PER_TURN - _THINKING_DELTAS - TOOLS_PER_TURN * _TOOL_CALL_DELTAS_PER_CALL
_FINAL_TURN_TEXT_DELTAS = DELTAS_PER_TURN - _THINKING_DELTAS

_EVENTS_PER_TOOL = 4  # ToolExecutionStart, ToolExecutionEnd, toolResult MessageStart/MessageEnd
_EVENTS_PER_TURN = 1 + 1 + DELTAS_PER_TURN + 1 + 1  # TurnStart, MessageStart, deltas, MessageEnd, TurnEnd
EVENTS_PER_LOOP = (
    2  # AgentStart, AgentEnd
    + 2  # the user prompt's MessageStart/MessageEnd
    + TURNS_PER_LOOP * _EVENTS_PER_TURN
    + (TURNS_PER_LOOP - 1) * TOOLS_PER_TURN * _EVENTS_PER_TOOL
)
EVENTS_PER_SESSION = LOOPS_PER_SESSION * EVENTS_PER_LOOP

_MODEL = "claude-sonnet-4-5"
_PROVIDER = "anthropic"
_CONFIG_ID = f"{_PROVIDER}.{_MODEL}"
_AGENTS = 10
_BASE_NS = 1_748_768_400 * 1_000_000_000  # 2025-06-01T09:00:00Z

_SNAPSHOT = LoopConfigSnapshot(
    model=_MODEL,
    provider=_PROVIDER,
    config_id=_CONFIG_ID,
    name="Claude Sonnet 4.5",
    api="anthropic_messages",
    base_url="https://api.anthropic.com",
    reasoning=True,
    context_window=200_000,
    max_tokens=16_384,
    thinking_level="medium",
)
_ZERO = Usage(input=0, output=0)

_WORDS = (
    "the a of to in and for with on is that this it as by from be are was not at or "
    "function module request session loop turn event record value result error file "
    "config parse check returns list index buffer stream client server handler cache "
    "update token usage model message output input path line test build retry timeout "
    "should could would first then next because however therefore while"
).split()
_TOOLS = ("read_file", "grep", "run_tests", "list_dir", "web_search")
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class _Generator:
    """One stream's state: the seeded random source and a monotonic clock."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock_ns = _BASE_NS

    # -- values -------------------------------------------------------------------

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def tool_call_id(self) -> str:
        return "toolu_" + "".join(self.rng.choices(_ID_ALPHABET, k=24))

    def prose(self, chars: int) -> str:
        """Words until at least `chars` characters, as a sentence."""
        words: list[str] = []
        length = 0
        while length < chars:
            word = self.rng.choice(_WORDS)
            words.append(word)
            length += len(word) + 1
        return " ".join(words).capitalize() + "."

    def tool_args(self, tool: str) -> dict[str, object]:
        # About 100 characters of compact JSON, as a real tool call's arguments.
        args: dict[str, object] = {
            "path": f"src/{self.rng.choice(_WORDS)}/{self.rng.choice(_WORDS)}_{self.rng.randrange(100)}.py",
            "max_results": self.rng.randrange(10, 200),
        }
        args["query"] = self.prose(100 - len(_compact_json(args)) - 12)
        if tool == "run_tests":
            args["verbose"] = self.rng.random() < 0.5
        return args

    def tool_output(self) -> str:
        lines = []
        length = 0
        while length < 500:
            line = f"{self.rng.randrange(1, 999):>4}: {self.prose(self.rng.randrange(30, 90))}"
            lines.append(line)
            length += len(line) + 1
        return "\n".join(lines)

    def usage(self, turn: int) -> Usage:
        inputs = self.rng.randrange(200, 2_000)
        output = self.rng.randrange(50, 600)
        reasoning = self.rng.randrange(0, output)
        cache_read = 0 if turn == 0 else self.rng.randrange(1_000, 20_000)
        cache_write = self.rng.randrange(0, 1_500)
        return Usage(
            input=inputs,
            output=output,
            reasoning=reasoning,
            cache_read=cache_read,
            cache_write=cache_write,
            total_tokens=inputs + output + cache_read + cache_write,
        )

    # -- time ---------------------------------------------------------------------

    def tick(self, low_ms: int, high_ms: int) -> Timestamp:
        """Advance the clock by a random amount; nanosecond digits like phi-core's."""
        self.clock_ns += self.rng.randrange(low_ms, high_ms) * 1_000_000 + self.rng.randrange(1_000_000)
        return Timestamp.from_ns(self.clock_ns)

    @property
    def millis(self) -> int:
        return self.clock_ns // 1_000_000

    # -- structure ----------------------------------------------------------------

    def session(self, agent_id: str) -> Iterator[AgentEvent]:
        session_id = self.uuid()
        first_loop = f"{session_id}.{_CONFIG_ID}.1"
        for n in range(1, LOOPS_PER_SESSION + 1):
            yield from self.loop(agent_id, session_id, n, first_loop)
            self.tick(5_000, 120_000)  # the user reads the answer before continuing

    def loop(self, agent_id: str, session_id: str, n: int, first_loop: str) -> Iterator[AgentEvent]:
        loop_id = f"{session_id}.{_CONFIG_ID}.{n}"
        yield AgentStart(
            agent_id=agent_id,
            session_id=session_id,
            loop_id=loop_id,
            parent_loop_id=None if n == 1 else first_loop,
            continuation_kind=INITIAL if n == 1 else DEFAULT,
            timestamp=self.tick(1, 5),
            config_snapshot=_SNAPSHOT,
        )
        messages: list[AgentMessage] = []
        total = _ZERO
        for turn in range(TURNS_PER_LOOP):
            usage = self.usage(turn)
            total = total + usage
            yield from self.turn(loop_id, turn, usage, messages)
        yield AgentEnd(
            loop_id=loop_id,
            messages=tuple(messages),
            usage=total,
            timestamp=self.tick(1, 3),
        )

    def turn(
        self, loop_id: str, turn: int, usage: Usage, messages: list[AgentMessage]
    ) -> Iterator[AgentEvent]:
        yield TurnStart(
            loop_id=loop_id,
            turn_index=turn,
            timestamp=self.tick(1, 5),
            triggered_by="User" if turn == 0 else "Continuation",
        )
        if turn == 0:
            prompt = UserMessage(content=(TextContent(text=self.prose(160)),), timestamp=self.millis)
            yield MessageStart(loop_id=loop_id, message=prompt)
            yield MessageEnd(loop_id=loop_id, message=prompt)
            messages.append(prompt)

        self.tick(300, 1_500)  # time to first token
        placeholder = AssistantMessage(
            content=(),
            stop_reason="stop",
            model=_MODEL,
            provider="",
            usage=_ZERO,
            timestamp=self.millis,
        )
        yield MessageStart(loop_id=loop_id, message=placeholder)

        with_tools = turn < TURNS_PER_LOOP - 1
        thinking = self.prose(160)
        text = self.prose(300 if with_tools else 480)
        tools = [self.rng.choice(_TOOLS) for _ in range(TOOLS_PER_TURN)] if with_tools else []
        calls = [
            ToolCall(id=self.tool_call_id(), name=tool, arguments=self.tool_args(tool)) for tool in tools
        ]

        deltas = [StreamDelta.thinking(piece) for piece in _split(thinking, _THINKING_DELTAS)]
        text_pieces = _TOOL_TURN_TEXT_DELTAS if with_tools else _FINAL_TURN_TEXT_DELTAS
        deltas += [StreamDelta.text(piece) for piece in _split(text, text_pieces)]
        for call in calls:
            deltas += [
                StreamDelta.tool_call(piece)
                for piece in _split(_compact_json(call.arguments), _TOOL_CALL_DELTAS_PER_CALL)
            ]
        for delta in deltas:
            self.tick(10, 60)
            yield MessageUpdate(loop_id=loop_id, message=placeholder, delta=delta)

        final = AssistantMessage(
            content=(ThinkingContent(thinking=thinking), TextContent(text=text), *calls),
            stop_reason="toolUse" if with_tools else "stop",
            model=_MODEL,
            provider=_PROVIDER,
            usage=usage,
            timestamp=self.millis,
        )
        yield MessageEnd(loop_id=loop_id, message=final)

        turn_id = TurnId(loop_id=loop_id, turn_index=turn)
        results: list[ToolResultMessage] = []
        for call in calls:
            yield ToolExecutionStart(
                loop_id=loop_id,
                tool_call_id=call.id,
                tool_name=call.name,
                args=call.arguments,
            )
            self.tick(50, 800)
            content = (TextContent(text=self.tool_output()),)
            yield ToolExecutionEnd(
                loop_id=loop_id,
                tool_call_id=call.id,
                tool_name=call.name,
                result=ToolResult(content=content),
                is_error=False,
            )
            result = ToolResultMessage(
                tool_call_id=call.id,
                tool_name=call.name,
                content=content,
                is_error=False,
                timestamp=self.millis,
            )
            yield MessageStart(loop_id=loop_id, message=result)
            yield MessageEnd(loop_id=loop_id, message=result)
            results.append(result)

        yield TurnEnd(
            loop_id=loop_id,
            message=replace(final, turn_id=turn_id),
            usage=usage,
            timestamp=self.tick(1, 3),
            tool_results=tuple(results),
        )
        messages.append(replace(final, turn_id=turn_id))
        messages.extend(replace(result, turn_id=turn_id) for result in results)


def _compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _split(text: str, pieces: int) -> list[str]:
    """`text` cut into `pieces` consecutive, nearly equal parts (concatenation gives it back)."""
    size = len(text)
    return [text[i * size // pieces : (i + 1) * size // pieces] for i in range(pieces)]


def events(sessions: int = W1, *, seed: int = 0) -> Iterator[AgentEvent]:
    """The event stream of `sessions` sessions, one session after another."""
    generator = _Generator(seed)
    agents = [generator.uuid() for _ in range(_AGENTS)]
    for index in range(sessions):
        yield from generator.session(agents[index % _AGENTS])


def lines(sessions: int = W1, *, seed: int = 0) -> list[bytes]:
    """`events` as phi-core's compact JSON lines (no trailing newline)."""
    return [encode_event(event) for event in events(sessions, seed=seed)]
