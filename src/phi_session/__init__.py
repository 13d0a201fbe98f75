"""phi-session: record what LLM agents do, in phi-core's session format.

The public API at a glance:

* events and messages (`phi_session.events`, `phi_session.messages`): phi-core's
  vocabulary as typed, frozen records;
* `SessionRecorder`: turns an event stream into `Session` -> `LoopRecord` -> `Turn`;
* `encode` / `decode_event` / `decode_session`: phi-core's JSON, byte for byte;
* stores (`JsonDirStore`, `SqliteStore`, `PostgresStore`, `open_store`,
  `default_store`): where sessions live.
"""

from typing import TYPE_CHECKING, Any

from ._float32 import Float32
from ._time import Timestamp
from .codec import decode_event, decode_loop, decode_session, encode, encode_event, encode_session
from .consume import ConsumeStats, consume
from .errors import (
    DecodeError,
    EventNotDurable,
    InstrumentationError,
    InvalidArgument,
    InvalidQuery,
    InvalidSessionId,
    InvalidStoreUrl,
    JournalLocked,
    LoopNotFound,
    NotAJournal,
    PhiSessionError,
    SessionLocked,
    SessionNotFound,
    SessionRefused,
    StoreClosed,
    StoredSessionUnusable,
    StoreError,
    UnwritableValue,
    UsedAfterFork,
)
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
from .identity import AgentSession, Clock, FakeClock, config_id_of
from .instrument import (
    CompactionScope,
    LoopScope,
    MessageScope,
    ParallelGroup,
    ToolScope,
    Tracer,
    TurnScope,
)
from .journal import Journal, JournaledRecorder, RecoveryError, RecoveryReport, recover
from .messages import (
    AgentMessage,
    AnnotatedRequestPayload,
    AssistantMessage,
    Content,
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
    LoopStatus,
    ParallelGroupRecord,
    Session,
    SessionScope,
    SpawnRef,
    Turn,
)
from .persist import AutoPersistingRecorder
from .processors import REDACTED, Processor, ProcessorChain, Redactor, withhold
from .recorder import OrphanEvent, SessionRecorder, SessionRecorderConfig
from .saver import SaveOutcome, SaveStats, SessionSaver
from .sinks import FanOut, JsonlSink, QueueSink, RecorderSink, Sink
from .stores.base import SessionStore, SessionSummary, UsageTotal
from .stores.json_dir import (
    JsonDirStore,
    delete_session,
    list_session_ids,
    load_session,
    load_sessions_for_agent,
    save_session,
)
from .stores.query import PruneCriteria, SessionQuery

if TYPE_CHECKING:
    from .stores.postgres import PostgresStore
    from .stores.sqlite import SqliteStore
    from .stores.urls import default_store, open_store

__version__ = "0.1.0"  # the only place: pyproject.toml reads it (hatch dynamic version)

# Backends with heavier imports (sqlite3, psycopg) load on first use, as in `phi_session.stores`.
_FROM_STORES = frozenset({"SqliteStore", "PostgresStore", "open_store", "default_store"})


def __getattr__(name: str) -> Any:
    if name not in _FROM_STORES:
        raise AttributeError(f"module 'phi_session' has no attribute {name!r}")
    from . import stores

    return getattr(stores, name)


__all__ = [
    "COMPACTION",
    "DEFAULT",
    "INITIAL",
    "REDACTED",
    "AgentEnd",
    "AgentEvent",
    "AgentMessage",
    "AgentSession",
    "AgentStart",
    "AnnotatedRequestPayload",
    "AssistantMessage",
    "AutoPersistingRecorder",
    "ChildLoopRef",
    "Clock",
    "CompactionBlock",
    "CompactionEnded",
    "CompactionScope",
    "CompactionStarted",
    "ConsumeStats",
    "Content",
    "ContinuationKind",
    "DecodeError",
    "EventNotDurable",
    "ExtensionMessage",
    "FakeClock",
    "FanOut",
    "Float32",
    "ImageContent",
    "InputRejected",
    "InstrumentationError",
    "InvalidArgument",
    "InvalidQuery",
    "InvalidSessionId",
    "InvalidStoreUrl",
    "Journal",
    "JournalLocked",
    "JournaledRecorder",
    "JsonDirStore",
    "JsonlSink",
    "LoopConfigSnapshot",
    "LoopEvent",
    "LoopNotFound",
    "LoopRecord",
    "LoopScope",
    "LoopStatus",
    "Message",
    "MessageEnd",
    "MessageScope",
    "MessageStart",
    "MessageUpdate",
    "NotAJournal",
    "OrphanEvent",
    "ParallelGroup",
    "ParallelGroupRecord",
    "ParallelLoopEnd",
    "ParallelLoopStart",
    "PhiSessionError",
    "PostgresStore",
    "Processor",
    "ProcessorChain",
    "ProgressMessage",
    "PrunApplied",
    "PruneCriteria",
    "QueueSink",
    "RecorderSink",
    "RecoveryError",
    "RecoveryReport",
    "Redactor",
    "RevertApplied",
    "SaveOutcome",
    "SaveStats",
    "Session",
    "SessionFormation",
    "SessionLocked",
    "SessionNotFound",
    "SessionQuery",
    "SessionRecorder",
    "SessionRecorderConfig",
    "SessionRefused",
    "SessionSaver",
    "SessionScope",
    "SessionStore",
    "SessionSummary",
    "Sink",
    "SpawnRef",
    "SqliteStore",
    "StoreClosed",
    "StoreError",
    "StoredSessionUnusable",
    "StreamDelta",
    "TextContent",
    "ThinkingContent",
    "Timestamp",
    "ToolCall",
    "ToolDefinition",
    "ToolExecutionEnd",
    "ToolExecutionStart",
    "ToolExecutionUpdate",
    "ToolResult",
    "ToolResultMessage",
    "ToolScope",
    "Tracer",
    "Turn",
    "TurnEnd",
    "TurnId",
    "TurnRequest",
    "TurnScope",
    "TurnStart",
    "UnwritableValue",
    "Usage",
    "UsageTotal",
    "UsedAfterFork",
    "UserMessage",
    "config_id_of",
    "consume",
    "decode_event",
    "decode_loop",
    "decode_session",
    "default_store",
    "delete_session",
    "encode",
    "encode_event",
    "encode_session",
    "extension_message",
    "list_session_ids",
    "load_session",
    "load_sessions_for_agent",
    "open_store",
    "recover",
    "save_session",
    "withhold",
]
