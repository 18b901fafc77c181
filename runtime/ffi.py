"""Open libtvm_ffi + libtvm_runtime with cffi (ABI mode) and call TVM functions through the C ABI."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import cffi
import numpy as np

from . import abi

_ffi = cffi.FFI()
_ffi.cdef(abi.CDEF)

_NUMPY_TO_DL = {
    np.dtype("int8"): (abi.DL_INT, 8),
    np.dtype("int16"): (abi.DL_INT, 16),
    np.dtype("int32"): (abi.DL_INT, 32),
    np.dtype("int64"): (abi.DL_INT, 64),
    np.dtype("uint8"): (abi.DL_UINT, 8),
    np.dtype("uint16"): (abi.DL_UINT, 16),
    np.dtype("uint32"): (abi.DL_UINT, 32),
    np.dtype("float16"): (abi.DL_FLOAT, 16),
    np.dtype("float32"): (abi.DL_FLOAT, 32),
    np.dtype("float64"): (abi.DL_FLOAT, 64),
    np.dtype("bool"): (abi.DL_BOOL, 8),
}
_DL_TO_NUMPY = {value: key for key, value in _NUMPY_TO_DL.items()}

FFI_LIBRARY = "libtvm_ffi.so"
RUNTIME_LIBRARY = "libtvm_runtime.so"

# Byte alignment TVM's generated code may assume for tensor data.
TENSOR_ALIGNMENT = 64


class TVMError(RuntimeError):
    """An error raised inside the TVM runtime, with its kind and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Object:
    """An owned reference to a TVM object; the reference is dropped when this is collected."""

    __slots__ = ("_lib", "handle", "type_index", "__weakref__")

    def __init__(self, lib: "RuntimeLibrary", handle: Any, type_index: int) -> None:
        self._lib = lib
        self.handle = handle
        self.type_index = type_index

    def release(self) -> None:
        if self.handle is not None and self._lib.c is not None:
            self._lib.c.TVMFFIObjectDecRef(self.handle)
        self.handle = None

    def __del__(self) -> None:  # pragma: no cover - timing depends on the collector
        try:
            self.release()
        except Exception:
            pass


