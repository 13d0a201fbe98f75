"""Replay and fork for LangChain / LangGraph: a chat model answering from a recording.

    model = ReplayChatModel(session, loop_id)          # tools="recorded", on_divergence="stop"
    agent = create_agent(model, tools=model.wrap_tools([add, mul]), system_prompt=...)
    with model.recording():                            # a Rerun{replay} loop of the original
        agent.invoke(inputs, {"callbacks": [PhiCallbackHandler()]})

`ReplayChatModel` turns each request into a `RequestShape` with the adapter's own
request converter (what ``PhiCallbackHandler(capture_requests=True)`` records), so an
unchanged agent matches its recording, and answers with the recorded reply as an
``AIMessage``. A recorded model failure is raised again (`RecordedModelError`, with
the recorded text), also one the run went on from: a LangChain model fails by raising,
so a fallback (``ModelFallbackMiddleware``) or a retry sees it as the original did; put
the replay model in their place too, to replay what answered after it. Past a fork
point (`until_turn`) or after a divergence with ``on_divergence="fallback"`` it hands
the call to `fallback`, any other chat model.

LangChain runs tools outside the model: `ReplayChatModel.wrap_tools` wraps the
agent's tools so that each call of a replayed turn is answered with its recorded
result (a recorded error as a ``ToolMessage`` with ``status="error"``, unless it ended
the recorded run: then it is raised as `RecordedToolError`, so the replay fails where
the original did; so is one the call's next recorded result followed, for a retry to
run it again) without running the tool, through LangChain's tool callbacks, so the
adapter records it as a tool execution. Works for any graph that runs ``BaseTool``s
(``create_agent``, LangGraph's ``ToolNode``).

Limits: a recorded result is a ``ToolMessage``, so a tool that returned a LangGraph
``Command`` (a handoff, a state update) must run live (leave it unwrapped); a tool
running live after a hand-over runs without callbacks of its own (the wrapper's run
is the recorded execution), so a graph it runs is not recorded as a sub-agent. Turns
answered by `fallback` keep its model name (``response_metadata``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.tools.base import ArgsSchema
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import PrivateAttr

from ...errors import RecordedToolError
from ...messages import (
    AssistantMessage,
    Content,
    ExtensionMessage,
    ImageContent,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolResultMessage,
    Usage,
)
from ...model import Session
from ...replay import Divergence, Lineage, OnDivergence, ReplayCursor, ReplayScript, ToolsMode
from .._core import ConvertedOnce, recorded_reply, replay_recording, result_text
from . import _INTERRUPTED, _json_encode, _request, converted_once

__all__ = ["RecordedToolError", "ReplayChatModel"]

_FINISH_REASONS: dict[str, str] = {"toolUse": "tool_calls", "length": "length"}


def _message_blocks(blocks: Sequence[Content]) -> str | list[str | dict[str, Any]]:
    """phi-core blocks as a LangChain message's content: one text as a string, else
    LangChain's standard blocks (which `_blocks` reads back as the same blocks)."""
    if not blocks:
        return ""
    if len(blocks) == 1 and type(blocks[0]) is TextContent:
        return blocks[0].text
    content: list[str | dict[str, Any]] = []
    for block in blocks:
        if type(block) is ThinkingContent:
            reasoning: dict[str, Any] = {"type": "reasoning", "reasoning": block.thinking}
            if block.signature is not None:
                reasoning["extras"] = {"signature": block.signature}
            content.append(reasoning)
        elif type(block) is ImageContent:
            content.append({"type": "image", "base64": block.data, "mime_type": block.mime_type})
        elif type(block) is TextContent:
            content.append({"type": "text", "text": block.text})
    return content


def _usage_metadata(usage: Usage) -> dict[str, Any]:
    """The inverse of `_usage`: LangChain's input count includes the cache's."""
    inputs = usage.input + usage.cache_read + usage.cache_write
    return {
        "input_tokens": inputs,
        "output_tokens": usage.output,
        "total_tokens": usage.total_tokens or inputs + usage.output,
        "input_token_details": {"cache_read": usage.cache_read, "cache_creation": usage.cache_write},
        "output_token_details": {"reasoning": usage.reasoning},
    }


