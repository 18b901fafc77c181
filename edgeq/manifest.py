"""The bundle manifest: typed dataclasses and their JSON form.

Format 1: CPU bundles. Format 2 adds ``gpu`` (NVIDIA GPU bundles); CPU bundles are still
written as format 1, so older edgeq versions keep reading them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import BundleFormatError

# Format 1: CPU bundles. Format 2 adds the ``gpu`` section and the "bgr" colour order; bundles are
# written in the lowest format that holds them, so an older edgeq refuses what it would misread.
FORMAT_VERSION = 2  # the newest format this edgeq reads and writes
CPU_FORMAT_VERSION = 1  # what CPU bundles without format-2 features are written as
COLORS = ("rgb", "grey", "bgr")
_FORMAT_2_COLORS = ("bgr",)


def format_version_for(gpu: "GpuInfo | None", preprocess: "Preprocess | None" = None) -> int:
    """The lowest format that can hold a manifest with (or without) GPU information and this pre-processing."""
    if gpu is not None or (preprocess is not None and preprocess.color in _FORMAT_2_COLORS):
        return FORMAT_VERSION
    return CPU_FORMAT_VERSION


@dataclass(frozen=True)
class Quantization:
    """Affine quantization: real = scale * (q - zero_point); per channel along ``axis``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    @property
    def per_tensor(self) -> bool:
        return len(self.scale) == 1


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the source model defines it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str | None = None  # "NHWC", "NCHW" for pictures; None otherwise
    quantization: Quantization | None = None


@dataclass(frozen=True)
class Preprocess:
    """How a picture becomes the model's input tensor.

    Pixels (0..255, after colour conversion and resizing) are mapped to the model's real
    domain as ``(pixel - mean) / std`` per channel, or standardised per picture when
    ``standardize`` is set, then quantized with the input's scale and zero point if the input
    is quantized. ``raw_pixels`` feeds 0..255 unchanged to a uint8 input (or pixel - 128 to an
    int8 input), TFLite's convention for quantized image models.
    """

    color: str = "rgb"  # "rgb", "bgr" (channels in OpenCV's order) or "grey"
    resize: str = "bilinear"  # PIL resampling: "bilinear", "nearest", "bicubic", "lanczos"
    center_crop: float | None = None  # fraction of the shorter side kept before resizing
    mean: tuple[float, ...] = (127.5,)
    std: tuple[float, ...] = (127.5,)
    standardize: bool = False
    raw_pixels: bool = False
    letterbox: bool = False  # keep the aspect ratio when resizing; pad the rest with letterbox_fill
    letterbox_fill: int = 0  # pixel value (0..255) of the letterbox padding


@dataclass(frozen=True)
class SsdAnchorOptions:
    """SSD anchor generation (MediaPipe's SsdAnchorsCalculator options)."""

    input_size_height: int
    input_size_width: int
    num_layers: int
    strides: tuple[int, ...]
    min_scale: float
    max_scale: float
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    aspect_ratios: tuple[float, ...] = (1.0,)
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False


@dataclass(frozen=True)
class BoxDecodeOptions:
    """How one anchor's raw regressor values become a box and keypoints (TensorsToDetections)."""

    box_output: int  # index of the (1, N, num_coords) regressors output
    score_output: int  # index of the (1, N, num_classes) scores output
    num_coords: int = 4
    box_coord_offset: int = 0
    keypoint_coord_offset: int = 4
    num_keypoints: int = 0
    num_values_per_keypoint: int = 2
    x_scale: float = 1.0
    y_scale: float = 1.0
    w_scale: float = 1.0
    h_scale: float = 1.0
    reverse_output_order: bool = True  # boxes are (x, y, w, h) rather than (y, x, h, w)
    apply_exponential_on_box_size: bool = False
    sigmoid_score: bool = True
    score_clipping_thresh: float | None = None


@dataclass(frozen=True)
class NmsOptions:
    """Non-maximum suppression: "weighted" (MediaPipe's blending) or "hard" (greedy)."""

    algorithm: str = "weighted"
    iou_threshold: float = 0.3
    max_detections: int | None = None


@dataclass(frozen=True)
class DetectionOutputs:
    """Output indices of a model ending in TFLite's DETECTION_POSTPROCESS op."""

    boxes: int = 0  # (1, N, 4) normalised (ymin, xmin, ymax, xmax)
    classes: int = 1
    scores: int = 2
    count: int = 3


@dataclass(frozen=True)
class Postprocess:
    """How raw outputs become a result.

    ``kind``: "classification" (top-k), "ssd_anchors" (anchors + box decoding + NMS, the
    ``anchors``/``decode``/``nms`` fields), "detection_postprocess" (the model already decodes:
    ``detection_outputs``) or "raw".
    """

    kind: str = "classification"
    output_index: int = 0
    softmax: bool = False  # apply softmax to the dequantized output (it holds logits)
    top_k: int = 5
    min_score: float = 0.5  # detections scoring below are dropped
    anchors: SsdAnchorOptions | None = None
    decode: BoxDecodeOptions | None = None
    nms: NmsOptions | None = None
    detection_outputs: DetectionOutputs | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "Postprocess":
        """Parse the JSON form; the detection fields are optional (older manifests lack them)."""
        values = dict(data)
        for name, kind in (("anchors", SsdAnchorOptions), ("decode", BoxDecodeOptions),
                           ("nms", NmsOptions), ("detection_outputs", DetectionOutputs)):
            if values.get(name) is not None:
                values[name] = kind(**values[name])
        if values.get("anchors") is not None:
            a = values["anchors"]
            values["anchors"] = replace(a, strides=tuple(int(s) for s in a.strides),
                                        aspect_ratios=tuple(float(r) for r in a.aspect_ratios))
        return cls(**values)


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SourceModel:
    name: str
    format: str  # "tflite" or "onnx"
    sha256: str


