"""Replay and fork of LangChain / LangGraph runs, offline: a ``create_agent`` ReAct agent
over LangChain's fake chat model is recorded (4 turns, 2 tools), then replayed with
`phi_session.adapters.langchain.ReplayChatModel` (no model, tools answered from the
recording), changed (divergence), and forked at turn 2 onto another fake model."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest

pytest.importorskip("langchain_core", reason="needs the extra: pip install 'phi-session[langchain]'")
pytest.importorskip("langgraph", reason="needs the extra: pip install 'phi-session[langchain]'")
pytest.importorskip("langchain.agents", reason="create_agent needs: pip install 'phi-session[test]'")

from pathlib import Path

from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware, ToolRetryMiddleware
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, interrupt
from pydantic import Field

from phi_session import SqliteStore
from phi_session.adapters.langchain import PhiCallbackHandler, ReplayChatModel
from phi_session.errors import RecordedModelError, RecordedToolError, ReplayDiverged
from phi_session.messages import AgentMessage, AssistantMessage, ExtensionMessage, ToolCall, ToolResultMessage
from phi_session.model import LoopRecord, Session, is_replayed
from phi_session.replay.request import summarize

from .test_adapter_langchain import ScriptedChat, reply, team, team_models, tool_node_graph

SYSTEM = "You are a calculator: use the tools."
THREAD = "calc-thread"
QUESTION = "What is (2 + 3) * 4 + 1, doubled?"
RUNS: list[str] = []  # the tools that really ran


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    RUNS.append("add")
    return a + b


@tool
def mul(a: int, b: int) -> int:
    """Multiply two numbers."""
    RUNS.append("mul")
    return a * b


@tool("mul")
def mul_off_by_one(a: int, b: int) -> int:
    """Multiply two numbers."""
    return a * b + 1


@tool
def sub(a: int, b: int) -> int:
    """Subtract two numbers."""
    return a - b


def script() -> list[AIMessage]:
    """Four model responses: add, mul, both at once, then the answer."""
    return [
        reply("Adding first.", ("c1", "add", {"a": 2, "b": 3}), tokens=(40, 12)),
        reply("", ("c2", "mul", {"a": 5, "b": 4}), tokens=(60, 9)),
        reply("", ("c3", "add", {"a": 20, "b": 1}), ("c4", "mul", {"a": 21, "b": 2}), tokens=(80, 20)),
        reply("The answer is 42.", tokens=(120, 6)),
    ]


def run_agent(
    model: Any,
    tools: list[Any],
    store: SqliteStore,
    system: str = SYSTEM,
    *,
    mode: str = "invoke",
    capture_requests: bool = True,
    callbacks: Sequence[Any] = (),
    middleware: Sequence[Any] = (),
) -> Any:
    """One run of the agent, recorded into `store` (the adapter's default sink); `callbacks`
    are called after the adapter's."""
    agent = create_agent(model, tools=tools, system_prompt=system, middleware=middleware)
    phi = PhiCallbackHandler(store=store, capture_requests=capture_requests)
    config: Any = {"callbacks": [phi, *callbacks], "configurable": {"thread_id": THREAD}}
    inputs = {"messages": [("user", QUESTION)]}
    try:
        if mode == "ainvoke":
            return asyncio.run(agent.ainvoke(inputs, config))
        if mode == "stream":  # token by token: the replay model answers in one chunk
            parts = list(agent.stream(inputs, config, stream_mode=["messages", "values"]))
            assert any(kind == "messages" for kind, _ in parts)
            return next(state for kind, state in reversed(parts) if kind == "values")
        return agent.invoke(inputs, config)
    finally:
        phi.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "sessions.db") as store:
        yield store


@pytest.fixture
def original(store: SqliteStore) -> Session:
    out = run_agent(ScriptedChat(messages=iter(script())), [add, mul], store)
    assert out["messages"][-1].content == "The answer is 42."
    RUNS.clear()
    return store.load(THREAD)


