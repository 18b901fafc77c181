"""Register Python callables as global TVM functions, through the tvm-ffi C ABI (device side).

Used by ``edgeq serve`` (the RPC server's hooks) and by GPU bundles (the CUDA kernel callback).
"""
from __future__ import annotations

from typing import Any, Callable

import cffi

from ..errors import EdgeqError
from . import abi
from .ffi import FFI_LIBRARY
from .ffi import _ffi as runtime_ffi


class GlobalRegistry:
    """Registers Python callables as global TVM functions (ints, floats, str and bytes in/out)."""

    def __init__(self, runtime: Any) -> None:
        self._abi = abi
        self._runtime = runtime
        self.ffi = cffi.FFI()
        self.ffi.cdef(abi.CDEF)
        self.c = self.ffi.dlopen(str(runtime.paths[FFI_LIBRARY]), self.ffi.RTLD_NOW | self.ffi.RTLD_GLOBAL)
        self._keep: list[Any] = []

    def register(self, name: str, func: Callable[..., Any]) -> None:
        ffi = self.ffi

        def safe_call(_handle: Any, args: Any, num_args: int, result: Any) -> int:
            try:
                values = [self._from_any(args[i]) for i in range(num_args)]
                self._to_any(func(*values), result)
                return 0
            except BaseException as error:  # noqa: BLE001 - every error must cross the C ABI
                kind = "ValueError" if isinstance(error, EdgeqError) else "RuntimeError"
                message = f"edgeq: {error}" if str(error) else f"edgeq: {type(error).__name__}"
                self.c.TVMFFIErrorSetRaisedFromCStr(kind.encode(), message.encode(errors="replace"))
                return -1

        callback = ffi.callback("int(void*, const TVMFFIAny*, int32_t, TVMFFIAny*)", safe_call)
        out = ffi.new("TVMFFIObjectHandle*")
        self._check(self.c.TVMFFIFunctionCreate(ffi.NULL, callback, ffi.NULL, out))
        encoded = name.encode()
        keep = ffi.new("char[]", encoded)
        name_array = ffi.new("TVMFFIByteArray*", {"data": keep, "size": len(encoded)})
        self._check(self.c.TVMFFIFunctionSetGlobal(name_array, out[0], 1))
        self.c.TVMFFIObjectDecRef(out[0])  # the global table holds its own reference
        self._keep.append(callback)

    def _check(self, status: int) -> None:
        if status != 0:
            # Let the runtime binding turn the raised error into an exception.
            self._runtime._check(status)

    def _from_any(self, any_: Any) -> Any:
        abi, ffi, index = self._abi, self.ffi, any_.type_index
        if index == abi.NONE:
            return None
        if index in (abi.INT, abi.BOOL):
            return int(any_.v_int64)
        if index == abi.FLOAT:
            return float(any_.v_float64)
        if index == abi.RAW_STR:
            return ffi.string(any_.v_c_str).decode()
        if index == 9:  # kTVMFFIByteArrayPtr
            array = ffi.cast("TVMFFIByteArray*", any_.v_ptr)
            return bytes(ffi.buffer(array.data, array.size))
        if index in (abi.SMALL_STR, abi.SMALL_BYTES):
            data = bytes(ffi.buffer(any_.v_bytes, any_.zero_padding))
            return data.decode() if index == abi.SMALL_STR else data
        if index in (abi.STR, abi.BYTES):
            data = abi.byte_array_payload(ffi, any_.v_obj)
            return data.decode() if index == abi.STR else data
        raise TypeError(f"unsupported argument type index {index}")

    def _to_any(self, value: Any, result: Any) -> None:
        abi, ffi = self._abi, self.ffi
        if value is None:
            result.type_index = abi.NONE
            result.v_int64 = 0
        elif isinstance(value, bool):
            result.type_index, result.v_int64 = abi.BOOL, int(value)
        elif isinstance(value, int):
            result.type_index, result.v_int64 = abi.INT, value
        elif isinstance(value, float):
            result.type_index, result.v_float64 = abi.FLOAT, value
        elif isinstance(value, (str, bytes, bytearray)):
            data = value.encode() if isinstance(value, str) else bytes(value)
            keep = ffi.new("char[]", data or b"\0")
            array = ffi.new("TVMFFIByteArray*", {"data": keep, "size": len(data)})
            make = self.c.TVMFFIStringFromByteArray if isinstance(value, str) else self.c.TVMFFIBytesFromByteArray
            self._check(make(array, result))
        elif hasattr(value, "handle") and hasattr(value, "type_index"):  # a runtime Object: hand over our reference
            address = int(runtime_ffi.cast("uintptr_t", value.handle))
            result.type_index = value.type_index
            result.v_obj = ffi.cast("TVMFFIObject*", address)
            value.handle = None
        else:
            raise TypeError(f"cannot return {type(value).__name__} through TVM")
