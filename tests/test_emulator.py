"""The emulated Raspberry Pi works: arm64 python + numpy/PIL/cffi, the aarch64 TVM runtime, a
cross-compiled Relax VM library run through the tvm-ffi C ABI (cffi ABI mode, no tvm package).

Needs network the first time (Debian arm64 packages, the aarch64 TVM wheels); cached after.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeq.runtime_libs import RuntimeLibraries, runtime_libraries
from emulator import ensure_aarch64_root, run_aarch64_python

pytestmark = pytest.mark.network

# Runs on the device side: Python 3.11, numpy 1.24, cffi 1.15. Usage:
#   driver.py FFI_SO:RUNTIME_SO                 -> look up ffi.ModuleLoadFromFile
#   driver.py FFI_SO:RUNTIME_SO LIB IN.npy OUT.npy -> run LIB's Relax VM main(IN) (float32)
DRIVER = r'''
import sys
import cffi
import numpy as np

CDEF = """
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { void* data; DLDevice device; int32_t ndim; DLDataType dtype;
                 int64_t* shape; int64_t* strides; uint64_t byte_offset; } DLTensor;
typedef struct DLManagedTensor { DLTensor dl_tensor; void* manager_ctx;
                                 void (*deleter)(struct DLManagedTensor* self); } DLManagedTensor;
typedef struct { int32_t type_index; uint32_t zero_padding;
                 union { int64_t v_int64; double v_float64; void* v_ptr; const char* v_c_str; } v;
               } TVMFFIAny;
typedef struct { const char* data; size_t size; } TVMFFIByteArray;
int TVMFFIObjectDecRef(void* obj);
int TVMFFIFunctionGetGlobal(const TVMFFIByteArray* name, void** out);
int TVMFFIFunctionCall(void* func, TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);
void TVMFFIErrorMoveFromRaised(void** result);
int TVMFFITensorFromDLPack(DLManagedTensor* from, int32_t require_alignment,
                           int32_t require_contiguous, void** out);