class Function(Object):
    """A callable TVM function object."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        return self._lib.call(self, args)


class DataTypeArg:
    """A DLDataType argument (e.g. for tensor allocation)."""

    __slots__ = ("code", "bits", "lanes")

    def __init__(self, dtype: np.dtype) -> None:
        try:
            self.code, self.bits = _NUMPY_TO_DL[np.dtype(dtype)]
        except KeyError:
            raise TypeError(f"unsupported tensor dtype {dtype}") from None
        self.lanes = 1


class DeviceArg:
    """A DLDevice argument: (device type, device id)."""

    __slots__ = ("device_type", "device_id")

    def __init__(self, device_type: int, device_id: int) -> None:
        self.device_type = device_type
        self.device_id = device_id


class PointerArg:
    """An opaque pointer argument (an address)."""

    __slots__ = ("address",)

    def __init__(self, address: int) -> None:
        self.address = address


class RuntimeLibrary:
    """The TVM runtime: libtvm_ffi.so and libtvm_runtime.so, opened with dlopen."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = dict(paths)
        flags = _ffi.RTLD_NOW | _ffi.RTLD_GLOBAL
        # libtvm_ffi first and globally, so libtvm_runtime's references to it resolve.
        self.c = _ffi.dlopen(str(self.paths[FFI_LIBRARY]), flags)
        self._runtime = _ffi.dlopen(str(self.paths[RUNTIME_LIBRARY]), flags)
        self._globals: dict[str, Function] = {}

    # -- functions -------------------------------------------------------------------------
    def get_global(self, name: str) -> Function:
        """Return the registered global function ``name`` or raise TVMError."""
        if name not in self._globals:
            encoded = name.encode()
            keep = _ffi.new("char[]", encoded)
            byte_array = _ffi.new("TVMFFIByteArray*", {"data": keep, "size": len(encoded)})
            out = _ffi.new("TVMFFIObjectHandle*")
            self._check(self.c.TVMFFIFunctionGetGlobal(byte_array, out))
            if out[0] == _ffi.NULL:
                raise TVMError("LookupError", f"the TVM runtime has no global function {name!r}")
            self._globals[name] = Function(self, out[0], abi.FUNCTION)
        return self._globals[name]

    def call(self, func: Function, args: Sequence[Any]) -> Any:
        """Call ``func`` with Python values, tensors or objects and convert the result back."""
        keep: list[Any] = []
        c_args = _ffi.new("TVMFFIAny[]", max(len(args), 1))
        for slot, value in zip(c_args, args):
            self._set_arg(slot, value, keep)
        result = _ffi.new("TVMFFIAny*")
        self._check(self.c.TVMFFIFunctionCall(func.handle, c_args, len(args), result))
        return self._take_result(result)

    # -- tensors ---------------------------------------------------------------------------
    def tensor_from_numpy(self, array: np.ndarray) -> tuple[Object, list[Any]]:
        """Wrap ``array`` (aligned, C-contiguous) as a TVM tensor without copying.

        Returns the tensor and the cffi buffers that must outlive it.
        """
        try:
            code, bits = _NUMPY_TO_DL[array.dtype]
        except KeyError:
            raise TypeError(f"unsupported tensor dtype {array.dtype}") from None
        shape = _ffi.new("int64_t[]", list(array.shape) or [1])
        managed = _ffi.new("DLManagedTensor*")
        managed.dl_tensor.data = _ffi.cast("void*", array.ctypes.data)
        managed.dl_tensor.device.device_type = abi.DEVICE_CPU
        managed.dl_tensor.device.device_id = 0
        managed.dl_tensor.ndim = array.ndim
        managed.dl_tensor.dtype.code = code
        managed.dl_tensor.dtype.bits = bits
        managed.dl_tensor.dtype.lanes = 1
        managed.dl_tensor.shape = shape
        managed.dl_tensor.strides = _ffi.NULL
        managed.dl_tensor.byte_offset = 0
        managed.manager_ctx = _ffi.NULL
        managed.deleter = _ffi.NULL
        out = _ffi.new("TVMFFIObjectHandle*")
        self._check(self.c.TVMFFITensorFromDLPack(managed, TENSOR_ALIGNMENT, 1, out))
        return Object(self, out[0], abi.TENSOR), [shape, managed, array]

    def tensor_to_numpy(self, tensor: Object) -> np.ndarray:
        """Copy a CPU tensor object's contents into a new numpy array."""
        dl = abi.payload(_ffi, tensor.handle, "DLTensor*")
        if dl.device.device_type != abi.DEVICE_CPU:
            raise TVMError("ValueError", "only CPU tensors can be read back directly")
        key = (dl.dtype.code, dl.dtype.bits)
        if key not in _DL_TO_NUMPY or dl.dtype.lanes != 1:
            raise TVMError("TypeError", f"unsupported output dtype code={key[0]} bits={key[1]}")
        dtype = _DL_TO_NUMPY[key]
        shape = tuple(dl.shape[i] for i in range(dl.ndim))
        count = int(np.prod(shape, dtype=np.int64))
        if dl.strides != _ffi.NULL:
            expected = np.cumprod((1,) + shape[::-1][:-1])[::-1] if shape else ()
            if tuple(dl.strides[i] for i in range(dl.ndim)) != tuple(int(s) for s in expected):
                raise TVMError("ValueError", "non-contiguous output tensors are not supported")
        data = _ffi.cast("char*", dl.data) + dl.byte_offset
        buffer = _ffi.buffer(data, count * dtype.itemsize)
        return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape).copy()

    def tensor_info(self, tensor: Object) -> tuple[int, int, tuple[int, ...], np.dtype]:
        """(device type, device id, shape, dtype) of a tensor object."""
        dl = abi.payload(_ffi, tensor.handle, "DLTensor*")
        key = (dl.dtype.code, dl.dtype.bits)
        if key not in _DL_TO_NUMPY or dl.dtype.lanes != 1:
            raise TVMError("TypeError", f"unsupported output dtype code={key[0]} bits={key[1]}")
        shape = tuple(dl.shape[i] for i in range(dl.ndim))
        return dl.device.device_type, dl.device.device_id, shape, _DL_TO_NUMPY[key]

    # -- internals -------------------------------------------------------------------------
    def _set_arg(self, slot: Any, value: Any, keep: list[Any]) -> None:
        slot.zero_padding = 0
        if value is None:
            slot.type_index = abi.NONE
            slot.v_int64 = 0
        elif isinstance(value, Object):
            slot.type_index = value.type_index
            slot.v_obj = _ffi.cast("TVMFFIObject*", value.handle)
        elif isinstance(value, bool):
            slot.type_index = abi.BOOL
            slot.v_int64 = int(value)
        elif isinstance(value, (int, np.integer)):
            slot.type_index = abi.INT
            slot.v_int64 = int(value)
        elif isinstance(value, (float, np.floating)):
            slot.type_index = abi.FLOAT
            slot.v_float64 = float(value)
        elif isinstance(value, DataTypeArg):
            slot.type_index = abi.DATA_TYPE
            slot.v_uint64 = 0
            slot.v_dtype.code, slot.v_dtype.bits, slot.v_dtype.lanes = value.code, value.bits, value.lanes
        elif isinstance(value, DeviceArg):
            slot.type_index = abi.DEVICE
            slot.v_uint64 = 0
            slot.v_device.device_type, slot.v_device.device_id = value.device_type, value.device_id
        elif isinstance(value, PointerArg):
            slot.type_index = abi.OPAQUE_PTR
            slot.v_ptr = _ffi.cast("void*", value.address)
        elif isinstance(value, str):
            c_str = _ffi.new("char[]", value.encode())
            keep.append(c_str)
            slot.type_index = abi.RAW_STR
            slot.v_c_str = c_str
        else:
            raise TypeError(f"cannot pass {type(value).__name__} to a TVM function")

    def _take_result(self, result: Any) -> Any:
        index = result.type_index
        if index == abi.NONE:
            return None
        if index == abi.INT:
            return int(result.v_int64)
        if index == abi.BOOL:
            return bool(result.v_int64)
        if index == abi.FLOAT:
            return float(result.v_float64)
        if index == abi.SMALL_STR:
            return bytes(_ffi.buffer(result.v_bytes, result.zero_padding)).decode()
        if index == abi.SMALL_BYTES:
            return bytes(_ffi.buffer(result.v_bytes, result.zero_padding))
        if index in (abi.STR, abi.BYTES):
            obj = Object(self, result.v_obj, index)  # released when it goes out of scope
            data = abi.byte_array_payload(_ffi, obj.handle)
            return data.decode() if index == abi.STR else data
        if index >= abi.STATIC_OBJECT_BEGIN:
            cls = Function if index == abi.FUNCTION else Object
            return cls(self, result.v_obj, index)
        if index == abi.OPAQUE_PTR:
            return result.v_ptr
        raise TVMError("TypeError", f"unexpected TVM return type index {index}")

    def _check(self, status: int) -> None:
        if status == 0:
            return
        handle = _ffi.new("TVMFFIObjectHandle*")
        self.c.TVMFFIErrorMoveFromRaised(handle)
        if handle[0] == _ffi.NULL:
            raise TVMError("RuntimeError", f"TVM call failed with status {status}")
        cell = abi.payload(_ffi, handle[0], "TVMFFIErrorCellPrefix*")
        kind = bytes(_ffi.buffer(cell.kind.data, cell.kind.size)).decode(errors="replace")
        message = bytes(_ffi.buffer(cell.message.data, cell.message.size)).decode(errors="replace")
        self.c.TVMFFIObjectDecRef(handle[0])
        if status == -2:
            raise KeyboardInterrupt(message)
        raise TVMError(kind, message)


