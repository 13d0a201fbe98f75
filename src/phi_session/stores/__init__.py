"""Session storage: one protocol, several backends.

`SessionStore` is the narrow interface every backend implements (sync methods and
``a``-prefixed async twins; `LoopStarts` an optional extension): `JsonDirStore`
(phi-core's directory of JSON files), `SqliteStore` (the default) and `PostgresStore`;
`open_store(url)` picks one from a URL. A store is asked with `SessionQuery` (listing),
`PruneCriteria` (deleting) and a usage grouping (`GroupBy`), each checked once when it
is built.
"""

from typing import TYPE_CHECKING, Any

from .base import LoopStarts, SessionStore, SessionSummary, UsageTotal, merge_sessions, summarize
from .json_dir import (
    JsonDirStore,
    delete_session,
    list_session_ids,
    load_session,
    load_sessions_for_agent,
    save_session,
)
from .outline import LoopOutline, SessionOutline
from .query import GroupBy, Order, PruneCriteria, SessionQuery

if TYPE_CHECKING:
    from .postgres import PostgresStore
    from .sqlite import SqliteStore
    from .urls import default_store, open_store

# Backends with heavier imports (sqlite3, psycopg) load on first use.
_LAZY = {
    "SqliteStore": "sqlite",
    "PostgresStore": "postgres",
    "open_store": "urls",
    "default_store": "urls",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "GroupBy",
    "JsonDirStore",
    "LoopOutline",
    "LoopStarts",
    "Order",
    "PostgresStore",
    "PruneCriteria",
    "SessionOutline",
    "SessionQuery",
    "SessionStore",
    "SessionSummary",
    "SqliteStore",
    "UsageTotal",
    "default_store",
    "delete_session",
    "list_session_ids",
    "load_session",
    "load_sessions_for_agent",
    "merge_sessions",
    "open_store",
    "save_session",
    "summarize",
]
