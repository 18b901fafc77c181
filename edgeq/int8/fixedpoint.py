"""Host-side, bit-exact emulation of TFLite's (and gemmlowp's) integer arithmetic.

Used at compile time to derive multipliers and to build 256-entry lookup tables for per-element
int8/uint8 ops. Everything here works on Python ints or float32/float64 numpy scalars so that the
rounding of every step matches the C++ of TFLite's reference kernels.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def wrap32(x: int) -> int:
    """Two's-complement wrap of a Python int to int32, as C++ integer overflow behaves in practice."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: real ~= multiplier * 2**(shift - 31), multiplier in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    mantissa, shift = math.frexp(real)
    q = round_half_away(mantissa * (1 << 31))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(q), int(shift)


def round_half_away(x: float) -> int:
    """std::round on a double: halves away from zero."""
    t = math.trunc(x)
    if abs(x - t) >= 0.5:
        t += 1 if x > 0 else -1
    return int(t)


def srdhm(a: int, b: int, bits: int = 32) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32 (bits=32) or int16 (bits=16)."""
    lo = -(1 << (bits - 1))
    if a == b == lo:
        return (1 << (bits - 1)) - 1
    ab = a * b
    nudge = (1 << (bits - 2)) if ab >= 0 else 1 - (1 << (bits - 2))
    total = ab + nudge
    q = abs(total) >> (bits - 1)  # C++ division truncates toward zero
    return q if total >= 0 else -q


def rdbpot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT: rounding arithmetic right shift, halves away from zero."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def saturating_shift_left(x: int, exponent: int, bits: int = 32) -> int:
    """gemmlowp SaturatingRoundingMultiplyByPOT with a positive exponent."""
    threshold = (1 << (bits - 1 - exponent)) - 1
    if x > threshold:
        return (1 << (bits - 1)) - 1
    if x < -threshold:
        return -(1 << (bits - 1))
    return x << exponent


def multiply_by_quantized_multiplier(x: int, multiplier: int, shift: int) -> int:
    """TFLite MultiplyByQuantizedMultiplier (int32, double rounding: the default build)."""
    left = shift if shift > 0 else 0
    right = -shift if shift < 0 else 0
    return rdbpot(srdhm(wrap32(x * (1 << left)), multiplier), right)


# --- gemmlowp fixed-point exp (Q0.31 result), used by the reference int8/uint8 softmax ---------------


def _fx_mul(a: int, b: int) -> int:
    return srdhm(a, b)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: int) -> int:
    constant_term = 1895147668  # exp(-1/8) in Q0.31
    constant_1_over_3 = 715827883
    x = wrap32(a + (1 << 28))
    x2 = _fx_mul(x, x)
    x3 = _fx_mul(x2, x)
    x4 = _fx_mul(x2, x2)
    x4_over_4 = rdbpot(x4, 2)
    poly = rdbpot(wrap32(_fx_mul(wrap32(x4_over_4 + x3), constant_1_over_3) + x2), 1)
    return wrap32(constant_term + _fx_mul(constant_term, wrap32(x + poly)))


_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401), (4, 242))


def exp_on_negative_values(a: int, integer_bits: int) -> int:
    """gemmlowp exp_on_negative_values for a FixedPoint<int32, integer_bits> raw value; returns Q0.31 raw."""
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    mask = one_quarter - 1
    a_mod_quarter_minus_one_quarter = wrap32((a & mask) - one_quarter)
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        saturating_shift_left(a_mod_quarter_minus_one_quarter, integer_bits) if integer_bits else a_mod_quarter_minus_one_quarter
    )
    remainder = wrap32(a_mod_quarter_minus_one_quarter - a)
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            if remainder & (1 << (fractional_bits + exponent)):
                result = _fx_mul(result, multiplier)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        if a < clamp:
            result = 0
    if a == 0:
        result = INT32_MAX
    return result


# --- activation ranges and lookup tables -----------------------------------------------------------

DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "int32": (INT32_MIN, INT32_MAX)}


def _quantize_float32(value: float, scale: np.float32, zero_point: int) -> int:
    """kernel_util Quantize(): zero_point + TfLiteRound(f / scale), in float32."""
    return zero_point + round_half_away(float(np.float32(value) / np.float32(scale)))


def activation_range(activation: str, dtype: str, scale: np.float32, zero_point: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized: the integer clamp of a fused activation."""
    qmin, qmax = DTYPE_RANGE[dtype]
    if activation == "NONE":
        return qmin, qmax
    if activation == "RELU":
        return max(qmin, _quantize_float32(0.0, scale, zero_point)), qmax
    if activation == "RELU6":
        lo = max(qmin, _quantize_float32(0.0, scale, zero_point))
        return lo, min(qmax, _quantize_float32(6.0, scale, zero_point))
    if activation == "RELU_N1_TO_1":
        lo = max(qmin, _quantize_float32(-1.0, scale, zero_point))
        return lo, min(qmax, _quantize_float32(1.0, scale, zero_point))
    raise ValueError(f"fused activation {activation} has no integer clamp")


def domain(dtype: str) -> np.ndarray:
    """All values of an 8-bit type in table order (index = value - min)."""
    lo, hi = DTYPE_RANGE[dtype]
    return np.arange(lo, hi + 1, dtype=np.int64)