_loaded: dict[str, RuntimeLibrary] = {}
_lock = threading.Lock()


def _mapped_tvm_libraries() -> dict[str, Path]:
    """TVM runtime libraries this process has already mapped (e.g. by ``import tvm``)."""
    found: dict[str, Path] = {}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                name = os.path.basename(path)
                if name in (FFI_LIBRARY, RUNTIME_LIBRARY):
                    found[name] = Path(path)
    except OSError:
        pass
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_runtime(directory: Path, identity: str) -> RuntimeLibrary:
    """Open the runtime whose two libraries are in ``directory``, once per process.

    ``identity`` names the runtime build (a hash of its libraries). A process holds one TVM
    runtime: where the same build is already mapped (by the ``tvm`` package, say) that copy is
    reused; a different build raises RuntimeError.
    """
    with _lock:
        if identity in _loaded:
            return _loaded[identity]
        if _loaded:
            other = next(iter(_loaded))
            raise RuntimeError(
                f"this process already runs TVM runtime {other[:12]}; a bundle with runtime "
                f"{identity[:12]} needs a new process"
            )
        wanted = {name: Path(directory) / name for name in (FFI_LIBRARY, RUNTIME_LIBRARY)}
        mapped = _mapped_tvm_libraries()
        if mapped:
            for name, path in mapped.items():
                if _sha256(path) != _sha256(wanted[name]):
                    raise RuntimeError(
                        f"this process already loaded a different {name} ({path}, e.g. through "
                        "`import tvm`); run the bundle in a process without it, or package it "
                        "with the TVM version installed here"
                    )
            wanted.update(mapped)
        library = RuntimeLibrary(wanted)
        _loaded[identity] = library
        return library
