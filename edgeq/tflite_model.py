"""Read what edgeq needs from a .tflite file: tensors, ops, labels and normalisation metadata."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MissingDependencyError, UnsupportedModelError
from .manifest import Quantization, TensorSpec

# tflite.TensorType values -> numpy dtype names.
_TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


@dataclass(frozen=True)
class TFLiteModel:
    """A parsed TFLite model: the pieces the packager and the reference checks need."""

    path: Path
    data: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]  # builtin operator names in graph order
    output_producers: tuple[str, ...]  # op computing each output, looking through (de)quantize/reshape
    labels: tuple[str, ...]
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None  # (mean, std) from metadata

    @property
    def is_quantized(self) -> bool:
        """True when any activation or weight tensor is int8/uint8 quantized."""
        return "QUANTIZE" in self.ops or any(
            spec.quantization is not None for spec in self.inputs + self.outputs
        )


def _tflite():
    try:
        import tflite  # flatbuffer bindings of the TFLite schema

        return tflite
    except ImportError:
        raise MissingDependencyError(
            "reading TFLite models needs the host extras: pip install 'edgeq[host]'"
        ) from None


def _operator_names(tflite) -> dict[int, str]:
    return {value: name for name, value in vars(tflite.BuiltinOperator).items() if name.isupper()}


def _tensor_spec(tensor, name_fallback: str) -> TensorSpec:
    dtype = _TENSOR_TYPES.get(tensor.Type())
    if dtype is None:
        raise UnsupportedModelError(f"tensor {name_fallback} has TFLite type {tensor.Type()}, which edgeq cannot feed")
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    quant = None
    params = tensor.Quantization()
    if params is not None and params.ScaleLength() > 0 and dtype in ("int8", "uint8", "int16", "int32"):
        quant = Quantization(
            scale=tuple(float(s) for s in params.ScaleAsNumpy()),
            zero_point=tuple(int(z) for z in params.ZeroPointAsNumpy()),
            axis=int(params.QuantizedDimension()) if params.ScaleLength() > 1 else None,
        )
    layout = None
    if len(shape) == 4:
        layout = "NCHW" if shape[1] in (1, 3) and shape[3] not in (1, 3) else "NHWC"
    name = tensor.Name().decode() if tensor.Name() else name_fallback
    return TensorSpec(name=name, shape=shape, dtype=dtype, layout=layout, quantization=quant)


def _labels_from_zip(data: bytes, num_classes: int | None) -> tuple[str, ...]:
    """Labels from a text file zipped inside the model (TFLite metadata's associated files)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return ()
    candidates = []
    for name in archive.namelist():
        if name.lower().endswith(".txt"):
            lines = [line.strip() for line in archive.read(name).decode("utf-8", "replace").splitlines()]
            lines = [line for line in lines if line]
            candidates.append(tuple(lines))
    for lines in candidates:
        if num_classes is None or len(lines) == num_classes:
            return lines
    return ()


def _normalization_from_metadata(model, tflite) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of the first input's NormalizationOptions in the TFLITE_METADATA buffer."""
    import flatbuffers

    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != b"TFLITE_METADATA":
            continue
        buffer = model.Buffers(entry.Buffer()).DataAsNumpy()
        if not isinstance(buffer, np.ndarray):
            return None
        raw = buffer.tobytes()
        try:
            root = flatbuffers.table.Table(raw, flatbuffers.encode.Get(flatbuffers.packer.uoffset, raw, 0))
            subgraphs = _vector_tables(root, 3)  # ModelMetadata.subgraph_metadata
            inputs = _vector_tables(subgraphs[0], 2) if subgraphs else []  # input_tensor_metadata
            units = _vector_tables(inputs[0], 4) if inputs else []  # process_units
            for unit in units:
                if _scalar_u8(unit, 0) == 1:  # ProcessUnitOptions.NormalizationOptions
                    options = _table_field(unit, 1)
                    mean, std = _float_vector(options, 0), _float_vector(options, 1)
                    if mean and std:
                        return tuple(mean), tuple(std)
        except Exception:  # malformed metadata is ignored, never fatal
            return None
    return None


def _field_offset(table, index: int) -> int:
    return table.Offset(4 + 2 * index)


def _table_field(table, index: int):
    import flatbuffers

    offset = _field_offset(table, index)
    if not offset:
        return None
    return flatbuffers.table.Table(table.Bytes, table.Indirect(table.Pos + offset))


def _vector_tables(table, index: int) -> list:
    import flatbuffers

    offset = _field_offset(table, index)
    if not offset:
        return []
    start = table.Vector(offset)
    return [
        flatbuffers.table.Table(table.Bytes, table.Indirect(start + 4 * i))
        for i in range(table.VectorLen(offset))
    ]


def _scalar_u8(table, index: int) -> int:
    import flatbuffers

    offset = _field_offset(table, index)
    return table.Get(flatbuffers.number_types.Uint8Flags, table.Pos + offset) if offset else 0


def _float_vector(table, index: int) -> list[float]:
    import flatbuffers

    offset = _field_offset(table, index) if table is not None else 0
    if not offset:
        return []
    start = table.Vector(offset)
    return [table.Get(flatbuffers.number_types.Float32Flags, start + 4 * i) for i in range(table.VectorLen(offset))]


_PASS_THROUGH_OPS = ("QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE")


def _computing_op(producers: dict[int, tuple[str, int]], tensor: int) -> str:
    """Name of the op that computes ``tensor``, looking through type and shape changes."""
    name = ""
    for _ in range(len(producers) + 1):
        if tensor not in producers:
            break
        name, tensor = producers[tensor]
        if name not in _PASS_THROUGH_OPS:
            break
    return name


def read_tflite(path: str | Path) -> TFLiteModel:
    """Parse a .tflite file, raising UnsupportedModelError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: no such model file")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UnsupportedModelError(
            f"{path} is not a TFLite model (no TFL3 identifier); edgeq packages .tflite files"
        )
    tflite = _tflite()
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        if model.SubgraphsLength() < 1:
            raise UnsupportedModelError(f"{path} has no subgraph")
        graph = model.Subgraphs(0)
        names = _operator_names(tflite)
        codes = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            codes.append(names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM"))
        ops, producers = [], {}
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            name = codes[op.OpcodeIndex()]
            ops.append(name)
            for j in range(op.OutputsLength()):
                producers[int(op.Outputs(j))] = (name, int(op.Inputs(0)) if op.InputsLength() else -1)
        inputs = tuple(_tensor_spec(graph.Tensors(int(t)), f"input{i}") for i, t in enumerate(graph.InputsAsNumpy()))
        outputs = tuple(_tensor_spec(graph.Tensors(int(t)), f"output{i}") for i, t in enumerate(graph.OutputsAsNumpy()))
        output_producers = tuple(_computing_op(producers, int(t)) for t in graph.OutputsAsNumpy())
        normalization = _normalization_from_metadata(model, tflite)
    except UnsupportedModelError:
        raise
    except Exception as error:
        raise UnsupportedModelError(f"{path} is not a readable TFLite model ({error})") from None
    num_classes = int(np.prod(outputs[0].shape)) if outputs else None
    return TFLiteModel(
        path=path,
        data=data,
        inputs=inputs,
        outputs=outputs,
        ops=tuple(ops),
        output_producers=output_producers,
        labels=_labels_from_zip(data, num_classes),
        normalization=normalization,
    )
