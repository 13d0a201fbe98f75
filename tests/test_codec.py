"""Codec behaviour beyond the golden corpus: hand-written JSON and round-trip properties."""

from __future__ import annotations

import copy
import gc
import json
import pathlib
import pickle
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

import phi_session as ps
from phi_session.codec import decode_messages, encode_message
from phi_session.messages import ZERO_USAGE, extension_message
from phi_session.model import CompactedSection, CompactionBlock, LoopEvent, LoopRecord, Turn, TurnRange
from phi_session.stores.conformance import make_loop, make_session

from .conftest import EXAMPLES
from .strategies import any_event, messages, request_payload

LOOP = "s1.anthropic.claude.1"


def line(**fields: object) -> str:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def test_every_variant_round_trips_from_hand_written_json() -> None:
    usage = {"input": 1, "output": 2, "reasoning": 0, "cache_read": 0, "cache_write": 0, "total_tokens": 3}
    user = {"content": [{"text": "hi", "type": "text"}], "role": "user", "timestamp": 1}
    assistant = {
        "content": [{"arguments": {"a": 1}, "id": "t1", "name": "f", "type": "toolCall"}],
        "model": "m",
        "provider": "p",
        "role": "assistant",
        "stopReason": "toolUse",
        "timestamp": 2,
        "usage": dict(sorted(usage.items())),
    }
    plain_result = {
        "role": "toolResult",
        "toolCallId": "t1",
        "toolName": "f",
        "content": [{"type": "text", "text": "ok"}],
        "isError": False,
        "timestamp": 3,
    }
    ts = "2025-06-01T09:00:00.123456789Z"
    result = {"content": [{"type": "text", "text": "ok"}], "details": None}
    cases = [
        line(
            type="AgentStart",
            agent_id="a",
            session_id="s1",
            loop_id=LOOP,
            parent_loop_id=None,
            continuation_kind={"Rerun": {"tag": "x"}},
            timestamp=ts,
            metadata={"k": [1, 2]},
            config_snapshot={"model": "m", "provider": "p", "config_id": None, "temperature": 0.7},
        ),
        line(
            type="AgentEnd",
            loop_id=LOOP,
            messages=[user, assistant],
            usage=usage,
            timestamp=ts,
            rejection=None,
        ),
        line(type="TurnStart", loop_id=LOOP, turn_index=0, timestamp=ts, triggered_by="User"),
        line(
            type="TurnEnd",
            loop_id=LOOP,
            message=assistant,
            usage=usage,
            timestamp=ts,
            tool_results=[plain_result],
        ),
        line(type="MessageStart", loop_id=LOOP, message=user),
        line(type="MessageUpdate", loop_id=LOOP, message=user, delta={"Thinking": {"delta": "d"}}),
        line(type="MessageEnd", loop_id=LOOP, message={"role": "extension", "kind": "k", "data": None}),
        line(type="ToolExecutionStart", loop_id=LOOP, tool_call_id="t1", tool_name="f", args=None),
        line(
            type="ToolExecutionUpdate", loop_id=LOOP, tool_call_id="t1", tool_name="f", partial_result=result
        ),
        line(
            type="ToolExecutionEnd",
            loop_id=LOOP,
            tool_call_id="t1",
            tool_name="f",
            result={**result, "child_loop_id": "c.sub.1"},
            is_error=False,
            child_loop_id="c.sub.1",
        ),
        line(type="ProgressMessage", loop_id="", tool_call_id="t1", tool_name="f", text="50%"),
        line(type="InputRejected", loop_id=LOOP, reason="PII"),
        line(type="ParallelLoopStart", session_id="s1", loop_ids=["a", "b"], timestamp=ts),
        line(
            type="ParallelLoopEnd",
            session_id="s1",
            selected_loop_id="b",
            selected_config_index=1,
            evaluation_usage=usage,
            timestamp=ts,
        ),
        line(type="CompactionStarted", loop_id=LOOP, estimated_tokens=5, message_count=2, timestamp=ts),
        line(
            type="CompactionEnded",
            loop_id=LOOP,
            messages_before=4,
            messages_after=2,
            estimated_tokens_before=9,
            estimated_tokens_after=3,
            loops_compacted=1,
            timestamp=ts,
        ),
        line(
            type="PrunApplied",
            loop_id=LOOP,
            tokens_removed=1,
            messages_removed=1,
            memo=None,
            pruned_timestamps=[1],
            timestamp=ts,
        ),
        line(
            type="RevertApplied",
            loop_id=LOOP,
            category="tangent",
            target=None,
            abandoned_node_ids=[3],
            summary=None,
            applied=True,
            reason="r",
            timestamp=ts,
        ),
    ]
    seen = set()
    for text in cases:
        event = ps.decode_event(text)
        seen.add(type(event).__name__)
        assert ps.encode(event).decode() == text
    assert len(seen) == 18  # + TurnRequest, covered by the golden corpus


