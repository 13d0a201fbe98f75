"""Replay and fork of OpenAI Agents SDK runs (`phi_session.adapters.openai_agents.ReplayModel`),
offline: recorded on the SDK's own ScriptedModel, replayed without any model."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agents", reason="needs pip install 'phi-session[openai-agents]'")

from agents import Agent, RunConfig, Runner, UserError, function_tool
from agents.testing.model import ScriptedModel, assistant_message, function_call
from agents.usage import Usage as SdkUsage
from msgspec.structs import replace
from openai.types.responses import ResponseReasoningItem
from openai.types.responses.response_reasoning_item import Summary
from openai.types.responses.response_usage import InputTokensDetails

from phi_session import LoopConfigSnapshot, SessionRecorder, SessionRecorderConfig, SqliteStore, Tracer
from phi_session.adapters import openai_agents
from phi_session.adapters.openai_agents import PhiRunHooks, ReplayModel, ReplayProvider
from phi_session.diff import diff_loops
from phi_session.errors import RecordedModelError, RecordedToolError, TurnNotFound
from phi_session.events import ContinuationKind
from phi_session.messages import AgentMessage, AssistantMessage, ThinkingContent, ToolCall
from phi_session.model import LoopRecord, Session, is_replayed
from phi_session.replay import ReplayDiverged, ReplayScript, RequestShape, fork, recording_as, replay_lineage
from phi_session.replay.request import summarize

SYSTEM = "You are a calculator."
SESSION = "replayed"


class Tools:
    """The agent's two tools, counting their calls; `prefix` changes what lookup returns."""

    def __init__(self, prefix: str = "value of") -> None:
        self.calls = 0
        tools = self

        @function_tool
        def lookup(key: str) -> str:
            """Look a key up."""
            tools.calls += 1
            return f"{prefix} {key}"

        @function_tool
        def add(a: int, b: int) -> int:
            """Add two numbers."""
            tools.calls += 1
            return a + b

        self.tools = [lookup, add]


@function_tool
def mul(a: int, b: int) -> int:
    """Multiply two numbers."""
    return a * b


def usage(step: int) -> SdkUsage:
    """`step` of the input tokens read from the cache (OpenAI counts them in the input too)."""
    return SdkUsage(
        requests=1,
        input_tokens=100 + 2 * step,
        input_tokens_details=InputTokensDetails(cached_tokens=step, cache_write_tokens=0),
        output_tokens=10 + step,
        total_tokens=110 + 3 * step,
    )


def four_turns() -> ScriptedModel:
    """A thought, text and a call; a call; two calls; the answer."""
    thought = ResponseReasoningItem(
        id="rs_1", type="reasoning", summary=[Summary(text="first, look it up", type="summary_text")]
    )
    steps: list[Any] = [
        [thought, assistant_message("let me look"), function_call("lookup", {"key": "a"}, call_id="c1")],
        [function_call("add", {"a": 1, "b": 2}, call_id="c2")],
        [
            function_call("lookup", {"key": "b"}, call_id="c3"),
            function_call("add", {"a": 3, "b": 4}, call_id="c4"),
        ],
        [assistant_message("done: 3 and 7")],
    ]
    return ScriptedModel(
        [{"output": output, "usage": usage(step)} for step, output in enumerate(steps)], emit_traces=True
    )


def no_model() -> ScriptedModel:
    return ScriptedModel([])  # any call raises UnexpectedModelCall


def make_agent(
    tools: Tools, *, model: Any = None, system: str = SYSTEM, extra: Sequence[Any] = ()
) -> Agent[Any]:
    return Agent(
        name="calc",
        instructions=system,
        model=model if model is not None else no_model(),
        tools=[*tools.tools, *extra],
    )


def run(agent: Agent[Any], **options: Any) -> Any:
    config = RunConfig(trace_metadata={"phi.session_id": SESSION}, **options)
    return asyncio.run(Runner.run(agent, "compute", hooks=PhiRunHooks(), run_config=config))


@pytest.fixture
def recorder() -> Iterator[SessionRecorder]:
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))
    openai_agents.install([recorder], capture_requests=True)
    try:
        yield recorder
    finally:
        openai_agents.uninstall()


@pytest.fixture
def original(recorder: SessionRecorder) -> tuple[Session, LoopRecord]:
    result = run(make_agent(Tools(), model=four_turns()))
    assert result.final_output == "done: 3 and 7"
    (session,) = recorder.sessions()
    (loop,) = session.loops
    return session, loop


