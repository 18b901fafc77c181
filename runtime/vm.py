"""Run a compiled Relax VM library through the thin runtime binding."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import abi
from .ffi import TENSOR_ALIGNMENT, DataTypeArg, DeviceArg, Function, Object, PointerArg, RuntimeLibrary

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
    """A Relax virtual machine over one compiled library, on the CPU or a GPU.

    For a GPU (``device_type`` 2, CUDA) inputs are copied into device tensors kept between runs
    and outputs are copied back to numpy arrays.
    """

    def __init__(
        self,
        runtime: RuntimeLibrary,
        library_path: Path,
        entry: str = "main",
        device_type: int = abi.DEVICE_CPU,
        device_id: int = 0,
    ) -> None:
        self._runtime = runtime
        self.device_type = device_type
        self.device_id = device_id
        self._device_inputs: dict[int, tuple[tuple[int, ...], np.dtype, Object]] = {}
        load_module = runtime.get_global("ffi.ModuleLoadFromFile")
        get_function = runtime.get_global("ffi.ModuleGetFunction")
        self._library = load_module(str(library_path))
        load_executable = get_function(self._library, "vm_load_executable", True)
        if load_executable is None:
            raise RuntimeError(f"{library_path.name} is not a Relax VM library")
        self._vm = load_executable()
        init = get_function(self._vm, "vm_initialization", False)
        if device_type == abi.DEVICE_CPU:
            init(abi.DEVICE_CPU, 0, POOLED_ALLOCATOR)
        else:  # the device, then the CPU that runs the VM's own code
            init(device_type, device_id, POOLED_ALLOCATOR, abi.DEVICE_CPU, 0, POOLED_ALLOCATOR)
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
        if self.device_type != abi.DEVICE_CPU:
            return self._run_on_device(inputs)
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

    def _run_on_device(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        copy_in = self._runtime.get_global("runtime.TVMTensorCopyFromBytes")
        tensors = []
        for index, array in enumerate(inputs):
            array = np.ascontiguousarray(array)
            tensor = self._device_input(index, array.shape, array.dtype)
            copy_in(tensor, PointerArg(array.ctypes.data), array.nbytes)
            tensors.append(tensor)
        return self._to_numpy_list(self._main(*tensors))

    def _device_input(self, index: int, shape: tuple[int, ...], dtype: np.dtype) -> Object:
        """The device tensor for input ``index``, allocated on first use and kept."""
        cached = self._device_inputs.get(index)
        if cached is not None and cached[0] == tuple(shape) and cached[1] == dtype:
            return cached[2]
        make_shape = self._runtime.get_global("ffi.Shape")
        alloc = self._runtime.get_global("runtime.TVMTensorAllocWithScope")
        tensor = alloc(make_shape(*shape), DataTypeArg(dtype), DeviceArg(self.device_type, self.device_id), None)
        self._device_inputs[index] = (tuple(shape), dtype, tensor)
        return tensor

    def _device_to_numpy(self, tensor: Object) -> np.ndarray:
        device_type, _, shape, dtype = self._runtime.tensor_info(tensor)
        if device_type == abi.DEVICE_CPU:
            return self._runtime.tensor_to_numpy(tensor)
        out = np.empty(shape, dtype)
        self._runtime.get_global("runtime.TVMTensorCopyToBytes")(tensor, PointerArg(out.ctypes.data), out.nbytes)
        return out

    def _to_numpy_list(self, value: object) -> list[np.ndarray]:
        if not isinstance(value, Object):
            raise RuntimeError(f"unexpected model output {value!r}")
        try:
            if value.type_index == abi.TENSOR:
                if self.device_type != abi.DEVICE_CPU:
                    return [self._device_to_numpy(value)]
                return [self._runtime.tensor_to_numpy(value)]
            if value.type_index == abi.ARRAY:
                outputs: list[np.ndarray] = []
                for index in range(self._array_size(value)):
                    outputs.extend(self._to_numpy_list(self._array_item(value, index)))
                return outputs
            raise RuntimeError(f"unexpected model output of type index {value.type_index}")
        finally:
            value.release()