def test_aliases_nulls_and_unknown_fields_are_read_like_phi_core() -> None:
    event = ps.decode_event(
        '{"triggered_by":"FollowUp","type":"TurnStart","loop_id":"l","x":{"y":1},'
        '"turn_index":1,"timestamp":"2025-06-01T10:00:00+01:00"}'
    )
    assert event == ps.TurnStart(
        loop_id="l",
        turn_index=1,
        triggered_by="Continuation",
        timestamp=ps.Timestamp.parse("2025-06-01T09:00:00Z"),
    )
    start = ps.decode_event(
        '{"type":"AgentStart","agent_id":"a","session_id":"s","loop_id":"s.c.1",'
        '"timestamp":"2025-06-01T09:00:00Z","config_snapshot":null}'
    )
    assert isinstance(start, ps.AgentStart)
    assert start.continuation_kind == ps.INITIAL and start.parent_loop_id is None
    assert start.config_snapshot is msgspec.UNSET
    assert b"config_snapshot" not in ps.encode(start)


def test_decode_errors_name_the_field_path() -> None:
    with pytest.raises(ps.DecodeError, match=r"\$\.turn_index"):
        ps.decode_event(
            '{"type":"TurnStart","loop_id":"l","turn_index":-1,'
            '"timestamp":"2025-06-01T09:00:00Z","triggered_by":"User"}'
        )
    with pytest.raises(ps.DecodeError, match="timestamp"):
        ps.decode_event('{"type":"TurnStart","loop_id":"l","turn_index":0,"triggered_by":"User"}')
    with pytest.raises(ps.DecodeError, match=r"\$\.message"):
        ps.decode_event('{"type":"MessageEnd","loop_id":"l","message":{"role":"user"}}')
    with pytest.raises(ps.DecodeError):
        ps.decode_event("{not json")
    with pytest.raises(ps.DecodeError, match="AgentStart"):
        ps.decode_event('{"type":"Nope"}')


def test_lenient_message_metadata_is_dropped_not_fatal() -> None:
    event = ps.decode_event(
        '{"type":"MessageEnd","loop_id":"l","message":{"role":"user","content":[],'
        '"timestamp":5,"turnId":"broken","nodeId":-3,"tags":null}}'
    )
    assert isinstance(event, ps.MessageEnd)
    assert (
        ps.encode(event)
        == b'{"type":"MessageEnd","loop_id":"l","message":{"content":[],"role":"user","timestamp":5}}'
    )


def test_extension_message_with_any_role_round_trips() -> None:
    text = '{"type":"MessageEnd","loop_id":"l","message":{"role":"user","kind":"k","data":{"b":1,"a":2}}}'
    event = ps.decode_event(text)
    assert isinstance(event, ps.MessageEnd) and isinstance(event.message, ps.ExtensionMessage)
    assert event.message.role == "user"
    assert ps.encode(event).decode() == text.replace('{"b":1,"a":2}', '{"a":2,"b":1}')


def test_plain_positions_never_carry_agent_metadata() -> None:
    result = ps.ToolResultMessage(
        tool_call_id="t",
        tool_name="f",
        content=(),
        is_error=False,
        timestamp=1,
        turn_id=ps.TurnId(loop_id="l", turn_index=0),
    )
    event = ps.TurnEnd(
        loop_id="l",
        message=result,
        usage=ps.Usage(input=0, output=0),
        timestamp=ps.Timestamp.parse("2025-01-01T00:00:00Z"),
        tool_results=(result,),
    )
    encoded = ps.encode(event).decode()
    assert encoded.count("turnId") == 1  # in the agent-form message only


def test_a_missing_timestamp_is_an_error_for_every_decoder_and_constructor() -> None:
    # One rule, whoever decodes: phi-core requires the timestamp, nothing stamps "now".
    line = b'{"type":"AgentStart","agent_id":"a","session_id":"s","loop_id":"s.x.1"}'
    with pytest.raises(ps.DecodeError, match="timestamp"):
        ps.decode_event(line)
    with pytest.raises(msgspec.ValidationError, match="timestamp"):
        msgspec.json.Decoder(ps.AgentEvent).decode(line)  # a user's own decoder
    with pytest.raises(msgspec.ValidationError, match="timestamp"):
        msgspec.convert(msgspec.json.decode(line), ps.AgentStart)
    with pytest.raises(TypeError, match="timestamp"):
        ps.AgentStart(agent_id="a", session_id="s", loop_id="s.x.1")  # type: ignore[call-arg]
    start = ps.AgentStart(agent_id="a", session_id="s", loop_id="s.x.1", timestamp=ps.Timestamp.now())
    assert ps.decode_event(ps.encode(start)) == start


def test_rejects_non_text_input_type() -> None:
    with pytest.raises(TypeError):
        ps.decode_event(42)  # type: ignore[arg-type]


def test_a_memoryview_decodes_as_its_bytes() -> None:
    """The strict check read it with ``.decode``, which a memoryview lacks: AttributeError."""
    start = ps.AgentStart(agent_id="a", session_id="s", loop_id="s.x.1", timestamp=ps.Timestamp.now())
    data = ps.encode(start)
    event = ps.decode_event(data)
    assert ps.decode_event(memoryview(data)) == ps.decode_event(bytearray(data)) == event  # type: ignore[arg-type]
    with pytest.raises(ps.DecodeError):
        ps.decode_event(memoryview(b"{}"))  # type: ignore[arg-type]


def test_encoding_something_else_than_a_session_or_loop_is_a_type_error() -> None:
    """A loop given to encode_session raised AttributeError ('LoopRecord' has no 'loops')."""
    session = make_session("s1", loops=[make_loop("s1", 0)])
    record = session.loops[0]
    with pytest.raises(TypeError, match=r"^session must be Session, not LoopRecord$"):
        ps.encode_session(record)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^record must be LoopRecord, not Session$"):
        ps.codec.encode_loop(session)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(any_event)