def _ai_message(reply: AssistantMessage) -> AIMessage:
    """A recorded reply as the AIMessage the adapter records back as the same message:
    its text, reasoning and images, tool calls with their ids, usage, model, provider
    and stop reason."""
    calls = [block for block in reply.content if type(block) is ToolCall]
    content = _message_blocks([block for block in reply.content if type(block) is not ToolCall])
    metadata: dict[str, Any] = {
        "model_name": reply.model,
        "model_provider": reply.provider,
        "finish_reason": _FINISH_REASONS.get(reply.stop_reason, "stop"),
    }
    if isinstance(content, list):
        metadata["output_version"] = "v1"  # the content is standard blocks already
    return AIMessage(
        content=content,
        tool_calls=[
            {"id": call.id, "name": call.name, "args": call.arguments, "type": "tool_call"}
            for call in calls
            if isinstance(call.arguments, dict)
        ],
        invalid_tool_calls=[  # arguments that did not parse were recorded as the raw text
            {
                "id": call.id,
                "name": call.name,
                "args": call.arguments
                if isinstance(call.arguments, str)
                else _json_encode(call.arguments).decode(),
                "error": None,
                "type": "invalid_tool_call",
            }
            for call in calls
            if not isinstance(call.arguments, dict)
        ],
        usage_metadata=cast("Any", _usage_metadata(reply.usage)),
        response_metadata=metadata,
    )


def _tool_message(result: ToolResultMessage, call_id: str, name: str) -> ToolMessage:
    """A recorded tool result as the ToolMessage the tool's run returns."""
    return ToolMessage(
        content=cast("Any", _message_blocks(result.content)),
        tool_call_id=call_id,
        name=name,
        status="error" if result.is_error else "success",
    )


