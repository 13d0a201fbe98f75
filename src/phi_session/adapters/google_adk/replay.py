"""Replay and fork for Google ADK: a ``BaseLlm`` answering from a recording.

    model = ReplayLlm(session, loop_id)                # tools="recorded", on_divergence="stop"
    agent = LlmAgent(name=..., model=model, instruction=..., tools=[...])
    runner = InMemoryRunner(agent=agent, plugins=[PhiPlugin(), model.tools_plugin()])
    with model.recording():                            # a Rerun{replay} loop of the original
        ...  # runner.run_async(...)

`ReplayLlm` turns each ``LlmRequest`` into a `RequestShape` with the adapter's own
request converter (what ``PhiPlugin(capture_requests=True)`` records), so an
unchanged agent matches its recording, and answers with the recorded reply as an
``LlmResponse`` (as several, when the next recorded request shows ADK kept it as
several events: a Gemini stream gives the text and the calls as final responses of
their own). A model call that raised, ending the recorded run, raises again
(`RecordedModelError`); an error response the run went on from is answered as that
response. Past a fork point (`until_turn`) or after a divergence with
``on_divergence="fallback"`` it hands the request to `fallback`, any other ADK model.

ADK runs tools outside the model: `ReplayLlm.tools_plugin` answers each tool call of a
replayed turn from its ``before_tool_callback`` with the recorded result, so ADK
skips the tool (the after-tool callbacks still run: `PhiPlugin` records the recorded
result, an error as an error, when the cursor is one of its ``recording_as`` block's:
the given one, or any replaying the block's session, as each agent's of a transfer).
The answer is the function response the next recorded turn's request sent for the
call (with ``capture_requests=True``), else the recorded result read as JSON (a
string that is no JSON stays itself: a tool returning the string ``"5"`` is then
answered with the number 5, which the next request shows as a divergence). A
recorded error is answered with what the next turn's request sent for it (an
``on_tool_error_callback``'s answer), else ``{"error": text}``; an error that ended the
recorded run is raised again (`RecordedToolError`, which ADK wraps as the error of a
plugin). ADK's ``transfer_to_agent`` runs, checked against the recording: it only
names the agent taking over, which an answer would skip.

Limits: a recording without captured requests diverges at the first turn after a tool
call: ADK sends a tool's value that is no dict as ``{"result": value}``, while the
recorded loop holds the value (the ids ADK numbered itself and does not send are no
divergence: an empty call id is unknown, see `phi_session.replay.request`). Turns
answered by `fallback` are recorded under this model's name (the plugin takes it from
the request). A transfer replays with one replay model per agent (each with its own
tools plugin, named apart) or one for the chain (``chain=True``); ``AgentTool``
invocations are not covered by the tests.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractContextManager
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import msgspec
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_response import LlmResponse
from google.adk.plugins.base_plugin import BasePlugin
from google.genai import types
from msgspec.structs import replace
from pydantic import PrivateAttr

from ...errors import RecordedToolError
from ...messages import (
    AssistantMessage,
    Content,
    ImageContent,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResultMessage,
    Usage,
)
from ...model import Session
from ...replay import (
    Divergence,
    Lineage,
    OnDivergence,
    RecordedTurn,
    ReplayCursor,
    ReplayScript,
    ToolsMode,
)
from ...replay.request import compare_messages
from .._core import recorded_reply, replay_recording, result_text
from . import _TRANSFER_TOOL, FRAMEWORK, _decode, _json_text, _request

if TYPE_CHECKING:
    from google.adk.models.llm_request import LlmRequest
    from google.adk.tools.base_tool import BaseTool
    from google.adk.tools.tool_context import ToolContext

__all__ = ["RecordedToolError", "ReplayLlm"]

_FINISH: dict[str, types.FinishReason] = {"length": types.FinishReason.MAX_TOKENS}


def _parts(blocks: Sequence[Content]) -> list[types.Part]:
    """The inverse of `_blocks`: ADK parts of recorded content."""
    parts = []
    for block in blocks:
        if type(block) is TextContent:
            parts.append(types.Part(text=block.text))
        elif type(block) is ThinkingContent:
            signature = base64.b64decode(block.signature) if block.signature else None
            parts.append(types.Part(text=block.thinking, thought=True, thought_signature=signature))
        elif type(block) is ToolCall:
            arguments = (
                block.arguments if isinstance(block.arguments, dict) else {"arguments": block.arguments}
            )
            call = types.FunctionCall(id=block.id or None, name=block.name, args=arguments)
            parts.append(types.Part(function_call=call))
        elif type(block) is ImageContent:
            blob = types.Blob(data=base64.b64decode(block.data), mime_type=block.mime_type)
            parts.append(types.Part(inline_data=blob))
    return parts


def _usage_metadata(usage: Usage) -> types.GenerateContentResponseUsageMetadata:
    """The inverse of `_usage`: Gemini's prompt count includes the cache, its candidate
    count excludes the thoughts; cache writes as ADK's Anthropic model gives them."""
    metadata = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=usage.input + usage.cache_read + usage.cache_write,
        cached_content_token_count=usage.cache_read,
        candidates_token_count=max(0, usage.output - usage.reasoning),
        thoughts_token_count=usage.reasoning,
        total_token_count=usage.total_tokens,
    )
    if usage.cache_write:
        object.__setattr__(metadata, "cache_creation_input_tokens", usage.cache_write)
    return metadata


