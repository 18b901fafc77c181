"""Host side: ``package(model, device)`` -> one verified ``.edgeq`` bundle file."""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import __version__
from .bundle import BUNDLE_SUFFIX, sha256_bytes, write_bundle
from .compiler import CompileOptions, compile_model
from .devices import Device, get_device
from .errors import EdgeqError
from .manifest import (
    BoxDecodeOptions,
    GpuInfo,
    DetectionOutputs,
    NmsOptions,
    SsdAnchorOptions,
    Manifest,
    Postprocess,
    Preprocess,
    RuntimeInfo,
    SourceModel,
    TargetInfo,
    TensorSpec,
    format_version_for,
)
from .predictor import RUNTIME_DIR
from .tflite_model import TFLiteModel, read_tflite

if TYPE_CHECKING:
    from .quantization import QuantConfig, QuantizationReport

LIBRARY_NAME = "model/library.so"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PackageOptions:
    """Everything ``package`` can be told besides the model and the output path."""

    device: str = "x86_64"
    labels: Path | None = None  # a text file, one label per line, in class order
    preprocess: Mapping[str, Any] = field(default_factory=dict)  # overrides of Preprocess fields
    postprocess: Mapping[str, Any] | None = None  # Postprocess fields (JSON form) over the detected ones
    compile: CompileOptions = CompileOptions()
    runtime_wheels: Path | None = None  # folder of apache-tvm / apache-tvm-ffi wheels (offline)
    quantize: QuantConfig | None = None  # calibrate a float model and package its int8 twin
    calibration: Path | None = None  # folder of calibration pictures (with ``quantize``)
    # folder of evaluation pictures for ``quantize.max_accuracy_drop`` (sub-folders named by class
    # index or label; pictures directly inside are scored by agreement with the float model). None:
    # every 4th calibration picture is held out and scored by agreement with the float model.
    evaluation: Path | None = None


@dataclass(frozen=True)
class PackageResult:
    path: Path
    manifest: Manifest
    seconds: float


def default_preprocess(model: TFLiteModel) -> Preprocess:
    """Pre-processing for a picture model, from its input tensor and metadata.

    Quantized picture inputs take raw pixels (TFLite's convention); float inputs use the
    model metadata's normalisation, or [-1, 1] when it has none.
    """
    spec = model.inputs[0]
    color = "grey" if spec.layout and _channels(spec) == 1 else "rgb"
    if spec.dtype in ("uint8", "int8"):
        return Preprocess(color=color, raw_pixels=True)
    if model.normalization is not None:
        mean, std = model.normalization
        return Preprocess(color=color, mean=mean, std=std)
    return Preprocess(color=color)


def blazeface_short_range(box_output: int = 0, score_output: int = 1) -> Postprocess:
    """MediaPipe's face_detection_short_range settings: 896 anchors, 6 keypoints, weighted NMS."""
    return Postprocess(
        kind="ssd_anchors",
        min_score=0.5,
        anchors=SsdAnchorOptions(
            input_size_height=128, input_size_width=128, num_layers=4, strides=(8, 16, 16, 16),
            min_scale=0.1484375, max_scale=0.75, anchor_offset_x=0.5, anchor_offset_y=0.5,
            aspect_ratios=(1.0,), fixed_anchor_size=True,
        ),
        decode=BoxDecodeOptions(
            box_output=box_output, score_output=score_output, num_coords=16, box_coord_offset=0,
            keypoint_coord_offset=4, num_keypoints=6, num_values_per_keypoint=2,
            x_scale=128.0, y_scale=128.0, w_scale=128.0, h_scale=128.0,
            reverse_output_order=True, sigmoid_score=True, score_clipping_thresh=100.0,
        ),
        nms=NmsOptions(algorithm="weighted", iou_threshold=0.3),
    )


def default_postprocess(model: TFLiteModel) -> Postprocess:
    """Post-processing recognised from the model's outputs.

    Classification with top-5 for a single (1, N) scores output; the BlazeFace short-range
    preset for a 128x128 model with (1, 896, 16) and (1, 896, 1) outputs; detection_postprocess
    for four outputs of TFLite's DETECTION_POSTPROCESS (custom) op; raw outputs otherwise.
    """
    classes = _class_count(model)
    if len(model.outputs) == 1 and classes >= 2 and max(model.outputs[0].shape) == classes:
        already_probabilities = model.output_producers[0] in ("SOFTMAX", "LOGISTIC", "Softmax", "Sigmoid")
        return Postprocess(kind="classification", softmax=not already_probabilities, top_k=min(5, classes))
    shapes = [spec.shape for spec in model.outputs]
    if len(shapes) == 2 and len(model.inputs) == 1 and model.inputs[0].shape[1:3] == (128, 128):
        boxes = [i for i, s in enumerate(shapes) if s == (1, 896, 16)]
        scores = [i for i, s in enumerate(shapes) if s == (1, 896, 1)]
        if len(boxes) == 1 and len(scores) == 1:
            return blazeface_short_range(boxes[0], scores[0])
    if len(shapes) == 4 and set(model.output_producers) == {"CUSTOM"} and "CUSTOM" in model.ops:
        boxes = [i for i, s in enumerate(shapes) if len(s) == 3 and s[-1] == 4]
        counts = [i for i, s in enumerate(shapes) if len(s) <= 1]
        if len(boxes) == 1 and len(counts) == 1:
            rest = [i for i in range(4) if i not in (boxes[0], counts[0])]
            # TFLite's op emits boxes, classes, scores, count in this order.
            return Postprocess(kind="detection_postprocess",
                               detection_outputs=DetectionOutputs(boxes[0], rest[0], rest[1], counts[0]))
    return Postprocess(kind="raw")