def replay(
    session: Session,
    store: SqliteStore,
    *,
    with_tools: list[Any] | None = None,
    system: str = SYSTEM,
    **options: Any,
) -> tuple[ReplayChatModel, Session]:
    """Replay the session's loop (`options`: `ReplayChatModel`'s) with the
    agent's `with_tools` and `system` prompt, recorded into the store; the stored session after."""
    model = ReplayChatModel(session, **options)
    with model.recording():
        run_agent(model, model.wrap_tools(with_tools or [add, mul]), store, system)
    return model, store.load(THREAD)


def plain(message: AgentMessage) -> Any:
    """A message without what differs between two recordings of one run (time, turn ids, the
    mark of a reply a replay served)."""
    message = msgspec.structs.replace(message, timestamp=0)
    return (
        msgspec.structs.replace(message, turn_id=None, phi_session_replayed=False)
        if hasattr(message, "turn_id")
        else message
    )


def turns(record: LoopRecord) -> list[tuple[Any, ...]]:
    """Each turn's inputs, reply and results (parallel tools end in any order: by call id)."""
    return [
        (
            sorted((plain(m) for m in turn.input_messages), key=lambda m: getattr(m, "tool_call_id", "")),
            plain(turn.output_message),
            sorted((plain(m) for m in turn.tool_results), key=lambda m: m.tool_call_id),
            turn.usage,
        )
        for turn in record.turns
    ]


def calls(record: LoopRecord) -> list[ToolCall]:
    return [
        block
        for message in record.messages
        if isinstance(message, AssistantMessage)
        for block in message.content
        if isinstance(block, ToolCall)
    ]


def the_other(session: Session, original: LoopRecord) -> LoopRecord:
    (other,) = [loop for loop in session.loops if loop.loop_id != original.loop_id]
    return other


def test_the_recorded_run_has_four_turns_two_tools_and_each_request(original: Session) -> None:
    (loop,) = original.loops
    assert loop.status == "Completed" and loop.turn_count() == 4
    assert [c.name for c in calls(loop)] == ["add", "mul", "add", "mul"]
    results = sorted(
        (m for m in loop.messages if isinstance(m, ToolResultMessage)), key=lambda m: m.tool_call_id
    )
    assert [r.content[0].text for r in results] == ["5", "20", "21", "42"]  # type: ignore[union-attr]
    assert loop.usage.input == 300 and loop.usage.output == 47
    for turn in loop.turns:  # captured through the embedded store's recorder
        request = turn.request_payload
        assert request is not None and request.system_prompt == SYSTEM
        assert sorted(t.name for t in request.tools) == ["add", "mul"]
    assert [len(t.request_payload.messages) for t in loop.turns] == [1, 3, 5, 8]  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream"])
def test_a_replay_without_model_or_tools_records_the_same_run_as_a_rerun(
    original: Session, store: SqliteStore, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = ReplayChatModel(original)
    with model.recording(), caplog.at_level(logging.WARNING, logger="phi_session.replay"):
        out = run_agent(model, model.wrap_tools([add, mul]), store, mode=mode)
    assert caplog.records == []  # LangGraph's threads and tasks see the recording block
    assert out["messages"][-1].content == "The answer is 42."
    assert RUNS == []  # the tools were answered from the recording
    assert model.cursor.finished and model.divergence is None

    session = store.load(THREAD)
    (first,) = original.loops
    replayed = the_other(session, first)
    assert (replayed.kind.kind, replayed.kind.tag) == ("Rerun", "replay")
    assert replayed.parent_loop_id == first.loop_id and replayed.status == "Completed"
    assert replayed.metadata["replay"]["loop_id"] == first.loop_id
    assert replayed.config == first.config
    assert turns(replayed) == turns(first)  # messages, tool calls with their ids, results, usage
    assert replayed.usage == first.usage
    assert calls(replayed) == calls(first)
    # Saved, the session bills the original run once: the replay's replies were served.
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)
    (summary,) = store.query()
    assert summary.usage == first.usage
    # By model, the original's calls are the replying model's; the replay, which called
    # none, stays under its config's, with no usage.
    served, configured = store.usage_totals("model")
    assert (served.key, served.usage, served.loops) == ("fake/fake-1", first.usage, 1)
    assert (configured.usage.total_tokens, configured.loops) == (0, 1)


