"""Relax expressions for TFLite's integer arithmetic: requantization, rounding division, lookup tables.

Each helper emits a few elementwise Relax ops (FuseOps merges them into one kernel). Per-channel
constants broadcast along the last (channel) axis, which is where NHWC and fully-connected outputs
keep their channels.
"""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from .fixedpoint import DTYPE_RANGE, INT32_MAX

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


def as_rows(bb: relax.BlockBuilder, x: relax.Expr, depth: int) -> relax.Expr:
    """``x`` as a (rows, depth) matrix for a matmul: ``x`` itself when it already is one (a second
    reshape of a RESHAPE's output would be a copy kernel: only a lone reshape becomes a view)."""
    try:
        shape = shape_of(x)
    except (TypeError, AttributeError):
        shape = ()
    if len(shape) == 2 and shape[1] == depth:
        return x
    return bb.emit(R.reshape(x, (-1, depth)))


def clamp_cast(bb: relax.BlockBuilder, x: relax.Expr, lo: int, hi: int, dtype: str) -> relax.Expr:
    """Clamp an integer tensor to [lo, hi] (fused activation and type range) and narrow it to dtype."""
    x = x if isinstance(x, relax.Var) else bb.emit(x)
    src = dtype_of(x)
    x = R.minimum(R.maximum(x, const(lo, src)), const(hi, src))
    return bb.emit(R.astype(x, dtype))


def _fixed_point_requantize(
    bb: relax.BlockBuilder, x: relax.Expr, multiplier, shift, single_rounding: bool,
    output: tuple[int, int, int, str] | None, acc_bound: int | None = None,
) -> relax.Expr:
    """One elementwise TIR block: TFLite's MultiplyByQuantizedMultiplier on an int32 tensor, then
    (with ``output`` = (zero point, lo, hi, dtype)) the zero point, the clamp and the narrowing cast.

    Everything runs in int32 except the 32x32->64-bit product (LLVM emits ``pmuldq`` for it), so
    a conv's epilogue costs a few vector instructions per output. ``acc_bound``, a bound on |x|
    known from the weights, allows the shorter rounding shift of :func:`_rounding_shift_terms`.
    """
    assert output is not None or not single_rounding, "single rounding returns the clamped output only"
    multiplier = np.atleast_1d(np.asarray(multiplier, np.int64))
    shift = np.atleast_1d(np.asarray(shift, np.int64))
    zero_point = output[0] if output is not None else 0
    short = None
    if single_rounding:
        total = 31 - shift  # (x * m + 2^(total-1)) >> total, one rounding, halves up
        params = {"multiplier": multiplier, "total": total, "half": np.left_shift(np.int64(1), total - 1)}
        wide = ("total", "half")
    else:
        right = np.maximum(-shift, 0)
        params = {"multiplier": multiplier, "left": np.maximum(shift, 0), "right": right}
        short = _rounding_shift_terms(right, zero_point, acc_bound) if np.all(shift <= 0) else None
        if short is None:
            mask = np.left_shift(np.int64(1), right) - 1
            params.update(mask=mask, threshold=mask >> 1)
        else:
            params.update(short[0])
        wide = ()
    channel = {k: v for k, v in params.items() if v.size > 1 and not np.all(v == v[0])}
    names = sorted(channel)
    dtypes = {k: ("int64" if k in wide else "int32") for k in params}
    folded_zero_point = short is not None and short[1]

    def compute(tensor: te.Tensor, *channel_tensors: te.Tensor) -> te.Tensor:
        by_name = dict(zip(names, channel_tensors))

        def body(*index):
            def param(name: str) -> tirx.PrimExpr:
                if name in by_name:
                    return by_name[name][index[-1]]
                return tirx.const(int(params[name][0]), dtypes[name])

            def i32(value: int) -> tirx.PrimExpr:
                return tirx.const(value, "int32")

            def i64(value: int) -> tirx.PrimExpr:
                return tirx.const(value, "int64")

            value = tensor(*index)
            if not single_rounding and short is None:  # x * (1 << left) wraps in int32 in TFLite
                value = value * (i32(1) << param("left"))
            product = value.astype("int64") * param("multiplier").astype("int64")
            if single_rounding:
                scaled = (product + param("half")) >> param("total")
            else:
                # SaturatingRoundingDoublingHighMul: TFLite's nudge (2^30, or 1 - 2^30 for negative
                # products) followed by C's truncating division by 2^31 is exactly an arithmetic
                # shift of (ab + 2^30) (the multiplier is positive: no saturation case).
                high = ((product + i64(1 << 30)) >> i64(31)).astype("int32")
                if short is not None:
                    sign = high >> i32(31)  # -1 below zero
                    if "sign_mask" in params:
                        sign = sign & param("sign_mask")
                    scaled = (high + param("offset") + sign) >> param("right")
                else:
                    # RoundingDivideByPOT (halves away from zero), gemmlowp's int32 formulation.
                    # The repeated subexpression is one value for LLVM (the input is read once).
                    up = (high & param("mask")) > param("threshold") + (high < i32(0)).astype("int32")
                    scaled = (high >> param("right")) + up.astype("int32")
            if output is None:
                return scaled
            zero_point, lo, hi, dtype = output
            if single_rounding:  # clamp while still 64-bit: a left-shifting scale may leave int32
                bounded = tirx.max(tirx.min(scaled, i64(hi - zero_point)), i64(lo - zero_point))
                return (bounded.astype("int32") + i32(zero_point)).astype(dtype)
            if not folded_zero_point:  # int32 like TFLite: + zero point, clamp, narrow
                scaled = scaled + i32(zero_point)
            return tirx.max(tirx.min(scaled, i32(hi)), i32(lo)).astype(dtype)

        return te.compute(tensor.shape, body, name="requantize")

    x = x if isinstance(x, relax.Var) else bb.emit(x)
    if dtype_of(x) != "int32":
        x = bb.emit(R.astype(x, "int32"))
    constants = [array_const(channel[n].astype(dtypes[n])) for n in names]
    return bb.emit_te(compute, x, *constants)


