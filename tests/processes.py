"""A background command for the tests: its own process group, its output in a file."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


class Process:
    """A background command in its own process group, its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, ready: str, timeout: float = 30) -> None:
        self.log = log
        self.proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{' '.join(args)} did not start:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
