"""Float islands: ops of a quantized model whose activations are float32, as TFLite's float kernels.

A quantized model may keep some layers float between a DEQUANTIZE and a QUANTIZE (edgeq's accuracy
budget does, as TFLite's converter does for ops it cannot quantize). These lowerings compute such
ops in float32 the way TFLite's reference float kernels do (same padding, bias after the sum, the
fused activation as a clamp, the same LOGISTIC cut-offs and SOFTMAX steps), so the integer ops around
them stay bit-exact. Float sums may be accumulated in another order than TFLite's loops, so a float
island's output can differ in the last bits, and the QUANTIZE after it by one step where a value
lands on a rounding boundary (measured: identical outputs on the tests' models). Products are never
followed by an add inside one lowering except in the convolution/matmul sums themselves, and TVM
0.27's LLVM code generator did not contract fused multiply-adds into FMA instructions (checked on
x86 with -mcpu=haswell), so TFLite's separately rounded products are kept.
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext, activation_of
from .graph import Operator
from .lower_linear import same_padding
from .relax_int import array_const, as_rows, const

R = relax.op
FLOAT_ACTIVATION_BOUNDS = {"NONE": (None, None), "RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
UNARY_BOUNDS = {"RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}
LOGISTIC_CUTOFF_UPPER = 16.619047164916992188  # reference_ops::Logistic (float)
LOGISTIC_CUTOFF_LOWER = -9.0


def is_float_island(ctx: LoweringContext, op: Operator) -> bool:
    """True when every computed input and every output of ``op`` is float32 (QUANTIZE/DEQUANTIZE excluded)."""
    if op.name in ("QUANTIZE", "DEQUANTIZE"):
        return False
    activations = [i for i in op.inputs if i >= 0 and ctx.tensor(i).data is None] + list(op.outputs)
    return bool(activations) and all(ctx.tensor(i).dtype == "float32" for i in activations)


def _clamp(x: relax.Expr, low: float | None, high: float | None) -> relax.Expr:
    """min(max(x, low), high) in float32: TFLite's ActivationFunctionWithMinMax."""
    if low is not None:
        x = R.maximum(x, const(low, "float32"))
    if high is not None:
        x = R.minimum(x, const(high, "float32"))
    return x


def _activate(ctx: LoweringContext, op: Operator, x: relax.Expr) -> relax.Expr:
    activation = activation_of(op)
    if activation not in FLOAT_ACTIVATION_BOUNDS:
        raise UnsupportedModelError(f"{op.name} #{op.index}: fused activation {activation} has no float lowering")
    return ctx.bb.emit(_clamp(x, *FLOAT_ACTIVATION_BOUNDS[activation]))


def _float_constant(ctx: LoweringContext, op: Operator, index: int, what: str) -> np.ndarray:
    tensor = ctx.tensor(index)
    if tensor.data is None or tensor.dtype != "float32":
        raise UnsupportedModelError(f"{op.name} #{op.index}: the {what} must be a constant float32 tensor in a float op")
    return tensor.data


def _paddings(op: Operator, shape, kernel, stride, dilation=(1, 1)) -> list[int]:
    """Relax's [top, left, bottom, right] for the op's padding mode."""
    if op.options.Padding() != 0:  # VALID
        return [0, 0, 0, 0]
    (top, bottom), (left, right) = (same_padding(shape[axis], kernel[n], stride[n], dilation[n]) for n, axis in enumerate((1, 2)))
    return [top, left, bottom, right]


def _with_bias(ctx: LoweringContext, op: Operator, x: relax.Expr) -> relax.Expr:
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        return ctx.bb.emit(R.add(x, array_const(_float_constant(ctx, op, op.inputs[2], "bias").astype(np.float32))))
    return x


