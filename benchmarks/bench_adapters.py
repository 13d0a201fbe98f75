"""Framework adapters (issue 12, item 8): what recording costs a framework run.

Per framework, `RUNS` runs of 4 turns x 2 tools (then the answer) on the framework's
fake model, median per run: the bare run, the run with a no-op hook that only appends
tuples (the framework's own dispatch floor), and the run with our adapter into a
`SessionRecorder`. Targets: adapter <= 1.10x bare and <= floor + 5%.

Times are the process's CPU time (`time.process_time`): the frameworks run their
runs in this thread, and CPU time stays meaningful on a loaded machine where wall
time mostly measures waiting for a core.

Usage: python benchmarks/bench_adapters.py [--runs N] [--inflation]

``--inflation`` measures instead why the adapters cost more in place than their work
does: see `langchain_inflation`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from phi_session import SessionRecorder

TURNS, TOOLS = 4, 2


def report(framework: str, bare: float, floor: float, adapter: float) -> None:
    """One framework's medians (seconds per run) and the targets' verdicts."""
    vs_bare, vs_floor = adapter / bare, adapter / floor
    ok = vs_bare <= 1.10 and vs_floor <= 1.05
    print(
        f"{framework:14} bare {bare * 1e3:7.2f} ms  floor {floor * 1e3:7.2f} ms ({floor / bare:.2f}x)  "
        f"adapter {adapter * 1e3:7.2f} ms ({vs_bare:.2f}x bare, floor +{(vs_floor - 1) * 100:.1f}%)  "
        f"{'PASS' if ok else 'MISS'}"
    )


async def medians_async(runs: int, variants: list[Callable[[int], Awaitable[object]]]) -> list[float]:
    """The median time per run of each variant; runs interleave, so drift hits all alike.
    A run that returns a float timed itself (its setup left out)."""
    for i in range(3):  # warm up
        for run in variants:
            await run(-1 - i)
    times: list[list[float]] = [[] for _ in variants]
    for i in range(runs):
        if i % 50 == 0:
            gc.collect()
        for run, spent in zip(variants, times, strict=True):
            started = time.process_time()
            timed = await run(i)
            spent.append(timed if isinstance(timed, float) else time.process_time() - started)
    return [statistics.median(spent) for spent in times]


def medians(runs: int, variants: list[Callable[[], object]]) -> list[float]:
    """`medians_async` for frameworks whose runs are plain calls."""

    def awaitable(run: Callable[[], object]) -> Callable[[int], Awaitable[object]]:
        async def one(i: int) -> object:
            return run()

        return one

    return asyncio.run(medians_async(runs, [awaitable(run) for run in variants]))


# -- the run every framework makes: TURNS turns of TOOLS lookups, then the answer ---------------
# (bench_replay.py records and replays the same runs)


def lookup(key: str) -> str:
    """Looks a key up."""
    return key.upper()


def openai_agents_workload() -> tuple[Any, list[Any], Any]:
    """The SDK's `ScriptedModel` (emitting traces), the steps one run takes from it, and
    the lookup tool."""
    from agents import function_tool
    from agents.testing.model import ScriptedModel, assistant_message, function_call

    steps: list[Any] = [
        [function_call("lookup", {"key": f"{turn}.{i}"}, call_id=f"call-{turn}-{i}") for i in range(TOOLS)]
        for turn in range(TURNS)
    ]
    steps.append([assistant_message("done")])
    return ScriptedModel(emit_traces=True), steps, function_tool(lookup)


def pydantic_ai_model() -> Any:
    """A `FunctionModel` calling TOOLS tools on each of TURNS turns (counted from the
    history), then answering."""
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import RequestUsage

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turn = sum(1 for message in messages if isinstance(message, ModelResponse))
        usage = RequestUsage(input_tokens=100, output_tokens=20)
        if turn < TURNS:
            calls = [
                ToolCallPart("lookup", {"key": f"{turn}.{i}"}, tool_call_id=f"c{turn}.{i}")
                for i in range(TOOLS)
            ]
            return ModelResponse(parts=[TextPart("checking"), *calls], usage=usage)
        return ModelResponse(parts=[TextPart("done")], usage=usage)

    return FunctionModel(model)


def google_adk_model() -> Any:
    """A scripted ADK `BaseLlm` calling TOOLS tools on each of TURNS turns (counted from
    the request), then answering."""
    from google.adk.models.base_llm import BaseLlm
    from google.adk.models.llm_request import LlmRequest
    from google.adk.models.llm_response import LlmResponse
    from google.genai import types

    usage = types.GenerateContentResponseUsageMetadata(prompt_token_count=100, candidates_token_count=20)

    class FakeModel(BaseLlm):
        async def generate_content_async(
            self, llm_request: LlmRequest, stream: bool = False
        ) -> AsyncGenerator[LlmResponse, None]:
            turn = sum(1 for content in llm_request.contents if content.role == "model")
            if turn < TURNS:
                calls = [types.FunctionCall(name="lookup", args={"key": f"{turn}.{i}"}) for i in range(TOOLS)]
                parts = [types.Part(function_call=call) for call in calls]
            else:
                parts = [types.Part(text="done")]
            yield LlmResponse(content=types.Content(role="model", parts=parts), usage_metadata=usage)

    return FakeModel(model="fake")


def langchain_model(*, offers_tools: bool = False) -> Any:
    """LangChain's fake chat model with ``bind_tools``; its replies cycle: one run takes
    TOOLS tool calls on each of TURNS turns, then the answer. `offers_tools`: the bound
    tools reach the model's request (so that a recording captures them)."""
    import itertools

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    usage: Any = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}

    class FakeModel(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            if not offers_tools:
                return self
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    replies = [
        AIMessage(
            content="",
            usage_metadata=usage,
            tool_calls=[
                {"id": f"c{turn}.{i}", "name": "lookup", "args": {"key": f"{turn}.{i}"}} for i in range(TOOLS)
            ],
        )
        for turn in range(TURNS)
    ]
    return FakeModel(messages=itertools.cycle([*replies, AIMessage(content="done", usage_metadata=usage)]))


# -- OpenAI Agents SDK --------------------------------------------------------------------------


def bench_openai_agents(runs: int) -> None:
    from agents import Agent, RunHooks, Runner
    from agents.tracing import TracingProcessor, set_trace_processors

    from phi_session.adapters import openai_agents

    model, steps, tool = openai_agents_workload()
    agent = Agent(name="bench", model=model, tools=[tool])
    seen: list[tuple[object, ...]] = []

    class NoOpProcessor(TracingProcessor):
        def on_trace_start(self, trace: Any) -> None:
            seen.append(("trace", trace))

        def on_trace_end(self, trace: Any) -> None:
            seen.append(("trace end", trace))

        def on_span_start(self, span: Any) -> None:
            seen.append(("span", span))

        def on_span_end(self, span: Any) -> None:
            seen.append(("span end", span))

        def shutdown(self) -> None:
            pass

        def force_flush(self) -> None:
            pass

    class NoOpHooks(RunHooks[Any]):
        async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
            seen.append(("tool", context))

    # Trace processors are global to the SDK: each run sets its variant's before it starts
    # (untimed), so that the variants' runs interleave like the other frameworks'.
    def variant(
        processors: list[TracingProcessor], hooks: RunHooks[Any] | None
    ) -> Callable[[int], Awaitable[object]]:
        async def one(i: int) -> object:
            set_trace_processors(processors)
            model.extend(steps)
            started = time.process_time()
            await Runner.run(agent, "go", hooks=hooks, max_turns=TURNS + 2)
            return time.process_time() - started

        return one

    async def all_three() -> list[float]:
        recorder = SessionRecorder()
        openai_agents.install([recorder], replace_default=True)
        try:
            phi = openai_agents.processor()
            variants = [
                variant([], None),  # bare: the SDK makes its spans, nobody listens
                variant([NoOpProcessor()], NoOpHooks()),
                variant([phi], openai_agents.PhiRunHooks()),
            ]
            medians = await medians_async(runs, variants)
        finally:
            openai_agents.uninstall()
        loops = sum(len(s.loops) for s in recorder.sessions())
        assert loops == runs + 3, loops  # every run recorded (and the warm-ups)
        return medians

    report("openai-agents", *asyncio.run(all_three()))


# -- Google ADK ---------------------------------------------------------------------------------


def bench_google_adk(runs: int) -> None:
    from google.adk.agents import LlmAgent
    from google.adk.plugins.base_plugin import BasePlugin
    from google.adk.runners import InMemoryRunner
    from google.genai import types

    from phi_session.adapters.google_adk import PhiPlugin

    class NoOpPlugin(BasePlugin):
        """Appends a tuple per callback PhiPlugin implements: ADK's own plugin dispatch."""

        def __init__(self) -> None:
            super().__init__(name="noop")
            self.seen: list[tuple[str, Any]] = []

    def appender(callback: str, argument: str) -> Callable[..., Awaitable[None]]:
        async def append(self: NoOpPlugin, **kwargs: Any) -> None:
            self.seen.append((callback, kwargs[argument]))

        return append

    for callback, argument in [
        ("before_run_callback", "invocation_context"),
        ("after_run_callback", "invocation_context"),
        ("after_agent_callback", "agent"),
        ("before_model_callback", "llm_request"),
        ("after_model_callback", "llm_response"),
        ("on_event_callback", "event"),
        ("before_tool_callback", "tool_args"),
        ("after_tool_callback", "result"),
    ]:
        setattr(NoOpPlugin, callback, appender(callback, argument))

    def runner(plugins: list[BasePlugin]) -> InMemoryRunner:
        agent = LlmAgent(name="bench", model=google_adk_model(), tools=[lookup])
        return InMemoryRunner(agent=agent, app_name="bench", plugins=plugins)

    def variant(plugins: list[BasePlugin]) -> Callable[[int], Awaitable[None]]:
        r = runner(plugins)
        message = types.Content(role="user", parts=[types.Part(text="go")])

        async def one(i: int) -> None:
            await r.session_service.create_session(app_name="bench", user_id="u", session_id=f"s{i}")
            async for _ in r.run_async(user_id="u", session_id=f"s{i}", new_message=message):
                pass

        return one

    async def all_three() -> list[float]:
        recorder = SessionRecorder()
        plugins: list[list[BasePlugin]] = [[], [NoOpPlugin()], [PhiPlugin([recorder])]]
        medians = await medians_async(runs, [variant(p) for p in plugins])
        recorder.flush()
        loops = sum(len(s.loops) for s in recorder.sessions())
        assert loops == runs + 3, loops  # every run recorded (and the warm-ups)
        return medians

    report("google-adk", *asyncio.run(all_three()))


# -- pydantic-ai --------------------------------------------------------------------------------


def bench_pydantic_ai(runs: int) -> None:
    from pydantic_ai import Agent, CallToolsNode
    from pydantic_ai.capabilities import AbstractCapability

    from phi_session.adapters.pydantic_ai import PhiCapability

    class NoOpCapability(AbstractCapability[Any]):
        """Appends a tuple per hook PhiCapability implements: pydantic-ai's own hook dispatch."""

        def __init__(self) -> None:
            self.seen: list[tuple[str, Any]] = []

        async def wrap_run(self, ctx: Any, *, handler: Any) -> Any:
            self.seen.append(("run", ctx.run_id))
            result = await handler()
            self.seen.append(("run end", result))
            return result

        async def before_model_request(self, ctx: Any, request_context: Any) -> Any:
            self.seen.append(("request", request_context))
            return request_context

        async def after_model_request(self, ctx: Any, *, request_context: Any, response: Any) -> Any:
            self.seen.append(("response", response))
            return response

        async def after_node_run(self, ctx: Any, *, node: Any, result: Any) -> Any:
            if isinstance(node, CallToolsNode):
                self.seen.append(("tools done", result))
            return result

        async def wrap_tool_execute(
            self, ctx: Any, *, call: Any, tool_def: Any, args: Any, handler: Any
        ) -> Any:
            self.seen.append(("tool", call))
            result = await handler(args)
            self.seen.append(("tool end", result))
            return result

    def variant(capabilities: list[AbstractCapability[Any]]) -> Callable[[int], Awaitable[object]]:
        agent = Agent(pydantic_ai_model(), tools=[lookup], capabilities=capabilities)

        async def one(i: int) -> object:
            return await agent.run("go")

        return one

    async def all_three() -> list[float]:
        recorder = SessionRecorder()
        capabilities: list[list[AbstractCapability[Any]]] = [
            [],
            [NoOpCapability()],
            [PhiCapability(recorder)],
        ]
        medians = await medians_async(runs, [variant(c) for c in capabilities])
        loops = sum(len(s.loops) for s in recorder.sessions())
        assert loops == runs + 3, loops  # every run recorded (and the warm-ups)
        return medians

    report("pydantic-ai", *asyncio.run(all_three()))


# -- LangChain / LangGraph ---------------------------------------------------------------------------


_LANGCHAIN_CALLBACKS = (
    "on_chain_start",
    "on_chain_end",
    "on_chain_error",
    "on_chat_model_start",
    "on_llm_new_token",
    "on_llm_end",
    "on_llm_error",
    "on_tool_start",
    "on_tool_end",
    "on_tool_error",
)
"""The callbacks PhiCallbackHandler uses."""


def langchain_handler(
    work: Callable[[], object] | None = None, tape: list[tuple[str, Any, Any]] | None = None
) -> Any:
    """A LangChain handler appending a tuple per callback PhiCallbackHandler uses
    (LangChain's own dispatch); first calling `work` when given; keeping each call's
    arguments in `tape` when given."""
    from langchain_core.callbacks import BaseCallbackHandler

    class NoOp(BaseCallbackHandler):
        run_inline = True

        def __init__(self) -> None:
            self.seen: list[tuple[str, Any]] = []

    def appender(callback: str) -> Callable[..., None]:
        def append(self: NoOp, *args: Any, **kwargs: Any) -> None:
            if work is not None:
                work()
            if tape is not None:
                tape.append((callback, args, kwargs))
            self.seen.append((callback, kwargs["run_id"]))

        return append

    for callback in _LANGCHAIN_CALLBACKS:
        setattr(NoOp, callback, appender(callback))
    return NoOp()


def langchain_agent() -> tuple[Any, dict[str, Any]]:
    """`create_agent` on the fake model with the lookup tool, and one run's input."""
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    return create_agent(langchain_model(), tools=[tool(lookup)]), {"messages": [("user", "go")]}


def bench_langchain(runs: int) -> None:
    from phi_session.adapters.langchain import PhiCallbackHandler

    agent, inputs = langchain_agent()
    recorder = SessionRecorder()

    def variant(callbacks: list[Any]) -> Callable[[], object]:
        return lambda: agent.invoke(inputs, {"callbacks": callbacks})

    handlers: list[list[Any]] = [[], [langchain_handler()], [PhiCallbackHandler([recorder])]]
    result = medians(runs, [variant(h) for h in handlers])
    recorder.flush()
    loops = sum(len(s.loops) for s in recorder.sessions())
    assert loops == runs + 3, loops  # every run recorded (and the warm-ups)
    report("langchain", *result)


def langchain_inflation(runs: int) -> None:
    """What work in a LangChain callback costs in place, against the same work warm.

    Two handlers: one that only sums integers in each callback (almost no memory
    touched), and the adapter into a recorder. Warm: the callbacks of one recorded run
    replayed against the handler alone, fresh run ids each time. In place: the run's
    median over the no-op floor, interleaved as in `bench_langchain`.
    """
    import uuid

    from phi_session.adapters.langchain import PhiCallbackHandler

    agent, inputs = langchain_agent()
    calls: list[tuple[str, Any, Any]] = []
    agent.invoke(inputs, {"callbacks": [langchain_handler(tape=calls)]})

    def arithmetic() -> int:
        return sum(range(300))

    def replayed(handler: Any) -> float:
        """Median CPU seconds of the recorded run's callbacks, replayed against `handler`."""
        spent = []
        for i in range(runs + 20):
            ids: dict[Any, uuid.UUID] = {}
            started = time.process_time()
            for name, args, kwargs in calls:
                kwargs = dict(kwargs)
                for key in ("run_id", "parent_run_id"):
                    if kwargs.get(key) is not None:
                        kwargs[key] = ids.setdefault(kwargs[key], uuid.UUID(int=len(ids) + 1 + i * 1000))
                getattr(handler, name)(*args, **kwargs)
            if i >= 20:  # warmed up
                spent.append(time.process_time() - started)
        return statistics.median(spent)

    floor = langchain_handler()
    adapter = PhiCallbackHandler([SessionRecorder()])
    subjects = {"arithmetic": langchain_handler(arithmetic), "adapter": adapter}
    baseline = replayed(floor)  # the replay's own cost (run ids, calls) and the floor's
    warm = {name: replayed(handler) - baseline for name, handler in subjects.items()}

    def variant(handler: Any) -> Callable[[], object]:
        return lambda: agent.invoke(inputs, {"callbacks": [handler]})

    in_place = medians(runs, [variant(floor), *map(variant, subjects.values())])
    print(f"langchain, {len(calls)} callbacks a run: the cost of a handler over the no-op floor")
    for (name, cost), placed in zip(warm.items(), in_place[1:], strict=True):
        over = placed - in_place[0]
        print(f"  {name:11} warm {cost * 1e3:5.2f} ms  in place {over * 1e3:5.2f} ms  ({over / cost:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--inflation",
        action="store_true",
        help="only: LangChain callbacks' cost in place against the same work warm",
    )
    args = parser.parse_args()
    print(f"median CPU time per run of {args.runs} runs, {TURNS} turns x {TOOLS} tools")
    if args.inflation:
        langchain_inflation(args.runs)
        return
    bench_openai_agents(args.runs)
    bench_google_adk(args.runs)
    bench_pydantic_ai(args.runs)
    bench_langchain(args.runs)


if __name__ == "__main__":
    main()
