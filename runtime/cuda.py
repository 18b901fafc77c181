"""NVIDIA GPU support for the thin runtime: driver checks, the CUDA runtime library, and kernels.

A GPU bundle carries ``libcudart.so.13``, ``libtvm_runtime_cuda.so`` and its kernels compiled
on the host (one fatbin per CUDA source). TVM's CUDA module asks the global function
``tvm_callback_cuda_compile`` to compile its source when the library loads; edgeq registers a
function under that name that returns the bundled fatbin instead, so no compiler is needed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from .ffi import RuntimeLibrary, TVMError
from .ffi import _ffi as _tvm_ffi
from .globals import GlobalRegistry

DRIVER_LIBRARY = "libcuda.so.1"
CUDART_LIBRARY = "libcudart.so.13"
CUDA_RUNTIME_LIBRARY = "libtvm_runtime_cuda.so"
COMPILE_CALLBACK = "tvm_callback_cuda_compile"
# cuDriverGetVersion reports 1000 * major + 10 * minor of the newest CUDA the driver supports.
REQUIRED_DRIVER_CUDA = 13000
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76

_DRIVER_CDEF = """
int cuInit(unsigned int flags);
int cuDriverGetVersion(int* version);
int cuDeviceGetCount(int* count);
int cuDeviceGet(int* device, int ordinal);
int cuDeviceGetAttribute(int* value, int attribute, int device);
int cuDeviceGetName(char* name, int length, int device);
int cuGetErrorString(int error, const char** text);
"""


class CudaUnavailable(RuntimeError):
    """This machine cannot run a GPU bundle: no driver, no GPU, an old driver or a smaller chip."""


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]

    @property
    def arch(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True)
class DriverInfo:
    cuda_version: int  # e.g. 13000 for CUDA 13.0
    devices: tuple[GpuDevice, ...]

    @property
    def cuda_version_text(self) -> str:
        return f"{self.cuda_version // 1000}.{self.cuda_version % 1000 // 10}"


def probe_driver() -> DriverInfo:
    """Ask the NVIDIA driver what it supports and which GPUs it sees; CudaUnavailable if nothing."""
    ffi = cffi.FFI()
    ffi.cdef(_DRIVER_CDEF)
    try:
        driver = ffi.dlopen(DRIVER_LIBRARY)
    except OSError:
        raise CudaUnavailable(
            "no NVIDIA driver on this machine (libcuda.so.1 not found); this bundle runs only on "
            "an NVIDIA GPU and never falls back to the CPU: install the NVIDIA driver (R580 or "
            "newer), or package the model for this machine's CPU (`edgeq devices`)"
        ) from None

    def check(status: int, what: str) -> None:
        if status != 0:
            text = ffi.new("const char**")
            driver.cuGetErrorString(status, text)
            message = ffi.string(text[0]).decode() if text[0] != ffi.NULL else f"error {status}"
            if status == 100:  # CUDA_ERROR_NO_DEVICE
                raise CudaUnavailable("the NVIDIA driver sees no GPU on this machine (CUDA_ERROR_NO_DEVICE)")
            raise CudaUnavailable(f"the NVIDIA driver failed to {what}: {message} (CUresult {status})")

    version = ffi.new("int*")
    check(driver.cuDriverGetVersion(version), "report its version")
    check(driver.cuInit(0), "initialise")
    count = ffi.new("int*")
    check(driver.cuDeviceGetCount(count), "count the GPUs")
    devices = []
    for ordinal in range(count[0]):
        handle = ffi.new("int*")
        check(driver.cuDeviceGet(handle, ordinal), f"open GPU {ordinal}")
        major, minor = ffi.new("int*"), ffi.new("int*")
        check(driver.cuDeviceGetAttribute(major, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle[0]), "read the GPU")
        check(driver.cuDeviceGetAttribute(minor, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle[0]), "read the GPU")
        name = ffi.new("char[256]")
        check(driver.cuDeviceGetName(name, 256, handle[0]), "read the GPU's name")
        devices.append(GpuDevice(ordinal, ffi.string(name).decode(errors="replace"), (major[0], minor[0])))
    if not devices:
        raise CudaUnavailable("the NVIDIA driver sees no GPU on this machine")
    return DriverInfo(version[0], tuple(devices))


def _capability(arch: str) -> tuple[int, int]:
    digits = arch.removeprefix("sm_").rstrip("a")
    return int(digits[:-1]), int(digits[-1])


def pick_device(driver: DriverInfo, arch: str, device_id: int | None = None) -> GpuDevice:
    """The GPU to run kernels compiled for ``arch`` ("sm_90") on: the one asked for, else the first
    that can (same major version and at least the minor, or newer through the bundled PTX)."""
    if driver.cuda_version < REQUIRED_DRIVER_CUDA:
        raise CudaUnavailable(
            f"the NVIDIA driver supports CUDA {driver.cuda_version_text} but the bundle's runtime "
            f"needs CUDA {REQUIRED_DRIVER_CUDA // 1000}.0 (driver R580 or newer): update the driver"
        )
    need = _capability(arch)
    candidates = driver.devices if device_id is None else [d for d in driver.devices if d.index == device_id]
    if device_id is not None and not candidates:
        raise CudaUnavailable(f"there is no GPU {device_id}; this machine has {len(driver.devices)}")
    for device in candidates:
        if device.compute_capability >= need:
            return device
    found = ", ".join(f"{d.index}: {d.name} ({d.arch})" for d in candidates)
    raise CudaUnavailable(
        f"the bundle's kernels are compiled for {arch} and need a GPU of that generation or newer; "
        f"this machine has {found}: package again with the --device for this GPU (`edgeq devices`)"
    )


class KernelStore:
    """Compiled kernels by sha256 of their CUDA source, served to TVM through the compile callback."""

    def __init__(self) -> None:
        self._fatbins: dict[str, bytes] = {}
        self._registry: GlobalRegistry | None = None

    def add(self, key: str, fatbin: bytes) -> None:
        self._fatbins[key] = fatbin

    def fatbin_for(self, source: str | bytes) -> bytes:
        """The compiled kernels for a CUDA source (what TVM asks ``tvm_callback_cuda_compile`` for)."""
        data = source.encode() if isinstance(source, str) else bytes(source)
        key = hashlib.sha256(data).hexdigest()
        fatbin = self._fatbins.get(key)
        if fatbin is None:
            raise LookupError(
                f"the bundle carries no compiled kernels for CUDA source {key[:12]}; "
                "package the model again with this edgeq version"
            )
        return fatbin

    def install(self, runtime: RuntimeLibrary) -> None:
        """Register ``tvm_callback_cuda_compile`` in the runtime (once per process)."""
        if self._registry is None:
            registry = GlobalRegistry(runtime)
            registry.register(COMPILE_CALLBACK, self.fatbin_for)
            self._registry = registry


KERNELS = KernelStore()
_loaded_libraries: dict[str, Any] = {}


def enable_cuda(runtime: RuntimeLibrary, directory: Path, kernels: dict[str, bytes]) -> None:
    """Load the bundle's CUDA runtime libraries into ``runtime`` and make its kernels available."""
    directory = Path(directory)
    if CUDA_RUNTIME_LIBRARY not in _loaded_libraries:
        flags = _tvm_ffi.RTLD_NOW | _tvm_ffi.RTLD_GLOBAL
        for name in (CUDART_LIBRARY, CUDA_RUNTIME_LIBRARY):
            path = directory / name
            if not path.is_file():
                raise CudaUnavailable(f"the bundle has no {name}; package it again for the GPU device")
            try:
                _loaded_libraries[name] = _tvm_ffi.dlopen(str(path), flags)
            except OSError as error:
                raise CudaUnavailable(f"cannot load the bundle's {name}: {error}") from None
    for key, fatbin in kernels.items():
        KERNELS.add(key, fatbin)
    try:
        KERNELS.install(runtime)
    except TVMError as error:
        raise CudaUnavailable(f"cannot register the bundle's kernels with the TVM runtime: {error}") from None
