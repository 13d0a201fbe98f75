"""`DaemonThread`: a background thread whose end can still be waited for after a Ctrl-C."""

from __future__ import annotations

import threading
from collections.abc import Callable


class DaemonThread:
    """Runs `target` in a daemon thread, started at once.

    Its end is an event set once `target` returns or raises, not `threading.Thread.join`:
    a join interrupted by Ctrl-C can mark the thread ended while it still runs (CPython
    gh-90882, on 3.11), so a `close` done again after the interrupt would go on at once,
    alongside the thread it means to wait for.
    """

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self._ended = threading.Event()
        self._target = target
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self._ended.set()

    def is_alive(self) -> bool:
        return not self._ended.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the thread ends, at most `timeout` seconds; whether it has."""
        return self._ended.wait(timeout)