def _conv(ctx: LoweringContext, op: Operator, depthwise: bool) -> Lowered:
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    weights = _float_constant(ctx, op, op.inputs[1], "filter")
    o = op.options
    stride = (o.StrideH(), o.StrideW())
    dilation = (o.DilationHFactor(), o.DilationWFactor())
    if depthwise:  # [1, KH, KW, C*M] -> HWIO [KH, KW, 1, C*M], one group per input channel
        kernel, groups = weights[0][:, :, None, :], inp.shape[3]
    else:  # OHWI -> HWIO
        kernel, groups = weights.transpose(1, 2, 3, 0), inp.shape[3] // weights.shape[3]
    acc = ctx.bb.emit(
        R.nn.conv2d(
            ctx.value(inp.index), array_const(np.ascontiguousarray(kernel, np.float32)), strides=stride,
            padding=_paddings(op, inp.shape, kernel.shape[:2], stride, dilation), dilation=dilation, groups=groups,
            data_layout="NHWC", kernel_layout="HWIO", out_dtype="float32",
        )
    )
    ctx.set(out.index, _activate(ctx, op, _with_bias(ctx, op, acc)))
    return Lowered(integer=False, macs=int(np.prod(out.shape)) * kernel.shape[0] * kernel.shape[1] * kernel.shape[2])


def lower_conv2d_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _conv(ctx, op, depthwise=False)


def lower_depthwise_conv2d_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _conv(ctx, op, depthwise=True)