def _rounding_shift_terms(
    right: np.ndarray, zero_point: int, acc_bound: int | None
) -> tuple[dict[str, np.ndarray], bool] | None:
    """RoundingDivideByPOT(h, r) + zero point as one add and one shift, where overflow is ruled out.

    gemmlowp rounds h / 2^r half away from zero: (h >> r) + (remainder > threshold), threshold one
    larger below zero. That is exactly (h + 2^(r-1) - [h < 0]) >> r for r >= 1, and adding
    zero_point * 2^r before the shift adds zero_point after it. ``h`` is the high multiply of the
    accumulator by a multiplier below 2^31, so |h| <= |acc| <= ``acc_bound``; the form is used only
    when that bound plus the offset cannot overflow int32. Channels with r = 0 keep h as it is
    (their sign term is masked off). Returns the per-channel terms and whether the zero point is
    folded in, or None.
    """
    if acc_bound is None:
        return None
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    with_zero_point = half + np.left_shift(np.int64(zero_point), right)
    if acc_bound + 1 + int(np.abs(with_zero_point).max()) <= INT32_MAX:
        terms, folded = {"offset": with_zero_point}, True
    elif acc_bound + 1 + int(half.max()) <= INT32_MAX:
        terms, folded = {"offset": half}, False
    else:
        return None
    if np.any(right == 0):
        terms["sign_mask"] = np.where(right > 0, -1, 0).astype(np.int64)
    return terms, folded


def multiply_by_quantized_multiplier(
    bb: relax.BlockBuilder, x: relax.Expr, multiplier: np.ndarray, shift: np.ndarray
) -> relax.Expr:
    """TFLite MultiplyByQuantizedMultiplier (double rounding) on an int32 tensor; returns int32.

    ``multiplier``/``shift`` are scalars or per-channel vectors (last axis), as QuantizeMultiplier
    gives them.
    """
    return _fixed_point_requantize(bb, x, multiplier, shift, single_rounding=False, output=None)


def round_half_away_float(bb: relax.BlockBuilder, x: relax.Expr, scale, *, divide: bool) -> relax.Expr:
    """std::round(x / scale) (or x * scale, ``divide=False``) on a float tensor, ``scale`` a constant
    scalar or one per last-axis element: one elementwise kernel stage, so that it inlines into its
    consumer, written without a float add on the quotient so LLVM cannot fuse it into an FMA. The
    quotient is spelled out where it is used (LLVM computes it once): a ``Let`` would stop
    MetaSchedule (``edgeq tune``)."""
    dtype = dtype_of(x)
    scale = np.asarray(scale, dtype=dtype)
    per_element = scale.size > 1

    def compute(values: te.Tensor, *scales: te.Tensor) -> te.Tensor:
        half = tirx.const(0.5, dtype)
        one, zero = tirx.const(1.0, dtype), tirx.const(0.0, dtype)

        def element(*index):
            s = scales[0][index[-1]] if per_element else tirx.const(float(scale.reshape(-1)[0]), dtype)
            v = values[index] / s if divide else values[index] * s
            t = tirx.trunc(v)
            away = tirx.Select(v < zero, -one, one)  # |v - t| >= 0.5 only where v != 0
            return t + tirx.Select(tirx.abs(v) >= tirx.abs(t) + half, away, zero)

        return te.compute(values.shape, element, name="round_half_away")

    args = [x, array_const(scale.reshape(-1))] if per_element else [x]
    return bb.emit_te(compute, *args, primfunc_name_hint="round_half_away")


