"""The OpenAI Agents SDK adapter, end to end with the SDK's own test doubles (offline)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("agents", reason="needs pip install 'phi-session[openai-agents]'")

import httpx2 as httpx
from agents import (
    Agent,
    GuardrailFunctionOutput,
    InputGuardrailTripwireTriggered,
    ModelRefusalError,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    OutputGuardrailTripwireTriggered,
    RunConfig,
    Runner,
    Usage,
    function_tool,
    handoff,
    input_guardrail,
    output_guardrail,
    tool_namespace,
    trace,
)
from agents.testing.model import ModelStep, ScriptedModel, assistant_message, function_call
from agents.tracing import TracingProcessor, add_trace_processor, get_trace_provider, set_trace_processors
from agents.usage import Usage as AgentsUsage
from openai import AsyncOpenAI
from openai.types.responses import ResponseOutputMessage, ResponseOutputRefusal
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from phi_session import JsonDirStore, SessionRecorder, decode_session, encode_session
from phi_session.adapters import openai_agents, session_id_for
from phi_session.cost import uncached_input
from phi_session.events import InputRejected
from phi_session.messages import ToolResultMessage
from phi_session.model import Session


@function_tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@function_tool
def broken(x: int) -> int:
    """Always fails."""
    raise ValueError("no such thing")


def scripted(*steps: Any) -> ScriptedModel:
    return ScriptedModel(list(steps), emit_traces=True)


@pytest.fixture
def recorder() -> Iterator[SessionRecorder]:
    recorder = SessionRecorder()
    openai_agents.install([recorder])
    try:
        yield recorder
    finally:
        openai_agents.uninstall()


def run(agent: Agent[Any], prompt: str, **kwargs: Any) -> Any:
    kwargs.setdefault("hooks", openai_agents.PhiRunHooks())
    return asyncio.run(Runner.run(agent, prompt, **kwargs))


def sessions(recorder: SessionRecorder) -> dict[str, Session]:
    found = {session.session_id: session for session in recorder.sessions()}
    for session in found.values():  # every session loads back in phi-core's format
        data = encode_session(session)
        assert encode_session(decode_session(data)) == data
    return found


def in_session(session_id: str) -> RunConfig:
    return RunConfig(trace_metadata={"phi.session_id": session_id})


def test_tools_with_exact_call_ids(recorder: SessionRecorder) -> None:
    model = scripted(
        [
            function_call("add", {"a": 1, "b": 2}, call_id="call-1"),
            function_call("add", {"a": 3, "b": 4}, call_id="call-2"),
        ],
        [assistant_message("3 and 7")],
    )
    result = run(Agent(name="calc", model=model, tools=[add]), "add please", run_config=in_session("s1"))
    assert result.final_output == "3 and 7"
    (loop,) = sessions(recorder)["s1"].loops
    assert loop.loop_id == "s1.calc.1" and loop.status == "Completed"
    first, second = loop.turns
    assert [call.id for call in first.output_message.content] == ["call-1", "call-2"]  # type: ignore[union-attr]
    results = {m.tool_call_id: m for m in first.tool_results}  # type: ignore[union-attr]
    assert results["call-1"].content[0].text == "3" and results["call-2"].content[0].text == "7"  # type: ignore[union-attr]
    assert second.output_message.content[0].text == "3 and 7"  # type: ignore[union-attr]
    assert loop.messages[0].content[0].text == "add please"  # type: ignore[union-attr]


def test_without_hooks_tools_match_by_name_and_order(recorder: SessionRecorder) -> None:
    model = scripted([function_call("add", {"a": 1, "b": 2}, call_id="call-1")], [assistant_message("3")])
    run(Agent(name="calc", model=model, tools=[add]), "add", hooks=None, run_config=in_session("s2"))
    (loop,) = sessions(recorder)["s2"].loops
    (result,) = loop.turns[0].tool_results
    assert result.content[0].text == "3"  # type: ignore[union-attr]
    assert loop.status == "Completed"


def test_a_second_run_in_the_group_continues_the_first(recorder: SessionRecorder) -> None:
    agent = Agent(name="chat", model=scripted([assistant_message("one")], [assistant_message("two")]))
    run(agent, "first", run_config=RunConfig(group_id="thread.9"))
    run(agent, "second", run_config=RunConfig(group_id="thread.9"))
    (session,) = sessions(recorder).values()
    first, second = session.loops
    assert second.parent_loop_id == first.loop_id
    assert second.loop_id.endswith(".chat.2")
    assert first.metadata["framework_session_id"] == "thread.9"


def test_continuation_after_restart_reads_the_store(tmp_path: Any) -> None:
    store = JsonDirStore(tmp_path)
    openai_agents.install(store=store, sink=[(saver := SessionRecorder())])
    try:
        run(Agent(name="chat", model=scripted([assistant_message("one")])), "x", run_config=in_session("r"))
    finally:
        openai_agents.uninstall()
    for session in saver.sessions():
        store.save(session)
    recorder = SessionRecorder()
    openai_agents.install([recorder], store=store)
    try:
        run(Agent(name="chat", model=scripted([assistant_message("two")])), "y", run_config=in_session("r"))
    finally:
        openai_agents.uninstall()
    (loop,) = recorder.sessions()[0].loops
    assert (loop.loop_id, loop.parent_loop_id) == ("r.chat.2", "r.chat.1")


def test_handoff_ends_the_loop_and_the_next_agent_continues(recorder: SessionRecorder) -> None:
    billing = Agent(name="billing", model=scripted([assistant_message("billing here")]))
    triage = Agent(
        name="triage",
        handoffs=[billing],
        model=scripted([function_call("transfer_to_billing", {}, call_id="h1")]),
    )
    run(triage, "my bill", run_config=in_session("h"))
    first, second = sessions(recorder)["h"].loops
    assert first.turns[-1].output_message.stop_reason == "handoff"  # type: ignore[union-attr]
    assert (second.loop_id, second.parent_loop_id) == ("h.billing.1", first.loop_id)
    assert second.continuation_kind is not None and second.continuation_kind.kind == "Default"


@pytest.mark.parametrize("task_spans", [True, False], ids=["task-spans", "no-task-spans"])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
def test_handoff_calls_get_the_results_the_sdk_gives_them(
    recorder: SessionRecorder, task_spans: bool, streamed: bool
) -> None:
    """The handoff span only finished the message: the transfer calls had no result in
    the record (a history a provider rejects), though the SDK's history has one each."""
    billing = Agent(name="billing", model=scripted([assistant_message("billing here")]))
    support = Agent(name="support", model=scripted([assistant_message("support here")]))
    triage = Agent(
        name="triage",
        tools=[add],
        handoffs=[handoff(billing, tool_name_override="escalate"), support],  # the hooks know its name
        model=scripted(
            [
                assistant_message("passing you on"),
                function_call("add", {"a": 1, "b": 2}, call_id="t1"),
                function_call("escalate", {}, call_id="h1"),
                function_call("transfer_to_support", {}, call_id="h2"),  # the SDK acts on the first only
            ]
        ),
    )
    config = RunConfig(
        trace_metadata={"phi.session_id": "hr"}, tracing={"include_task_and_turn_spans": task_spans}
    )
    hooks = openai_agents.PhiRunHooks()

    async def go() -> Any:
        if not streamed:
            return await Runner.run(triage, "my bill", hooks=hooks, run_config=config)
        result = Runner.run_streamed(triage, "my bill", hooks=hooks, run_config=config)
        async for _ in openai_agents.stream(result):
            pass
        return result

    result = asyncio.run(go())
    outputs = sorted(
        (item["call_id"], item["output"])
        for item in result.to_input_list()
        if item.get("type") == "function_call_output"
    )
    assert outputs == [
        ("h1", '{"assistant": "billing"}'),
        ("h2", "Multiple handoffs detected, ignoring this one."),
        ("t1", "3"),
    ]
    session = sessions(recorder)["hr"]
    first, second = session.loops
    # A handoff ends the loop, though the response also called a tool (it ran first).
    assert first.turns[-1].output_message.stop_reason == "handoff"  # type: ignore[union-attr]
    recorded = [(m.tool_call_id, m.content[0].text) for m in first.turns[-1].tool_results]  # type: ignore[union-attr]
    assert sorted(recorded) == outputs
    context = session.context_at(second.loop_id)
    answered = {m.tool_call_id for m in context if isinstance(m, ToolResultMessage)}
    assert answered == {"t1", "h1", "h2"}


