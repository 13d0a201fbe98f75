"""Shared test helpers: where phi-core's reference data lives."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _find_spec() -> Path:
    """phi-core's reference data: $PHI_SESSION_SPEC_DIR, else ../shared/spec next to the repo."""
    configured = os.environ.get("PHI_SESSION_SPEC_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "spec"


SPEC = _find_spec()
EXAMPLES = SPEC / "examples"
GOLDEN = SPEC / "golden"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if EXAMPLES.is_dir():
        return
    skip = pytest.mark.skip(reason=f"phi-core reference data not found at {SPEC} (set PHI_SESSION_SPEC_DIR)")
    for item in items:
        if "spec" in item.keywords:
            item.add_marker(skip)


class _NoKeyExportWarning(logging.Filter):
    """The OpenAI Agents SDK's default trace exporter warns, from its own thread whenever it
    flushes, that no OPENAI_API_KEY is set (the tests run without one): a record that a
    test of another module, asserting that nothing was logged, caught about once in four."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "OPENAI_API_KEY is not set, skipping trace export"


logging.getLogger("openai.agents").addFilter(_NoKeyExportWarning())


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int | None], None]]:
    """Sets RLIMIT_FSIZE (None: as it was): the kernel then fails writes past that size
    (EFBIG), as it does on a full disk (ENOSPC)."""
    resource = pytest.importorskip("resource")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous if size is None else (size, previous[1]))

    yield limit
    limit(None)
    signal.signal(signal.SIGXFSZ, handler)


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Nothing can be created under `root`, as on a read-only mount (which root's
    permissions do not stop, where a chmod would)."""
    mkdir, open_ = os.mkdir, os.open

    def refuse(path: Any) -> None:
        if isinstance(path, (str, os.PathLike)) and Path(path).is_relative_to(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def refused_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        refuse(path)
        mkdir(path, *args, **kwargs)

    def refused_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            refuse(path)
        return open_(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused_mkdir)
    monkeypatch.setattr(os, "open", refused_open)


def full_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Every write after the first `writes` fails as on a full disk."""
    done = 0
    for name in ("write", "writev"):
        real = getattr(os, name)

        def fail(fd: int, data: Any, real: Any = real) -> Any:
            nonlocal done
            done += 1
            if done > writes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        monkeypatch.setattr(os, name, fail)


def _status_of(work: Callable[[], object]) -> int:
    """In a forked child: run `work`; 0 if it returned, 1 if it raised (the traceback on stderr)."""
    try:
        work()
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def in_forked_child(work: Callable[[], object]) -> int:
    """Run `work` in a child made by ``os.fork()``; its exit status: 0 if `work` returned,
    1 if it raised (the traceback on stderr). The child never returns into pytest."""
    child = os.fork()
    if child == 0:
        os._exit(_status_of(work))
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


@contextlib.contextmanager
def idle_forked_child(work: Callable[[], object] = lambda: None) -> Iterator[None]:
    """A child made by ``os.fork()`` that runs `work`, then lives on, idle, until the block
    ends; its exit status (as `in_forked_child`'s) must then be 0."""
    ready, ready_w = os.pipe()
    done_r, done = os.pipe()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            status = _status_of(work)
        finally:
            os.write(ready_w, b"-")
            os.read(done_r, 1)
            os._exit(status)
    try:
        os.read(ready, 1)
        yield
    finally:
        os.write(done, b"-")
        status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        for fd in (ready, ready_w, done_r, done):
            os.close(fd)
    assert status == 0


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
