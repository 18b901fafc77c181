"""Read a TFLite flatbuffer into plain dataclasses: tensors with quantization and data, ops with options."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnsupportedModelError

# tflite.TensorType value -> numpy dtype name.
TENSOR_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


@dataclass(frozen=True)
class Quant:
    """Affine quantization of a tensor: real = scale * (q - zero_point); per-axis when len(scale) > 1."""

    scale: np.ndarray  # float32, as stored in the flatbuffer
    zero_point: np.ndarray  # int64
    axis: int = 0

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    @property
    def s(self) -> np.float32:
        """The per-tensor scale (float32)."""
        return np.float32(self.scale[0])

    @property
    def zp(self) -> int:
        """The per-tensor zero point."""
        return int(self.zero_point[0])


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: Quant | None
    data: np.ndarray | None  # constant contents, shaped, or None for activations

    @property
    def is_const(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class Operator:
    index: int
    name: str  # builtin operator name, e.g. "CONV_2D"
    inputs: tuple[int, ...]  # tensor indices, -1 for an omitted optional input
    outputs: tuple[int, ...]
    options: Any = field(repr=False)  # the tflite.*Options table, or None


@dataclass(frozen=True)
class Graph:
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _tflite():
    import tflite

    return tflite


def _operator_names(tflite) -> dict[int, str]:
    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if k.isupper()}


def _options_classes(tflite) -> dict[int, type]:
    classes = {}
    for name, value in vars(tflite.BuiltinOptions).items():
        cls = getattr(tflite, name, None) if name[:1].isupper() and name != "NONE" else None
        if isinstance(cls, type) and hasattr(cls, "Init"):
            classes[value] = cls
    return classes


def _read_options(op, classes: dict[int, type]):
    table = op.BuiltinOptions()
    cls = classes.get(op.BuiltinOptionsType())
    if table is None or cls is None:
        return None
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return options


def _read_quant(tensor) -> Quant | None:
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
        return None
    scale = q.ScaleAsNumpy().astype(np.float32)
    zp = q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros(scale.size, np.int64)
    return Quant(scale=scale, zero_point=zp, axis=int(q.QuantizedDimension()))


def _read_data(model, tensor, raw: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    buffer = model.Buffers(tensor.Buffer())
    if buffer is None:
        return None
    if buffer.Offset() > 1:  # large models keep buffers after the flatbuffer
        blob = raw[buffer.Offset() : buffer.Offset() + buffer.Size()]
    elif buffer.DataLength():
        blob = buffer.DataAsNumpy().tobytes()
    else:
        return None
    return np.frombuffer(blob, dtype=dtype).reshape(shape).copy()


def read_graph(model_path: str | Path) -> Graph:
    """Parse the first subgraph of a .tflite file."""
    tflite = _tflite()
    raw = Path(model_path).read_bytes()
    model = tflite.Model.GetRootAsModel(raw, 0)
    if model.SubgraphsLength() != 1:
        raise UnsupportedModelError(
            f"{model_path} has {model.SubgraphsLength()} subgraphs; edgeq's integer importer handles one"
        )
    graph = model.Subgraphs(0)
    names = _operator_names(tflite)
    classes = _options_classes(tflite)

    tensors = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        dtype = TENSOR_DTYPES.get(t.Type())
        if dtype is None:
            raise UnsupportedModelError(f"tensor {t.Name().decode()} has unsupported TFLite type {t.Type()}")
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        tensors.append(
            Tensor(
                index=i,
                name=t.Name().decode(errors="replace"),
                shape=shape,
                dtype=dtype,
                quant=_read_quant(t),
                data=_read_data(model, t, raw, shape, dtype),
            )
        )

    operators = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{code.CustomCode().decode()}"
        operators.append(
            Operator(
                index=i,
                name=name,
                inputs=tuple(int(x) for x in op.InputsAsNumpy()) if op.InputsLength() else (),
                outputs=tuple(int(x) for x in op.OutputsAsNumpy()) if op.OutputsLength() else (),
                options=_read_options(op, classes),
            )
        )
    return Graph(
        tensors=tuple(tensors),
        operators=tuple(operators),
        inputs=tuple(int(x) for x in graph.InputsAsNumpy()),
        outputs=tuple(int(x) for x in graph.OutputsAsNumpy()),
    )