def session_of(recorder: SessionRecorder) -> Session:
    (session,) = recorder.sessions()
    return session


def bare(messages: Sequence[AgentMessage]) -> list[AgentMessage]:
    """Messages without what differs between two runs of the same conversation (time, turn
    ids, the mark of a reply a replay served)."""
    return [replace(message, timestamp=0, turn_id=None, phi_session_replayed=False) for message in messages]  # type: ignore[type-var]


def calls_of(loop: LoopRecord) -> list[list[ToolCall]]:
    return [
        [block for block in turn.output_message.content if isinstance(block, ToolCall)]  # type: ignore[union-attr]
        for turn in loop.turns
    ]


# -- recording -------------------------------------------------------------------------------------


def test_the_recording_captures_each_turns_request(original: tuple[Session, LoopRecord]) -> None:
    _, loop = original
    assert loop.turn_count() == 4
    payloads = [turn.request_payload for turn in loop.turns]
    assert all(payload is not None for payload in payloads)
    assert [payload.system_prompt for payload in payloads] == [SYSTEM] * 4  # type: ignore[union-attr]
    assert [[tool.name for tool in payload.tools] for payload in payloads] == [["lookup", "add"]] * 4  # type: ignore[union-attr]
    assert payloads[0].tools[1].description == "Add two numbers."  # type: ignore[union-attr]
    assert payloads[0].tools[1].parameters["required"] == ["a", "b"]  # type: ignore[union-attr]
    assert [len(payload.messages) for payload in payloads] == [1, 3, 5, 8]  # type: ignore[union-attr]
    results = [m for m in payloads[3].messages if type(m).__name__ == "ToolResultMessage"]  # type: ignore[union-attr]
    assert [(r.tool_call_id, r.tool_name, r.content[0].text) for r in results] == [  # type: ignore[union-attr]
        ("c1", "lookup", "value of a"),
        ("c2", "add", "3"),
        ("c3", "lookup", "value of b"),
        ("c4", "add", "7"),
    ]
    assert [(c.id, c.name) for turn in calls_of(loop) for c in turn] == [
        ("c1", "lookup"),
        ("c2", "add"),
        ("c3", "lookup"),
        ("c4", "add"),
    ]
    assert [turn.usage.input for turn in loop.turns] == [100, 101, 102, 103]
    assert [turn.usage.cache_read for turn in loop.turns] == [0, 1, 2, 3]


def recorded_without_requests() -> SessionRecorder:
    """A four-turn run recorded by an adapter installed without ``capture_requests``."""
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))
    openai_agents.install([recorder])
    try:
        run(make_agent(Tools(), model=four_turns()))
    finally:
        openai_agents.uninstall()
    return recorder


def test_without_capture_requests_no_request_is_recorded() -> None:
    recorder = recorded_without_requests()
    assert all(turn.request_payload is None for turn in session_of(recorder).loops[0].turns)


def test_a_replay_without_captured_requests_warns_that_the_system_prompt_is_not_compared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = ReplayModel(session_of(recorded_without_requests()))
    with caplog.at_level(logging.WARNING, logger="phi_session.replay"):
        run(model.agent(make_agent(Tools(), system="You are a poet.")))
    assert model.cursor.finished and model.divergence is None  # nothing to compare it with
    (warning,) = caplog.records
    assert "only the messages are compared" in warning.getMessage()


def test_requests_captured_into_the_embedded_store_are_saved(tmp_path: Path) -> None:
    # The default sink is the embedded store: its recorder keeps the captured requests too.
    with SqliteStore(tmp_path / "sessions.db") as store:
        openai_agents.install(store=store, capture_requests=True)
        try:
            run(make_agent(Tools(), model=four_turns()))
        finally:
            openai_agents.uninstall()
        (loop,) = store.load(SESSION).loops
    payloads = [turn.request_payload for turn in loop.turns]
    assert all(payload is not None for payload in payloads)
    assert [payload.system_prompt for payload in payloads] == [SYSTEM] * 4  # type: ignore[union-attr]


# -- replay ----------------------------------------------------------------------------------------


