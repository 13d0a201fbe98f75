"""Shared test helpers: where phi-core's reference data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SPEC = Path(os.environ.get("PHI_SESSION_SPEC_DIR", Path(__file__).resolve().parents[2] / "shared" / "spec"))
EXAMPLES = SPEC / "examples"
GOLDEN = SPEC / "golden"


def require_spec() -> None:
    if not EXAMPLES.is_dir():
        pytest.skip(f"phi-core reference data not found at {SPEC} (set PHI_SESSION_SPEC_DIR)")
