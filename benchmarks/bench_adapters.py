"""Framework adapters (issue 12, item 8): the cost of recording a run.

Per framework, N runs (default 200) of an agent on the framework's own fake model making
4 model requests of 2 tool calls each and then answering; the median time per run of
three variants, interleaved run by run so drift hits them alike:

* bare: the run as the framework does it;
* floor: with a no-op hook on the same callbacks our adapter uses, that only appends
  tuples (the framework's own dispatch cost);
* adapter: with our adapter recording into a `SessionRecorder`.

Targets: adapter <= 1.10x bare and <= floor + 5%.

Usage: python benchmarks/bench_adapters.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

TURNS = 4  # model requests that call tools
TOOLS = 2  # tool calls per such request


def report(framework: str, medians: dict[str, float]) -> bool:
    bare, floor, adapter = medians["bare"], medians["floor"], medians["adapter"]
    ok = adapter <= 1.10 * bare and adapter <= 1.05 * floor
    print(f"{framework}: bare {bare * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms ({floor / bare:.3f}x), "
          f"adapter {adapter * 1e3:.2f} ms ({adapter / bare:.3f}x bare, {adapter / floor:.3f}x floor) "
          f"{'PASS' if ok else 'MISS'}")
    return ok


async def medians_of(runs: int, variants: dict[str, Callable[[], Awaitable[object]]]) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        await run()
    for _ in range(runs):
        for name, run in variants.items():
            start = time.perf_counter()
            await run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# -- pydantic-ai -------------------------------------------------------------------------------------


def bench_pydantic_ai(runs: int) -> bool:
    from pydantic_ai import Agent, CallToolsNode
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import RequestUsage

    from phi_session.adapters.pydantic_ai import PhiCapability
    from phi_session.recorder import SessionRecorder

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        step = sum(1 for m in messages if isinstance(m, ModelResponse))
        usage = RequestUsage(input_tokens=100, output_tokens=20)
        if step < TURNS:
            return ModelResponse(parts=[
                TextPart("checking"),
                *(ToolCallPart("lookup", {"key": f"k{step}.{i}"}, tool_call_id=f"c{step}.{i}")
                  for i in range(TOOLS))], usage=usage)
        return ModelResponse(parts=[TextPart("done")], usage=usage)

    def lookup(key: str) -> str:
        return f"value of {key}"

    class Floor(AbstractCapability[Any]):
        """The callbacks PhiCapability uses, each only appending a tuple."""

        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        async def wrap_run(self, ctx: Any, *, handler: Any) -> Any:
            self.seen.append(("run", ctx.run_id))
            result = await handler()
            self.seen.append(("run end", ctx.run_id))
            return result

        async def before_model_request(self, ctx: Any, request_context: Any) -> Any:
            self.seen.append(("request", ctx.run_id))
            return request_context

        async def after_model_request(self, ctx: Any, *, request_context: Any, response: Any) -> Any:
            self.seen.append(("response", ctx.run_id, response))
            return response

        async def after_node_run(self, ctx: Any, *, node: Any, result: Any) -> Any:
            if isinstance(node, CallToolsNode):
                self.seen.append(("tools done", ctx.run_id))
            return result

        async def wrap_tool_execute(self, ctx: Any, *, call: Any, tool_def: Any, args: Any,
                                    handler: Any) -> Any:
            self.seen.append(("tool", call.tool_call_id))
            result = await handler(args)
            self.seen.append(("tool end", call.tool_call_id, result))
            return result

    recorder = SessionRecorder()
    agents = {
        "bare": Agent(FunctionModel(model), tools=[lookup]),
        "floor": Agent(FunctionModel(model), tools=[lookup], capabilities=[Floor()]),
        "adapter": Agent(FunctionModel(model), tools=[lookup], capabilities=[PhiCapability(recorder)]),
    }

    def runner(agent: Agent[None, str]) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            return await agent.run("go")
        return run

    medians = asyncio.run(medians_of(runs, {name: runner(agent) for name, agent in agents.items()}))
    loops = sum(len(s.loops) for s in recorder.sessions())
    assert loops == runs + 1, f"recorded {loops} loops for {runs + 1} runs"
    return report("pydantic-ai", medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    bench_pydantic_ai(args.runs)


if __name__ == "__main__":
    main()
