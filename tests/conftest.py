"""Shared fixtures: paths to the read-only models and pictures in ``../shared``, the host CPU's flags,
random float weights for generated models."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """Return a path inside ``../shared`` or skip the test (or, called at import, the module) with a
    clear reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing: these tests need the shared models and pictures beside the repo",
                    allow_module_level=True)
    return path


def cpu_has(flag: str) -> bool:
    """Whether this machine's CPU lists ``flag`` (e.g. ``avx2``, ``avx512_vnni``) in /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and flag in cpuinfo.read_text().split()


def float_weights(builder: Any, rng: Any) -> Callable[..., int]:
    """``w(*shape, scale=0.3)``: a float32 constant of ``builder`` drawn from N(0, scale)."""

    def w(*shape: int, scale: float = 0.3) -> int:
        return builder.constant(rng.normal(0, scale, shape).astype("float32"))

    return w
