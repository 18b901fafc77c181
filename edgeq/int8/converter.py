"""Walk a quantized TFLite graph and emit a Relax module that computes it in integer arithmetic."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import tvm
from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext
from .graph import Graph, Operator, read_graph
from .lower_elementwise import (
    lower_add,
    lower_dequantize,
    lower_hard_swish,
    lower_logistic,
    lower_mul,
    lower_quantize,
    lower_relu,
    lower_sub,
    lower_tanh,
)
from .lower_float import FLOAT_LOWERINGS, is_float_island
from .lower_linear import lower_batch_matmul, lower_conv2d, lower_depthwise_conv2d, lower_fully_connected
from .lower_pool import lower_average_pool2d, lower_max_pool2d, lower_mean
from .lower_shape import (
    lower_concatenation,
    lower_pad,
    lower_reshape,
    lower_resize_nearest,
    lower_transpose,
)
from .lower_softmax import lower_softmax
from .report import DEFAULT_FLOAT_REASON, FLOAT_REASON_PREFIX, IntegerReport
from .tvm_fallback import TvmOpFallback, fallback_for

LOWERINGS: dict[str, Callable[[LoweringContext, Operator], Lowered]] = {
    "CONV_2D": lower_conv2d,
    "DEPTHWISE_CONV_2D": lower_depthwise_conv2d,
    "FULLY_CONNECTED": lower_fully_connected,
    "BATCH_MATMUL": lower_batch_matmul,
    "ADD": lower_add,
    "SUB": lower_sub,
    "MUL": lower_mul,
    "AVERAGE_POOL_2D": lower_average_pool2d,
    "MAX_POOL_2D": lower_max_pool2d,
    "MEAN": lower_mean,
    "CONCATENATION": lower_concatenation,
    "PAD": lower_pad,
    "PADV2": lower_pad,
    "RESHAPE": lower_reshape,
    "SQUEEZE": lower_reshape,
    "EXPAND_DIMS": lower_reshape,
    "TRANSPOSE": lower_transpose,
    "RESIZE_NEAREST_NEIGHBOR": lower_resize_nearest,
    "QUANTIZE": lower_quantize,
    "DEQUANTIZE": lower_dequantize,
    "LOGISTIC": lower_logistic,
    "TANH": lower_tanh,
    "HARD_SWISH": lower_hard_swish,
    "RELU": lower_relu,
    "RELU6": lower_relu,
    "RELU_N1_TO_1": lower_relu,
    "RELU_0_TO_1": lower_relu,
    "SOFTMAX": lower_softmax,
}


def _param_names(graph: Graph) -> list[str]:
    names, seen = [], set()
    for index in graph.inputs:
        name = re.sub(r"\W", "_", graph.tensors[index].name) or f"input_{index}"
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    return names


def _check_supported(graph: Graph, model_name: str, fallback: TvmOpFallback | None = None) -> None:
    if not any(t.dtype in ("int8", "uint8") and t.quant is not None for t in graph.tensors if t.data is None):
        raise UnsupportedModelError(
            f"{model_name} has no 8-bit quantized activations; the integer importer lowers quantized models "
            "(package a float model as it is, or quantize it with --quantize int8)"
        )
    missing = sorted({
        op.name for op in graph.operators
        if op.name not in LOWERINGS and op.name not in FLOAT_LOWERINGS and not (fallback and fallback.supports(op.name))
    })
    if missing:
        raise UnsupportedModelError(
            f"{model_name} uses ops neither the integer importer nor TVM's frontend can lower: {', '.join(missing)}. "
            f"Integer kernels: {', '.join(sorted(LOWERINGS))}."
        )


def float_reason_of(model_path: str | Path) -> str:
    """Why the model's float islands are float: from its description when edgeq.quantize wrote it."""
    import tflite

    try:
        model = tflite.Model.GetRootAsModel(Path(model_path).read_bytes(), 0)
        description = (model.Description() or b"").decode("utf-8", "replace")
    except Exception:  # an unreadable description only loses the reason
        return DEFAULT_FLOAT_REASON
    return description[len(FLOAT_REASON_PREFIX):] if description.startswith(FLOAT_REASON_PREFIX) else DEFAULT_FLOAT_REASON


