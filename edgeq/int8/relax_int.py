"""Relax expressions for TFLite's integer arithmetic: requantization, rounding division, lookup tables.

Each helper emits a few elementwise Relax ops (FuseOps merges them into one kernel). Per-channel
constants broadcast along the last (channel) axis, which is where NHWC and fully-connected outputs
keep their channels.
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from .fixedpoint import DTYPE_RANGE

R = relax.op


def const(value, dtype: str) -> relax.Expr:
    """A Relax constant: a scalar stays rank-0, a 1-D per-channel vector stays 1-D (broadcasts on the last axis)."""
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 1 and array.size > 1 and np.all(array == array[0]):
        array = np.asarray(array[0], dtype=dtype)
    elif array.ndim == 1 and array.size == 1:
        array = array.reshape(())
    return relax.const(array, dtype)


def array_const(array: np.ndarray) -> relax.Expr:
    """A Relax constant with exactly the numpy array's dtype (relax.const would narrow int64)."""
    array = np.ascontiguousarray(array)
    return relax.const(array, str(array.dtype))


def dtype_of(x: relax.Expr) -> str:
    """The element type of a Relax tensor expression, as a numpy-style name."""
    return str(x.ty.dtype)


def shape_of(x: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in x.ty.shape)


def clamp_cast(bb: relax.BlockBuilder, x: relax.Expr, lo: int, hi: int, dtype: str) -> relax.Expr:
    """Clamp an integer tensor to [lo, hi] (fused activation and type range) and narrow it to dtype."""
    x = bb.emit(x)
    src = dtype_of(x)
    x = R.minimum(R.maximum(x, const(lo, src)), const(hi, src))
    return bb.emit(R.astype(x, dtype))


def multiply_by_quantized_multiplier(
    bb: relax.BlockBuilder, x: relax.Expr, multiplier: np.ndarray, shift: np.ndarray
) -> relax.Expr:
    """TFLite MultiplyByQuantizedMultiplier on an int32 tensor (double rounding); returns int64.

    ``multiplier``/``shift`` are scalars or per-channel vectors (last axis), as QuantizeMultiplier gives them.
    """
    multiplier = np.atleast_1d(np.asarray(multiplier, np.int64))
    shift = np.atleast_1d(np.asarray(shift, np.int64))
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    v = R.astype(x, "int64")
    if np.any(left > 0):  # x * (1 << left) wraps in int32 in TFLite
        v = R.astype(R.astype(R.multiply(v, const(np.left_shift(1, left), "int64")), "int32"), "int64")
    ab = R.multiply(v, const(multiplier, "int64"))
    ab = bb.emit(ab)
    zero = const(0, "int64")
    nudged = R.add(ab, R.where(R.greater_equal(ab, zero), const(1 << 30, "int64"), const(1 - (1 << 30), "int64")))
    nudged = bb.emit(nudged)
    # C++ '/ (1 << 31)' truncates toward zero: bias negative values before the arithmetic shift.
    high = R.right_shift(R.add(nudged, R.where(R.less(nudged, zero), const((1 << 31) - 1, "int64"), zero)), const(31, "int64"))
    high = bb.emit(high)
    if not np.any(right > 0):
        return high
    return rounding_divide_by_pot(bb, high, right)


def multiply_by_quantized_multiplier_single_rounding(
    bb: relax.BlockBuilder, x: relax.Expr, multiplier: np.ndarray, shift: np.ndarray
) -> relax.Expr:
    """(x * multiplier + 2**(30 - shift)) >> (31 - shift): one rounding, halves up; returns int64.

    This is what TFLite's optimized int8 conv/depthwise kernels compute on x86 (ruy's
    MultiplyByQuantizedMultiplier, and the NEON vqdmulh + rounding-shift path, which agree).
    """
    multiplier = np.atleast_1d(np.asarray(multiplier, np.int64))
    total_shift = 31 - np.atleast_1d(np.asarray(shift, np.int64))
    product = R.multiply(R.astype(x, "int64"), const(multiplier, "int64"))
    rounded = R.add(product, const(np.left_shift(np.int64(1), total_shift - 1), "int64"))
    return bb.emit(R.right_shift(rounded, const(total_shift, "int64")))


