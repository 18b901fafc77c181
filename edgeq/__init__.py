"""edgeq: take a trained vision model to an edge device and run it there in int8.

Device side (numpy, Pillow and cffi only)::

    import edgeq
    predictor = edgeq.load("model.edgeq")
    print(predictor.predict("cat.jpg"))

Host side (``pip install 'edgeq[host]'``)::

    edgeq.package("model.tflite", "model.edgeq", edgeq.PackageOptions(device="rpi4"))
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .devices import Device, get_device, list_devices
from .errors import (
    ArchitectureMismatchError,
    BundleFormatError,
    EdgeqError,
    GpuUnavailableError,
    InputError,
    MissingDependencyError,
    RuntimeFailure,
    UnknownDeviceError,
    UnsupportedModelError,
)
from .detection import Detection, Detections
from .manifest import Manifest
from .postprocess import Class, Classification
from .predictor import Predictor, load

if TYPE_CHECKING:  # host-side names, imported on first use
    from .compiler import CompileOptions
    from .packager import PackageOptions, PackageResult, package
    from .quantization import EvalSample, FallbackReport, QuantConfig, QuantizationReport, labelled_pictures, quantize

_HOST_NAMES = {
    "package": "packager",
    "PackageOptions": "packager",
    "PackageResult": "packager",
    "CompileOptions": "compiler",
    "quantize": "quantization",
    "QuantConfig": "quantization",
    "QuantizationReport": "quantization",
    "FallbackReport": "quantization",
    "EvalSample": "quantization",
    "labelled_pictures": "quantization",
}


def __getattr__(name: str) -> Any:
    if name in _HOST_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOST_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")


__all__ = [
    "ArchitectureMismatchError",
    "BundleFormatError",
    "Class",
    "Classification",
    "CompileOptions",
    "Detection",
    "Detections",
    "Device",
    "EdgeqError",
    "EvalSample",
    "FallbackReport",
    "GpuUnavailableError",
    "InputError",
    "Manifest",
    "MissingDependencyError",
    "PackageOptions",
    "PackageResult",
    "Predictor",
    "QuantConfig",
    "QuantizationReport",
    "RuntimeFailure",
    "UnknownDeviceError",
    "UnsupportedModelError",
    "get_device",
    "labelled_pictures",
    "list_devices",
    "load",
    "package",
    "quantize",
]