def float_transform_table(
    in_dtype: str, in_scale: np.float32, in_zp: int, out_dtype: str, out_scale: np.float32, out_zp: int,
    transform: Callable[[np.float32], np.float32],
) -> np.ndarray:
    """LUTPopulateInt8: dequantize, transform and requantize every 8-bit value in float32 arithmetic."""
    lo, hi = DTYPE_RANGE[out_dtype]
    inverse_scale = np.float32(1.0) / np.float32(out_scale)
    table = []
    for value in domain(in_dtype):
        dequantized = np.float32(in_scale) * np.float32(value - in_zp)
        transformed = transform(dequantized)
        rescaled = round_half_away(float(np.float32(transformed * inverse_scale)))
        table.append(min(max(rescaled + out_zp, lo), hi))
    return np.asarray(table, dtype=out_dtype)


def expf(x: np.float32) -> np.float32:
    """expf as glibc computes it (correctly rounded for all practical inputs)."""
    return np.float32(math.exp(float(x)))


def logistic_f32(x: np.float32) -> np.float32:
    return np.float32(np.float32(1.0) / np.float32(np.float32(1.0) + expf(np.float32(-x))))


def tanh_f32(x: np.float32) -> np.float32:
    return np.float32(math.tanh(float(x)))


def requantize_table(in_dtype: str, in_zp: int, out_dtype: str, out_zp: int, multiplier: int, shift: int) -> np.ndarray:
    """reference_ops::Requantize over every 8-bit value."""
    lo, hi = DTYPE_RANGE[out_dtype]
    values = [
        min(max(multiply_by_quantized_multiplier(int(v) - in_zp, multiplier, shift) + out_zp, lo), hi)
        for v in domain(in_dtype)
    ]
    return np.asarray(values, dtype=out_dtype)


def relu_table(
    dtype: str, in_scale: np.float32, in_zp: int, out_scale: np.float32, out_zp: int, low: float, high: float | None
) -> np.ndarray:
    """QuantizedReluX (RELU, RELU6, RELU_N1_TO_1): requantize, then clamp to the quantized bounds."""
    multiplier, shift = quantize_multiplier(float(np.float32(in_scale / out_scale)))
    qmin, qmax = DTYPE_RANGE[dtype]
    lo = max(qmin, out_zp + round_half_away(float(np.float32(low) / np.float32(out_scale))))
    hi = qmax if high is None else min(qmax, out_zp + round_half_away(float(np.float32(high) / np.float32(out_scale))))
    values = [
        min(max(out_zp + multiply_by_quantized_multiplier(int(v) - in_zp, multiplier, shift), lo), hi)
        for v in domain(dtype)
    ]
    return np.asarray(values, dtype=dtype)


def dequantize_table(in_dtype: str, scale: np.float32, zero_point: int) -> np.ndarray:
    """reference Dequantize: float(double(scale) * (q - zero_point))."""
    return np.asarray([float(scale) * float(v - zero_point) for v in domain(in_dtype)], dtype=np.float32)


def _downscale_to_int16(multiplier: int) -> int:
    if multiplier >= INT32_MAX - (1 << 15):
        return 32767
    return (multiplier + (1 << 15)) >> 16


def _wrap16(x: int) -> int:
    return ((x + (1 << 15)) & 0xFFFF) - (1 << 15)


def hard_swish_table(dtype: str, in_scale: np.float32, in_zp: int, out_scale: np.float32, out_zp: int) -> np.ndarray:
    """reference_ops::HardSwish (quantized, 16-bit fixed point) over every 8-bit value."""
    hires_input_scale = np.float32(np.float32(1.0 / 128.0) * np.float32(in_scale))
    reluish_scale = np.float32(3.0) / np.float32(32768.0)
    out_mult, out_exp = quantize_multiplier(float(np.float32(hires_input_scale / np.float32(out_scale))))
    out_mult16 = _downscale_to_int16(out_mult)
    relu_mult, relu_exp = quantize_multiplier(float(np.float32(hires_input_scale / reluish_scale)))
    relu_mult16 = _downscale_to_int16(relu_mult)
    lo, hi = DTYPE_RANGE[dtype]

    def saturating_left_shift16(value: int, amount: int) -> int:
        return min(max(value * (1 << amount), -32768), 32767)

    def saturating_doubling_high_mul16(a: int, b: int) -> int:
        if a == b == -32768:
            return 32767
        ab = a * b
        q = abs(ab) >> 15
        return _wrap16(q if ab >= 0 else -q)

    table = []
    for value in domain(dtype):
        input_value = _wrap16(int(value) - in_zp)
        hires = _wrap16(input_value * (1 << 7))
        preshift_output = srdhm(hires, out_mult16, bits=16)
        reluish = hires
        if relu_exp > 0:
            reluish = saturating_left_shift16(reluish, relu_exp - 1)
        reluish = srdhm(reluish, relu_mult16, bits=16)
        if relu_exp > 0:
            reluish = saturating_left_shift16(reluish, 1)
        if relu_exp < 0:
            reluish = rdbpot(reluish, -relu_exp)
        reluish = _wrap16((reluish + (1 << 15)) >> 1)
        preshift = saturating_doubling_high_mul16(reluish, preshift_output)
        out = _wrap16(rdbpot(preshift, -out_exp) + out_zp)
        table.append(min(max(out, lo), hi))
    return np.asarray(table, dtype=dtype)