def test_a_replay_with_recorded_tools_equals_the_original(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    script = ReplayScript.from_session(session, loop.loop_id)
    model = ReplayModel(script)
    tools = Tools()
    with model.recording():
        result = run(model.agent(make_agent(tools)))
    assert result.final_output == "done: 3 and 7"
    assert tools.calls == 0 and model.cursor.finished and model.cursor.divergence is None

    first, replayed = session_of(recorder).loops
    assert first.loop_id == loop.loop_id
    assert replayed.kind == ContinuationKind.rerun("replay")
    assert replayed.parent_loop_id == loop.loop_id
    assert replayed.metadata["replay"] == {"session_id": SESSION, "loop_id": loop.loop_id}
    assert replayed.status == "Completed" and replayed.turn_count() == 4
    assert bare(replayed.messages) == bare(loop.messages)
    assert calls_of(replayed) == calls_of(loop)
    assert [turn.usage for turn in replayed.turns] == [turn.usage for turn in loop.turns]
    assert replayed.usage == loop.usage
    loop_diff = diff_loops(session_of(recorder), loop.loop_id, session_of(recorder), replayed.loop_id)
    assert loop_diff.identical and loop_diff.usage_delta.is_zero()
    # Every reply was served from the recording: the replay bills no tokens.
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)
    assert replayed.billed_usage().total_tokens == 0 and replayed.model_calls() == []
    assert session_of(recorder).billed_usage() == loop.usage
    thought = replayed.turns[0].output_message.content[0]  # type: ignore[union-attr]
    assert isinstance(thought, ThinkingContent) and thought.thinking == "first, look it up"
    for mine, theirs in zip(replayed.turns, loop.turns, strict=True):
        assert bare(mine.request_payload.messages) == bare(theirs.request_payload.messages)  # type: ignore[union-attr]


def test_a_streamed_replay_equals_the_original(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id)

    async def streamed() -> Any:
        config = RunConfig(trace_metadata={"phi.session_id": SESSION})
        result = Runner.run_streamed(
            model.agent(make_agent(Tools())), "compute", hooks=PhiRunHooks(), run_config=config
        )
        texts = [
            event.data.delta
            async for event in openai_agents.stream(result)
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
        ]
        return result.final_output, texts

    with recording_as(replay_lineage(model.script)):
        output, texts = asyncio.run(streamed())
    assert output == "done: 3 and 7" and texts == ["let me look", "done: 3 and 7"]
    replayed = session_of(recorder).loops[-1]
    assert bare(replayed.messages) == bare(loop.messages)
    assert replayed.usage == loop.usage
    # Given no cursor, the block takes the replay model's: its served replies bill nothing.
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)
    assert session_of(recorder).billed_usage() == loop.usage


class SlowModel(ScriptedModel):
    """A scripted model answering after a while, as a live model does."""

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.2)
        return await super().get_response(*args, **kwargs)


@pytest.mark.parametrize("given", [False, True])
def test_a_live_run_beside_a_replayed_one_in_the_block_bills_its_own_replies(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord], given: bool
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id)
    spent = SdkUsage(
        requests=1,
        input_tokens=1000,
        input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
        output_tokens=500,
        total_tokens=1500,
    )
    live = SlowModel([{"output": [assistant_message("live answer")], "usage": spent}], emit_traces=True)

    async def both() -> Any:
        config = RunConfig(trace_metadata={"phi.session_id": SESSION})
        replayed = Runner.run(
            model.agent(make_agent(Tools())), "compute", hooks=PhiRunHooks(), run_config=config
        )
        other = Runner.run(
            Agent(name="live", instructions="x", model=live), "hi", hooks=PhiRunHooks(), run_config=config
        )
        return await asyncio.gather(replayed, other)

    # The live run started before the replay served its replies: none of them is its own.
    with recording_as(replay_lineage(model.script), model.cursor if given else None):
        asyncio.run(both())
    (replayed,) = [lp for lp in session_of(recorder).loops[1:] if lp.turn_count() == 4]
    (other,) = [lp for lp in session_of(recorder).loops[1:] if lp.turn_count() == 1]
    assert all(is_replayed(turn.output_message) for turn in replayed.turns)
    assert not is_replayed(other.turns[0].output_message)
    assert replayed.billed_usage().total_tokens == 0 and other.billed_usage().total_tokens == 1500
    assert session_of(recorder).billed_usage() == loop.usage + other.usage


def test_the_provider_replays_agents_named_by_model(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id)
    agent = model.agent(make_agent(Tools())).clone(model="gpt-replayed")
    assert ReplayProvider(model).get_model("gpt-replayed") is model
    assert run(agent, model_provider=ReplayProvider(model)).final_output == "done: 3 and 7"


