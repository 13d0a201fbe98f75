"""Span names, attribute names and values: the one home of every OTel name we write or read.

The ``gen_ai.*`` names follow the OpenTelemetry semantic conventions for generative AI,
version `SEMCONV_VERSION` (status "Development"; they now live in their own repository and
the ``opentelemetry-semantic-conventions`` package marks its ``gen_ai`` constants
deprecated, hence our own constants). The ``phi.*`` names are ours: they carry what the
GenAI conventions lack (loop ids, continuation kinds, parallel groups, sub-agent links,
and with content capture the exact phi-core events), so our own export reads back losslessly.
"""

from __future__ import annotations

SEMCONV_VERSION = "1.44.0"  # every gen_ai name below is in opentelemetry-semantic-conventions 0.66b2
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
INSTRUMENTATION_SCOPE = "phi_session.otel"

# -- operations and span names ("{operation} {target}") -------------------------------------
OP_INVOKE_AGENT = "invoke_agent"
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"

# -- gen_ai.* (semantic conventions) -----------------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
LEGACY_SYSTEM = "gen_ai.system"  # read only: what producers wrote before provider.name
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
AGENT_NAME = "gen_ai.agent.name"
AGENT_ID = "gen_ai.agent.id"
CONVERSATION_ID = "gen_ai.conversation.id"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
USAGE_CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
USAGE_CACHE_WRITE_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
USAGE_REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_CALL_RESULT = "gen_ai.tool.call.result"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
# Read only: the older conventions' content, OpenAI's message format as JSON, on their events.
LEGACY_PROMPT = "gen_ai.prompt"
LEGACY_COMPLETION = "gen_ai.completion"
ERROR_TYPE = "error.type"

# -- OpenInference (read only) -------------------------------------------------------------------
OPENINFERENCE_SESSION_ID = "session.id"
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
OPENINFERENCE_TOOL_NAME = "tool.name"
OPENINFERENCE_MODEL_NAME = "llm.model_name"
OPENINFERENCE_AGENT_NAME = "agent.name"
OPENINFERENCE_PROVIDER = "llm.provider"
OPENINFERENCE_SYSTEM = "llm.system"
OPENINFERENCE_PROMPT_TOKENS = "llm.token_count.prompt"
OPENINFERENCE_COMPLETION_TOKENS = "llm.token_count.completion"
OPENINFERENCE_CACHE_READ_TOKENS = "llm.token_count.prompt_details.cache_read"  # inside prompt
OPENINFERENCE_CACHE_WRITE_TOKENS = "llm.token_count.prompt_details.cache_write"
OPENINFERENCE_REASONING_TOKENS = "llm.token_count.completion_details.reasoning"
OPENINFERENCE_INPUT_MESSAGES = "llm.input_messages"  # flattened: llm.input_messages.0.message.role...
OPENINFERENCE_OUTPUT_MESSAGES = "llm.output_messages"
OPENINFERENCE_TOOL_CALL_ID = "tool_call.id"
OPENINFERENCE_TOOL_PARAMETERS = "tool.parameters"
OPENINFERENCE_OUTPUT_VALUE = "output.value"
OPENINFERENCE_FINISH_REASON = "llm.finish_reason"
LEGACY_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"  # read only: before input_tokens
LEGACY_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"

# -- phi.* (ours) ---------------------------------------------------------------------------------
PHI_SESSION_ID = "phi.session.id"
PHI_LOOP_ID = "phi.loop.id"
PHI_PARENT_LOOP_ID = "phi.parent_loop.id"
PHI_LOOP_STATUS = "phi.loop.status"
PHI_CONTINUATION_KIND = "phi.continuation_kind"
PHI_CONTINUATION_TAG = "phi.continuation_tag"
PHI_CONFIG = "phi.config"  # the loop's config snapshot, phi-core JSON
PHI_TURN_INDEX = "phi.turn.index"
PHI_TURN_TRIGGER = "phi.turn.triggered_by"
PHI_TURN_UNFINISHED = "phi.turn.unfinished"  # a turn cut off before its TurnEnd (loop aborted)
PHI_TURN_REPLAYED = "phi.turn.replayed"  # a turn a replay served from its recording: no model call
# A turn of several model calls (an errored reply, then a fallback's), without content capture:
# each reply's provider, model, stop reason, time (ms) and usage (phi-core JSON), in order.
PHI_TURN_REPLIES = "phi.turn.replies"
PHI_TOOL_IS_ERROR = "phi.tool.is_error"
PHI_CHILD_LOOP_ID = "phi.child_loop.id"
PHI_CHILD_SESSION_ID = "phi.child_session.id"
PHI_PARALLEL_LOOP_IDS = "phi.parallel.loop_ids"
PHI_PARALLEL_SELECTED = "phi.parallel.selected"
PHI_PARALLEL_SELECTED_LOOP = "phi.parallel.selected_loop_id"
PHI_PARALLEL_CONFIG_INDEX = "phi.parallel.selected_config_index"
PHI_PARALLEL_EVALUATION_USAGE = "phi.parallel.evaluation_usage"  # phi-core JSON
PHI_EVENTS = "phi.events"  # with content capture: [[sequence, event], ...] as phi-core JSON
# With content capture, on a loop span without AgentEnd: the usage (phi-core JSON) that the
# AgentEnd ingest makes up for it reports (gen_ai.usage.* count what was billed, without the
# replayed turns, which such a usage counts).
PHI_LOOP_USAGE = "phi.loop.usage"
# The span's usage (phi-core JSON) when a count of gen_ai.usage.* is past OTLP's int64 (there
# clamped to it): phi-core's counts are u64, and the conventions' input tokens add the cached.
PHI_USAGE = "phi.usage"
PHI_LINK_KIND = "phi.link.kind"
LINK_CONTINUATION = "continuation"
LINK_PARALLEL = "parallel"

# -- span events ---------------------------------------------------------------------------------
# Read only: a model call's messages (gen_ai.input/output.messages) when not on its span.
EVENT_OPERATION_DETAILS = "gen_ai.client.inference.operation.details"
EVENT_LEGACY_PROMPT = "gen_ai.content.prompt"  # the older conventions' (LEGACY_PROMPT)
EVENT_LEGACY_COMPLETION = "gen_ai.content.completion"  # (LEGACY_COMPLETION)
EVENT_COMPACTION_STARTED = "phi.compaction.started"
EVENT_COMPACTION_ENDED = "phi.compaction.ended"
EVENT_PRUN = "phi.prun_applied"
EVENT_REVERT = "phi.revert_applied"
EVENT_INPUT_REJECTED = "phi.input_rejected"
EVENT_PROGRESS = "phi.progress"
