"""Session storage: one protocol, several backends.

`SessionStore` is the narrow interface every backend implements (sync methods and
``a``-prefixed async twins); `open_store(url)` picks a backend from a URL.
"""

from .base import SessionStore, SessionSummary, UsageTotal, merge_sessions, summarize

__all__ = ["SessionStore", "SessionSummary", "UsageTotal", "merge_sessions", "summarize"]