def test_a_forks_model_gets_the_tool_call_arguments_as_the_original_model_did(
    recorder: SessionRecorder,
) -> None:
    # Re-encoded with json.dumps they reached it ASCII-escaped and spaced: '{"key": "caf\\u00e9 ..."}'.
    steps: list[Any] = [
        [function_call("lookup", {"key": "café 🎉", "a": 1}, call_id="c1")],
        [assistant_message("done")],
    ]
    first = ScriptedModel(steps, emit_traces=True)
    run(make_agent(Tools(), model=first))
    other = ScriptedModel([[assistant_message("forked")]], emit_traces=True)
    model = ReplayModel(session_of(recorder), until_turn=1, fallback=other)
    with model.recording():
        run(model.agent(make_agent(Tools())))

    def arguments(call: Any) -> list[str]:
        return [item["arguments"] for item in call.input if item.get("type") == "function_call"]

    assert arguments(other.calls[0]) == arguments(first.calls[1]) == ['{"key":"café 🎉","a":1}']


def test_live_tools_run_and_an_unchanged_agent_does_not_diverge(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id, tools="live")
    tools = Tools()
    run(model.agent(make_agent(tools)))
    assert tools.calls == 4 and model.cursor.finished


# -- divergence ------------------------------------------------------------------------------------


def replay_diverges(agent: Agent[Any], model: ReplayModel) -> str:
    with pytest.raises(ReplayDiverged) as raised:
        run(model.agent(agent))
    divergence = raised.value.divergence
    return f"{divergence.turn_index} {divergence.what}"


def test_another_system_prompt_diverges_at_the_first_turn(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id)
    assert replay_diverges(make_agent(Tools(), system="You are a poet."), model) == "0 system_prompt"
    assert model.cursor.divergence is not None
    assert "You are a poet." in model.cursor.divergence.describe()


def test_another_tool_diverges_at_the_first_turn(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id)
    assert replay_diverges(make_agent(Tools(), extra=[mul]), model) == "0 tools"
    assert model.cursor.divergence is not None and "mul" in model.cursor.divergence.detail


def test_another_tool_result_diverges_at_the_turn_that_reads_it(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id, tools="live")
    assert replay_diverges(make_agent(Tools(prefix="no value for")), model) == "1 messages"
    divergence = model.cursor.divergence
    assert divergence is not None and divergence.loop_id == loop.loop_id
    assert "value of a" in str(divergence.expected) and "no value for a" in str(divergence.actual)


