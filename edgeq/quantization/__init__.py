"""Automatic int8 quantization of float TFLite models (host side).

    from edgeq.quantization import QuantConfig, picture_calibration, quantize
    data = picture_calibration("pictures/", "model_fp32.tflite", limit=100)
    report = quantize("model_fp32.tflite", data, QuantConfig(method="percentile"), "model_int8.tflite")
    print(report.summary()); print(report.table())

The written model is an ordinary fully-quantized TFLite model (float in, float out): check it in
TFLite's interpreter, or package it (``edgeq package --quantize int8`` does both steps).
``edgeq.quantize(...)`` is this package's ``quantize``.
"""
from __future__ import annotations

from .config import Calibration, PictureCalibration, QuantConfig, Sample, picture_calibration, picture_files
from .quantizer import quantize
from .report import LayerReport, QuantizationReport
from .rewrite import SUPPORTED

__all__ = [
    "Calibration",
    "LayerReport",
    "PictureCalibration",
    "QuantConfig",
    "QuantizationReport",
    "SUPPORTED",
    "Sample",
    "picture_calibration",
    "picture_files",
    "quantize",
]