def _actionable(block: Content) -> bool:
    """Whether ADK takes `block` for content of a response (text that is not blank, a
    call, an image), not for an empty one."""
    if isinstance(block, TextContent):
        return bool(block.text.strip())
    return isinstance(block, (ToolCall, ImageContent))


def _llm_response(reply: AssistantMessage) -> LlmResponse:
    """A recorded reply as the final response the plugin records back as the same
    message (its function calls keep their recorded ids: ADK keeps ids a model gives)."""
    failed = reply.stop_reason in ("error", "aborted")
    finish = None if failed else _FINISH.get(reply.stop_reason, types.FinishReason.STOP)
    if finish is types.FinishReason.STOP and not any(map(_actionable, reply.content)):
        # Recorded as a stop, it came without STOP: ADK makes a STOP response without
        # actionable content an error (its empty-response policy), recorded as such.
        finish = None
    return LlmResponse(
        content=types.Content(role="model", parts=_parts(reply.content)),
        usage_metadata=_usage_metadata(reply.usage),
        finish_reason=finish,
        error_message=(reply.error_message or reply.stop_reason) if failed else None,
    )


def _llm_responses(reply: AssistantMessage, split: tuple[int, ...]) -> list[LlmResponse]:
    """A recorded reply as final responses of `split` blocks each (`_splits`), as a
    stream gives them, each with the (cumulative) usage; the last one ends the reply."""
    responses = []
    start = 0
    for size in split[:-1]:
        content = types.Content(role="model", parts=_parts(reply.content[start : start + size]))
        responses.append(LlmResponse(content=content, usage_metadata=_usage_metadata(reply.usage)))
        start += size
    return [*responses, _llm_response(replace(reply, content=reply.content[start:]))]


def _latest(turn: RecordedTurn) -> tuple[list[AssistantMessage], list[ToolResultMessage]]:
    """The model contents ending the history of a turn's request (the previous turn's
    reply, in as many messages as ADK kept events for it) and the function responses
    after them. Read from the end, as far as they go: the setup of a replay reads each
    request's end only, not the whole history once per turn."""
    replies: list[AssistantMessage] = []
    answers: list[ToolResultMessage] = []
    for message in turn.request_last_first():
        if isinstance(message, AssistantMessage):
            replies.append(message)
        elif replies:
            break
        elif isinstance(message, ToolResultMessage):
            answers.append(message)
    replies.reverse()
    answers.reverse()
    return replies, answers


def _splits(script: ReplayScript) -> dict[int, tuple[int, ...]]:
    """How each recorded reply reached the next turn's request when ADK kept it as
    several events (the block count of each), by the reply's id: Gemini streams the
    text and the calls as final responses of their own, which the plugin records as
    one message. Answered the same way, an unchanged agent sends the same request."""
    splits: dict[int, tuple[int, ...]] = {}
    for turn, after in pairwise(script.turns):
        pieces, _ = _latest(after)
        blocks = tuple(block for piece in pieces for block in piece.content)
        reply = turn.reply
        if (
            len(pieces) > 1
            and len(blocks) == len(reply.content)
            and compare_messages([reply], [replace(reply, content=blocks)]) is None
        ):
            splits[id(reply)] = tuple(len(piece.content) for piece in pieces)
    return splits


