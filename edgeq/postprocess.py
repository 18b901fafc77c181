"""Raw outputs to results: dequantize, softmax, top-k with labels (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .manifest import Postprocess, TensorSpec


@dataclass(frozen=True)
class Class:
    """One classification answer."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """The top-k classes of one picture, best first."""

    classes: tuple[Class, ...]

    @property
    def top(self) -> Class:
        return self.classes[0]

    def __str__(self) -> str:
        return "\n".join(f"{c.score:8.4f}  {c.index:5d}  {c.label}" for c in self.classes)


def dequantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values of an output tensor (float outputs pass through as float32)."""
    if spec.quantization is None or np.dtype(spec.dtype).kind == "f":
        return values.astype(np.float32)
    quant = spec.quantization
    scale = np.asarray(quant.scale, np.float32)
    zero_point = np.asarray(quant.zero_point, np.int32)
    if not quant.per_tensor and quant.axis is not None:
        shape = [1] * values.ndim
        shape[quant.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (values.astype(np.int32) - zero_point).astype(np.float32) * scale


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classify(
    outputs: Sequence[np.ndarray],
    specs: Sequence[TensorSpec],
    options: Postprocess,
    labels: Sequence[str],
    top_k: int | None = None,
) -> Classification:
    """Top-k classes of a classifier's output."""
    spec = specs[options.output_index]
    scores = dequantize(outputs[options.output_index], spec).reshape(-1)
    if options.softmax:
        scores = softmax(scores)
    k = min(top_k or options.top_k, scores.size)
    order = np.argsort(-scores, kind="stable")[:k]
    return Classification(
        tuple(
            Class(int(i), labels[i] if i < len(labels) else str(int(i)), float(scores[i]))
            for i in order
        )
    )