def test_agent_as_tool_is_a_sub_agent_linked_both_ways(recorder: SessionRecorder) -> None:
    researcher = Agent(name="researcher", model=scripted([assistant_message("found it")]))
    lead = Agent(
        name="lead",
        tools=[researcher.as_tool(tool_name="research", tool_description="r")],
        model=scripted(
            [function_call("research", {"input": "q"}, call_id="r1")], [assistant_message("done")]
        ),
    )
    run(lead, "go", run_config=in_session("lead"))
    found = sessions(recorder)
    (parent,) = found["lead"].loops
    (ref,) = parent.child_loop_refs
    child = found[ref.child_session_id]
    assert ref.tool_call_id == "r1"
    assert child.parent_spawn_ref is not None and child.parent_spawn_ref.parent_loop_id == parent.loop_id
    (child_loop,) = child.loops
    assert child_loop.parent_loop_id == parent.loop_id
    assert child_loop.turns[0].triggered_by == "SubAgent"


def test_a_tool_error_is_an_error_result(recorder: SessionRecorder) -> None:
    model = scripted([function_call("broken", {"x": 1}, call_id="b1")], [assistant_message("sorry")])
    run(Agent(name="calc", model=model, tools=[broken]), "try", run_config=in_session("te"))
    (loop,) = sessions(recorder)["te"].loops
    (result,) = loop.turns[0].tool_results
    assert result.is_error  # type: ignore[union-attr]
    assert loop.status == "Completed"


def test_an_exception_in_the_run_ends_the_loop_aborted(recorder: SessionRecorder) -> None:
    model = scripted(RuntimeError("provider down"))
    with pytest.raises(RuntimeError, match="provider down"):
        run(Agent(name="calc", model=model), "x", run_config=in_session("ex"))
    (loop,) = sessions(recorder)["ex"].loops
    assert loop.status == "Aborted"


@pytest.mark.parametrize("task_spans", [True, False], ids=["task-spans", "no-task-spans"])
def test_a_cancelled_run_fails_the_message_and_aborts_the_loop(
    recorder: SessionRecorder, task_spans: bool
) -> None:
    async def slow(call: Any) -> ModelStep:
        await asyncio.sleep(5)
        return ModelStep(output=[assistant_message("too late")])

    async def time_out() -> None:
        agent = Agent(name="calc", model=scripted(ModelStep.respond(slow)))
        config = RunConfig(
            trace_metadata={"phi.session_id": "cancel"},
            tracing={"include_task_and_turn_spans": task_spans},
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                Runner.run(agent, "x", hooks=openai_agents.PhiRunHooks(), run_config=config), 0.1
            )

    asyncio.run(time_out())
    (loop,) = sessions(recorder)["cancel"].loops
    (turn,) = loop.turns
    message = turn.output_message
    assert message is not None and (message.stop_reason, message.error_message) == ("error", "cancelled")
    assert loop.status == "Aborted" and loop.error == "cancelled"


@pytest.mark.parametrize("task_spans", [True, False], ids=["task-spans", "no-task-spans"])
def test_errors_keep_their_cause(recorder: SessionRecorder, task_spans: bool) -> None:
    # The SDK's span errors say "Error in agent run", "Error running tool": the cause is in their data.
    @function_tool(failure_error_function=None)
    def hard_fail(x: int) -> int:
        """Fails, and the run with it."""
        raise RuntimeError("kaboom")

    tracing: Any = {"include_task_and_turn_spans": task_spans}
    with pytest.raises(RuntimeError, match="provider down"):
        run(
            Agent(name="m", model=scripted(RuntimeError("provider down"))),
            "x",
            run_config=RunConfig(trace_metadata={"phi.session_id": "model-err"}, tracing=tracing),
        )
    tool_model = scripted([function_call("hard_fail", {"x": 1}, call_id="hf1")])
    with pytest.raises(Exception, match="kaboom"):
        run(
            Agent(name="t", model=tool_model, tools=[hard_fail]),
            "x",
            run_config=RunConfig(trace_metadata={"phi.session_id": "tool-err"}, tracing=tracing),
        )
    found = sessions(recorder)
    (loop,) = found["model-err"].loops
    assert loop.status == "Aborted" and loop.error == "Error in agent run: provider down"
    message = loop.turns[0].output_message
    assert message is not None and (message.stop_reason, message.error_message) == (
        "error",
        "Error: provider down",
    )
    (loop,) = found["tool-err"].loops
    assert loop.error == "Error in agent run: Error running tool hard_fail: kaboom"
    (result,) = loop.turns[0].tool_results
    assert result.is_error and result.content[0].text == "Error running tool: kaboom"  # type: ignore[union-attr]


def test_triggered_input_guardrail_rejects_the_loop(recorder: SessionRecorder) -> None:
    @input_guardrail(run_in_parallel=False)
    def no_secrets(context: Any, agent: Any, text: Any) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=True)

    agent = Agent(name="calc", model=scripted(), input_guardrails=[no_secrets])
    with pytest.raises(InputGuardrailTripwireTriggered):
        run(agent, "my password", run_config=in_session("g"))
    (loop,) = sessions(recorder)["g"].loops
    assert loop.status == "Rejected"


@pytest.mark.parametrize("task_spans", [True, False], ids=["task-spans", "no-task-spans"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_a_streamed_run_rejected_by_an_input_guardrail_keeps_the_model_call_it_made(
    recorder: SessionRecorder, parallel: bool, task_spans: bool
) -> None:
    """Streamed, a parallel input guardrail trips before the model is called, and the SDK
    still calls and bills the model: the loop ended Rejected at the guardrail's span, the
    model call dropped (usage 0) and the hooks' prompt faulted on the ended loop."""

    @input_guardrail(run_in_parallel=parallel)
    async def block(context: Any, agent: Any, text: Any) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=True)

    model = scripted(
        ModelStep(
            output=[assistant_message("hello")],
            usage=Usage(requests=1, input_tokens=100, output_tokens=50, total_tokens=150),
        )
    )
    agent = Agent(name="g", model=model, input_guardrails=[block])
    config = RunConfig(
        trace_metadata={"phi.session_id": "ig-st"}, tracing={"include_task_and_turn_spans": task_spans}
    )

    async def go() -> None:
        result = Runner.run_streamed(agent, "question", hooks=openai_agents.PhiRunHooks(), run_config=config)
        async for _ in openai_agents.stream(result):
            pass

    with pytest.raises(InputGuardrailTripwireTriggered):
        asyncio.run(go())
    (loop,) = sessions(recorder)["ig-st"].loops
    rejected = [event.event for event in loop.events if isinstance(event.event, InputRejected)]
    assert [event.reason for event in rejected] == ["input guardrail block triggered"]
    core = openai_agents.installed()
    assert core is not None and core.fault_count == 0
    if not parallel:  # the model was never called: no turn ran
        assert len(model.calls) == 0
        assert loop.status == "Rejected" and not loop.turns
        return
    assert len(model.calls) == 1
    # A turn ran (phi-core's Rejected means none did): the run failed with the rejection.
    assert loop.status == "Aborted" and loop.error == "input guardrail block triggered"
    (turn,) = loop.turns
    assert turn.output_message.content[0].text == "hello"  # type: ignore[union-attr]
    assert (loop.usage.input, loop.usage.output) == (100, 50)
    assert loop.messages[0].content[0].text == "question"  # type: ignore[union-attr]


@output_guardrail
def no_numbers(context: Any, agent: Any, output: Any) -> GuardrailFunctionOutput:
    return GuardrailFunctionOutput(output_info={"found": "42"}, tripwire_triggered="42" in output)


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
def test_triggered_output_guardrail_fails_the_loop_naming_it(recorder: SessionRecorder, hooks: bool) -> None:
    model = scripted([function_call("add", {"a": 40, "b": 2}, call_id="c1")], [assistant_message("it is 42")])
    agent = Agent(name="calc", model=model, tools=[add], output_guardrails=[no_numbers])
    with pytest.raises(OutputGuardrailTripwireTriggered):
        run(agent, "add", run_config=in_session("og"), **({} if hooks else {"hooks": None}))
    (loop,) = sessions(recorder)["og"].loops
    # The model's answer is recorded as it was given; the run failed on the guardrail.
    assert loop.status == "Aborted" and loop.rejection is None
    assert loop.error == "output guardrail no_numbers triggered: the final output was withheld"
    assert len(loop.turns) == 2
    if hooks:  # the scripted model's spans carry no content: the hooks give it
        assert [turn.output_message.stop_reason for turn in loop.turns] == ["toolUse", "stop"]  # type: ignore[union-attr]
        assert loop.turns[1].output_message.content[0].text == "it is 42"  # type: ignore[union-attr]
    assert not [event for event in loop.events if isinstance(event.event, InputRejected)]


def test_an_output_guardrail_that_passes_changes_nothing(recorder: SessionRecorder) -> None:
    agent = Agent(name="calc", model=scripted([assistant_message("fine")]), output_guardrails=[no_numbers])
    assert run(agent, "hi", run_config=in_session("og-pass")).final_output == "fine"
    (loop,) = sessions(recorder)["og-pass"].loops
    assert loop.status == "Completed" and not loop.error


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
def test_input_guardrail_tripping_after_the_model_answered_is_still_an_input_rejection(
    recorder: SessionRecorder, hooks: bool
) -> None:
    # A parallel input guardrail runs alongside the first turn: it may trip once the
    # model answered, an output guardrail's moment (its span, under the turn's, tells).
    @input_guardrail(run_in_parallel=True)
    async def slow_check(context: Any, agent: Any, text: Any) -> GuardrailFunctionOutput:
        await asyncio.sleep(
            0.3
        )  # long enough for the scripted model to answer first, even on a loaded machine
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=True)

    agent = Agent(name="calc", model=scripted([assistant_message("answer")]), input_guardrails=[slow_check])
    with pytest.raises(InputGuardrailTripwireTriggered):
        run(agent, "my password", run_config=in_session("ig-late"), **({} if hooks else {"hooks": None}))
    (loop,) = sessions(recorder)["ig-late"].loops
    rejected = [event.event for event in loop.events if isinstance(event.event, InputRejected)]
    assert [event.reason for event in rejected] == ["input guardrail slow_check triggered"]
    # The first turn ran (phi-core's Rejected means none did): the run failed with the rejection.
    assert loop.status == "Aborted" and loop.error == "input guardrail slow_check triggered"
    assert len(loop.turns) == 1
    if hooks:
        assert loop.turns[0].output_message.content[0].text == "answer"  # type: ignore[union-attr]


