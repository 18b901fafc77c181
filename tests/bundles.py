"""Helpers shared by tests: package shared models once per session and pick fitting pictures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import shared_path

# Which shared pictures fit which shared model (all are resized by the bundle's pre-processing).
PICTURES = {
    "efficientnet_lite0_uint8.tflite": ["imagenet-samples"],
    "mlperf_tiny_resnet_cifar10_int8.tflite": ["cifar10-samples"],
    "mlperf_tiny_vww_int8.tflite": ["imagenet-samples"],
    "mltk_rps96_int8.tflite": ["mnist-samples", "cifar10-samples"],
    "mltk_rps96_float32.tflite": ["mnist-samples", "cifar10-samples"],
    "mediapipe_face_detection_short_range_float.tflite": ["faces", "imagenet-samples"],
}

# Pre-processing each shared model was trained with (see ../shared/README.md).
PREPROCESS = {
    "mlperf_tiny_vww_int8.tflite": {"mean": (0.0,), "std": (1.0,)},
    "mltk_rps96_int8.tflite": {"standardize": True},
    "mltk_rps96_float32.tflite": {"standardize": True},
    "mediapipe_face_detection_short_range_float.tflite": {"mean": (127.5,), "std": (127.5,)},
}


def pictures_for(model_name: str) -> list[Path]:
    paths: list[Path] = []
    for folder in PICTURES[model_name]:
        directory = shared_path("data", folder)
        paths += sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return paths


def output_difference(kind: str, got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Element-wise difference in the unit of the model's OUTPUT_KIND: quantization steps for
    "integer" and "dequantized" outputs, error relative to the largest magnitude for "float"."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if kind == "float":
        return diff / (np.abs(want).max() + 1e-12)
    return diff / SOFTMAX_STEP if kind == "dequantized" else diff

# How outputs are compared: "integer" outputs in quantization steps; "dequantized" float outputs
# of int8 models (softmax, step 1/256); "float" models by relative error.
OUTPUT_KIND = {
    "efficientnet_lite0_uint8.tflite": "integer",
    "mlperf_tiny_resnet_cifar10_int8.tflite": "integer",
    "mlperf_tiny_vww_int8.tflite": "dequantized",
    "mltk_rps96_int8.tflite": "dequantized",
    "mltk_rps96_float32.tflite": "float",
    "mediapipe_face_detection_short_range_float.tflite": "float",
}
SOFTMAX_STEP = 1.0 / 256
