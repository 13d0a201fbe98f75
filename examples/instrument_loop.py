"""Instrument a hand-written agent loop with phi-session (offline: the "model" is scripted).

Run: python examples/instrument_loop.py [DIR]   (writes phi-core session files into DIR,
a new temporary directory if none is given; it prints where it wrote)
"""

from __future__ import annotations

import os
import sys
import tempfile

from phi_session import (
    AgentSession,
    JsonDirStore,
    JsonlSink,
    LoopConfigSnapshot,
    SessionRecorder,
    ToolCall,
    Tracer,
    Usage,
)


def fake_model_stream(question: str) -> list[str]:
    """Stands in for your provider's streaming call."""
    return ["Let me ", "look that ", "up."]


def run_tool(call: ToolCall) -> str:
    return "buy milk\n" if call.name == "read_file" else "unknown tool"


def main(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    recorder = SessionRecorder()
    agent = AgentSession()  # agent id, session id, loop ids, rotation
    tracer = Tracer(
        agent,
        sinks=[recorder, JsonlSink(f"{directory}/events.jsonl")],  # in-process and a phi-core JSONL file
        config=LoopConfigSnapshot(model="claude-sonnet-4-5", provider="anthropic"),
    )
    agent.check_and_rotate(30 * 60)  # a new session if the last loop started over 30 min ago
    with tracer.loop() as loop:
        loop.user("What is in notes.txt?")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                for chunk in fake_model_stream("What is in notes.txt?"):
                    reply.text_delta(chunk)
                reply.finish(
                    tool_calls=[ToolCall(id="call-1", name="read_file", arguments={"path": "notes.txt"})],
                    usage=Usage(input=412, output=38, total_tokens=450),
                )
            for call in turn.tool_calls:
                with turn.tool(call) as tool:
                    tool.result(run_tool(call))
        with loop.turn() as turn:
            with turn.assistant() as reply:
                reply.finish("It says: buy milk.", usage=Usage(input=460, output=12, total_tokens=472))
    tracer.close()

    recorder.flush()
    store = JsonDirStore(directory)
    for session in recorder.drain_completed():
        store.save(session)
        loop_record = session.loops[0]
        print(
            session.session_id,
            loop_record.status,
            f"{loop_record.turn_count()} turns",
            f"{session.total_usage().total_tokens} tokens",
        )
        print(f"wrote {store.path_for(session.session_id)}")
    print(f"wrote {directory}/events.jsonl (record it with: phi-session record {directory}/events.jsonl)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="phi-session-"))
