"""The one table of which event fields carry messages (`phi_session.events.MESSAGE_FIELDS`)."""

from __future__ import annotations

from typing import Any

import msgspec

import phi_session as ps
from phi_session.events import EVENT_TYPES, MESSAGE_FIELDS, MESSAGE_FIELDS_BY_TAG, MessageField, map_messages
from phi_session.messages import LLM_MESSAGE_TYPES, TextFormat

AGENT_ONLY = {ps.ExtensionMessage}  # only the agent-message form holds extension messages
MESSAGE_CLASSES = {*LLM_MESSAGE_TYPES, *AGENT_ONLY}


def message_classes(info: Any) -> tuple[set[type], bool]:
    """The message classes a field type holds directly, and whether it is a sequence of them."""
    inspect = msgspec.inspect
    many = isinstance(info, (inspect.TupleType, inspect.VarTupleType, inspect.ListType))
    if many:
        info = info.item_type
    options = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    found = {t.cls for t in options if isinstance(t, msgspec.inspect.StructType) and t.cls in MESSAGE_CLASSES}
    return found, many


def derived_table() -> dict[type, tuple[MessageField, ...]]:
    """MESSAGE_FIELDS as the event classes' own field types say it."""
    table = {}
    for event_type in EVENT_TYPES:
        fields = []
        for field in msgspec.inspect.type_info(event_type).fields:
            found, many = message_classes(field.type)
            if found:
                fields.append(MessageField(field.name, many=many, agent=bool(found & AGENT_ONLY)))
                continue
            if isinstance(field.type, msgspec.inspect.StructType):  # messages one level down
                for inner in field.type.fields:
                    found, many = message_classes(inner.type)
                    if found:
                        fields.append(
                            MessageField(
                                field.name, many=many, agent=bool(found & AGENT_ONLY), within=inner.name
                            )
                        )
        if fields:
            table[event_type] = tuple(fields)
    return table


def test_the_table_names_every_field_the_event_types_hold_messages_in() -> None:
    assert derived_table() == MESSAGE_FIELDS
    assert MESSAGE_FIELDS_BY_TAG == {tp.__name__: fields for tp, fields in MESSAGE_FIELDS.items()}


USER = ps.UserMessage(content=(ps.TextContent(text="hi"),), timestamp=1)
REPLY = ps.AssistantMessage(
    content=(ps.TextContent(text="ok"),),
    stop_reason="stop",
    model="m",
    provider="p",
    usage=ps.Usage(input=1, output=1),
    timestamp=2,
)
RESULT = ps.ToolResultMessage(tool_call_id="c", tool_name="n", content=(), is_error=False, timestamp=3)


def test_map_messages_reaches_each_form_and_keeps_what_it_does_not_change() -> None:
    payload = ps.AnnotatedRequestPayload(
        system_prompt="s",
        messages=(USER,),
        provenance=(),
        tools=(),
        model_id="m",
        thinking_level="off",
        response_format=TextFormat(),
    )
    at = ps.Timestamp.parse("2025-01-01T00:00:00Z")
    turn_end = ps.TurnEnd(
        loop_id="l", message=REPLY, usage=ps.Usage(input=1, output=1), tool_results=(RESULT,), timestamp=at
    )
    request = ps.TurnRequest(loop_id="l", turn_index=0, payload=payload, timestamp=at)
    seen: list[Any] = []

    def note(message: Any) -> Any:
        seen.append(message)
        return message

    assert map_messages(turn_end, note) is turn_end and seen == [REPLY, RESULT]
    seen.clear()
    assert map_messages(turn_end, note, agent=True) is turn_end and seen == [REPLY]
    seen.clear()
    assert map_messages(request, note, agent=True) is request and seen == []
    assert map_messages(request, note, agent=False) is request and seen == [USER]
    results_only = map_messages(
        turn_end, lambda m: m if m is REPLY else msgspec.structs.replace(m, timestamp=7)
    )
    assert results_only.message is REPLY and [m.timestamp for m in results_only.tool_results] == [7]
    both = map_messages(turn_end, lambda m: msgspec.structs.replace(m, timestamp=9))
    assert both.message.timestamp == 9 and [m.timestamp for m in both.tool_results] == [9]
    assert turn_end.message is REPLY and turn_end.tool_results == (RESULT,)
    stamped = map_messages(turn_end, lambda m: msgspec.structs.replace(m, timestamp=9), agent=False)
    assert stamped.message is REPLY and [m.timestamp for m in stamped.tool_results] == [9]
    renamed = map_messages(request, lambda m: msgspec.structs.replace(m, timestamp=9))
    assert renamed.payload.messages[0].timestamp == 9 and renamed.payload.system_prompt == "s"
    rejected = ps.InputRejected(loop_id="l", reason="r")
    assert map_messages(rejected, note) is rejected