def test_a_recording_without_requests_replays_against_its_messages(store: SqliteStore) -> None:
    # One tool call per turn (parallel calls ending out of order: the next test).
    one_at_a_time = [*script()[:2], reply("", ("c3", "add", {"a": 20, "b": 1})), script()[3]]
    run_agent(ScriptedChat(messages=iter(one_at_a_time)), [add, mul], store, capture_requests=False)
    (first,) = store.load(THREAD).loops
    assert all(turn.request_payload is None for turn in first.turns)
    model, session = replay(store.load(THREAD), store)
    assert model.cursor.finished
    assert turns(the_other(session, first)) == turns(first)
    # Compared with the recorded messages: a changed tool result is noticed.
    with pytest.raises(ReplayDiverged) as raised:
        replay(
            store.load(THREAD), store, with_tools=[add, mul_off_by_one], tools="live", loop_id=first.loop_id
        )
    assert (raised.value.divergence.turn_index, raised.value.divergence.what) == (2, "messages")


def test_a_recording_without_requests_replays_parallel_results_in_call_order(store: SqliteStore) -> None:
    # Turn 2's parallel calls end out of order (c3 waits until c4 has been recorded): the
    # loop holds c4's result first, LangChain sends them in call order, as the rebuilt
    # request does.
    c4_ended = threading.Event()

    class ToolEnded(BaseCallbackHandler):
        def on_tool_end(self, output: Any, **kwargs: Any) -> None:
            if getattr(output, "tool_call_id", None) == "c4":
                c4_ended.set()

    @tool("add")
    def add_after_mul(a: int, b: int) -> int:
        """Add two numbers."""
        if a == 20:
            assert c4_ended.wait(10)
        return a + b

    run_agent(
        ScriptedChat(messages=iter(script())),
        [add_after_mul, mul],
        store,
        capture_requests=False,
        callbacks=[ToolEnded()],
    )
    (first,) = store.load(THREAD).loops
    assert [m.tool_call_id for m in first.turns[2].tool_results] == ["c4", "c3"]  # type: ignore[union-attr]
    RUNS.clear()
    model, session = replay(store.load(THREAD), store)
    assert model.cursor.finished and model.divergence is None and RUNS == []
    assert turns(the_other(session, first)) == turns(first)


def test_another_system_prompt_diverges_at_turn_0(original: Session, store: SqliteStore) -> None:
    with pytest.raises(ReplayDiverged) as raised:
        replay(original, store, system="You are a poet.")
    divergence = raised.value.divergence
    assert (divergence.turn_index, divergence.what) == (0, "system_prompt")
    assert str(raised.value).count("\n") == 0 and "turn 0" in str(raised.value)
    assert "You are a poet." in str(raised.value)


def test_another_tool_diverges_at_turn_0(original: Session, store: SqliteStore) -> None:
    with pytest.raises(ReplayDiverged) as raised:
        replay(original, store, with_tools=[add, sub])
    divergence = raised.value.divergence
    assert (divergence.turn_index, divergence.what) == (0, "tools")
    assert divergence.detail == "tool(s) added: sub; tool(s) removed: mul"
    replayed = the_other(store.load(THREAD), original.loops[0])
    assert replayed.status == "Aborted"  # the replayed run failed, and is recorded as such


def test_a_live_tool_returning_something_else_diverges_at_the_next_turn(
    original: Session, store: SqliteStore
) -> None:
    with pytest.raises(ReplayDiverged) as raised:
        replay(original, store, with_tools=[add, mul_off_by_one], tools="live")
    divergence = raised.value.divergence
    # mul's result (turn 1) reaches the model at turn 2, where the request differs
    assert (divergence.turn_index, divergence.what) == (2, "messages")
    assert divergence.expected is not None and "20" in divergence.expected
    assert divergence.actual is not None and "21" in divergence.actual


