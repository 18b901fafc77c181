"""Automatic int8 quantization of float TFLite models (host side).

    from edgeq.quantization import QuantConfig, picture_calibration, quantize
    data = picture_calibration("pictures/", "model_fp32.tflite", limit=100)
    report = quantize("model_fp32.tflite", data, QuantConfig(method="percentile"), "model_int8.tflite")
    print(report.summary()); print(report.table())

The written model is an ordinary fully-quantized TFLite model (float in, float out): check it in
TFLite's interpreter, or package it (``edgeq package --quantize int8`` does both steps).
``edgeq.quantize(...)`` is this package's ``quantize``.

An accuracy budget keeps the most sensitive layers float until the top-1 drop holds::

    samples = labelled_pictures("eval/", data.spec, data.preprocess)  # sub-folders named by class
    report = quantize("model_fp32.tflite", data, QuantConfig(max_accuracy_drop=1.0), evaluation=samples)
    print(report.fallback.table())
"""
from __future__ import annotations

from .config import Calibration, PictureCalibration, QuantConfig, Sample, picture_calibration, picture_files
from .evaluation import EvalSample, labelled_pictures, top1_accuracy
from .fallback import FallbackReport, FallbackStep, LayerSensitivity, fit_accuracy_budget
from .quantizer import quantize
from .report import LayerReport, QuantizationReport
from .rewrite import SUPPORTED

__all__ = [
    "Calibration",
    "EvalSample",
    "FallbackReport",
    "FallbackStep",
    "LayerReport",
    "LayerSensitivity",
    "PictureCalibration",
    "QuantConfig",
    "QuantizationReport",
    "SUPPORTED",
    "Sample",
    "fit_accuracy_budget",
    "labelled_pictures",
    "picture_calibration",
    "picture_files",
    "quantize",
    "top1_accuracy",
]