def test_on_divergence_fallback_hands_the_run_to_the_fallback_model(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    fallback = ScriptedModel([[assistant_message("from the fallback")]], emit_traces=True)
    model = ReplayModel(session, loop.loop_id, on_divergence="fallback", fallback=fallback)
    with model.recording():
        result = run(model.agent(make_agent(Tools(), system="You are a poet.")))
    assert result.final_output == "from the fallback"
    assert model.divergence is not None and model.divergence.what == "system_prompt"
    # The replay names its fallback; the turn it took over at is where it differs.
    recorded = session_of(recorder)
    replayed = recorded.loops[-1]
    assert replayed.kind == ContinuationKind.rerun("replay")
    assert replayed.metadata["replay"] == {
        "session_id": SESSION,
        "loop_id": loop.loop_id,
        "fallback": "ScriptedModel",
    }
    first = diff_loops(recorded, loop.loop_id, recorded, replayed.loop_id).first_divergence
    assert first is not None and first.turn == model.divergence.turn_index == 0


def test_a_fallback_is_required_to_hand_over(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    with pytest.raises(ValueError, match="fallback"):
        ReplayModel(session, loop.loop_id, on_divergence="fallback")


# -- fork ------------------------------------------------------------------------------------------


def test_a_fork_at_turn_2_replays_two_turns_then_runs_the_other_model(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord]
) -> None:
    session, loop = original
    other = ScriptedModel(
        [{"output": [assistant_message("forked: 3")], "usage": usage(50)}], emit_traces=True
    )
    script = ReplayScript.from_session(session, loop.loop_id)
    model = ReplayModel(script, until_turn=2, fallback=other)
    tools = Tools()
    with model.recording(change={"model": "other"}):
        result = run(model.agent(make_agent(tools)))
    assert result.final_output == "forked: 3" and tools.calls == 0
    (asked,) = other.calls
    # the other model sees the prompt and the two replayed turns with their recorded results
    outputs = [
        (item["call_id"], item["output"])
        for item in asked.input
        if item.get("type") == "function_call_output"
    ]
    assert outputs == [("c1", "value of a"), ("c2", "3")]

    recorded = session_of(recorder)
    _, fork = recorded.loops
    assert fork.kind == ContinuationKind.branch("fork") and fork.parent_loop_id == loop.loop_id
    assert fork.metadata["fork"] == {
        "session_id": SESSION,
        "loop_id": loop.loop_id,
        "turn_index": 2,
        "change": {"model": "other"},
    }
    assert fork.turn_count() == 3
    for turn_index in (0, 1):
        mine, theirs = fork.turns[turn_index], loop.turns[turn_index]
        assert bare([mine.output_message]) == bare([theirs.output_message])  # type: ignore[list-item]
        assert bare(mine.tool_results) == bare(theirs.tool_results)
        assert mine.usage == theirs.usage
    answer = fork.turns[2].output_message
    assert isinstance(answer, AssistantMessage) and answer.content[0].text == "forked: 3"  # type: ignore[union-attr]
    assert answer.usage.input == 150
    # The fork bills the other model's turn only: the two before it were served.
    assert [is_replayed(turn.output_message) for turn in fork.turns] == [True, True, False]
    assert fork.billed_usage() == answer.usage
    diff = diff_loops(recorded, loop.loop_id, recorded, fork.loop_id)
    assert diff.diverged_turns == [2, 3] and diff.first_divergence is not None  # the fork's answer; no turn 3
    assert diff.first_divergence.turn == 2
    context = recorded.context_at(fork.loop_id)
    assert bare(context) == bare([*loop.messages[:5], answer])


def test_a_fork_past_the_recording_is_refused(original: tuple[Session, LoopRecord]) -> None:
    session, loop = original
    with pytest.raises(TurnNotFound):
        ReplayModel(session, loop.loop_id, until_turn=4, fallback=no_model())


def test_a_recorded_tool_failure_replays_as_the_same_error_result(recorder: SessionRecorder) -> None:
    failures: list[int] = []

    @function_tool
    def broken(x: int) -> int:
        """Always fails."""
        failures.append(x)
        raise ValueError("no such thing")

    steps: list[Any] = [[function_call("broken", {"x": 1}, call_id="c1")], [assistant_message("sorry")]]
    agent = Agent(name="calc", model=ScriptedModel(steps, emit_traces=True), tools=[broken])
    run(agent)
    script = ReplayScript.from_session(session_of(recorder))
    model = ReplayModel(script)
    with recording_as(replay_lineage(script)):
        run(model.agent(agent))
    original, replayed = session_of(recorder).loops
    assert failures == [1] and model.cursor.finished  # the replay ran no tool
    (error,) = replayed.turns[0].tool_results
    assert error.is_error and error.content == original.turns[0].tool_results[0].content  # type: ignore[union-attr]
    assert bare(replayed.messages) == bare(original.messages)


def test_a_tool_failure_that_ended_the_run_fails_the_replay_there(recorder: SessionRecorder) -> None:
    failures: list[int] = []

    @function_tool(failure_error_function=None)  # the error is raised, not sent to the model
    def broken(x: int) -> int:
        """Always fails."""
        failures.append(x)
        raise ValueError("no such thing")

    steps: list[Any] = [[function_call("broken", {"x": 1}, call_id="c1")], [assistant_message("unreached")]]
    agent = Agent(name="calc", model=ScriptedModel(steps, emit_traces=True), tools=[broken])
    with pytest.raises(UserError, match="no such thing"):  # the SDK's wrapping of the tool's error
        run(agent)
    (loop,) = session_of(recorder).loops
    assert loop.status == "Aborted" and loop.turn_count() == 1
    (error,) = loop.turns[0].tool_results
    model = ReplayModel(session_of(recorder), loop.loop_id)
    # not a model call after the error (an `exhausted` divergence): the recorded error
    with model.recording(), pytest.raises(UserError) as raised:
        run(model.agent(agent))
    cause = raised.value.__cause__  # the SDK wraps what a tool raises
    assert isinstance(cause, RecordedToolError) and str(cause) == error.content[0].text  # type: ignore[union-attr]
    assert failures == [1] and model.cursor.finished and model.divergence is None
    replayed = session_of(recorder).loops[-1]
    assert replayed.status == "Aborted" and replayed.turn_count() == 1


def test_a_model_failure_that_ended_the_run_fails_the_replay_there(recorder: SessionRecorder) -> None:
    tools = Tools()
    steps: list[Any] = [[function_call("add", {"a": 1, "b": 2}, call_id="c1")], RuntimeError("rate limited")]
    with pytest.raises(RuntimeError, match="rate limited"):
        run(make_agent(tools, model=ScriptedModel(steps, emit_traces=True)))
    (loop,) = session_of(recorder).loops
    assert loop.status == "Aborted" and loop.turns[1].output_message.stop_reason == "error"  # type: ignore[union-attr]
    model = ReplayModel(session_of(recorder), loop.loop_id)
    # not an empty reply the run ends with as if it had succeeded
    with model.recording(), pytest.raises(RecordedModelError, match="rate limited"):
        run(model.agent(make_agent(tools)))
    assert tools.calls == 1 and model.cursor.finished and model.divergence is None
    replayed = session_of(recorder).loops[-1]
    assert replayed.status == "Aborted" and replayed.turn_count() == 2


def test_a_conversation_whose_first_run_replied_nothing_replays_without_diverging(
    recorder: SessionRecorder,
) -> None:
    # The empty reply is recorded without content; replayed as no output item, the second
    # run's input list lost it and its request diverged from the recorded one.
    async def conversation(agent: Agent[Any]) -> Any:
        config = RunConfig(trace_metadata={"phi.session_id": SESSION})
        first = await Runner.run(agent, "hi", hooks=PhiRunHooks(), run_config=config)
        follow_up = [*first.to_input_list(), {"role": "user", "content": "again"}]
        return first.final_output, (
            await Runner.run(agent, follow_up, hooks=PhiRunHooks(), run_config=config)
        ).final_output

    agent = make_agent(
        Tools(), model=ScriptedModel([[assistant_message("")], [assistant_message("ok")]], emit_traces=True)
    )
    assert asyncio.run(conversation(agent)) == ("", "ok")
    model = ReplayModel(ReplayScript.from_session(session_of(recorder), chain=True))
    with model.recording():
        assert asyncio.run(conversation(model.agent(agent))) == ("", "ok")
    assert model.cursor.finished and model.divergence is None


def test_a_conversation_of_two_runs_replays_as_a_chain(recorder: SessionRecorder) -> None:
    steps: list[Any] = [
        [function_call("add", {"a": 2, "b": 2}, call_id="c1")],
        [assistant_message("4")],
        [assistant_message("6")],
    ]
    agent = make_agent(Tools(), model=ScriptedModel(steps, emit_traces=True))

    async def conversation(agent: Agent[Any]) -> Any:
        config = RunConfig(trace_metadata={"phi.session_id": SESSION})
        first = await Runner.run(agent, "2 + 2?", hooks=PhiRunHooks(), run_config=config)
        follow_up = [*first.to_input_list(), {"role": "user", "content": "3 + 3?"}]
        return (await Runner.run(agent, follow_up, hooks=PhiRunHooks(), run_config=config)).final_output

    assert asyncio.run(conversation(agent)) == "6"
    first, second = session_of(recorder).loops
    script = ReplayScript.from_session(session_of(recorder), chain=True)
    assert script.loop_ids == (first.loop_id, second.loop_id)
    model = ReplayModel(script)
    with recording_as(replay_lineage(script)):
        assert asyncio.run(conversation(model.agent(agent))) == "6"
    assert model.cursor.finished
    _, _, replayed_first, replayed_second = session_of(recorder).loops
    assert (
        replayed_first.kind == ContinuationKind.rerun("replay")
        and replayed_first.parent_loop_id == first.loop_id
    )
    assert (
        replayed_second.parent_loop_id == replayed_first.loop_id
    )  # the conversation goes on from the replay
    assert bare(replayed_second.messages) == bare(second.messages)
    assert all(
        is_replayed(turn.output_message) for loop in (replayed_first, replayed_second) for turn in loop.turns
    )
    assert session_of(recorder).billed_usage() == first.billed_usage() + second.billed_usage()


@pytest.mark.parametrize("capture", [True, False])
def test_a_conversation_continued_with_its_input_list_records_only_the_new_message(capture: bool) -> None:
    # The second run's input repeats the first run's items (`to_input_list()`): each of
    # its user items was recorded as the new loop's prompt. Its context repeated "2 + 2?",
    # a fork at its turn 0 lost the earlier answer, and (without captured requests) a
    # replay of the unchanged agent diverged.
    def steps() -> list[Any]:
        return [
            [function_call("add", {"a": 2, "b": 2}, call_id="c1")],
            [assistant_message("4")],
            [assistant_message("6")],
        ]

    async def conversation(agent: Agent[Any]) -> Any:
        config = RunConfig(trace_metadata={"phi.session_id": SESSION})
        first = await Runner.run(agent, "2 + 2?", hooks=PhiRunHooks(), run_config=config)
        follow_up = [*first.to_input_list(), {"role": "user", "content": "3 + 3?"}]
        return (await Runner.run(agent, follow_up, hooks=PhiRunHooks(), run_config=config)).final_output

    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=capture))
    openai_agents.install([recorder], capture_requests=capture)
    try:
        agent = make_agent(Tools(), model=ScriptedModel(steps(), emit_traces=True))
        assert asyncio.run(conversation(agent)) == "6"
        session = session_of(recorder)
        _, second = session.loops
        assert [summarize(m) for m in session.context_at(second.loop_id)] == [
            "user '2 + 2?'",
            'assistant add({"a":2,"b":2}) [c1]',
            "toolResult [c1] '4'",
            "assistant '4'",
            "user '3 + 3?'",
            "assistant '6'",
        ]
        assert [summarize(m) for m in second.messages] == ["user '3 + 3?'", "assistant '6'"]
        seen: list[RequestShape] = []

        def other(request: RequestShape) -> AssistantMessage:
            seen.append(request)
            return second.turns[0].output_message  # type: ignore[return-value]

        fork(
            session,
            second.loop_id,
            0,
            model=other,
            tracer=Tracer(sinks=[], config=LoopConfigSnapshot(model="o", provider="o")),
        )
        assert bare(seen[0].messages) == bare(session.context_at(second.loop_id)[:-1])
        model = ReplayModel(ReplayScript.from_session(session, chain=True))
        with recording_as(replay_lineage(model.script)):
            assert asyncio.run(conversation(model.agent(make_agent(Tools())))) == "6"
        assert model.cursor.finished
    finally:
        openai_agents.uninstall()


