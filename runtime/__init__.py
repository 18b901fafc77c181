"""The thin device runtime: a cffi (ABI mode) binding over the TVM runtime's C ABI.

Nothing here imports the ``tvm`` or ``tvm_ffi`` Python packages and nothing needs a C
compiler: ``libtvm_ffi.so`` and ``libtvm_runtime.so`` (shipped inside every bundle) are
opened with ``dlopen`` and driven through the tvm-ffi C functions. This is the only native
surface of :func:`edgeq.load`.
"""
from .ffi import RuntimeLibrary, TVMError, load_runtime
from .vm import RelaxVM

__all__ = ["RelaxVM", "RuntimeLibrary", "TVMError", "load_runtime"]
