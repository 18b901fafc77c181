"""An emulated Raspberry Pi for tests: Debian bookworm arm64 python3 under qemu-aarch64.

``ensure_aarch64_root()`` builds (once, then cached) the root with ``build_aarch64_root.sh``
and skips the calling test when this machine cannot (no apt-get, no root); ``aarch64_python``
gives the command prefix that runs the emulated ``python3``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["BUILD_SCRIPT", "DEFAULT_ROOT", "aarch64_python", "ensure_aarch64_root", "run_aarch64_python"]

BUILD_SCRIPT = Path(__file__).resolve().with_name("build_aarch64_root.sh")
DEFAULT_ROOT = BUILD_SCRIPT.parents[2] / ".cache" / "aarch64-root"
SKIP_STATUS = 77  # the script's "cannot build here" exit status

# root -> the built root, the reason to skip, or ("fail", reason)
_outcome: dict[Path, Path | str | tuple[str, str]] = {}


def _default_root() -> Path:
    """``$EDGEQ_AARCH64_ROOT`` if set (e.g. a CI cache folder), else ``<repo>/.cache/aarch64-root``."""
    env = os.environ.get("EDGEQ_AARCH64_ROOT")
    return Path(env).expanduser().resolve() if env else DEFAULT_ROOT


def aarch64_python(root: Path) -> list[str] | None:
    """Command prefix running the emulated python3 in ``root``; None if not built or no qemu."""
    wrapper = Path(root) / "run-python"
    if not ((Path(root) / ".edgeq-stamp").is_file() and os.access(wrapper, os.X_OK)):
        return None
    if not (shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")):
        return None
    return [str(wrapper)]


def ensure_aarch64_root(root: Path | None = None) -> Path:
    """Build or reuse the emulated root (once per session); skip the test if it cannot be built."""
    root = Path(root).resolve() if root is not None else _default_root()
    if root not in _outcome:
        if not sys.platform.startswith("linux") or shutil.which("bash") is None:
            _outcome[root] = "the emulated Raspberry Pi needs Linux with bash, apt-get and qemu-user"
        else:
            proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(root)], capture_output=True, text=True)
            log = (proc.stdout + proc.stderr).strip()
            if proc.returncode == SKIP_STATUS:
                _outcome[root] = f"cannot build the emulated Raspberry Pi: {log.splitlines()[-1]}"
            elif proc.returncode != 0:
                tail = "\n".join(log.splitlines()[-30:])
                _outcome[root] = ("fail", f"{BUILD_SCRIPT.name} {root} failed (exit {proc.returncode}):\n{tail}")
            elif aarch64_python(root) is None:
                _outcome[root] = f"{root} was built but qemu-aarch64 is not on PATH"
            else:
                _outcome[root] = root
    outcome = _outcome[root]
    if isinstance(outcome, tuple):
        pytest.fail(outcome[1])
    if isinstance(outcome, str):
        pytest.skip(outcome)
    return outcome


def run_aarch64_python(
    root: Path, args: list[str], *, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the emulated python3 with ``args``; fail the test with its output if it exits non-zero."""
    prefix = aarch64_python(root)
    if prefix is None:
        pytest.skip(f"no emulated python in {root}")
    proc = subprocess.run(prefix + args, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        pytest.fail(f"emulated python {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