def _sent_responses(script: ReplayScript) -> dict[str, str]:
    """The function response each recorded call got, as the next turn's request sent it
    (by call id). The plugin records a tool's result as its text, where the string
    ``"5"`` and the number 5 read alike; the request has the response itself. ADK
    sends the responses to a turn's calls after the model's content, in call order."""
    sent: dict[str, str] = {}
    for turn, after in pairwise(script.turns):
        _, answers = _latest(after)
        calls = turn.tool_calls
        if len(answers) == len(calls) and all(
            a.tool_name == c.name for a, c in zip(answers, calls, strict=True)
        ):
            sent.update((call.id, result_text(answer)) for call, answer in zip(calls, answers, strict=True))
    return sent


def _tool_answer(result: ToolResultMessage, sent: str | None) -> Any:
    """What a tool call is answered with: what the model got for it, as the next turn's
    request sent it (`_sent_responses`; ADK wraps a value that is no dict as
    ``{"result": value}``, an ``on_tool_error_callback`` answers an error), else the
    recorded result read as the JSON it was written as (a string that is no JSON as
    itself). Without a sent response, a recorded error (one the run went on from:
    `ReplayCursor.recorded_result` raises the others) is answered ``{"error": text}``. Never None:
    that would leave the call unanswered, and ADK would run the tool."""
    text = result_text(result)
    if sent is None and result.is_error:
        return {"error": text}
    try:
        if sent is not None:
            response = _decode(sent)
            if isinstance(response, dict) and list(response) == ["result"]:
                if _json_text(response["result"]) == text:
                    response = response["result"]  # a value ADK wrapped, not a dict of the tool's
        else:
            response = _decode(text)
    except msgspec.DecodeError:
        return text
    # What ADK sends for a tool returning None.
    return {"result": None} if response is None else response


class ReplayLlm(BaseLlm):
    """An ADK model that answers from a recorded run: the replay model of Google ADK.

    Give it to the agent as its ``model``; add
    `tools_plugin` to the runner's plugins after `PhiPlugin` to answer tool calls from
    the recording; run inside `recording` so the plugin records the run as a replay
    (or fork) in the original session.

    Each request (converted as `PhiPlugin` records it: system instruction, contents,
    function declarations) is checked against the recorded turn's
    (`phi_session.replay.ReplayCursor`) and answered with the recorded reply as one
    final ``LlmResponse``, or as the several the next recorded request shows it came
    in: text, thoughts, function calls with their recorded ids, usage, finish reason.
    Once the cursor hands over (a fork point, or a divergence with
    ``on_divergence="fallback"``) `fallback` answers the request, streaming or not.
    No network call, no tokens until then. The recorded model name is this model's
    name, by default the recorded one of the turn it answers next (each loop's of a
    chain), and so is its provider.
    """

    cursor: ReplayCursor
    provider: str
    fallback: BaseLlm | None = None
    _splits: dict[int, tuple[int, ...]] = PrivateAttr(default_factory=dict)
    _next_names: dict[int, tuple[str, str]] = PrivateAttr(default_factory=dict)

    def __init__(
        self,
        recording: ReplayScript | Session,
        loop_id: str | None = None,
        *,
        chain: bool = False,
        on_divergence: OnDivergence = "stop",
        tools: ToolsMode = "recorded",
        until_turn: int | None = None,
        fallback: BaseLlm | None = None,
        **kwargs: Any,
    ) -> None:
        """Replay `recording` (a `ReplayScript`, or a `Session` whose loop `loop_id`,
        default as `ReplayScript.from_session`, is replayed; `chain`: with the loops it continues).
        `until_turn`: fork there, `fallback` answering from that turn on;
        `on_divergence` and `tools` as for `ReplayCursor`. `until_turn` and
        ``on_divergence="fallback"`` need a `fallback`. The model's name and provider
        are the replayed loop's, then each next recorded turn's, unless `model` is
        given. `kwargs`: BaseLlm's."""
        cursor = ReplayCursor.of(
            recording,
            loop_id,
            chain=chain,
            on_divergence=on_divergence,
            tools=tools,
            until_turn=until_turn,
            fallback=fallback is not None,
        )
        first = cursor.script.session.get_loop(cursor.script.loop_ids[0])
        config = first.config if first is not None else None
        named = "model" in kwargs
        kwargs.setdefault("model", config.model if config is not None else "replay")
        kwargs.setdefault("provider", config.provider if config is not None else FRAMEWORK)
        fields: dict[str, Any] = {"cursor": cursor, "fallback": fallback, **kwargs}
        super().__init__(**fields)
        self._splits = _splits(cursor.script)
        if not named:
            self._next_names = {
                id(turn.reply): (after.reply.model, after.reply.provider)
                for turn, after in pairwise(cursor.script.turns)
                if after.reply.model
            }

    @property
    def divergence(self) -> Divergence | None:
        """The first divergence, if any (``on_divergence="fallback"`` keeps it here)."""
        return self.cursor.divergence

    def recording(self, *, tag: str = "fork", change: Any = None) -> AbstractContextManager[Lineage]:
        """Run the agent inside: the plugin records the run into the original session, as
        a ``Rerun{replay}`` of the replayed loop, or for a fork (``until_turn``) a
        ``Branch{tag}`` whose metadata names the fork point and `change` (default: the
        fallback model's name)."""
        fallback = None if self.fallback is None else self.fallback.model
        return replay_recording(self.cursor, tag=tag, change=change, fallback=fallback)

    def tools_plugin(self, name: str = "phi_replay_tools") -> BasePlugin:
        """A plugin answering tool calls from the recording (``tools="recorded"``) while
        the run replays: its ``before_tool_callback`` returns the recorded result, so
        ADK skips the tool (and still calls the after-tool callbacks, where `PhiPlugin`
        records the result). List it after `PhiPlugin`: ADK stops at the first
        plugin that answers. It leaves alone the calls of agents whose loops it does not
        replay (with a replay model per agent, each one's plugin, under a name of its
        own, answers its agent's calls)."""
        return _RecordedTools(self.cursor, name)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        reply = recorded_reply(self.cursor, _request(llm_request, 0))
        if reply is not None:
            # The cursor returns the script's own reply objects.
            following = self._next_names.get(id(reply))
            if following is not None:
                # The next call may be another agent's (a chain's next loop): ADK and
                # the plugin read its model's name off this model.
                self.model, self.provider = following
            for response in _llm_responses(reply, self._splits.get(id(reply), (len(reply.content),))):
                yield response
            return
        if self.fallback is None:  # the cursor hands over only when a fallback was required
            raise ValueError("the replay handed over, but there is no fallback model")
        async for response in self.fallback.generate_content_async(llm_request, stream=stream):
            yield response


