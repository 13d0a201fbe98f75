"""Replay and fork of Google ADK runs, offline: an ``LlmAgent`` over a scripted
``BaseLlm`` is recorded (4 turns, 2 tools), then replayed with
`phi_session.adapters.google_adk.ReplayLlm` (no model, tools answered from the
recording), changed (divergence), and forked at turn 2 onto another scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

pytest.importorskip("google.adk", reason="needs the google-adk extra: pip install 'phi-session[google-adk]'")

from google.adk.agents import LlmAgent
from google.adk.models.base_llm import BaseLlm
from google.adk.runners import InMemoryRunner
from google.adk.tools.function_tool import FunctionTool

from phi_session import SqliteStore
from phi_session.adapters.google_adk import PhiPlugin, ReplayLlm
from phi_session.adapters.google_adk.replay import RecordedToolError
from phi_session.diff import diff_loops
from phi_session.errors import ReplayDiverged
from phi_session.messages import AgentMessage, AssistantMessage, ToolCall, ToolResultMessage
from phi_session.model import LoopRecord, Session, is_replayed
from phi_session.replay import RecordedModelError
from phi_session.replay.script import SharedContext

from .test_adapter_google_adk import Harness, ScriptedLlm, _answer, anthropic_usage

# ADK warns about its own deprecations; nothing of this test's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INSTRUCTION = "You are a calculator: use the tools."
SESSION = "calc-session"
QUESTION = "What is (2 + 3) * 4 + 1, doubled?"
RUNS: list[str] = []  # the tools that really ran


def add(a: int, b: int) -> int:
    """Adds two numbers."""
    RUNS.append("add")
    return a + b


def mul(a: int, b: int) -> int:
    """Multiplies two numbers."""
    RUNS.append("mul")
    return a * b


def sub(a: int, b: int) -> int:
    """Subtracts two numbers."""
    return a - b


def script() -> ScriptedLlm:
    """Four model responses: add, mul, both at once, then the answer."""
    return ScriptedLlm.of(
        ["Adding first.", ("add", {"a": 2, "b": 3})],
        [("mul", {"a": 5, "b": 4})],
        [("add", {"a": 20, "b": 1}), ("mul", {"a": 21, "b": 2})],
        ["The answer is 42."],
    )


def agent(model: BaseLlm, tools: list[Any] | None = None, instruction: str = INSTRUCTION) -> LlmAgent:
    return LlmAgent(name="calc", model=model, instruction=instruction, tools=tools or [add, mul])


def run(
    calc: LlmAgent, store: SqliteStore, *extra: Any, stream: bool = False, capture: bool = True
) -> list[Any]:
    """One invocation of `calc`, recorded into `store` (the plugin's default sink, requests
    kept unless not `capture`)."""
    h = Harness()
    phi = PhiPlugin(store=store, capture_requests=capture)
    runner = InMemoryRunner(agent=calc, app_name="app", plugins=[phi, *extra])
    try:
        return asyncio.run(h.ask(runner, QUESTION, session_id=SESSION, stream=stream))
    finally:
        asyncio.run(runner.close())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "sessions.db") as store:
        yield store


@pytest.fixture
def original(store: SqliteStore) -> Session:
    events = run(agent(script()), store)
    assert events[-1].content.parts[0].text == "The answer is 42."
    RUNS.clear()
    return store.load(SESSION)


def replay(
    session: Session,
    store: SqliteStore,
    *,
    with_tools: list[Any] | None = None,
    instruction: str = INSTRUCTION,
    **options: Any,
) -> tuple[ReplayLlm, Session]:
    """Replay the session's loop (`options`: `ReplayLlm`'s) with the agent's
    `with_tools` and `instruction`, recorded into the store; the stored session after."""
    model = ReplayLlm(session, **options)
    with model.recording():
        run(agent(model, with_tools, instruction), store, model.tools_plugin())
    return model, store.load(SESSION)


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
    """Each turn's inputs, reply, results and usage."""
    return [
        (
            [plain(m) for m in turn.input_messages],
            plain(turn.output_message),
            [plain(m) for m in turn.tool_results],
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
    results = {m.tool_call_id: m.content[0].text for m in loop.messages if isinstance(m, ToolResultMessage)}  # type: ignore[union-attr]
    assert [results[c.id] for c in calls(loop)] == ["5", "20", "21", "42"]
    assert loop.usage.input == 40 and loop.usage.output == 32
    for turn in loop.turns:  # captured through the embedded store's recorder
        request = turn.request_payload
        assert request is not None and request.system_prompt.startswith(INSTRUCTION)
        assert sorted(t.name for t in request.tools) == ["add", "mul"]
        assert request.tools[0].parameters["required"] == ["a", "b"]
    last = loop.turns[3].request_payload
    assert last is not None
    roles = [type(m).__name__ for m in last.messages]
    assert roles == [
        "UserMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "AssistantMessage",
        "ToolResultMessage",
        "ToolResultMessage",
    ]
    # ADK strips the ids it made up from what it sends the model: the request has none.
    assert [m.tool_call_id for m in last.messages if isinstance(m, ToolResultMessage)] == ["", "", "", ""]
    assert last.messages[2].content[0].text == '{"result":5}'  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_replay_without_model_or_tools_records_the_same_run_as_a_rerun(
    original: Session, store: SqliteStore, stream: bool
) -> None:
    model = ReplayLlm(original)
    with model.recording():
        events = run(agent(model), store, model.tools_plugin(), stream=stream)
    assert events[-1].content.parts[0].text == "The answer is 42."
    assert RUNS == []  # the tools were answered from the recording
    assert model.cursor.finished and model.divergence is None

    session = store.load(SESSION)
    (first,) = original.loops
    replayed = the_other(session, first)
    assert (replayed.kind.kind, replayed.kind.tag) == ("Rerun", "replay")
    assert replayed.parent_loop_id == first.loop_id and replayed.status == "Completed"
    assert replayed.metadata["replay"]["loop_id"] == first.loop_id
    assert replayed.config == first.config
    assert turns(replayed) == turns(first)  # messages, tool calls with their ids, results, usage
    assert replayed.usage == first.usage
    assert calls(replayed) == calls(first)
    # Its replies were served from the recording: they bill nothing.
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)


def test_a_recording_without_requests_does_not_diverge_on_adks_missing_call_ids(store: SqliteStore) -> None:
    # ADK sends the model no ids for the calls it numbered itself; the recorded loop has
    # them: an empty id is unknown, no divergence. (What still differs: ADK sends a
    # result as {"result": value}, the loop records the value.)
    run(agent(script()), store, capture=False)
    original = store.load(SESSION)
    (first,) = original.loops
    assert all(turn.request_payload is None for turn in first.turns)
    model = ReplayLlm(original, on_divergence="fallback", fallback=script())
    with model.recording():
        run(agent(model), store, model.tools_plugin(), capture=False)
    found = model.divergence
    assert found is not None and (found.turn_index, found.what) == (1, "messages")
    assert found.expected is not None and found.actual is not None
    assert found.expected.endswith("'5'") and found.actual.endswith("""'{"result":5}'""")


def total(a: int, b: int) -> dict[str, int]:
    """Adds two numbers, as a dict."""
    RUNS.append("total")
    return {"sum": a + b}


def test_a_long_recording_without_requests_is_set_up_reading_only_where_each_request_ends(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The replay's setup (a streamed reply's pieces, the responses sent to the calls) rebuilt
    # every turn's request from the recorded context, twice, and scanned it whole for the
    # reply it ends with: quadratic in the turns (2,000 turns: 2.2 s before the first call).
    n = 40
    steps = [[f"step {i}", ("total", {"a": i, "b": 1})] for i in range(n - 1)]
    run(agent(ScriptedLlm.of(*steps, ["done"]), [total]), store, capture=False)
    original = store.load(SESSION)
    assert len(original.loops[0].turns) == n
    RUNS.clear()
    read = []
    messages = SharedContext.messages

    def counting(context: SharedContext, end: int) -> tuple[AgentMessage, ...]:
        read.append(context.inherited + end)
        return messages(context, end)

    monkeypatch.setattr(SharedContext, "messages", counting)
    model = ReplayLlm(original)
    plugin = model.tools_plugin()
    assert sum(read) < 10 * n  # each message a few times, not once per later turn (~3,200)
    with model.recording():
        run(agent(model, [total]), store, plugin, capture=False)
    assert RUNS == [] and model.cursor.finished and model.divergence is None


def test_another_instruction_diverges_at_turn_0(original: Session, store: SqliteStore) -> None:
    with pytest.raises(ReplayDiverged) as raised:
        replay(original, store, instruction="You are a poet.")
    divergence = raised.value.divergence
    assert (divergence.turn_index, divergence.what) == (0, "system_prompt")
    assert str(raised.value).startswith(
        f"replay diverged at turn 0 of {original.loops[0].loop_id}: system_prompt"
    )
    replayed = the_other(store.load(SESSION), original.loops[0])
    assert replayed.status == "Aborted"  # the replayed run failed, and is recorded as such


def test_another_tool_diverges_at_turn_0(original: Session, store: SqliteStore) -> None:
    with pytest.raises(ReplayDiverged) as raised:
        replay(original, store, with_tools=[add, sub])
    divergence = raised.value.divergence
    assert (divergence.turn_index, divergence.what) == (0, "tools")
    assert divergence.detail == "tool(s) added: sub; tool(s) removed: mul"


def test_a_live_tool_returning_something_else_diverges_at_the_next_turn(
    original: Session, store: SqliteStore
) -> None:
    def mul(a: int, b: int) -> int:
        """Multiplies two numbers."""
        return a * b + 1

    with pytest.raises(ReplayDiverged) as raised:
        replay(original, store, with_tools=[add, mul], tools="live")
    divergence = raised.value.divergence
    # mul's result (turn 1) reaches the model at turn 2, where the request differs
    assert (divergence.turn_index, divergence.what) == (2, "messages")
    assert divergence.expected is not None and "20" in divergence.expected
    assert divergence.actual is not None and "21" in divergence.actual


def test_fallback_mode_hands_the_diverged_run_to_the_fallback_model(
    original: Session, store: SqliteStore
) -> None:
    fallback = ScriptedLlm(model="scripted-2", script=[["A poem instead."]])
    model, session = replay(
        original, store, instruction="You are a poet.", on_divergence="fallback", fallback=fallback
    )
    assert model.divergence is not None and model.divergence.what == "system_prompt"
    replayed = the_other(session, original.loops[0])
    assert replayed.status == "Completed" and replayed.turn_count() == 1
    assert replayed.messages[-1].content[0].text == "A poem instead."  # type: ignore[union-attr]


def test_a_fork_at_turn_2_replays_two_turns_then_runs_the_other_model(
    original: Session, store: SqliteStore
) -> None:
    other = ScriptedLlm(model="scripted-2", script=[[("add", {"a": 20, "b": 2})], ["It is 22."]])
    model = ReplayLlm(original, until_turn=2, fallback=other)
    with model.recording():
        events = run(agent(model), store, model.tools_plugin())
    assert events[-1].content.parts[0].text == "It is 22."
    assert RUNS == ["add"]  # turns 0 and 1 answered from the recording; the fork's call ran

    session = store.load(SESSION)
    first = original.loops[0]
    fork = the_other(session, first)
    assert (fork.kind.kind, fork.kind.tag) == ("Branch", "fork")
    assert fork.parent_loop_id == first.loop_id
    assert fork.metadata["fork"] == {
        "session_id": SESSION,
        "loop_id": first.loop_id,
        "turn_index": 2,
        "change": {"model": "scripted-2"},
    }
    assert fork.turn_count() == 4
    assert turns(fork)[:2] == turns(first)[:2]
    assert turns(fork)[2] != turns(first)[2]
    (result,) = fork.turns[2].tool_results  # the fork's own call ran, recorded once
    assert result.content[0].text == "22"  # type: ignore[union-attr]
    # The fork stands in for the original: its context is its own run, from the prompt.
    context = [plain(m) for m in session.context_at(fork.loop_id)]
    assert context == [plain(m) for m in fork.messages]
    assert context[:5] == [plain(m) for m in first.messages[:5]]
    assert context[-1].content[0].text == "It is 22."  # type: ignore[union-attr]


def test_a_string_result_that_reads_as_json_is_answered_as_the_string_it_was(store: SqliteStore) -> None:
    def lookup(key: str) -> str:
        """Looks a key up."""
        return "7"  # recorded as the text 7, as the number 7 would be

    model = ScriptedLlm.of([("lookup", {"key": "k"})], ["It is 7."])
    run(agent(model, [lookup]), store)
    replayed, _ = replay(store.load(SESSION), store, with_tools=[lookup])
    assert replayed.cursor.finished and replayed.divergence is None  # the request sent {"result": "7"} again


def test_a_tool_returning_none_is_answered_from_the_recording_not_run(store: SqliteStore) -> None:
    def notify(message: str) -> None:
        """Sends a notification."""
        RUNS.append("notify")

    run(agent(ScriptedLlm.of([("notify", {"message": "hi"})], ["Done."]), [notify]), store)
    RUNS.clear()
    replayed, _ = replay(store.load(SESSION), store, with_tools=[notify])
    assert RUNS == []  # answered {"result": None}, as ADK sends a None result
    assert replayed.cursor.finished and replayed.divergence is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_run_recorded_streaming_replays_its_split_replies(store: SqliteStore, stream: bool) -> None:
    # Streamed, the first reply's text and call came as two final responses: ADK's
    # next request holds them as two model contents, the recording as one message.
    run(agent(script()), store, stream=True)
    original = store.load(SESSION)
    (first,) = original.loops
    request = first.turns[1].request_payload
    assert request is not None
    assert [len(m.content) for m in request.messages if isinstance(m, AssistantMessage)] == [1, 1]
    RUNS.clear()
    model = ReplayLlm(original)
    with model.recording():
        events = run(agent(model), store, model.tools_plugin(), stream=stream)
    assert events[-1].content.parts[0].text == "The answer is 42."
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    assert turns(the_other(store.load(SESSION), first)) == turns(first)


def explode(reason: str) -> str:
    """Always fails."""
    RUNS.append("explode")
    raise ValueError(f"tool failed: {reason}")


async def as_error(tool: Any, args: Any, tool_context: Any, error: Exception) -> dict[str, str]:
    return {"error": str(error)}


def test_a_handled_tool_error_is_answered_with_what_the_model_got(store: SqliteStore) -> None:
    def failing(model: BaseLlm) -> LlmAgent:
        return LlmAgent(
            name="calc", model=model, instruction="Try.", tools=[explode], on_tool_error_callback=as_error
        )

    run(failing(ScriptedLlm.of([("explode", {"reason": "x"})], ["It failed."])), store)
    original = store.load(SESSION)
    (result,) = [m for m in original.loops[0].messages if isinstance(m, ToolResultMessage)]
    assert result.is_error and result.content[0].text == '{"error":"tool failed: x"}'  # type: ignore[union-attr]
    RUNS.clear()
    model = ReplayLlm(original)
    with model.recording():
        run(failing(model), store, model.tools_plugin())
    assert RUNS == []  # answered with the callback's {"error": "tool failed: x"}, as recorded
    assert model.cursor.finished and model.divergence is None
    # Recorded as the recorded error, not as the callback's answer taken for a success.
    session = store.load(SESSION)
    replayed = the_other(session, original.loops[0])
    assert turns(replayed) == turns(original.loops[0])
    assert diff_loops(session, original.loops[0].loop_id, session, replayed.loop_id).identical


def test_a_reply_with_cache_writes_replays_with_its_usage(store: SqliteStore) -> None:
    run(agent(ScriptedLlm(model="claude-1", script=[["Hi."]], usage=anthropic_usage())), store)
    original = store.load(SESSION)
    (first,) = original.loops
    model = ReplayLlm(original)
    with model.recording():
        run(agent(model), store, model.tools_plugin())
    replayed = the_other(store.load(SESSION), first)
    assert turns(replayed) == turns(first)
    assert (replayed.usage.input, replayed.usage.cache_write) == (50, 2000)


def test_an_empty_reply_without_a_finish_reason_replays_as_it_was_not_as_an_error(store: SqliteStore) -> None:
    # Sent back with finish_reason STOP, ADK's empty-response policy made it an error.
    run(agent(ScriptedLlm.of([("add", {"a": 1, "b": 2})], [""])), store)
    original = store.load(SESSION).loops[0]
    assert original.turns[-1].output_message.stop_reason == "stop"  # type: ignore[union-attr]
    RUNS.clear()
    model, session = replay(store.load(SESSION), store)
    assert model.cursor.finished and model.divergence is None
    assert turns(the_other(session, original)) == turns(original)


def test_a_tool_error_that_ended_the_run_is_raised_again(store: SqliteStore) -> None:
    def failing(model: BaseLlm) -> LlmAgent:
        return LlmAgent(name="calc", model=model, instruction="Try.", tools=[explode])

    with pytest.raises(ValueError, match="tool failed: x"):
        run(failing(ScriptedLlm.of([("explode", {"reason": "x"})], ["Unreached."])), store)
    original = store.load(SESSION)
    assert original.loops[0].status == "Aborted"
    RUNS.clear()
    model = ReplayLlm(original)
    with model.recording(), pytest.raises(RuntimeError) as raised:
        run(failing(model), store, model.tools_plugin())
    cause = raised.value.__cause__  # ADK wraps what a plugin raises
    assert isinstance(cause, RecordedToolError) and str(cause) == "explode failed: ValueError: tool failed: x"
    assert RUNS == [] and model.cursor.finished and model.divergence is None  # not "exhausted"
    assert the_other(store.load(SESSION), original.loops[0]).status == "Aborted"


def test_a_model_failure_that_ended_the_run_fails_the_replay_there(store: SqliteStore) -> None:
    with pytest.raises(RuntimeError, match="quota"):
        run(agent(ScriptedLlm.of([("add", {"a": 2, "b": 3})], RuntimeError("quota"))), store)
    original = store.load(SESSION)
    (first,) = original.loops
    assert first.status == "Aborted" and first.turns[1].output_message.stop_reason == "error"  # type: ignore[union-attr]
    RUNS.clear()
    model = ReplayLlm(original)
    # not the error as a response, which ADK ends the run with as if it had succeeded
    with model.recording(), pytest.raises(RecordedModelError, match="quota"):
        run(agent(model), store, model.tools_plugin())
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    replayed = the_other(store.load(SESSION), first)
    assert replayed.status == "Aborted" and turns(replayed) == turns(first)


def transferring(router: BaseLlm, calc: BaseLlm) -> LlmAgent:
    """A router handing the question over to the calculator."""
    helper = LlmAgent(name="calc", model=calc, instruction=INSTRUCTION, tools=[add, mul], description="Sums.")
    return LlmAgent(name="router", model=router, instruction="Route.", sub_agents=[helper])


@pytest.fixture
def transferred(store: SqliteStore) -> Session:
    router = ScriptedLlm(model="router-1", script=[[("transfer_to_agent", {"agent_name": "calc"})]])
    calc = ScriptedLlm(model="calc-1", script=[[("add", {"a": 2, "b": 3})], ["It is 5."]])
    events = run(transferring(router, calc), store)
    assert events[-1].content.parts[0].text == "It is 5."
    RUNS.clear()
    return store.load(SESSION)


def test_a_replay_model_per_agent_answers_only_its_own_agents_tool_calls(
    transferred: Session, store: SqliteStore
) -> None:
    router_loop, calc_loop = (loop.loop_id for loop in transferred.loops)
    router, calc = ReplayLlm(transferred, router_loop), ReplayLlm(transferred, calc_loop)
    with router.recording():
        events = run(
            transferring(router, calc),
            store,
            calc.tools_plugin("calc_tools"),
            router.tools_plugin("router_tools"),
        )
    assert events[-1].content.parts[0].text == "It is 5."
    assert RUNS == []  # add answered by the calculator's replay, the transfer checked by the router's
    assert router.cursor.finished and calc.cursor.finished


def test_a_replay_model_per_agent_bills_none_of_either_agents_replies(
    transferred: Session, store: SqliteStore
) -> None:
    router_loop, calc_loop = (loop.loop_id for loop in transferred.loops)
    router, calc = ReplayLlm(transferred, router_loop), ReplayLlm(transferred, calc_loop)
    with router.recording():  # the router's block: the calculator's replies are served too
        run(
            transferring(router, calc),
            store,
            calc.tools_plugin("calc_tools"),
            router.tools_plugin("router_tools"),
        )
    session = store.load(SESSION)
    replayed = session.loops[len(transferred.loops) :]
    assert [loop.turn_count() for loop in replayed] == [1, 2]
    assert all(is_replayed(turn.output_message) for loop in replayed for turn in loop.turns)
    assert session.billed_usage() == transferred.billed_usage()
    (summary,) = store.query()
    assert summary.usage == transferred.billed_usage()


def transferring_to_failure(router: BaseLlm, calc: BaseLlm) -> LlmAgent:
    """A router handing over to an agent whose tool fails, the error handled by a callback."""
    helper = LlmAgent(
        name="calc",
        model=calc,
        instruction="Try.",
        tools=[explode],
        on_tool_error_callback=as_error,
        description="Tries.",
    )
    return LlmAgent(name="router", model=router, instruction="Route.", sub_agents=[helper])


@pytest.mark.parametrize("chain", [False, True])
def test_a_transferred_agents_handled_tool_error_replays_as_the_recorded_error(
    store: SqliteStore, chain: bool
) -> None:
    router = ScriptedLlm(model="router-1", script=[[("transfer_to_agent", {"agent_name": "calc"})]])
    calc = ScriptedLlm(model="calc-1", script=[[("explode", {"reason": "x"})], ["It failed."]])
    run(transferring_to_failure(router, calc), store)
    original = store.load(SESSION)
    router_loop, calc_loop = original.loops
    RUNS.clear()
    if chain:
        model = ReplayLlm(original, calc_loop.loop_id, chain=True)
        with model.recording():
            run(transferring_to_failure(model, model), store, model.tools_plugin())
    else:
        router_model = ReplayLlm(original, router_loop.loop_id)
        calc_model = ReplayLlm(original, calc_loop.loop_id)
        with router_model.recording():  # the calculator's answered results are taken back too
            run(
                transferring_to_failure(router_model, calc_model),
                store,
                calc_model.tools_plugin("calc_tools"),
                router_model.tools_plugin("router_tools"),
            )
    assert RUNS == []
    replayed = store.load(SESSION).loops[-1]
    (result,) = [m for m in replayed.messages if isinstance(m, ToolResultMessage)]
    assert result.is_error and result.content[0].text == '{"error":"tool failed: x"}'  # type: ignore[union-attr]
    assert turns(replayed) == turns(calc_loop)


def test_one_replay_model_for_a_chain_names_each_loops_model(
    transferred: Session, store: SqliteStore
) -> None:
    model = ReplayLlm(transferred, chain=True)  # the calculator's loop, after the router's
    with model.recording():
        events = run(transferring(model, model), store, model.tools_plugin())
    assert events[-1].content.parts[0].text == "It is 5."
    assert RUNS == [] and model.cursor.finished
    router, calc = transferred.loops
    replayed = [
        loop for loop in store.load(SESSION).loops if loop.loop_id not in (router.loop_id, calc.loop_id)
    ]
    assert [loop.config for loop in replayed] == [router.config, calc.config]
    assert [turns(loop) for loop in replayed] == [turns(router), turns(calc)]  # the replies' models too


def test_a_conversation_resumed_after_a_confirmation_replays_the_confirmed_tools_result(
    store: SqliteStore,
) -> None:
    # ADK holds the call back and asks for confirmation (its answer, the asking loop's
    # result); the resumed invocation runs the tool before calling the model. Replayed,
    # the first run was answered with ADK's request as if the tool had returned it (no
    # confirmation asked), and the resumed run's tool with it again.
    def transfer(amount: int) -> str:
        """Transfers money."""
        RUNS.append("transfer")
        return f"sent {amount}"

    def conversation(model: BaseLlm, *extra: Any) -> str:
        bank = LlmAgent(name="bank", model=model, tools=[FunctionTool(transfer, require_confirmation=True)])
        runner = InMemoryRunner(
            agent=bank, app_name="app", plugins=[PhiPlugin(store=store, capture_requests=True), *extra]
        )

        async def both() -> str:
            events = await Harness().ask(runner, "send 5", session_id=SESSION)
            (ask,) = [
                c for e in events for c in e.get_function_calls() if c.name == "adk_request_confirmation"
            ]
            answer = _answer(ask, {"confirmed": True})
            resumed = [e async for e in runner.run_async(user_id="u", session_id=SESSION, new_message=answer)]
            await runner.close()
            return str(resumed[-1].content.parts[0].text)

        return asyncio.run(both())

    assert conversation(ScriptedLlm.of([("transfer", {"amount": 5})], ["all done"])) == "all done"
    assert RUNS == ["transfer"]
    asked, resumed = store.load(SESSION).loops
    RUNS.clear()
    model = ReplayLlm(store.load(SESSION), chain=True)
    with model.recording():
        assert conversation(model, model.tools_plugin()) == "all done"
    assert RUNS == [] and model.cursor.finished and model.divergence is None
    replayed_asked, replayed_resumed = store.load(SESSION).loops[2:]
    assert turns(replayed_asked) == turns(asked) and turns(replayed_resumed) == turns(resumed)
