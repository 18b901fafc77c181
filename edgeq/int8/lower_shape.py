"""Data-movement ops: RESHAPE, SQUEEZE, EXPAND_DIMS, TRANSPOSE, CONCATENATION, PAD/PADV2, RESIZE_NEAREST_NEIGHBOR."""
from __future__ import annotations

import numpy as np
from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, activation_of
from .fixedpoint import DTYPE_RANGE, activation_range, round_half_away
from .graph import Operator
from .relax_int import array_const, clamp_cast, lookup

R = relax.op


def _same_quantization(a, b) -> bool:
    if a.quant is None or b.quant is None:
        return a.quant is None and b.quant is None
    return bool(np.array_equal(a.quant.scale, b.quant.scale) and np.array_equal(a.quant.zero_point, b.quant.zero_point))


def lower_reshape(ctx: LoweringContext, op: Operator) -> Lowered:
    """RESHAPE, SQUEEZE and EXPAND_DIMS: the output shape is recorded in the graph."""
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if not _same_quantization(inp, out):
        raise UnsupportedModelError(f"{op.name} #{op.index}: input and output quantization differ")
    ctx.set(out.index, ctx.bb.emit(R.reshape(ctx.value(inp.index), out.shape)))
    return Lowered()


def lower_transpose(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, perm, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    if perm.data is None:
        raise UnsupportedModelError(f"TRANSPOSE #{op.index}: the permutation is not constant")
    ctx.set(out.index, ctx.bb.emit(R.permute_dims(ctx.value(inp.index), [int(p) for p in perm.data])))
    return Lowered()


def _rescale_table(src, out) -> np.ndarray:
    """ConcatenationWithScaling (uint8): round(q * scale + bias) + zp_out in float32, per value."""
    inverse = np.float32(1.0) / out.quant.s
    scale = np.float32(src.quant.s * inverse)
    bias = np.float32(np.float32(-src.quant.zp) * scale)
    lo, hi = DTYPE_RANGE[out.dtype]
    values = np.arange(*(DTYPE_RANGE[src.dtype][0], DTYPE_RANGE[src.dtype][1] + 1))
    table = [min(max(round_half_away(float(np.float32(np.float32(v) * scale) + bias)) + out.quant.zp, lo), hi) for v in values]
    return np.asarray(table, dtype=out.dtype)


def lower_concatenation(ctx: LoweringContext, op: Operator) -> Lowered:
    out = ctx.tensor(op.outputs[0])
    parts = []
    for index in op.inputs:
        src = ctx.tensor(index)
        value = ctx.value(index)
        if out.quant is not None and not _same_quantization(src, out):
            if out.dtype == "int8":
                raise UnsupportedModelError(f"CONCATENATION #{op.index}: int8 inputs must share the output's quantization")
            value = lookup(ctx.bb, value, _rescale_table(src, out))
        parts.append(value)
    axis = op.options.Axis() % len(out.shape)
    result = ctx.bb.emit(R.concat(parts, axis=axis))
    if out.quant is not None and activation_of(op) != "NONE":
        lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
        result = clamp_cast(ctx.bb, result, lo, hi, out.dtype)
    ctx.set(out.index, result)
    return Lowered()


def lower_pad(ctx: LoweringContext, op: Operator) -> Lowered:
    """PAD pads with the output zero point (real 0); PADV2 with its constant value tensor."""
    inp, paddings, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    if paddings.data is None:
        raise UnsupportedModelError(f"{op.name} #{op.index}: the paddings are not constant")
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        fill = ctx.tensor(op.inputs[2])
        if fill.data is None:
            raise UnsupportedModelError(f"PADV2 #{op.index}: the pad value is not constant")
        pad_value = float(fill.data.reshape(-1)[0])
    else:
        pad_value = float(out.quant.zp) if out.quant is not None else 0.0
    widths = [int(v) for v in paddings.data.reshape(-1)]
    ctx.set(out.index, ctx.bb.emit(R.nn.pad(ctx.value(inp.index), widths, pad_value=pad_value)))
    return Lowered()


def _nearest_indices(in_size: int, out_size: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """reference_ops::ResizeNearestNeighbor source indices, in float32 like the kernel."""
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if align_corners and out_size > 1 else np.float32(in_size) / np.float32(out_size)
    offset = np.float32(0.5) if half_pixel else np.float32(0.0)
    indices = []
    for y in range(out_size):
        value = np.float32(np.float32(y) + offset) * scale
        source = round_half_away(float(value)) if align_corners else int(np.floor(value))
        if half_pixel:
            source = max(source, 0)
        indices.append(min(source, in_size - 1))
    return np.asarray(indices, np.int32)


def lower_resize_nearest(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    o = op.options
    align, half = bool(o.AlignCorners()), bool(o.HalfPixelCenters())
    x = ctx.value(inp.index)
    for axis in (1, 2):
        indices = _nearest_indices(inp.shape[axis], out.shape[axis], align, half)
        x = ctx.bb.emit(R.take(x, array_const(indices), axis=axis, mode="clip"))
    ctx.set(out.index, x)
    return Lowered()