def test_any_event_survives_encode_decode(event: ps.AgentEvent) -> None:
    data = ps.encode(event)
    again = ps.decode_event(data)
    assert ps.encode(again) == data
    assert ps.decode_event(data, strict=False) == again


@settings(max_examples=200, deadline=None)
@given(messages)
def test_agent_form_messages_have_sorted_keys_at_every_depth(message: ps.AgentMessage) -> None:
    def check(value: object) -> None:
        if isinstance(value, dict):
            assert list(value) == sorted(value)
            for inner in value.values():
                check(inner)
        elif isinstance(value, list):
            for inner in value:
                check(inner)

    tree = json.loads(encode_message(message))
    if isinstance(message, ps.ExtensionMessage):
        assert list(tree) == ["role", "kind", "data"]
        check(tree["data"])
    else:
        check(tree)


def test_enum_values_compare_by_value() -> None:
    assert ps.StreamDelta.text("x") == ps.StreamDelta.text("x") != ps.StreamDelta.text("y")
    assert ps.StreamDelta.text("x") != ps.StreamDelta.thinking("x")
    assert ps.ContinuationKind.rerun("a") != ps.ContinuationKind.rerun("b") != ps.DEFAULT
    assert len({ps.INITIAL, ps.ContinuationKind("Initial"), ps.DEFAULT}) == 2
    t = ps.Timestamp.parse("2025-06-01T09:00:00Z")
    assert ps.SessionFormation.first_loop(t) != ps.SessionFormation.explicit(t)
    with pytest.raises(AttributeError):
        ps.DEFAULT.kind = "Rerun"  # type: ignore[misc]


def test_a_bad_variant_is_an_invalid_argument_and_a_bad_type_a_type_error() -> None:
    """Each raised a bare ValueError, a wrong type included."""
    t = ps.Timestamp.parse("2025-06-01T09:00:00Z")
    for build, message in (
        (lambda: ps.ContinuationKind("bogus"), "unknown continuation kind 'bogus'"),
        (lambda: ps.ContinuationKind("Default", "tag"), "Default carries no tag"),
        (lambda: ps.ContinuationKind("Rerun"), "Rerun needs a string tag"),
        (lambda: ps.SessionFormation("bogus", t), "unknown session formation 'bogus'"),
        (lambda: ps.SessionFormation("FirstLoop", t, 5), "FirstLoop carries only a timestamp"),
        (lambda: ps.SessionFormation.inactivity_timeout(-1, None, t), "threshold_secs: expected an unsigned"),
        (lambda: ps.StreamDelta("bogus", "x"), "unknown stream delta kind 'bogus'"),
    ):
        with pytest.raises(ps.InvalidArgument, match=message):
            build()
    for build, message in (
        (lambda: ps.ContinuationKind.rerun(5), "^a Rerun tag must be str, not int$"),  # type: ignore[arg-type]
        (lambda: ps.ContinuationKind(5), "^a continuation kind must be str, not int$"),  # type: ignore[arg-type]
        (lambda: ps.SessionFormation(5, t), "^a session formation must be str, not int$"),  # type: ignore[arg-type]
        (lambda: ps.SessionFormation.inactivity_timeout("5", None, t), "threshold_secs"),  # type: ignore[arg-type]
        (lambda: ps.StreamDelta(5, "x"), "^a stream delta kind must be str, not int$"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=message):
            build()
    start = ps.AgentStart(agent_id="a", session_id="s", loop_id="s.x.1", timestamp=t)
    bad = ps.encode(start).replace(b'"Initial"', b'{"Rerun":{"tag":5}}')
    with pytest.raises(ps.DecodeError):  # in JSON, a bad type is still a decode error
        ps.decode_event(bad)


def _delta_line(delta: object) -> str:
    user = {"role": "user", "content": [{"type": "text", "text": "q"}], "timestamp": 1}
    return line(type="MessageUpdate", loop_id=LOOP, message=user, delta=delta)


@pytest.mark.parametrize("kind", ["Text", "Thinking", "ToolCallDelta"])
def test_a_stream_delta_is_written_and_read_in_phi_cores_externally_tagged_form(kind: str) -> None:
    delta = ps.StreamDelta(kind, "d")
    assert (delta.kind, delta.delta) == (kind, "d")
    for spelling in ({kind: {"delta": "d"}}, {kind: ["d"]}):  # phi-core also reads the array form
        decoded = ps.decode_event(_delta_line(spelling))
        assert isinstance(decoded, ps.MessageUpdate)
        assert decoded.delta == delta and decoded.delta.delta == "d"
        assert ps.encode_event(decoded) == ps.encode_event(replace(decoded, delta=delta))
        assert json.loads(ps.encode_event(decoded))["delta"] == {kind: {"delta": "d"}}
    assert ps.StreamDelta.from_json({kind: ["d"]}) == delta


@pytest.mark.parametrize(
    "spelling",
    [
        {},
        {"Text": {"delta": "a"}, "Thinking": {"delta": "b"}},
        {"Speech": {"delta": "a"}},
        "Text",
        {"Text": None},
        {"Text": {}},
        {"Text": {"delta": 1}},
    ],
)
def test_a_malformed_stream_delta_is_a_decode_error(spelling: object) -> None:
    with pytest.raises(ps.DecodeError, match=r"\$\.delta"):
        ps.decode_event(_delta_line(spelling))
    with pytest.raises(ValueError):
        ps.StreamDelta.from_json(spelling)


def test_a_stream_delta_holds_no_reference_the_cyclic_collector_tracks() -> None:
    # A recorder keeping every chunk holds one per streamed token: untracked, they cost
    # the collector nothing however many are kept.
    made = ps.StreamDelta.text("t")
    decoded = ps.decode_event(_delta_line({"Thinking": ["t"]}))
    assert isinstance(decoded, ps.MessageUpdate)
    assert not gc.is_tracked(made) and not gc.is_tracked(decoded.delta)


def test_a_stream_delta_keeps_its_constructor_and_python_protocols() -> None:
    delta = ps.StreamDelta("ToolCallDelta", '{"a"')
    assert delta == ps.StreamDelta.tool_call('{"a"') and hash(delta) == hash(ps.StreamDelta.tool_call('{"a"'))
    assert repr(delta) == "StreamDelta('ToolCallDelta', '{\"a\"')"
    assert pickle.loads(pickle.dumps(delta)) == delta == copy.deepcopy(delta)
    with pytest.raises(ps.InvalidArgument, match="unknown stream delta kind 'Speech'"):
        ps.StreamDelta("Speech", "x")
    with pytest.raises(TypeError, match="not int"):
        ps.StreamDelta("Text", 1)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        delta.Text = None


def test_a_history_resent_in_every_turn_request_is_encoded_once_per_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from phi_session import codec
    from phi_session.identity import AgentSession, FakeClock
    from phi_session.instrument import Tracer
    from phi_session.messages import TextFormat
    from phi_session.recorder import SessionRecorder

    recorder = SessionRecorder()
    tracer = Tracer(AgentSession(clock=FakeClock()), sinks=[recorder])
    with tracer.loop(config_id="p.m") as loop:
        loop.user("hi")
        for _ in range(4):
            payload = ps.AnnotatedRequestPayload(  # the loop's messages so far, stamped with their turns
                system_prompt="",
                messages=tuple(loop.messages),
                provenance=(),  # type: ignore[arg-type]
                tools=(),
                model_id="m",
                thinking_level="off",
                response_format=TextFormat(),
            )
            with loop.turn(request=payload) as turn:
                with turn.assistant() as reply:
                    reply.finish("ok")
    recorder.flush()
    [session] = recorder.drain_completed()
    expected = ps.encode(session)

    prepared: list[int] = []

    def counting(message: ps.Message) -> ps.Message:
        prepared.append(id(message))
        return plain_message(message)

    plain_message = codec._plain_message
    monkeypatch.setattr(codec, "_plain_message", counting)
    assert ps.encode(session) == expected
    # Each distinct message of the requests' histories is prepared (and encoded) once.
    assert len(prepared) == len(set(prepared)) == 4


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, max_size=4))
def test_decode_messages_reads_a_list_or_an_object_holding_one(listed: list[ps.AgentMessage]) -> None:
    array = b"[" + b",".join(encode_message(message) for message in listed) + b"]"
    assert decode_messages(array) == listed
    assert decode_messages(b'{"loop_id": "x", "messages": ' + array + b"}") == listed
    assert decode_messages(array.decode()) == listed


