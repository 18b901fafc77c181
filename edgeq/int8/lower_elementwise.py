"""ADD, SUB, MUL with TFLite's integer rescaling, and per-element 8-bit ops as 256-entry lookup tables.

LOGISTIC, TANH, HARD_SWISH, 8-bit QUANTIZE (requantize) and DEQUANTIZE are functions of one 8-bit
value, so each becomes a table computed at compile time by emulating TFLite's own arithmetic
(fixedpoint.py) and one Relax ``take``.
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, activation_of, require_quantized
from .graph import Operator
from .fixedpoint import (
    DTYPE_RANGE,
    activation_range,
    dequantize_table,
    float_transform_table,
    hard_swish_table,
    logistic_f32,
    quantize_multiplier,
    relu_table,
    requantize_table,
    tanh_f32,
)
from .relax_int import clamp_cast, const, lookup, multiply_by_quantized_multiplier, requantize_to, round_half_away_float

R = relax.op
ADD_LEFT_SHIFT = 20  # TFLite's headroom shift for 8-bit ADD/SUB


def _offset_input(ctx: LoweringContext, index: int) -> relax.Expr:
    """x - zero_point as int32."""
    x = R.astype(ctx.value(index), "int32")
    zp = ctx.tensor(index).quant.zp
    return ctx.bb.emit(R.subtract(x, const(zp, "int32")) if zp else x)


def _add_sub(ctx: LoweringContext, op: Operator, subtract: bool) -> Lowered:
    a, b, out = (ctx.tensor(i) for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    require_quantized(ctx, op, a.index, b.index, out.index)
    twice_max = 2.0 * float(max(a.quant.s, b.quant.s))
    real_a = float(a.quant.s) / twice_max
    real_b = float(b.quant.s) / twice_max
    real_out = twice_max / float(np.float32((1 << ADD_LEFT_SHIFT) * out.quant.s))
    scaled = []
    for tensor, real in ((a, real_a), (b, real_b)):
        multiplier, shift = quantize_multiplier(real)
        shifted = ctx.bb.emit(R.multiply(_offset_input(ctx, tensor.index), const(1 << ADD_LEFT_SHIFT, "int32")))
        scaled.append(multiply_by_quantized_multiplier(ctx.bb, shifted, multiplier, shift))
    raw = ctx.bb.emit(R.subtract(*scaled) if subtract else R.add(*scaled))
    multiplier, shift = quantize_multiplier(real_out)
    lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
    ctx.set(out.index, requantize_to(ctx.bb, raw, multiplier, shift, out.quant.zp, lo, hi, out.dtype))
    return Lowered()


def lower_add(ctx: LoweringContext, op: Operator) -> Lowered:
    return _add_sub(ctx, op, subtract=False)


def lower_sub(ctx: LoweringContext, op: Operator) -> Lowered:
    return _add_sub(ctx, op, subtract=True)


def lower_mul(ctx: LoweringContext, op: Operator) -> Lowered:
    a, b, out = (ctx.tensor(i) for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    require_quantized(ctx, op, a.index, b.index, out.index)
    real = float(np.float32(np.float32(a.quant.s * b.quant.s) / out.quant.s))  # float32 math, as mul.cc
    multiplier, shift = quantize_multiplier(real)
    product = ctx.bb.emit(R.multiply(_offset_input(ctx, a.index), _offset_input(ctx, b.index)))
    lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
    ctx.set(out.index, requantize_to(ctx.bb, product, multiplier, shift, out.quant.zp, lo, hi, out.dtype))
    return Lowered()


def _unary_tensors(ctx: LoweringContext, op: Operator):
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, inp.index, out.index)
    return inp, out


def lower_logistic(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = _unary_tensors(ctx, op)
    table = float_transform_table(inp.dtype, inp.quant.s, inp.quant.zp, out.dtype, out.quant.s, out.quant.zp, logistic_f32)
    ctx.set(out.index, lookup(ctx.bb, ctx.value(inp.index), table))
    return Lowered()


def lower_tanh(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = _unary_tensors(ctx, op)
    table = float_transform_table(inp.dtype, inp.quant.s, inp.quant.zp, out.dtype, out.quant.s, out.quant.zp, tanh_f32)
    ctx.set(out.index, lookup(ctx.bb, ctx.value(inp.index), table))
    return Lowered()


def lower_hard_swish(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = _unary_tensors(ctx, op)
    if inp.dtype != out.dtype:
        raise UnsupportedModelError(f"HARD_SWISH #{op.index}: input and output types differ")
    table = hard_swish_table(inp.dtype, inp.quant.s, inp.quant.zp, out.quant.s, out.quant.zp)
    ctx.set(out.index, lookup(ctx.bb, ctx.value(inp.index), table))
    return Lowered()


RELU_BOUNDS = {"RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}


def lower_relu(ctx: LoweringContext, op: Operator) -> Lowered:
    """Standalone RELU / RELU6 / RELU_N1_TO_1 / RELU_0_TO_1 on 8-bit tensors (requantize + clamp table)."""
    inp, out = _unary_tensors(ctx, op)
    low, high = RELU_BOUNDS[op.name]
    table = relu_table(inp.dtype, inp.quant.s, inp.quant.zp, out.quant.s, out.quant.zp, low, high)
    ctx.set(out.index, lookup(ctx.bb, ctx.value(inp.index), table))
    return Lowered()


def lower_quantize(ctx: LoweringContext, op: Operator) -> Lowered:
    """float32 -> 8-bit: round(x / scale) + zp in float32 (boundary op); 8-bit -> 8-bit: Requantize table."""
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, out.index)
    if out.quant.per_channel:
        raise UnsupportedModelError(f"QUANTIZE #{op.index}: per-channel output quantization is not supported")
    if inp.dtype == "float32":
        rounded = round_half_away_float(ctx.bb, ctx.value(inp.index), np.float32(out.quant.s), divide=True)
        q = R.add(R.astype(rounded, "int32"), const(out.quant.zp, "int32"))
        lo, hi = DTYPE_RANGE[out.dtype]
        ctx.set(out.index, clamp_cast(ctx.bb, q, lo, hi, out.dtype))
        return Lowered(integer=False, float_reason="quantizes the model's float32 input (float division by the scale)")
    require_quantized(ctx, op, inp.index)
    multiplier, shift = quantize_multiplier(float(inp.quant.s) / float(out.quant.s))
    table = requantize_table(inp.dtype, inp.quant.zp, out.dtype, out.quant.zp, multiplier, shift)
    ctx.set(out.index, lookup(ctx.bb, ctx.value(inp.index), table))
    return Lowered()


def lower_dequantize(ctx: LoweringContext, op: Operator) -> Lowered:
    """8-bit -> float32 through a table of float(double(scale) * (q - zp)); float16 constants are widened."""
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if inp.dtype == "float16":
        ctx.set(out.index, ctx.bb.emit(R.astype(ctx.value(inp.index), "float32")))
        return Lowered(integer=False, float_reason="widens float16 weights to float32")
    require_quantized(ctx, op, inp.index)
    if inp.quant.per_channel:
        raise UnsupportedModelError(f"DEQUANTIZE #{op.index}: per-channel dequantization is not supported")
    table = dequantize_table(inp.dtype, inp.quant.s, inp.quant.zp)
    ctx.set(out.index, lookup(ctx.bb, ctx.value(inp.index), table))
    return Lowered(integer=False, float_reason="dequantizes to the model's float32 output (exact table lookup)")

