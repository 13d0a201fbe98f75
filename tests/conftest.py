"""Shared test helpers: where phi-core's reference data lives."""

from __future__ import annotations

import os
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