def test_decode_messages_rejects_what_is_no_message_list() -> None:
    for data in (b"[", b"[1]", b'{"loop_id": "x"}', b'"text"', b'[{"role": "user"}]'):
        with pytest.raises(ps.DecodeError):
            decode_messages(data)
    with pytest.raises(TypeError):
        decode_messages(1)  # type: ignore[arg-type]


# -- Encoding documents: each distinct message once, reused wherever the file repeats it ----

llm_messages = messages.filter(lambda m: not isinstance(m, ps.ExtensionMessage))


@st.composite
def shared_sessions(draw: st.DrawFn) -> ps.Session:
    """Sessions whose loops hold a few message objects in many places, as a recorded
    conversation does: histories resent in each request, streaming updates, records."""
    pool: list[ps.AgentMessage] = draw(st.lists(messages, min_size=1, max_size=4))
    plain_pool: list[ps.Message] = draw(st.lists(llm_messages, min_size=1, max_size=4))
    pick = st.sampled_from(pool)
    # A request resends the conversation so far (a prefix of it, the same objects), or
    # carries any messages.
    conversation = draw(st.lists(st.sampled_from(plain_pool), max_size=6).map(tuple))
    history = st.one_of(
        st.integers(min_value=0, max_value=len(conversation)).map(lambda n: conversation[:n]),
        st.lists(st.sampled_from(plain_pool), max_size=5).map(tuple),
    )
    stamp = ps.Timestamp.parse("2025-06-01T09:00:00Z")
    loops = []
    for index in range(draw(st.integers(min_value=1, max_value=2))):
        loop_id = f"loop-{index}"
        events: list[Any] = []
        for _ in range(draw(st.integers(min_value=0, max_value=6))):
            events.append(
                draw(
                    st.one_of(
                        st.builds(
                            ps.MessageUpdate,
                            loop_id=st.just(loop_id),
                            message=pick,
                            delta=st.just(ps.StreamDelta.text("d")),
                        ),
                        st.builds(ps.MessageEnd, loop_id=st.just(loop_id), message=pick),
                        st.builds(
                            ps.TurnRequest,
                            loop_id=st.just(loop_id),
                            turn_index=st.integers(0, 3),
                            payload=history.map(request_payload),
                            timestamp=st.just(stamp),
                        ),
                        st.builds(
                            ps.TurnEnd,
                            loop_id=st.just(loop_id),
                            message=pick,
                            usage=st.just(ZERO_USAGE),
                            timestamp=st.just(stamp),
                            tool_results=history,
                        ),
                        st.builds(
                            ps.AgentEnd,
                            loop_id=st.just(loop_id),
                            messages=st.lists(pick, max_size=3).map(tuple),
                            usage=st.just(ZERO_USAGE),
                            timestamp=st.just(stamp),
                        ),
                    )
                )
            )
        turns = [
            Turn(
                turn_id=ps.TurnId(loop_id=loop_id, turn_index=i),
                triggered_by="User",
                usage=ZERO_USAGE,
                input_messages=draw(st.lists(pick, max_size=3).map(tuple)),
                output_message=draw(pick),
                tool_results=draw(st.lists(pick, max_size=2).map(tuple)),
                started_at=stamp,
                ended_at=stamp,
                request_payload=draw(st.none() | history.map(request_payload)),
            )
            for i in range(draw(st.integers(min_value=0, max_value=2)))
        ]
        record = LoopRecord.start(loop_id=loop_id, session_id="s", agent_id="a", started_at=stamp)
        record.messages = draw(st.lists(pick, max_size=4))
        record.turns = turns
        record.events = [LoopEvent(sequence=i, event=e) for i, e in enumerate(events)]
        if draw(st.booleans()):
            section = CompactedSection(
                range=TurnRange(start_turn=0, end_turn=1),
                messages=draw(st.lists(pick, max_size=2).map(tuple)),
            )
            record.compaction_block = CompactionBlock(
                keep_recent=section, keep_compacted=section, created_at=stamp
            )
        loops.append(record)
    return ps.Session(
        session_id="s",
        agent_id="a",
        created_at=stamp,
        last_active_at=stamp,
        formation=ps.SessionFormation.first_loop(stamp),
        loops=loops,
    )


