"""CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and BATCH_MATMUL as int32-accumulating Relax conv2d/matmul.

The input zero point is folded into the bias: sum((x - zx) * w) = conv(x, w) - zx * sum(w). That is
exact only where every tap reads a real pixel, so SAME padding is done explicitly with the value zx
(a padded tap then contributes (zx - zx) * w = 0, as TFLite's skipped taps do).
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, activation_of, require_quantized
from .fixedpoint import DTYPE_RANGE, activation_range, quantize_multiplier
from .graph import Operator, Tensor
from .relax_int import array_const, as_rows, requantize_float_to, requantize_to

R = relax.op


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's SAME padding (before, after) along one axis."""
    effective = (kernel - 1) * dilation + 1
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _filter_values(ctx: LoweringContext, op: Operator, filt: Tensor) -> np.ndarray:
    """Filter minus its zero point, as int8 when that fits (symmetric weights) or int16."""
    if filt.data is None:
        raise UnsupportedModelError(f"{op.name} #{op.index}: the filter is not a constant")
    if filt.dtype not in ("int8", "uint8") or filt.quant is None:
        raise UnsupportedModelError(f"{op.name} #{op.index}: filter type {filt.dtype} is not 8-bit quantized")
    zero_points = filt.quant.zero_point
    if filt.dtype == "int8" and not np.any(zero_points):
        return filt.data
    axis = filt.quant.axis if filt.quant.per_channel else 0
    shape = [1] * filt.data.ndim
    shape[axis] = -1
    return (filt.data.astype(np.int16) - zero_points.reshape(shape).astype(np.int16)).astype(np.int16)


def _multipliers(ctx: LoweringContext, inp: Tensor, filt: Tensor, out: Tensor, channels: int):
    """Per-channel (multiplier, shift) as PopulateConvolutionQuantizationParams derives them."""
    if inp.dtype == "uint8":  # legacy per-tensor path: float32 product of the scales, then double
        real = float(np.float32(inp.quant.s * filt.quant.s)) / float(out.quant.s)
        multiplier, shift = quantize_multiplier(real)
        return np.full(channels, multiplier), np.full(channels, shift)
    scales = filt.quant.scale if filt.quant.per_channel else np.full(channels, filt.quant.scale[0])
    pairs = [quantize_multiplier(float(inp.quant.s) * float(s) / float(out.quant.s)) for s in scales]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _folded_bias(ctx: LoweringContext, op: Operator, bias_index: int, weight_sums: np.ndarray, input_zp: int):
    """bias - zx * sum(w) per output channel, as an int32 constant (wrapping like TFLite's int32 acc)."""
    bias = np.zeros(weight_sums.shape, np.int64)
    if bias_index >= 0:
        b = ctx.tensor(bias_index)
        if b.data is None or b.dtype != "int32":
            raise UnsupportedModelError(f"{op.name} #{op.index}: bias must be a constant int32 tensor")
        bias = b.data.astype(np.int64)
    folded = bias - input_zp * weight_sums.astype(np.int64)
    return relax.const(((folded + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32), "int32")


def _accumulator_bound(ctx: LoweringContext, inp: Tensor, bias_index: int, abs_weight_sums: np.ndarray) -> int:
    """The largest |sum((x - zx) * w) + bias| any input can give, over the output channels."""
    qmin, qmax = DTYPE_RANGE[inp.dtype]
    span = max(inp.quant.zp - qmin, qmax - inp.quant.zp)
    bias = np.zeros(abs_weight_sums.shape, np.int64)
    if bias_index >= 0 and ctx.tensor(bias_index).data is not None:
        bias = np.abs(ctx.tensor(bias_index).data.astype(np.int64))
    return int((span * abs_weight_sums.astype(np.int64) + bias).max())


def _pad_input(ctx: LoweringContext, x, inp: Tensor, pads_hw) -> relax.Expr:
    (top, bottom), (left, right) = pads_hw
    if not (top or bottom or left or right):
        return x
    return ctx.bb.emit(
        R.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0], pad_value=float(inp.quant.zp))
    )


def _conv(ctx: LoweringContext, op: Operator, depthwise: bool) -> Lowered:
    x_index, f_index = op.inputs[0], op.inputs[1]
    b_index = op.inputs[2] if len(op.inputs) > 2 else -1
    inp, filt, out = ctx.tensor(x_index), ctx.tensor(f_index), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, x_index, op.outputs[0])
    o = op.options
    stride = (o.StrideH(), o.StrideW())
    dilation = (o.DilationHFactor(), o.DilationWFactor())
    weights = _filter_values(ctx, op, filt)
    if depthwise:  # [1, KH, KW, C*M] -> HWIO [KH, KW, 1, C*M], one group per input channel
        kernel = weights[0][:, :, None, :]
        groups = inp.shape[3]
        weight_sums = weights[0].astype(np.int64).sum(axis=(0, 1))
        abs_weight_sums = np.abs(weights[0].astype(np.int64)).sum(axis=(0, 1))
    else:  # OHWI -> HWIO; grouped when the filter's input depth is smaller than the input's
        kernel = weights.transpose(1, 2, 3, 0)
        groups = inp.shape[3] // filt.shape[3]
        weight_sums = weights.astype(np.int64).sum(axis=(1, 2, 3))
        abs_weight_sums = np.abs(weights.astype(np.int64)).sum(axis=(1, 2, 3))
    kh, kw = kernel.shape[0], kernel.shape[1]
    if o.Padding() == 0:  # SAME
        pads = (same_padding(inp.shape[1], kh, stride[0], dilation[0]), same_padding(inp.shape[2], kw, stride[1], dilation[1]))
    else:
        pads = ((0, 0), (0, 0))
    x = _pad_input(ctx, ctx.value(x_index), inp, pads)
    acc = ctx.bb.emit(
        R.nn.conv2d(
            x, array_const(kernel), strides=stride, padding=0, dilation=dilation,
            groups=groups, data_layout="NHWC", kernel_layout="HWIO", out_dtype="int32",
        )
    )
    acc = ctx.bb.emit(R.add(acc, _folded_bias(ctx, op, b_index, weight_sums, inp.quant.zp)))
    channels = kernel.shape[3]
    multiplier, shift = _multipliers(ctx, inp, filt, out, channels)
    lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
    single = ctx.kernels == "optimized"
    bound = _accumulator_bound(ctx, inp, b_index, abs_weight_sums)
    ctx.set(op.outputs[0], requantize_to(
        ctx.bb, acc, multiplier, shift, out.quant.zp, lo, hi, out.dtype, single, acc_bound=bound))
    macs = int(np.prod(out.shape)) * kh * kw * kernel.shape[2]
    return Lowered(macs=macs)