def requantize_to(
    bb: relax.BlockBuilder, acc: relax.Expr, multiplier, shift, zero_point: int, lo: int, hi: int, dtype: str,
    single_rounding: bool = False, acc_bound: int | None = None,
) -> relax.Expr:
    """acc (int32) -> MultiplyByQuantizedMultiplier + zero point, clamped to [lo, hi], as dtype.

    ``single_rounding``: (acc * multiplier + 2**(30 - shift)) >> (31 - shift), one rounding with
    halves up - what TFLite's optimized int8 conv/depthwise/FC kernels compute on x86 (ruy's
    MultiplyByQuantizedMultiplier and the NEON vqdmulh + rounding-shift path agree).
    ``acc_bound``: a bound on |acc| (from the weights) that lets the rounding shift take fewer steps.
    """
    return _fixed_point_requantize(bb, acc, multiplier, shift, single_rounding, (zero_point, lo, hi, dtype), acc_bound)


def requantize_float_to(
    bb: relax.BlockBuilder, acc: relax.Expr, effective_scale: np.ndarray, zero_point: int, lo: int, hi: int, dtype: str
) -> relax.Expr:
    """acc (int32) -> round(double(acc) * effective_scale) + zero point, clamped, as dtype (TFLite's reference FC)."""
    wide = bb.emit(R.astype(acc, "float64"))
    rounded = R.astype(round_half_away_float(bb, wide, np.asarray(effective_scale, np.float64), divide=False), "int64")
    return clamp_cast(bb, R.add(rounded, const(zero_point, "int64")), lo, hi, dtype)


def lookup(bb: relax.BlockBuilder, x: relax.Expr, table: np.ndarray) -> relax.Expr:
    """Per-element table lookup of an 8-bit tensor; table[i] is the result for value DTYPE_RANGE min + i.

    An integer table that only adds a constant (a uint8 <-> int8 requantization at the same scale:
    table[i] = i - 128) becomes that add: vector arithmetic instead of a gather per element."""
    lo = DTYPE_RANGE[dtype_of(x)][0]
    offset = _constant_offset(table, lo)
    if offset is not None:
        shifted = R.add(R.astype(x, "int32"), const(offset, "int32")) if offset else R.astype(x, "int32")
        return bb.emit(R.astype(shifted, str(table.dtype)))
    index = R.astype(x, "int32")
    if lo:
        index = R.subtract(index, const(lo, "int32"))
    return bb.emit(R.take(array_const(table), bb.emit(index), axis=0, mode="clip"))


def _constant_offset(table: np.ndarray, lo: int) -> int | None:
    """c where the integer ``table`` is value + c for every value lo, lo + 1, ... (None otherwise)."""
    if not np.issubdtype(table.dtype, np.integer):
        return None
    offsets = table.astype(np.int64) - (lo + np.arange(table.size, dtype=np.int64))
    return int(offsets[0]) if np.all(offsets == offsets[0]) else None


def rounded_division(bb: relax.BlockBuilder, acc: relax.Expr, count: np.ndarray | int) -> relax.Expr:
    """(acc +- count/2) / count with C truncation: TFLite's integer average (halves away from zero); int32.

    One elementwise block (``count`` a scalar or a constant broadcast against ``acc``). A scalar
    power of two 2^k is a shift: (acc + 2^(k-1) - [acc < 0]) >> k gives the same quotient (below
    zero, -((2^(k-1) - acc) / 2^k) truncated is floor((acc + 2^(k-1) - 1) / 2^k)), for sums far
    from the int32 limits as a window of 8-bit values is.
    """
    count = np.asarray(count, np.int32)
    per_position = count.ndim > 0
    if not per_position and int(count) > 1 and int(count) & (int(count) - 1) == 0:
        bits = int(count).bit_length() - 1

        def shift(total: te.Tensor) -> te.Tensor:
            def body(*index):
                v = total(*index)
                return (v + tirx.const(1 << (bits - 1), "int32") + (v >> tirx.const(31, "int32"))) >> tirx.const(
                    bits, "int32"
                )

            return te.compute(total.shape, body, name="rounded_division")

        return bb.emit_te(shift, acc)

    def compute(total: te.Tensor, *counts: te.Tensor) -> te.Tensor:
        def body(*index):
            if per_position:
                c = counts[0][tuple(i if int(n) > 1 else 0 for i, n in zip(index, counts[0].shape))]
            else:
                c = tirx.const(int(count), "int32")
            half = tirx.truncdiv(c, tirx.const(2, "int32"))
            v = total(*index)
            # both dividends are non-negative where they are used: truncation = C's division
            return tirx.Select(v > 0, tirx.truncdiv(v + half, c), -tirx.truncdiv(half - v, c))

        return te.compute(total.shape, body, name="rounded_division")

    return bb.emit_te(compute, acc, *([array_const(count)] if per_position else []))
