"""SOFTMAX on int8/uint8 exactly as TFLite's reference kernel: gemmlowp fixed-point exp and reciprocal.

Per element, exp(beta * scale * (x - row max)) depends on one of 256 differences, so the Q0.31 exp
and its Q12 accumulation term are tables built at compile time. Per row, the reciprocal of the sum
(GetReciprocal: count leading zeros + Newton-Raphson one_over_one_plus_x_for_x_in_0_1) runs in
int64 arithmetic. The whole op is one kernel: its rows are short and it runs once per inference.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, require_quantized
from .fixedpoint import DTYPE_RANGE, exp_on_negative_values, multiply_by_quantized_multiplier, quantize_multiplier, rdbpot
from .graph import Operator
from .relax_int import array_const

SCALED_DIFF_INTEGER_BITS = 5
ACCUMULATION_INTEGER_BITS = 12


def _exp_tables(input_scale: np.float32, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Q0.31 exp of every difference -255..0 and its Q12 accumulation term (0 below diff_min)."""
    real = min(beta * float(input_scale) * (1 << (31 - SCALED_DIFF_INTEGER_BITS)), (1 << 31) - 1.0)
    multiplier, left_shift = quantize_multiplier(real)
    if left_shift < 0:
        raise UnsupportedModelError("SOFTMAX: beta * input scale is too small for TFLite's fixed-point kernel")
    radius = math.floor(
        ((1 << SCALED_DIFF_INTEGER_BITS) - 1) * (1 << (31 - SCALED_DIFF_INTEGER_BITS)) / (1 << left_shift)
    )
    exps, terms = [], []
    for diff in range(-255, 1):
        if diff >= -radius:
            rescaled = multiply_by_quantized_multiplier(diff, multiplier, left_shift)
            e = exp_on_negative_values(rescaled, SCALED_DIFF_INTEGER_BITS)
        else:
            e = 0
        exps.append(e)
        terms.append(rdbpot(e, ACCUMULATION_INTEGER_BITS))  # Rescale<12> of a Q0.31 value
    return np.asarray(exps, np.int64), np.asarray(terms, np.int32)


def _i64(v: int) -> tirx.PrimExpr:
    return tirx.const(v, "int64")


def _srdhm(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """gemmlowp SaturatingRoundingDoublingHighMul on int64 values in int32 range (truncating / 2^31)."""
    ab = a * b
    nudged = ab + tirx.Select(ab >= _i64(0), _i64(1 << 30), _i64(1 - (1 << 30)))
    return (nudged + tirx.Select(nudged < _i64(0), _i64((1 << 31) - 1), _i64(0))) >> _i64(31)


def _shift_left_saturating(x: tirx.PrimExpr, exponent: int) -> tirx.PrimExpr:
    threshold = (1 << (31 - exponent)) - 1
    shifted = tirx.Select(x > _i64(threshold), _i64((1 << 31) - 1), x << _i64(exponent))
    return tirx.Select(x < _i64(-threshold), _i64(-(1 << 31)), shifted)


def _rdbpot(x: tirx.PrimExpr, exponent: tirx.PrimExpr) -> tirx.PrimExpr:
    """gemmlowp RoundingDivideByPOT with a tensor exponent."""
    mask = (_i64(1) << exponent) - _i64(1)
    threshold = (mask >> _i64(1)) + tirx.Cast("int64", x < _i64(0))
    return (x >> exponent) + tirx.Cast("int64", (x & mask) > threshold)


def _softmax_kernel(x: te.Tensor, exps: te.Tensor, terms: te.Tensor, out_dtype: str) -> te.Tensor:
    """TFLite's reference int8/uint8 softmax over the last axis, as one kernel: per row, the max,
    the sum of the Q12 exp terms, GetReciprocal (count leading zeros, then gemmlowp's
    one_over_one_plus_x_for_x_in_0_1: three Newton-Raphson steps), then each element's scaled exp."""
    *rows, depth = (int(d) for d in x.shape)
    lo, hi = DTYPE_RANGE[out_dtype]

    def per_row(name: str, value) -> te.Tensor:
        return te.compute(rows, value, name=name)

    k = te.reduce_axis((0, depth), "k")
    row_max = per_row("row_max", lambda *r: te.max(x[(*r, k)].astype("int32"), axis=k))

    def index(r, j):
        return x[(*r, j)].astype("int32") - row_max[r] + 255

    j = te.reduce_axis((0, depth), "j")
    total = per_row("sum_of_exps", lambda *r: te.sum(terms[index(r, j)], axis=j))
    headroom = per_row("headroom_plus_one", lambda *r: tirx.clz(total[r]).astype("int64"))
    # one_over_one_plus_x_for_x_in_0_1 of a = (sum << headroom) - 2^31 (Q0.31, a >= 0) starts from
    # RoundingHalfSum(a, One) = (a + 2^31) >> 1 = (sum << headroom) >> 1
    half_denominator = per_row("half_denominator", lambda *r: (total[r].astype("int64") << headroom[r]) >> _i64(1))
    estimate = per_row("estimate0", lambda *r: _i64(1515870810) + _srdhm(half_denominator[r], _i64(-1010580540)))
    for step in range(3):
        previous = estimate
        error = per_row(f"error{step}", lambda *r: _i64(1 << 29) - _srdhm(half_denominator[r], previous[r]))
        estimate = per_row(
            f"estimate{step + 1}",
            lambda *r: previous[r] + _shift_left_saturating(_srdhm(previous[r], error[r]), 2),
        )
    final = estimate
    scale = per_row("reciprocal", lambda *r: _shift_left_saturating(final[r], 1))
    exponent = per_row("exponent", lambda *r: _i64(ACCUMULATION_INTEGER_BITS + 31 - 8) - headroom[r])

    def element(*i):
        r = i[:-1]
        scaled = _rdbpot(_srdhm(scale[r], exps[index(r, i[-1])]), exponent[r]) + _i64(lo)
        return tirx.Cast(out_dtype, tirx.max(tirx.min(scaled, _i64(hi)), _i64(lo)))

    return te.compute(x.shape, element, name="softmax")


def lower_softmax(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, inp.index, out.index)
    if inp.dtype != out.dtype:
        raise UnsupportedModelError(f"SOFTMAX #{op.index}: input and output types differ")
    exps, terms = _exp_tables(inp.quant.s, float(op.options.Beta()))
    result = ctx.bb.emit_te(
        _softmax_kernel, ctx.value(inp.index), array_const(exps), array_const(terms), out.dtype,
        primfunc_name_hint="softmax",
        # "out-elementwise fusable" (4), not the opaque (8) TVM infers for its several stages: the
        # DEQUANTIZE that usually follows joins its kernel instead of being a kernel call of its own
        primfunc_attrs={"op_pattern": 4},
    )
    ctx.set(out.index, result)
    return Lowered()