class ReplayChatModel(BaseChatModel):
    """A chat model that answers from a recorded run: the replay model of LangChain.

    Use it where the agent's chat model goes
    (``create_agent(model, ...)``, a graph's model node: it has ``bind_tools``), its
    tools wrapped by `wrap_tools` to answer tool calls from the recording, and run the
    agent inside `recording` with a `PhiCallbackHandler` to record the replay.

    Each model call's request (converted as the adapter records it: system prompt,
    messages, bound tools) is checked against the recorded turn's
    (`phi_session.replay.ReplayCursor`) and answered with the recorded reply as an
    ``AIMessage``: text, reasoning, tool calls with the recorded ids, ``usage_metadata``,
    ``response_metadata`` (model name, provider, finish reason), so the replayed
    loop records the same messages. Once the cursor hands over (a fork point, or a
    divergence with ``on_divergence="fallback"``) `fallback` answers, given the same
    messages and bound tools. Sync and async; a streaming caller gets each reply as
    one chunk. Makes no network call and spends no tokens until it hands over.
    """

    cursor: ReplayCursor
    fallback: BaseChatModel | None = None
    _converted: ConvertedOnce[BaseMessage] = PrivateAttr(default_factory=converted_once)
    """Each history message converted once: a graph resends the same message objects."""

    def __init__(
        self,
        recording: ReplayScript | Session,
        loop_id: str | None = None,
        *,
        chain: bool = False,
        on_divergence: OnDivergence = "stop",
        tools: ToolsMode = "recorded",
        until_turn: int | None = None,
        fallback: BaseChatModel | None = None,
        **kwargs: Any,
    ) -> None:
        """Replay `recording` (a `ReplayScript`, or a `Session` whose loop `loop_id`,
        default as `ReplayScript.from_session`, is replayed; `chain`: with the loops it continues).
        `until_turn`: fork there, `fallback` answering from that turn on;
        `on_divergence` and `tools` as for `ReplayCursor`. `until_turn` and
        ``on_divergence="fallback"`` need a `fallback`. `kwargs`: BaseChatModel's."""
        cursor = ReplayCursor.of(
            recording,
            loop_id,
            chain=chain,
            on_divergence=on_divergence,
            tools=tools,
            until_turn=until_turn,
            fallback=fallback is not None,
        )
        fields: dict[str, Any] = {"cursor": cursor, "fallback": fallback, **kwargs}
        super().__init__(**fields)

    @property
    def divergence(self) -> Divergence | None:
        """The first divergence, if any (``on_divergence="fallback"`` keeps it here)."""
        return self.cursor.divergence

    def recording(self, *, tag: str = "fork", change: Any = None) -> AbstractContextManager[Lineage]:
        """Run the agent inside: the adapter records the run into the original session, as
        a ``Rerun{replay}`` of the replayed loop, or for a fork (``until_turn``) a
        ``Branch{tag}`` whose metadata names the fork point and `change` (default: the
        fallback model's name, else its class's name)."""
        fallback = None
        if self.fallback is not None:
            # Where LangChain's chat models keep it (its ``ls_model_name`` comes from there).
            names = (getattr(self.fallback, attribute, None) for attribute in ("model_name", "model"))
            fallback = next(
                (name for name in names if isinstance(name, str) and name), self.fallback.get_name()
            )
        return replay_recording(self.cursor, tag=tag, change=change, fallback=fallback)

    def wrap_tools(self, tools: Sequence[BaseTool]) -> list[BaseTool]:
        """`tools` answering their calls from the recording (``tools="recorded"``) while
        the run replays, and running for real once handed over (or with ``tools="live"``).
        Each offers the model the same name, description and schema as the tool it wraps,
        and runs through LangChain's tool callbacks, so the adapter records the calls."""
        return [_RecordedTool.around(tool, self.cursor) for tool in tools]

    @property
    def _llm_type(self) -> str:
        return "phi-replay"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        # The replayed loop's config is the recorded one: same model, same provider.
        first = self.cursor.script.session.get_loop(self.cursor.script.loop_ids[0])
        config = first.config if first is not None else None
        params = super()._get_ls_params(stop=stop, **kwargs)
        if config is not None:
            params["ls_model_name"], params["ls_provider"] = config.model, config.provider
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

    def _recorded(self, messages: list[BaseMessage], kwargs: Mapping[str, Any]) -> ChatResult | None:
        # The request as the adapter records it (`_request`), so an unchanged agent matches.
        payload = _request(messages, {"tools": kwargs.get("tools")}, "", 0, self._converted)
        # A LangChain model fails by raising, even where the run went on (a fallback, a retry).
        reply = recorded_reply(self.cursor, payload, every_failure=True)
        return None if reply is None else ChatResult(generations=[ChatGeneration(message=_ai_message(reply))])

    def _handed_over(self, kwargs: Mapping[str, Any]) -> tuple[BaseChatModel, dict[str, Any]]:
        """The fallback model and this call's options for it, the tools bound its way."""
        if self.fallback is None:  # the cursor hands over only when a fallback was required
            raise ValueError("the replay handed over, but there is no fallback model")
        tools, options = kwargs.get("tools"), {k: v for k, v in kwargs.items() if k != "tools"}
        if not tools:
            return self.fallback, options
        bound = self.fallback.bind_tools(tools, **options)
        if isinstance(bound, RunnableBinding) and isinstance(bound.bound, BaseChatModel):
            return bound.bound, dict(bound.kwargs)
        if isinstance(bound, BaseChatModel):
            # Some models' bind_tools configures the model itself (or a copy) and returns
            # it: it holds the tools and the options then.
            return bound, {}
        raise TypeError(
            f"{type(self.fallback).__name__}.bind_tools returned neither a chat model nor its binding"
        )

    # The fallback is called with `generate`, without callbacks: the call's run (and its
    # turn) is this model's own. (`invoke` would inherit the graph's callbacks.)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = self._recorded(messages, kwargs)
        if result is None:
            model, options = self._handed_over(kwargs)
            result = _chat_result(model.generate([messages], stop=stop, **options))
        return result

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = self._recorded(messages, kwargs)
        if result is None:
            model, options = self._handed_over(kwargs)
            result = _chat_result(await model.agenerate([messages], stop=stop, **options))
        return result