async def _awaits_confirmation(tool: BaseTool, args: dict[str, Any], context: ToolContext) -> bool:
    """Whether ADK's confirmation gate asks the user about this call instead of running the
    tool (it requires confirmation, and none came with the call), as ADK decides it."""
    return context.tool_confirmation is None and await tool.check_require_confirmation(args, context) is True


class _RecordedTools(BasePlugin):
    """Answers a replay's tool calls from its recording (see `ReplayLlm.tools_plugin`)."""

    def __init__(self, cursor: ReplayCursor, name: str) -> None:
        super().__init__(name=name)
        self.cursor = cursor
        script = cursor.script
        self.sent = _sent_responses(script)
        self.calls = {call.id for turn in script.turns for call in turn.tool_calls}
        configs = (loop.config for loop in map(script.session.get_loop, script.loop_ids) if loop is not None)
        self.agents = {
            config.name for config in configs if config is not None and isinstance(config.name, str)
        }

    async def before_tool_callback(
        self, *, tool: BaseTool, tool_args: dict[str, Any], tool_context: ToolContext
    ) -> Any:
        call_id = tool_context.function_call_id
        if call_id is None:
            return None
        if call_id not in self.calls and self.agents and tool_context.agent_name not in self.agents:
            return None  # another agent's call: its own replay (or its tool) answers it
        result = self.cursor.recorded_result(call_id, tool.name, tool_args)
        if (
            result is None
            or tool.name == _TRANSFER_TOOL
            or await _awaits_confirmation(tool, tool_args, tool_context)
        ):
            # ADK's transfer tool only tells ADK which agent takes over: answering it
            # would skip the transfer, so it runs (once checked against the recording).
            # A call awaiting the user's confirmation is held back by ADK's gate, which
            # asks for it as in the original run (the recorded answer, ADK's request): the
            # tool runs only once confirmed, in the resuming run, answered from its input.
            return None
        self.cursor.answered(call_id, result)  # what `PhiPlugin` records for the call
        return _tool_answer(result, self.sent.get(call_id))
