"""Every snippet of the README runs as written, in a fresh directory, and leaves what it says.

Each ```python and ```bash block runs in its own temporary directory holding a copy
of ``examples/`` (the README's paths are relative to a checkout). Three things are
not run: creating virtualenvs and installing packages (network; ``.ci/run`` runs the
install-and-test line itself), the development commands (the test suite, mypy, ruff,
benchmarks), and the viewer's fixed port, which becomes ``--port 0`` so parallel runs
cannot collide.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(python|bash)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"\bvenv\b|\bactivate\b|pip install|python -m pytest|^mypy\b|^ruff\b|benchmarks/")
SCRIPTS = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PHI_SESSION_STORE"}
    env["PATH"] = f"{SCRIPTS}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "100"
    return env


def _runnable(script: str) -> str:
    """`script` without the segments of its ``&&`` chains that install or develop."""
    lines = []
    for line in script.splitlines():
        kept = [part for part in line.split(" && ") if not NOT_RUN.search(part.strip().lstrip(". "))]
        if kept:
            lines.append(" && ".join(kept))
    return "\n".join(lines)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


def session_ids(location: Path) -> list[str]:
    store = SqliteStore(location) if location.suffix == ".db" else JsonDirStore(location)
    with store:
        return sorted(store.list_ids())


def check_leftovers(code: str, where: Path) -> None:
    """What each snippet says it leaves behind."""
    if "quickstart.db" in code:
        assert len(session_ids(where / ".phi-session" / "quickstart.db")) == 5
    if "tracer.close()" in code:
        assert len(session_ids(where / ".phi-session" / "sessions.db")) == 1
        assert (where / "events.jsonl").read_bytes().count(b"\n") > 5
    if "PhiCallbackHandler()" in code:
        assert session_ids(where / ".phi-session" / "sessions.db") == ["chat-42"]
    if "phi-session diff" in code:
        diff = json.loads((where / "diff.json").read_text(encoding="utf-8"))
        assert diff["diff"] == "loops" and diff["first_divergence"]["turn"] == 0
    if "AutoPersistingRecorder(" in code:
        assert len(session_ids(where / "sessions.db")) == 5
    if "phi-session record examples/events.jsonl" in code:
        assert len(session_ids(where / ".phi-session" / "sessions.db")) == 5
        assert (where / "run.jsonl").stat().st_size > 0 and (where / "both.json").stat().st_size > 0
        assert session_ids(where / "sessions") == ["9d3b7e21-46c8-4f0a-b5e9-71a2c8d4f6e3"]
        assert session_ids(where / "copy.db") == ["e7a14c9b-2d6f-4b83-a05e-9f3c1d8b2e76"]  # one removed
        assert len(session_ids(where / "demo-sessions")) == 3


def test_the_readme_has_the_snippets_this_test_knows() -> None:
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("python") >= 3 and kinds.count("bash") >= 4
    assert "shared/spec/wire-format.md" not in README  # cite what a reader can open


@pytest.mark.parametrize(("kind", "code"), BLOCKS, ids=[f"{kind}-{n}" for n, (kind, _) in enumerate(BLOCKS)])
def test_snippet_runs_and_leaves_what_it_says(workdir: Path, kind: str, code: str) -> None:
    if kind == "python":
        command = [sys.executable, "-c", code]
    else:
        script = _runnable(code)
        if not script.strip():
            pytest.skip("installs or develops only (run by .ci/run itself)")
        if "phi-session serve" in script:
            serve_and_check(workdir, script)
            return
        command = ["bash", "-euo", "pipefail", "-c", script]
    result = subprocess.run(command, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower(), result.stderr
    if kind == "python":
        check_shown_output(code, result.stdout)
    check_leftovers(code, workdir)


# A comment after a print that shows what it prints: a repr (``Cost(usd=0.1..., ...)``).
_SHOWN = re.compile(r"^\s*print\(.*\)\s+# (\[?[A-Z]\w*\(.*)$")


def check_shown_output(code: str, stdout: str) -> None:
    """What a snippet's comment says a print prints is what it prints, ``...`` standing
    for anything (each print of such a snippet prints one line)."""
    prints = [line for line in code.splitlines() if re.match(r"\s*print\(", line)]
    shown = [_SHOWN.match(line) for line in prints]
    if not any(shown):
        return
    printed = stdout.splitlines()
    assert len(printed) == len(prints), stdout
    for match, line in zip(shown, printed, strict=True):
        if match is not None:
            # The price table's version is the one installed, not the README's.
            comment, line = (_TABLE.sub("genai-prices N", text) for text in (match.group(1), line))
            pattern = ".*?".join(re.escape(part) for part in comment.split("..."))
            assert re.fullmatch(pattern, line), (comment, line)


_TABLE = re.compile(r"genai-prices \d+(\.\d+)*")


def serve_and_check(workdir: Path, script: str) -> None:
    """Run a snippet ending in ``phi-session serve`` until the viewer answers, then stop it."""
    script = re.sub(r"phi-session serve\b(?: --port \d+)?", "exec phi-session serve --port 0", script)
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"viewer on (http://\S+)", line)
            if match:
                with urllib.request.urlopen(match.group(1) + "api/sessions", timeout=30) as response:
                    assert response.status == 200 and response.read().count(b'"session_id"') == 3
                return
        pytest.fail(f"the viewer never started (exit {process.wait()})")
    finally:
        process.terminate()
        process.wait(timeout=30)
