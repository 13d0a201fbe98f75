"""The failure accounting shared by the pluggable parts of the producer (sinks, processors)."""

from __future__ import annotations

import logging
import threading


class FailureTally:
    """Failures counted per component (a sink, a processor), the first of each logged once.

    A broken component usually fails on every event: logging each failure would flood
    the log, so the first failure of each component is logged at ERROR and the rest
    are only counted. `traceback` says whether that first ERROR record carries the
    traceback; without it the traceback is logged at DEBUG only, for components
    whose exception messages may quote what they were handling (a processor may be
    holding the very secret it was about to remove). Components are told apart by
    identity and reported by ``repr`` (`counts`). Thread-safe.
    """

    def __init__(self, logger: logging.Logger, kind: str, consequence: str, *, traceback: bool) -> None:
        self._logger = logger
        self._kind = kind
        self._consequence = consequence
        self._traceback = traceback
        self._lock = threading.Lock()
        # id(component) -> (component, count); the component is held so its id stays its own.
        self._counts: dict[int, tuple[object, int]] = {}

    def record(self, component: object, error: BaseException) -> None:
        """Count a failure of `component`; log it if it is the component's first."""
        with self._lock:
            _, count = self._counts.get(id(component), (component, 0))
            self._counts[id(component)] = (component, count + 1)
        if count:
            return
        self._logger.error(
            "%s %r failed with %s; %s (further failures are counted, not logged)",
            self._kind,
            component,
            type(error).__name__,
            self._consequence,
            exc_info=error if self._traceback else None,
        )
        if not self._traceback:
            self._logger.debug("%s %r failure", self._kind, component, exc_info=error)

    @property
    def counts(self) -> dict[str, int]:
        """Failures per component (by repr, in the order they first failed), for components
        that failed at least once; one whose repr an earlier one has is ``"{repr} #2"``,
        ``#3``..., so that no count hides another."""
        with self._lock:
            failed = list(self._counts.values())
        counts: dict[str, int] = {}
        for component, count in failed:
            key = shown = repr(component)
            number = 1
            while key in counts:
                number += 1
                key = f"{shown} #{number}"
            counts[key] = count
        return counts

    @property
    def total(self) -> int:
        with self._lock:
            return sum(count for _, count in self._counts.values())
