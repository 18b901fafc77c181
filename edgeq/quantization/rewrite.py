"""Write the fully-quantized int8 twin of a float TFLite graph from calibrated ranges.

The same ops in the same order, with QUANTIZE after each float input and DEQUANTIZE before each
float output; int8 activations per tensor; int8 weights symmetric per output channel (CONV_2D,
FULLY_CONNECTED: axis 0, DEPTHWISE_CONV_2D: axis 3); int32 biases with scale s_in * s_w and zero
point 0. Ops whose int8 kernels need it keep their input's quantization (pooling, reshapes, PAD,
CONCATENATION inputs) or get TFLite's fixed output quantization (SOFTMAX, LOGISTIC: 1/256, -128;
TANH: 1/128, 0).

The model's *float tail* -- the data-movement ops (RESHAPE, CONCATENATION, ...) that only lead to
model outputs, such as a detector gathering its box and score heads -- stays float: each head is
dequantized with its own scale before it, instead of being requantized to one scale shared by all
heads (a CONCATENATION of a score head spanning [-6.7, 1.3] with one spanning [-271, 0.5] would
otherwise quantize both with a step of 1.07). Data movement is exact in float, so this costs
nothing in accuracy and little in time.

*Float layers* (``QuantConfig.float_layers``, chosen by the accuracy budget in fallback.py) keep
their float weights and compute in float32 between a DEQUANTIZE of their inputs and a QUANTIZE of
their output (only where an int8 op reads it); exact ops fed only by float layers stay float too.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import EdgeqError, UnsupportedModelError
from ..int8.graph import Graph, Operator
from ..int8.report import FLOAT_REASON_PREFIX
from ..tflite_builder import Q, TFLiteBuilder
from .config import QuantConfig

WEIGHT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
SAME_AS_INPUT = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "AVERAGE_POOL_2D", "MAX_POOL_2D", "PAD", "TRANSPOSE"}
FIXED_OUTPUT = {"SOFTMAX": (1.0 / 256, -128), "LOGISTIC": (1.0 / 256, -128), "TANH": (1.0 / 128, 0)}
FREE_OUTPUT = {"ADD", "SUB", "MUL", "MEAN", "HARD_SWISH", "RELU", "RELU6", "CONCATENATION"} | set(WEIGHT_AXIS)
SUPPORTED = SAME_AS_INPUT | set(FIXED_OUTPUT) | FREE_OUTPUT
# Ops TFLite's int8 kernels only accept with one quantization shared by all inputs and the output.
SHARED_INPUTS = {"CONCATENATION"}
# Ops that only move values: exact in float, so they may follow the DEQUANTIZE of a model output.
DATA_MOVEMENT = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "CONCATENATION"}
# Ops that commute with quantization: computed in float when all their inputs come from float ops,
# they give what the int8 op would give after a QUANTIZE (no extra DEQUANTIZE/QUANTIZE pair needed).
EXACT_IN_FLOAT = DATA_MOVEMENT | {"PAD", "MAX_POOL_2D"}


@dataclass(frozen=True)
class Plan:
    """The written model's tensor for each float activation tensor, and its quantization."""

    tensor: dict[int, int]  # float graph tensor index -> int8 (or float tail) tensor index in the new model
    quant: dict[int, tuple[float, int]]  # float graph tensor index -> (scale, zero point); not for the tail
    ranges: dict[int, tuple[float, float]]  # the (low, high) each scale was derived from
    float_tail: frozenset[int] = frozenset()  # op indices kept in float after the outputs' DEQUANTIZE
    float_layers: frozenset[int] = frozenset()  # op indices kept in float on request (QuantConfig.float_layers)


def check_supported(graph: Graph, model_name: str) -> None:
    """Raise UnsupportedModelError naming the ops (or tensor types) quantize() cannot handle."""
    if any(t.dtype in ("int8", "uint8", "int16") and t.quant is not None for t in graph.tensors):
        raise UnsupportedModelError(f"{model_name} is already quantized; package it directly (no --quantize)")
    missing = sorted(
        {op.name for op in graph.operators if op.name not in SUPPORTED and not _is_fp16_weight(graph, op)}
    )
    if missing:
        raise UnsupportedModelError(
            f"{model_name} uses ops edgeq cannot quantize yet: {', '.join(missing)}. "
            f"Supported: {', '.join(sorted(SUPPORTED))}."
        )
    for index in graph.inputs:
        if graph.tensors[index].dtype != "float32":
            raise UnsupportedModelError(f"{model_name}: input {graph.tensors[index].name} is not float32")