def test_two_concurrent_runs_interleave(recorder: SessionRecorder) -> None:
    async def both() -> None:
        agents = [
            Agent(
                name=f"a{n}",
                tools=[add],
                model=scripted(
                    [function_call("add", {"a": n, "b": 1}, call_id=f"c{n}")],
                    [assistant_message(f"done {n}")],
                ),
            )
            for n in (1, 2)
        ]
        await asyncio.gather(
            *(
                Runner.run(agent, "go", hooks=openai_agents.PhiRunHooks(), run_config=in_session(f"cc{n}"))
                for n, agent in zip((1, 2), agents, strict=True)
            )
        )

    asyncio.run(both())
    found = sessions(recorder)
    for n in (1, 2):
        (loop,) = found[f"cc{n}"].loops
        assert loop.status == "Completed"
        assert [m.tool_call_id for m in loop.turns[0].tool_results] == [f"c{n}"]  # type: ignore[union-attr]


def test_an_adapter_fault_never_reaches_the_host(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: object) -> None:
        raise KeyError("adapter bug")

    core = openai_agents.install([SessionRecorder()])
    try:
        monkeypatch.setattr(core, "start_run", explode)
        with caplog.at_level(logging.ERROR, logger="phi_session.adapters"):
            result = run(Agent(name="calc", model=scripted([assistant_message("fine")])), "x")
        assert result.final_output == "fine"
        assert core.fault_count >= 1
    finally:
        openai_agents.uninstall()