def test_fallback_mode_hands_the_diverged_run_to_the_fallback_model(
    original: Session, store: SqliteStore
) -> None:
    fallback = ScriptedChat(messages=iter([reply("A poem instead.", model="fake-2")]))
    model, session = replay(
        original, store, system="You are a poet.", on_divergence="fallback", fallback=fallback
    )
    assert model.divergence is not None and model.divergence.what == "system_prompt"
    replayed = the_other(session, original.loops[0])
    assert replayed.status == "Completed" and replayed.turn_count() == 1
    last = replayed.messages[-1]
    assert isinstance(last, AssistantMessage) and last.model == "fake-2"


def test_a_fork_at_turn_2_replays_two_turns_then_runs_the_other_model(
    original: Session, store: SqliteStore
) -> None:
    other = ScriptedChat(
        messages=iter(
            [
                reply("", ("d1", "add", {"a": 20, "b": 2}), tokens=(90, 10), model="fake-2"),
                reply("It is 22.", tokens=(100, 4), model="fake-2"),
            ]
        )
    )
    model = ReplayChatModel(original, until_turn=2, fallback=other)
    with model.recording(change={"model": "fake-2"}):
        out = run_agent(model, model.wrap_tools([add, mul]), store)
    assert out["messages"][-1].content == "It is 22."
    assert RUNS == ["add"]  # turns 0 and 1 answered from the recording; the fork's call ran

    session = store.load(THREAD)
    first = original.loops[0]
    fork = the_other(session, first)
    assert (fork.kind.kind, fork.kind.tag) == ("Branch", "fork")
    assert fork.parent_loop_id == first.loop_id
    assert fork.metadata["fork"] == {
        "session_id": THREAD,
        "loop_id": first.loop_id,
        "turn_index": 2,
        "change": {"model": "fake-2"},
    }
    assert fork.turn_count() == 4
    assert turns(fork)[:2] == turns(first)[:2]
    assert turns(fork)[2] != turns(first)[2]
    (result,) = fork.turns[2].tool_results  # the fork's own call ran, recorded once
    assert result.content[0].text == "22"  # type: ignore[union-attr]
    forked = fork.turns[2].output_message
    assert isinstance(forked, AssistantMessage) and forked.model == "fake-2"
    # Saved, the fork bills the other model's two turns, not the two it repeated.
    assert [is_replayed(turn.output_message) for turn in fork.turns] == [True, True, False, False]
    (summary,) = store.query()
    assert summary.usage == first.usage + fork.turns[2].usage + fork.turns[3].usage
    # The fork stands in for the original: its context is its own run, from the prompt.
    context = [plain(m) for m in session.context_at(fork.loop_id)]
    assert context == [plain(m) for m in fork.messages]
    assert context[:5] == [plain(m) for m in first.messages[:5]]
    assert context[-1].content[0].text == "It is 22."  # type: ignore[union-attr]


class NamedChat(ScriptedChat):
    """A fake chat model with a model name, as LangChain's chat models have."""

    model: str = "fake-2"


@pytest.mark.parametrize(("fallback", "name"), [(NamedChat, "fake-2"), (ScriptedChat, "ScriptedChat")])
def test_a_forks_default_change_is_the_fallbacks_model_name(
    original: Session, store: SqliteStore, fallback: type[ScriptedChat], name: str
) -> None:
    other = fallback(messages=iter([reply("Forty-two.", model="fake-2")]))
    model = ReplayChatModel(original, until_turn=3, fallback=other)
    with model.recording():  # the model name LangChain reports, else the class's name
        run_agent(model, model.wrap_tools([add, mul]), store)
    fork = the_other(store.load(THREAD), original.loops[0])
    assert fork.metadata["fork"]["change"] == {"model": name}


@tool
def explode(reason: str) -> str:
    """Always fails."""
    RUNS.append("explode")
    raise ValueError(f"tool failed: {reason}")