def read_postprocess(path: str | Path) -> dict[str, Any]:
    """A post-processing JSON file: Postprocess fields, e.g. {"kind": "ssd_anchors", "anchors": {...}}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EdgeqError(f"cannot read post-processing file {path}: {error}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"{path} must hold a JSON object of post-processing fields")
    return data


def _postprocess(model: TFLiteModel, overrides: Mapping[str, Any] | None) -> Postprocess:
    detected = default_postprocess(model)
    if not overrides:
        return detected
    try:
        base = asdict(detected) if "kind" not in overrides or overrides["kind"] == detected.kind else {}
        post = Postprocess.from_dict({**base, **dict(overrides)})
    except (TypeError, ValueError) as error:
        raise EdgeqError(f"invalid post-processing options: {error}") from None
    if post.kind == "ssd_anchors" and (post.anchors is None or post.decode is None):
        raise EdgeqError("ssd_anchors post-processing needs 'anchors' and 'decode' options")
    if post.kind == "detection_postprocess" and post.detection_outputs is None:
        post = replace(post, detection_outputs=DetectionOutputs())
    return post


def _channels(spec: TensorSpec) -> int:
    return spec.shape[1] if spec.layout == "NCHW" else spec.shape[-1]


def _read_labels(path: Path, expected: int | None) -> tuple[str, ...]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as error:
        raise EdgeqError(f"cannot read labels file {path}: {error.strerror}") from None
    labels = tuple(line for line in lines if line)
    if expected is not None and len(labels) != expected:
        raise EdgeqError(f"{path} has {len(labels)} labels but the model scores {expected} classes")
    return labels


def _runtime_files(device: Device, options: PackageOptions, progress: Progress) -> tuple[dict[str, bytes], RuntimeInfo]:
    from .runtime_libs import cuda_runtime_libraries, runtime_libraries

    libraries = runtime_libraries(device.arch, wheels_dir=options.runtime_wheels, progress=progress)
    paths = dict(libraries.files)
    if device.kind == "cuda":
        paths.update(cuda_runtime_libraries(device.arch, wheels_dir=options.runtime_wheels, progress=progress))
    files = {f"{RUNTIME_DIR}/{name}": Path(path).read_bytes() for name, path in sorted(paths.items())}
    identity = sha256_bytes("".join(sha256_bytes(data) for data in files.values()).encode())
    info = RuntimeInfo(
        platform=libraries.platform,
        glibc_floor=libraries.glibc_floor,
        tvm_version=libraries.tvm_version,
        tvm_ffi_version=libraries.tvm_ffi_version,
        sha256=identity,
    )
    return files, info


def package(
    model_path: str | Path,
    output: str | Path | None = None,
    options: PackageOptions = PackageOptions(),
    progress: Progress | None = None,
) -> PackageResult:
    """Compile ``model_path`` for ``options.device`` and write the bundle; returns its path and manifest."""
    started = time.perf_counter()
    say = progress or (lambda _: None)
    model_path = Path(model_path)
    device = get_device(options.device)
    device.require_buildable()
    say(f"reading {model_path.name}")
    if model_path.suffix.lower() == ".onnx":
        from .onnx_model import read_onnx

        model = read_onnx(model_path)
    else:
        model = read_tflite(model_path)
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        say("note: not a single-picture-input model; predict() will need raw tensors via run()")
    try:
        base = model.preprocess if getattr(model, "format", "tflite") == "onnx" else default_preprocess(model)
        preprocess = replace(base, **dict(options.preprocess))
    except TypeError as error:
        raise EdgeqError(f"unknown pre-processing option: {error}") from None
    postprocess = _postprocess(model, options.postprocess)
    labels = model.labels
    if not labels and postprocess.anchors is not None and postprocess.anchors == blazeface_short_range().anchors:
        labels = ("face",)
    if options.labels is not None:
        labels = _read_labels(options.labels, _class_count(model) if postprocess.kind == "classification" else None)

    source_sha256 = sha256_bytes(model.data)
    with tempfile.TemporaryDirectory(prefix="edgeq-quantize-") as workdir:
        quantization = None
        if options.quantize is not None:
            model, quantization = _quantize(model, preprocess, options, Path(workdir), say, labels=labels)
        library = compile_model(model, device, options.compile, say)
    if quantization is not None:
        library = replace(library, report={**library.report, "quantization": quantization.to_dict()})
    say(f"collecting the TVM runtime for {device.arch}" + (" and CUDA" if device.kind == "cuda" else ""))
    files, runtime = _runtime_files(device, options, say)
    files[LIBRARY_NAME] = library.data
    gpu = None
    if library.kernels is not None:
        from .cuda_build import CUDA_RUNTIME_MAJOR, KERNEL_DIR, MIN_DRIVER

        kernel_files = {key: f"{KERNEL_DIR}/{key[:16]}.fatbin" for key in library.kernels.fatbins}
        for key, member in kernel_files.items():
            files[member] = library.kernels.fatbins[key]
        gpu = GpuInfo(
            arch=library.kernels.arch,
            cuda_runtime=str(CUDA_RUNTIME_MAJOR),
            min_driver=MIN_DRIVER,
            kernels=kernel_files,
            compiler=library.kernels.compiler,
            cuda_graph=options.compile.cuda_graph,
            precision=options.compile.precision,
        )

    manifest = Manifest(
        format_version=format_version_for(gpu, preprocess),
        edgeq_version=__version__,
        source=SourceModel(name=model_path.name, format=getattr(model, "format", "tflite"), sha256=source_sha256),
        target=TargetInfo(
            device=device.name,
            arch=device.arch,
            kind=device.kind,
            tvm_target=dict(device.tvm_target or {}),
            num_cores=device.num_cores,
            cpu_features=device.cpu_features,
        ),
        runtime=runtime,
        library=LIBRARY_NAME,
        inputs=model.inputs,
        outputs=model.outputs,
        preprocess=preprocess,
        postprocess=postprocess,
        labels=labels,
        compile_report=library.report,
        gpu=gpu,
    )
    output_path = Path(output) if output else Path(model_path.stem + BUNDLE_SUFFIX)
    say(f"writing {output_path}")
    manifest = write_bundle(output_path, manifest, files)
    return PackageResult(output_path, manifest, time.perf_counter() - started)


def _class_count(model: TFLiteModel) -> int:
    count = 1
    for dim in model.outputs[0].shape:
        count *= dim
    return count


def _quantize(
    model: TFLiteModel, preprocess: Preprocess, options: PackageOptions, workdir: Path, say: Progress,
    labels: tuple[str, ...] = (),
) -> tuple[TFLiteModel, QuantizationReport]:
    """Calibrate ``model`` on the pictures in ``options.calibration`` and return its int8 twin."""
    from .quantization import picture_calibration, quantize

    if options.compile.precision != "native":
        raise EdgeqError(f"int8 quantization and {options.compile.precision} precision exclude each other; pick one")
    if options.calibration is None:
        raise EdgeqError("quantizing needs calibration pictures: give --calibration DIR (a folder of pictures)")
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise EdgeqError("--calibration DIR needs a single-picture-input model; use edgeq.quantize() with tensors")
    config = options.quantize
    budget = config.max_accuracy_drop is not None
    if options.evaluation is not None and not budget:
        raise EdgeqError("an evaluation folder is only used with an accuracy budget (--max-accuracy-drop or --quantize auto)")
    if getattr(model, "format", "tflite") == "onnx":  # onnxruntime's QDQ quantizer; see onnx_quantize.py
        from .quantization.onnx_quantize import quantize_for_bundle

        return quantize_for_bundle(model, preprocess, config, options.calibration, workdir,
                                   eval_dir=options.evaluation, labels=labels or model.labels, progress=say)
    limit = config.samples_to_read(evaluation_given=options.evaluation is not None)
    calibration = picture_calibration(options.calibration, model.inputs[0], preprocess, limit=limit)
    evaluation = None
    if budget and options.evaluation is not None:
        from .quantization.evaluation import labelled_pictures

        evaluation = labelled_pictures(options.evaluation, model.inputs[0], preprocess, labels=labels or model.labels)
    output = workdir / f"{model.path.stem}_int8.tflite"
    report = quantize(model.path, calibration, config, output, progress=say, evaluation=evaluation)
    for line in report.summary().splitlines() + (report.fallback.table().splitlines() if report.fallback else []):
        say(line)
    quantized = read_tflite(output)
    return replace(quantized, labels=model.labels, normalization=model.normalization), report
