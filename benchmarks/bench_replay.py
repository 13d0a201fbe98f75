"""Replay (issue 15, item 5): what replaying a recorded run costs against running it.

Per framework, the run of `bench_adapters` (4 turns x 2 tools, then the answer)
recorded by the framework's adapter, then `RUNS` runs of each variant, interleaved,
median per run:

* fake: the run on the framework's fake model, recorded by the adapter;
* replay: the same agent answered by the framework's replay model from the
  recording (``tools="recorded"``: no model, no tool runs), every request checked
  against the recorded one, recorded by the adapter as a ``Rerun{replay}`` loop of
  the original session.

Target: replay <= 1.10x fake. Times are CPU time (`time.process_time`), as in
`bench_adapters`: they stay meaningful on a loaded machine.

Usage: python benchmarks/bench_replay.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from bench_adapters import (  # lives next to this script: the same runs
    TOOLS,
    TURNS,
    google_adk_model,
    langchain_model,
    lookup,
    medians_async,
    openai_agents_workload,
    pydantic_ai_model,
)

from phi_session import SessionRecorder
from phi_session.replay import ReplayScript, recording_as, replay_lineage

TARGET = 1.10


def report(framework: str, fake: float, replay: float) -> None:
    ratio = replay / fake
    print(
        f"{framework:14} fake {fake * 1e3:7.2f} ms  replay {replay * 1e3:7.2f} ms  "
        f"({ratio:.2f}x)  {'PASS' if ratio <= TARGET else 'MISS'}"
    )


def recorded_script(recorder: SessionRecorder) -> ReplayScript:
    (session,) = recorder.sessions()
    return ReplayScript.from_session(session, session.loops[0].loop_id)


def replaying(
    script: ReplayScript, run: Callable[[int], Awaitable[object]]
) -> Callable[[int], Awaitable[object]]:
    """`run` recorded as a replay of `script` (each run its own Rerun{replay} loop)."""
    lineage = replay_lineage(script)

    async def one(i: int) -> object:
        with recording_as(lineage):
            return await run(i)

    return one


# -- OpenAI Agents SDK --------------------------------------------------------------------------


def bench_openai_agents(runs: int) -> None:
    from agents import Agent, RunConfig, Runner

    from phi_session.adapters import openai_agents

    model, steps, tool = openai_agents_workload()
    agent = Agent(name="bench", model=model, tools=[tool])
    hooks = openai_agents.PhiRunHooks()
    config = RunConfig(trace_metadata={"phi.session_id": "bench-original"})

    async def fake(i: int) -> object:
        model.extend(steps)
        return await Runner.run(agent, "go", hooks=hooks, max_turns=TURNS + 2)

    async def measure() -> list[float]:
        recorder = SessionRecorder()
        openai_agents.install([recorder], replace_default=True, capture_requests=True)
        try:
            model.extend(steps)
            await Runner.run(agent, "go", hooks=hooks, run_config=config, max_turns=TURNS + 2)
        finally:
            openai_agents.uninstall()
        script = recorded_script(recorder)

        async def replay(i: int) -> object:
            replay_model = openai_agents.ReplayModel(script)
            return await Runner.run(replay_model.agent(agent), "go", hooks=hooks, max_turns=TURNS + 2)

        openai_agents.install([SessionRecorder()], replace_default=True)
        try:
            return await medians_async(runs, [fake, replaying(script, replay)])
        finally:
            openai_agents.uninstall()

    report("openai-agents", *asyncio.run(measure()))


# -- pydantic-ai --------------------------------------------------------------------------------


def bench_pydantic_ai(runs: int) -> None:
    from pydantic_ai import Agent

    from phi_session.adapters.pydantic_ai import PhiCapability, ReplayModel

    async def measure() -> list[float]:
        recorder = SessionRecorder()
        original = Agent(
            pydantic_ai_model(),
            tools=[lookup],
            capabilities=[PhiCapability(recorder, capture_requests=True)],
        )
        await original.run("go")
        script = recorded_script(recorder)
        agent = Agent(pydantic_ai_model(), tools=[lookup], capabilities=[PhiCapability(SessionRecorder())])

        async def fake(i: int) -> object:
            return await agent.run("go")

        async def replay(i: int) -> object:
            replay_model = ReplayModel(script)
            return await agent.run("go", model=replay_model, capabilities=[replay_model.capability])

        return await medians_async(runs, [fake, replaying(script, replay)])

    report("pydantic-ai", *asyncio.run(measure()))


# -- Google ADK ---------------------------------------------------------------------------------


def bench_google_adk(runs: int) -> None:
    from google.adk.agents import LlmAgent
    from google.adk.models.base_llm import BaseLlm
    from google.adk.plugins.base_plugin import BasePlugin
    from google.adk.runners import InMemoryRunner
    from google.genai import types

    from phi_session.adapters.google_adk import PhiPlugin, ReplayLlm

    message = types.Content(role="user", parts=[types.Part(text="go")])

    def runner(model: BaseLlm, *plugins: BasePlugin) -> InMemoryRunner:
        agent = LlmAgent(name="bench", model=model, tools=[lookup])
        return InMemoryRunner(agent=agent, app_name="bench", plugins=list(plugins))

    async def invoke(runner: InMemoryRunner, session_id: str) -> None:
        await runner.session_service.create_session(app_name="bench", user_id="u", session_id=session_id)
        async for _ in runner.run_async(user_id="u", session_id=session_id, new_message=message):
            pass

    async def measure() -> list[float]:
        recorder = SessionRecorder(capture_turn_requests=True)
        await invoke(runner(google_adk_model(), PhiPlugin([recorder], capture_requests=True)), "bench")
        script = recorded_script(recorder)
        phi = PhiPlugin([SessionRecorder()])
        fake_runner = runner(google_adk_model(), phi)
        # A replay model per run (its cursor follows one run); agents and runners are
        # built before the clock runs, as the fake's is.
        models = [ReplayLlm(script) for _ in range(runs + 3)]
        runners = [runner(model, phi, model.tools_plugin()) for model in models]

        async def fake(i: int) -> None:
            await invoke(fake_runner, f"s{i}")

        async def replay(i: int) -> None:
            await invoke(runners[i], "bench")
            assert models[i].cursor.finished

        return await medians_async(runs, [fake, replaying(script, replay)])

    report("google-adk", *asyncio.run(measure()))


# -- LangChain / LangGraph ----------------------------------------------------------------------


def bench_langchain(runs: int) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from phi_session.adapters.langchain import PhiCallbackHandler, ReplayChatModel

    model = langchain_model(offers_tools=True)
    lookup_tool = tool(lookup)

    inputs = {"messages": [("user", "go")]}
    recorder = SessionRecorder(capture_turn_requests=True)
    original = PhiCallbackHandler([recorder], capture_requests=True)
    create_agent(model, tools=[lookup_tool]).invoke(inputs, {"callbacks": [original]})
    script = recorded_script(recorder)
    phi = PhiCallbackHandler([SessionRecorder()])
    agent = create_agent(model, tools=[lookup_tool])
    # A replay model per run (its cursor follows one run); the agents are compiled
    # before the clock runs, as the fake's is.
    models = [ReplayChatModel(script) for _ in range(runs + 3)]
    agents = [create_agent(m, tools=m.wrap_tools([lookup_tool])) for m in models]

    async def fake(i: int) -> object:
        return agent.invoke(inputs, {"callbacks": [phi]})

    async def replay(i: int) -> object:
        out = agents[i].invoke(inputs, {"callbacks": [phi]})
        assert models[i].cursor.finished
        return out

    report("langchain", *asyncio.run(medians_async(runs, [fake, replaying(script, replay)])))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    print(f"median CPU time per run of {args.runs} runs, {TURNS} turns x {TOOLS} tools")
    bench_openai_agents(args.runs)
    bench_pydantic_ai(args.runs)
    bench_google_adk(args.runs)
    bench_langchain(args.runs)


if __name__ == "__main__":
    main()
