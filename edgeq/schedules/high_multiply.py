"""The 32x32->64-bit products of requantization as even/odd ``pmuldq`` pairs on AVX-512.

Every int8 kernel's epilogue takes bits ``s .. s+31`` of ``int64(acc) * int64(multiplier) + c``
(TFLite's SaturatingRoundingDoublingHighMul). Vectorized, TVM writes that as a cast of int32xL
lanes to int64xL, a multiply, an add, a shift and a cast back, and LLVM splits the vector into two
halves of 64-bit lanes: zero-extends each, multiplies, shifts and narrows them again (``vpmovqd``)
before stitching the halves together, about a dozen instructions per vector.

x86's ``pmuldq`` multiplies the even 32-bit lanes of two vectors into 64-bit products in place.
:class:`EvenOddHighMultiply` rewrites the pattern, after vectorization, into one ``pmuldq`` for the
even lanes and one for the odd lanes (shifted down by 32 bits), each product's wanted 32 bits
shifted into the lane it came from, and one blend. Same bits, about two thirds of the instructions,
no narrowing. Only the vector form is touched; scalar code keeps the plain 64-bit multiply. With
AVX2's 8 lanes LLVM's own sequence measured as fast, so only AVX-512 builds use the rewrite.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.prim import expr as prim

__all__ = ["EvenOddHighMultiply", "even_odd_high_multiply"]


def _dtype(expr: tirx.PrimExpr) -> str:
    return str(expr.ty.dtype)


def _lanes(expr: tirx.PrimExpr) -> int:
    return int(expr.ty.dtype.lanes)


def _int64_factor(expr: tirx.PrimExpr, lanes: int) -> tuple[str, tirx.PrimExpr] | None:
    """An operand of the 64-bit multiply as ("vector", int32xL value) when it is a sign-extended
    int32 vector, or ("scalar", int64 value) when it is a broadcast int64 that fits in int32."""
    if isinstance(expr, prim.Cast) and _dtype(expr.value) == f"int32x{lanes}":
        return "vector", expr.value
    if isinstance(expr, prim.Broadcast):
        value = expr.value
        if isinstance(value, prim.IntImm) and -(1 << 31) <= int(value.value) < (1 << 31):
            return "scalar", value
        if isinstance(value, prim.Cast) and _dtype(value.value) == "int32":
            return "scalar", value
    return None


def _int_constant(expr: tirx.PrimExpr, lanes: int) -> int | None:
    if isinstance(expr, prim.Broadcast) and _lanes(expr) == lanes and isinstance(expr.value, prim.IntImm):
        return int(expr.value.value)
    return None


def _match(cast: prim.Cast):
    """(a, b, c, s) when ``cast`` is int32xL(((int64xL(a) * int64xL(b)) + c) >> s), else None."""
    lanes = _lanes(cast)
    if lanes < 4 or lanes % 2 or _dtype(cast) != f"int32x{lanes}":
        return None
    shifted = cast.value
    if not isinstance(shifted, prim.RShift) or _dtype(shifted) != f"int64x{lanes}":
        return None
    shift = _int_constant(shifted.b, lanes)
    if shift is None or not 0 <= shift <= 63:
        return None
    total = shifted.a
    if isinstance(total, prim.Add) and _int_constant(total.b, lanes) is not None:
        product, offset = total.a, _int_constant(total.b, lanes)
    elif isinstance(total, prim.Sub) and _int_constant(total.b, lanes) is not None:
        product, offset = total.a, -_int_constant(total.b, lanes)
    else:
        product, offset = total, 0
    if not isinstance(product, prim.Mul):
        return None
    a, b = _int64_factor(product.a, lanes), _int64_factor(product.b, lanes)
    if a is None or b is None or (a[0] == "scalar" and b[0] == "scalar"):
        return None
    return a, b, offset, shift


def even_odd_high_multiply(cast: prim.Cast) -> tirx.PrimExpr:
    """``cast`` rewritten to even/odd 64-bit lane products (unchanged when it is not the pattern)."""
    matched = _match(cast)
    if matched is None:
        return cast
    a, b, offset, shift = matched
    lanes = _lanes(cast)
    half = lanes // 2
    wide = f"int64x{half}"

    def splat(value: int) -> tirx.PrimExpr:
        return tirx.Broadcast(tirx.const(value, "int64"), half)

    def halves(factor) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
        kind, value = factor
        if kind == "scalar":
            scalar = tirx.Broadcast(value if _dtype(value) == "int64" else tirx.Cast("int64", value), half)
            return scalar, scalar
        pairs = tirx.reinterpret(wide, value)
        # even lanes: the low 32 bits sign-extended; odd lanes: the high 32 bits. LLVM folds both
        # sign extensions into pmuldq, which reads only the low half of each 64-bit lane.
        return (pairs << splat(32)) >> splat(32), pairs >> splat(32)

    (a_even, a_odd), (b_even, b_odd) = halves(a), halves(b)
    even = (a_even * b_even + splat(offset)) >> splat(shift)  # wanted bits in the low half
    odd = a_odd * b_odd + splat(offset)  # wanted bits moved to the high half
    odd = odd >> splat(shift - 32) if shift >= 32 else odd << splat(32 - shift)
    narrow = f"int32x{lanes}"
    indices = [i if i % 2 == 0 else lanes + i for i in range(lanes)]
    return tirx.Shuffle([tirx.reinterpret(narrow, even), tirx.reinterpret(narrow, odd)], indices)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="edgeq.EvenOddHighMultiply")
class EvenOddHighMultiply:
    """Rewrite vectorized 32x32->64-bit high multiplies into even/odd ``pmuldq`` pairs (AVX-512)."""

    def transform_function(self, func: tirx.PrimFunc, _mod: tvm.IRModule, _ctx) -> tirx.PrimFunc:
        body = tvm_ffi.structural_map(func.body, (prim.Cast, even_odd_high_multiply), order="post")
        return func if body.same_as(func.body) else func.with_body(body)