def lower_fully_connected_float(ctx: LoweringContext, op: Operator) -> Lowered:
    inp, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if op.options is not None and op.options.WeightsFormat() != 0:
        raise UnsupportedModelError(f"FULLY_CONNECTED #{op.index}: shuffled weights are not supported")
    weights = _float_constant(ctx, op, op.inputs[1], "weights")
    units, depth = weights.shape
    x = as_rows(ctx.bb, ctx.value(inp.index), depth)
    acc = ctx.bb.emit(R.matmul(x, array_const(np.ascontiguousarray(weights.T, np.float32)), out_dtype="float32"))
    ctx.set(out.index, _activate(ctx, op, _with_bias(ctx, op, acc)))
    return Lowered(integer=False, macs=(int(np.prod(inp.shape)) // depth) * units * depth)


def _binary(ctx: LoweringContext, op: Operator, function) -> Lowered:
    a, b = (ctx.value(i) for i in op.inputs[:2])
    ctx.set(op.outputs[0], _activate(ctx, op, ctx.bb.emit(function(a, b))))
    return Lowered(integer=False)


def lower_add_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _binary(ctx, op, R.add)


def lower_sub_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _binary(ctx, op, R.subtract)


def lower_mul_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _binary(ctx, op, R.multiply)


def _pool(ctx: LoweringContext, op: Operator, average: bool) -> Lowered:
    inp = ctx.tensor(op.inputs[0])
    o = op.options
    kernel, stride = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
    padding = _paddings(op, inp.shape, kernel, stride)
    x = ctx.value(inp.index)
    if average:  # padded taps are not counted, as TFLite divides by the taps inside the picture
        pooled = R.nn.avg_pool2d(x, kernel, stride, padding, layout="NHWC", count_include_pad=False)
    else:
        pooled = R.nn.max_pool2d(x, kernel, stride, padding, layout="NHWC")
    ctx.set(op.outputs[0], _activate(ctx, op, ctx.bb.emit(pooled)))
    return Lowered(integer=False)


def lower_average_pool2d_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _pool(ctx, op, average=True)


def lower_max_pool2d_float(ctx: LoweringContext, op: Operator) -> Lowered:
    return _pool(ctx, op, average=False)


def lower_mean_float(ctx: LoweringContext, op: Operator) -> Lowered:
    """Sum over the axes, then one division by the count (reference_ops::Mean)."""
    inp, axes_t, out = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    if axes_t.data is None:
        raise UnsupportedModelError(f"MEAN #{op.index}: the axes are not constant")
    axes = sorted({int(a) % len(inp.shape) for a in axes_t.data.reshape(-1)})
    count = int(np.prod([inp.shape[a] for a in axes]))
    total = ctx.bb.emit(R.sum(ctx.value(inp.index), axis=axes, keepdims=True))
    ctx.set(out.index, ctx.bb.emit(R.divide(total, const(float(count), "float32"))))
    return Lowered(integer=False)


def lower_relu_float(ctx: LoweringContext, op: Operator) -> Lowered:
    ctx.set(op.outputs[0], ctx.bb.emit(_clamp(ctx.value(op.inputs[0]), *UNARY_BOUNDS[op.name])))
    return Lowered(integer=False)


def lower_logistic_float(ctx: LoweringContext, op: Operator) -> Lowered:
    """1 / (1 + exp(-x)), with exp(x) below -9 and 1 above 16.619 (reference_ops::Logistic)."""
    x = ctx.value(op.inputs[0])
    one = const(1.0, "float32")
    middle = R.divide(one, R.add(one, R.exp(R.negative(x))))
    result = R.where(
        R.greater(x, const(LOGISTIC_CUTOFF_UPPER, "float32")), one,
        R.where(R.less(x, const(LOGISTIC_CUTOFF_LOWER, "float32")), R.exp(x), middle),
    )
    ctx.set(op.outputs[0], ctx.bb.emit(result))
    return Lowered(integer=False)


def lower_tanh_float(ctx: LoweringContext, op: Operator) -> Lowered:
    ctx.set(op.outputs[0], ctx.bb.emit(R.tanh(ctx.value(op.inputs[0]))))
    return Lowered(integer=False)


def lower_hard_swish_float(ctx: LoweringContext, op: Operator) -> Lowered:
    """x * min(6, max(0, x + 3)) / 6, in that order (reference_ops::HardSwish)."""
    x = ctx.value(op.inputs[0])
    gate = _clamp(R.add(x, const(3.0, "float32")), 0.0, 6.0)
    ctx.set(op.outputs[0], ctx.bb.emit(R.divide(R.multiply(x, gate), const(6.0, "float32"))))
    return Lowered(integer=False)


def lower_softmax_float(ctx: LoweringContext, op: Operator) -> Lowered:
    """exp((x - max) * beta) / sum over the last axis (reference_ops::Softmax)."""
    x = ctx.value(op.inputs[0])
    beta = float(op.options.Beta()) if op.options is not None else 1.0
    shifted = R.subtract(x, R.max(x, axis=-1, keepdims=True))
    if beta != 1.0:
        shifted = R.multiply(shifted, const(beta, "float32"))
    exp = ctx.bb.emit(R.exp(shifted))
    ctx.set(op.outputs[0], ctx.bb.emit(R.divide(exp, R.sum(exp, axis=-1, keepdims=True))))
    return Lowered(integer=False)


#: Float lowerings of arithmetic ops. Data movement (RESHAPE, CONCATENATION, PAD, ...) on float
#: tensors needs none: the shape lowerings move float values as they move 8-bit ones.
FLOAT_LOWERINGS = {
    "CONV_2D": lower_conv2d_float,
    "DEPTHWISE_CONV_2D": lower_depthwise_conv2d_float,
    "FULLY_CONNECTED": lower_fully_connected_float,
    "ADD": lower_add_float,
    "SUB": lower_sub_float,
    "MUL": lower_mul_float,
    "AVERAGE_POOL_2D": lower_average_pool2d_float,
    "MAX_POOL_2D": lower_max_pool2d_float,
    "MEAN": lower_mean_float,
    "RELU": lower_relu_float,
    "RELU6": lower_relu_float,
    "RELU_N1_TO_1": lower_relu_float,
    "RELU_0_TO_1": lower_relu_float,
    "LOGISTIC": lower_logistic_float,
    "TANH": lower_tanh_float,
    "HARD_SWISH": lower_hard_swish_float,
    "SOFTMAX": lower_softmax_float,
}
