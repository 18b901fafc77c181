"""The edgeq error tree: every failure a user can cause is one of these, with the fix in the message."""
from __future__ import annotations


class EdgeqError(Exception):
    """Base class of every error edgeq raises on purpose."""


class UnknownDeviceError(EdgeqError):
    """The device name is not in the registry of deploy targets."""


class UnsupportedModelError(EdgeqError):
    """The model cannot be compiled: unknown format, unsupported ops, dynamic-range quantization."""


class BundleFormatError(EdgeqError):
    """The bundle is corrupt, tampered with, truncated or written by a newer edgeq."""


class ArchitectureMismatchError(EdgeqError):
    """The bundle was compiled for another architecture or a newer C library than this machine has."""


class MissingDependencyError(EdgeqError):
    """A host-side package or tool (TVM, the reference interpreter, a cross compiler) is missing."""


class InputError(EdgeqError):
    """An input picture or tensor cannot be read or does not fit the model."""


class RuntimeFailure(EdgeqError):
    """The TVM runtime reported an error while loading or running a library."""


class GpuUnavailableError(EdgeqError):
    """A GPU bundle cannot run here: no NVIDIA driver or GPU, a driver too old, or an older GPU
    than the bundle's kernels were compiled for. edgeq never falls back to the CPU silently."""


class RemoteError(EdgeqError):
    """Remote testing failed: no server, refused token, lost connection, timeout, wrong device."""
