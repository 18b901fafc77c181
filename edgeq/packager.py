"""Host side: ``package(model, device)`` -> one verified ``.edgeq`` bundle file."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__
from .bundle import BUNDLE_SUFFIX, sha256_bytes, write_bundle
from .compiler import CompileOptions, compile_model
from .devices import Device, get_device
from .errors import EdgeqError, UnsupportedModelError
from .manifest import (
    FORMAT_VERSION,
    Manifest,
    Postprocess,
    Preprocess,
    RuntimeInfo,
    SourceModel,
    TargetInfo,
    TensorSpec,
)
from .predictor import RUNTIME_DIR
from .tflite_model import TFLiteModel, read_tflite

LIBRARY_NAME = "model/library.so"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PackageOptions:
    """Everything ``package`` can be told besides the model and the output path."""

    device: str = "x86_64"
    labels: Path | None = None  # a text file, one label per line, in class order
    preprocess: Mapping[str, Any] = field(default_factory=dict)  # overrides of Preprocess fields
    compile: CompileOptions = CompileOptions()
    runtime_wheels: Path | None = None  # folder of apache-tvm / apache-tvm-ffi wheels (offline)


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


def default_postprocess(model: TFLiteModel) -> Postprocess:
    """Classification with top-5 for a single (1, N) scores output; raw outputs otherwise."""
    classes = _class_count(model)
    if len(model.outputs) == 1 and classes >= 2 and max(model.outputs[0].shape) == classes:
        already_probabilities = model.output_producers[0] in ("SOFTMAX", "LOGISTIC")
        return Postprocess(kind="classification", softmax=not already_probabilities, top_k=min(5, classes))
    return Postprocess(kind="raw")


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
    from .runtime_libs import runtime_libraries

    libraries = runtime_libraries(device.arch, wheels_dir=options.runtime_wheels, progress=progress)
    files = {f"{RUNTIME_DIR}/{name}": Path(path).read_bytes() for name, path in sorted(libraries.files.items())}
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
    if model_path.suffix.lower() == ".onnx":
        raise UnsupportedModelError("ONNX models are not packaged yet; convert to TFLite or wait for ONNX support")
    device = get_device(options.device)
    device.require_buildable()
    say(f"reading {model_path.name}")
    model = read_tflite(model_path)
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        say("note: not a single-picture-input model; predict() will need raw tensors via run()")
    try:
        preprocess = replace(default_preprocess(model), **dict(options.preprocess))
    except TypeError as error:
        raise EdgeqError(f"unknown pre-processing option: {error}") from None
    postprocess = default_postprocess(model)
    labels = model.labels
    if options.labels is not None:
        labels = _read_labels(options.labels, _class_count(model) if postprocess.kind == "classification" else None)

    library = compile_model(model, device, options.compile, say)
    say(f"collecting the TVM runtime for {device.arch}")
    files, runtime = _runtime_files(device, options, say)
    files[LIBRARY_NAME] = library.data

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        edgeq_version=__version__,
        source=SourceModel(name=model_path.name, format="tflite", sha256=sha256_bytes(model.data)),
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
