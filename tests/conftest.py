"""Shared test helpers: where phi-core's reference data lives."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

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