"""
INT, RAW_STR, FUNCTION, TENSOR, MODULE = 1, 8, 68, 70, 73  # TVMFFITypeIndex
HEADER = 24  # sizeof(TVMFFIObject): an object's payload (error cell, DLTensor) follows it

ffi = cffi.FFI()
ffi.cdef(CDEF)
ffi_path, runtime_path = sys.argv[1].split(":")
lib = ffi.dlopen(ffi_path, ffi.RTLD_NOW | ffi.RTLD_GLOBAL)  # first, global: runtime links to it
ffi.dlopen(runtime_path, ffi.RTLD_NOW | ffi.RTLD_GLOBAL)


def check(status):
    if status != 0:
        err = ffi.new("void**")
        lib.TVMFFIErrorMoveFromRaised(err)
        cell = ffi.cast("TVMFFIByteArray*", ffi.cast("char*", err[0]) + HEADER)
        kind, msg = (ffi.string(cell[i].data, cell[i].size).decode() for i in (0, 1))
        lib.TVMFFIObjectDecRef(err[0])
        raise RuntimeError(kind + ": " + msg)


def get_global(name):
    raw = ffi.new("char[]", name.encode())
    out = ffi.new("void**")
    check(lib.TVMFFIFunctionGetGlobal(ffi.new("TVMFFIByteArray*", [raw, len(name)]), out))
    if out[0] == ffi.NULL:
        raise RuntimeError("no global function " + name)
    return out[0]


def call(func, *args):
    """Call with (type_index, value) pairs; return (type_index, handle) of the result."""
    cargs, keep = ffi.new("TVMFFIAny[]", max(len(args), 1)), []
    for slot, (tindex, value) in zip(cargs, args):
        slot.type_index = tindex
        if tindex == RAW_STR:
            keep.append(ffi.new("char[]", value.encode()))
            slot.v.v_c_str = keep[-1]
        elif tindex == INT:
            slot.v.v_int64 = value
        else:
            slot.v.v_ptr = value
    result = ffi.new("TVMFFIAny*")
    check(lib.TVMFFIFunctionCall(func, cargs, len(args), result))
    return result.type_index, result.v.v_ptr


def tensor(array):
    """A float32 CPU Tensor object viewing ``array``; the second item keeps its memory alive."""
    managed, shape = ffi.new("DLManagedTensor*"), ffi.new("int64_t[]", list(array.shape))
    dl = managed.dl_tensor
    dl.data = ffi.cast("void*", array.ctypes.data)
    dl.device.device_type, dl.device.device_id = 1, 0  # kDLCPU
    dl.ndim, dl.shape = array.ndim, shape
    dl.dtype.code, dl.dtype.bits, dl.dtype.lanes = 2, 32, 1  # kDLFloat
    out = ffi.new("void**")
    check(lib.TVMFFITensorFromDLPack(managed, 0, 1, out))
    return out[0], (managed, shape, array)


def to_numpy(handle):
    dl = ffi.cast("DLTensor*", ffi.cast("char*", handle) + HEADER)
    shape = tuple(dl.shape[i] for i in range(dl.ndim))
    nbytes = int(np.prod(shape)) * 4
    buf = ffi.buffer(ffi.cast("char*", dl.data) + dl.byte_offset, nbytes)
    return np.frombuffer(buf, dtype=np.float32).reshape(shape).copy()


load = get_global("ffi.ModuleLoadFromFile")
if len(sys.argv) == 2:
    print("found ffi.ModuleLoadFromFile")
    lib.TVMFFIObjectDecRef(load)
    sys.exit(0)
get_function = get_global("ffi.ModuleGetFunction")
_, mod = call(load, (RAW_STR, sys.argv[2]))
tindex, vm_load = call(get_function, (MODULE, mod), (RAW_STR, "vm_load_executable"), (INT, 1))
assert tindex == FUNCTION, tindex
_, vm = call(vm_load)
_, init = call(get_function, (MODULE, vm), (RAW_STR, "vm_initialization"), (INT, 1))
call(init, (INT, 1), (INT, 0), (INT, 2))  # CPU device 0, pooled allocator
_, main = call(get_function, (MODULE, vm), (RAW_STR, "main"), (INT, 1))
x_handle, keep = tensor(np.ascontiguousarray(np.load(sys.argv[3]), dtype=np.float32))
tindex, y_handle = call(main, (TENSOR, x_handle))
assert tindex == TENSOR, tindex
np.save(sys.argv[4], to_numpy(y_handle))
for handle in (y_handle, x_handle, main, init, vm, vm_load, mod, get_function, load):
    lib.TVMFFIObjectDecRef(handle)
print("ran main")
'''

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}


@pytest.fixture(scope="module")
def root() -> Path:
    return ensure_aarch64_root()


@pytest.fixture(scope="module")
def arm_libs() -> RuntimeLibraries:
    return runtime_libraries("aarch64", progress=print)


@pytest.fixture()
def driver(tmp_path: Path, arm_libs: RuntimeLibraries) -> list[str]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return [str(script), f"{arm_libs.files['libtvm_ffi.so']}:{arm_libs.files['libtvm_runtime.so']}"]


def test_emulated_python_is_a_raspberry_pi_userland(root: Path) -> None:
    code = ("import numpy, PIL, cffi, platform; "
            "print(platform.machine(), numpy.__version__, PIL.__version__, cffi.__version__)")
    machine, numpy_v, pil_v, cffi_v = run_aarch64_python(root, ["-c", code]).stdout.split()
    assert machine == "aarch64"
    assert (numpy_v[:4], pil_v[:3], cffi_v[:4]) == ("1.24", "9.4", "1.15")


def test_aarch64_runtime_loads_through_cffi(root: Path, driver: list[str]) -> None:
    out = run_aarch64_python(root, driver).stdout
    assert "found ffi.ModuleLoadFromFile" in out


def test_cross_compiled_relax_module_runs(root: Path, driver: list[str], tmp_path: Path) -> None:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc missing: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross")
    tvm = pytest.importorskip("tvm")
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Tiny:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 8), "float32"):
            with R.dataflow():
                y = R.nn.relu(R.add(R.multiply(x, R.const(2.0, "float32")), R.const(1.0, "float32")))
                R.output(y)
            return y

    lib_path = tmp_path / "tiny.so"
    executable = tvm.compile(Tiny, target=tvm.target.Target(AARCH64_TARGET))
    executable.export_library(str(lib_path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-gcc"))
    assert lib_path.read_bytes()[18] == 183  # ELF e_machine EM_AARCH64

    x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)
    np.save(tmp_path / "x.npy", x)
    out = run_aarch64_python(root, driver + [str(lib_path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")])
    assert "ran main" in out.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.maximum(x * 2 + 1, 0))
