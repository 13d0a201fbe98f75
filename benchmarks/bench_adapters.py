"""Framework adapters: what recording costs a framework's run (issue 12, item 8).

Per framework, 200 runs (``--runs``) of an agent doing 4 turns of 2 tool calls each
(then its final answer) on the framework's fake model, timed one run at a time; the
median run of each of three variants:

* **bare**: the framework alone;
* **floor**: with a no-op hook that only appends tuples (the framework's own
  dispatch cost: the least any hook-based recorder can cost);
* **adapter**: with phi-session's adapter recording into a `SessionRecorder`.

Targets: adapter <= 1.10x bare and <= floor + 5%. A framework whose extra is not
installed is skipped. Each framework has a section: a function ``bench_<name>(runs)``
returning `Figures`, listed in `SECTIONS`.

Usage: python benchmarks/bench_adapters.py [--runs N] [--only NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from phi_session.recorder import SessionRecorder

TURNS, TOOLS_PER_TURN = 4, 2
WARMUP = 10


@dataclass
class Figures:
    """Median seconds per run of each variant."""

    framework: str
    bare: float
    floor: float
    adapter: float

    def report(self) -> bool:
        """Print the figures; True when both targets are met."""
        to_bare, to_floor = self.adapter / self.bare, self.adapter / self.floor
        ok = to_bare <= 1.10 and to_floor <= 1.05
        print(f"{self.framework:>14}: bare {self.bare * 1e3:7.2f} ms  floor {self.floor * 1e3:7.2f} ms "
              f"({self.floor / self.bare:.2f}x)  adapter {self.adapter * 1e3:7.2f} ms  "
              f"= {to_bare:.2f}x bare, {to_floor:.2f}x floor  {'PASS' if ok else 'MISS'}")
        return ok


def median_run(runs: int, one_run: Callable[[], object]) -> float:
    """The median time of `runs` calls of `one_run`, after a warm-up, without GC pauses."""
    for _ in range(WARMUP):
        one_run()
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            start = time.perf_counter()
            one_run()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return statistics.median(times)


# -- OpenAI Agents SDK ---------------------------------------------------------------------


def bench_openai_agents(runs: int) -> Figures:
    from agents import Agent, RunHooks, Runner, function_tool
    from agents.testing.model import ScriptedModel, assistant_message, function_call
    from agents.tracing import TracingProcessor, set_trace_processors

    from phi_session.adapters import openai_agents

    @function_tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return key.upper()

    steps: list[Any] = [
        [function_call("lookup", {"key": f"k{turn}-{tool}"}, call_id=f"call-{turn}-{tool}")
         for tool in range(TOOLS_PER_TURN)]
        for turn in range(TURNS)
    ]
    steps.append([assistant_message("done")])
    model = ScriptedModel(emit_traces=True)
    agent = Agent(name="bench", model=model, tools=[lookup])
    seen: list[tuple[object, ...]] = []

    class NoOpProcessor(TracingProcessor):
        def on_trace_start(self, trace: Any) -> None:
            seen.append(("trace", trace))

        def on_trace_end(self, trace: Any) -> None:
            seen.append(("trace_end", trace))

        def on_span_start(self, span: Any) -> None:
            seen.append(("span", span))

        def on_span_end(self, span: Any) -> None:
            seen.append(("span_end", span))

        def shutdown(self) -> None:
            pass

        def force_flush(self) -> None:
            pass

    class NoOpHooks(RunHooks[Any]):
        async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
            seen.append(("tool", context))

    def one_run(hooks: RunHooks[Any] | None) -> Callable[[], object]:
        def run() -> object:
            model.extend(steps)
            return asyncio.run(Runner.run(agent, "go", hooks=hooks, max_turns=TURNS + 2))
        return run

    set_trace_processors([])  # bare: the SDK creates its spans, nobody listens
    bare = median_run(runs, one_run(None))
    set_trace_processors([NoOpProcessor()])
    floor = median_run(runs, one_run(NoOpHooks()))
    set_trace_processors([])
    openai_agents.install([SessionRecorder()], replace_default=True)
    try:
        adapter = median_run(runs, one_run(openai_agents.PhiRunHooks()))
    finally:
        openai_agents.uninstall()
    return Figures("openai-agents", bare, floor, adapter)


SECTIONS: dict[str, Callable[[int], Figures]] = {
    "openai-agents": bench_openai_agents,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--only", choices=sorted(SECTIONS))
    args = parser.parse_args()
    print(f"median per run of {args.runs} runs ({TURNS} turns x {TOOLS_PER_TURN} tools, fake model)")
    for name, section in SECTIONS.items():
        if args.only not in (None, name):
            continue
        try:
            figures = section(args.runs)
        except ImportError as error:
            print(f"{name:>14}: skipped ({error})")
            continue
        figures.report()


if __name__ == "__main__":
    main()
