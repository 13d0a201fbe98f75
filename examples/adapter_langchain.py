"""Record a LangChain agent (``create_agent``) as phi-core sessions, with one line.

Offline: the chat model is LangChain's fake one, scripted. Needs
``pip install 'phi-session[langchain]' langchain``.

Run: python examples/adapter_langchain.py [STORE]   (a store URL or path; default: the
embedded store, ./.phi-session/sessions.db), then ``phi-session show example-thread``.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from phi_session import open_store
from phi_session.adapters.langchain import PhiCallbackHandler


class ScriptedChat(GenericFakeChatModel):
    """Stands in for your provider's chat model (which has ``bind_tools``)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


@tool
def read_file(path: str) -> str:
    """Read a file."""
    return "buy milk"


def main() -> None:
    store = open_store(sys.argv[1] if len(sys.argv) > 1 else None)
    usage: Any = {"input_tokens": 412, "output_tokens": 38, "total_tokens": 450}
    model = ScriptedChat(
        messages=itertools.cycle(
            [
                AIMessage(
                    content="Let me read it.",
                    usage_metadata=usage,
                    tool_calls=[{"id": "c1", "name": "read_file", "args": {"path": "notes.txt"}}],
                ),
                AIMessage(content="It says: buy milk.", usage_metadata=usage),
            ]
        )
    )
    agent = create_agent(model, tools=[read_file])

    phi = PhiCallbackHandler(store=store)  # the one line: sessions go to the store as they complete
    config: Any = {"callbacks": [phi], "configurable": {"thread_id": "example-thread"}}
    agent.invoke({"messages": [("user", "What is in notes.txt?")]}, config)
    agent.invoke({"messages": [("user", "And again?")]}, config)  # continues the first loop
    phi.close()  # saves what is left (also done at exit)

    session = store.load("example-thread")
    for loop in session.loops:
        print(
            loop.loop_id,
            loop.status,
            loop.kind.kind,
            f"{loop.turn_count()} turns",
            f"{loop.usage.total_tokens} tokens",
        )


if __name__ == "__main__":
    main()