def test_a_tool_error_that_ended_the_run_fails_the_replay_there(store: SqliteStore) -> None:
    steps = [reply("", ("c1", "explode", {"reason": "x"})), reply("Unreached.")]
    with pytest.raises(ValueError, match="tool failed: x"):  # the graph's tool node raises it
        run_agent(ScriptedChat(messages=iter(steps)), [explode], store)
    original = store.load(THREAD)
    assert original.loops[0].status == "Aborted"
    RUNS.clear()
    model = ReplayChatModel(original)
    # not a model call after the error (an `exhausted` divergence): the recorded error
    with model.recording(), pytest.raises(RecordedToolError, match="tool failed: x"):
        run_agent(model, model.wrap_tools([explode]), store)
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    assert the_other(store.load(THREAD), original.loops[0]).status == "Aborted"


@tool
def bad(x: str) -> str:
    """Fails: the tool node answers the model with the error."""
    RUNS.append("bad")
    raise ValueError(f"bad {x}")


def run_tool_node_graph(model: Any, tools: list[Any], store: SqliteStore, *, approval: bool = False) -> Any:
    """A hand-built agent whose ``ToolNode`` answers a tool's error to the model, recorded;
    `approval`: an interrupting node between the tools and the model, the run resumed."""
    app = tool_node_graph(model, tools, "approve" if approval else "model")
    phi = PhiCallbackHandler(store=store, capture_requests=True)
    try:
        config: Any = {"callbacks": [phi], "configurable": {"thread_id": THREAD}}
        out = app.invoke({"messages": [("user", QUESTION)]}, config)
        return app.invoke(Command(resume="yes"), config) if approval else out
    finally:
        phi.close()


def test_a_tool_error_the_tool_node_answered_is_recorded_as_sent_and_replays(store: SqliteStore) -> None:
    steps = [reply("", ("c1", "bad", {"x": "b"})), reply("done")]
    out = run_tool_node_graph(ScriptedChat(messages=iter(steps)), [bad], store)
    sent = out["messages"][2]  # what the model was sent: the tool node's text, not the exception's
    (first,) = store.load(THREAD).loops
    (result,) = first.turns[0].tool_results
    assert isinstance(result, ToolResultMessage) and result.is_error
    assert result.content[0].text == sent.content == "Error: ValueError('bad b')\n Please fix your mistakes."  # type: ignore[union-attr]
    RUNS.clear()
    model = ReplayChatModel(store.load(THREAD))
    with model.recording():
        out = run_tool_node_graph(model, model.wrap_tools([bad]), store)
    assert out["messages"][-1].content == "done"
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    assert turns(the_other(store.load(THREAD), first)) == turns(first)


def test_a_tool_error_answered_before_an_interrupt_is_recorded_as_sent_and_replays(
    store: SqliteStore,
) -> None:
    # The run stops (interrupt) after the tool node answered the error, before any model
    # call sends that answer: the answer is still the result.
    steps = [reply("", ("c1", "bad", {"x": "b"})), reply("done")]
    out = run_tool_node_graph(ScriptedChat(messages=iter(steps)), [bad], store, approval=True)
    sent = out["messages"][2]
    first, resumed = store.load(THREAD).loops
    (result,) = first.turns[0].tool_results
    assert isinstance(result, ToolResultMessage) and result.is_error
    assert result.content[0].text == sent.content == "Error: ValueError('bad b')\n Please fix your mistakes."  # type: ignore[union-attr]
    RUNS.clear()
    model = ReplayChatModel(store.load(THREAD), resumed.loop_id, chain=True)
    with model.recording():
        out = run_tool_node_graph(model, model.wrap_tools([bad]), store, approval=True)
    assert out["messages"][-1].content == "done"
    assert RUNS == [] and model.cursor.finished and model.divergence is None