def _unshared_encoding(session: ps.Session) -> bytes:
    """The session encoded with every message written where it stands, nothing reused,
    through the decoders' own message walk (`map_loop_messages`)."""
    from phi_session import codec

    def written(message: ps.AgentMessage) -> msgspec.Raw:
        return msgspec.Raw(encode_message(message))

    loops = [
        codec.map_loop_messages(codec.without_plain_metadata(record), written) for record in session.loops
    ]
    data = msgspec.json.encode(replace(session, loops=loops), enc_hook=codec.json_form, order="deterministic")
    return msgspec.json.format(data, indent=2)


@settings(max_examples=150, deadline=None)
@given(shared_sessions())
def test_messages_encoded_once_give_the_bytes_of_each_written_where_it_stands(session: ps.Session) -> None:
    data = ps.encode(session)
    assert data == _unshared_encoding(session)
    assert msgspec.json.format(ps.encode(session, pretty=False), indent=2) == data
    assert ps.encode(ps.decode_session(data)) == data
    for record in session.loops:
        assert ps.encode(record) == ps.encode(ps.decode_loop(ps.encode(record)))


def _requests_session(message: ps.AgentMessage, **fields: Any) -> ps.Session:
    """A session of one loop (with record `fields`) whose three TurnRequests carry 0, 1 and
    2 copies of `message` as their history."""
    stamp = ps.Timestamp.parse("2025-06-01T09:00:00Z")
    record = LoopRecord.start(loop_id="l", session_id="s", agent_id="a", started_at=stamp)
    for name, value in fields.items():
        setattr(record, name, value)
    record.events = [
        LoopEvent(
            sequence=i,
            event=ps.TurnRequest(
                loop_id="l", turn_index=i, payload=request_payload((message,) * i), timestamp=stamp
            ),
        )
        for i in range(3)
    ]
    return ps.Session(
        session_id="s",
        agent_id="a",
        created_at=stamp,
        last_active_at=stamp,
        formation=ps.SessionFormation.first_loop(stamp),
        loops=[record],
    )


def test_a_message_changed_after_an_encode_is_written_changed_the_next_time() -> None:
    arguments: dict[str, Any] = {"path": "a.txt"}
    call = ps.AssistantMessage(
        content=(ps.ToolCall(id="c1", name="read", arguments=arguments),),
        stop_reason="toolUse",
        model="m",
        provider="p",
        usage=ZERO_USAGE,
        timestamp=1,
    )
    session = _requests_session(call, messages=[call, call])
    record = session.loops[0]
    before = ps.encode(session)
    assert before.count(b'"a.txt"') == 5
    arguments["path"] = "b.txt"  # a tool call's arguments are a mutable dict
    after = ps.encode(session)
    assert b'"a.txt"' not in after and after.count(b'"b.txt"') == 5
    assert after == _unshared_encoding(session)
    assert b'"b.txt"' in ps.encode(record.events[2].event) and b'"b.txt"' in ps.encode(record, pretty=False)