def _lower(ctx: LoweringContext, op: Operator, float_reason: str, fallback: TvmOpFallback | None = None) -> Lowered:
    """An op's integer lowering, its float one when its activations are float32 (a float island), or
    TVM's dequantize -> float -> quantize for an op edgeq has no kernel for."""
    if op.name in FLOAT_LOWERINGS and is_float_island(ctx, op):
        lowered = FLOAT_LOWERINGS[op.name](ctx, op)
        return replace(lowered, float_reason=f"{float_reason} (output {ctx.tensor(op.outputs[0]).name})")
    if op.name not in LOWERINGS and fallback is not None and fallback.supports(op.name):
        lowered = fallback.lower(ctx, op)
        return replace(lowered, float_reason=f"{lowered.float_reason} (output {ctx.tensor(op.outputs[0]).name})")
    if op.name not in LOWERINGS:
        raise UnsupportedModelError(
            f"{op.name} #{op.index} has a float lowering only, but its tensors are quantized; "
            f"the integer importer cannot lower it"
        )
    lowered = LOWERINGS[op.name](ctx, op)
    if op.name == "QUANTIZE" and not lowered.integer and op.inputs[0] not in ctx.graph.inputs:
        return replace(lowered, float_reason="quantizes a float island's output (float division by the scale)")
    if op.name == "DEQUANTIZE" and not lowered.integer and op.outputs[0] not in ctx.graph.outputs:
        return replace(lowered, float_reason="dequantizes a float island's input (exact table lookup)")
    return lowered


KERNELS = ("reference", "optimized")


def import_integer(model_path: str | Path, *, kernels: str = "reference") -> tuple[tvm.IRModule, IntegerReport]:
    """Convert a quantized .tflite model into a Relax module computing TFLite's reference integer kernels.

    The module's "main" takes the model's inputs (same order, shapes and dtypes) and always returns a
    tuple of its outputs (same order, shapes and dtypes as TFLite reports, even for one output).
    Convolutions and fully-connected layers are ``relax.op.nn.conv2d`` / ``relax.op.matmul`` with
    int8/uint8 operands and ``out_dtype="int32"``; requantization follows TFLite's reference kernels
    (fixed-point for conv, double-precision rounding for FULLY_CONNECTED as its reference kernel does).

    ``kernels="reference"`` (default) reproduces TFLite's reference kernels (OpResolverType.BUILTIN_REF),
    the platform-independent definition, bit for bit. ``kernels="optimized"`` instead follows the
    rounding of the optimized kernels that the default x86 interpreter runs (ruy's single-rounding
    requantization in conv, depthwise and fully-connected layers; other ops keep the reference
    arithmetic). It is best effort: measured identical on three of the four shared models, 99.6% of
    EfficientNet-Lite0 outputs (ruy's AVX2 kernel rounds a few values differently).

    Raises:
        UnsupportedModelError: an op (or op variant) has no integer lowering.
        ValueError: ``kernels`` is not one of KERNELS.
    """
    graph = read_graph(model_path)
    return convert_graph(graph, kernels=kernels, float_reason=float_reason_of(model_path),
                         model_bytes=Path(model_path).read_bytes(), model_name=Path(model_path).name)


def convert_graph(
    graph: Graph, *, kernels: str = "reference", float_reason: str = DEFAULT_FLOAT_REASON,
    model_bytes: bytes | None = None, model_name: str = "the model",
) -> tuple[tvm.IRModule, IntegerReport]:
    """import_integer on an already parsed graph (outputs may be replaced, e.g. to inspect intermediates).

    Ops whose activations are all float32 (float islands between DEQUANTIZE and QUANTIZE) are
    lowered in float (lower_float.py) and listed in the report's ``float_ops`` with ``float_reason``.
    With ``model_bytes`` (the .tflite the graph was read from), a quantized op edgeq has no integer
    kernel for goes through TVM's frontend in dequantize -> float -> quantize, also listed there.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    bb = relax.BlockBuilder()
    fallback = fallback_for(model_bytes, bb)
    _check_supported(graph, model_name, fallback)
    params = [
        relax.Var(name, relax.TensorType(graph.tensors[i].shape, graph.tensors[i].dtype))
        for name, i in zip(_param_names(graph), graph.inputs)
    ]
    ops_integer = macs_total = macs_integer = 0
    float_ops: list[tuple[str, str]] = []
    with bb.function("main", params):
        with bb.dataflow():
            ctx = LoweringContext(bb, graph, values=dict(zip(graph.inputs, params)), kernels=kernels)
            for op in graph.operators:
                lowered = _lower(ctx, op, float_reason, fallback)
                macs_total += lowered.macs
                if lowered.integer:
                    ops_integer += 1
                    macs_integer += lowered.macs
                else:
                    float_ops.append((op.name, lowered.float_reason))
            result = bb.emit_output(relax.Tuple([ctx.value(i) for i in graph.outputs]))
        bb.emit_func_output(result)
    report = IntegerReport(
        ops_total=len(graph.operators),
        ops_integer=ops_integer,
        macs_total=macs_total,
        macs_integer=macs_integer,
        float_ops=float_ops,
    )
    return bb.get(), report