def test_a_fault_in_the_hooks_never_fails_the_tool(
    recorder: SessionRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode() -> None:
        raise RuntimeError("adapter bug")

    monkeypatch.setattr(openai_agents, "get_current_span", explode)
    model = scripted([function_call("add", {"a": 1, "b": 2}, call_id="call-1")], [assistant_message("3")])
    result = run(Agent(name="calc", model=model, tools=[add]), "add", run_config=in_session("hooked"))
    assert result.final_output == "3"
    (loop,) = sessions(recorder)["hooked"].loops
    assert loop.status == "Completed" and loop.turns[0].tool_results[0].content[0].text == "3"  # type: ignore[union-attr]


def test_an_empty_phi_session_id_is_a_session_id_as_an_empty_group_id_is(recorder: SessionRecorder) -> None:
    agent = Agent(name="calc", model=scripted([assistant_message("a")], [assistant_message("b")]))
    run(agent, "x", run_config=in_session(""))
    run(agent, "y", run_config=RunConfig(group_id=""))
    (session,) = sessions(recorder).values()
    assert session.session_id == session_id_for("")
    assert [loop.metadata["framework_session_id"] for loop in session.loops] == ["", ""]


def test_install_is_idempotent_and_uninstall_detaches(caplog: pytest.LogCaptureFixture) -> None:
    recorder = SessionRecorder()
    sinks = [recorder]
    core = openai_agents.install(sinks)
    with caplog.at_level(logging.WARNING, logger="phi_session"):
        assert openai_agents.install(sinks) is core
        assert caplog.records == []  # the same install again: nothing to say
        assert openai_agents.install([SessionRecorder()], capture_requests=True) is core
    [warning] = [r.getMessage() for r in caplog.records]
    assert "already installed" in warning and "uninstall()" in warning  # the other sink gets nothing
    openai_agents.uninstall()
    assert openai_agents.installed() is None
    run(Agent(name="calc", model=scripted([assistant_message("x")])), "x")
    assert recorder.sessions() == []


class IdleProcessor(TracingProcessor):
    """A processor doing nothing: subclasses do what they are for."""

    def on_trace_start(self, trace: Any) -> None:
        pass

    def on_trace_end(self, trace: Any) -> None:
        pass

    def on_span_start(self, span: Any) -> None:
        pass

    def on_span_end(self, span: Any) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


class CountingProcessor(IdleProcessor):
    def __init__(self) -> None:
        self.traces = 0

    def on_trace_start(self, trace: Any) -> None:
        self.traces += 1


def test_uninstall_puts_back_the_processors_install_replaced() -> None:
    before = openai_agents._processors_of(get_trace_provider())
    mine = CountingProcessor()
    add_trace_processor(mine)
    try:
        openai_agents.install([SessionRecorder()], replace_default=True)
        run(Agent(name="calc", model=scripted([assistant_message("x")])), "x")
        assert mine.traces == 0  # replaced
        openai_agents.uninstall()
        run(Agent(name="calc", model=scripted([assistant_message("x")])), "x")
        assert mine.traces == 1  # the user's own processor is back
        assert openai_agents._processors_of(get_trace_provider()) == [*before, mine]
    finally:
        set_trace_processors(before)


def test_uninstall_keeps_a_processor_the_host_added_while_installed() -> None:
    before = openai_agents._processors_of(get_trace_provider())
    try:
        openai_agents.install([SessionRecorder()], replace_default=True)
        add_trace_processor(mine := CountingProcessor())
        openai_agents.uninstall()
        assert openai_agents._processors_of(get_trace_provider()) == [*before, mine]
        run(Agent(name="calc", model=scripted([assistant_message("x")])), "x")
        assert mine.traces == 1
    finally:
        set_trace_processors(before)


def test_uninstall_keeps_the_processors_the_host_set_while_installed() -> None:
    # The host took over its list (set_trace_processors): what install replaced stays out.
    before = openai_agents._processors_of(get_trace_provider())
    try:
        openai_agents.install([SessionRecorder()], replace_default=True)
        set_trace_processors([mine := CountingProcessor()])
        openai_agents.uninstall()
        assert openai_agents._processors_of(get_trace_provider()) == [mine]
    finally:
        set_trace_processors(before)


def test_install_after_the_host_set_its_processors_anew_records() -> None:
    # set_trace_processors drops the processor an earlier install added: install adds it again.
    before = openai_agents._processors_of(get_trace_provider())
    try:
        openai_agents.install([SessionRecorder()])
        openai_agents.uninstall()
        set_trace_processors([mine := CountingProcessor()])
        recorder = SessionRecorder()
        openai_agents.install([recorder])
        run(Agent(name="calc", model=scripted([assistant_message("x")])), "x")
        openai_agents.uninstall()
        assert len(recorder.sessions()) == 1 and mine.traces == 1
    finally:
        set_trace_processors(before)


def test_without_task_and_turn_spans_the_agent_span_is_the_loop(recorder: SessionRecorder) -> None:
    model = scripted([function_call("add", {"a": 1, "b": 2}, call_id="c1")], [assistant_message("3")])
    config = RunConfig(
        trace_metadata={"phi.session_id": "nt"}, tracing={"include_task_and_turn_spans": False}
    )
    run(Agent(name="calc", model=model, tools=[add]), "add", run_config=config)
    (loop,) = sessions(recorder)["nt"].loops
    assert loop.status == "Completed" and len(loop.turns) == 2


NO_TASK_SPANS = RunConfig(tracing={"include_task_and_turn_spans": False})


def test_without_task_spans_two_runs_in_one_trace_are_two_runs(recorder: SessionRecorder) -> None:
    async def both() -> None:
        with trace("workflow", group_id="wf"):
            for prompt in ("one", "two"):
                agent = Agent(name="chat", model=scripted([assistant_message(f"answer {prompt}")]))
                await Runner.run(agent, prompt, hooks=openai_agents.PhiRunHooks(), run_config=NO_TASK_SPANS)

    asyncio.run(both())
    first, second = sessions(recorder)["wf"].loops
    # No handoff between them: the first ends as it answered, the second has its own prompt.
    assert first.turns[-1].output_message.stop_reason == "stop"  # type: ignore[union-attr]
    assert second.loop_id == "wf.chat.2" and second.parent_loop_id == first.loop_id
    assert second.messages[0].content[0].text == "two"  # type: ignore[union-attr]


def test_without_task_spans_concurrent_runs_in_one_trace_are_runs_of_their_own(
    recorder: SessionRecorder,
) -> None:
    """Runs gathered under one ``trace()`` were told apart by the trace alone: each agent
    span ended the loop another run was still in, as the next run."""

    @function_tool
    async def slow_add(a: int, b: int) -> int:
        """Add two numbers, slowly."""
        await asyncio.sleep(0.001 * a)
        return a + b

    def agent(n: int) -> Agent[Any]:
        steps = (
            [function_call("slow_add", {"a": n, "b": 1}, call_id=f"c{n}")],
            [assistant_message(f"done {n}")],
        )
        return Agent(name="calc", tools=[slow_add], model=scripted(*steps))

    async def gathered() -> None:
        with trace("workflow", group_id="together"):
            hooks = openai_agents.PhiRunHooks
            await asyncio.gather(
                *(Runner.run(agent(n), f"q{n}", hooks=hooks(), run_config=NO_TASK_SPANS) for n in range(1, 4))
            )

    asyncio.run(gathered())
    loops = sessions(recorder)["together"].loops
    by_prompt = {loop.messages[0].content[0].text: loop for loop in loops}  # type: ignore[union-attr]
    assert sorted(by_prompt) == ["q1", "q2", "q3"]
    for n in range(1, 4):
        loop = by_prompt[f"q{n}"]
        assert loop.status == "Completed" and len(loop.turns) == 2
        (result,) = loop.turns[0].tool_results
        assert (result.tool_call_id, result.content[0].text) == (f"c{n}", str(n + 1))  # type: ignore[union-attr]
        assert loop.turns[1].output_message.content[0].text == f"done {n}"  # type: ignore[union-attr]
    core = openai_agents.installed()
    assert core is not None and core.fault_count == 0


def test_without_task_spans_a_handoff_is_still_one(recorder: SessionRecorder) -> None:
    billing = Agent(name="billing", model=scripted([assistant_message("billing here")]))
    triage = Agent(
        name="triage",
        handoffs=[billing],
        model=scripted([function_call("transfer_to_billing", {}, call_id="h1")]),
    )
    config = RunConfig(
        trace_metadata={"phi.session_id": "nth"}, tracing={"include_task_and_turn_spans": False}
    )
    run(triage, "my bill", run_config=config)
    first, second = sessions(recorder)["nth"].loops
    assert first.turns[-1].output_message.stop_reason == "handoff"  # type: ignore[union-attr]
    assert second.loop_id == "nth.billing.1" and second.parent_loop_id == first.loop_id


def test_disabled_tracing_warns_once(caplog: pytest.LogCaptureFixture, recorder: SessionRecorder) -> None:
    with caplog.at_level(logging.WARNING, logger="phi_session.adapters.openai_agents"):
        for _ in range(2):
            run(
                Agent(name="calc", model=scripted([assistant_message("x")])),
                "x",
                run_config=RunConfig(tracing_disabled=True),
            )
    assert len([r for r in caplog.records if "tracing is disabled" in r.message]) <= 1
    assert recorder.sessions() == []


# -- the SDK's OpenAI model classes over a mock transport: content and usage from spans --------


def responses_client(*bodies: dict[str, Any]) -> AsyncOpenAI:
    queue = list(bodies)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=queue.pop(0))

    return AsyncOpenAI(
        api_key="test",
        base_url="http://mock/v1",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


def response_body(output: list[dict[str, Any]], input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": "gpt-test-1",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 1},
            "output_tokens_details": {"reasoning_tokens": 1},
        },
    }


def test_responses_model_content_and_usage_per_response(recorder: SessionRecorder) -> None:
    client = responses_client(
        response_body(
            [
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_a",
                    "name": "add",
                    "arguments": json.dumps({"a": 2, "b": 2}),
                    "status": "completed",
                }
            ],
            10,
            3,
        ),
        response_body(
            [
                {
                    "type": "message",
                    "id": "m1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "four", "annotations": []}],
                }
            ],
            20,
            4,
        ),
    )
    agent = Agent(name="calc", tools=[add], model=OpenAIResponsesModel("gpt-test-1", client))
    run(agent, "2+2?", hooks=None, run_config=in_session("resp"))
    (loop,) = sessions(recorder)["resp"].loops
    first, second = loop.turns
    assert first.output_message.content[0].id == "call_a"  # type: ignore[union-attr]
    assert first.output_message.model == "gpt-test-1"  # type: ignore[union-attr]
    usage = first.usage
    # OpenAI's input tokens include the cache reads and writes; phi-core's `input` does not
    # (a cost computed from the record would bill the cached tokens twice).
    counts = (usage.input, usage.output, usage.cache_read, usage.cache_write, usage.reasoning)
    assert counts == (7, 3, 2, 1, 1)
    assert usage.total_tokens == 13
    assert second.output_message.content[0].text == "four"  # type: ignore[union-attr]
    assert (loop.usage.input, loop.usage.output) == (24, 7)


def test_a_response_with_no_total_counts_its_cache_in_the_total(recorder: SessionRecorder) -> None:
    """A provider that reports no total_tokens (0): 10,000 input tokens, 2,000 of them
    cached. The total counts the cache (10,100, not 8,100), so a cost bills the 8,000
    uncached input tokens and not 6,000 (the cache taken out a second time)."""
    usage = AgentsUsage(
        requests=1,
        input_tokens=10_000,
        output_tokens=100,
        total_tokens=0,
        input_tokens_details=InputTokensDetails(cached_tokens=2_000, cache_write_tokens=0),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
    )
    agent = Agent(name="a", model=scripted(ModelStep(output=[assistant_message("ok")], usage=usage)))
    run(agent, "go", run_config=in_session("total0"))
    (turn,) = sessions(recorder)["total0"].loops[0].turns
    assert (turn.usage.input, turn.usage.cache_read, turn.usage.total_tokens) == (8_000, 2_000, 10_100)
    assert uncached_input(turn.usage) == 8_000


def test_without_hooks_a_tool_call_beside_a_handoff_still_ends_in_handoff(recorder: SessionRecorder) -> None:
    """The tool's span finished the reply before the handoff span came: ``toolUse``. Without
    hooks the handoff calls are known by the agent span's handoffs (the SDK's default names)."""
    call = {"type": "function_call", "status": "completed"}
    client = responses_client(
        response_body(
            [
                {**call, "id": "fc_1", "call_id": "t1", "name": "add", "arguments": '{"a": 1, "b": 2}'},
                {**call, "id": "fc_2", "call_id": "h1", "name": "transfer_to_billing", "arguments": "{}"},
            ],
            1,
            1,
        )
    )
    billing = Agent(name="billing", model=scripted([assistant_message("billing here")]))
    triage = Agent(
        name="triage", tools=[add], handoffs=[billing], model=OpenAIResponsesModel("gpt-test-1", client)
    )
    run(triage, "my bill", hooks=None, run_config=in_session("nhh"))
    first, second = sessions(recorder)["nhh"].loops
    message = first.turns[-1].output_message
    assert message is not None and [call.id for call in message.content] == ["t1", "h1"]  # type: ignore[union-attr]
    assert message.stop_reason == "handoff"
    assert second.parent_loop_id == first.loop_id