def test_documents_encoded_one_after_another_and_in_threads_give_their_own_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pretty documents are formatted from a buffer each thread writes over: a small
    # document after a big one, or one encoded while another thread encodes, must give
    # exactly its own bytes.
    import threading

    from phi_session import codec

    said = ps.UserMessage(content=(ps.TextContent(text="x" * 5000),), timestamp=1)
    big, small = _requests_session(said, messages=[said] * 40), _requests_session(said)
    expected = {id(big): _unshared_encoding(big), id(small): _unshared_encoding(small)}
    for session in (big, small, big, small):
        assert ps.encode(session) == expected[id(session)]

    failures: list[str] = []

    def encode_many(order: tuple[ps.Session, ...]) -> None:
        for _ in range(20):
            for session in order:
                if ps.encode(session) != expected[id(session)]:
                    failures.append("wrong bytes")

    orders = ((big, small), (small, big)) * 2
    threads = [threading.Thread(target=encode_many, args=(order,)) for order in orders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    monkeypatch.setattr(codec, "_SCRATCH_KEPT", 100)  # a buffer grown past this is let go
    assert ps.encode(big) == expected[id(big)]
    assert "buffer" not in codec._scratch.__dict__
    assert ps.encode(small) == expected[id(small)]


@pytest.mark.parametrize("where", ["metadata", "children", "history"])
def test_del_bytes_in_a_session_are_written_as_they_are(where: str) -> None:
    # The pretty form marks each request history with a DEL byte and finds the marks
    # again: a DEL of the document's own, before or after them, is not taken for one.
    text = "\x7f" if where != "history" else 'a\x7f"\x7f"'
    said = ps.UserMessage(content=(ps.TextContent(text=text),), timestamp=1)
    session = _requests_session(
        said,
        messages=[said],
        metadata={"note": "\x7f"} if where == "metadata" else None,
        children_loop_ids=["\x7f"] if where == "children" else [],
    )
    record = session.loops[0]
    data = ps.encode(session)
    assert data == _unshared_encoding(session)
    assert ps.encode(record) == msgspec.json.format(ps.encode(record, pretty=False), indent=2)


def test_a_store_can_write_its_own_form_of_each_message() -> None:
    from phi_session.codec import encode_loop, encode_loop_with, encode_plain_message

    call = ps.UserMessage(
        content=(ps.TextContent(text="hi"),), timestamp=1, turn_id=ps.TurnId(loop_id="l", turn_index=0)
    )
    stamp = ps.Timestamp.parse("2025-06-01T09:00:00Z")
    record = LoopRecord.start(loop_id="l", session_id="s", agent_id="a", started_at=stamp)
    record.messages = [call]
    record.events = [
        LoopEvent(
            sequence=0,
            event=ps.TurnRequest(
                loop_id="l", turn_index=0, payload=request_payload((call,)), timestamp=stamp
            ),
        )
    ]
    same = encode_loop_with(
        record,
        agent=lambda m: msgspec.Raw(encode_message(m)),
        plain=lambda m: msgspec.Raw(encode_plain_message(m)),
    )
    assert same == encode_loop(record, pretty=False)
    assert b"turnId" not in encode_plain_message(call) and b"turnId" in encode_message(call)
    marked = encode_loop_with(
        record, agent=lambda m: msgspec.Raw(b'"A"'), plain=lambda m: msgspec.Raw(b'"P"')
    )
    tree = json.loads(marked)
    assert tree["messages"] == ["A"] and tree["events"][0]["event"]["payload"]["messages"] == ["P"]


@pytest.mark.parametrize("value", [123, None, {"a": 1}, "text", [ps.TextContent(text="x")]])
def test_encode_refuses_what_is_no_session_loop_record_event_or_message(value: object) -> None:
    # It wrote any JSON value: bytes no decoder of phi-core's format reads back.
    with pytest.raises(TypeError, match="encode\\(\\) takes a Session, LoopRecord, event or message"):
        ps.encode(value)  # type: ignore[arg-type]


def test_the_encoders_of_one_kind_refuse_the_others() -> None:
    session = _requests_session(ps.UserMessage(content=(ps.TextContent(text="q"),), timestamp=1))
    with pytest.raises(TypeError, match="encode_event\\(\\) takes an event, not Session"):
        ps.encode_event(session)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="session must be Session, not LoopRecord"):
        ps.encode_session(session.loops[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pretty must be bool or None, not str"):
        ps.encode(session, pretty="no")  # type: ignore[arg-type]


def test_a_replayed_reply_says_so_in_a_key_phi_core_ignores_and_no_request_carries() -> None:
    """The mark was a NodeTag of kind "checkpoint": phi-core's revert mode pins such tags
    into the model's prompt, so a replayed session resumed there sent the mark to the model."""
    from phi_session.model import is_replayed, mark_replayed

    reply = mark_replayed(
        ps.AssistantMessage(
            content=(ps.TextContent(text="a"),),
            stop_reason="stop",
            model="m",
            provider="p",
            usage=ZERO_USAGE,
            timestamp=1,
        )
    )
    assert reply.tags == () and is_replayed(reply)
    data = encode_message(reply)
    assert b'"phiSessionReplayed":true' in data
    for strict in (True, False):
        event = ps.decode_event(ps.encode_event(ps.MessageEnd(loop_id="l", message=reply)), strict=strict)
        assert isinstance(event, ps.MessageEnd) and is_replayed(event.message)
    unmarked = ps.decode_event(
        b'{"type":"MessageEnd","loop_id":"l","message":' + data.replace(b"true", b"1") + b"}", strict=False
    )
    assert isinstance(unmarked, ps.MessageEnd) and not is_replayed(unmarked.message)  # not a bool: dropped
    assert b"phiSessionReplayed" not in ps.codec.encode_plain_message(reply)
    payload = ps.TurnEnd(
        loop_id="l", message=reply, usage=ZERO_USAGE, timestamp=ps.Timestamp.from_ns(0), tool_results=()
    )
    assert is_replayed(ps.decode_event(ps.encode_event(payload)).message)  # type: ignore[union-attr]


def test_inside_refusing_unwritable_the_encoders_raise_what_they_would_escape_or_clip() -> None:
    # How a store learns, as it encodes a session, that it must be saved as stores write it.
    from phi_session.codec import refusing_unwritable

    message = ps.UserMessage(content=(ps.TextContent(text="caf\udce9"),), timestamp=1)
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    note = ps.ExtensionMessage(kind="note", data={"d": deep})
    assert b"caf\\\\xed\\\\xb3\\\\xa9" in ps.encode(message)
    ps.encode(note)  # clipped
    with refusing_unwritable():
        with pytest.raises(UnicodeEncodeError):
            ps.encode(message)
        with pytest.raises(RecursionError):
            ps.encode(note)
    assert b"caf\\\\xed\\\\xb3\\\\xa9" in ps.encode(message)


_END_LINE = line(
    type="AgentEnd",
    loop_id=LOOP,
    messages=[],
    usage={"input": 7, "output": 3, "reasoning": 0, "cache_read": 0, "cache_write": 0, "total_tokens": 10},
    timestamp="2025-06-01T09:00:01Z",
    rejection=None,
)
_START_LINE = line(
    type="AgentStart",
    agent_id="a",
    session_id="s1",
    loop_id=LOOP,
    parent_loop_id=None,
    continuation_kind="Initial",
    timestamp="2025-06-01T09:00:00Z",
    metadata=None,
)


def _misfits(key: str) -> list[object]:
    """Values of another type than phi-session writes under its own `key`."""
    of_its_type = {"error": ("text",), "session_events": ([1],)}.get(key, ())  # [1]: events, one bad
    return [value for value in (None, 5, "text", {"code": 1}, [1]) if value not in of_its_type]


def _with(document: str | bytes, path: tuple[str | int, ...], key: str, value: object) -> str:
    tree = json.loads(document)
    node = tree
    for step in path:
        node = node[step]
    node[key] = value
    return json.dumps(tree)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("base", "key", "value"),
    [
        (base, key, value)
        for base, key in ((_END_LINE, "error"), (_START_LINE, "formation"))
        for value in _misfits(key)
    ],
)
def test_an_events_own_key_holding_another_type_is_read_as_absent_like_phi_core(
    base: str, key: str, value: object, strict: bool
) -> None:
    """phi-core does not know these keys and so ignores whatever they hold (spec §1.4);
    phi-session refused the whole event: an AgentEnd with "error": null was lost."""
    assert ps.decode_event(_with(base, (), key, value), strict=strict) == ps.decode_event(base)


@pytest.mark.spec
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        (path, key, value)
        for path, key in (
            ((), "rejected"),
            ((), "session_events"),
            (("loops", 0), "error"),
            (("loops", 0, "events", -1, "event"), "error"),  # the loop's AgentEnd
        )
        for value in _misfits(key)
    ],
)
def test_a_session_files_own_key_holding_another_type_is_read_as_absent_like_phi_core(
    path: tuple[str | int, ...], key: str, value: object, strict: bool
) -> None:
    basic = (EXAMPLES / "session-basic.json").read_bytes()
    expected = ps.encode_session(ps.decode_session(basic))
    assert ps.encode_session(ps.decode_session(_with(basic, path, key, value), strict=strict)) == expected
    if path[:2] == ("loops", 0):
        record = json.dumps(json.loads(basic)["loops"][0])
        loop = ps.decode_loop(_with(record, path[2:], key, value), strict=strict)
        assert ps.encode(loop) == ps.encode(ps.decode_loop(record))


