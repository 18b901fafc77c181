"""Read what edgeq needs from an .onnx file: tensors, ops, labels and a pre-processing guess.

ONNX carries no pre-processing metadata, so ``read_onnx`` guesses one (``OnnxModel.preprocess``):
ImageNet's mean/std on RGB pixels with an 0.875 centre crop (the torchvision / PaddleClas
convention), and BGR pixels with Lanczos resizing for models exported by Paddle2ONNX (PaddleClas
feeds OpenCV's BGR pictures). Override any field with ``PackageOptions.preprocess`` or the CLI
(``--mean``, ``--std``, ``--color``, ``--center-crop``, ``--resize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError, UnsupportedModelError
from .manifest import Preprocess, Quantization, TensorSpec

# onnx.TensorProto element types -> numpy dtype names.
_ELEMENT_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}
_PASS_THROUGH_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "DequantizeLinear", "QuantizeLinear", "Cast")
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0.485, 0.456, 0.406 on the 0..255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)  # 0.229, 0.224, 0.225
_LABEL_METADATA_KEYS = ("character", "labels", "classes")  # PaddleOCR/RapidAI store class names as "character"


@dataclass(frozen=True)
class OnnxModel:
    """A parsed ONNX model: the pieces the packager, the compiler and the reference checks need."""

    path: Path
    data: bytes
    inputs: tuple[TensorSpec, ...]  # symbolic batch dimensions fixed to 1
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]  # op types in graph order
    output_producers: tuple[str, ...]  # op computing each output, looking through Identity/Reshape/QDQ
    labels: tuple[str, ...]  # from the model's metadata_props ("character"/"labels"), else none
    opset: int
    producer: str  # e.g. "PaddlePaddle", "pytorch"
    preprocess: Preprocess  # edgeq's guess; see the module docstring
    format: str = "onnx"

    @property
    def is_qdq(self) -> bool:
        """True when the graph holds QuantizeLinear/DequantizeLinear (a QDQ-quantized model)."""
        return "QuantizeLinear" in self.ops or "DequantizeLinear" in self.ops

    @property
    def is_quantized(self) -> bool:
        return self.is_qdq

    def proto(self) -> Any:
        """The model as an ``onnx.ModelProto`` with the inputs' symbolic batch fixed to 1."""
        onnx = _onnx()
        model = onnx.load_from_string(self.data)
        for value, spec in zip(_graph_inputs(model), self.inputs):
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, spec.shape):
                if not dim.HasField("dim_value"):
                    dim.Clear()
                    dim.dim_value = size
        return model


def _onnx():
    try:
        import onnx

        return onnx
    except ImportError:
        raise MissingDependencyError("reading ONNX models needs the host extras: pip install 'edgeq[host]'") from None


def _graph_inputs(model: Any) -> list[Any]:
    """Graph inputs that are real inputs (older exporters also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _constant(model: Any, name: str) -> Any:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _qdq_params(model: Any, node: Any) -> Quantization | None:
    scale = _constant(model, node.input[1]) if len(node.input) > 1 else None
    zero_point = _constant(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None:
        return None
    scales = tuple(float(s) for s in scale.reshape(-1))
    zero_points = tuple(int(z) for z in zero_point.reshape(-1)) if zero_point is not None else (0,) * len(scales)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if len(scales) > 1 else None
    return Quantization(scale=scales, zero_point=zero_points, axis=axis)


def _tensor_spec(model: Any, value: Any, is_input: bool) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = _ELEMENT_TYPES.get(tensor_type.elem_type)
    if dtype is None:
        raise UnsupportedModelError(
            f"ONNX tensor {value.name!r} has element type {tensor_type.elem_type}, which edgeq cannot feed"
        )
    shape = []
    for position, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif position == 0:
            shape.append(1)  # a symbolic batch: edgeq bundles run batch 1
        else:
            raise UnsupportedModelError(
                f"ONNX tensor {value.name!r} has a symbolic dimension {dim.dim_param or '?'} at position "
                f"{position}; edgeq compiles fixed shapes: export the model with a fixed input size"
            )
    layout = None
    if len(shape) == 4:
        layout = "NHWC" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"
    quantization = None
    if dtype in ("int8", "uint8", "int16"):
        wanted = "DequantizeLinear" if is_input else "QuantizeLinear"
        for node in model.graph.node:
            if node.op_type == wanted and (node.input[0] if is_input else node.output[0]) == value.name:
                quantization = _qdq_params(model, node)
                break
    return TensorSpec(name=value.name, shape=tuple(shape), dtype=dtype, layout=layout, quantization=quantization)


def _computing_op(model: Any, tensor: str) -> str:
    producers = {output: node for node in model.graph.node for output in node.output}
    name = ""
    for _ in range(len(producers) + 1):
        node = producers.get(tensor)
        if node is None:
            break
        name = node.op_type
        if name not in _PASS_THROUGH_OPS or not node.input:
            break
        tensor = node.input[0]
    return name


def _labels(model: Any, classes: int) -> tuple[str, ...]:
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    for key in _LABEL_METADATA_KEYS:
        lines = tuple(line.strip() for line in metadata.get(key, "").splitlines() if line.strip())
        if lines and len(lines) == classes:
            return lines
    return ()


def guess_preprocess(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], producer: str) -> Preprocess:
    """edgeq's pre-processing guess for an ONNX picture model (see the module docstring)."""
    spec = inputs[0] if inputs else None
    grey = spec is not None and spec.layout is not None and len(spec.shape) == 4 and (
        spec.shape[1] if spec.layout == "NCHW" else spec.shape[3]) == 1
    if grey:
        return Preprocess(color="grey", mean=(127.5,), std=(127.5,))
    if spec is not None and spec.dtype == "uint8" and spec.quantization is None:
        return Preprocess(raw_pixels=True)
    paddle = producer.lower().startswith("paddle") or any(o.name.startswith("fetch_name_") for o in outputs)
    if paddle:  # PaddleClas: OpenCV BGR pictures, resize_short 256 (Lanczos), centre crop 224
        return Preprocess(color="bgr", resize="lanczos", center_crop=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Preprocess(color="rgb", center_crop=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def read_onnx(path: str | Path) -> OnnxModel:
    """Parse an .onnx file, raising UnsupportedModelError if it is not one edgeq can package."""
    path = Path(path)
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: no such model file")
    onnx = _onnx()
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as error:  # protobuf raises DecodeError and friends
        raise UnsupportedModelError(f"{path} is not a readable ONNX model ({error})") from None
    if not model.graph.node:
        raise UnsupportedModelError(f"{path} is not an ONNX model with a graph (no nodes)")
    if any(fn for fn in model.functions):
        raise UnsupportedModelError(f"{path} uses ONNX model-local functions, which edgeq cannot import")
    inputs = tuple(_tensor_spec(model, value, True) for value in _graph_inputs(model))
    outputs = tuple(_tensor_spec(model, value, False) for value in model.graph.output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    classes = 1
    for dim in outputs[0].shape if outputs else ():
        classes *= dim
    producer = model.producer_name or ""
    return OnnxModel(
        path=path,
        data=data,
        inputs=inputs,
        outputs=outputs,
        ops=tuple(node.op_type for node in model.graph.node),
        output_producers=tuple(_computing_op(model, value.name) for value in model.graph.output),
        labels=_labels(model, classes),
        opset=opset,
        producer=producer,
        preprocess=guess_preprocess(inputs, outputs, producer),
    )
