"""AVERAGE_POOL_2D, MAX_POOL_2D and MEAN on 8-bit tensors, with TFLite's integer rounding."""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, activation_of, require_quantized
from .fixedpoint import DTYPE_RANGE, activation_range, quantize_multiplier
from .graph import Operator
from .relax_int import clamp_cast, const, requantize_to, rounded_division

R = relax.op


def _pool_geometry(size: int, kernel: int, stride: int, same: bool) -> tuple[int, int, int]:
    """(output size, padding before, padding after) as TFLite computes them for pooling."""
    out = (size + stride - 1) // stride if same else (size - kernel) // stride + 1
    total = max((out - 1) * stride + kernel - size, 0) if same else 0
    return out, total // 2, total - total // 2


def _window_geometry(ctx: LoweringContext, op: Operator):
    inp = ctx.tensor(op.inputs[0])
    o = op.options
    same = o.Padding() == 0
    kernel = (o.FilterHeight(), o.FilterWidth())
    stride = (o.StrideH(), o.StrideW())
    rows = _pool_geometry(inp.shape[1], kernel[0], stride[0], same)
    cols = _pool_geometry(inp.shape[2], kernel[1], stride[1], same)
    return inp, kernel, stride, rows, cols


def _window_sum(ctx: LoweringContext, x: relax.Expr, kernel, stride, rows, cols) -> relax.Expr:
    """int32 sum of each pooling window, padded taps skipped: one reduction kernel (a conv-like
    anchor, so the division after it runs inside its tiles)."""
    (out_h, top, _), (out_w, left, _) = rows, cols
    batch, height, width, channels = (int(d) for d in x.ty.shape)

    def compute(data: te.Tensor) -> te.Tensor:
        ry, rx = te.reduce_axis((0, kernel[0]), "ry"), te.reduce_axis((0, kernel[1]), "rx")

        def tap(b, y, xx, c):
            iy, ix = y * stride[0] + ry - top, xx * stride[1] + rx - left
            value = data[b, iy, ix, c].astype("int32")
            if not (top or left or (out_h - 1) * stride[0] + kernel[0] - top > height
                    or (out_w - 1) * stride[1] + kernel[1] - left > width):
                return value
            inside = tirx.all(iy >= 0, iy < height, ix >= 0, ix < width)
            return tirx.if_then_else(inside, value, tirx.const(0, "int32"))

        return te.compute((batch, out_h, out_w, channels),
                          lambda b, y, xx, c: te.sum(tap(b, y, xx, c), axis=[ry, rx]), name="window_sum")

    return ctx.bb.emit_te(compute, x, primfunc_name_hint="window_sum")


def _valid_counts(size: int, kernel: int, stride: int, out: int, before: int) -> np.ndarray:
    starts = np.arange(out) * stride - before
    return np.minimum(starts + kernel, size) - np.maximum(starts, 0)


def lower_average_pool2d(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, kernel, stride, rows, cols = _window_geometry(ctx, op)
    out = ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, inp.index, out.index)
    is_global = rows[0] == 1 and cols[0] == 1 and kernel == tuple(inp.shape[1:3]) and not any(rows[1:] + cols[1:])
    if is_global:
        acc = ctx.bb.emit(R.sum(R.astype(ctx.value(inp.index), "int32"), axis=[1, 2], keepdims=True))
        counts = np.int32(kernel[0] * kernel[1])
    else:
        acc = _window_sum(ctx, ctx.value(inp.index), kernel, stride, rows, cols)
        counts = np.outer(
            _valid_counts(inp.shape[1], kernel[0], stride[0], rows[0], rows[1]),
            _valid_counts(inp.shape[2], kernel[1], stride[1], cols[0], cols[1]),
        ).astype(np.int32)
        counts = np.int32(counts.flat[0]) if np.all(counts == counts.flat[0]) else counts.reshape(1, rows[0], cols[0], 1)
    average = rounded_division(ctx.bb, acc, counts)
    lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
    ctx.set(out.index, clamp_cast(ctx.bb, average, lo, hi, out.dtype))
    return Lowered()


def lower_max_pool2d(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, kernel, stride, rows, cols = _window_geometry(ctx, op)
    out = ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, inp.index, out.index)
    x = ctx.value(inp.index)
    (_, top, bottom), (_, left, right) = rows, cols
    if top or bottom or left or right:  # padded taps must never win the max
        lowest = float(DTYPE_RANGE[inp.dtype][0])
        x = ctx.bb.emit(R.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0], pad_value=lowest))
    pooled = ctx.bb.emit(R.nn.max_pool2d(x, pool_size=kernel, strides=stride, padding=0, layout="NHWC"))
    lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
    ctx.set(out.index, clamp_cast(ctx.bb, pooled, lo, hi, out.dtype))
    return Lowered()


def lower_mean(ctx: LoweringContext, op: Operator) -> Lowered:
    """reference_ops::QuantizedMeanOrSum: int32 sum, multiplier divided by the count, one requantization."""
    inp, axes_t, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, inp.index, out.index)
    if axes_t.data is None:
        raise UnsupportedModelError(f"MEAN #{op.index}: the axes are not constant")
    rank = len(inp.shape)
    axes = sorted({int(a) % rank for a in axes_t.data.reshape(-1)})
    count = int(np.prod([inp.shape[a] for a in axes]))
    multiplier, shift = quantize_multiplier(float(inp.quant.s) / float(out.quant.s))
    extra = min(count.bit_length() - 1, 32, 31 + shift)
    multiplier = ((multiplier << extra) // count) if extra >= 0 else multiplier
    shift -= extra
    total = ctx.bb.emit(R.sum(R.astype(ctx.value(inp.index), "int32"), axis=axes, keepdims=True))
    if inp.quant.zp:
        total = ctx.bb.emit(R.subtract(total, const(inp.quant.zp * count, "int32")))
    lo, hi = DTYPE_RANGE[out.dtype]
    ctx.set(out.index, requantize_to(ctx.bb, total, multiplier, shift, out.quant.zp, lo, hi, out.dtype))
    return Lowered()
