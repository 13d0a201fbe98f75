"""Processors: the built-in redactor, user processors, and failing closed."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import pathlib
import re
import threading
import tracemalloc
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import phi_session as ps
from phi_session import redactor as redactor_module
from phi_session._strict import MAX_VALUE_DEPTH
from phi_session.identity import AgentSession, FakeClock
from phi_session.instrument import Tracer
from phi_session.messages import NodeTag, TextFormat
from phi_session.model import is_replayed, mark_replayed
from phi_session.processors import REDACTED, ProcessorChain, Redactor, withhold
from phi_session.recorder import SessionRecorder

from .strategies import request_payload

SECRET_KEY = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345"
SNAP = ps.LoopConfigSnapshot(
    model="m",
    provider="p",
    base_url=f"https://user:hunter2@proxy.example/v1?key={SECRET_KEY}",
    name="staging",
)


def record(tracer_options: dict[str, Any], scenario: Any) -> tuple[list[ps.AgentEvent], ps.Session, bytes]:
    events: list[ps.AgentEvent] = []
    recorder = SessionRecorder(include_streaming_events=True)
    tracer = Tracer(
        AgentSession(clock=FakeClock()), sinks=[events.append, recorder], config=SNAP, **tracer_options
    )
    scenario(tracer)
    recorder.flush()
    [session] = recorder.drain_completed()
    return events, session, ps.encode(session) + b"".join(ps.encode(e) for e in events)


def secret_scenario(tracer: Tracer) -> None:
    arguments = {
        "url": "https://api.example",
        "headers": {"Authorization": f"Bearer {SECRET_KEY}"},
        "api_key": "plain-value",
        "max_tokens": 10,
        "note": "token budget",
    }
    call = ps.ToolCall(id="c1", name="http", arguments=arguments)
    with tracer.loop(metadata={"password": "pw", "user": "bob"}) as loop:
        loop.user("my key is AKIAABCDEFGHIJKLMNOP, keep it")
        with loop.turn() as turn:
            with turn.assistant() as reply:
                reply.text_delta("calling")
                reply.tool_call_delta('{"api_key":"sk-proj-0123456789abcdefghij"}')
                reply.finish(tool_calls=[call])
            with turn.tool(call) as tool:
                tool.progress("using ghp_0123456789abcdefghijABCDEFGHIJ")
                tool.result("response with token=abc")
        raise_in = loop  # the error text is redacted too
        raise_in.end(f"failed with {SECRET_KEY}")


def test_default_redaction_covers_config_metadata_tool_arguments_and_errors() -> None:
    events, session, data = record({}, secret_scenario)
    assert SECRET_KEY.encode() not in data and b"hunter2" not in data and b"plain-value" not in data
    assert b"sk-proj-0123456789" not in data  # the streamed arguments
    [loop] = session.loops
    assert loop.config is not None
    assert loop.config.base_url == f"https://{REDACTED}@proxy.example/v1?key={REDACTED}"
    assert loop.metadata == {"password": REDACTED, "user": "bob"}
    arguments = loop.turns[0].output_message.content[1].arguments  # type: ignore[union-attr]
    assert arguments == {
        "url": "https://api.example",
        "headers": {"Authorization": REDACTED},
        "api_key": REDACTED,
        "max_tokens": 10,
        "note": "token budget",
    }
    start = next(e for e in events if isinstance(e, ps.ToolExecutionStart))
    assert start.args == arguments
    assert loop.error == f"failed with {REDACTED}"
    # Text is left alone unless asked for.
    assert b"AKIAABCDEFGHIJKLMNOP" in data and b"ghp_0123456789" in data


def test_text_redaction_is_opt_in() -> None:
    _, _, data = record({"redact": Redactor(redact_text=True)}, secret_scenario)
    for secret in (SECRET_KEY, "AKIAABCDEFGHIJKLMNOP", "ghp_0123456789", "token=abc"):
        assert secret.encode() not in data, secret


def test_text_redaction_covers_deltas_streamed_into_a_single_sink() -> None:
    # One sink and the redactor alone: the tracer's shortest path for prose deltas.
    redactor = Redactor()
    events: list[ps.AgentEvent] = []
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[events.append], redact=redactor, config=SNAP)
    with tracer.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
        reply.text_delta(f"plain {SECRET_KEY}")  # text is left alone unless asked for
        redactor.redact_text = True  # read per event
        reply.text_delta(f"text {SECRET_KEY}")
        reply.thinking_delta(f"thinking {SECRET_KEY}")
        reply.finish()
    deltas = [e.delta.delta for e in events if isinstance(e, ps.MessageUpdate)]  # type: ignore[attr-defined]
    assert deltas == [f"plain {SECRET_KEY}", f"text {REDACTED}", f"thinking {REDACTED}"]


def test_tool_call_deltas_are_read_as_json_or_pieces_of_it() -> None:
    arguments = {"host": "db", "password": "plain-value"}
    pieces = [
        msgspec.json.encode(arguments).decode(),  # whole arguments in one delta (ADK, pydantic-ai)
        '{"host": "db", "pass',
        'word": "split-name", "apiKey": "plain-value',
        '-more"}',
    ]

    def scenario(tracer: Tracer) -> None:
        with tracer.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
            for piece in pieces:
                reply.tool_call_delta(piece)
            reply.finish(tool_calls=[ps.ToolCall(id="c", name="connect", arguments=arguments)])

    events, _, data = record({}, scenario)
    assert b"plain-value" not in data
    deltas = [e.delta.delta for e in events if isinstance(e, ps.MessageUpdate)]  # type: ignore[attr-defined]
    assert deltas == [
        '{"host":"db","password":"[REDACTED]"}',
        '{"host": "db", "pass',  # a name split across two pieces is caught in the finished message only
        f'word": "split-name", "apiKey": "{REDACTED}',
        '-more"}',
    ]


def test_text_redaction_covers_every_text_a_failed_processor_withholds() -> None:
    tag = NodeTag(kind="lesson", text=f"use {SECRET_KEY}", created_at_turn=0, abandoned_node_ids=())
    user = ps.UserMessage(content=(ps.TextContent(text="hi"),), timestamp=1, tags=(tag,))
    schema = {"type": "object", "properties": {"password": {"type": "string", "default": SECRET_KEY}}}
    tool = ps.ToolDefinition(name="login", description=f"logs in with {SECRET_KEY}", parameters=schema)
    history = (user, _tool_reply("login", {"q": "x"}))
    payload = msgspec.structs.replace(request_payload(history), system_prompt=SECRET_KEY, tools=(tool,))
    events: list[ps.AgentEvent] = [
        ps.TurnRequest(loop_id="l", turn_index=0, payload=payload, timestamp=ps.Timestamp.now()),
        ps.MessageEnd(loop_id="l", message=msgspec.structs.replace(_tool_reply("t", {}), tags=(tag,))),
        ps.PrunApplied(
            loop_id="l",
            tokens_removed=1,
            messages_removed=1,
            memo=f"saw {SECRET_KEY}",
            pruned_timestamps=(),
            timestamp=ps.Timestamp.now(),
        ),
        ps.RevertApplied(
            loop_id="l",
            category="failure",
            abandoned_node_ids=(),
            summary=f"summary {SECRET_KEY}",
            applied=True,
            reason=f"reason {SECRET_KEY}",
            timestamp=ps.Timestamp.now(),
        ),
    ]
    for event in events:
        assert SECRET_KEY.encode() in ps.encode(Redactor()(event))  # message text: not by default
        redacted = Redactor(redact_text=True)(event)
        assert SECRET_KEY.encode() not in ps.encode(redacted) and b"WITHHELD" not in ps.encode(redacted)
    [request, *_] = [Redactor(redact_text=True)(event) for event in events]
    [kept] = request.payload.tools  # type: ignore[attr-defined]
    assert kept.parameters["properties"] == {"password": {"type": "string", "default": REDACTED}}


def _streamed(events: list[ps.AgentEvent], kind: str) -> list[str]:
    return [e.delta.delta for e in events if isinstance(e, ps.MessageUpdate) and e.delta.kind == kind]  # type: ignore[attr-defined]


@pytest.mark.parametrize("recorder", [False, True])
def test_a_secret_split_across_text_deltas_is_redacted_in_them(recorder: bool) -> None:
    # Each delta was scanned on its own: "sk-ant-api0" + "3-abc..." passed unredacted
    # into the recorded deltas, the finished message alone redacted.
    events: list[ps.AgentEvent] = []
    sinks: list[Any] = [events.append, SessionRecorder(include_streaming_events=True)][: 1 + recorder]
    tracer = Tracer(
        AgentSession(clock=FakeClock()), sinks=sinks, redact=Redactor(redact_text=True), config=SNAP
    )
    head, tail = SECRET_KEY[:12], SECRET_KEY[12:]
    with tracer.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
        reply.thinking_delta("the key is s")
        reply.thinking_delta(f"k-{'a' * 20} I think")
        for piece in (
            "your key is ",
            head[:3],
            head[3:],
            tail[:10],
            tail[10:],
            " and the url https://us",
            "er:pw@h/x",
        ):
            reply.text_delta(piece)
        reply.finish()
    [end] = [e for e in events if isinstance(e, ps.MessageEnd)]
    thinking, text = end.message.content  # type: ignore[attr-defined]
    assert text.text == f"your key is {REDACTED} and the url https://{REDACTED}@h/x"
    assert thinking.thinking == f"the key is {REDACTED} I think"
    assert "".join(_streamed(events, "Text")) == text.text  # in order, nothing lost
    assert "".join(_streamed(events, "Thinking")) == thinking.thinking
    kinds = [e.delta.kind for e in events if isinstance(e, ps.MessageUpdate)]  # type: ignore[attr-defined]
    assert kinds == sorted(kinds, reverse=True)  # the thinking held nothing: in the order streamed
    data = b"".join(ps.encode(e) for e in events)
    for secret in (SECRET_KEY[3:], "a" * 20, "er:pw"):
        assert secret.encode() not in data


@pytest.mark.parametrize("between", ["thinking_delta", "text_delta", "tool_call_delta"])
def test_a_secret_split_across_deltas_of_one_kind_is_redacted_whatever_streams_between(between: str) -> None:
    # A delta of the other kind passed on what was held of this one, unredacted: "my key
    # is sk-ant-", thinking "hmm", then "Q7Q7... ok" reached the sinks as the whole key.
    events: list[ps.AgentEvent] = []
    tracer = Tracer(
        AgentSession(clock=FakeClock()), sinks=[events.append], redact=Redactor(redact_text=True), config=SNAP
    )
    head, tail = SECRET_KEY[:7], SECRET_KEY[7:]
    kind, other = ("Thinking", "Text") if between == "text_delta" else ("Text", "Thinking")
    with tracer.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
        stream = reply.thinking_delta if kind == "Thinking" else reply.text_delta
        stream(f"my key is {head}")
        getattr(reply, between)('{"a": 1' if between == "tool_call_delta" else "hmm")
        stream(f"{tail} ok")
        getattr(reply, between)("}" if between == "tool_call_delta" else " more")
        reply.finish()
    [end] = [e for e in events if isinstance(e, ps.MessageEnd)]
    [whole] = [getattr(b, kind.lower()) for b in end.message.content if hasattr(b, kind.lower())]
    assert whole == f"my key is {REDACTED} ok"
    assert "".join(_streamed(events, kind)) == f"my key is {REDACTED} ok"
    if between != "tool_call_delta":
        assert "".join(_streamed(events, other)) == "hmm more"
    assert tail[:20].encode() not in b"".join(ps.encode(e) for e in events)


_SECRETS = (
    SECRET_KEY,
    "AKIAABCDEFGHIJKLMNOP",
    "Bearer abcdefgh123",
    "api_key=hunter2",
    "https://u:pw@h",
    "acct-123456",
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([*_SECRETS, " ", "the ", "e", "s", "=", "x=1 ", "Be", ":", "acct-", "\n"]),
        max_size=12,
    ),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    st.booleans(),
)
def test_streamed_text_is_redacted_as_the_whole_text_is(
    parts: list[str], cuts: list[int], custom: bool
) -> None:
    redactor = Redactor(redact_text=True, extra_patterns=[r"acct-\d{6}"] if custom else [])
    whole = "".join(parts)
    bounds = sorted({0, len(whole), *(c for c in cuts if c < len(whole))})
    placeholder = ps.AssistantMessage(
        content=(), stop_reason="stop", model="m", provider="", usage=ps.Usage(input=0, output=0), timestamp=1
    )
    assert redactor.open_stream(placeholder)
    out = []
    for start, end in pairwise(bounds):
        event = ps.MessageUpdate(
            loop_id="l", message=placeholder, delta=ps.StreamDelta("Text", whole[start:end])
        )
        out.append(redactor(event).delta.delta)  # type: ignore[attr-defined]
    out += [delta.delta for delta in redactor.close_stream(placeholder)]
    expected = redactor.redact_string(whole)
    assert "".join(out) == expected
    for secret in ("abcdefghijklmnopqrstuvwxyz012345", "BCDEFGHIJKLMNOP", "abcdefgh123", "hunter2", ":pw"):
        assert secret in expected or all(secret not in piece for piece in out)  # what redaction removes


def test_redaction_can_be_turned_off() -> None:
    _, session, _ = record({"redact": False}, secret_scenario)
    assert session.loops[0].metadata == {"password": "pw", "user": "bob"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key {SECRET_KEY}.", f"key {REDACTED}."),
        ("sk-proj-AAAAAAAAAAAAAAAAAAAA", REDACTED),
        ("id AKIAIOSFODNN7EXAMPLE end", f"id {REDACTED} end"),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", REDACTED),
        ("github_pat_11ABCDEFG0123456789_abcdefghijkl", REDACTED),
        ("xoxb-123456789012-abcdefghij", REDACTED),
        ("AIzaSyA1234567890abcdefghijklmnopqrstuv", REDACTED),
        ("Authorization: Bearer abc.def-ghi_jkl==", f"Authorization: Bearer {REDACTED}"),
        ("bearer abcdefgh12345678", f"bearer {REDACTED}"),
        ("jwt eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4", f"jwt {REDACTED}"),
        ("postgres://admin:s3cret@db:5432/x", f"postgres://{REDACTED}@db:5432/x"),
        ("https://h/p?a=1&api_key=XYZ&b=2", f"https://h/p?a=1&api_key={REDACTED}&b=2"),
        ("https://h/p?Token=XYZ#frag", f"https://h/p?Token={REDACTED}#frag"),
    ],
)
def test_secret_patterns(text: str, expected: str) -> None:
    assert Redactor().redact_string(text) == expected


# The default patterns as first written: one alternative each, look-behinds unguarded.
_PLAIN_DEFAULTS = (
    r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",
    r"\bAIza[0-9A-Za-z_\-]{35}",
    r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
    r"(?:(?<=Bearer )|(?<=bearer )|(?<=BEARER ))[A-Za-z0-9\-._~+/]{8,}=*",
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)",
    "(?i:"
    + "|".join(f"(?<=\\b{key}=)" for key in ("api_key", "apikey", "key", "token", "access_token", "secret"))
    + "|"
    + "|".join(f"(?<=\\b{key}=)" for key in ("client_secret", "password", "passwd", "sig", "signature"))
    + r")[^&#\s\"',;]+",
)
_PIECES = st.sampled_from(
    [
        "sk-",
        "proj-",
        "AKIA",
        "ghp_",
        "github_pat_",
        "xoxb-",
        "AIza",
        "eyJ",
        "Bearer ",
        "bearer",
        "://",
        "@",
        ":",
        "=",
        "key",
        "key=",
        "Token",
        "api_key",
        "passwd=",
        "Client_Secret=",
        "SIG=",
        "signature=",
        "&",
        " ",
        ".",
        "-",
        "_",
        "A",
        "z",
        "0",
        "9",
        "/",
        "#",
        "é",
    ]
)


@given(st.lists(_PIECES, max_size=60).map("".join))
@settings(max_examples=400, deadline=None)
def test_the_compiled_defaults_match_exactly_what_the_plain_patterns_do(text: str) -> None:
    # The default scan shares one word-boundary test among its word-start patterns and
    # guards its look-behinds (several times faster on large text, and on text dense in
    # "="): the same matches.
    plain = re.compile("|".join(f"(?:{pattern})" for pattern in _PLAIN_DEFAULTS))
    assert Redactor().redact_string(text) == plain.sub(REDACTED, text)


@pytest.mark.parametrize("replacement", [r"<redacted:\g<0>>", r"[C:\redacted]", r"[redacted\d]", "\\1"])
def test_the_replacement_is_written_as_it_is(replacement: str) -> None:
    redactor = Redactor(replacement=replacement, extra_patterns=[r"corp-\d+"])
    assert redactor.redact_string(f"key {SECRET_KEY}, corp-123") == f"key {replacement}, {replacement}"
    assert redactor.redact_json_string('{"password": "x", "q": "') == '{"password": "x", "q": "'.replace(
        '"x"', msgspec.json.encode(replacement).decode()
    )


@pytest.mark.parametrize(
    "text",
    [
        "a plain sentence",
        "sk-short",
        "task-list",
        "max_tokens=5 tokens",
        "Bearer",
        "https://example.com/path",
    ],
)
def test_clean_text_is_returned_as_is(text: str) -> None:
    assert Redactor().redact_string(text) is text


def test_named_fields_nested_values_and_identity() -> None:
    r = Redactor(extra_fields=["session-cookie"], extra_patterns=[r"INTERNAL-\d+"])
    clean = {"path": "a", "items": [1, {"x": None}], "max_tokens": 3, "total_tokens": 4}
    assert r.redact_value(clean) is clean
    value = {
        "X-Api-Key": "k",
        "nested": [{"client_secret": "s"}, ("INTERNAL-42", 1)],
        "Session-Cookie": "c",
        "github_token": "g",
        "password": None,
    }
    assert r.redact_value(value) == {
        "X-Api-Key": REDACTED,
        "nested": [{"client_secret": REDACTED}, (REDACTED, 1)],
        "Session-Cookie": REDACTED,
        "github_token": REDACTED,
        "password": None,
    }
    assert value["X-Api-Key"] == "k"  # the input is never modified
    only_custom = Redactor(patterns=[r"foo\d"], fields=["f"])
    assert only_custom.redact_string(f"foo1 {SECRET_KEY}") == f"{REDACTED} {SECRET_KEY}"
    assert only_custom.redact_value({"api_key": "x", "f": "y"}) == {"api_key": "x", "f": REDACTED}


def test_the_redactor_is_thread_safe() -> None:
    r = Redactor()
    failures: list[str] = []

    def work(n: int) -> None:
        for i in range(300):
            args = {"api_key": f"k{n}{i}", "q": f"sk-{n:04d}{i:012d}xxxxxxxx"}
            out = r(ps.ToolExecutionStart(loop_id="l", tool_call_id="t", tool_name="n", args=args))
            if out.args != {"api_key": REDACTED, "q": REDACTED}:  # type: ignore[union-attr]
                failures.append(repr(out))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# -- user processors -------------------------------------------------------------------------------


def test_processors_enrich_mask_and_drop_before_the_redactor() -> None:
    seen: list[str] = []

    def enrich(event: ps.AgentEvent) -> ps.AgentEvent:
        seen.append(type(event).__name__)
        if isinstance(event, ps.AgentStart):
            return msgspec.structs.replace(event, metadata={"env": "prod", "token": "added-late"})
        return event

    def mask(event: ps.AgentEvent) -> ps.AgentEvent:
        if isinstance(event, ps.MessageEnd) and isinstance(event.message, ps.UserMessage):
            return msgspec.structs.replace(
                event,
                message=msgspec.structs.replace(event.message, content=(ps.TextContent(text="[masked]"),)),
            )
        return event

    def drop_deltas(event: ps.AgentEvent) -> ps.AgentEvent | None:
        return None if isinstance(event, ps.MessageUpdate) else event

    events, session, _ = record({"processors": [enrich, mask, drop_deltas]}, secret_scenario)
    assert seen[0] == "AgentStart" and "MessageUpdate" in seen
    assert not any(isinstance(e, ps.MessageUpdate) for e in events)
    # The redactor runs last: what a processor adds is redacted too.
    assert session.loops[0].metadata == {"env": "prod", "token": REDACTED}
    assert session.loops[0].turns[0].input_messages[0].content == (  # type: ignore[union-attr]
        ps.TextContent(text="[masked]"),
    )


def test_a_processor_returning_an_event_a_recorder_cannot_hold_fails_closed() -> None:
    """A `Tracer`'s recorders take its events as checked (`on_checked_event`): an event a
    processor made in their place is checked where the chain passes it on, its record
    of the wrong type refused (content withheld) and its free-form values copied as JSON."""

    def odd(event: ps.AgentEvent) -> ps.AgentEvent:
        if isinstance(event, ps.TurnStart):
            return msgspec.structs.replace(event, turn_index=-1)
        if isinstance(event, ps.MessageEnd) and isinstance(event.message, ps.AssistantMessage):
            return msgspec.structs.replace(
                event, message=msgspec.structs.replace(event.message, content=(ps.TextContent(text=7),))
            )
        if isinstance(event, ps.ToolExecutionStart):
            return msgspec.structs.replace(event, args={"path": pathlib.Path("/tmp/x"), 1: "one"})
        return event

    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[recorder], processors=[odd], config=SNAP)
    with tracer.loop() as loop, loop.turn() as turn:
        with turn.assistant() as reply:
            reply.finish("hello", tool_calls=[ps.ToolCall(id="c", name="read", arguments={})])
        with turn.tool(reply.message.content[1]) as tool:  # type: ignore[union-attr,arg-type]
            tool.result("ok")
    recorder.flush()
    (session,) = recorder.drain_completed()
    ps.decode_session(ps.encode(session))  # it saves, and loads
    assert [t.turn_id.turn_index for t in session.loops[0].turns] == [0]
    events = [e.event for e in session.loops[0].events]
    (ended,) = [e for e in events if type(e) is ps.MessageEnd and type(e.message) is ps.AssistantMessage]
    assert ended.message.content[0].text.endswith(".odd raised TypeError]")  # type: ignore[union-attr]
    (started,) = [e for e in events if isinstance(e, ps.ToolExecutionStart)]
    assert started.args == {"path": "/tmp/x", "1": "one"}
    assert tracer.processors.failures == {repr(odd): 2}


def failing(event: ps.AgentEvent) -> ps.AgentEvent:
    raise ValueError(f"cannot handle {SECRET_KEY}")


def test_a_failing_processor_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="phi_session.processors"):
        events, session, data = record({"processors": [failing], "redact": False}, secret_scenario)
    note = "[WITHHELD: processor failing raised ValueError]"
    assert b"AKIAABCDEFGHIJKLMNOP" not in data and b"plain-value" not in data
    [loop] = session.loops
    assert loop.metadata == {"withheld": note}
    assert loop.config == ps.LoopConfigSnapshot(model="m", provider="p", config_id="p.m")
    assert loop.turns[0].input_messages[0].content == (ps.TextContent(text=note),)  # type: ignore[union-attr]
    assert loop.messages and all(m.content == (ps.TextContent(text=note),) for m in loop.messages)  # type: ignore[union-attr]
    start = next(e for e in events if isinstance(e, ps.ToolExecutionStart))
    assert start.args == {"withheld": note} and start.tool_name == "http"
    assert loop.status == "Aborted" and loop.error == note  # the loop's structure is intact
    assert len(events) == sum(1 for _ in events)  # nothing lost
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and SECRET_KEY not in caplog.text.split("Traceback")[0]


def test_the_redactor_lives_in_its_own_module_and_keeps_its_import_paths() -> None:
    from phi_session import redactor

    assert Redactor is redactor.Redactor is ps.Redactor and REDACTED is redactor.REDACTED
    assert Redactor.__module__ == "phi_session.redactor"


def test_a_processor_returning_a_non_event_fails_closed() -> None:
    chain = ProcessorChain([lambda event: {"not": "an event"}])  # type: ignore[list-item, return-value]
    event = ps.ProgressMessage(loop_id="l", tool_call_id="t", tool_name="n", text="secret")
    out = chain(event)
    assert isinstance(out, ps.ProgressMessage) and out.text.startswith("[WITHHELD: processor")
    assert list(chain.failures.values()) == [1]


MARK = "CONTENT-MARK"


def every_event() -> list[ps.AgentEvent]:
    text = (ps.TextContent(text=MARK),)
    tag = NodeTag(kind="lesson", text=MARK, created_at_turn=0, abandoned_node_ids=())
    user = ps.UserMessage(content=text, timestamp=1, tags=(tag,))
    reply = ps.AssistantMessage(
        content=(*text, ps.ToolCall(id="c", name="n", arguments={"a": MARK})),
        stop_reason="error",
        model="m",
        provider="p",
        usage=ps.Usage(input=1, output=1),
        timestamp=1,
        error_message=MARK,
    )
    result = ps.ToolResultMessage(tool_call_id="c", tool_name="n", content=text, is_error=False, timestamp=1)
    extension = ps.extension_message("custom-role", "k", {"x": MARK})
    tool_result = ps.ToolResult(content=text, details={"d": MARK}, child_loop_id="c.sub.1")
    tool = ps.ToolDefinition(name="n", description=MARK, parameters={})
    payload = ps.AnnotatedRequestPayload(
        system_prompt=MARK,
        messages=(user,),
        provenance=(),
        tools=(tool,),
        model_id="m",
        thinking_level="off",
        response_format=TextFormat(),
    )
    t = ps.Timestamp.parse("2025-01-01T00:00:00Z")
    snap = ps.LoopConfigSnapshot(model="m", provider="p", name=MARK, base_url=MARK)
    return [
        ps.AgentStart(
            agent_id="a", session_id="s", loop_id="l", timestamp=t, metadata={"m": MARK}, config_snapshot=snap
        ),
        ps.AgentEnd(
            loop_id="l",
            messages=(user, reply, result, extension),
            usage=ps.Usage(input=1, output=1),
            timestamp=t,
            rejection=MARK,
            error=MARK,
        ),
        ps.TurnStart(loop_id="l", turn_index=0, timestamp=t, triggered_by="User"),
        ps.TurnRequest(loop_id="l", turn_index=0, payload=payload, timestamp=t),
        ps.TurnEnd(
            loop_id="l", message=reply, usage=ps.Usage(input=1, output=1), timestamp=t, tool_results=(result,)
        ),
        ps.MessageStart(loop_id="l", message=user),
        ps.MessageUpdate(loop_id="l", message=reply, delta=ps.StreamDelta.text(MARK)),
        ps.MessageEnd(loop_id="l", message=extension),
        ps.ToolExecutionStart(loop_id="l", tool_call_id="c", tool_name="n", args={"q": MARK}),
        ps.ToolExecutionUpdate(loop_id="l", tool_call_id="c", tool_name="n", partial_result=tool_result),
        ps.ToolExecutionEnd(loop_id="l", tool_call_id="c", tool_name="n", result=tool_result, is_error=False),
        ps.ProgressMessage(loop_id="l", tool_call_id="c", tool_name="n", text=MARK),
        ps.InputRejected(loop_id="l", reason=MARK),
        ps.ParallelLoopStart(session_id="s", loop_ids=("l",), timestamp=t),
        ps.ParallelLoopEnd(
            session_id="s",
            selected_loop_id="l",
            selected_config_index=0,
            evaluation_usage=ps.Usage(input=0, output=0),
            timestamp=t,
        ),
        ps.CompactionStarted(loop_id="l", estimated_tokens=1, message_count=1, timestamp=t),
        ps.PrunApplied(
            loop_id="l", tokens_removed=1, messages_removed=1, memo=MARK, pruned_timestamps=(), timestamp=t
        ),
        ps.RevertApplied(
            loop_id="l",
            category="failure",
            abandoned_node_ids=(),
            summary=MARK,
            applied=True,
            reason=MARK,
            timestamp=t,
        ),
        ps.CompactionEnded(
            loop_id="l",
            messages_before=1,
            messages_after=1,
            estimated_tokens_before=1,
            estimated_tokens_after=1,
            loops_compacted=1,
            timestamp=t,
        ),
    ]


def test_withhold_removes_every_piece_of_content_from_every_event_type() -> None:
    events = every_event()
    assert {type(e) for e in events} == set(ps.events.EVENT_TYPES)
    for event in events:
        kept = withhold(event, "[note]")
        data = ps.encode(kept)
        assert MARK.encode() not in data, type(event).__name__
        assert ps.encode(ps.decode_event(data)) == data  # still a valid phi-core event
        assert getattr(kept, "loop_id", None) == getattr(event, "loop_id", None)
    start = withhold(events[0], "[note]")
    assert isinstance(start, ps.AgentStart) and start.metadata == {"withheld": "[note]"}
    end = withhold(events[1], "[note]")
    assert isinstance(end, ps.AgentEnd) and end.rejection == "[note]" and end.usage == events[1].usage  # type: ignore[union-attr]


def test_withhold_keeps_the_tag_of_a_reply_a_replay_served() -> None:
    # Billing reads it: a withheld replayed reply must not be billed as a model call.
    served = mark_replayed(
        ps.AssistantMessage(
            content=(ps.TextContent(text=MARK),),
            stop_reason="stop",
            model="m",
            provider="p",
            usage=ps.Usage(input=1, output=1),
            timestamp=1,
            tags=(NodeTag(kind="lesson", text=MARK, created_at_turn=0, abandoned_node_ids=()),),
        )
    )
    kept = withhold(ps.MessageEnd(loop_id="l", message=served), "[note]")
    assert isinstance(kept, ps.MessageEnd) and kept.message.tags == () and is_replayed(kept.message)
    assert MARK.encode() not in ps.encode(kept)


def emitted_lines(scenario: Any, **options: Any) -> bytes:
    """Every event as encoded the moment it was emitted (later changes cannot hide a leak)."""
    lines: list[bytes] = []
    tracer = Tracer(
        AgentSession(clock=FakeClock()),
        sinks=[lambda e: lines.append(ps.encode(e))],
        config=ps.LoopConfigSnapshot(model="m", provider="p"),
        **options,
    )
    try:
        scenario(tracer)
    except RuntimeError:
        pass
    return b"\n".join(lines)


def test_arguments_changed_after_a_first_scan_are_scanned_again() -> None:
    arguments: dict[str, Any] = {"q": "x"}
    call = ps.ToolCall(id="c1", name="http", arguments=arguments)

    def scenario(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            loop.user("hi")
            with loop.turn() as turn:
                with turn.assistant() as reply:
                    reply.finish(tool_calls=[call])  # scanned clean here
                arguments["api_key"] = "plain-value"  # the agent adds a credential
                with turn.tool(call) as tool:
                    tool.result("ok")

    assert b"plain-value" not in emitted_lines(scenario)


def test_a_failed_tools_exception_text_is_redacted() -> None:
    def scenario(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            loop.user("hi")
            with loop.turn() as turn:
                with turn.assistant() as reply:
                    reply.finish()
                with turn.tool(id="c1", name="http", args={}):
                    raise RuntimeError(
                        f"401: https://api.x/v1?api_key=plain-value {SECRET_KEY} "
                        "Authorization: Bearer tok_abcdefghijklmn"
                    )

    data = emitted_lines(scenario)
    assert b"http failed: RuntimeError: 401" in data
    for secret in (b"plain-value", SECRET_KEY.encode(), b"tok_abcdefghijklmn"):
        assert secret not in data, secret


def test_a_tools_explicit_error_result_is_redacted_but_a_success_is_not() -> None:
    def scenario(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            loop.user("hi")
            with loop.turn() as turn:
                with turn.assistant() as reply:
                    reply.finish()
                with turn.tool(id="c1", name="a", args={}) as tool:
                    tool.error(f"bad key {SECRET_KEY}")
                with turn.tool(id="c2", name="b", args={}) as tool:
                    tool.result("key sk-ok0123456789abcdefghij")  # text redaction is opt-in

    data = emitted_lines(scenario)
    assert SECRET_KEY.encode() not in data and b"sk-ok0123456789abcdefghij" in data


@pytest.mark.parametrize(
    "name",
    [
        "accessToken",
        "clientSecret",
        "refreshToken",
        "authToken",
        "privateKey",
        "apiKey",
        "xApiKey",
        "githubToken",
    ],
)
def test_camel_case_field_names_are_secret_fields(name: str) -> None:
    redactor = Redactor()
    assert redactor.is_secret_field(name)
    assert redactor.redact_value({name: "v", "userName": "bob"}) == {name: REDACTED, "userName": "bob"}


@dataclasses.dataclass
class Credentials:
    user: str
    api_key: str


class Connection(msgspec.Struct):
    url: str
    headers: dict[str, str]
    opened: ps.Timestamp | None = None  # a value msgspec writes only through phi-session's codec


def test_dataclasses_and_structs_in_values_are_redacted_as_they_are_written() -> None:
    def scenario(tracer: Tracer) -> None:
        with tracer.loop(metadata={"login": Credentials("bob", "plain-value")}) as loop:
            loop.user("hi")

    data = emitted_lines(scenario)
    assert b"plain-value" not in data and b"bob" in data
    redactor = Redactor()
    connection = Connection(
        url="https://host/v1?key=query-secret",
        headers={"Authorization": "anything"},
        opened=ps.Timestamp.parse("2025-06-01T09:00:00Z"),
    )
    details = {"conn": connection, "tags": frozenset({SECRET_KEY})}
    assert redactor.redact_value(details) == {
        "conn": {
            "url": f"https://host/v1?key={REDACTED}",
            "headers": {"Authorization": REDACTED},
            "opened": "2025-06-01T09:00:00Z",
        },
        "tags": [REDACTED],
    }
    start = ps.ToolExecutionStart(loop_id="l", tool_call_id="c", tool_name="t", args=connection)
    assert redactor(start).args["headers"] == {"Authorization": REDACTED}  # type: ignore[attr-defined]
    clean = {"conn": Connection(url="https://host/v1", headers={}), "at": ps.Timestamp.now()}
    assert redactor.redact_value(clean) is clean  # kept as it is when nothing in it is secret


def test_a_value_the_redactor_cannot_read_is_withheld_not_passed_on() -> None:
    raw = msgspec.Raw(b'{"password": "plain-value", "q": "x"}')  # written verbatim by the encoders
    redactor = Redactor()
    assert redactor.redact_value({"cfg": raw}) == {"cfg": {"password": REDACTED, "q": "x"}}
    assert redactor.redact_value([Connection(url="u", headers={"Authorization": raw})]) == [
        {"url": "u", "headers": {"Authorization": REDACTED}, "opened": None}
    ]
    clean = {"cfg": msgspec.Raw(b'{"q": "x"}')}
    assert redactor.redact_value(clean) is clean
    chain = ProcessorChain([redactor])
    for unreadable in (object(), msgspec.Raw(b'{"password": "plain-value"')):
        start = ps.ToolExecutionStart(loop_id="l", tool_call_id="c", tool_name="t", args={"a": [unreadable]})
        with pytest.raises(ps.PhiSessionError, match="cannot be read"):
            redactor(start)
        assert chain(start).args == {"withheld": "[WITHHELD: processor Redactor raised PhiSessionError]"}  # type: ignore[union-attr]


def test_a_secret_used_as_a_dict_key_is_redacted() -> None:
    def scenario(tracer: Tracer) -> None:
        with tracer.loop(metadata={"keys": {SECRET_KEY: "owner"}}) as loop, loop.turn() as turn:
            with turn.assistant() as reply:
                reply.finish(tool_calls=[ps.ToolCall(id="c1", name="t", arguments=f'{{"{SECRET_KEY}": 1}}')])
            with turn.tool(id="c2", name="t", args={"owners": {"ghp_0123456789abcdefghijABCDEFGHIJ": 2}}):
                pass

    data = emitted_lines(scenario)
    assert SECRET_KEY.encode() not in data and b"ghp_0123456789" not in data
    redactor = Redactor()
    for _ in range(2):  # a key seen once is not taken as clean the next time
        assert redactor.redact_value({SECRET_KEY: "owner", "q": "x"}) == {REDACTED: "owner", "q": "x"}
        assert redactor.redact_value({SECRET_KEY: "owner"}) == {REDACTED: "owner"}
    assert redactor.redact_value({"Bearer abcdefgh12345678": None}) == {f"Bearer {REDACTED}": None}
    custom = Redactor(extra_patterns=[r"acct-\d{6}"])
    assert custom.redact_value({"acct-123456": [1], 7: "x"}) == {REDACTED: [1], 7: "x"}


def test_two_secret_keys_redacted_alike_keep_both_values() -> None:
    first, second = "sk-proj-" + "A" * 24, "sk-proj-" + "B" * 24
    usage = {first: 10, REDACTED: 1, second: 5, "x": 0}  # API keys as a usage table's keys
    assert Redactor().redact_value({"usage": usage}) == {
        "usage": {f"{REDACTED}#2": 10, REDACTED: 1, f"{REDACTED}#3": 5, "x": 0}
    }


def one_tool_call(call: ps.ToolCall) -> Callable[[Tracer], None]:
    """A scenario: one turn calling `call`, which succeeds."""

    def scenario(tracer: Tracer) -> None:
        with tracer.loop() as loop:
            loop.user("hi")
            with loop.turn() as turn:
                with turn.assistant() as reply:
                    reply.finish(tool_calls=[call])
                with turn.tool(call) as tool:
                    tool.result("ok")

    return scenario


def test_json_string_arguments_are_redacted_field_by_field() -> None:
    arguments = '{"password": "hunter2-secret", "apiToken": "tok-secret", "q": "x"}'
    data = emitted_lines(one_tool_call(ps.ToolCall(id="c1", name="login", arguments=arguments)))
    assert b"hunter2-secret" not in data and b"tok-secret" not in data
    redactor = Redactor()
    assert redactor.redact_json_string('[{"password": "p"}, 1]') == '[{"password":"[REDACTED]"},1]'
    clean = '{"q": "x"}'
    assert redactor.redact_json_string(clean) is clean  # unchanged text is kept byte for byte
    assert redactor.redact_json_string("{not json sk-abcdefghijklmnopqrstuv") == "{not json [REDACTED]"


def test_fields_are_found_in_json_cut_short_malformed_or_written_into_a_string() -> None:
    redactor = Redactor()
    assert (
        redactor.redact_json_string('{"path": "/etc", "password": "plain-value", "mo')  # cut at max_tokens
        == '{"path": "/etc", "password": "[REDACTED]", "mo'
    )
    assert redactor.redact_json_string('{"password": "plain-\\"value",}') == '{"password": "[REDACTED]",}'
    body = msgspec.json.encode({"password": "plain-value", "q": "x"}).decode()
    for _ in range(2):  # the second time its field names are known clean
        assert redactor.redact_value({"url": "https://api", "body": body}) == {
            "url": "https://api",
            "body": '{"password":"[REDACTED]","q":"x"}',
        }
    assert redactor.redact_value([" [1]", "{not json"]) == [" [1]", "{not json"]
    credentials = {"AccessKeyId": "id", "SecretAccessKey": "plain-value", "SessionToken": "plain-value"}
    assert redactor.redact_value({"Credentials": credentials}) == {
        "Credentials": {"AccessKeyId": "id", "SecretAccessKey": REDACTED, "SessionToken": REDACTED}
    }
    headers = {"headers": [["Authorization", "Basic plain-value"], ("Accept", "*/*"), ("Cookie", "x")]}
    assert redactor.redact_value(headers) == {
        "headers": [["Authorization", REDACTED], ("Accept", "*/*"), ("Cookie", REDACTED)]
    }
    tags = {"tags": ["secret", "public"]}  # a pair only in a list of pairs
    assert redactor.redact_value(tags) is tags


class CountingRedactor(Redactor):
    """Counts the scans of each dict (tool arguments) by identity."""

    def __init__(self) -> None:
        super().__init__()
        self.scans: dict[int, int] = {}

    def _redact_dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self.scans[id(value)] = self.scans.get(id(value), 0) + 1
        return super()._redact_dict(value)


def _history_request(history: tuple[ps.Message, ...]) -> ps.TurnRequest:
    payload = request_payload(history)
    return ps.TurnRequest(loop_id="l", turn_index=len(history), payload=payload, timestamp=ps.Timestamp.now())


def _tool_reply(tool: str, arguments: Any) -> ps.AssistantMessage:
    return ps.AssistantMessage(
        content=(ps.ToolCall(id="c1", name=tool, arguments=arguments),),
        stop_reason="toolUse",
        model="m",
        provider="p",
        usage=ps.Usage(input=1, output=1),
        timestamp=1,
    )


def test_a_history_resent_in_every_turn_request_is_scanned_once() -> None:
    arguments = {"path": "src/a.py", "query": "where is the cache"}
    reply = _tool_reply("grep", arguments)
    redactor = CountingRedactor()
    redactor(ps.MessageEnd(loop_id="l", message=reply))
    for _ in range(5):
        assert redactor(_history_request((reply,))).payload.messages == (reply,)  # type: ignore[attr-defined]
    assert redactor.scans[id(arguments)] == 1


def test_a_remembered_message_whose_arguments_gain_a_secret_is_scanned_again() -> None:
    arguments: dict[str, Any] = {"nested": {"q": "x"}}
    reply = _tool_reply("http", arguments)
    redactor = Redactor()
    assert redactor(_history_request((reply,))) is not None
    arguments["nested"]["api_key"] = "plain-value"  # a change deep inside the same dict
    redacted = redactor(_history_request((reply,)))
    [message] = redacted.payload.messages  # type: ignore[attr-defined]
    assert message.content[0].arguments["nested"]["api_key"] == REDACTED


def test_a_redactor_keeps_no_more_than_its_budget_of_drained_conversations_alive() -> None:
    # Its memo outlives the sessions: 100 conversations each with a 300 KB argument kept
    # 90 MB (the arguments and their copies) alive once they were dropped.
    redactor = Redactor()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(100):
            reply = _tool_reply("write", {"path": f"f{index}", "content": "y" * 300_000})
            redactor(ps.MessageEnd(loop_id="l", message=reply))
            redactor(_history_request((reply,)))
            del reply
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 25_000_000


def test_a_huge_argument_is_scanned_again_each_time_not_kept() -> None:
    arguments = {"content": "y" * 3_000_000}
    reply = _tool_reply("write", arguments)
    redactor = CountingRedactor()
    for _ in range(3):
        redactor(ps.MessageEnd(loop_id="l", message=reply))
    assert redactor.scans[id(arguments)] == 3
    small = {"path": "a.py"}
    for _ in range(3):
        redactor(ps.MessageEnd(loop_id="l", message=_tool_reply("read", small)))
    assert redactor.scans[id(small)] == 3  # each its own content: scanned each time
    reply = _tool_reply("read", small)
    for _ in range(3):
        redactor(ps.MessageEnd(loop_id="l", message=reply))
    assert redactor.scans[id(small)] == 4  # one content: scanned once


class CountingStringRedactor(Redactor):
    """Counts the JSON-string scans of each value by identity."""

    def __init__(self) -> None:
        super().__init__()
        self.scans: dict[int, int] = {}

    def redact_json_string(self, text: str) -> str:
        self.scans[id(text)] = self.scans.get(id(text), 0) + 1
        return super().redact_json_string(text)


def test_json_string_arguments_resent_in_every_turn_request_are_scanned_once() -> None:
    arguments = '{"path": "src/a.py", "password": "hunter2-secret"}'
    reply = _tool_reply("grep", arguments)
    redactor = CountingStringRedactor()
    first = redactor(ps.MessageEnd(loop_id="l", message=reply))
    for _ in range(5):
        [message] = redactor(_history_request((reply,))).payload.messages  # type: ignore[attr-defined]
        assert message == first.message  # type: ignore[attr-defined]
        assert "hunter2-secret" not in message.content[0].arguments
    assert redactor.scans[id(arguments)] == 1


def test_arguments_that_do_not_copy_as_json_are_scanned_every_time() -> None:
    arguments = {"when": ps.Timestamp.now()}  # no JSON copy to compare against: never remembered
    reply = _tool_reply("http", arguments)
    redactor = CountingRedactor()
    for _ in range(3):
        redactor(_history_request((reply,)))
    assert redactor.scans[id(arguments)] == 3


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):  # objects and arrays in turn
        value = {"a": value} if level % 2 else [value]
    return value


def _leaf(value: Any, depth: int) -> Any:
    for level in reversed(range(depth)):
        value = value["a"] if level % 2 else value[0]
    return value


def test_deeply_nested_tool_arguments_are_scanned_and_kept() -> None:
    # Deeper than phi-core reads in a session: what lies past MAX_VALUE_DEPTH is kept as
    # its JSON text, which the redactor reads as JSON (a secret field in it is found).
    depth = 800
    arguments = _nested(depth, {"q": "hello", "api_key": "plain-value"})
    events, _, data = record({}, one_tool_call(ps.ToolCall(id="c1", name="http", arguments=arguments)))
    assert b"WITHHELD" not in data and b"plain-value" not in data
    [start] = [e for e in events if isinstance(e, ps.ToolExecutionStart)]
    [end] = [e for e in events if isinstance(e, ps.MessageEnd) and isinstance(e.message, ps.AssistantMessage)]
    [recorded] = end.message.content  # type: ignore[attr-defined]
    for scanned in (start.args, recorded.arguments):
        kept = 0
        while not isinstance(scanned, str):
            scanned = scanned["a"] if (depth - 1 - kept) % 2 else scanned[0]
            kept += 1
        assert kept == MAX_VALUE_DEPTH
        assert _leaf(json.loads(scanned), depth - kept) == {"q": "hello", "api_key": REDACTED}


def test_arguments_nested_deeper_than_the_codec_goes_are_still_scanned() -> None:
    depth = 5000  # past what the codec copies (a remembered content keeps a JSON copy)
    reply = _tool_reply("http", _nested(depth, {"token": "plain-value"}))
    redacted = Redactor()(ps.MessageEnd(loop_id="l", message=reply))
    [call] = redacted.message.content  # type: ignore[attr-defined]
    assert _leaf(call.arguments, depth) == {"token": REDACTED}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 2000,  # a tool writing a file of brackets
        '{"api_key": "plain-value", "deep": '
        + "[" * 2000
        + "]" * 2000
        + "}",  # JSON deeper than msgspec reads
    ],
)
def test_a_json_string_too_deep_to_parse_is_scanned_as_text(text: str) -> None:
    # msgspec's RecursionError escaped the redactor: the reply and the tool's arguments
    # were recorded withheld ("[WITHHELD: processor Redactor raised RecursionError]").
    arguments = {"query": text, "path": "notes.txt"}
    events, _, data = record({}, one_tool_call(ps.ToolCall(id="c1", name="write", arguments=arguments)))
    assert b"WITHHELD" not in data and b"plain-value" not in data
    [start] = [e for e in events if isinstance(e, ps.ToolExecutionStart)]
    assert start.args == {"query": text.replace('"plain-value"', f'"{REDACTED}"'), "path": "notes.txt"}
    assert Redactor().redact_json_string(text) == text.replace('"plain-value"', f'"{REDACTED}"')


def test_a_value_nested_in_itself_is_withheld_not_walked_forever() -> None:
    arguments: dict[str, Any] = {"path": "/tmp/x", "opts": {"password": "plain-value"}}
    arguments["opts"]["parent"] = arguments  # a back-reference the agent keeps
    items: list[Any] = ["x"]
    items.append(items)
    redactor = Redactor()
    for value in (arguments, {"items": items}, [{"a": items}]):
        with pytest.raises(ps.PhiSessionError, match="nested in itself"):
            redactor.redact_value(value)
    shared = {"token": "plain-value"}  # met twice, but never inside itself
    assert redactor.redact_value({"a": shared, "b": [shared, shared]}) == {
        "a": {"token": REDACTED},
        "b": [{"token": REDACTED}, {"token": REDACTED}],
    }
    chain = ProcessorChain([redactor])
    request = chain(_history_request((_tool_reply("read", arguments),)))
    assert isinstance(request, ps.TurnRequest) and request.payload.messages == ()
    assert chain.failures == {repr(redactor): 1}


def test_one_processor_and_one_sink_keep_their_failure_isolation() -> None:
    """The usual shape (one processor, one sink) runs both inline: the same contract."""
    received: list[ps.AgentEvent] = []

    def mask(event: ps.AgentEvent) -> ps.AgentEvent | None:
        if isinstance(event, ps.ProgressMessage):
            return {"not": "an event"}  # type: ignore[return-value]
        return None if isinstance(event, ps.MessageUpdate) else event

    def tracer(sink: Any, **options: Any) -> Tracer:
        return Tracer(AgentSession(clock=FakeClock()), sinks=[sink], config=SNAP, **options)

    masking = tracer(received.append, processors=[mask], redact=False)
    secret_scenario(masking)
    assert not any(isinstance(e, ps.MessageUpdate) for e in received) and masking.processors.dropped == 2
    [progress] = [e for e in received if isinstance(e, ps.ProgressMessage)]
    assert progress.text.startswith("[WITHHELD: processor") and progress.text.endswith(
        "mask raised TypeError]"
    )
    received.clear()
    withholding = tracer(received.append, processors=[failing], redact=False)
    secret_scenario(withholding)  # never raises into the agent
    assert received and b"plain-value" not in b"".join(ps.encode(e) for e in received)
    assert list(withholding.processor_failures.values()) == [len(received)]

    class Down:
        def __call__(self, event: ps.AgentEvent) -> None:
            raise RuntimeError("sink down")

    redacting = tracer(Down())
    secret_scenario(redacting)  # the redactor, then a failing sink: never raises
    assert redacting.fanout.error_count == len(received)


PROMPT = ps.UserMessage(content=(ps.TextContent(text="hi"),), timestamp=1)


def _growing_history(redactor: Redactor, replies: list[ps.AssistantMessage]) -> list[ps.TurnRequest]:
    """One request per reply, each with the history so far (the same prompt first)."""
    history: list[ps.Message] = [PROMPT]
    out = []
    for reply in replies:
        history.append(reply)
        out.append(redactor(_history_request(tuple(history))))
    return out  # type: ignore[return-value]


def test_a_growing_history_scans_each_message_once_and_keeps_what_it_redacted() -> None:
    clean = [_tool_reply("grep", {"path": f"src/{n}.py"}) for n in range(3)]
    secrets = [_tool_reply("http", {"api_key": f"plain-value-{n}"}) for n in range(2)]
    replies = [clean[0], clean[1], secrets[0], clean[2], secrets[1]]
    redactor = CountingRedactor()
    requests = _growing_history(redactor, replies)
    assert all(redactor.scans[id(r.content[0].arguments)] == 1 for r in replies)  # type: ignore[union-attr]
    for request, size in zip(requests, range(1, 6), strict=True):
        messages = request.payload.messages  # type: ignore[attr-defined]
        assert messages[0] is PROMPT and len(messages) == size + 1
        for sent, reply in zip(messages[1:], replies, strict=False):
            if reply in secrets:
                assert sent.content[0].arguments == {"api_key": REDACTED}
            else:
                assert sent is reply  # unchanged: as given


def test_a_history_whose_earlier_arguments_gain_a_secret_is_scanned_again() -> None:
    arguments: dict[str, Any] = {"q": "x"}
    first, second = _tool_reply("http", arguments), _tool_reply("grep", {"path": "a"})
    redactor = Redactor()
    redactor(_history_request((PROMPT, first)))
    arguments["token"] = "plain-value"  # inside the remembered part of the history
    request = redactor(_history_request((PROMPT, first, second)))
    assert request.payload.messages[1].content[0].arguments["token"] == REDACTED  # type: ignore[union-attr]


def _small_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    # The redactor's budgets shrunk to what a few 4 KB messages outgrow.
    monkeypatch.setattr(redactor_module, "_HISTORY_BYTES", 32_000)
    monkeypatch.setattr(redactor_module, "_MEMO_BYTES", 32_000)


def test_a_history_over_the_budget_still_scans_each_message_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the budget each request rescanned the whole history (the memo evicting, in
    # turn, each content the next request needed): 30x the cost of a request before.
    _small_budgets(monkeypatch)
    replies = [_tool_reply("write", {"path": f"f{n}", "content": "y" * 4000}) for n in range(30)]
    replies[20].content[0].arguments["api_key"] = "plain-value"  # type: ignore[union-attr]
    redactor = CountingRedactor()
    requests = _growing_history(redactor, replies)
    assert [redactor.scans[id(r.content[0].arguments)] for r in replies] == [1] * 30  # type: ignore[union-attr]
    assert requests[-1].payload.messages[21].content[0].arguments["api_key"] == REDACTED  # type: ignore[attr-defined]
    replies[3].content[0].arguments["token"] = "plain-value"  # type: ignore[union-attr]
    request = redactor(_history_request((PROMPT, *replies)))
    assert request.payload.messages[4].content[0].arguments["token"] == REDACTED  # type: ignore[attr-defined]


def test_histories_over_the_budget_are_kept_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one over the budget kept for its next request goes when another one over it comes.
    _small_budgets(monkeypatch)
    redactor = Redactor()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for conversation in range(20):
            history: tuple[ps.Message, ...] = (
                ps.UserMessage(content=(ps.TextContent(text="hi"),), timestamp=1),
            )
            for n in range(25):  # 100 KB of arguments, and their copies
                history += (_tool_reply("write", {"path": f"{conversation}/{n}", "content": "y" * 4000}),)
                redactor(_history_request(history))
            del history
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        for n in range(70):  # other conversations, under the budget: the last one over it goes
            redactor(_history_request((ps.UserMessage(content=(ps.TextContent(text=f"{n}"),), timestamp=1),)))
        gc.collect()
        held_after = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 400_000  # the budget, and one history over it: 20 were 3 MB
    assert held_after < 100_000


def test_known_clean_field_names_are_still_scanned_for_secrets() -> None:
    redactor = Redactor()
    clean = {"q": "where is the cache", "path": "src/a.py"}
    assert redactor.redact_value(clean) is clean  # both names are now known clean
    assert redactor.redact_value({"q": f"use {SECRET_KEY}", "path": "src"}) == {
        "q": "use [REDACTED]",
        "path": "src",
    }
    assert redactor.redact_value({"q": "https://user:hunter2@host/x"}) == {"q": "https://[REDACTED]@host/x"}
    assert redactor.redact_value({"q": [SECRET_KEY], "path": None}) == {"q": [REDACTED], "path": None}
    assert redactor.redact_value({"q": {"token": "t"}}) == {"q": {"token": REDACTED}}
    assert redactor.redact_value({"q": "x", "api_key": "plain"}) == {"q": "x", "api_key": REDACTED}
    numbers = {"q": 3, "path": 2.5}
    assert redactor.redact_value(numbers) is numbers


def test_known_clean_field_names_with_numbers_beside_text_are_still_scanned_for_secrets() -> None:
    redactor = Redactor()
    clean = {"path": "src/a.py", "max_results": 30, "verbose": True, "query": "cache"}
    assert redactor.redact_value(clean) is clean  # every name is now known clean
    assert redactor.redact_value(clean) is clean
    mixed = {"path": "src/a.py", "max_results": 30, "query": f"use {SECRET_KEY}", "verbose": None}
    assert redactor.redact_value(mixed) == {**mixed, "query": "use [REDACTED]"}
    nested = {"path": "src", "max_results": [SECRET_KEY]}
    assert redactor.redact_value(nested) == {"path": "src", "max_results": [REDACTED]}
    call = ps.ToolExecutionStart(
        loop_id="l", tool_call_id="c", tool_name="t", args={"path": "https://u:pw@host/x", "max_results": 2}
    )
    assert redactor(call).args == {"path": "https://[REDACTED]@host/x", "max_results": 2}  # type: ignore[attr-defined]


@pytest.mark.parametrize("options", [{"extra_patterns": [r"acct-\d{6}"]}, {"patterns": [r"acct-\d{6}"]}])
def test_custom_patterns_apply_to_known_clean_field_names(options: dict[str, Any]) -> None:
    redactor = Redactor(**options)
    clean = {"q": "x"}
    assert redactor.redact_value(clean) is clean
    assert redactor.redact_value({"q": "acct-123456"}) == {"q": REDACTED}  # no default anchor in it
    call = ps.ToolExecutionStart(loop_id="l", tool_call_id="c", tool_name="t", args={"q": "see acct-654321"})
    assert redactor(call).args == {"q": f"see {REDACTED}"}  # type: ignore[attr-defined]


def test_custom_patterns_keep_their_own_groups_and_backreferences() -> None:
    quoted = r"""(['"])corp_[a-z0-9]{6,}\1"""  # a quoted token, either quote
    patterns = [r"(INTERNAL)-\d+", r"plain-\d+", quoted, "(?P<n>acct)-(?P=n)", "(?P<n>key)-(?P=n)"]
    redactor = Redactor(extra_patterns=patterns)
    text = "INTERNAL-1 plain-2 'corp_abc12345' \"corp_abc12345' acct-acct key-key"
    kept = "\"corp_abc12345'"  # its quotes differ
    assert redactor.redact_string(text) == f"{REDACTED} {REDACTED} {REDACTED} {kept} {REDACTED} {REDACTED}"


def test_compiled_patterns_keep_their_flags() -> None:
    # Their text was joined with the others', their flags dropped: re.IGNORECASE missed
    # "ACCT-12", re.VERBOSE matched its spaces literally.
    verbose = re.compile(r"""tok_ [0-9]+  # a numbered token""", re.VERBOSE)
    patterns = [re.compile(r"acct-\d+", re.IGNORECASE), r"plain-\d+", verbose, re.compile("(?i)corp_x")]
    for options in ({"extra_patterns": patterns}, {"patterns": patterns}):
        redactor = Redactor(**options)  # type: ignore[arg-type]
        text = "ACCT-12 Acct-3 PLAIN-4 plain-5 tok_77 CORP_X"
        assert (
            redactor.redact_string(text) == f"{REDACTED} {REDACTED} PLAIN-4 {REDACTED} {REDACTED} {REDACTED}"
        )


def test_a_custom_pattern_that_does_not_compile_is_named() -> None:
    """re.error came through, naming neither the pattern nor phi-session, and its position
    was in the patterns joined into one."""
    for options in ({"extra_patterns": [r"ok-\d+", "("]}, {"patterns": ["("]}):
        with pytest.raises(ps.InvalidArgument, match=r"^secret pattern '\(' does not compile: missing \)"):
            Redactor(**options)
    with pytest.raises(ps.InvalidArgument, match=r"^the secret patterns do not compile together: global"):
        Redactor(extra_patterns=["(?i)acct"])  # compiles alone, not inside the alternation
    with pytest.raises(TypeError):
        Redactor(extra_patterns=[5])  # type: ignore[list-item]
    assert Redactor(extra_patterns=[re.compile("acct-1")]).redact_string("acct-1") == REDACTED


def test_a_runs_messages_at_its_end_are_redacted_where_they_need_it() -> None:
    arguments: dict[str, Any] = {"q": "x"}
    reply = _tool_reply("http", arguments)
    redactor = Redactor()
    assert redactor(ps.MessageEnd(loop_id="l", message=reply)).message is reply  # type: ignore[attr-defined]
    arguments["api_key"] = "plain-value"  # gained after its scan
    user = ps.UserMessage(content=(ps.TextContent(text=f"mine: {SECRET_KEY}"),), timestamp=1)
    ok = ps.ToolResultMessage(
        tool_call_id="c1",
        tool_name="http",
        content=(ps.TextContent(text=SECRET_KEY),),
        is_error=False,
        timestamp=2,
    )
    failed = msgspec.structs.replace(ok, is_error=True)
    end = ps.AgentEnd(
        loop_id="l",
        messages=(user, reply, ok, failed),
        usage=ps.Usage(input=1, output=1),
        timestamp=ps.Timestamp.now(),
    )
    out = redactor(end).messages  # type: ignore[attr-defined]
    assert out[0] is user and out[2] is ok  # text redaction is opt-in
    assert out[1].content[0].arguments == {"q": "x", "api_key": REDACTED}
    assert out[3].content == (ps.TextContent(text=REDACTED),)
    clean = msgspec.structs.replace(end, messages=(user, _tool_reply("grep", {"q": "y"}), ok))
    assert redactor(clean) is clean
    texts = Redactor(redact_text=True)(end).messages  # type: ignore[attr-defined]
    assert texts[0].content == (ps.TextContent(text=f"mine: {REDACTED}"),)
    assert texts[2].content == texts[3].content == (ps.TextContent(text=REDACTED),)


def test_a_remembered_content_that_cannot_change_leaves_the_collector() -> None:
    # Without tool-call arguments that could change there is nothing to compare later:
    # the entry holds no lists, and the collector stops walking it (at 1,000 sessions a
    # full memo per redactor was 30,000 objects for every full collection to walk).
    def reply(*content: ps.Content) -> ps.AssistantMessage:
        usage = ps.Usage(input=1, output=1)
        return ps.AssistantMessage(
            content=content, model="m", provider="p", usage=usage, stop_reason="stop", timestamp=1
        )

    redactor = Redactor()
    text = reply(ps.TextContent(text="hello"))
    call = reply(ps.ToolCall(id="c1", name="http", arguments={"q": "x"}))
    for message in (text, call, text, call):
        redactor(ps.MessageEnd(loop_id="s.c.1", message=message))
    gc.collect()
    entries = {id(entry[0]): entry for entry in redactor._memo.values()}
    assert not gc.is_tracked(entries[id(text.content)])
    assert gc.is_tracked(entries[id(call.content)])  # its arguments are compared on every hit


@pytest.mark.parametrize("redact", [1, "true", "yes", "no", None])
def test_redact_takes_a_bool_or_a_redactor_and_nothing_else(redact: object) -> None:
    # Only `True` turned the redactor on: a truthy value read from a config file silently
    # recorded every secret.
    with pytest.raises(TypeError, match="redact must be a bool or a Redactor"):
        Tracer(redact=redact)  # type: ignore[arg-type]


def test_a_processor_that_cannot_be_called_is_refused_at_once() -> None:
    # It withheld the content of every event of the run.
    with pytest.raises(TypeError, match=r"processors\[1\] must be callable, not int"):
        Tracer(processors=[lambda event: event, 5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"processors\[0\] must be callable, not str"):
        ProcessorChain(["redact"])  # type: ignore[list-item]


def test_a_redactors_patterns_and_fields_are_checked() -> None:
    # A lone string was taken as patterns, one per letter; a pattern of another type replaced
    # the defaults, which then caught no secret.
    with pytest.raises(TypeError, match=r"patterns must be a sequence of str or re\.Pattern, not str"):
        Redactor(patterns=r"sk-\w+")
    with pytest.raises(TypeError, match=r"extra_patterns\[0\] must be str or re\.Pattern, not int"):
        Redactor(extra_patterns=[5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="fields must be a sequence of str, not str"):
        Redactor(fields="api_key")
    with pytest.raises(TypeError, match="redact_text must be bool, not str"):
        Redactor(redact_text="yes")  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgument, match=r"secret pattern .* does not compile"):
        Redactor(extra_patterns=["("])


def _upper(event: ps.AgentEvent) -> ps.AgentEvent:
    """A processor after the redactor: upper-cases a streamed text delta."""
    if isinstance(event, ps.MessageUpdate) and event.delta.Text is not msgspec.UNSET:
        return msgspec.structs.replace(event, delta=ps.StreamDelta("Text", event.delta.delta.upper()))
    return event


@pytest.mark.parametrize("case", ["redact left True", "a processor after it"])
def test_a_redactor_with_redact_text_in_processors_holds_back_the_stream(case: str) -> None:
    # processors=[Redactor(redact_text=True)] with redact left True appended a default
    # Redactor() last, and only the last processor held back a stream's end: the deltas
    # joined to 'Hello use key sk-ant-ABCDEFGHIJKLMNOPQRSTUV and bye'; so too with any
    # processor after it (processors=[r, other], redact=False).
    redactor = Redactor(redact_text=True)
    events: list[ps.AgentEvent] = []
    options: dict[str, Any] = {
        "redact left True": {"processors": [ProcessorChain([redactor])]},
        "a processor after it": {"processors": [redactor, _upper], "redact": False},
    }[case]
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[events.append], config=SNAP, **options)
    chain = tracer.processors.processors
    if case == "redact left True":  # the default one after it, not holding back
        assert chain[0] is redactor and len(chain) == 2 and chain[1].redact_text is False  # type: ignore[attr-defined]
    else:
        assert chain == (redactor, _upper)
    with tracer.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
        for piece in ["Hello ", "use key sk-", "ant-", "ABCDEFGHIJKLMNOPQRSTUV", " and ", "bye"]:
            reply.text_delta(piece)
        reply.finish()
    expected = f"Hello use key {REDACTED} and bye"
    assert "".join(_streamed(events, "Text")) == (
        expected if case == "redact left True" else expected.upper()
    )


def test_a_redactor_of_your_own_keeps_the_default_one() -> None:
    # processors=[Redactor(patterns=[...])] with redact left True ran only yours for a
    # while (7c9ff0c): an Anthropic key in a tool argument reached every sink in clear.
    events: list[ps.AgentEvent] = []
    mine = Redactor(patterns=[r"PROJ-\d{6}"])
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[events.append], config=SNAP, processors=[mine])
    with tracer.loop() as loop, loop.turn() as turn:
        with turn.assistant() as reply:
            args = {"auth": "Bearer sk-ant-ABCDEFGHIJKLMNOPQRSTUV", "ticket": "PROJ-123456"}
            reply.finish(tool_calls=[ps.ToolCall(id="c1", name="call", arguments=args)])
        with turn.tool(turn.tool_calls[0]) as tool:
            tool.result("ok")
    (start,) = [e for e in events if isinstance(e, ps.ToolExecutionStart)]
    assert start.args == {"auth": f"Bearer {REDACTED}", "ticket": REDACTED}


class _Chain(ProcessorChain):
    """A chain of the user's own, running its processors otherwise (here: twice)."""

    def __call__(self, event: ps.AgentEvent) -> ps.AgentEvent | None:
        once = super().__call__(event)
        return None if once is None else super().__call__(once)


def test_a_subclass_of_processor_chain_runs_whole() -> None:
    calls: list[str] = []

    def count(event: ps.AgentEvent) -> ps.AgentEvent:
        calls.append(type(event).__name__)
        return event

    chain = _Chain([count])
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[lambda e: None], config=SNAP, processors=[chain])
    assert tracer.processors.processors[0] is chain
    with tracer.loop() as loop:
        loop.user("hi")
    assert calls and len(calls) % 2 == 0  # each event twice: its own __call__ ran


