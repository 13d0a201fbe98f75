"""Closing at interpreter exit what a program left open (`phi_session._exit`): no services needed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)
import workload  # noqa: E402


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_events_a_sink_takes_at_exit_are_spilled_into_its_open_journal(tmp_path: Path) -> None:
    """A spill journal registered its own exit hook after its sink's, so atexit (last in,
    first out) closed it first: an event given to the sink by an exit hook that ran in
    between found the journal closed."""
    pytest.importorskip("nats", reason="the nats extra is not installed")
    from phi_session.journal import read_records

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = free.getsockname()[1]
    script = (
        "import atexit, sys; sys.path.insert(0, sys.argv[1]); import workload\n"
        "from phi_session.broker import JetStreamSink\n"
        "events = list(workload.events(1, seed=15))\n"
        "sink = JetStreamSink(sys.argv[2], spill_dir=sys.argv[3], buffer=1, publish_timeout=0.2)\n"
        "# Runs after the spill journal's hook (registered later) and before the sink's.\n"
        "atexit.register(lambda: [sink(event) for event in events[-3:]])\n"
        "for event in events[:-3]:\n"
        "    sink(event)\n"
    )
    spill = tmp_path / "spill"
    done = _run(script, BENCHMARKS, f"nats://127.0.0.1:{dead}", str(spill))
    assert done.returncode == 0, done.stderr
    assert "cannot write the spill journal" not in done.stderr
    kept = [record.payload for episode in spill.iterdir() for record in read_records(episode)]
    assert len(kept) == workload.EVENTS_PER_SESSION


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_an_exit_hook_runs_in_its_own_process_only_and_not_once_cancelled() -> None:
    script = (
        "import os, sys\n"
        "from phi_session._exit import ExitHook\n"
        "ExitHook('kept', lambda: print('closed in', 'child' if os.getpid() != parent else 'parent'))\n"
        "ExitHook('cancelled', lambda: print('cancelled hook ran')).cancel()\n"
        "ExitHook('failing', lambda: 1 / 0)\n"
        "parent = os.getpid()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.exit(0)  # a normal exit: the child runs the exit hooks it inherited\n"
        "os.waitpid(child, 0)\n"
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["closed in parent"]
    assert "'failing': closing at interpreter exit failed" in done.stderr
    assert "ZeroDivisionError" in done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_an_exit_hook_made_in_a_multiprocessing_child_runs_once_as_the_child_ends() -> None:
    """A `multiprocessing` child (a `Process`, a `Pool`'s worker) leaves through
    ``os._exit`` once its target returns: no exit hook made there ran."""
    script = (
        "import multiprocessing, os, sys\n"
        "from phi_session._exit import ExitHook\n"
        "def made_in_child(tag):\n"
        "    ExitHook(tag, lambda: print('closed', tag, flush=True))\n"
        "    ExitHook('cancelled', lambda: print('cancelled hook ran', flush=True)).cancel()\n"
        "context = multiprocessing.get_context('fork')\n"
        "process = context.Process(target=made_in_child, args=('process',))\n"
        "process.start(); process.join()\n"
        "pool = context.Pool(1)\n"
        "pool.apply(made_in_child, ('pool worker',))\n"
        "pool.close(); pool.join()  # the worker exits as a process does\n"
        "child = os.fork()\n"
        "if child == 0:  # a plain fork's child exits normally: atexit and finalizers both run\n"
        "    made_in_child('forked')\n"
        "    sys.exit(0)\n"
        "os.waitpid(child, 0)\n"
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["closed process", "closed pool worker", "closed forked"]


_CTRL_C_AT_EXIT = """
import signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import workload
from phi_session.persist import AutoPersistingRecorder
from phi_session.stores.json_dir import JsonDirStore

class CtrlCAtFirstSave(JsonDirStore):
    pressed = False

    def save(self, session):
        if not self.pressed:  # the user presses Ctrl-C while the exit hook saves
            self.pressed = True
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.05)
        super().save(session)

journal = sys.argv[3] if len(sys.argv) > 3 else None
recorder = AutoPersistingRecorder(
    CtrlCAtFirstSave(sys.argv[2]), journal=journal, checkpoint_every=10**6, checkpoint_interval=None
)
recorder.record_all(workload.events(20, seed=3))
"""


@pytest.mark.parametrize("journaled", [False, True])
def test_a_ctrl_c_while_the_exit_hook_saves_says_in_one_line_what_is_left(
    tmp_path: Path, journaled: bool
) -> None:
    """A generic "Exception ignored in atexit callback" traceback, and nothing said about
    the sessions left unsaved."""
    from phi_session.persist import AutoPersistingRecorder
    from phi_session.stores.json_dir import JsonDirStore

    store, journal = tmp_path / "store", tmp_path / "j"
    done = _run(_CTRL_C_AT_EXIT, BENCHMARKS, str(store), *([str(journal)] if journaled else []))
    assert done.returncode == 0, done.stderr
    [line] = done.stderr.splitlines()
    kept = f"their events are kept in the journal {journal}, for recover" if journaled else "are lost"
    assert re.fullmatch(
        rf"AutoPersistingRecorder\(.*\): closing at interpreter exit was interrupted: "
        rf"up to \d+ sessions not saved into .*{re.escape(kept)}.*",
        line,
    ), line
    if journaled:  # nothing is lost: the next recorder on the journal saves the rest
        AutoPersistingRecorder(JsonDirStore(store), journal=journal).close()
        assert len(JsonDirStore(store).list_ids()) == 20


def test_an_exit_hook_interrupted_by_ctrl_c_logs_one_line_saying_what_is_left() -> None:
    script = (
        "from phi_session._exit import ExitHook\n"
        "def close():\n"
        "    raise KeyboardInterrupt\n"
        "ExitHook('recorder', close, lambda: '3 sessions not saved')\n"
        "ExitHook('journal', close)\n"
    )
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "'journal': closing at interpreter exit was interrupted",
        "'recorder': closing at interpreter exit was interrupted: 3 sessions not saved",
    ]