def lower_conv2d(ctx: LoweringContext, op: Operator) -> Lowered:
    return _conv(ctx, op, depthwise=False)


def lower_depthwise_conv2d(ctx: LoweringContext, op: Operator) -> Lowered:
    return _conv(ctx, op, depthwise=True)


def lower_fully_connected(ctx: LoweringContext, op: Operator) -> Lowered:
    """int32 matmul, then TFLite's reference requantization: round(double(acc) * s_in * s_w / s_out)."""
    x_index, f_index = op.inputs[0], op.inputs[1]
    b_index = op.inputs[2] if len(op.inputs) > 2 else -1
    inp, filt, out = ctx.tensor(x_index), ctx.tensor(f_index), ctx.tensor(op.outputs[0])
    require_quantized(ctx, op, x_index, op.outputs[0])
    if op.options is not None and op.options.WeightsFormat() != 0:
        raise UnsupportedModelError(f"FULLY_CONNECTED #{op.index}: shuffled weights are not supported")
    weights = _filter_values(ctx, op, filt)
    units, depth = weights.shape
    x = as_rows(ctx.bb, ctx.value(x_index), depth)
    acc = ctx.bb.emit(R.matmul(x, array_const(weights.T), out_dtype="int32"))
    acc = ctx.bb.emit(R.add(acc, _folded_bias(ctx, op, b_index, weights.astype(np.int64).sum(axis=1), inp.quant.zp)))
    lo, hi = activation_range(activation_of(op), out.dtype, out.quant.s, out.quant.zp)
    if ctx.kernels == "optimized":  # ruy GEMM: fixed-point multipliers, single rounding
        if filt.quant.per_channel:
            multiplier, shift = _multipliers(ctx, inp, filt, out, units)
        else:  # GetQuantizedConvolutionMultipler: float32 product of the scales
            pair = quantize_multiplier(float(np.float32(inp.quant.s * filt.quant.s)) / float(out.quant.s))
            multiplier, shift = np.full(units, pair[0]), np.full(units, pair[1])
        result = requantize_to(ctx.bb, acc, multiplier, shift, out.quant.zp, lo, hi, out.dtype, single_rounding=True)
    else:  # reference kernel: round(double(acc) * s_in * s_w / s_out)
        scales = filt.quant.scale if filt.quant.per_channel else np.full(units, filt.quant.scale[0])
        effective = np.array([float(inp.quant.s) * float(s) / float(out.quant.s) for s in scales], np.float64)
        result = requantize_float_to(ctx.bb, acc, effective, out.quant.zp, lo, hi, out.dtype)
    ctx.set(op.outputs[0], result)
    batches = int(np.prod(inp.shape)) // depth
    return Lowered(macs=batches * units * depth)


def lower_batch_matmul(ctx: LoweringContext, op: Operator) -> Lowered:
    """reference_ops::BatchMatMul: sum((lhs - zl) * (rhs - zr)) in int32, MultiplyByQuantizedMultiplier.

    Both operands may be activations (attention) or the right one constant; adj_x / adj_y transpose
    the last two axes first, and batch axes broadcast as in TFLite.
    """
    lhs, rhs, out = (ctx.tensor(i) for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    require_quantized(ctx, op, lhs.index, rhs.index, out.index)
    if lhs.dtype != "int8" or rhs.dtype != "int8":
        raise UnsupportedModelError(f"BATCH_MATMUL #{op.index}: only int8 operands have a TFLite kernel")
    if lhs.quant.per_channel or rhs.quant.per_channel:
        raise UnsupportedModelError(f"BATCH_MATMUL #{op.index}: per-channel quantization is not supported")

    def operand(tensor: Tensor, transpose: bool) -> relax.Expr:
        x = R.astype(ctx.value(tensor.index), "int16")
        if tensor.quant.zp:
            x = R.subtract(x, relax.const(np.int16(tensor.quant.zp), "int16"))
        if transpose:
            axes = list(range(len(tensor.shape)))
            axes[-2:] = axes[-1], axes[-2]
            x = R.permute_dims(x, axes)
        return ctx.bb.emit(x)

    options = op.options
    a = operand(lhs, bool(options and options.AdjX()))
    b = operand(rhs, bool(options and options.AdjY()))
    acc = ctx.bb.emit(R.matmul(a, b, out_dtype="int32"))
    multiplier, shift = quantize_multiplier(float(lhs.quant.s) * float(rhs.quant.s) / float(out.quant.s))
    lo, hi = activation_range("NONE", out.dtype, out.quant.s, out.quant.zp)
    ctx.set(out.index, requantize_to(ctx.bb, acc, multiplier, shift, out.quant.zp, lo, hi, out.dtype))
    depth = int(a.ty.shape[-1])
    return Lowered(macs=int(np.prod(out.shape)) * depth)
