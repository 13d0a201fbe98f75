"""Record a Google ADK agent with phi-session: one plugin (offline: the model is scripted).

Run: python examples/adapter_google_adk.py [STORE]   (needs ``pip install 'phi-session[google-adk]'``;
STORE is a store URL or path (a .db file, a directory), a new temporary directory if none is given)

In your own code the one line is ``plugins=[PhiPlugin()]``: sessions go into the embedded store
(``$PHI_SESSION_STORE``, else ``.phi-session/sessions.db``).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncGenerator

from google.adk.agents import LlmAgent
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import InMemoryRunner
from google.adk.tools.agent_tool import AgentTool
from google.genai import types

from phi_session import open_store
from phi_session.adapters.google_adk import PhiPlugin


class OfflineModel(BaseLlm):
    """Stands in for Gemini: answers with the next of its replies (text, or a tool call)."""

    replies: list[str | tuple[str, dict[str, str]]]

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        reply = self.replies.pop(0)
        part = (
            types.Part(text=reply)
            if isinstance(reply, str)
            else types.Part(function_call=types.FunctionCall(name=reply[0], args=reply[1]))
        )
        usage = types.GenerateContentResponseUsageMetadata(prompt_token_count=120, candidates_token_count=15)
        yield LlmResponse(content=types.Content(role="model", parts=[part]), usage_metadata=usage)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny, 21 °C in {city}"


async def main(store_path: str) -> None:
    translator = LlmAgent(
        name="translator",
        description="Translates English into French.",
        model=OfflineModel(model="gemini-2.5-flash", replies=["Ensoleillé, 21 °C"]),
    )
    assistant = LlmAgent(
        name="assistant",
        model=OfflineModel(
            model="gemini-2.5-flash",
            replies=[
                ("get_weather", {"city": "Paris"}),
                ("translator", {"request": "Sunny, 21 °C in Paris"}),
                "Il fait ensoleillé, 21 °C à Paris.",
            ],
        ),
        tools=[get_weather, AgentTool(agent=translator)],
    )
    store = open_store(store_path)
    plugin = PhiPlugin(store=store)  # in your code: PhiPlugin(), into the embedded store
    async with InMemoryRunner(agent=assistant, app_name="weather", plugins=[plugin]) as runner:
        await runner.session_service.create_session(app_name="weather", user_id="ada", session_id="chat-1")
        question = types.Content(role="user", parts=[types.Part(text="Weather in Paris, in French?")])
        async for event in runner.run_async(user_id="ada", session_id="chat-1", new_message=question):
            if event.is_final_response() and event.content and event.content.parts:
                print("assistant:", event.content.parts[0].text)
    # Closing the runner closed the plugin: every session is in the store.
    for session_id in sorted(store.list_ids()):
        for loop in store.load(session_id).loops:
            tools = [result.tool_name for turn in loop.turns for result in turn.tool_results]
            print(
                f"{loop.loop_id} {loop.status} {len(loop.turns)} turns {loop.usage.total_tokens} tokens"
                f" tools={tools}"
            )
    print(f"stored in {store_path}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="phi-adk-")))