def handing_off(a_model: Any, b_model: Any) -> tuple[Agent[Any], Agent[Any]]:
    """Agent A hands the question over to agent B, which looks a key up."""
    b = Agent(name="B", instructions="You are B.", model=b_model, tools=Tools().tools)
    return Agent(name="A", instructions="You are A.", model=a_model, handoffs=[b]), b


def test_a_handoff_run_replays_whole_by_default(recorder: SessionRecorder) -> None:
    a, _ = handing_off(
        ScriptedModel([[function_call("transfer_to_b", {}, call_id="h1")]], emit_traces=True),
        ScriptedModel(
            [[function_call("lookup", {"key": "x"}, call_id="b1")], [assistant_message("B done")]],
            emit_traces=True,
        ),
    )
    assert run(a).final_output == "B done"
    first, second = session_of(recorder).loops
    assert first.turns[-1].output_message.stop_reason == "handoff"  # type: ignore[union-attr]
    model = ReplayModel(session_of(recorder))  # the run: A's loop, then B's it handed over to
    assert model.script.loop_ids == (first.loop_id, second.loop_id)
    replayed_a, replayed_b = handing_off(no_model(), no_model())
    with model.recording():
        result = run(model.agent(replayed_a).clone(handoffs=[model.agent(replayed_b)]), model=model)
    assert result.final_output == "B done" and model.cursor.finished
    replayed = session_of(recorder).loops[2:]
    assert [bare(loop.messages) for loop in replayed] == [bare(first.messages), bare(second.messages)]
    # The loop the handoff started is served from the recording too: neither bills.
    assert all(is_replayed(turn.output_message) for loop in replayed for turn in loop.turns)
    assert session_of(recorder).billed_usage() == first.billed_usage() + second.billed_usage()
    # The replay's loops are no run to pick: the default is still the original run.
    assert ReplayScript.from_session(session_of(recorder)).loop_ids == (first.loop_id, second.loop_id)
    # A loop named is that loop alone.
    assert ReplayScript.from_session(session_of(recorder), second.loop_id).loop_ids == (second.loop_id,)


