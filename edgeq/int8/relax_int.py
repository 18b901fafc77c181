"""Relax expressions for TFLite's integer arithmetic: requantization, rounding division, lookup tables.

Each helper emits a few elementwise Relax ops (FuseOps merges them into one kernel). Per-channel
constants broadcast along the last (channel) axis, which is where NHWC and fully-connected outputs
keep their channels.
"""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

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

    ``multiplier``/``shift`` are scalars or per-channel vectors (last axis), as QuantizeMultiplier
    gives them. Emitted as ONE elementwise TIR block that reads its input twice: written as a
    chain of separate ops (comparisons, selects), each value was read several times, and
    inlining the chain - which schedulers do to fuse a conv's epilogue - grew the expression
    exponentially with its length.
    """
    multiplier = np.atleast_1d(np.asarray(multiplier, np.int64))
    shift = np.atleast_1d(np.asarray(shift, np.int64))
    params = {"multiplier": multiplier, "left": np.maximum(shift, 0), "right": np.maximum(-shift, 0)}
    shifts_left, shifts_right = bool(np.any(params["left"] > 0)), bool(np.any(params["right"] > 0))
    channel_params = {k: v for k, v in params.items() if v.size > 1 and not np.all(v == v[0])}
    names = sorted(channel_params)

    def compute(tensor: te.Tensor, *channel_tensors: te.Tensor) -> te.Tensor:
        by_name = dict(zip(names, channel_tensors))

        def body(*index):
            def param(name: str) -> tirx.PrimExpr:
                if name in by_name:
                    return by_name[name][index[-1]]
                return tirx.const(int(params[name][0]), "int64")

            def c(value: int) -> tirx.PrimExpr:
                return tirx.const(value, "int64")

            zero = c(0)
            v = tensor(*index).astype("int64")
            if shifts_left:  # x * (1 << left) wraps in int32 in TFLite
                v = (v * (c(1) << param("left"))).astype("int32").astype("int64")
            # SaturatingRoundingDoublingHighMul: TFLite's nudge (2^30, or 1 - 2^30 for negative
            # products) followed by C's truncating division by 2^31 is exactly an arithmetic
            # shift of (ab + 2^30) (the multiplier is positive, so no saturation case).
            high = (v * param("multiplier") + c(1 << 30)) >> c(31)
            if not shifts_right:
                return high
            # RoundingDivideByPOT (halves away from zero) = (x + 2^(e-1) - [x < 0]) >> e, e > 0.
            right = param("right")
            half = (c(1) << right) >> c(1)
            negative = high >> c(63)  # -1 for negative values, else 0
            if "right" in by_name:  # channels without a right shift keep their value
                negative = tirx.Select(right > zero, negative, zero)
            return (high + half + negative) >> right

        return te.compute(tensor.shape, body, name="requantize")

    x = x if isinstance(x, relax.Var) else bb.emit(x)
    return bb.emit_te(compute, x, *[array_const(channel_params[name]) for name in names])


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
