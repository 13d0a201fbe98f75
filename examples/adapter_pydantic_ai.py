"""A pydantic-ai agent recorded into phi-core sessions by one capability (no network, no keys).

A support agent looks up an order with a tool, asks a refunds agent (a sub-agent, run
inside a tool), and answers; a second run on the same conversation continues its loop.
pydantic-ai's `FunctionModel` plays the model.

Usage: python examples/adapter_pydantic_ai.py [STORE_DIR]   (default: ./adapter-sessions)
"""

from __future__ import annotations

import sys

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from phi_session.adapters.pydantic_ai import PhiCapability
from phi_session.persist import AutoPersistingRecorder
from phi_session.stores.json_dir import JsonDirStore


def support_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Looks the order up, then asks for a refund, then answers with what came back."""
    usage = RequestUsage(input_tokens=120, output_tokens=15)
    last = messages[-1]
    parts = last.parts if isinstance(last, ModelRequest) else []
    returned = [part for part in parts if isinstance(part, ToolReturnPart)]
    if not returned:
        if len(messages) > 1:  # a follow-up in the same conversation
            return ModelResponse(parts=[TextPart("You're welcome.")], usage=usage)
        return ModelResponse(parts=[ToolCallPart("find_order", {"number": "A-17"})], usage=usage)
    if returned[0].tool_name == "find_order":
        return ModelResponse(parts=[ToolCallPart("ask_refunds", {"order": returned[0].content})], usage=usage)
    return ModelResponse(parts=[TextPart(f"Done: {returned[0].content}")], usage=usage)


def refunds_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart("refund of 30 EUR approved")], usage=RequestUsage(input_tokens=60, output_tokens=8)
    )


def main(store_dir: str) -> None:
    store = JsonDirStore(store_dir)
    # Sessions are saved into `store` as they complete. PhiCapability() alone would use
    # the embedded store (.phi-session/sessions.db, or $PHI_SESSION_STORE).
    with AutoPersistingRecorder(store) as recorder:
        record = PhiCapability(recorder.on_event, store=store)  # Agent(..., capabilities=[record])
        refunds = Agent(FunctionModel(refunds_model), capabilities=[record], name="refunds")
        support = Agent(FunctionModel(support_model), capabilities=[record], name="support")

        @support.tool_plain
        def find_order(number: str) -> str:
            return f"order {number}: 2 mugs, 30 EUR, broken in transit"

        @support.tool
        async def ask_refunds(ctx: RunContext[None], order: str) -> str:
            answer = await refunds.run(f"Refund? {order}", usage=ctx.usage)
            return answer.output

        first = support.run_sync("My mugs arrived broken.")
        support.run_sync("Thanks!", message_history=first.all_messages())

    for session_id in sorted(store.list_ids()):
        for loop in store.load(session_id).loops:
            link = f" <- {loop.parent_loop_id}" if loop.parent_loop_id else ""
            print(
                f"{loop.loop_id} {loop.status} {len(loop.turns)} turns {loop.usage.total_tokens} tokens{link}"
            )
    store.close()
    print(f"wrote {store_dir}/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "adapter-sessions")
