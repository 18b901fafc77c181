"""Run a compiled Relax VM library through the thin runtime binding."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import abi
from .ffi import TENSOR_ALIGNMENT, Function, Object, RuntimeLibrary

# Memory allocator the VM uses for intermediate tensors (2 = pooled).
POOLED_ALLOCATOR = 2
# runtime.config_threadpool affinity mode: threads float over all cores, no pinning.
THREADS_SHARE_ALL_CORES = -3


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is TENSOR_ALIGNMENT-byte aligned."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + TENSOR_ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % TENSOR_ALIGNMENT
    return raw[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)


def as_aligned(array: np.ndarray) -> np.ndarray:
    """Return ``array`` itself if it is aligned and contiguous, else an aligned copy."""
    if array.flags.c_contiguous and array.ctypes.data % TENSOR_ALIGNMENT == 0:
        return array
    out = aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


class RelaxVM:
    """A Relax virtual machine over one compiled library, on the CPU."""

    def __init__(self, runtime: RuntimeLibrary, library_path: Path, entry: str = "main") -> None:
        self._runtime = runtime
        load_module = runtime.get_global("ffi.ModuleLoadFromFile")
        get_function = runtime.get_global("ffi.ModuleGetFunction")
        self._library = load_module(str(library_path))
        load_executable = get_function(self._library, "vm_load_executable", True)
        if load_executable is None:
            raise RuntimeError(f"{library_path.name} is not a Relax VM library")
        self._vm = load_executable()
        init = get_function(self._vm, "vm_initialization", False)
        init(abi.DEVICE_CPU, 0, POOLED_ALLOCATOR)
        self._main: Function = get_function(self._vm, entry, False)
        if self._main is None:
            raise RuntimeError(f"{library_path.name} has no entry function {entry!r}")
        self._array_size = runtime.get_global("ffi.ArraySize")
        self._array_item = runtime.get_global("ffi.ArrayGetItem")

    def set_num_threads(self, num_threads: int) -> None:
        """Size the runtime's worker pool (process-wide; it can only shrink once started)."""
        self._runtime.get_global("runtime.config_threadpool")(THREADS_SHARE_ALL_CORES, int(num_threads))

    def num_threads(self) -> int:
        """Threads the runtime's worker pool runs now."""
        return int(self._runtime.get_global("runtime.NumThreads")())

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the entry function on numpy inputs and return the outputs as numpy arrays."""
        tensors: list[Object] = []
        keep: list[object] = []
        try:
            for array in inputs:
                tensor, buffers = self._runtime.tensor_from_numpy(as_aligned(array))
                tensors.append(tensor)
                keep.append(buffers)
            result = self._main(*tensors)
            return self._to_numpy_list(result)
        finally:
            for tensor in tensors:
                tensor.release()

    def _to_numpy_list(self, value: object) -> list[np.ndarray]:
        if not isinstance(value, Object):
            raise RuntimeError(f"unexpected model output {value!r}")
        try:
            if value.type_index == abi.TENSOR:
                return [self._runtime.tensor_to_numpy(value)]
            if value.type_index == abi.ARRAY:
                outputs: list[np.ndarray] = []
                for index in range(self._array_size(value)):
                    outputs.extend(self._to_numpy_list(self._array_item(value, index)))
                return outputs
            raise RuntimeError(f"unexpected model output of type index {value.type_index}")
        finally:
            value.release()