def _is_fp16_weight(graph: Graph, op: Operator) -> bool:
    return op.name == "DEQUANTIZE" and graph.tensors[op.inputs[0]].dtype == "float16" and graph.tensors[op.inputs[0]].is_const


def float_constants(graph: Graph) -> dict[int, np.ndarray]:
    """Constant float tensors, float16 weights (DEQUANTIZE of a constant) widened to float32."""
    constants = {t.index: t.data for t in graph.tensors if t.is_const and t.dtype == "float32"}
    for op in graph.operators:
        if _is_fp16_weight(graph, op):
            constants[op.outputs[0]] = graph.tensors[op.inputs[0]].data.astype(np.float32)
    return constants


def activation_tensors(graph: Graph) -> list[int]:
    """Float tensors computed at run time: the inputs and every op output (fp16 weight folds excluded)."""
    computed = list(graph.inputs)
    for op in graph.operators:
        if not _is_fp16_weight(graph, op):
            computed += [i for i in op.outputs if i not in computed]
    return computed


def activation_quant(low: float, high: float, symmetric: bool) -> tuple[float, int]:
    """int8 (scale, zero point) covering [low, high] and real 0 exactly."""
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        bound = max(-low, high)
        return (float(np.float32(bound / 127.0)) if bound > 0 else 1.0 / 256), 0
    if high - low <= 0:
        return 1.0 / 256, -128
    scale = float(np.float32((high - low) / 255.0))
    zero_point = int(np.clip(np.round(-128 - low / scale), -128, 127))
    return scale, zero_point