def test_a_handoff_replayed_with_a_model_per_agent_serves_both_agents_replies(
    recorder: SessionRecorder,
) -> None:
    a, _ = handing_off(
        ScriptedModel([[function_call("transfer_to_b", {}, call_id="h1")]], emit_traces=True),
        ScriptedModel(
            [[function_call("lookup", {"key": "x"}, call_id="b1")], [assistant_message("B done")]],
            emit_traces=True,
        ),
    )
    run(a)
    first, second = session_of(recorder).loops
    a_model = ReplayModel(session_of(recorder), first.loop_id)
    b_model = ReplayModel(session_of(recorder), second.loop_id)
    replayed_a, replayed_b = handing_off(no_model(), no_model())
    with a_model.recording():  # A's block: B's model serves its replies in it too
        result = run(a_model.agent(replayed_a).clone(handoffs=[b_model.agent(replayed_b)]))
    assert result.final_output == "B done" and a_model.cursor.finished and b_model.cursor.finished
    replayed = session_of(recorder).loops[2:]
    assert [loop.turn_count() for loop in replayed] == [1, 2]
    assert all(is_replayed(turn.output_message) for loop in replayed for turn in loop.turns)


class NamedModel(ScriptedModel):
    """A scripted model with a model name, where the SDK's models keep it."""

    model = "other-model"