def failing_client(status: int) -> AsyncOpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, json={"error": {"message": "bad request", "type": "invalid_request_error"}}
        )

    return AsyncOpenAI(
        api_key="test",
        base_url="http://mock/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


def test_a_failed_responses_call_fails_the_message(recorder: SessionRecorder) -> None:
    # The response span ends with no response: the reply failed, which is no adapter fault.
    agent = Agent(name="calc", model=OpenAIResponsesModel("gpt-test-1", failing_client(400)))
    with pytest.raises(Exception, match="bad request"):
        run(agent, "x", hooks=None, run_config=in_session("http"))
    (loop,) = sessions(recorder)["http"].loops
    message = loop.turns[0].output_message
    assert message is not None and message.stop_reason == "error"
    assert message.error_message is not None and message.error_message.startswith("Error getting response")
    assert loop.status == "Aborted"
    core = openai_agents.installed()
    assert core is not None and core.fault_count == 0


def test_responses_usage_without_traced_data(recorder: SessionRecorder) -> None:
    # trace_include_sensitive_data=False: the span keeps the usage, not the response.
    client = responses_client(response_body([], 5, 1))
    agent = Agent(name="calc", model=OpenAIResponsesModel("gpt-test-1", client))
    config = RunConfig(trace_metadata={"phi.session_id": "redacted"}, trace_include_sensitive_data=False)
    run(agent, "x", hooks=None, run_config=config)
    (loop,) = sessions(recorder)["redacted"].loops
    assert loop.status == "Completed" and (loop.usage.input, loop.usage.output) == (2, 1)  # 5 less 3 cached
    core = openai_agents.installed()
    assert core is not None and core.fault_count == 0


@function_tool
async def sleepy(seconds: float, tag: str) -> str:
    """Sleep, then echo the tag."""
    await asyncio.sleep(seconds)
    return f"result-{tag}"


def sleepy_call(seconds: float, tag: str) -> dict[str, Any]:
    arguments = json.dumps({"seconds": seconds, "tag": tag})
    return {
        "type": "function_call",
        "id": f"fc_{tag}",
        "call_id": f"call_{tag}",
        "name": "sleepy",
        "arguments": arguments,
        "status": "completed",
    }


def test_without_hooks_parallel_calls_of_one_tool_keep_their_ids(recorder: SessionRecorder) -> None:
    # The first call ends last: matched at their ends, the two would swap ids.
    client = responses_client(
        response_body([sleepy_call(0.2, "A"), sleepy_call(0.01, "B")], 1, 1),
        response_body(
            [
                {
                    "type": "message",
                    "id": "m",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "done", "annotations": []}],
                }
            ],
            1,
            1,
        ),
    )
    agent = Agent(name="a", tools=[sleepy], model=OpenAIResponsesModel("gpt-test-1", client))
    run(agent, "go", hooks=None, run_config=in_session("par"))
    (loop,) = sessions(recorder)["par"].loops
    results = {m.tool_call_id: m.content[0].text for m in loop.turns[0].tool_results}  # type: ignore[union-attr]
    assert results == {"call_A": "result-A", "call_B": "result-B"}
    # Each tool's start is recorded when it starts, not when it ends.
    kinds = [
        type(e.event).__name__ for e in loop.events if type(e.event).__name__.startswith("ToolExecution")
    ]
    assert kinds == ["ToolExecutionStart", "ToolExecutionStart", "ToolExecutionEnd", "ToolExecutionEnd"]


@function_tool(needs_approval=True)
def delete_file(path: str) -> str:
    """Delete a file, once a human approved it."""
    return f"deleted {path}"


@function_tool
def forget(key: str) -> None:
    """Forget a key; returns nothing."""