@pytest.mark.parametrize("retry_on", [(Exception,), (TimeoutError,)])
def test_a_tool_retried_after_an_error_replays_the_retry(
    store: SqliteStore, retry_on: tuple[type[Exception], ...]
) -> None:
    # A retry catching only the tool's exception type (a builtin one) retries the replayed
    # failure too: raised as a RecordedToolError that is also that type.
    attempts: list[str] = []

    @tool
    def flaky(x: str) -> str:
        """Fails the first time."""
        attempts.append(x)
        if len(attempts) == 1:
            raise TimeoutError("first fails")
        return f"ok {x}"

    def retry() -> list[Any]:
        return [ToolRetryMiddleware(max_retries=2, initial_delay=0.0, jitter=False, retry_on=retry_on)]

    steps = [reply("", ("c1", "flaky", {"x": "a"})), reply("done")]
    run_agent(ScriptedChat(messages=iter(steps)), [flaky], store, middleware=retry())
    (first,) = store.load(THREAD).loops
    results = [(m.content[0].text, m.is_error) for m in first.turns[0].tool_results]  # type: ignore[union-attr]
    assert results == [("flaky failed: TimeoutError: first fails", True), ("ok a", False)]
    model = ReplayChatModel(store.load(THREAD))
    with model.recording():  # the recorded failure raised again: the middleware retries
        out = run_agent(model, model.wrap_tools([flaky]), store, middleware=retry())
    assert out["messages"][-1].content == "done" and attempts == ["a", "a"]  # not run again
    assert model.cursor.finished and model.divergence is None
    assert turns(the_other(store.load(THREAD), first)) == turns(first)


def test_a_tool_error_only_named_like_a_builtin_is_not_retried_in_the_replay(store: SqliteStore) -> None:
    # redis.exceptions.TimeoutError is no builtin TimeoutError: the original run did not
    # retry it, nor does the replay (it stopped there, not after 3 attempts).
    same_name = type("TimeoutError", (Exception,), {"__module__": "redis.exceptions"})

    @tool
    def fetch(x: str) -> str:
        """Fetches from the cache."""
        RUNS.append("fetch")
        raise same_name("redis timed out")

    def retry() -> list[Any]:
        return [ToolRetryMiddleware(max_retries=2, initial_delay=0.0, jitter=False, retry_on=(TimeoutError,))]

    steps = [reply("", ("c1", "fetch", {"x": "a"})), reply("done")]
    with pytest.raises(same_name):
        run_agent(ScriptedChat(messages=iter(steps)), [fetch], store, middleware=retry())
    (first,) = store.load(THREAD).loops
    assert first.status == "Aborted" and RUNS == ["fetch"]
    RUNS.clear()
    model = ReplayChatModel(store.load(THREAD))
    with model.recording(), pytest.raises(RecordedToolError) as raised:
        run_agent(model, model.wrap_tools([fetch]), store, middleware=retry())
    assert str(raised.value) == "fetch failed: redis.exceptions.TimeoutError: redis timed out"
    assert not isinstance(raised.value, TimeoutError)
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    assert turns(the_other(store.load(THREAD), first)) == turns(first)


def test_a_recorded_stop_iteration_fails_an_async_replay_as_a_recorded_tool_error(store: SqliteStore) -> None:
    # Not made again as a StopIteration: raised in the replayed tool's coroutine, that
    # would turn into RuntimeError('coroutine raised StopIteration').
    @tool
    def nxt(x: str) -> str:
        """Next item."""
        RUNS.append("nxt")
        raise StopIteration("exhausted")

    steps = [reply("", ("c1", "nxt", {"x": "a"})), reply("done")]
    with pytest.raises(RuntimeError):
        run_agent(ScriptedChat(messages=iter(steps)), [nxt], store)
    (first,) = store.load(THREAD).loops
    RUNS.clear()
    model = ReplayChatModel(store.load(THREAD))
    with model.recording(), pytest.raises(RecordedToolError, match=r"^nxt failed: StopIteration: exhausted"):
        run_agent(model, model.wrap_tools([nxt]), store, mode="ainvoke")
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    assert turns(the_other(store.load(THREAD), first)) == turns(first)