@pytest.mark.parametrize(
    ("fallback", "name"), [(NamedModel, "other-model"), (ScriptedModel, "ScriptedModel")]
)
def test_a_forks_default_change_is_the_fallbacks_model_name(
    recorder: SessionRecorder, original: tuple[Session, LoopRecord], fallback: type[ScriptedModel], name: str
) -> None:
    session, loop = original
    model = ReplayModel(session, loop.loop_id, until_turn=3, fallback=fallback([[assistant_message("7")]]))
    with model.recording():  # the model name the SDK's models keep, else the class's name
        assert run(model.agent(make_agent(Tools()))).final_output == "7"
    fork = session_of(recorder).loops[-1]
    assert fork.metadata["fork"]["change"] == {"model": name}


@pytest.mark.parametrize("capture", [True, False])
def test_a_conversation_resumed_after_an_approval_replays_the_approved_tools_result(capture: bool) -> None:
    # The resumed run runs the approved call d1: replayed, it was answered with the
    # '[deferred: needs_approval]' the interrupted run's loop holds for it, and the resumed
    # run's request diverged ('deleted /a' recorded); d2 was rejected (the SDK's answer).
    deleted: list[str] = []

    @function_tool(needs_approval=True)
    def delete_file(path: str) -> str:
        """Delete a file."""
        deleted.append(path)
        return f"deleted {path}"

    def agent_with(model: Any) -> Agent[Any]:
        return Agent(name="ops", instructions=SYSTEM, model=model, tools=[delete_file])

    async def conversation(agent: Agent[Any]) -> Any:
        config = RunConfig(trace_metadata={"phi.session_id": SESSION})
        first = await Runner.run(agent, "clean up", hooks=PhiRunHooks(), run_config=config)
        state = first.to_state()
        approved, rejected = first.interruptions
        state.approve(approved)
        state.reject(rejected)
        return (await Runner.run(agent, state, hooks=PhiRunHooks(), run_config=config)).final_output

    steps: list[Any] = [
        [
            function_call("delete_file", {"path": "/a"}, call_id="d1"),
            function_call("delete_file", {"path": "/b"}, call_id="d2"),
        ],
        [assistant_message("done")],
    ]
    recorder = SessionRecorder(SessionRecorderConfig(capture_turn_requests=capture))
    openai_agents.install([recorder], capture_requests=capture)
    try:
        assert asyncio.run(conversation(agent_with(ScriptedModel(steps, emit_traces=True)))) == "done"
        assert deleted == ["/a"]
        _, resumed = session_of(recorder).loops
        model = ReplayModel(ReplayScript.from_session(session_of(recorder), chain=True))
        deleted.clear()
        with model.recording():
            assert asyncio.run(conversation(model.agent(agent_with(no_model())))) == "done"
    finally:
        openai_agents.uninstall()
    assert deleted == [] and model.cursor.finished and model.divergence is None
    assert bare(session_of(recorder).loops[-1].messages) == bare(resumed.messages)
