"""The registry of deploy targets: one JSON file per device in ``deploy_targets/``."""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .errors import UnknownDeviceError, UnsupportedModelError

READY, DECLARED, UNSUPPORTED = "ready", "declared", "unsupported"


@dataclass(frozen=True)
class Device:
    """A deploy target: what to compile for and what the bundle needs on the board."""

    name: str
    description: str
    status: str  # "ready", "declared" (described, not yet buildable) or "unsupported"
    arch: str  # machine architecture as `uname -m` prints it: x86_64, aarch64
    kind: str  # "cpu" or "cuda"
    tvm_target: dict[str, Any] | None
    num_cores: int | None
    cpu_features: tuple[str, ...] = ()
    runtime_platform: str | None = None
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None
    unsupported_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Device":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["cpu_features"] = tuple(values.get("cpu_features") or ())
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def require_buildable(self) -> None:
        """Raise a clear error unless edgeq can package for this device today."""
        if self.status == UNSUPPORTED:
            raise UnknownDeviceError(f"device {self.name!r} is not supported: {self.unsupported_reason}")
        if self.status != READY:
            raise UnsupportedModelError(
                f"device {self.name!r} ({self.description}) is declared but edgeq cannot build "
                f"{self.kind} bundles for it yet; run `edgeq devices` for the ready ones"
            )

    @property
    def needs_cross_compiler(self) -> bool:
        return self.arch != host_arch()


def host_arch() -> str:
    """This machine's architecture in `uname -m` spelling (arm64 is reported as aarch64)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@lru_cache(maxsize=None)
def _registry() -> dict[str, Device]:
    devices = {}
    for entry in resources.files("edgeq.deploy_targets").iterdir():
        if entry.name.endswith(".json"):
            device = Device.from_dict(json.loads(entry.read_text()))
            devices[device.name] = device
    return devices


def list_devices() -> list[Device]:
    """Every registered device, sorted by name."""
    return [device for _, device in sorted(_registry().items())]


def get_device(name: str) -> Device:
    """Look up a device by name; unknown names get the list of known ones."""
    try:
        return _registry()[name]
    except KeyError:
        known = ", ".join(sorted(_registry()))
        raise UnknownDeviceError(f"unknown device {name!r}; known devices: {known}") from None
