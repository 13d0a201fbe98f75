"""The README's examples run, and recording their JSONL file gives the same session files."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_session.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def test_instrumented_loop_example_round_trips_through_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    direct = tmp_path / "direct"
    monkeypatch.setattr(sys, "argv", ["instrument_loop.py", str(direct)])
    runpy.run_path(str(ROOT / "examples" / "instrument_loop.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "Completed 2 turns 922 tokens" in printed
    assert f"wrote {direct}/" in printed and f"wrote {direct}/events.jsonl" in printed
    replayed = tmp_path / "replayed"
    result = CliRunner().invoke(cli, ["record", str(direct / "events.jsonl"), "--dir", str(replayed)])
    assert result.exit_code == 0, result.output
    [original] = direct.glob("*.json")
    assert (replayed / original.name).read_bytes() == original.read_bytes()


def test_shipped_event_stream_records(tmp_path: Path) -> None:
    stream = ROOT / "examples" / "events.jsonl"
    result = CliRunner().invoke(cli, ["record", str(stream), "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.json"))) == 5


def test_readme_quick_start_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    code = readme[readme.index("```python\n", start) + len("```python\n") : readme.index("```\n", start + 20)]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "events.jsonl").write_bytes((ROOT / "examples" / "events.jsonl").read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quick start", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed
    assert all(line.split()[1] in ("Completed", "Rejected", "Aborted") for line in printed)
