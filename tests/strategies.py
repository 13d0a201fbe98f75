"""Hypothesis strategies for phi-core values."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

import phi_session as ps
from phi_session.events import (
    ContinuationKind,
    LoopConfigSnapshot,
    StreamDelta,
)
from phi_session.messages import NodeTag, SteeringBlock, TextFormat

text = st.text(max_size=20)
ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=12)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
timestamps = st.integers(min_value=0, max_value=4102444800 * 10**9).map(ps.Timestamp.from_ns)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | text
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != 0 or str(f) == "0.0"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
usage = st.builds(
    ps.Usage, input=u64, output=u64, reasoning=u64, cache_read=u64, cache_write=u64, total_tokens=u64
)
content = st.one_of(
    st.builds(ps.TextContent, text=text),
    st.builds(ps.ThinkingContent, thinking=text, signature=st.none() | text),
    st.builds(ps.ToolCall, id=ids, name=text, arguments=json_values),
    st.builds(ps.ImageContent, data=text, mime_type=st.just("image/png")),
)
contents = st.lists(content, max_size=3).map(tuple)
turn_ids = st.builds(ps.TurnId, loop_id=ids, turn_index=u32)
metadata = {
    "turn_id": st.none() | turn_ids,
    "node_id": st.none() | u64,
    "parent_id": st.none() | u64,
    "tags": st.lists(
        st.builds(
            NodeTag,
            kind=st.sampled_from(["lesson", "finding"]),
            text=text,
            created_at_turn=u32,
            abandoned_node_ids=st.lists(u64, max_size=2).map(tuple),
        ),
        max_size=2,
    ).map(tuple),
    "provenance_hint": st.none() | st.just(SteeringBlock()),
}
messages = st.one_of(
    st.builds(ps.UserMessage, content=contents, timestamp=u64, **metadata),
    st.builds(
        ps.AssistantMessage,
        content=contents,
        stop_reason=st.sampled_from(["stop", "toolUse"]),
        model=text,
        provider=text,
        usage=usage,
        timestamp=u64,
        error_message=st.none() | text,
        **metadata,
    ),
    st.builds(
        ps.ToolResultMessage,
        tool_call_id=ids,
        tool_name=text,
        content=contents,
        is_error=st.booleans(),
        timestamp=u64,
        **metadata,
    ),
    st.builds(
        ps.extension_message, role=st.sampled_from(["extension", "note", "user"]), kind=text, data=json_values
    ),
)
kinds = st.one_of(
    st.sampled_from([ps.INITIAL, ps.DEFAULT, ps.COMPACTION]),
    text.map(ContinuationKind.rerun),
    text.map(ContinuationKind.branch),
)
snapshots = st.builds(
    LoopConfigSnapshot,
    model=text,
    provider=text,
    config_id=st.none() | text,
    temperature=st.sampled_from([0.0, 0.2, 0.7, 1.0]).map(ps.events.Float32),
    context_window=u32,
)


def loop_events(loop_id: str) -> st.SearchStrategy[Any]:
    """Events of one loop other than AgentStart/AgentEnd."""
    return st.one_of(
        st.builds(
            ps.TurnStart,
            loop_id=st.just(loop_id),
            turn_index=u32,
            timestamp=timestamps,
            triggered_by=st.sampled_from(["User", "Continuation", "Branch", "SubAgent"]),
        ),
        st.builds(ps.MessageStart, loop_id=st.just(loop_id), message=messages),
        st.builds(ps.MessageEnd, loop_id=st.just(loop_id), message=messages),
        st.builds(
            ps.MessageUpdate, loop_id=st.just(loop_id), message=messages, delta=text.map(StreamDelta.text)
        ),
        st.builds(
            ps.ToolExecutionStart,
            loop_id=st.just(loop_id),
            tool_call_id=ids,
            tool_name=text,
            args=json_values,
        ),
        st.builds(ps.ProgressMessage, loop_id=st.just(loop_id), tool_call_id=ids, tool_name=text, text=text),
        st.builds(ps.InputRejected, loop_id=st.just(loop_id), reason=text),
        st.builds(
            ps.CompactionStarted,
            loop_id=st.just(loop_id),
            estimated_tokens=u64,
            message_count=u64,
            timestamp=timestamps,
        ),
        st.builds(
            ps.PrunApplied,
            loop_id=st.just(loop_id),
            tokens_removed=u64,
            messages_removed=u64,
            memo=st.none() | text,
            pruned_timestamps=st.lists(u64, max_size=2).map(tuple),
            timestamp=timestamps,
        ),
        st.builds(
            ps.RevertApplied,
            loop_id=st.just(loop_id),
            category=st.just("failure"),
            target=st.none() | u64,
            abandoned_node_ids=st.lists(u64, max_size=2).map(tuple),
            summary=st.none() | text,
            applied=st.booleans(),
            reason=st.none() | text,
            timestamp=timestamps,
        ),
    )


any_event = st.one_of(
    st.builds(
        ps.AgentStart,
        agent_id=ids,
        session_id=ids,
        loop_id=ids,
        parent_loop_id=st.none() | ids,
        continuation_kind=kinds,
        timestamp=timestamps,
        metadata=json_values,
        config_snapshot=st.none() | snapshots,
    ),
    st.builds(
        ps.AgentEnd,
        loop_id=ids,
        messages=st.lists(messages, max_size=2).map(tuple),
        usage=usage,
        timestamp=timestamps,
        rejection=st.none() | text,
    ),
    st.builds(
        ps.TurnEnd,
        loop_id=ids,
        message=messages,
        usage=usage,
        timestamp=timestamps,
        tool_results=st.lists(
            st.builds(
                ps.ToolResultMessage,
                tool_call_id=ids,
                tool_name=text,
                content=contents,
                is_error=st.booleans(),
                timestamp=u64,
            ),
            max_size=2,
        ).map(tuple),
    ),
    st.builds(
        ps.ToolExecutionEnd,
        loop_id=ids,
        tool_call_id=ids,
        tool_name=text,
        result=st.builds(ps.ToolResult, content=contents, details=json_values, child_loop_id=st.none() | ids),
        is_error=st.booleans(),
        child_loop_id=st.none() | ids,
    ),
    st.builds(
        ps.ParallelLoopStart,
        session_id=ids,
        loop_ids=st.lists(ids, max_size=3).map(tuple),
        timestamp=timestamps,
    ),
    st.builds(
        ps.ParallelLoopEnd,
        session_id=ids,
        selected_loop_id=ids,
        selected_config_index=u64,
        evaluation_usage=usage,
        timestamp=timestamps,
    ),
    ids.flatmap(loop_events),
)


def request_payload(history: tuple[ps.Message, ...]) -> ps.AnnotatedRequestPayload:
    """A minimal request payload carrying `history`."""
    return ps.AnnotatedRequestPayload(
        system_prompt="s",
        messages=history,
        provenance=(),
        tools=(),
        model_id="m",
        thinking_level="off",
        response_format=TextFormat(),
    )