def test_an_own_key_read_as_absent_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ps.codec, "_ignored_extension_keys", set())
    with caplog.at_level("WARNING", logger="phi_session.codec"):
        for _ in range(3):
            ps.decode_event(_with(_END_LINE, (), "error", None))
    (logged,) = caplog.records
    assert "AgentEnd.error" in logged.getMessage() and "null" in logged.getMessage()


def test_a_caller_built_event_with_its_own_key_of_another_type_is_still_refused() -> None:
    event = ps.decode_event(_END_LINE)
    with pytest.raises(TypeError, match=r"event\.error"):
        ps.codec.check_event_fields(replace(event, error=5))


def _parallel_session_events() -> tuple[dict[str, Any], list[Any]]:
    """The parallel example's session file and its ParallelLoopStart/End, as JSON trees."""
    events = [
        json.loads(text)
        for text in (EXAMPLES / "events-parallel.jsonl").read_text().splitlines()
        if '"type":"Parallel' in text
    ]
    return json.loads((EXAMPLES / "session-parallel.json").read_bytes()), events


@pytest.mark.spec
@pytest.mark.parametrize("strict", [True, False])
def test_a_bad_session_event_is_dropped_and_reported_each_time_the_good_ones_kept(
    strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A list of events is of the right type: one bad event dropped the whole list, the
    valid ParallelLoopStart too, logged once a process (later files lost theirs silently)."""
    session_file, events = _parallel_session_events()
    document = json.dumps(
        dict(session_file, session_events=[events[0], dict(events[1], selected_config_index=-1)])
    )
    with caplog.at_level("WARNING", logger="phi_session.codec"):
        for _ in range(2):
            session = ps.decode_session(document, strict=strict)
            assert session.session_events == [ps.decode_event(json.dumps(events[0]))]
    reports = [record.getMessage() for record in caplog.records]
    assert len(reports) == 2
    assert all(session.session_id in report and "session_events[1]" in report for report in reports)


@pytest.mark.spec
@pytest.mark.parametrize("strict", [True, False])
def test_session_events_are_each_read_as_decode_event_reads_one(strict: bool) -> None:
    """An event holding an extension message of an unusual role, which only the lenient
    reading takes, was no event there: the session's events were all lost on reading."""
    session_file, events = _parallel_session_events()
    session = ps.decode_session(json.dumps(session_file))
    end = replace(ps.decode_event(_END_LINE), messages=(extension_message("note", "k", {"x": 1}),))
    session.session_events = [ps.decode_event(json.dumps(events[0])), end]
    assert ps.decode_session(ps.encode_session(session), strict=strict) == session


_REPEATING = '{"a": 1, "a": 2}'  # of another type than any own key's, and a repeated key in it


def _holding(document: str | bytes, path: tuple[str | int, ...], key: str, raw: str) -> str:
    """`document` with the JSON text `raw` at `key` of the object at `path`."""
    return _with(document, path, key, "\0raw").replace('"\\u0000raw"', raw)


@pytest.mark.parametrize(("base", "key"), [(_END_LINE, "error"), (_START_LINE, "formation")])
def test_strict_decoding_lets_an_events_own_key_it_ignores_repeat_keys(base: str, key: str) -> None:
    """phi-core ignores the key, so what it holds; strict decoding refused the event."""
    assert ps.decode_event(_holding(base, (), key, _REPEATING)) == ps.decode_event(base)


@pytest.mark.spec
@pytest.mark.parametrize(
    ("path", "key", "raw"),
    [
        ((), "rejected", _REPEATING),
        ((), "session_events", _REPEATING),
        ((), "session_events", f"[{_REPEATING}]"),  # an item that is no event, dropped
        (("loops", 0), "error", _REPEATING),
        (("loops", 0, "events", -1, "event"), "error", _REPEATING),
    ],
)
def test_strict_decoding_lets_a_session_files_own_key_it_ignores_repeat_keys(
    path: tuple[str | int, ...], key: str, raw: str
) -> None:
    basic = (EXAMPLES / "session-basic.json").read_bytes()
    session = ps.decode_session(_holding(basic, path, key, raw))
    assert session.session_events in (msgspec.UNSET, [])
    assert replace(session, session_events=msgspec.UNSET) == ps.decode_session(basic)
    if path[:2] == ("loops", 0):
        record = json.dumps(json.loads(basic)["loops"][0])
        assert ps.decode_loop(_holding(record, path[2:], key, raw)) == ps.decode_loop(record)


@pytest.mark.spec
def test_strict_decoding_still_refuses_a_repeated_key_in_an_own_value_it_keeps() -> None:
    formation = '{"FirstLoop": {"timestamp": "2025-06-01T09:00:00Z", "timestamp": "2025-06-01T09:00:00Z"}}'
    with pytest.raises(ps.DecodeError, match=r"duplicate field `timestamp` - at `\$\.formation\.FirstLoop`"):
        ps.decode_event(_holding(_START_LINE, (), "formation", formation))
    session_file, events = _parallel_session_events()
    start = json.dumps(events[0])[:-1] + ', "type": "ParallelLoopStart"}'
    with pytest.raises(ps.DecodeError, match=r"duplicate field `type` - at `\$\.session_events\[0\]`"):
        ps.decode_session(_holding(json.dumps(session_file), (), "session_events", f"[{start}]"))


@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({1: "x"}, "args: a dict key of type int (1)"),
        ({"p": pathlib.Path("/x")}, "args['p']: a value of type PosixPath"),
        ({"deep": [{"k": object()}]}, "args['deep'][0]['k']: a value of type object"),
    ],
)
def test_a_free_form_value_json_cannot_hold_is_a_type_error_naming_it(
    tmp_path: pathlib.Path, args: dict[Any, Any], where: str
) -> None:
    """A session built by hand (not through `on_event`, which copies such values as JSON)
    holding tool arguments with a dict key that is no text, a Path or an object failed to
    encode with msgspec's bare error ("Only dicts with str keys are supported when `order`
    is not `None`", "cannot encode PosixPath"), naming nothing."""
    from phi_session.stores.json_dir import JsonDirStore

    start = ps.AgentStart(agent_id="a", session_id="s1", loop_id="s1-l1", timestamp=ps.Timestamp.from_ns(1))
    tool = ps.ToolExecutionStart(loop_id="s1-l1", tool_call_id="c", tool_name="read", args=args)
    recorder = ps.SessionRecorder()
    for event in (start, tool):
        recorder.on_checked_event(event)
    recorder.flush()
    (session,) = recorder.drain_completed()
    message = re.escape(f"Session.loops[0].events[1].event.{where} cannot be written as JSON")
    for encode in (lambda: ps.encode(session), lambda: ps.encode(session, pretty=False)):
        with pytest.raises(TypeError, match=message):
            encode()
    with pytest.raises(TypeError, match=message):
        JsonDirStore(tmp_path / "store").save(session)