def _chat_result(result: LLMResult) -> ChatResult:
    return ChatResult(
        generations=[cast("ChatGeneration", generation) for generation in result.generations[0]],
        llm_output=result.llm_output,
    )


def _interrupt_again(cursor: ReplayCursor, call_id: str) -> None:
    """Stop the replayed run where tool call `call_id` called LangGraph's ``interrupt()``
    in the recorded one (its result ``[interrupted]``), with the value it was recorded
    with: the run resuming it is then answered with the result the resumed run recorded
    (`ReplayCursor.recorded_result`'s next one). The value is the one the loop recorded
    for the call (the interrupts in the order of the turn's interrupted calls), None
    where they do not match up."""
    from langgraph.types import interrupt  # the extra's: an interrupted run used LangGraph

    turn = cursor.turn_of(call_id)
    loop = None if turn is None else cursor.script.session.get_loop(turn.loop_id)
    values = [
        item.get("value")
        for message in (() if loop is None else loop.messages)
        if isinstance(message, ExtensionMessage) and message.kind == "langgraph.interrupt"
        for item in (message.data if isinstance(message.data, list) else ())
        if isinstance(item, dict)
    ]
    paused = (
        []
        if turn is None
        else [
            result.tool_call_id
            for result in turn.tool_results
            if not result.is_error and result_text(result) == _INTERRUPTED
        ]
    )
    value = values[paused.index(call_id)] if len(values) == len(paused) and call_id in paused else None
    interrupt(value)


class _RecordedTool(BaseTool):
    """A tool answering its calls from a replay's recording (see `ReplayChatModel.wrap_tools`)."""

    tool: BaseTool
    cursor: ReplayCursor

    @classmethod
    def around(cls, tool: BaseTool, cursor: ReplayCursor) -> _RecordedTool:
        return cls(
            name=tool.name,
            description=tool.description,
            args_schema=tool.args_schema,
            return_direct=tool.return_direct,
            tool=tool,
            cursor=cursor,
        )

    @property
    def tool_call_schema(self) -> ArgsSchema:
        # The wrapped tool's, as it is (and memoized there): what the model is offered.
        return self.tool.tool_call_schema

    def _to_args_and_kwargs(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # The call as the model made it, unvalidated: the recording is asked about the
        # call itself, and the wrapped tool validates what it runs.
        return (), {"tool_input": tool_input, "call_id": tool_call_id}

    def _answer(self, tool_input: str | dict[str, Any], call_id: str | None) -> ToolMessage | None:
        if call_id is None:
            return None  # not a model's tool call: nothing recorded to answer with
        arguments = self._filter_injected_args(tool_input) if isinstance(tool_input, dict) else tool_input
        result = self.cursor.recorded_result(call_id, self.name, arguments)
        if result is None:
            return None
        if not result.is_error and result_text(result) == _INTERRUPTED:
            _interrupt_again(self.cursor, call_id)
        return _tool_message(result, call_id, self.name)

    def _run(self, tool_input: str | dict[str, Any], call_id: str | None, config: RunnableConfig) -> Any:
        answer = self._answer(tool_input, call_id)
        if answer is not None:
            return answer
        # Live, without callbacks: this tool's own run is the execution the adapter records.
        return self.tool.run(tool_input, tool_call_id=call_id, config=config)

    async def _arun(
        self, tool_input: str | dict[str, Any], call_id: str | None, config: RunnableConfig
    ) -> Any:
        answer = self._answer(tool_input, call_id)
        if answer is not None:
            return answer
        return await self.tool.arun(tool_input, tool_call_id=call_id, config=config)
