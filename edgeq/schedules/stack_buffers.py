"""Keep a kernel's small per-tile buffers on the stack.

TVM's ``LowerTVMBuiltin`` places a temporary buffer on the stack only below 1 KiB; a larger one
becomes a ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair (a thread-local pool
lookup each) wherever it is allocated. A depthwise tile's packed window rows (1-4 KiB) are
allocated inside the parallel loop, so EfficientNet-Lite0's depthwise kernels made about 10,000 such
calls per inference (2% of perf's samples in the pool; without them the model ran 6-8% faster).
:class:`KeepTileBuffersOnStack` marks buffers up to :data:`MAX_STACK_BUFFER_BYTES` (and
:data:`MAX_STACK_BYTES_PER_FUNCTION` in all) ``disable_lower_builtin``: LLVM then allocates them
once in the function's (or the parallel task's) stack frame.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

TVM_STACK_LIMIT_BYTES = 1024  # LowerTVMBuiltin's own limit (runtime::kMaxStackAlloca)
MAX_STACK_BUFFER_BYTES = 16 * 1024
MAX_STACK_BYTES_PER_FUNCTION = 64 * 1024
DISABLE_LOWER_BUILTIN = "disable_lower_builtin"


def _constant_bytes(buffer: tirx.Buffer) -> int | None:
    elements = 1
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        elements *= int(extent)
    dtype = tvm.DataType(str(buffer.dtype))
    return elements * max(1, dtype.bits * dtype.lanes // 8)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="edgeq.KeepTileBuffersOnStack")
class KeepTileBuffersOnStack:
    """Mark constant-size global buffers of 1 to 16 KiB to stay stack allocations (run it after
    TVM's lowering, before ``LowerTVMBuiltin``)."""

    def transform_function(self, func: tirx.PrimFunc, _mod: tvm.IRModule, _ctx) -> tirx.PrimFunc:
        budget = [MAX_STACK_BYTES_PER_FUNCTION]

        def keep_on_stack(alloc: tirx.AllocBuffer) -> tirx.Stmt:
            size = _constant_bytes(alloc.buffer)
            if size is None or not TVM_STACK_LIMIT_BYTES <= size <= min(MAX_STACK_BUFFER_BYTES, budget[0]):
                return alloc
            if str(alloc.buffer.scope()) != "global":
                return alloc
            if alloc.annotations is not None and DISABLE_LOWER_BUILTIN in alloc.annotations:
                return alloc
            budget[0] -= size
            annotations = dict(alloc.annotations or {})
            annotations[DISABLE_LOWER_BUILTIN] = tirx.IntImm("bool", 1)
            return tirx.AllocBuffer(alloc.buffer, annotations)

        body = tvm_ffi.structural_map(func.body, (tirx.AllocBuffer, keep_on_stack), order="post")
        return func if body.same_as(func.body) else func.with_body(body)
