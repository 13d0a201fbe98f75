"""Framework adapters (issue 12, item 8): the cost of recording a framework's runs.

Per framework, RUNS runs of 4 turns x 2 tools on the framework's fake model; the
median per run of: the bare run, the run with a no-op hook that only appends tuples
(the framework's own dispatch floor), and the run with our adapter into a
`SessionRecorder`. Targets: adapter <= 1.10x bare and <= floor + 5%.

Usage: python benchmarks/bench_adapters.py [--runs N]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

RUNS = 200


def medians_ms(runs: int, *variants: Callable[[], object]) -> list[float]:
    """The median time per run of each variant, in ms; the variants take turns run by
    run, so that a machine getting busier or quieter weighs on all of them alike."""
    for run in variants:
        run()  # warm up
    times: list[list[float]] = [[] for _ in variants]
    gc.collect()
    for _ in range(runs):
        for run, spent in zip(variants, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1000 for spent in times]


def report(framework: str, bare: float, floor: float, ours: float) -> None:
    print(f"{framework}: bare {bare:.2f} ms, no-op hook {floor:.2f} ms ({floor / bare:.2f}x), "
          f"adapter {ours:.2f} ms ({ours / bare:.2f}x)")
    print(f"  adapter <= 1.10x bare: {'PASS' if ours <= 1.10 * bare else 'MISS'}")
    print(f"  adapter <= floor + 5%: {'PASS' if ours <= 1.05 * floor else 'MISS'}")


# -- LangChain / LangGraph ---------------------------------------------------------------------------


def bench_langchain(runs: int) -> None:
    try:
        from langchain.agents import create_agent
        from langchain_core.callbacks import BaseCallbackHandler
        from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
        from langchain_core.messages import AIMessage
        from langchain_core.tools import tool
    except ImportError:
        print("langchain: skipped (pip install 'phi-session[test]')")
        return
    from phi_session import SessionRecorder
    from phi_session.adapters.langchain import PhiCallbackHandler

    class Chat(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return f"value of {key}"

    def script() -> Chat:
        usage: Any = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}
        replies = [AIMessage(content="", usage_metadata=usage, tool_calls=[
            {"id": f"c{turn}{n}", "name": "lookup", "args": {"key": f"k{turn}{n}"}} for n in range(2)])
            for turn in range(3)]
        # one run takes exactly these four replies: cycling them serves every run
        return Chat(messages=itertools.cycle([*replies, AIMessage(content="done", usage_metadata=usage)]))

    class NoOp(BaseCallbackHandler):
        """The dispatch floor: every callback the adapter uses, appending a tuple."""

        run_inline = True

        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            self.seen.append(("chain_start", kwargs["run_id"]))

        def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
            self.seen.append(("chain_end", kwargs["run_id"]))

        def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
            self.seen.append(("chat_model_start", kwargs["run_id"]))

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            self.seen.append(("llm_end", kwargs["run_id"]))

        def on_tool_start(self, serialized: Any, input_str: str, **kwargs: Any) -> None:
            self.seen.append(("tool_start", kwargs["run_id"]))

        def on_tool_end(self, output: Any, **kwargs: Any) -> None:
            self.seen.append(("tool_end", kwargs["run_id"]))

    inputs = {"messages": [("user", "look up six keys")]}
    recorder = SessionRecorder()
    handler = PhiCallbackHandler([recorder])

    agent = create_agent(script(), tools=[lookup])

    def run(callbacks: list[Any]) -> Callable[[], object]:
        return lambda: agent.invoke(inputs, {"callbacks": callbacks})

    bare, floor, ours = medians_ms(runs, run([]), run([NoOp()]), run([handler]))
    recorder.flush()
    report("langchain (create_agent)", bare, floor, ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    bench_langchain(args.runs)


if __name__ == "__main__":
    main()