def weight_quant(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric per-channel (values, float32 scales) along ``axis``."""
    moved = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
    bound = np.abs(moved).max(axis=1)
    scales = np.where(bound > 0, bound / 127.0, 1.0).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    values = np.clip(np.round(weights / scales.reshape(shape)), -127, 127).astype(np.int8)
    return values, scales


def float_tail(graph: Graph) -> frozenset[int]:
    """Indices of the data-movement ops whose outputs only reach model outputs through data movement."""
    users: dict[int, list[Operator]] = {}
    for op in graph.operators:
        for index in op.inputs:
            users.setdefault(index, []).append(op)
    tail: set[int] = set()
    for op in reversed(graph.operators):
        if op.name not in DATA_MOVEMENT:
            continue
        if all((o in graph.outputs or o in users) and all(u.index in tail for u in users.get(o, [])) for o in op.outputs):
            tail.add(op.index)
    return frozenset(tail)


def _tie_shared_inputs(
    graph: Graph, ranges: dict[int, tuple[float, float]], consumers: dict[int, int], tail: frozenset[int] = frozenset()
) -> None:
    """Give CONCATENATION's single-use, freely quantized inputs the output's (union) range."""
    producers = {o: op for op in graph.operators for o in op.outputs}
    for op in graph.operators:
        if op.name not in SHARED_INPUTS or op.index in tail:
            continue
        inputs = [i for i in op.inputs if i in ranges]
        union = (min(ranges[i][0] for i in inputs + [op.outputs[0]]), max(ranges[i][1] for i in inputs + [op.outputs[0]]))
        ranges[op.outputs[0]] = union
        for index in inputs:
            producer = producers.get(index)
            free = producer is None or producer.name in FREE_OUTPUT
            if free and consumers.get(index, 0) == 1 and index not in graph.outputs:
                ranges[index] = union


def _options(op: Operator) -> dict:
    """The op's builtin options as TFLiteBuilder.op keywords (copied field by field)."""
    options = op.options
    if options is None:
        return {}
    table = type(options).__name__
    module = importlib.import_module(f"tflite.{table}")
    fields = {}
    for name in dir(module):
        if not name.startswith(f"{table}Add"):
            continue
        key = name[len(table) + 3 :]
        if hasattr(options, f"{key}AsNumpy"):
            vector = getattr(options, f"{key}AsNumpy")()
            fields[key] = [int(v) for v in np.atleast_1d(vector)] if isinstance(vector, np.ndarray) else []
        elif hasattr(options, key):
            value = getattr(options, key)()
            if isinstance(value, (bool, int, float, np.integer, np.floating)):
                fields[key] = value
    return fields


def float_layer_ops(graph: Graph, float_layers: frozenset[str]) -> frozenset[int]:
    """Op indices of the layers named in ``float_layers`` (op output tensor names of the float model)."""
    by_name = {graph.tensors[op.outputs[0]].name: op.index for op in graph.operators if not _is_fp16_weight(graph, op)}
    unknown = sorted(set(float_layers) - set(by_name))
    if unknown:
        examples = ", ".join(list(by_name)[:3])
        raise EdgeqError(
            f"float_layers names no op output of this model: {', '.join(unknown)}; "
            f"name layers by their op's output tensor (e.g. {examples}), as QuantizationReport.layers lists them"
        )
    return frozenset(by_name[name] for name in float_layers)


def write_quantized(
    graph: Graph,
    ranges: dict[int, tuple[float, float]],
    config: QuantConfig,
    say: Callable[[str], None] = lambda _: None,
    float_reason: str = "kept float on request (QuantConfig.float_layers)",
) -> tuple[bytes, Plan]:
    """The int8 model's flatbuffer bytes and where each float activation went.

    Ops of ``config.float_layers`` (and the float tail) are written with float32 inputs, weights,
    bias and output: a DEQUANTIZE before each int8 input, a QUANTIZE after the output where int8
    ops read it. Conversions are made once per tensor, where first needed. ``float_reason`` goes
    into the model's description, where edgeq's integer importer reads why those ops are float.
    """
    constants = float_constants(graph)
    consumers: dict[int, int] = {}
    for op in graph.operators:
        for index in op.inputs:
            consumers[index] = consumers.get(index, 0) + 1
    ranges = dict(ranges)
    tail = float_tail(graph)
    kept_float = float_layer_ops(graph, config.float_layers)
    _tie_shared_inputs(graph, ranges, consumers, tail | kept_float)

    b = TFLiteBuilder()
    b.description = f"{FLOAT_REASON_PREFIX}{float_reason}" if kept_float else "edgeq.quantize"
    quant: dict[int, tuple[float, int]] = {}  # every activation's int8 quantization (also of float ones)
    int8_of: dict[int, int] = {}  # float graph tensor -> its int8 tensor in the new model
    float_of: dict[int, int] = {}  # float graph tensor -> its float32 tensor in the new model
    for index in graph.inputs:
        tensor = graph.tensors[index]
        quant[index] = activation_quant(*ranges[index], config.symmetric)
        float_of[index] = b.input(tensor.shape, "float32", name=tensor.name)

    def as_int8(index: int, target: tuple[float, int] | None = None) -> int:
        """The int8 version of an activation (in ``target`` quantization when given)."""
        target = target or quant[index]
        if index in int8_of and target == quant[index]:
            return int8_of[index]
        if index in int8_of:  # requantize to another scale (CONCATENATION's shared one)
            return b.quantize(int8_of[index], Q(*target))
        value = b.quantize(float_of[index], Q(*target))
        if target == quant[index]:
            int8_of[index] = value
            b.tensors[value].name = f"{graph.tensors[index].name}/int8"
        return value

    def as_float(index: int) -> int:
        """The float32 version of an activation (a DEQUANTIZE of its int8 tensor, made once)."""
        if index not in float_of:
            float_of[index] = b.dequantize(int8_of[index])
            b.tensors[float_of[index]].name = f"{graph.tensors[index].name}/float"
        return float_of[index]

    def const_input(index: int, op: Operator, position: int, input_scale: float | None) -> int:
        if index < 0:
            return -1
        tensor = graph.tensors[index]
        if index not in constants:  # int32 shapes, axes, paddings: unchanged
            if tensor.data is None:
                raise UnsupportedModelError(f"{op.name} #{op.index}: input {tensor.name} is neither computed nor constant")
            return b.constant(tensor.data, name=tensor.name)
        data = constants[index]
        if input_scale is None:  # a float op: float weights, bias and constants as they are
            return b.constant(data, name=tensor.name)
        if op.name in WEIGHT_AXIS and position == 1:
            values, scales = weight_quant(data, WEIGHT_AXIS[op.name])
            return b.constant(values, Q(scales.tolist(), 0, axis=WEIGHT_AXIS[op.name]), name=tensor.name)
        if op.name in WEIGHT_AXIS and position == 2:
            weights = constants[op.inputs[1]]
            _, w_scales = weight_quant(weights, WEIGHT_AXIS[op.name])
            scales = (np.float64(np.float32(input_scale)) * w_scales.astype(np.float64)).astype(np.float32)
            q = np.clip(np.round(data.astype(np.float64) / scales), -(2**31), 2**31 - 1).astype(np.int32)
            return b.constant(q, Q(scales.tolist(), 0), name=tensor.name)
        scale, zero_point = activation_quant(float(data.min()), float(data.max()), config.symmetric)
        q = np.clip(np.round(data / np.float32(scale)) + zero_point, -128, 127).astype(np.int8)
        return b.constant(q, Q(scale, zero_point), name=tensor.name)

    computed = set(graph.inputs)
    float_outputs: set[int] = set()  # outputs of ops computed in float
    followers: set[int] = set()  # exact ops whose inputs all come from float ops
    for op in graph.operators:
        if _is_fp16_weight(graph, op):
            continue
        out = op.outputs[0]
        first = next((i for i in op.inputs if i in computed), None)
        if first is None:
            raise UnsupportedModelError(f"{op.name} #{op.index} computes on constants only; fold it before quantizing")
        computed.add(out)
        if op.name in SAME_AS_INPUT:
            quant[out] = quant[first]
        elif op.name in FIXED_OUTPUT:
            quant[out] = FIXED_OUTPUT[op.name]
        else:
            quant[out] = activation_quant(*ranges[out], config.symmetric)
        activations = [i for i in op.inputs if i in computed]
        if op.name in EXACT_IN_FLOAT and all(i in float_outputs for i in activations):
            followers.add(op.index)  # moves float values only: stays float, quantized where int8 ops read it
        if op.index in tail or op.index in kept_float or op.index in followers:
            float_outputs.add(out)
            inputs = [as_float(i) if i in computed else const_input(i, op, n, None) for n, i in enumerate(op.inputs)]
            float_of[out] = b.tensor(graph.tensors[out].shape, "float32", name=graph.tensors[out].name)
            b.op(op.name, inputs, [float_of[out]], **_options(op))
            continue
        inputs = []
        for position, index in enumerate(op.inputs):
            if index in computed:
                shared = op.name in SHARED_INPUTS and quant[index] != quant[out]
                inputs.append(as_int8(index, quant[out] if shared else None))
            else:
                inputs.append(const_input(index, op, position, quant[first][0]))
        tensor = graph.tensors[out]
        int8_of[out] = b.tensor(tensor.shape, "int8", Q(*quant[out]), name=tensor.name)
        b.op(op.name, inputs, [int8_of[out]], **_options(op))
    for index in graph.outputs:
        if index in float_outputs or index not in int8_of:  # computed in float, or an input passed through
            b.output(float_of[index])
            continue
        real = as_float(index)
        b.tensors[real].name = graph.tensors[index].name
        b.tensors[int8_of[index]].name = f"{graph.tensors[index].name}/int8"
        b.output(real)
    notes = []
    if kept_float:
        notes.append(f"{len(kept_float)} layers kept float" + (f", {len(followers)} exact ops after them" if followers else ""))
    if tail:
        notes.append(f"{len(tail)} data-movement ops after the outputs' DEQUANTIZE")
    say(f"wrote {len(b.ops)} ops" + (f" ({'; '.join(notes)})" if notes else ""))
    measured = {**float_of, **int8_of, **{index: float_of[index] for index in float_outputs}}  # float ops: float
    plan_quant = {i: q for i, q in quant.items() if i in int8_of and i not in float_outputs}
    return b.build(), Plan(tensor=measured, quant=plan_quant, ranges=ranges, float_tail=tail, float_layers=kept_float)
