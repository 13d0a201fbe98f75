"""phi-session: record what LLM agents do, in phi-core's session format."""

from ._time import Timestamp
from .codec import decode_event, decode_loop, decode_session, encode, encode_event, encode_session
from .errors import DecodeError, InvalidSessionId, PhiSessionError, SessionLocked, SessionNotFound, StoreError
from .events import (
    COMPACTION,
    DEFAULT,
    INITIAL,
    AgentEnd,
    AgentEvent,
    AgentStart,
    CompactionEnded,
    CompactionStarted,
    ContinuationKind,
    InputRejected,
    LoopConfigSnapshot,
    MessageEnd,
    MessageStart,
    MessageUpdate,
    ParallelLoopEnd,
    ParallelLoopStart,
    ProgressMessage,
    PrunApplied,
    RevertApplied,
    SessionFormation,
    StreamDelta,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    TurnEnd,
    TurnRequest,
    TurnStart,
)
from .messages import (
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    ExtensionMessage,
    ImageContent,
    Message,
    TextContent,
    ThinkingContent,
    ToolCall,
    ToolDefinition,
    ToolResult,
    ToolResultMessage,
    TurnId,
    Usage,
    UserMessage,
    extension_message,
)
from .model import (
    ChildLoopRef,
    CompactionBlock,
    LoopEvent,
    LoopRecord,
    ParallelGroupRecord,
    Session,
    SpawnRef,
    Turn,
)

__version__ = "0.1.0"