@dataclass(frozen=True)
class TargetInfo:
    """The device the library was compiled for."""

    device: str
    arch: str
    kind: str
    tvm_target: dict[str, Any]
    num_cores: int | None
    cpu_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeInfo:
    """The TVM runtime libraries shipped in the bundle."""

    platform: str
    glibc_floor: str | None
    tvm_version: str
    tvm_ffi_version: str
    sha256: str  # of the runtime files together: identifies the runtime build


@dataclass(frozen=True)
class GpuInfo:
    """What a GPU bundle needs on the device and where its precompiled kernels are."""

    arch: str  # the chip generation the kernels are compiled for, e.g. "sm_90"
    cuda_runtime: str  # major version of the bundled CUDA runtime library, e.g. "13"
    min_driver: str  # NVIDIA driver branch that supports that runtime, e.g. "580"
    kernels: dict[str, str]  # sha256 of each CUDA source -> its fatbin in the bundle
    compiler: str  # what compiled the kernels, e.g. "nvcc 13.0.88"
    cuda_graph: bool = True  # the VM replays the model's launches as one CUDA graph
    precision: str = "native"  # "native" or "fp16"


@dataclass(frozen=True)
class Manifest:
    format_version: int
    edgeq_version: str
    source: SourceModel
    target: TargetInfo
    runtime: RuntimeInfo
    library: str  # path of the compiled library inside the bundle
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: Preprocess
    postprocess: Postprocess
    labels: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    compile_report: dict[str, Any] = field(default_factory=dict)
    gpu: GpuInfo | None = None  # set for NVIDIA GPU bundles (format 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Parse and validate a manifest, raising BundleFormatError on anything malformed."""
        if not isinstance(data, dict):
            raise BundleFormatError("manifest.json is not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise BundleFormatError("manifest.json has no integer format_version")
        if version > FORMAT_VERSION:
            raise BundleFormatError(
                f"bundle format {version} is newer than this edgeq understands ({FORMAT_VERSION}); "
                "upgrade edgeq on this device (pip install -U edgeq)"
            )
        if version < 1:
            raise BundleFormatError(f"bundle format {version} is not a valid edgeq format")
        if data.get("gpu") is not None and version < FORMAT_VERSION:
            raise BundleFormatError(f"bundle format {version} cannot hold GPU information: rewritten?")
        color = (data.get("preprocess") or {}).get("color", "rgb")
        if color not in COLORS or (color in _FORMAT_2_COLORS and version < FORMAT_VERSION):
            raise BundleFormatError(f"bundle format {version} cannot hold the colour order {color!r}: rewritten?")
        try:
            return cls(
                format_version=version,
                edgeq_version=str(data["edgeq_version"]),
                source=SourceModel(**data["source"]),
                target=_target(data["target"]),
                runtime=RuntimeInfo(**data["runtime"]),
                library=str(data["library"]),
                inputs=tuple(_tensor(t) for t in data["inputs"]),
                outputs=tuple(_tensor(t) for t in data["outputs"]),
                preprocess=_preprocess(data["preprocess"]),
                postprocess=Postprocess.from_dict(data["postprocess"]),
                labels=tuple(str(label) for label in data.get("labels", ())),
                files=tuple(FileEntry(**f) for f in data["files"]),
                compile_report=dict(data.get("compile_report") or {}),
                gpu=None if data.get("gpu") is None else _gpu(data["gpu"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BundleFormatError(f"manifest.json is malformed: {error!r}") from None


def _tensor(data: dict[str, Any]) -> TensorSpec:
    quant = data.get("quantization")
    return TensorSpec(
        name=str(data["name"]),
        shape=tuple(int(d) for d in data["shape"]),
        dtype=str(data["dtype"]),
        layout=data.get("layout"),
        quantization=None
        if quant is None
        else Quantization(
            scale=tuple(float(s) for s in quant["scale"]),
            zero_point=tuple(int(z) for z in quant["zero_point"]),
            axis=quant.get("axis"),
        ),
    )


def _preprocess(data: dict[str, Any]) -> Preprocess:
    values = dict(data)
    values["mean"] = tuple(float(m) for m in values.get("mean", (127.5,)))
    values["std"] = tuple(float(s) for s in values.get("std", (127.5,)))
    return Preprocess(**values)


def _gpu(data: dict[str, Any]) -> GpuInfo:
    values = dict(data)
    values["kernels"] = {str(k): str(v) for k, v in dict(values["kernels"]).items()}
    return GpuInfo(**values)


def _target(data: dict[str, Any]) -> TargetInfo:
    values = dict(data)
    values["cpu_features"] = tuple(values.get("cpu_features", ()))
    return TargetInfo(**values)