@pytest.mark.parametrize("twice", ["as redact too", "in processors", "in a nested chain"])
def test_a_redactor_given_twice_runs_once(twice: str) -> None:
    # In the chain twice, it held back the stream's end twice: the deltas came out
    # garbled ("Hello sk-use key ant-ABC...") with the key in them; so too in a chain
    # given in processors (a ProcessorChain is a processor).
    redactor = Redactor(redact_text=True)
    events: list[ps.AgentEvent] = []
    options: dict[str, Any] = {
        "as redact too": {"processors": [redactor], "redact": redactor},
        "in processors": {"processors": [redactor, redactor], "redact": False},
        "in a nested chain": {
            "processors": [ProcessorChain([ProcessorChain([redactor])])],
            "redact": redactor,
        },
    }[twice]
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[events.append], config=SNAP, **options)
    assert tracer.processors.processors == (redactor,)
    with tracer.loop() as loop, loop.turn() as turn, turn.assistant() as reply:
        for piece in ["Hello ", "use key sk-", "ant-", "ABCDEFGHIJKLMNOPQRSTUV", " and ", "bye"]:
            reply.text_delta(piece)
        reply.finish()
    [end] = [e for e in events if isinstance(e, ps.MessageEnd)]
    assert (
        "".join(_streamed(events, "Text"))
        == end.message.content[0].text
        == f"Hello use key {REDACTED} and bye"
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a+)+$",
        r"(\w+\s*)*=",
        r"(?:x|y+)+z",
        r"((a+)b?)+",
        re.compile(r"(a*)*$", re.IGNORECASE),
        # A bounded repeat, outside or inside, splits a run as many ways (for the outer,
        # polynomially many: (a+){1,2}$ on 3000 a's and a '!' took 78 s).
        r"(a+){1,100}$",
        r"(?:\w+\s?){1,64}=SECRET",
        r"(a+){0,1000}$",
        r"(a{1,30}){1,30}$",
        r"(a+){2}$",
        r"((a+){2})+$",
    ],
)
def test_a_pattern_repeating_a_repeat_is_refused(pattern: str | re.Pattern[str]) -> None:
    # Redactor(extra_patterns=[r"(a+)+$"]) and a tool argument "a" * 40 + "!" hung the
    # agent: re backtracks exponentially, in C, holding the GIL, with no timeout.
    with pytest.raises(
        ps.InvalidArgument, match=r"^secret pattern .* repeats a repeat \(as \(a\+\)\+ does\)"
    ):
        Redactor(extra_patterns=[pattern])
    with pytest.raises(ps.InvalidArgument, match="repeats a repeat"):
        Redactor(patterns=[pattern])


@pytest.mark.parametrize(
    "pattern",
    [
        r"(?:[a-z0-9]+-)+key",
        r"(\s*,)+",
        r"[a-z]+(?:\.[a-z]+)*@corp",
        r"(a|aa)+b",
        r"acct-\d{6}",
        r"(a+)?b",
        # Common secret and identifier shapes: a fixed count ({4}) matches one way only.
        r"base64:(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==)?",
        r"AKIA[0-9A-Z]{16}",
        r"(\w+\.)+\w+",
        r"(?:\d{1,3}\.){3}\d{1,3}",
        r"[a-z]+(-[a-z]+)*",
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
        r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
        r"eyJ[\w-]+\.[\w-]+\.[\w-]+",
        r"([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}",
    ],
)
def test_a_pattern_repeating_what_must_match_between_its_runs_is_taken(pattern: str) -> None:
    redactor = Redactor(patterns=[*redactor_module.DEFAULT_SECRET_PATTERNS, pattern])  # the defaults pass too
    assert redactor.redact_string("# " * 20 + "!") == "# " * 20 + "!"
