"""Test data and a live server for the CLI, API and browser tests.

The data is the example stream shipped in ``examples/events.jsonl`` (phi-core's own
output: a two-loop session, a parent with a sub-agent session, a parallel
evaluation, a minimal session) plus a session whose messages hold HTML that must
be shown as text.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from phi_session.cost import Pricer
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.messages import ToolCall
from phi_session.model import LoopConfigSnapshot, Session
from phi_session.recorder import SessionRecorder
from phi_session.stores.base import SessionStore
from phi_session.web.server import ViewerServer, make_server

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_STREAM = ROOT / "examples" / "events.jsonl"

BASIC_ID = "0b6c4e2a-7f31-4d8e-9a52-3c1f8e7d6b40"
PARENT_ID = "9d3b7e21-46c8-4f0a-b5e9-71a2c8d4f6e3"
CHILD_ID = "e7a14c9b-2d6f-4b83-a05e-9f3c1d8b2e76"
PARALLEL_ID = "1f5c8a3e-7b2d-4e91-8d6a-c4b7e2f9a053"
MINIMAL_ID = "2d9f6b1c-8e4a-4c7d-a3b5-6f0e1d2c9b84"
EXAMPLE_IDS = (BASIC_ID, PARENT_ID, CHILD_ID, PARALLEL_ID, MINIMAL_ID)

PARENT_LOOP = f"{PARENT_ID}.anthropic.claude-sonnet-4-5.1"
CHILD_LOOP = f"{CHILD_ID}.sub.1"
BASIC_LOOPS = (f"{BASIC_ID}.anthropic.claude-sonnet-4-5.1", f"{BASIC_ID}.anthropic.claude-sonnet-4-5.2")
PARALLEL_WINNER = f"{PARALLEL_ID}.openai.gpt-4o.2"

XSS_ID = "xss-session"
XSS_TEXT = "<img src=x onerror=alert(1)>"
XSS_REPLY = "<script>alert(2)</script> & <b>not bold</b>"


def example_lines() -> list[str]:
    return EXAMPLE_STREAM.read_text(encoding="utf-8").splitlines()


def xss_lines() -> list[str]:
    """The minimal session under another id, its prompt and reply turned into HTML."""
    lines = [line for line in example_lines() if MINIMAL_ID in line]
    return [
        line.replace(MINIMAL_ID, XSS_ID)
        .replace('"Say hello."', f'"{XSS_TEXT}"')
        .replace('"Hello!"', f'"{XSS_REPLY}"')
        for line in lines
    ]


def session_of_texts(
    session_id: str, results: Iterable[str], argument: str = "", key: str = "a/b~c"
) -> Session:
    """One loop of one turn: a call of ``read`` per result, each given `argument` under
    `key` (by default ``a/b~c``: a JSON pointer escapes both), answered by its result."""
    recorder = SessionRecorder()
    tracer = Tracer(
        AgentSession(session_id=session_id),
        sinks=[recorder],
        config=LoopConfigSnapshot(model="m", provider="p"),
    )
    texts = list(results)
    with tracer.loop() as loop:
        loop.user("go")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                calls = [
                    ToolCall(id=f"c{n}", name="read", arguments={key: argument}) for n in range(len(texts))
                ]
                reply.finish(tool_calls=calls)
            for call, text in zip(turn.tool_calls, texts, strict=True):
                with turn.tool(call) as tool:
                    tool.result(text)
    tracer.close()
    recorder.flush()
    [session] = recorder.drain_completed()
    return session


def record_into(store: SessionStore, lines: Iterable[str]) -> None:
    recorder = SessionRecorder()
    for line in lines:
        recorder.on_json(line)
    recorder.flush()
    for session in recorder.drain_completed():
        store.save(session)


@contextmanager
def running_server(
    store: SessionStore, host: str = "127.0.0.1", *, pricer: Pricer | None = None
) -> Iterator[ViewerServer]:
    """The viewer over `store` on a free port, serving from a thread until the block ends."""
    server = make_server(store, host=host, port=0, quiet=True, pricer=pricer)
    thread = threading.Thread(target=server.serve_forever, name="viewer", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