def test_a_model_failure_that_ended_the_run_fails_the_replay_there(store: SqliteStore) -> None:
    class Failing(ScriptedChat):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            if RUNS:  # after the tool: the provider fails
                raise RuntimeError("rate limited")
            return super()._generate(*args, **kwargs)

    with pytest.raises(RuntimeError, match="rate limited"):
        run_agent(Failing(messages=iter(script())), [add, mul], store)
    original = store.load(THREAD)
    assert original.loops[0].status == "Aborted"
    assert original.loops[0].turns[1].output_message.stop_reason == "error"  # type: ignore[union-attr]
    RUNS.clear()
    model = ReplayChatModel(original)
    # not an empty reply the run ends with as if it had succeeded
    with model.recording(), pytest.raises(RecordedModelError, match="rate limited"):
        run_agent(model, model.wrap_tools([add, mul]), store)
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    replayed = the_other(store.load(THREAD), original.loops[0])
    assert replayed.status == "Aborted" and replayed.turn_count() == 2


class RateLimited(ScriptedChat):
    """A provider that always fails."""

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("rate limited")


def test_a_model_failure_the_run_recovered_from_fails_the_replayed_call_too(store: SqliteStore) -> None:
    # The failure came back as an empty successful answer: the replay ended on it, after
    # one turn, with output '' and no divergence.
    backup = ScriptedChat(messages=iter([reply("", ("c1", "add", {"a": 1, "b": 1})), reply("two")]))
    out = run_agent(
        RateLimited(messages=iter([])), [add], store, middleware=[ModelFallbackMiddleware(backup)]
    )
    assert out["messages"][-1].content == "two"
    (first,) = store.load(THREAD).loops
    stops = [turn.output_message.stop_reason for turn in first.turns]  # type: ignore[union-attr]
    assert first.status == "Completed" and stops == ["error", "toolUse", "error", "stop"]
    RUNS.clear()
    model = ReplayChatModel(store.load(THREAD))  # where both models go: the fallback answers too
    with model.recording():
        out = run_agent(model, model.wrap_tools([add]), store, middleware=[ModelFallbackMiddleware(model)])
    assert out["messages"][-1].content == "two"
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    replayed = the_other(store.load(THREAD), first)
    assert replayed.status == "Completed" and replayed.kind.tag == "replay"
    assert turns(replayed) == turns(first)  # the failures recorded with their original text
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)
    (summary,) = store.query()
    assert summary.usage == first.usage


def test_a_handoff_run_replays_whole_by_default(store: SqliteStore) -> None:
    # Only Bob's loop was the default (Alice's reply, which handed over, stopped with
    # toolUse): the unchanged team diverged at once, "tool(s) added: transfer_to_bob".
    def run(alice_model: Any, bob_model: Any) -> Any:
        phi = PhiCallbackHandler(store=store, capture_requests=True)
        try:
            config: Any = {"callbacks": [phi], "configurable": {"thread_id": THREAD}}
            return team(alice_model, bob_model).invoke({"messages": [("user", "help")]}, config)
        finally:
            phi.close()

    run(*team_models())
    alice, bob = store.load(THREAD).loops
    model = ReplayChatModel(store.load(THREAD))
    assert model.cursor.script.loop_ids == (alice.loop_id, bob.loop_id)
    with model.recording():
        out = run(model, model)
    assert out["messages"][-1].content == "Bob here"
    assert model.cursor.finished and model.divergence is None
    _, _, alice_again, bob_again = store.load(THREAD).loops
    assert (alice_again.kind.tag, alice_again.parent_loop_id) == ("replay", alice.loop_id)
    assert (bob_again.kind.kind, bob_again.parent_loop_id) == ("Default", alice_again.loop_id)
    assert [turns(alice_again), turns(bob_again)] == [turns(alice), turns(bob)]