def rounding_divide_by_pot(bb: relax.BlockBuilder, x: relax.Expr, exponent: np.ndarray) -> relax.Expr:
    """gemmlowp RoundingDivideByPOT with a constant (per-channel) exponent; x is int64 (int32 range)."""
    exponent = np.atleast_1d(np.asarray(exponent, np.int64))
    dtype = dtype_of(x)
    mask = np.left_shift(np.int64(1), exponent) - 1
    remainder = R.bitwise_and(x, const(mask, dtype))
    threshold = R.add(const(mask >> 1, dtype), R.astype(R.less(x, const(0, dtype)), dtype))
    rounded = R.add(R.right_shift(x, const(exponent, dtype)), R.astype(R.greater(remainder, threshold), dtype))
    return bb.emit(rounded)


def round_half_away_float(bb: relax.BlockBuilder, y: relax.Expr) -> relax.Expr:
    """std::round on a float tensor, written without a float add on y so LLVM cannot fuse it into an FMA."""
    dtype = dtype_of(y)
    t = R.trunc(y)
    away = R.greater_equal(R.abs(y), R.add(R.abs(t), const(0.5, dtype)))
    return bb.emit(R.add(t, R.where(away, R.sign(y), const(0.0, dtype))))


def requantize_to(
    bb: relax.BlockBuilder, acc: relax.Expr, multiplier, shift, zero_point: int, lo: int, hi: int, dtype: str,
    single_rounding: bool = False,
) -> relax.Expr:
    """acc (int32) -> MultiplyByQuantizedMultiplier + zero point, clamped to [lo, hi], as dtype."""
    requantize = multiply_by_quantized_multiplier_single_rounding if single_rounding else multiply_by_quantized_multiplier
    scaled = requantize(bb, acc, multiplier, shift)
    return clamp_cast(bb, R.add(scaled, const(zero_point, "int64")), lo, hi, dtype)


def requantize_float_to(
    bb: relax.BlockBuilder, acc: relax.Expr, effective_scale: np.ndarray, zero_point: int, lo: int, hi: int, dtype: str
) -> relax.Expr:
    """acc (int32) -> round(double(acc) * effective_scale) + zero point, clamped, as dtype (TFLite's reference FC)."""
    y = bb.emit(R.multiply(R.astype(acc, "float64"), const(np.asarray(effective_scale, np.float64), "float64")))
    rounded = R.astype(round_half_away_float(bb, y), "int64")
    return clamp_cast(bb, R.add(rounded, const(zero_point, "int64")), lo, hi, dtype)


def lookup(bb: relax.BlockBuilder, x: relax.Expr, table: np.ndarray) -> relax.Expr:
    """Per-element table lookup of an 8-bit tensor; table[i] is the result for value DTYPE_RANGE min + i."""
    lo = DTYPE_RANGE[dtype_of(x)][0]
    index = R.astype(x, "int32")
    if lo:
        index = R.subtract(index, const(lo, "int32"))
    return bb.emit(R.take(array_const(table), bb.emit(index), axis=0, mode="clip"))


def rounded_division(bb: relax.BlockBuilder, acc: relax.Expr, count: np.ndarray | int) -> relax.Expr:
    """(acc +- count/2) / count with C truncation: TFLite's integer average (halves away from zero); int32."""
    count = np.asarray(count, np.int32)
    half = count // 2
    c = const(count, "int32") if count.ndim == 0 else array_const(count)
    h = const(half, "int32") if half.ndim == 0 else array_const(half)
    zero = const(0, "int32")
    positive = R.floor_divide(R.add(acc, h), c)
    negative = R.negative(R.floor_divide(R.subtract(h, acc), c))
    return bb.emit(R.where(R.greater(acc, zero), positive, negative))
