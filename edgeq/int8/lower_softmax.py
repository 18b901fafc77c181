"""SOFTMAX on int8/uint8 exactly as TFLite's reference kernel: gemmlowp fixed-point exp and reciprocal.

Per element, exp(beta * scale * (x - row max)) depends on one of 256 differences, so the Q0.31 exp
and its Q12 accumulation term are tables built at compile time. Per row, the reciprocal of the sum
(GetReciprocal: count leading zeros + Newton-Raphson one_over_one_plus_x_for_x_in_0_1) runs in
int64 Relax arithmetic on the tiny row tensor.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, require_quantized
from .fixedpoint import DTYPE_RANGE, exp_on_negative_values, multiply_by_quantized_multiplier, quantize_multiplier, rdbpot
from .graph import Operator
from .relax_int import array_const, clamp_cast, const

R = relax.op
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


class _Fx:
    """int64 Relax arithmetic on values in int32 range, mirroring gemmlowp's scalar ops."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb = bb

    def c(self, v: int) -> relax.Expr:
        return const(v, "int64")

    def srdhm(self, a: relax.Expr, b: relax.Expr) -> relax.Expr:
        ab = self.bb.emit(R.multiply(a, b))
        zero = self.c(0)
        nudged = self.bb.emit(R.add(ab, R.where(R.greater_equal(ab, zero), self.c(1 << 30), self.c(1 - (1 << 30)))))
        biased = R.add(nudged, R.where(R.less(nudged, zero), self.c((1 << 31) - 1), zero))
        return self.bb.emit(R.right_shift(biased, self.c(31)))

    def shift_left_saturating(self, x: relax.Expr, exponent: int) -> relax.Expr:
        threshold = (1 << (31 - exponent)) - 1
        shifted = R.left_shift(x, self.c(exponent))
        shifted = R.where(R.greater(x, self.c(threshold)), self.c((1 << 31) - 1), shifted)
        return self.bb.emit(R.where(R.less(x, self.c(-threshold)), self.c(-(1 << 31)), shifted))

    def rdbpot(self, x: relax.Expr, exponent: relax.Expr) -> relax.Expr:
        mask = R.subtract(R.left_shift(self.c(1), exponent), self.c(1))
        remainder = R.bitwise_and(x, mask)
        threshold = R.add(R.right_shift(mask, self.c(1)), R.astype(R.less(x, self.c(0)), "int64"))
        return self.bb.emit(R.add(R.right_shift(x, exponent), R.astype(R.greater(remainder, threshold), "int64")))

    def one_over_one_plus_x(self, a: relax.Expr) -> relax.Expr:
        """gemmlowp one_over_one_plus_x_for_x_in_0_1 on a Q0.31 raw value >= 0."""
        half_denominator = self.bb.emit(R.right_shift(R.add(a, self.c(1 << 31)), self.c(1)))  # RoundingHalfSum(a, 1)
        x = self.bb.emit(R.add(self.c(1515870810), self.srdhm(half_denominator, self.c(-1010580540))))
        for _ in range(3):
            one_minus = R.subtract(self.c(1 << 29), self.srdhm(half_denominator, x))
            x = self.bb.emit(R.add(x, self.shift_left_saturating(self.srdhm(x, self.bb.emit(one_minus)), 2)))
        return self.shift_left_saturating(x, 1)


def lower_softmax(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, inp.index, out.index)
    if inp.dtype != out.dtype:
        raise UnsupportedModelError(f"SOFTMAX #{op.index}: input and output types differ")
    bb, fx = ctx.bb, _Fx(ctx.bb)
    exps, terms = _exp_tables(inp.quant.s, float(op.options.Beta()))
    x = ctx.value(inp.index)
    row_max = R.max(x, axis=-1, keepdims=True)
    index = bb.emit(R.add(R.subtract(R.astype(x, "int32"), R.astype(row_max, "int32")), const(255, "int32")))
    exp_values = bb.emit(R.take(array_const(exps), index, axis=0, mode="clip"))
    sum_of_exps = bb.emit(R.astype(R.sum(R.take(array_const(terms), index, axis=0, mode="clip"), axis=-1, keepdims=True), "int64"))
    # GetReciprocal: headroom_plus_one = CountLeadingZeros(sum) = 32 - bit length.
    powers = array_const(np.left_shift(np.int64(1), np.arange(32, dtype=np.int64)))
    bit_length = R.sum(R.astype(R.greater_equal(R.expand_dims(sum_of_exps, -1), powers), "int64"), axis=-1)
    headroom_plus_one = bb.emit(R.subtract(fx.c(32), bit_length))
    shifted_sum_minus_one = bb.emit(R.subtract(R.left_shift(sum_of_exps, headroom_plus_one), fx.c(1 << 31)))
    shifted_scale = fx.one_over_one_plus_x(shifted_sum_minus_one)
    exponent = bb.emit(R.add(R.subtract(fx.c(ACCUMULATION_INTEGER_BITS), headroom_plus_one), fx.c(31 - 8)))
    scaled = fx.rdbpot(fx.srdhm(shifted_scale, exp_values), exponent)
    lo, hi = DTYPE_RANGE[out.dtype]
    ctx.set(out.index, clamp_cast(bb, R.add(scaled, fx.c(lo)), lo, hi, out.dtype))
    return Lowered()
