"""Can this machine run a bundle? Architecture, CPU features and C library checks (device side)."""
from __future__ import annotations

import platform
from functools import lru_cache

from .devices import host_arch
from .errors import ArchitectureMismatchError
from .manifest import Manifest

# Linux AT_HWCAP bits on aarch64 (asm/hwcap.h) for the feature names /proc/cpuinfo uses.
_AARCH64_HWCAP = {"fp": 1 << 0, "asimd": 1 << 1, "asimddp": 1 << 20, "asimdhp": 1 << 10}
_AT_HWCAP = 16


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str] | None:
    """The CPU feature names of this machine, or None where they cannot be read."""
    if host_arch() == "aarch64":
        try:
            import cffi

            ffi = cffi.FFI()
            ffi.cdef("unsigned long getauxval(unsigned long type);")
            hwcap = ffi.dlopen(None).getauxval(_AT_HWCAP)
        except Exception:
            return None
        return frozenset(name for name, bit in _AARCH64_HWCAP.items() if hwcap & bit)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def glibc_version() -> tuple[int, ...] | None:
    """The running glibc version, or None on another C library."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def check_runs_here(manifest: Manifest) -> None:
    """Raise ArchitectureMismatchError unless this machine can run the bundle's native code."""
    target = manifest.target
    here = host_arch()
    if target.arch != here:
        raise ArchitectureMismatchError(
            f"this bundle was compiled for {target.arch} (device {target.device!r}) but this "
            f"machine is {here}; package the model again with --device for this machine "
            f"(`edgeq devices` lists them) or copy the bundle to a {target.arch} device"
        )
    floor = manifest.runtime.glibc_floor
    have = glibc_version()
    if floor and have is not None:
        need = tuple(int(part) for part in floor.split("."))
        if have < need:
            raise ArchitectureMismatchError(
                f"the bundle's TVM runtime needs glibc >= {floor} but this system has "
                f"{'.'.join(map(str, have))}; upgrade the OS (e.g. Raspberry Pi OS bookworm has 2.36)"
            )
    features = cpu_features()
    if features is not None:
        missing = [feature for feature in target.cpu_features if feature not in features]
        if missing:
            raise ArchitectureMismatchError(
                f"the bundle was compiled for {target.device!r}, which needs CPU features "
                f"{', '.join(missing)} that this CPU lacks; package again with a plainer device "
                f"(e.g. --device {target.arch}) for this machine"
            )
