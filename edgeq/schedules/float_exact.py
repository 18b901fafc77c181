"""Keep float multiplies and adds apart so that float outputs are the same on every CPU.

LLVM fuses ``a * b + c`` into one fused multiply-add (FMA) wherever the CPU has one (every
aarch64 core, x86 with AVX2/FMA), and TVM lets it. An FMA rounds once instead of twice, so the
same bundle source gives float outputs that differ in the last bits between an x86_64 build
(baseline SSE2: no FMA) and a Raspberry Pi build. This pass puts an ``llvm.arithmetic.fence``
around every float product that feeds an addition or subtraction: the fence is free at run time
(it emits no instruction) but LLVM may not contract across it, so every CPU rounds the product
and the sum separately, as TFLite's reference kernels do on x86.

Integer arithmetic is untouched. The price is the FMA's throughput in float convolutions.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

_FENCE = "llvm.arithmetic.fence"


def _is_float(expr: tvm.ir.PrimExpr) -> bool:
    return str(expr.ty).startswith(("float", "bfloat"))


def _fenced(expr: tvm.ir.PrimExpr) -> tvm.ir.PrimExpr:
    if isinstance(expr, tirx.Mul) and _is_float(expr):
        return tirx.call_llvm_pure_intrin(str(expr.ty), _FENCE, expr)
    return expr


def _separate(node: tirx.Add | tirx.Sub) -> tvm.ir.PrimExpr:
    a, b = _fenced(node.a), _fenced(node.b)
    if a.same_as(node.a) and b.same_as(node.b):
        return node
    return type(node)(a, b)


def separate_multiply_add(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float product that is added or subtracted behind a contraction fence."""
    return tvm_ffi.structural_map(func, ((tirx.Add, tirx.Sub), _separate))


@tvm.transform.module_pass(opt_level=0, name="edgeq.SeparateFloatMultiplyAdd")
class SeparateFloatMultiplyAdd:
    """Apply :func:`separate_multiply_add` to every PrimFunc of a module."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {
            gvar: separate_multiply_add(func)
            for gvar, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc)
        }
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