@pytest.mark.parametrize("inherits", [False, True])
def test_a_replay_run_in_a_thread_that_does_not_see_the_recording_block_is_warned_of(
    original: Session, store: SqliteStore, caplog: pytest.LogCaptureFixture, inherits: bool
) -> None:
    # A pool's thread starts with empty context variables: the replay was recorded as an
    # ordinary run, its replies billed again (the session's usage doubled), silently.
    model = ReplayChatModel(original)

    def replayed() -> Any:
        return run_agent(model, model.wrap_tools([add, mul]), store)

    with caplog.at_level(logging.WARNING, logger="phi_session.replay"):
        with model.recording(), ThreadPoolExecutor(1) as pool:
            if inherits:  # the fix the warning names: the block's context, in the thread
                pool.submit(contextvars.copy_context().run, replayed).result()
            else:
                pool.submit(replayed).result()
    assert model.cursor.finished
    replay = the_other(store.load(THREAD), original.loops[0])
    (summary,) = store.query()
    if inherits:
        assert caplog.records == [] and replay.kind.tag == "replay"
        assert summary.usage == original.loops[0].usage
    else:
        (warning,) = caplog.records  # once, not at each of the four replies
        assert "copy_context().run" in warning.getMessage()
        assert replay.kind.kind == "Default" and not is_replayed(replay.turns[0].output_message)


class SelfBinding(ScriptedChat):
    """A chat model whose ``bind_tools`` configures and returns the model itself, as some
    providers' do (no ``RunnableBinding``); it keeps the tools it was given."""

    bound_tools: list[str] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        self.bound_tools = [convert_to_openai_tool(t)["function"]["name"] for t in tools]
        return self


def test_a_fallback_whose_bind_tools_returns_itself_takes_over(original: Session, store: SqliteStore) -> None:
    other = SelfBinding(messages=iter([reply("It is 42.", model="fake-2")]))
    model = ReplayChatModel(original, until_turn=3, fallback=other)
    with model.recording():
        out = run_agent(model, model.wrap_tools([add, mul]), store)
    assert out["messages"][-1].content == "It is 42."
    assert other.bound_tools == ["add", "mul"]
    fork = the_other(store.load(THREAD), original.loops[0])
    assert fork.status == "Completed" and fork.turn_count() == 4


def test_a_tool_that_interrupted_interrupts_again_and_the_resumed_run_replays_its_result(
    store: SqliteStore,
) -> None:
    # Replayed, the tool was answered with '[interrupted]' instead of interrupting: the
    # first run went on to a model call, and diverged from the resumed run's recorded
    # request ('booked Oslo: yes').
    @tool
    def book(city: str) -> str:
        """Book a trip, once a human confirms."""
        RUNS.append("book")
        return f"booked {city}: {interrupt({'confirm': city})}"

    def conversation(model: Any, tools: list[Any]) -> tuple[Any, Any]:
        agent = create_agent(model, tools=tools, checkpointer=InMemorySaver())
        phi = PhiCallbackHandler(store=store, capture_requests=True)
        try:
            config: Any = {"callbacks": [phi], "configurable": {"thread_id": THREAD}}
            first = agent.invoke({"messages": [("user", "book Oslo")]}, config)
            return first["__interrupt__"][0].value, agent.invoke(Command(resume="yes"), config)
        finally:
            phi.close()

    asked, out = conversation(
        ScriptedChat(messages=iter([reply("", ("c1", "book", {"city": "Oslo"})), reply("done")])), [book]
    )
    assert asked == {"confirm": "Oslo"} and out["messages"][-1].content == "done"
    interrupted, resumed = store.load(THREAD).loops
    RUNS.clear()
    model = ReplayChatModel(store.load(THREAD), chain=True)
    with model.recording():
        asked, out = conversation(model, model.wrap_tools([book]))
    assert asked == {"confirm": "Oslo"} and out["messages"][-1].content == "done"
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    replayed = store.load(THREAD).loops[2:]

    def seen(loop: LoopRecord) -> list[Any]:  # without the interrupt's id, new in each run
        return [
            (m.kind, m.data[0]["value"] if m.kind == "langgraph.interrupt" else m.data)
            if isinstance(m, ExtensionMessage)
            else summarize(m)
            for m in loop.messages
        ]

    assert [seen(loop) for loop in replayed] == [seen(interrupted), seen(resumed)]
