"""The host reference: TFLite's own interpreter (ai-edge-litert, or tflite-runtime where it works);
onnxruntime for ONNX models (``OnnxReference``).

Two kernel sets: ``"reference"`` (TFLite's reference kernels, OpResolverType.BUILTIN_REF) define
quantized arithmetic the same on every platform and are what edgeq's integer kernels match bit for
bit; ``"default"`` (the optimized kernels with XNNPACK) is what TFLite users run and what latency is
compared with. The optimized x86 int8 kernels round differently from the reference ones (up to
15 steps on EfficientNet-Lite0's softmax), so correctness checks use ``"reference"``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import MissingDependencyError


REFERENCE_KERNELS = "reference"
DEFAULT_KERNELS = "default"


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    # tflite-runtime 2.14 (its last release) fails at Interpreter() with numpy 2 (_ARRAY_API).
    if int(np.__version__.split(".")[0]) < 2:
        try:
            from tflite_runtime.interpreter import Interpreter

            return Interpreter
        except ImportError:
            pass
    raise MissingDependencyError(
        "the TFLite reference interpreter is missing; install the host extras: "
        "pip install 'edgeq[host]' (it brings ai-edge-litert)"
    )


class ReferenceInterpreter:
    """One TFLite model in the reference interpreter."""

    def __init__(
        self, model_path: str | os.PathLike[str], num_threads: int = 2, kernels: str = REFERENCE_KERNELS
    ) -> None:
        interpreter_class = _interpreter_class()
        self.model_path = Path(model_path)
        self.kernels = kernels
        extra = {}
        if kernels == REFERENCE_KERNELS:
            resolver = sys.modules[interpreter_class.__module__].OpResolverType.BUILTIN_REF
            extra["experimental_op_resolver_type"] = resolver
        elif kernels != DEFAULT_KERNELS:
            raise ValueError(f"kernels must be {REFERENCE_KERNELS!r} or {DEFAULT_KERNELS!r}, not {kernels!r}")
        self._interpreter = interpreter_class(model_path=str(model_path), num_threads=num_threads, **extra)
        self._interpreter.allocate_tensors()
        self._inputs = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()

    def run(self, inputs: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run raw input tensors; returns copies of the raw outputs."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        for detail, value in zip(self._inputs, inputs):
            self._interpreter.set_tensor(detail["index"], value)
        self._interpreter.invoke()
        return [self._interpreter.get_tensor(detail["index"]).copy() for detail in self._outputs]


def run_reference(
    model_path: str | os.PathLike[str],
    inputs: np.ndarray | Sequence[np.ndarray],
    num_threads: int = 2,
    kernels: str = REFERENCE_KERNELS,
) -> list[np.ndarray]:
    """Run one set of inputs through the reference interpreter."""
    return ReferenceInterpreter(model_path, num_threads, kernels).run(inputs)


class OnnxReference:
    """One ONNX model in onnxruntime (CPU execution provider): the reference for ONNX bundles.

    onnxruntime runs QDQ models with its fused integer kernels; edgeq's bundles run them in
    TVM's dequantize -> float -> quantize lowering, so quantized outputs agree within steps.
    """

    def __init__(self, model_path: str | os.PathLike[str], num_threads: int = 2) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise MissingDependencyError(
                "the ONNX reference needs onnxruntime: pip install 'edgeq[host]'"
            ) from None
        self.model_path = Path(model_path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._inputs = [value.name for value in self._session.get_inputs()]

    def run(self, inputs: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run raw input tensors (in the model's input order); returns the outputs."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        return list(self._session.run(None, dict(zip(self._inputs, inputs))))


def open_reference(model_path: str | os.PathLike[str], num_threads: int = 2) -> ReferenceInterpreter | OnnxReference:
    """The host reference for a source model: onnxruntime for .onnx, TFLite's reference kernels otherwise."""
    if Path(model_path).suffix.lower() == ".onnx":
        return OnnxReference(model_path, num_threads)
    return ReferenceInterpreter(model_path, num_threads, REFERENCE_KERNELS)