def call_item(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{call_id}",
        "call_id": call_id,
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def message_item(text: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": "m", "role": "assistant", "status": "completed", "content": content}


def responses_model(*outputs: list[dict[str, Any]]) -> OpenAIResponsesModel:
    """A Responses model answering with each output in turn (its spans carry the content)."""
    return OpenAIResponsesModel("gpt-test-1", responses_client(*(response_body(o, 10, 1) for o in outputs)))


def approval_agent() -> Agent[Any]:
    """An agent calling `delete_file` on /tmp/x (call d1), then answering "all done"
    (streamed or not: `chat_client`)."""
    client = chat_client(("", [("d1", "delete_file", {"path": "/tmp/x"})], 10, 1), ("all done", [], 7, 1))
    return Agent(name="ops", tools=[delete_file], model=OpenAIChatCompletionsModel("gpt-chat-1", client))


def grouped(group_id: str, task_spans: bool, *, sensitive: bool = True) -> RunConfig:
    """A run in the session `group_id`, with or without task and turn spans and the spans'
    inputs and outputs (``trace_include_sensitive_data``)."""
    return RunConfig(
        group_id=group_id,
        trace_include_sensitive_data=sensitive,
        tracing={"include_task_and_turn_spans": task_spans},
    )


def two_deletions(reply: str) -> Agent[Any]:
    """An agent calling `delete_file` on /a (call d1) and /b (call d2), then answering `reply`."""
    model = responses_model(
        [call_item("delete_file", {"path": "/a"}, "d1"), call_item("delete_file", {"path": "/b"}, "d2")],
        [message_item(reply)],
    )
    return Agent(name="ops", tools=[delete_file], model=model)


def resume(agent: Agent[Any], state: Any, hooks: bool, config: RunConfig, *, streamed: bool = False) -> Any:
    """Run `agent` on `state` (a run's ``to_state()``), as `run` does, streamed or not."""
    hooked = openai_agents.PhiRunHooks() if hooks else None
    if not streamed:
        return run(agent, state, hooks=hooked, run_config=config)

    async def go() -> Any:
        result = Runner.run_streamed(agent, state, hooks=hooked, run_config=config)
        async for _ in openai_agents.stream(result):
            pass
        return result

    return asyncio.run(go())


# Runs with and without `PhiRunHooks`, with and without task and turn spans.
each_hooks = pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
each_task_spans = pytest.mark.parametrize("task_spans", [True, False], ids=["task-spans", "no-task-spans"])
# Runs with and without ``trace_include_sensitive_data`` (the spans' inputs and outputs).
each_sensitivity = pytest.mark.parametrize("sensitive", [True, False], ids=["sensitive", "not-sensitive"])


def texts_of(loop: Any) -> list[str]:
    return [m.content[0].text for m in loop.messages]  # type: ignore[union-attr]


def results_of(loop: Any) -> list[tuple[str, bool, str]]:
    return [
        (m.tool_call_id, m.is_error, m.content[0].text)
        for m in loop.messages
        if isinstance(m, ToolResultMessage)
    ]


@each_task_spans
def test_without_hooks_a_namespaced_tool_ending_the_run_that_needs_no_approval_returned(
    recorder: SessionRecorder, task_spans: bool
) -> None:
    # The SDK names its span "notes.forget", the call's and the tool's name is "forget": it
    # is still the call's span, and the tool that needs no approval, its None no call
    # awaiting one.
    (namespaced,) = tool_namespace(name="notes", description="Notes.", tools=[forget])
    call = {**call_item("forget", {"key": "k"}, "n1"), "namespace": "notes"}
    model = responses_model([call], [message_item("welcome")])
    agent = Agent(name="a", tools=[namespaced], model=model, tool_use_behavior="stop_on_first_tool")
    result = run(agent, "go", hooks=None, run_config=grouped("namespaced", task_spans))
    assert result.interruptions == []
    (loop,) = sessions(recorder)["namespaced"].loops
    assert results_of(loop) == [("n1", False, "None")]


@each_hooks
@each_task_spans
def test_a_call_awaiting_approval_gets_a_result_saying_so(
    recorder: SessionRecorder, hooks: bool, task_spans: bool
) -> None:
    # The SDK checks the approval in a function span, which ends with no output nor error.
    config = grouped("hitl", task_spans)
    hooked = openai_agents.PhiRunHooks() if hooks else None
    result = run(approval_agent(), "delete it", hooks=hooked, run_config=config)
    assert [item.raw_item.call_id for item in result.interruptions] == ["d1"]
    (loop,) = sessions(recorder)["hitl"].loops
    assert results_of(loop) == [("d1", False, "[deferred: needs_approval]")]
    assert loop.status == "Completed" and len(loop.turns) == 1


@each_hooks
@each_task_spans
@each_sensitivity
def test_a_tool_returning_none_still_returned(
    recorder: SessionRecorder, hooks: bool, task_spans: bool, sensitive: bool
) -> None:
    # Its span ends as a call awaiting approval does; the run goes on after it. The model
    # is sent its output as the SDK writes None (recorded so when the hooks or the span show it).
    model = responses_model([call_item("forget", {"key": "k"}, "f1")], [message_item("forgotten")])
    config = grouped("none", task_spans, sensitive=sensitive)
    hooked = openai_agents.PhiRunHooks() if hooks else None
    result = run(Agent(name="mem", tools=[forget], model=model), "forget k", hooks=hooked, run_config=config)
    (sent,) = [
        item["output"] for item in result.to_input_list() if item.get("type") == "function_call_output"
    ]
    (loop,) = sessions(recorder)["none"].loops
    ((call_id, is_error, text),) = results_of(loop)
    assert sent == "None"
    assert (is_error, text) == (False, sent if hooks or sensitive else "")
    assert call_id == "f1" or not (hooks or sensitive)  # else nothing shows the call
    assert loop.status == "Completed" and len(loop.turns) == 2


@each_hooks
@each_task_spans
@each_sensitivity
@pytest.mark.parametrize(
    ("tool", "arguments", "returned"),
    [(forget, {"key": "k"}, "None"), (add, {"a": 1, "b": 2}, "3")],
    ids=["returning-none", "returning-3"],
)
def test_a_tool_ending_the_run_that_needs_no_approval_returned(
    recorder: SessionRecorder,
    hooks: bool,
    task_spans: bool,
    sensitive: bool,
    tool: Any,
    arguments: dict[str, Any],
    returned: str,
) -> None:
    # Its span ends as a call awaiting approval does (returning None, or its output not
    # traced), and the run ends with it (stop_on_first_tool); yet it needs no approval.
    model = responses_model([call_item(tool.name, arguments, "t1")], [message_item("welcome")])
    config = grouped("stop", task_spans, sensitive=sensitive)
    agent = Agent(name="a", tools=[tool], model=model, tool_use_behavior="stop_on_first_tool")
    first = resume(agent, "go", hooks, config)
    follow_up = [*first.to_input_list(), {"role": "user", "content": "thanks"}]
    resume(agent.clone(tool_use_behavior="run_llm_again"), follow_up, hooks, config)
    stopped, then = sessions(recorder)["stop"].loops
    ((call_id, is_error, text),) = results_of(stopped)
    assert (is_error, text) == (False, returned if hooks or sensitive else "")
    assert call_id == "t1" or not (hooks or sensitive)  # else nothing shows the call
    assert results_of(then) == []
    assert texts_of(then) == ["thanks", "welcome"] if hooks or sensitive else ["welcome"]


@each_hooks
@each_task_spans
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
def test_a_run_resumed_after_approval_continues_the_interrupted_loop(
    recorder: SessionRecorder, hooks: bool, task_spans: bool, streamed: bool
) -> None:
    # The SDK resumes in the interrupted run's trace without telling processors, and runs
    # the approved tool before any turn.
    config = grouped("hitl", task_spans)
    agent = approval_agent()
    first = resume(agent, "delete it", hooks, config, streamed=streamed)
    state = first.to_state()
    state.approve(first.interruptions[0])
    second = resume(agent, state, hooks, config, streamed=streamed)
    assert second.final_output == "all done"
    core = openai_agents.installed()
    assert core is not None and core.open_runs == 0 and core.fault_count == 0
    found = sessions(recorder)
    assert list(found) == ["hitl"]
    interrupted, resumed = found["hitl"].loops
    assert results_of(interrupted) == [("d1", False, "[deferred: needs_approval]")]
    assert resumed.parent_loop_id == interrupted.loop_id and resumed.kind.kind == "Default"
    assert resumed.status == "Completed" and (resumed.usage.input, resumed.usage.output) == (7, 1)
    # The tool's result goes in ahead of the first turn's reply, as in the request.
    result, reply = resumed.messages
    (turn,) = resumed.turns
    assert turn.input_messages == (result,) and turn.output_message == reply
    assert results_of(resumed) == [("d1", False, "deleted /tmp/x")]
    assert reply.content[0].text == "all done"  # type: ignore[union-attr]


@each_hooks
@each_task_spans
def test_a_run_resumed_after_a_rejection_records_what_the_model_is_sent(
    recorder: SessionRecorder, hooks: bool, task_spans: bool
) -> None:
    # A rejected call gets no span: its result is the output the resumed run sends the model.
    config = RunConfig(
        trace_metadata={"phi.session_id": "rej"}, tracing={"include_task_and_turn_spans": task_spans}
    )
    agent = approval_agent()
    first = resume(agent, "delete it", hooks, config)
    state = first.to_state()
    state.reject(first.interruptions[0], rejection_message="not /tmp/x")
    second = resume(agent, state, hooks, config)
    sent = [item.output for item in second.new_items if type(item).__name__ == "ToolCallOutputItem"]
    assert sent == ["not /tmp/x"]
    interrupted, resumed = sessions(recorder)["rej"].loops
    assert resumed.parent_loop_id == interrupted.loop_id and resumed.status == "Completed"
    assert results_of(resumed) == [("d1", False, "not /tmp/x")]
    assert resumed.messages[-1].content[0].text == "all done"  # type: ignore[union-attr]


@each_hooks
@each_task_spans
def test_a_resumed_run_tells_its_approved_call_from_its_rejected_one(
    recorder: SessionRecorder, hooks: bool, task_spans: bool
) -> None:
    # Both calls are of one tool: matched by name, the approved one's span would take d1;
    # without the hooks the first turn's input tells which call it answered.
    agent = two_deletions("one left")
    config = grouped("mixed", task_spans)
    first = resume(agent, "delete both", hooks, config)
    state = first.to_state()
    rejected, approved = first.interruptions
    state.reject(rejected, rejection_message="keep /a")
    state.approve(approved)
    resume(agent, state, hooks, config)
    interrupted, resumed = sessions(recorder)["mixed"].loops
    assert results_of(interrupted) == [
        ("d1", False, "[deferred: needs_approval]"),
        ("d2", False, "[deferred: needs_approval]"),
    ]
    assert results_of(resumed) == [("d1", False, "keep /a"), ("d2", False, "deleted /b")]


@each_hooks
def test_a_call_a_resumed_run_leaves_awaiting_approval_is_answered_in_the_next(
    recorder: SessionRecorder, hooks: bool
) -> None:
    agent = two_deletions("kept /b")
    first = resume(agent, "delete both", hooks, in_session("twice"))
    state = first.to_state()
    state.approve(first.interruptions[0])  # d2 undecided: the run stops again, calling no model
    second = resume(agent, state, hooks, in_session("twice"))
    assert [item.raw_item.call_id for item in second.interruptions] == ["d2"]
    state = second.to_state()
    state.reject(second.interruptions[0], rejection_message="keep /b")
    resume(agent, state, hooks, in_session("twice"))
    interrupted, approved, rejected = sessions(recorder)["twice"].loops
    assert [loop.parent_loop_id for loop in (approved, rejected)] == [interrupted.loop_id, approved.loop_id]
    assert results_of(approved) == [("d1", False, "deleted /a")] and not approved.turns
    assert results_of(rejected) == [("d2", False, "keep /b")]
    assert rejected.messages[-1].content[0].text == "kept /b"  # type: ignore[union-attr]


@each_hooks
@each_task_spans
@each_sensitivity
def test_a_new_run_after_an_interrupted_one_answers_none_of_its_calls(
    recorder: SessionRecorder, hooks: bool, task_spans: bool, sensitive: bool
) -> None:
    # Not a resume (a trace of its own): the call left awaiting approval is not its to answer.
    config = grouped("fresh", task_spans, sensitive=sensitive)
    agent = approval_agent()
    resume(agent, "delete it", hooks, config)
    resume(agent, "never mind", hooks, config)
    interrupted, fresh = sessions(recorder)["fresh"].loops
    assert fresh.parent_loop_id == interrupted.loop_id
    assert results_of(fresh) == []
    assert texts_of(fresh) == ["never mind", "all done"] if hooks or sensitive else ["all done"]


@each_hooks
def test_a_new_run_in_the_interrupted_runs_trace_answers_none_of_its_calls(
    recorder: SessionRecorder, hooks: bool
) -> None:
    # One enclosing trace for both: the new run's input, answering no call, tells it from a resume.
    agent = approval_agent()
    with trace("both", group_id="one-trace"):
        resume(agent, "delete it", hooks, RunConfig())
        resume(agent, "never mind", hooks, RunConfig())
    interrupted, fresh = sessions(recorder)["one-trace"].loops
    assert fresh.parent_loop_id == interrupted.loop_id
    assert results_of(fresh) == [] and texts_of(fresh) == ["never mind", "all done"]


@each_task_spans
def test_without_hooks_nor_traced_data_a_resumed_run_that_stops_again_records_the_call_it_ran(
    recorder: SessionRecorder, task_spans: bool
) -> None:
    # Nothing shows the calls' ids nor outputs: a span before the first turn is a call run
    # (the SDK runs none for a call still undecided), the call it is matched by name and order.
    agent = two_deletions("both gone")
    config = grouped("again", task_spans, sensitive=False)
    first = resume(agent, "delete both", False, config)
    state = first.to_state()
    state.approve(first.interruptions[0])  # d2 undecided: the run stops again, calling no model
    second = resume(agent, state, False, config)
    state = second.to_state()
    state.approve(second.interruptions[0])
    resume(agent, state, False, config)
    interrupted, approved, last = sessions(recorder)["again"].loops
    (first_call, _, _), (second_call, _, _) = results_of(interrupted)
    assert results_of(approved) == [(first_call, False, "")] and not approved.turns
    assert results_of(last) == [(second_call, False, "")]
    assert [loop.parent_loop_id for loop in (approved, last)] == [interrupted.loop_id, approved.loop_id]


@each_task_spans
def test_an_agent_a_resumed_run_calls_as_an_approved_tool_is_its_sub_agent(
    recorder: SessionRecorder, task_spans: bool
) -> None:
    # Run before the first turn, no tool scope runs to make it one: it took the session.
    researcher = Agent(name="researcher", model=responses_model([message_item("found it")]))
    lead = Agent(
        name="lead",
        tools=[researcher.as_tool(tool_name="research", tool_description="r", needs_approval=True)],
        model=responses_model([call_item("research", {"input": "q"}, "r1")], [message_item("done")]),
    )
    config = grouped("lead", task_spans)
    first = run(lead, "go", run_config=config)
    state = first.to_state()
    state.approve(first.interruptions[0])
    run(lead, state, run_config=config)
    found = sessions(recorder)
    interrupted, resumed = found.pop("lead").loops
    assert resumed.parent_loop_id == interrupted.loop_id
    assert results_of(resumed) == [("r1", False, "found it")]
    (child,) = found.values()
    (child_loop,) = child.loops
    assert child.parent_spawn_ref is not None and child.parent_spawn_ref.parent_loop_id == resumed.loop_id
    assert child_loop.parent_loop_id == resumed.loop_id
    assert child_loop.turns[0].triggered_by == "SubAgent"


async def never(context: Any, arguments: Any, call_id: str) -> bool:
    return False


@function_tool(needs_approval=never)
async def jot(text: str) -> None:
    """Jot a text down; asks for approval when `never` says so."""


@each_task_spans
def test_without_hooks_a_tool_that_may_await_approval_keeps_its_place_before_a_handoff(
    recorder: SessionRecorder, task_spans: bool
) -> None:
    # jot returns None and may await approval: its span says neither; the handoff that
    # follows says the run went on, before the transfer call gets its result.
    model = responses_model(
        [call_item("jot", {"text": "x"}, "j1"), call_item("transfer_to_helper", {}, "h1")]
    )
    helper = Agent(name="helper", model=responses_model([message_item("helped")]))
    agent = Agent(name="desk", tools=[jot], handoffs=[helper], model=model)
    run(agent, "go", hooks=None, run_config=grouped("jot", task_spans))
    desk, _ = sessions(recorder)["jot"].loops
    assert results_of(desk) == [("j1", False, "None"), ("h1", False, '{"assistant": "helper"}')]


class SpanEnded(IdleProcessor):
    """Tells when a function span named `name` has ended (every processor hears of it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ended = False

    def on_span_end(self, span: Any) -> None:
        self.ended = self.ended or getattr(span.span_data, "name", None) == self.name


@each_task_spans
def test_without_hooks_tool_results_keep_the_order_their_tools_ended_in(
    recorder: SessionRecorder, task_spans: bool
) -> None:
    # jot, called second, ends first: its result, decided only once the model is called
    # again, still goes first, with the time it ended.
    jotted = SpanEnded("jot")

    @function_tool
    async def after_jot() -> str:
        """Return once jot is done."""
        while not jotted.ended:
            await asyncio.sleep(0)
        return "after"

    model = responses_model(
        [call_item("after_jot", {}, "a1"), call_item("jot", {"text": "x"}, "j2")], [message_item("done")]
    )
    agent = Agent(name="desk", tools=[after_jot, jot], model=model)
    config = grouped("order", task_spans)
    before = openai_agents._processors_of(get_trace_provider())
    add_trace_processor(jotted)
    try:
        run(agent, "go", hooks=None, run_config=config)
    finally:
        set_trace_processors(before)
    (loop,) = sessions(recorder)["order"].loops
    assert results_of(loop) == [("j2", False, "None"), ("a1", False, "after")]
    jot_result, after_result = loop.turns[0].tool_results
    assert jot_result.timestamp <= after_result.timestamp


def test_chat_completions_model_content_and_usage(recorder: SessionRecorder) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-chat-1",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "hello there"},
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            },
        )

    client = AsyncOpenAI(
        api_key="test",
        base_url="http://mock/v1",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    agent = Agent(name="chat", model=OpenAIChatCompletionsModel("gpt-chat-1", client))
    run(agent, "hi", hooks=None, run_config=in_session("chat"))
    (loop,) = sessions(recorder)["chat"].loops
    (turn,) = loop.turns
    assert turn.output_message.content[0].text == "hello there"  # type: ignore[union-attr]
    assert (turn.usage.input, turn.usage.output) == (7, 2)


def chat_client(*replies: tuple[str, list[tuple[str, str, dict[str, Any]]], int, int]) -> AsyncOpenAI:
    """A Chat Completions endpoint answering each request with the next reply (text, tool
    calls as (id, name, arguments), prompt and completion tokens): whole, or as SSE chunks
    when the request streams."""
    queue = list(replies)

    def handler(request: httpx.Request) -> httpx.Response:
        text, calls, prompt, completion = queue.pop(0)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        tool_calls = [
            {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
            for id, name, arguments in calls
        ]
        finish = "tool_calls" if calls else "stop"
        head = {"id": "c1", "created": 0, "model": "gpt-chat-1"}
        if not json.loads(request.content).get("stream"):
            message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if calls else {})}
            choice = {"index": 0, "finish_reason": finish, "message": message}
            return httpx.Response(
                200, json={**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        deltas = [{"role": "assistant", "content": text}]
        deltas += [{"tool_calls": [{"index": index, **call}]} for index, call in enumerate(tool_calls)]
        chunks = [
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            for delta in deltas
        ]
        chunks.append(
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
            }
        )
        chunks.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    return AsyncOpenAI(
        api_key="test",
        base_url="http://mock/v1",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


def chat_calc(**config: Any) -> tuple[Agent[Any], RunConfig]:
    """A calculator on the Chat Completions model that calls `add`, then answers."""
    client = chat_client(
        ("Let me add.", [("call_1", "add", {"a": 2, "b": 40})], 11, 7), ("The answer is 42", [], 21, 3)
    )
    agent = Agent(name="calc", model=OpenAIChatCompletionsModel("gpt-chat-1", client), tools=[add])
    return agent, RunConfig(**config)


def assert_chat_calc_recorded(loop: Any) -> None:
    first, second = loop.turns
    assert first.output_message.stop_reason == "toolUse"
    assert [
        (type(block).__name__, getattr(block, "text", getattr(block, "id", None)))
        for block in first.output_message.content
    ] == [
        ("TextContent", "Let me add."),
        ("ToolCall", "call_1"),
    ]
    assert first.output_message.content[1].arguments == {"a": 2, "b": 40}
    assert [(m.tool_call_id, m.content[0].text) for m in first.tool_results] == [("call_1", "42")]
    assert second.output_message.content[0].text == "The answer is 42"
    assert [(turn.usage.input, turn.usage.output) for turn in loop.turns] == [(11, 7), (21, 3)]


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["stream-wrapper", "stream-events"])
def test_a_streamed_chat_completions_run_keeps_its_content(
    recorder: SessionRecorder, wrapped: bool, hooks: bool
) -> None:
    """Streamed, the SDK traces the Chat Completions call's whole Responses ``Response``
    as the generation's output: its items were not read, the tool call was lost (and
    without `stream` the text too)."""
    agent, config = chat_calc(trace_metadata={"phi.session_id": "chat-st"})

    async def go() -> None:
        result = Runner.run_streamed(
            agent, "2+40?", hooks=openai_agents.PhiRunHooks() if hooks else None, run_config=config
        )
        async for _ in openai_agents.stream(result) if wrapped else result.stream_events():
            pass

    asyncio.run(go())
    (loop,) = sessions(recorder)["chat-st"].loops
    assert loop.status == "Completed"
    assert_chat_calc_recorded(loop)


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
def test_the_hooks_give_the_content_a_span_with_usage_lacks(
    recorder: SessionRecorder, streamed: bool
) -> None:
    # trace_include_sensitive_data=False: the generation span keeps the usage, not the output.
    agent, config = chat_calc(
        trace_metadata={"phi.session_id": "chat-red"}, trace_include_sensitive_data=False
    )

    async def go() -> None:
        if not streamed:
            await Runner.run(agent, "2+40?", hooks=openai_agents.PhiRunHooks(), run_config=config)
            return
        result = Runner.run_streamed(agent, "2+40?", hooks=openai_agents.PhiRunHooks(), run_config=config)
        async for _ in result.stream_events():
            pass

    asyncio.run(go())
    (loop,) = sessions(recorder)["chat-red"].loops
    assert_chat_calc_recorded(loop)


def test_the_hooks_give_a_failed_tool_the_text_the_model_got_whatever_the_span_keeps(
    recorder: SessionRecorder,
) -> None:
    # trace_include_sensitive_data=False: the function spans keep no output, and the failed
    # one's error says the details are redacted; the hooks see what the model is sent.
    model = scripted(
        [
            function_call("add", {"a": 1, "b": 2}, call_id="k1"),
            function_call("broken", {"x": 2}, call_id="k2"),
        ],
        [assistant_message("done")],
    )
    config = RunConfig(trace_metadata={"phi.session_id": "red-tools"}, trace_include_sensitive_data=False)
    result = run(Agent(name="calc", model=model, tools=[add, broken]), "go", run_config=config)
    sent = [item.output for item in result.new_items if type(item).__name__ == "ToolCallOutputItem"]
    (loop,) = sessions(recorder)["red-tools"].loops
    recorded = [(m.tool_call_id, m.is_error, m.content[0].text) for m in loop.turns[0].tool_results]  # type: ignore[union-attr]
    assert recorded == [("k1", False, "3"), ("k2", True, sent[1])]
    assert sent[1].startswith("An error occurred while running the tool")


def test_stream_wrapper_records_text_deltas() -> None:
    events: list[Any] = []
    recorder = SessionRecorder()
    openai_agents.install([recorder, events.append])
    try:

        async def consume() -> list[Any]:
            agent = Agent(name="chat", model=scripted([assistant_message("streamed answer")]))
            result = Runner.run_streamed(
                agent, "hi", hooks=openai_agents.PhiRunHooks(), run_config=in_session("st")
            )
            return [event async for event in openai_agents.stream(result)]

        seen = asyncio.run(consume())
    finally:
        openai_agents.uninstall()
    assert any(getattr(event, "type", None) == "raw_response_event" for event in seen)  # passed through
    deltas = [event.delta.delta for event in events if type(event).__name__ == "MessageUpdate"]
    assert "".join(deltas) == "streamed answer"
    (loop,) = sessions(recorder)["st"].loops
    assert loop.turns[0].output_message.content[0].text == "streamed answer"  # type: ignore[union-attr]


def test_nothing_is_held_after_the_runs_end(recorder: SessionRecorder) -> None:
    researcher = Agent(name="researcher", model=scripted([assistant_message("found")]))
    lead = Agent(
        name="lead",
        tools=[researcher.as_tool(tool_name="research", tool_description="r")],
        model=scripted(
            [function_call("research", {"input": "q"}, call_id="r1")], [assistant_message("done")]
        ),
    )
    run(lead, "go", run_config=in_session("held"))
    core = openai_agents.installed()
    assert core is not None and core.open_runs == 0


def streamed_texts(events: list[Any]) -> dict[str, str]:
    """Each loop's streamed text deltas, joined."""
    texts: dict[str, str] = {}
    for event in events:
        if type(event).__name__ == "MessageUpdate":
            texts[event.loop_id] = texts.get(event.loop_id, "") + event.delta.delta
    return texts


def test_stream_wrapper_records_each_run_under_an_enclosing_trace() -> None:
    # Inside ``with trace(...)`` the result has no trace of its own, and concurrent runs
    # share that one: each run's deltas still reach its own reply.
    events: list[Any] = []
    recorder = SessionRecorder()
    openai_agents.install([recorder, events.append])
    try:

        async def consume(name: str) -> None:
            words = " ".join(f"{name}{n}" for n in range(20))
            agent = Agent(name=name, model=scripted([assistant_message(words)]))
            result = Runner.run_streamed(agent, "hi", hooks=openai_agents.PhiRunHooks())
            async for _ in openai_agents.stream(result):
                await asyncio.sleep(0)  # let the other run stream in between

        async def main() -> None:
            with trace("batch", group_id="shared"):
                await consume("solo")
                await asyncio.gather(consume("x"), consume("y"))

        asyncio.run(main())
    finally:
        openai_agents.uninstall()
    loops = sessions(recorder)["shared"].loops
    streamed = streamed_texts(events)
    assert len(loops) == 3
    for loop in loops:
        final = loop.turns[0].output_message.content[0].text  # type: ignore[union-attr]
        assert streamed[loop.loop_id] == final


def test_stream_wrapper_records_a_refusal_as_text() -> None:
    events: list[Any] = []
    recorder = SessionRecorder()
    openai_agents.install([recorder, events.append])
    try:

        async def consume() -> None:
            refusal = ResponseOutputMessage(
                id="m1",
                type="message",
                role="assistant",
                status="completed",
                content=[ResponseOutputRefusal(type="refusal", refusal="I cannot help.")],
            )
            agent = Agent(name="chat", model=scripted([refusal]))
            result = Runner.run_streamed(
                agent, "hi", hooks=openai_agents.PhiRunHooks(), run_config=in_session("refused")
            )
            with pytest.raises(ModelRefusalError):  # the SDK's, after the reply streamed
                async for _ in openai_agents.stream(result):
                    pass

        asyncio.run(consume())
    finally:
        openai_agents.uninstall()
    (loop,) = sessions(recorder)["refused"].loops
    assert loop.turns[0].output_message.content[0].text == "I cannot help."  # type: ignore[union-attr]
    assert streamed_texts(events) == {loop.loop_id: "I cannot help."}


def test_the_example_uploads_no_trace_to_openai(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It says "no network, no key": with the user's OPENAI_API_KEY set, the SDK's default
    exporter, kept next to phi-session's processor, uploaded the run's traces to OpenAI."""
    import runpy
    from pathlib import Path

    from agents.tracing.processors import BackendSpanExporter

    uploaded: list[Any] = []
    monkeypatch.setattr(BackendSpanExporter, "export", lambda self, items: uploaded.extend(items))
    get_trace_provider().force_flush()  # what earlier tests' runs left queued
    uploaded.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-a-key")
    monkeypatch.chdir(tmp_path)
    example = Path(__file__).resolve().parents[1] / "examples" / "adapter_openai_agents.py"
    runpy.run_path(str(example), run_name="__main__")
    get_trace_provider().force_flush()
    assert "It has 6 words. / You are welcome." in capsys.readouterr().out
    assert uploaded == []
