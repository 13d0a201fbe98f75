"""A nats-server of a test's own, for the tests that need a broker (`PrivateServer`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PrivateServer:
    """A nats-server of this test's own (so it can be stopped), on a free port."""

    def __init__(self, directory: Path, *, jetstream: bool = True, max_payload: int | None = None) -> None:
        server = shutil.which("nats-server")
        if server is None:
            pytest.skip("no nats-server binary")
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            self.port = free.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.command = [server, "-a", "127.0.0.1", "-p", str(self.port)]
        if jetstream:
            self.command += ["-js", "-sd", str(directory)]
        if max_payload is not None:  # (no command-line option for it)
            config = directory.with_name(f"{directory.name}.conf")
            config.write_text(f"max_payload: {max_payload}\n")
            self.command += ["-c", str(config)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not listening(self.port):
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None
