"""Record OpenAI Agents SDK runs as phi-core sessions, offline.

The agent runs on the SDK's own scripted test model (no network, no key; and with
``replace_default=True`` the SDK's own exporter, which uploads traces to OpenAI whenever
OPENAI_API_KEY is set, is not used); with a real model nothing changes but the ``model=``
argument. Run it, then look at the result:

    python examples/adapter_openai_agents.py
    phi-session list
"""

import asyncio

from agents import Agent, RunConfig, Runner, function_tool
from agents.testing.model import ScriptedModel, assistant_message, function_call

from phi_session.adapters import openai_agents


@function_tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


async def main() -> None:
    # The one line: sessions go to .phi-session/sessions.db, and to nowhere else.
    core = openai_agents.install(replace_default=True)
    model = ScriptedModel(
        [
            [function_call("word_count", {"text": "to be or not to be"}, call_id="call_1")],
            [assistant_message("It has 6 words.")],
            [assistant_message("You are welcome.")],
        ],
        emit_traces=True,
    )
    agent = Agent(name="counter", model=model, tools=[word_count])
    conversation = RunConfig(group_id="conversation-1")  # the group id is the session id
    hooks = openai_agents.PhiRunHooks()  # optional: exact tool call ids, prompts, content
    first = await Runner.run(
        agent, "How many words in 'to be or not to be'?", hooks=hooks, run_config=conversation
    )
    second = await Runner.run(agent, "Thanks!", hooks=hooks, run_config=conversation)
    print(first.final_output, "/", second.final_output)
    openai_agents.uninstall()  # saves what is left
    session = core.store.load("conversation-1") if core.store is not None else None
    if session is not None:
        for loop in session.loops:
            print(loop.loop_id, loop.status, "continues", loop.parent_loop_id)


if __name__ == "__main__":
    asyncio.run(main())
