"""Build small quantized TFLite models in code, for tests and demos.

    b = TFLiteBuilder()
    x = b.input((1, 8, 8, 3), "int8", Q(0.02, -5))
    w = b.constant(np.random.randint(-127, 128, (4, 3, 3, 3), dtype=np.int8), Q([0.01] * 4, 0, axis=0))
    bias = b.constant(np.zeros(4, np.int32), Q([0.02 * 0.01] * 4, 0))
    y = b.conv2d(x, w, bias, Q(0.05, 3), stride=1, padding="SAME", activation="RELU6")
    b.output(y)
    Path("tiny.tflite").write_bytes(b.build())

Every helper returns the index of the tensor it creates and infers its shape. Activations are
int8 or uint8 with per-tensor quantization; weights may be per-channel (``Q([...], axis=...)``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

import flatbuffers
import numpy as np

_DTYPES = {"float32": 0, "float16": 1, "int32": 2, "uint8": 3, "int64": 4, "bool": 6, "int16": 7, "int8": 9}
_ACTIVATIONS = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
_PADDINGS = {"SAME": 0, "VALID": 1}
# op name -> options table name (module of the `tflite` package)
_OPTIONS = {
    "CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions", "ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions", "MAX_POOL_2D": "Pool2DOptions", "MEAN": "ReducerOptions",
    "RESHAPE": "ReshapeOptions", "SOFTMAX": "SoftmaxOptions", "CONCATENATION": "ConcatenationOptions",
    "PAD": "PadOptions", "QUANTIZE": "QuantizeOptions", "DEQUANTIZE": "DequantizeOptions",
    "HARD_SWISH": "HardSwishOptions", "TRANSPOSE": "TransposeOptions", "SQUEEZE": "SqueezeOptions",
    "RESIZE_NEAREST_NEIGHBOR": "ResizeNearestNeighborOptions", "LEAKY_RELU": "LeakyReluOptions",
    "RESIZE_BILINEAR": "ResizeBilinearOptions", "BATCH_MATMUL": "BatchMatMulOptions",
}


@dataclass(frozen=True)
class Q:
    """Affine quantization: real = scale * (q - zero_point); lists make it per-channel along ``axis``."""

    scale: float | Sequence[float]
    zero_point: int | Sequence[int] = 0
    axis: int = 0

    def scales(self) -> np.ndarray:
        return np.atleast_1d(np.asarray(self.scale, np.float32))

    def zero_points(self) -> np.ndarray:
        zp = np.atleast_1d(np.asarray(self.zero_point, np.int64))
        return np.broadcast_to(zp, self.scales().shape).copy() if zp.size == 1 else zp


@dataclass
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    quant: Q | None
    data: np.ndarray | None
    name: str


@dataclass
class _OpSpec:
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict


def _tfl(module: str):
    return importlib.import_module(f"tflite.{module}")


def _builtin_code(name: str) -> int:
    return getattr(importlib.import_module("tflite").BuiltinOperator, name)


def _conv_out(size: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    effective = (kernel - 1) * dilation + 1
    return (size + stride - 1) // stride if padding == "SAME" else (size - effective) // stride + 1


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class TFLiteBuilder:
    """Accumulates tensors and ops of one subgraph; ``build()`` returns the .tflite bytes."""

    def __init__(self) -> None:
        self.tensors: list[_TensorSpec] = []
        self.ops: list[_OpSpec] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.description = "edgeq.tflite_builder"  # the model's description string

    # --- tensors -------------------------------------------------------------------------------------
    def tensor(self, shape: Sequence[int], dtype: str, quant: Q | None = None, name: str | None = None) -> int:
        """Add an activation tensor (no data) and return its index."""
        self.tensors.append(_TensorSpec(tuple(int(d) for d in shape), dtype, quant, None, name or f"t{len(self.tensors)}"))
        return len(self.tensors) - 1

    def input(self, shape: Sequence[int], dtype: str = "int8", quant: Q | None = None, name: str | None = None) -> int:
        index = self.tensor(shape, dtype, quant, name or f"input{len(self.inputs)}")
        self.inputs.append(index)
        return index

    def constant(self, data: np.ndarray, quant: Q | None = None, name: str | None = None) -> int:
        data = np.ascontiguousarray(data)
        index = self.tensor(data.shape, str(data.dtype), quant, name)
        self.tensors[index].data = data
        return index

    def output(self, index: int) -> None:
        self.outputs.append(index)

    def shape(self, index: int) -> tuple[int, ...]:
        return self.tensors[index].shape

    def dtype(self, index: int) -> str:
        return self.tensors[index].dtype

    def quant(self, index: int) -> Q | None:
        return self.tensors[index].quant

    def op(self, name: str, inputs: Sequence[int], outputs: Sequence[int], **options) -> None:
        """Add any builtin op; ``options`` are the fields of its options table, e.g. ``StrideW=2``."""
        self.ops.append(_OpSpec(name, tuple(inputs), tuple(outputs), options))

    def op_output(self, shape: Sequence[int], name: str, inputs: Sequence[int], *, dtype: str,
                  quant: Q | None = None, **options) -> int:
        """Add any builtin op with one new output tensor (``shape``, ``dtype``, ``quant``); return its index."""
        y = self.tensor(shape, dtype, quant)
        self.op(name, inputs, [y], **options)
        return y

    # --- op helpers ----------------------------------------------------------------------------------
    def conv2d(self, x: int, weights: int, bias: int | None, out: Q, stride=1, padding: str = "SAME",
               activation: str = "NONE", dilation=1, out_dtype: str | None = None) -> int:
        """CONV_2D; weights are OHWI."""
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        n, h, w, _ = self.shape(x)
        o, kh, kw, _ = self.shape(weights)
        y = self.tensor((n, _conv_out(h, kh, sh, dh, padding), _conv_out(w, kw, sw, dw, padding), o), out_dtype or self.dtype(x), out)
        self.op("CONV_2D", (x, weights, -1 if bias is None else bias), (y,), Padding=_PADDINGS[padding], StrideH=sh,
                StrideW=sw, DilationHFactor=dh, DilationWFactor=dw, FusedActivationFunction=_ACTIVATIONS[activation])
        return y

    def depthwise_conv2d(self, x: int, weights: int, bias: int | None, out: Q, stride=1, padding: str = "SAME",
                         activation: str = "NONE", dilation=1, depth_multiplier: int = 1) -> int:
        """DEPTHWISE_CONV_2D; weights are [1, KH, KW, C * depth_multiplier]."""
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        n, h, w, _ = self.shape(x)
        _, kh, kw, o = self.shape(weights)
        y = self.tensor((n, _conv_out(h, kh, sh, dh, padding), _conv_out(w, kw, sw, dw, padding), o), self.dtype(x), out)
        self.op("DEPTHWISE_CONV_2D", (x, weights, -1 if bias is None else bias), (y,), Padding=_PADDINGS[padding],
                StrideH=sh, StrideW=sw, DilationHFactor=dh, DilationWFactor=dw, DepthMultiplier=depth_multiplier,
                FusedActivationFunction=_ACTIVATIONS[activation])
        return y

    def fully_connected(self, x: int, weights: int, bias: int | None, out: Q, activation: str = "NONE",
                        keep_num_dims: bool = False) -> int:
        """FULLY_CONNECTED; weights are [units, depth]."""
        units, depth = self.shape(weights)
        shape = self.shape(x)[:-1] + (units,) if keep_num_dims else (int(np.prod(self.shape(x))) // depth, units)
        y = self.tensor(shape, self.dtype(x), out)
        self.op("FULLY_CONNECTED", (x, weights, -1 if bias is None else bias), (y,),
                FusedActivationFunction=_ACTIVATIONS[activation], KeepNumDims=keep_num_dims)
        return y

    def _binary(self, name: str, a: int, b: int, out: Q, activation: str) -> int:
        shape = tuple(np.broadcast_shapes(self.shape(a), self.shape(b)))
        y = self.tensor(shape, self.dtype(a), out)
        self.op(name, (a, b), (y,), FusedActivationFunction=_ACTIVATIONS[activation])
        return y

    def add(self, a: int, b: int, out: Q, activation: str = "NONE") -> int:
        return self._binary("ADD", a, b, out, activation)

    def sub(self, a: int, b: int, out: Q, activation: str = "NONE") -> int:
        return self._binary("SUB", a, b, out, activation)

    def mul(self, a: int, b: int, out: Q, activation: str = "NONE") -> int:
        return self._binary("MUL", a, b, out, activation)

    def _pool(self, name: str, x: int, size, stride, padding: str, activation: str, out: Q | None) -> int:
        (kh, kw), (sh, sw) = _pair(size), _pair(stride)
        n, h, w, c = self.shape(x)
        y = self.tensor((n, _conv_out(h, kh, sh, 1, padding), _conv_out(w, kw, sw, 1, padding), c), self.dtype(x),
                        out or self.quant(x))
        self.op(name, (x,), (y,), Padding=_PADDINGS[padding], StrideH=sh, StrideW=sw, FilterHeight=kh,
                FilterWidth=kw, FusedActivationFunction=_ACTIVATIONS[activation])
        return y

    def average_pool2d(self, x: int, size, stride=None, padding: str = "VALID", activation: str = "NONE",
                       out: Q | None = None) -> int:
        return self._pool("AVERAGE_POOL_2D", x, size, size if stride is None else stride, padding, activation, out)

    def max_pool2d(self, x: int, size, stride=None, padding: str = "VALID", activation: str = "NONE",
                   out: Q | None = None) -> int:
        return self._pool("MAX_POOL_2D", x, size, size if stride is None else stride, padding, activation, out)

    def mean(self, x: int, axes: Sequence[int], out: Q, keep_dims: bool = True) -> int:
        shape = list(self.shape(x))
        axes = sorted(a % len(shape) for a in axes)
        kept = [1 if i in axes else d for i, d in enumerate(shape)]
        y = self.tensor(kept if keep_dims else [d for i, d in enumerate(shape) if i not in axes], self.dtype(x), out)
        self.op("MEAN", (x, self.constant(np.asarray(axes, np.int32))), (y,), KeepDims=keep_dims)
        return y

    def reshape(self, x: int, shape: Sequence[int]) -> int:
        y = self.tensor(shape, self.dtype(x), self.quant(x))
        self.op("RESHAPE", (x, self.constant(np.asarray(shape, np.int32))), (y,), NewShape=list(shape))
        return y

    def softmax(self, x: int, out: Q | None = None, beta: float = 1.0) -> int:
        """SOFTMAX; TFLite requires out = Q(1/256, -128) for int8 and Q(1/256, 0) for uint8 (the default)."""
        default = Q(1.0 / 256, -128 if self.dtype(x) == "int8" else 0)
        y = self.tensor(self.shape(x), self.dtype(x), out or default)
        self.op("SOFTMAX", (x,), (y,), Beta=beta)
        return y

    def logistic(self, x: int, out: Q | None = None) -> int:
        """LOGISTIC; TFLite requires out scale 1/256 with zero point -128 (int8) or 0 (uint8), the default."""
        default = Q(1.0 / 256, -128 if self.dtype(x) == "int8" else 0)
        y = self.tensor(self.shape(x), self.dtype(x), out or default)
        self.op("LOGISTIC", (x,), (y,))
        return y

    def tanh(self, x: int, out: Q | None = None) -> int:
        y = self.tensor(self.shape(x), self.dtype(x), out or Q(1.0 / 128, 0 if self.dtype(x) == "int8" else 128))
        self.op("TANH", (x,), (y,))
        return y

    def hard_swish(self, x: int, out: Q) -> int:
        y = self.tensor(self.shape(x), self.dtype(x), out)
        self.op("HARD_SWISH", (x,), (y,))
        return y

    def relu(self, x: int, kind: str = "RELU", out: Q | None = None) -> int:
        """Standalone RELU, RELU6, RELU_N1_TO_1 or RELU_0_TO_1 (out defaults to the input's quantization)."""
        y = self.tensor(self.shape(x), self.dtype(x), out or self.quant(x))
        self.op(kind, (x,), (y,))
        return y

    def quantize(self, x: int, out: Q, dtype: str = "int8") -> int:
        """QUANTIZE from float32, or requantize an 8-bit tensor to another scale / type."""
        y = self.tensor(self.shape(x), dtype, out)
        self.op("QUANTIZE", (x,), (y,))
        return y

    def dequantize(self, x: int) -> int:
        y = self.tensor(self.shape(x), "float32")
        self.op("DEQUANTIZE", (x,), (y,))
        return y

    def concatenation(self, xs: Sequence[int], axis: int, out: Q | None = None, activation: str = "NONE") -> int:
        shapes = [self.shape(x) for x in xs]
        axis %= len(shapes[0])
        shape = list(shapes[0])
        shape[axis] = sum(s[axis] for s in shapes)
        y = self.tensor(shape, self.dtype(xs[0]), out or self.quant(xs[0]))
        self.op("CONCATENATION", tuple(xs), (y,), Axis=axis, FusedActivationFunction=_ACTIVATIONS[activation])
        return y

    def pad(self, x: int, paddings: Sequence[Sequence[int]]) -> int:
        """PAD with the zero point (real 0); paddings is [[before, after]] per dimension."""
        widths = np.asarray(paddings, np.int32).reshape(-1, 2)
        y = self.tensor([d + int(a) + int(b) for d, (a, b) in zip(self.shape(x), widths)], self.dtype(x), self.quant(x))
        self.op("PAD", (x, self.constant(widths)), (y,))
        return y

    def transpose(self, x: int, perm: Sequence[int]) -> int:
        y = self.tensor([self.shape(x)[p] for p in perm], self.dtype(x), self.quant(x))
        self.op("TRANSPOSE", (x, self.constant(np.asarray(perm, np.int32))), (y,))
        return y

    def squeeze(self, x: int, axes: Sequence[int]) -> int:
        axes = [a % len(self.shape(x)) for a in axes]
        y = self.tensor([d for i, d in enumerate(self.shape(x)) if i not in axes], self.dtype(x), self.quant(x))
        self.op("SQUEEZE", (x,), (y,), SqueezeDims=list(axes))
        return y

    def resize_nearest(self, x: int, size: Sequence[int], align_corners: bool = False,
                       half_pixel_centers: bool = False) -> int:
        n, _, _, c = self.shape(x)
        y = self.tensor((n, int(size[0]), int(size[1]), c), self.dtype(x), self.quant(x))
        self.op("RESIZE_NEAREST_NEIGHBOR", (x, self.constant(np.asarray(size, np.int32))), (y,),
                AlignCorners=align_corners, HalfPixelCenters=half_pixel_centers)
        return y

    # --- serialisation -------------------------------------------------------------------------------
    def build(self) -> bytes:
        """Serialise to .tflite flatbuffer bytes (schema version 3, one subgraph)."""
        fb = flatbuffers.Builder(1024)
        buffers = [self._buffer(fb, None)] + [self._buffer(fb, t.data) for t in self.tensors if t.data is not None]
        tensors, next_buffer = [], 1
        for spec in self.tensors:
            buffer = next_buffer if spec.data is not None else 0
            next_buffer += spec.data is not None
            tensors.append(self._tensor(fb, spec, buffer))
        codes = sorted({op.name for op in self.ops})
        operators = [self._operator(fb, op, codes.index(op.name)) for op in self.ops]
        opcode_tables = [self._opcode(fb, name) for name in codes]

        sg = _tfl("SubGraph")
        tensors_vec = self._table_vector(fb, sg.SubGraphStartTensorsVector, tensors)
        ops_vec = self._table_vector(fb, sg.SubGraphStartOperatorsVector, operators)
        inputs_vec = fb.CreateNumpyVector(np.asarray(self.inputs, np.int32))
        outputs_vec = fb.CreateNumpyVector(np.asarray(self.outputs, np.int32))
        name = fb.CreateString("main")
        sg.SubGraphStart(fb)
        sg.SubGraphAddTensors(fb, tensors_vec)
        sg.SubGraphAddInputs(fb, inputs_vec)
        sg.SubGraphAddOutputs(fb, outputs_vec)
        sg.SubGraphAddOperators(fb, ops_vec)
        sg.SubGraphAddName(fb, name)
        subgraph = sg.SubGraphEnd(fb)

        m = _tfl("Model")
        codes_vec = self._table_vector(fb, m.ModelStartOperatorCodesVector, opcode_tables)
        subgraphs_vec = self._table_vector(fb, m.ModelStartSubgraphsVector, [subgraph])
        buffers_vec = self._table_vector(fb, m.ModelStartBuffersVector, buffers)
        description = fb.CreateString(self.description)
        m.ModelStart(fb)
        m.ModelAddVersion(fb, 3)
        m.ModelAddOperatorCodes(fb, codes_vec)
        m.ModelAddSubgraphs(fb, subgraphs_vec)
        m.ModelAddDescription(fb, description)
        m.ModelAddBuffers(fb, buffers_vec)
        fb.Finish(m.ModelEnd(fb), file_identifier=b"TFL3")
        return bytes(fb.Output())

    @staticmethod
    def _table_vector(fb, start, offsets: list[int]) -> int:
        start(fb, len(offsets))
        for offset in reversed(offsets):
            fb.PrependUOffsetTRelative(offset)
        return fb.EndVector()

    @staticmethod
    def _buffer(fb, data: np.ndarray | None) -> int:
        buf = _tfl("Buffer")
        vec = fb.CreateNumpyVector(np.frombuffer(data.tobytes(), np.uint8)) if data is not None else None
        buf.BufferStart(fb)
        if vec is not None:
            buf.BufferAddData(fb, vec)
        return buf.BufferEnd(fb)

    @staticmethod
    def _tensor(fb, spec: _TensorSpec, buffer: int) -> int:
        t, qp = _tfl("Tensor"), _tfl("QuantizationParameters")
        quant = None
        if spec.quant is not None:
            scale = fb.CreateNumpyVector(spec.quant.scales())
            zero_point = fb.CreateNumpyVector(spec.quant.zero_points())
            qp.QuantizationParametersStart(fb)
            qp.QuantizationParametersAddScale(fb, scale)
            qp.QuantizationParametersAddZeroPoint(fb, zero_point)
            qp.QuantizationParametersAddQuantizedDimension(fb, spec.quant.axis)
            quant = qp.QuantizationParametersEnd(fb)
        name = fb.CreateString(spec.name)
        shape = fb.CreateNumpyVector(np.asarray(spec.shape, np.int32))
        t.TensorStart(fb)
        t.TensorAddShape(fb, shape)
        t.TensorAddType(fb, _DTYPES[spec.dtype])
        t.TensorAddBuffer(fb, buffer)
        t.TensorAddName(fb, name)
        if quant is not None:
            t.TensorAddQuantization(fb, quant)
        return t.TensorEnd(fb)

    @staticmethod
    def _options(fb, op: _OpSpec) -> tuple[int, int] | None:
        table_name = _OPTIONS.get(op.name)
        if table_name is None:
            return None
        module = _tfl(table_name)
        vectors = {k: fb.CreateNumpyVector(np.asarray(v, np.int32)) for k, v in op.options.items() if isinstance(v, list)}
        getattr(module, f"{table_name}Start")(fb)
        for key, value in op.options.items():
            adder = getattr(module, f"{table_name}Add{key}")
            adder(fb, vectors[key] if key in vectors else value)
        offset = getattr(module, f"{table_name}End")(fb)
        return getattr(importlib.import_module("tflite").BuiltinOptions, table_name), offset

    def _operator(self, fb, op: _OpSpec, opcode_index: int) -> int:
        o = _tfl("Operator")
        options = self._options(fb, op)
        inputs = fb.CreateNumpyVector(np.asarray(op.inputs, np.int32))
        outputs = fb.CreateNumpyVector(np.asarray(op.outputs, np.int32))
        o.OperatorStart(fb)
        o.OperatorAddOpcodeIndex(fb, opcode_index)
        o.OperatorAddInputs(fb, inputs)
        o.OperatorAddOutputs(fb, outputs)
        if options is not None:
            o.OperatorAddBuiltinOptionsType(fb, options[0])
            o.OperatorAddBuiltinOptions(fb, options[1])
        return o.OperatorEnd(fb)

    @staticmethod
    def _opcode(fb, name: str) -> int:
        oc = _tfl("OperatorCode")
        code = _builtin_code(name)
        oc.OperatorCodeStart(fb)
        oc.OperatorCodeAddDeprecatedBuiltinCode(fb, min(code, 127))
        oc.OperatorCodeAddBuiltinCode(fb, code)
        oc.OperatorCodeAddVersion(fb, 1)
        return oc.OperatorCodeEnd(fb)
